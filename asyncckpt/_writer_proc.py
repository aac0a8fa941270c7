"""Entry point of the writer process: ``python -m asyncckpt._writer_proc FD_IN FD_OUT PPID``.

The root, thread count and storage options arrive as the first message on FD_IN.
"""

import sys
from multiprocessing.connection import Connection

from .executor import _writer_main

if __name__ == "__main__":
    fd_in, fd_out, ppid = sys.argv[1:4]
    _writer_main(Connection(int(fd_in), writable=False), Connection(int(fd_out), readable=False), int(ppid))

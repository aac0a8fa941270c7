"""Entry point of the writer process: ``python -m asyncckpt._writer_proc FD_IN FD_OUT PPID``.

Kept apart from ``writer_proc`` so that running it as ``__main__`` does not shadow the module
that defines the message classes.
"""

import sys
from multiprocessing.connection import Connection

from asyncckpt.writer_proc import writer_main

if __name__ == "__main__":
    fd_in, fd_out, ppid = sys.argv[1:4]
    writer_main(Connection(int(fd_in), writable=False), Connection(int(fd_out), readable=False), int(ppid))

"""Entry point of the writer process: ``python -m asyncckpt._writer_proc FD_IN FD_OUT PPID NICE IO``.

Kept apart from ``writer_proc`` so that running it as ``__main__`` does not shadow the module
that defines the message classes.
"""

import sys
from multiprocessing.connection import Connection

from asyncckpt.priority import writer_priority

if __name__ == "__main__":
    fd_in, fd_out, ppid, nice, io = sys.argv[1:6]
    writer_priority(int(nice), io)()  # before any thread starts (torch's, fsspec's): they inherit it

    from asyncckpt.writer_proc import writer_main

    writer_main(Connection(int(fd_in), writable=False), Connection(int(fd_out), readable=False), int(ppid))

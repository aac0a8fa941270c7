"""The chunk-store sweep after a commit must spare the parts of the step being written next.

Found by ``test_kill_fuzz.py::test_kill_fuzz_incremental_process_executor``: the finalizer
takes ``in_flight`` (and the pruner its live references) before retention deletes and the
sweep lists ``.chunks/``; parts the writer wrote meanwhile for the next step are owned by
this writer, belong to no step in that stale ``in_flight`` and no committed manifest, so
they are deleted, and the next step commits referencing parts that are gone.  Here the
sweep is only made slow (as retention's deletions or a slow listing make it); nothing
else is injected.  Fixed: the sweep asks which saves are in flight after it lists the store.
"""

from __future__ import annotations

import os
import time
import warnings

import torch

import asyncckpt.pruner as pruner_mod
from asyncckpt import AsyncCheckpointer, WriterOptions, list_checkpoints
from asyncckpt.catalog import read_manifest
from asyncckpt.chunkstore import referenced, store_of
from asyncckpt.storage import storage_for


def test_sweep_spares_parts_of_the_next_step(tmp_path, monkeypatch) -> None:
    real = pruner_mod.sweep_chunks

    def slow_sweep(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.5)  # as if retention's deletions before the sweep took a while
        return real(*args, **kwargs)

    monkeypatch.setattr(pruner_mod, "sweep_chunks", slow_sweep)
    root = str(tmp_path / "ckpt")
    state = {"w": torch.zeros(1 << 20)}  # one 4 MiB part, new at every step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ck = AsyncCheckpointer(root, state, max_inflight=2, writer=WriterOptions(incremental=True))
    try:
        for s in (0, 1):
            state["w"].fill_(s)
            ck.save_async(s)
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(root, "step_000000001", "manifest.json")):
            assert time.monotonic() < deadline
            time.sleep(0.002)
        # step 1 is committed; its finalizer is now sweeping: step 2 is written meanwhile
        state["w"].fill_(2)
        ck.save_async(2)
    finally:
        ck.close()
    storage = storage_for(root)
    missing = {}
    for info in list_checkpoints(root):
        gone = referenced(read_manifest(storage, info.path)) - set(os.listdir(store_of(info.path)))
        if gone:
            missing[info.step] = sorted(gone)
    assert missing == {}

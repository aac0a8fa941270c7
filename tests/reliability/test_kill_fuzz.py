"""Kill-fuzz: SIGKILL a continuously saving trainer at seeded random moments.

After every kill a fresh reader must load the newest committed step bit-exactly; no load of
uncommitted or corrupt data, no committed step lost (within retention), and the next trainer
on the same root resumes the same step and sweeps the leftovers.  Counts are printed
(``-s``) and recorded in docs/reliability.md.

Knobs: ASYNCCKPT_FUZZ_KILLS (default 50), ASYNCCKPT_FUZZ_S3_KILLS (15),
ASYNCCKPT_FUZZ_INC_KILLS (20), ASYNCCKPT_FUZZ_INC_PROC_KILLS (4), ASYNCCKPT_FUZZ_S3_INC_KILLS (6),
ASYNCCKPT_FUZZ_SEED;
ASYNCCKPT_SLOW=1 enables the long variants.
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest

from asyncckpt.catalog import list_leftovers

from ._fuzz import Fuzz
from ._procs import Spawner, Zygote
from ._support import knob, report, s3_env, seed, slow_enabled

pytestmark = pytest.mark.multiproc

needs_slow_env = pytest.mark.skipif(not slow_enabled(), reason="long randomized run: set ASYNCCKPT_SLOW=1")


def _assert_clean(fz: Fuzz, name: str) -> None:
    report(name, fz.result.summary())
    assert fz.result.failures == [], "\n".join(fz.result.failures[:20])
    c = fz.result.counts
    assert c["uncommitted_loads"] == 0 and c["corrupt_loads"] == 0 and c["lost_committed"] == 0


def _local_fuzz(
    tmp_path, kills: int, rng: random.Random, spawn_every: int = 0, numel: int = 1 << 19, frozen_parts: int = 0,
    **base,
) -> Fuzz:  # fmt: skip
    root = str(tmp_path / "ckpt")
    logs = tmp_path / "logs"
    logs.mkdir()
    fz = Fuzz(root=root, numel=numel, keep=3, log_dir=str(logs), base_cfg=base, frozen_parts=frozen_parts)
    with Zygote(log_path=str(logs / "zygote.log")) as zygote, Spawner() as spawner:
        for i in range(kills):
            fresh = spawn_every and i % spawn_every == spawn_every - 1
            fz.kill_round(spawner.start if fresh else zygote.start, rng, i)
        fz.clean_finish(zygote.start, rng)
    # the last trainer swept every leftover at start and closed cleanly
    assert list_leftovers(root) == []
    return fz


def _s3_fuzz(
    s3, logs, kills: int, rng: random.Random, debug_first: bool = False, numel: int = 1 << 16,
    frozen_parts: int = 0, **base: Any,
) -> tuple[Fuzz, Any]:  # fmt: skip
    """``kills`` rounds against the moto ``s3`` root; credentials reach the child only through
    its environment.  Returns the fuzz and the clean finish."""
    root, opts, _ = s3
    logs.mkdir()
    fz = Fuzz(
        root=root, numel=numel, keep=3, log_dir=str(logs), storage_options=opts,
        base_cfg={"s3": True, **base}, frozen_parts=frozen_parts,
    )  # fmt: skip
    with Zygote(env_extra=s3_env(opts), log_path=str(logs / "zygote.log")) as zygote:
        for i in range(kills):
            fz.kill_round(zygote.start, rng, i, debug_log=debug_first and i == 0)
        final = fz.clean_finish(zygote.start, rng)
    return fz, final


def test_kill_fuzz_local(tmp_path) -> None:
    """50 (ASYNCCKPT_FUZZ_KILLS) SIGKILLs of a trainer saving ~4.3 MiB steps with keep=3."""
    kills = knob("ASYNCCKPT_FUZZ_KILLS", 50)
    fz = _local_fuzz(tmp_path, kills, random.Random(seed()), spawn_every=10)
    _assert_clean(fz, "kill_fuzz_local")
    assert fz.result.counts["kills"] == kills


# Differential checkpoints: 3 parts that never change, a 5 MiB tensor whose first part never
# changes, and ~1.2 MiB that change every step: about 18 MiB a step, most of it deduplicated.
INC: dict[str, Any] = dict(numel=1 << 17, frozen_parts=3, incremental=True, compression="lz4")


def _assert_chunks(fz: Fuzz) -> None:
    c = fz.result.counts
    assert c["missing_parts"] == 0 and c["leaked_after_gc"] == 0
    assert c["final_steps_loaded"] >= 1
    assert c["inc_steps_deduped"] > 0  # dedup really happened


def test_kill_fuzz_incremental(tmp_path) -> None:
    """20 (ASYNCCKPT_FUZZ_INC_KILLS) SIGKILLs of a trainer saving differential, lz4-compressed
    steps with keep=3.  After every kill, every part a committed step references is in the
    chunk store; at the end, ``gc`` leaves exactly the referenced parts and every committed
    step loads bit-exactly."""
    kills = knob("ASYNCCKPT_FUZZ_INC_KILLS", 20)
    fz = _local_fuzz(tmp_path, kills, random.Random(seed() + 3), spawn_every=10, **INC)
    _assert_clean(fz, "kill_fuzz_incremental")
    _assert_chunks(fz)
    assert fz.result.counts["kills"] == kills


def test_kill_fuzz_incremental_process_executor(tmp_path) -> None:
    """A few SIGKILLs of a differential trainer that writes through a writer process."""
    kills = knob("ASYNCCKPT_FUZZ_INC_PROC_KILLS", 4)
    fz = _local_fuzz(tmp_path, kills, random.Random(seed() + 4), executor="process", **INC)
    _assert_clean(fz, "kill_fuzz_incremental_process_executor")
    _assert_chunks(fz)


@pytest.mark.s3
def test_kill_fuzz_s3(tmp_path, s3) -> None:
    """15 (ASYNCCKPT_FUZZ_S3_KILLS) SIGKILLs of a trainer saving to s3:// on the moto server."""
    _, opts, _ = s3
    logs = tmp_path / "logs"
    # the first round logs at DEBUG, so the credential check below covers botocore's logs
    kills = knob("ASYNCCKPT_FUZZ_S3_KILLS", 15)
    fz, final = _s3_fuzz(s3, logs, kills, random.Random(seed() + 1), debug_first=True)
    _assert_clean(fz, "kill_fuzz_s3")
    # nothing the children printed or logged (DEBUG included) holds a credential
    texts = [(logs / n).read_bytes() for n in os.listdir(logs)] + ["\n".join(final.seen).encode()]
    for t in texts:
        assert opts["secret"].encode() not in t and opts["key"].encode() not in t


# Differential checkpoints on S3: one 4 MiB part that never changes, a 5 MiB tensor whose
# first part never changes, and ~0.6 MiB that change every step: about 9.6 MiB a step, most of
# it deduplicated (kept small: every part goes through the moto server).
S3_INC: dict[str, Any] = dict(numel=1 << 16, frozen_parts=1, incremental=True, compression="lz4")


@pytest.mark.s3
def test_kill_fuzz_s3_incremental(tmp_path, s3) -> None:
    """6 (ASYNCCKPT_FUZZ_S3_INC_KILLS) SIGKILLs of a trainer saving differential,
    lz4-compressed steps to s3:// on the moto server.  After every kill, every part a committed
    step references is in the chunk store (listed through the storage API); at the end,
    ``gc`` leaves exactly the referenced parts and every committed step loads bit-exactly."""
    kills = knob("ASYNCCKPT_FUZZ_S3_INC_KILLS", 6)
    fz, _ = _s3_fuzz(s3, tmp_path / "logs", kills, random.Random(seed() + 5), **S3_INC)
    _assert_clean(fz, "kill_fuzz_s3_incremental")
    _assert_chunks(fz)
    assert fz.result.counts["kills"] == kills


def test_kill_fuzz_process_executor_trainer(tmp_path) -> None:
    """A few SIGKILLs of a trainer that writes through a writer process (which must then exit
    without committing while the next trainer already runs on the same root)."""
    kills = knob("ASYNCCKPT_FUZZ_PROC_KILLS", 4)
    fz = _local_fuzz(tmp_path, kills, random.Random(seed() + 2), executor="process")
    _assert_clean(fz, "kill_fuzz_process_executor_trainer")


@pytest.mark.slow
@needs_slow_env
@pytest.mark.timeout(7200)
def test_kill_fuzz_local_long(tmp_path) -> None:
    kills = knob("ASYNCCKPT_FUZZ_KILLS_SLOW", 500)
    fz = _local_fuzz(tmp_path, kills, random.Random(seed() + 10), spawn_every=5)
    _assert_clean(fz, "kill_fuzz_local_long")


@pytest.mark.slow
@needs_slow_env
@pytest.mark.timeout(7200)
def test_kill_fuzz_process_executor_trainer_long(tmp_path) -> None:
    kills = knob("ASYNCCKPT_FUZZ_PROC_KILLS_SLOW", 60)
    fz = _local_fuzz(tmp_path, kills, random.Random(seed() + 12), executor="process")
    _assert_clean(fz, "kill_fuzz_process_executor_trainer_long")


@pytest.mark.slow
@needs_slow_env
@pytest.mark.s3
@pytest.mark.timeout(7200)
def test_kill_fuzz_s3_long(tmp_path, s3) -> None:
    kills = knob("ASYNCCKPT_FUZZ_S3_KILLS_SLOW", 150)
    fz, _ = _s3_fuzz(s3, tmp_path / "logs", kills, random.Random(seed() + 11))
    _assert_clean(fz, "kill_fuzz_s3_long")

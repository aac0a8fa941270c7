"""The kill-fuzz loop shared by the local, S3 and process-executor variants.

Each round starts a trainer child on the same root (it resumes and continues), waits for a
seeded random moment and SIGKILLs it.  After every kill the test process (a fresh reader)
lists and resumes the root and checks it against what the child reported.
"""

from __future__ import annotations

import os
import random
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from asyncckpt import layout, list_checkpoints, resume
from asyncckpt.catalog import list_leftovers, read_manifest
from asyncckpt.chunkstore import parse_object, referenced, store_of
from asyncckpt.maintenance import gc
from asyncckpt.resume import load_checkpoint
from asyncckpt.step_files import verify_files
from asyncckpt.storage import Storage, storage_for

from ._procs import Child
from ._support import make_state, pid_alive, state_mismatch

# How long after the chosen moment the kill lands.  "startup" kills during the child's
# construction (sweep of leftovers, listing) and resume; the others count COMMITTED lines
# first and then wait: tight (inside the next save's staging or the retention that follows
# a commit), exponential (mostly mid-write) and uniform over 0-300 ms (anywhere).
KILL_MODES = (("startup", 0.10), ("tight", 0.25), ("exp", 0.25), ("uniform", 0.40))


# reported by a differential run (Fuzz.chunks)
CHUNK_KEYS = (
    "missing_parts", "parts_checked", "inc_steps_seen", "inc_steps_deduped", "store_objects_max",
    "unreferenced_max", "leaked_before_gc", "gc_removed_chunks", "leaked_after_gc", "final_steps_loaded",
)  # fmt: skip


def pick_kill(rng: random.Random) -> tuple[str, int, float]:
    """(mode, COMMITTED lines to wait for, delay in seconds)."""
    mode = rng.choices([m for m, _ in KILL_MODES], [w for _, w in KILL_MODES])[0]
    k = rng.randint(1, 4)
    if mode == "startup":
        return mode, 0, rng.uniform(0.0, 0.3)
    if mode == "tight":
        return mode, k, rng.uniform(0.0, 0.015)
    if mode == "exp":
        return mode, k, min(0.3, rng.expovariate(1 / 0.04))
    return mode, k, rng.uniform(0.0, 0.3)


@dataclass
class FuzzResult:
    counts: Counter = field(default_factory=Counter)
    phases: Counter = field(default_factory=Counter)
    modes: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    extra_keys: tuple[str, ...] = ()  # reported too (the chunk-store counts of a differential run)

    def fail(self, what: str) -> None:
        self.failures.append(what)

    def summary(self) -> dict[str, Any]:
        keys = (
            "kills", "resumes_checked", "uncommitted_loads", "corrupt_loads", "lost_committed",
            "late_commits", "regressions", "child_resume_mismatch", "failed_saves",
            "checkpoints_verified", "leftovers_seen", "leftovers_gone", "orphan_writer_max_ms",
            "uncommitted_prefix_warnings",
        )  # fmt: skip
        out: dict[str, Any] = {k: self.counts.get(k, 0) for k in keys + self.extra_keys}
        out["kill_modes"] = dict(sorted(self.modes.items()))
        out["phases_at_kill"] = dict(sorted(self.phases.items()))
        return out


def classify_local(root: str, committed: list[int], keep: int | None) -> list[str]:
    """Where the kill landed, judged from what it left on disk."""
    tags = []
    newest = max(committed, default=-1)
    tmp = os.path.join(root, layout.TMP_DIR)
    for name in sorted(os.listdir(tmp)) if os.path.isdir(tmp) else []:
        step = layout.parse_step(name.split(".", 1)[0])
        path = os.path.join(tmp, name)
        files = set(os.listdir(path)) if os.path.isdir(path) else set()
        if step is not None and step > newest:
            if layout.MANIFEST in files:
                tags.append("commit: manifest durable, before the rename")
            elif layout.DCP_METADATA in files:
                tags.append("commit: shards + .metadata written, before the manifest")
            elif files:
                tags.append("write: inside the shard files")
            else:
                tags.append("write: temp dir created, no file yet")
        else:
            tags.append("retention: step decommitted, files being deleted")
    if keep is not None and len(committed) > keep:
        tags.append("retention: after a commit, before pruning")
    return tags or ["between saves: staging, queueing, done-callbacks, startup"]


def classify_url(new_leftovers: list[str], committed: list[int], keep: int | None) -> list[str]:
    tags = []
    newest = max(committed, default=-1)
    for p in new_leftovers:
        step = layout.parse_step(p.rstrip("/").rsplit("/", 1)[-1])
        if step is not None and step > newest:
            tags.append("write: step prefix without a manifest (uploads in flight)")
        else:
            tags.append("retention: manifest deleted, objects being deleted")
    if keep is not None and len(committed) > keep:
        tags.append("retention: after a commit, before pruning")
    return tags or ["between saves: staging, queueing, done-callbacks, startup"]


@dataclass
class Fuzz:
    """One root, many kill rounds."""

    root: str
    numel: int
    keep: int | None
    log_dir: str
    storage_options: dict[str, Any] | None = None
    base_cfg: dict[str, Any] = field(default_factory=dict)
    printed: set[int] = field(default_factory=set)
    last_resumed: int | None = None
    leftovers: set[str] = field(default_factory=set)
    result: FuzzResult = field(default_factory=FuzzResult)
    writers: list[int] = field(default_factory=list)
    frozen_parts: int = 0  # make_state's: > 0 for differential checkpoints (mostly unchanged parts)
    # distinct (kind, step) of differential steps seen committed, and those referencing parts
    # an earlier step wrote (dedup really happened)
    inc_steps: set[tuple[str, int]] = field(default_factory=set)
    inc_deduped: set[tuple[str, int]] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.chunks:
            self.result.extra_keys = CHUNK_KEYS

    @property
    def chunks(self) -> bool:
        """Differential checkpoints: the chunk stores are checked after every round."""
        return bool(self.base_cfg.get("incremental"))

    @property
    def is_url(self) -> bool:
        return "://" in self.root

    def cfg(self, rng: random.Random, round_no: int, **extra: Any) -> dict[str, Any]:
        cfg = {
            "mode": "train",
            "root": self.root,
            "numel": self.numel,
            "keep": self.keep,
            "seed": rng.randrange(1 << 30),
            "max_inflight": rng.choice([1, 1, 2]),
            "write_threads": rng.choice([1, 1, 2]),
            "train_ms": rng.choice([0, 0, 2, 10]),
            "stdout": os.path.join(self.log_dir, f"round{round_no % 4}.log"),
        }
        if self.frozen_parts:
            cfg["frozen_parts"] = self.frozen_parts
        cfg.update(self.base_cfg)
        cfg.update(extra)
        return cfg

    def _consume(self, child: Child, text: str) -> None:
        parts = text.split()
        if parts[0] == "COMMITTED":
            self.printed.add(int(parts[1]))
        elif parts[0] == "WRITER":
            self.writers.append(int(parts[1]))
        elif parts[0] == "FAILED":
            self.result.counts["failed_saves"] += 1
            self.result.fail(f"child {child.pid}: save failed: {text}")
        elif parts[0] == "RESUMED":
            got = None if parts[1] == "None" else int(parts[1])
            if parts[2] != "OK" or got != self.last_resumed:
                self.result.counts["child_resume_mismatch"] += 1
                self.result.fail(f"child resumed {text}, the previous check resumed {self.last_resumed}")

    def _log_tail(self, cfg: dict[str, Any]) -> str:
        try:
            with open(cfg["stdout"], "rb") as f:
                return f.read()[-3000:].decode(errors="replace")
        except OSError:
            return ""

    def kill_round(self, start: Callable[[dict[str, Any]], Child], rng: random.Random, round_no: int,
                   **extra: Any) -> None:  # fmt: skip
        cfg = self.cfg(rng, round_no, **extra)
        mode, k, delay = pick_kill(rng)
        self.result.modes[mode] += 1
        child = start(cfg)
        try:
            if mode == "startup":
                time.sleep(delay)
            else:
                deadline = time.monotonic() + 120
                seen = 0
                while seen < k:
                    text = child.next_event(max(0.0, deadline - time.monotonic()))
                    if text is None:
                        raise RuntimeError(
                            f"round {round_no}: child {child.pid} exited ({child.exit_code}) or stalled "
                            f"before its kill; log:\n{self._log_tail(cfg)}"
                        )
                    self._consume(child, text)
                    seen += text.startswith("COMMITTED")
                time.sleep(delay)
            child.kill()
            code = child.wait(60)
        finally:
            child.kill()
        if code is None:
            raise RuntimeError(f"round {round_no}: child {child.pid} did not die after SIGKILL")
        for text in child.drain():
            self._consume(child, text)
        if code != -9:
            self.result.fail(
                f"round {round_no}: child exited with {code} before the kill:\n{self._log_tail(cfg)}"
            )
        self.result.counts["kills"] += 1
        self._wait_orphan_writers(round_no)
        self.check(round_no)

    def _wait_orphan_writers(self, round_no: int) -> None:
        """A killed trainer's writer process must notice and exit on its own (no commit after)."""
        for pid in self.writers:
            t0 = time.monotonic()
            while pid_alive(pid) and time.monotonic() - t0 < 15:
                time.sleep(0.02)
            if pid_alive(pid):
                self.result.fail(f"round {round_no}: writer process {pid} outlived its trainer by 15 s")
            else:
                waited = time.monotonic() - t0
                self.result.counts["orphan_writer_max_ms"] = max(
                    self.result.counts["orphan_writer_max_ms"], int(waited * 1000)
                )
        self.writers.clear()

    def check(self, round_no: int) -> None:
        res = self.result
        opts = self.storage_options
        infos = list_checkpoints(self.root, storage_options=opts)
        steps = [c.step for c in infos]
        leftovers = set(list_leftovers(self.root, storage_options=opts))
        new = sorted(leftovers - self.leftovers)
        res.counts["leftovers_seen"] += len(new)
        # gone: swept by the next checkpointer (local), or completed by a later save of the
        # same step (object stores are never swept; `asyncckpt gc` removes what remains)
        res.counts["leftovers_gone"] += len(self.leftovers - leftovers)
        self.leftovers = leftovers
        tags = (
            classify_url(new, steps, self.keep)
            if self.is_url
            else classify_local(self.root, steps, self.keep)
        )
        for t in set(tags):
            res.phases[t] += 1
        # a fresh reader resumes the newest committed step
        fresh = make_state(self.numel, self.frozen_parts)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = resume(self.root, fresh, storage_options=opts)
        skipped = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        if self.is_url:
            # On an object store a killed upload leaves a step prefix without a manifest.
            # resume names it and moves on ("was never committed"): nothing of it is loaded.
            uncommitted = [m for m in skipped if "was never committed" in m]
            res.counts["uncommitted_prefix_warnings"] += len(uncommitted)
            skipped = [m for m in skipped if m not in uncommitted]
        res.counts["resumes_checked"] += 1
        if skipped:
            res.counts["corrupt_loads"] += len(skipped)
            res.fail(f"round {round_no}: resume skipped a committed checkpoint: {skipped}")
        if got != (max(steps) if steps else None):
            res.fail(f"round {round_no}: resume loaded {got}, newest committed is {steps[-1:]}")
        top = max(self.printed, default=-1)
        if got is not None:
            bad = state_mismatch(fresh, got)
            if bad is not None:
                res.counts["corrupt_loads"] += 1
                res.fail(f"round {round_no}: step {got} loaded wrong values: {bad}")
            if got not in self.printed:
                if got > top:
                    # committed just before the kill, its callback lost; its manifest exists
                    # (it is listed) and its values are checked above: from now on it counts
                    # as committed
                    res.counts["late_commits"] += 1
                else:
                    res.counts["uncommitted_loads"] += 1
                    res.fail(f"round {round_no}: loaded step {got}, never reported committed")
        if top >= 0 and (got is None or got < top):
            res.counts["regressions"] += 1
            res.fail(f"round {round_no}: resumed {got} but step {top} was reported committed")
        if self.last_resumed is not None and (got is None or got < self.last_resumed):
            res.counts["regressions"] += 1
            res.fail(f"round {round_no}: resumed {got}, an earlier round resumed {self.last_resumed}")
        # every reported commit that retention must still keep is listed
        ever = self.printed | set(steps)
        for s in sorted(self.printed):
            newer = sum(1 for x in ever if x > s)
            if (self.keep is None or newer < self.keep) and s not in steps:
                res.counts["lost_committed"] += 1
                res.fail(f"round {round_no}: step {s} was reported committed and is gone (have {steps})")
        for s in steps:
            if s not in self.printed and s <= top:
                res.counts["uncommitted_loads"] += 1
                res.fail(f"round {round_no}: step {s} is listed but was never reported committed")
        # every listed checkpoint passes a full verification
        storage = storage_for(self.root, opts)
        for info in infos if not self.is_url else infos[-1:]:  # HTTP round trips are slow
            problems = verify_files(storage, info.path, read_manifest(storage, info.path))
            res.counts["checkpoints_verified"] += 1
            if problems:
                res.counts["corrupt_loads"] += 1
                res.fail(f"round {round_no}: committed {info.path} fails verification: {problems}")
        if self.chunks:
            self.check_chunks(f"round {round_no}", storage, infos, at_kill=round_no != 999)
        self.last_resumed = got
        self.printed.update(s for s in steps if s > top)  # late commits, verified above

    def check_chunks(
        self, where: str, storage: Storage, infos: list[Any], at_kill: bool = False
    ) -> dict[str, set[str]]:
        """Every part a committed step references is in its kind root's chunk store.

        Returns, per chunk store, the objects committed steps reference."""
        res = self.result
        refs: dict[str, set[str]] = {}
        stored: dict[str, set[str]] = {}
        for info in infos:
            store = store_of(info.path)
            if store not in stored:
                stored[store] = set(storage.listdir(store))
            m = read_manifest(storage, info.path)
            mine = referenced(m)
            refs.setdefault(store, set()).update(mine)
            missing = sorted(mine - stored[store])
            key = (str(info.tier), info.step)
            self.inc_steps.add(key)
            if any((parse_object(n) or ("", m.step))[1] != m.step for n in mine):
                self.inc_deduped.add(key)
            res.counts["parts_checked"] += len(mine)
            if missing:
                res.counts["missing_parts"] += len(missing)
                res.fail(
                    f"{where}: committed {info.path} references {len(missing)} part(s) "
                    f"missing from {store}: {missing[:5]}"
                )
        newest = max((i.step for i in infos), default=-1)
        for store, names in stored.items():
            unref = names - refs.get(store, set())
            if at_kill and any((parse_object(n) or ("", -1))[1] > newest for n in unref):
                res.phases["write: parts of an uncommitted step in .chunks"] += 1
            res.counts["store_objects_max"] = max(res.counts["store_objects_max"], len(names))
            res.counts["unreferenced_max"] = max(res.counts["unreferenced_max"], len(unref))
        res.counts["inc_steps_seen"] = len(self.inc_steps)
        res.counts["inc_steps_deduped"] = len(self.inc_deduped)
        return refs

    def audit_chunks_after_gc(self) -> None:
        """After the last trainer closed: ``gc`` leaves each chunk store holding exactly what
        committed steps reference (no leak, nothing dangling), and every committed step
        still loads bit-exactly."""
        res = self.result
        storage = storage_for(self.root, self.storage_options)
        infos = list_checkpoints(self.root, storage_options=self.storage_options)
        before = self.check_chunks("final, before gc", storage, infos)
        stores = {layout.chunk_store(layout.kind_root(self.root, k)) for k in layout.KINDS}
        res.counts["leaked_before_gc"] = sum(
            len(set(storage.listdir(st)) - before.get(st, set())) for st in stores
        )
        report = gc(self.root, min_age=0, storage_options=self.storage_options)
        res.counts["gc_removed_chunks"] = len(report.chunks)
        if report.errors:
            res.fail(f"gc reported errors: {report.errors}")
        infos = list_checkpoints(self.root, storage_options=self.storage_options)
        refs = self.check_chunks("final, after gc", storage, infos)
        for st in sorted(stores):
            names = set(storage.listdir(st))
            leaked = sorted(names - refs.get(st, set()))
            dangling = sorted(refs.get(st, set()) - names)
            res.counts["leaked_after_gc"] += len(leaked)
            if leaked:
                res.fail(
                    f"after gc, {st} holds {len(leaked)} object(s) no committed step references: {leaked[:5]}"
                )
            if dangling:  # also counted as missing_parts by check_chunks
                res.fail(f"after gc, {st} lacks {len(dangling)} referenced object(s): {dangling[:5]}")
        for info in infos:
            fresh = make_state(self.numel, self.frozen_parts)
            try:
                load_checkpoint(storage, info.path, read_manifest(storage, info.path), fresh)
            except Exception as e:
                res.counts["corrupt_loads"] += 1
                res.fail(f"after gc, {info.path} does not load: {type(e).__name__}: {e}")
                continue
            bad = state_mismatch(fresh, info.step)
            if bad is not None:
                res.counts["corrupt_loads"] += 1
                res.fail(f"after gc, {info.path} loaded wrong values: {bad}")
            res.counts["final_steps_loaded"] += 1

    def clean_finish(self, start: Callable[[dict[str, Any]], Child], rng: random.Random) -> Child:
        """A last child resumes, saves two steps and closes; its exit must be clean."""
        cfg = self.cfg(rng, 99, steps=2)
        child = start(cfg)
        code = child.wait(180)
        if code is None:
            child.kill()
            raise RuntimeError(f"the final child hung; log:\n{self._log_tail(cfg)}")
        for text in child.drain():
            self._consume(child, text)
        if code != 0 or "CLOSED" not in child.seen:
            self.result.fail(f"final child exited {code}; log:\n{self._log_tail(cfg)}")
        self.check(999)
        if self.chunks:
            self.audit_chunks_after_gc()
        return child

"""Looking after a root from outside a training run: ``ls``, ``inspect``, ``verify``, ``gc``.

Each operation returns a report object; the ``asyncckpt`` command only parses arguments and
prints these.  Reading goes through the catalog (never unpickling), deleting through the
pruner, exactly as a training run does.
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import layout
from .catalog import (
    leftover_reason,
    leftovers_in,
    list_in,
    normalize_root,
    read_manifest,
    read_protected,
)
from .checksum import ALGORITHMS
from .chunkstore import store_bytes
from .errors import (
    AsyncCheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    StorageError,
)
from .handle import CheckpointInfo
from .layout import KINDS, Kind
from .manifest import Manifest
from .ownership import is_alive, owner_of, owners, record_path
from .policy import CheckpointRecord, RetentionPolicy, plan_deletions
from .pruner import abort_uploads, decommit_and_remove, step_references, sweep_chunks
from .storage import AtomicRename, Storage, is_file, probe_file, storage_for

__all__ = [
    "Target",
    "resolve",
    "open_root",
    "Listing",
    "ls",
    "state_summary",
    "verify_bytes",
    "verify",
    "verify_root",
    "GcReport",
    "gc",
]


# --------------------------------------------------------------------------- locating


@dataclass(frozen=True)
class Target:
    """One committed step directory picked by a user."""

    root: str
    step: int
    tier: str
    path: str


def _split_step(path: str) -> Target | None:
    """The Target named by a ``ROOT[/snapshots]/step_XXXXXXXXX`` path, else None."""
    parent, name = layout.parent(path)
    step = layout.parse_step(name)
    if step is None:
        return None
    grand, pname = layout.parent(parent)
    if pname == layout.SNAPSHOT_DIR:
        return Target(grand, step, Kind.SNAPSHOT.value, path)
    return Target(parent, step, Kind.PERMANENT.value, path)


def open_root(arg: str, storage_options: dict[str, Any] | None = None) -> tuple[Storage, str]:
    """The backend and normalized path of an existing checkpoint root (not a step)."""
    root = normalize_root(arg)
    storage = storage_for(root, storage_options)
    st = storage.stat(root)
    if st is None:
        raise CheckpointNotFoundError(f"checkpoint root {root} does not exist")
    if isinstance(storage, AtomicRename) and st.kind != "dir":
        raise ConfigError(f"checkpoint root {root} is not a directory")
    return storage, root


def _leftover_hint(storage: Storage, root: str) -> str:
    n = len(leftovers_in(storage, root))
    return f" ({n} uncommitted leftover{'s' * (n != 1)}; see `asyncckpt ls`)" if n else ""


def resolve(
    arg: str, step: int | None = None, storage_options: dict[str, Any] | None = None
) -> tuple[Storage, Target, Manifest]:
    """The step that ``ROOT``, ``ROOT/step_XXXXXXXXX`` or ``ROOT`` with ``step`` names, and
    its validated manifest.  Without a step: the newest committed (permanent wins a tie).

    Raises:
        CheckpointNotFoundError: the root or the step does not exist, or nothing is committed.
        CorruptCheckpointError: the step's manifest is invalid or names another step.
        ConfigError: a step directory and a different ``step`` were both given.
    """
    path = normalize_root(arg)
    named = _split_step(path)
    if named is not None:
        storage = storage_for(path, storage_options)
        if step is not None and step != named.step:
            raise ConfigError(f"{path} is step {named.step} but --step says {step}; give one of them")
        if storage.stat(path) is None:
            raise CheckpointNotFoundError(f"{path} does not exist")
        target = named
    else:
        storage, path = open_root(arg, storage_options)
        infos = list_in(storage, path)
        if step is None:
            if not infos:
                raise CheckpointNotFoundError(
                    f"no committed checkpoint under {path}" + _leftover_hint(storage, path)
                )
            info = infos[-1]
        else:
            matches = [i for i in infos if i.step == step]
            if not matches:
                if any(layout.parse_step(layout.parent(p)[1]) == step for p in leftovers_in(storage, path)):
                    raise CheckpointNotFoundError(
                        f"step {step} under {path} is not committed (its manifest is missing or "
                        "invalid); `asyncckpt gc` removes it"
                    )
                have = ", ".join(str(s) for s in sorted({i.step for i in infos})[-10:]) or "none"
                raise CheckpointNotFoundError(
                    f"no checkpoint for step {step} under {path}; committed steps: {have}"
                )
            info = matches[-1]
        target = Target(path, info.step, info.tier, info.path)
    m = read_manifest(storage, target.path)
    if m.step != target.step:
        raise CorruptCheckpointError(
            f"{target.path}: its manifest says step {m.step}; the directory was renamed or damaged"
        )
    return storage, target, m


# --------------------------------------------------------------------------- ls and inspect


@dataclass
class Listing:
    """What ``asyncckpt ls`` shows: committed checkpoints, protected steps, leftovers."""

    root: str
    checkpoints: list[CheckpointInfo]
    protected: set[int]
    leftovers: list[tuple[str, str]]  # (path, why it is not committed)
    store_objects: int = 0  # differential steps' parts (both tiers' chunk stores)
    store_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        """What the checkpoints hold, parts shared between differential steps counted once each."""
        return sum(i.bytes for i in self.checkpoints)

    @property
    def disk_bytes(self) -> int:
        """What the root really uses: each step's own files, plus the chunk stores once."""
        return sum(i.bytes - i.part_bytes for i in self.checkpoints) + self.store_bytes


def ls(arg: str, storage_options: dict[str, Any] | None = None) -> Listing:
    """List a root."""
    storage, root = open_root(arg, storage_options)
    infos = list_in(storage, root)
    stores = [store_bytes(storage, layout.chunk_store(layout.kind_root(root, k))) for k in KINDS]
    return Listing(
        root,
        infos,
        read_protected(storage, root),
        [(p, leftover_reason(storage, p)) for p in leftovers_in(storage, root)],
        sum(n for n, _ in stores),
        sum(b for _, b in stores),
    )


def _walk_state(node: dict[str, Any], path: str, out: dict[str, Any], objects: dict[str, str]) -> None:
    kind = node.get("t")
    if kind == "value":
        out[path] = node.get("v")
    elif kind == "object":
        objects[path] = str(node.get("cls", "?"))
        _walk_state(node.get("sd", {}), path, out, objects)
    elif kind in ("list", "tuple"):
        items = node.get("items", [])
        if all(isinstance(c, dict) and c.get("t") == "value" for c in items):
            out[path] = [c.get("v") for c in items]  # short lists of plain values read best whole
            return
        for i, child in enumerate(items):
            _walk_state(child, f"{path}.{i}" if path else str(i), out, objects)
    elif kind == "dict":
        if not node.get("items") and path:
            out[path] = {}
        for key, child in node.get("items", []):
            _walk_state(child, f"{path}.{key}" if path else str(key), out, objects)


def state_summary(m: Manifest) -> tuple[dict[str, Any], dict[str, str]]:
    """(plain values by dotted path, object classes by path) from a manifest's state tree."""
    values: dict[str, Any] = {}
    objects: dict[str, str] = {}
    for key, node in m.state.items():
        _walk_state(node, str(key), values, objects)
    return values, objects


# --------------------------------------------------------------------------- verify


def verify_bytes(m: Manifest) -> int:
    """Bytes ``verify`` reports progress for (files without a whole-file crc)."""
    return sum(
        c.length
        for t in m.tensors.values()
        for c in t.chunks
        if not set(ALGORITHMS) & set(m.files.get(c.file, {}))
    )


def verify(
    storage: Storage, target: Target, m: Manifest, progress: Callable[[int], None] | None = None
) -> list[str]:
    """Every file of one step: sizes, checksums, and that the blobs tile each shard."""
    from .step_files import verify_files  # imports torch: only verify needs it, not ls or gc

    return verify_files(storage, target.path, m, progress=progress)


@dataclass
class VerifyResult:
    target: Target
    problems: list[str]
    vanished: bool = False  # deleted (by retention or gc) while we were verifying: not a failure


def verify_root(
    arg: str,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[Manifest, Target], Any] | None = None,
) -> Iterator[VerifyResult]:
    """Verify every committed step of a live root.  A step that retention deletes meanwhile is
    reported as vanished, and the rest are still verified."""
    from .step_files import verify_files  # imports torch: only verify needs it, not ls or gc

    storage, root = open_root(arg, storage_options)
    infos = list_in(storage, root)
    if not infos:
        raise CheckpointNotFoundError(f"no committed checkpoint under {root}" + _leftover_hint(storage, root))
    for i in infos:
        target = Target(root, i.step, i.tier, i.path)
        try:
            m = read_manifest(storage, i.path)
        except (CorruptCheckpointError, OSError) as e:
            # listed with its manifest a moment ago: a manifest gone now was deleted (retention
            # removes it first, then the files), not damage
            gone = probe_file(storage, layout.join(i.path, layout.MANIFEST)) is None
            yield VerifyResult(target, [] if gone else [" ".join(str(e).split())], vanished=gone)
            continue
        bar = progress(m, target) if progress is not None else None
        try:
            with bar if bar is not None else contextlib.nullcontext():
                problems = verify_files(storage, i.path, m, progress=bar.update if bar is not None else None)
        except (CorruptCheckpointError, OSError) as e:  # e.g. a file vanished mid-read
            problems = [" ".join(str(e).split())]
        if problems and storage.stat(layout.join(i.path, layout.MANIFEST)) is None:
            yield VerifyResult(target, [], vanished=True)  # pruned while we read it
        else:
            yield VerifyResult(target, problems)


# --------------------------------------------------------------------------- gc


def _age_s(storage: Storage, path: str, now: float) -> float | None:
    """Seconds since anything directly in ``path`` last changed; None when unknown."""
    st = storage.stat(path)
    if st is None:
        return None
    times = [st.mtime] if st.mtime is not None else []
    if st.kind == "dir":
        for name in storage.listdir(path):
            child = storage.stat(layout.join(path, name))
            if child is not None and child.mtime is not None:
                times.append(child.mtime)
    return max(0.0, now - max(times)) if times else None


def _owner(storage: Storage, path: str) -> str | None:
    """The owner token of an in-flight leftover: from a temp name, or a step's ``.writer``."""
    parent, name = layout.parent(path)
    if layout.parent(parent)[1] == layout.TMP_DIR:
        return owner_of(name)
    marker = layout.join(path, layout.WRITER_MARKER)
    # a storage error propagates: an unanswered question is never "nobody owns it"
    if not is_file(storage, marker):
        return None
    try:
        return storage.read_bytes(marker, 64).decode(errors="replace").strip() or None
    except StorageError as e:
        if e.errno == errno.ENOENT:  # the step committed meanwhile: its writer dropped the marker
            return None
        raise


@dataclass
class GcReport:
    """What ``gc`` removed, kept and skipped (``dry_run``: what it would remove)."""

    root: str
    dry_run: bool
    removed: list[tuple[str, str]] = field(default_factory=list)  # leftovers: (path, reason)
    young: list[tuple[str, float | None]] = field(default_factory=list)  # leftovers too recent
    in_use: list[tuple[str, str]] = field(default_factory=list)  # a live writer's work: (path, owner)
    aborted: list[tuple[str, str, float | None]] = field(default_factory=list)  # uploads
    young_uploads: list[tuple[str, float | None]] = field(default_factory=list)
    deleted: list[CheckpointInfo] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    snapshots: int = 0
    policies: int = 0
    errors: list[str] = field(default_factory=list)
    chunks: list[str] = field(default_factory=list)  # chunk-store objects no committed step references


def _remove_leftover(storage: Storage, path: str) -> None:
    step = layout.parse_step(layout.parent(path)[1])
    if step is not None:
        # out of the step namespace first, as retention does, so a crash mid-delete leaves
        # nothing under a step name (object stores: no valid manifest, never visible)
        decommit_and_remove(storage, path, step)
    else:
        storage.remove(path)


def gc(
    arg: str,
    policies: Sequence[RetentionPolicy] = (),
    *,
    min_age: float = 3600.0,
    dry_run: bool = False,
    storage_options: dict[str, Any] | None = None,
    now: float | None = None,
) -> GcReport:
    """Remove uncommitted leftovers older than ``min_age``, abort abandoned multipart uploads,
    and delete the committed steps no policy keeps (never the newest, never a protected one;
    snapshots are not touched)."""
    storage, root = open_root(arg, storage_options)
    if _split_step(root) is not None:
        raise ConfigError(f"gc takes a checkpoint root, not a step directory: {root}")
    now = time.time() if now is None else now
    report = GcReport(root, dry_run, policies=len(policies))
    known = owners(storage, root)
    alive = {t: rec for t, (rec, mtime) in known.items() if is_alive(rec, mtime, now)}
    for path in leftovers_in(storage, root):
        owner = _owner(storage, path)
        if owner in alive:  # never a live writer's work, whatever --min-age says
            report.in_use.append((path, alive[owner].describe()))
            continue
        age = _age_s(storage, path, now)
        if min_age > 0 and (age is None or age < min_age):
            report.young.append((path, age))
            continue
        reason = leftover_reason(storage, path)
        if not dry_run and _committed_since(storage, path):
            continue  # committed since we listed it: not a leftover after all
        if not dry_run:
            try:
                _remove_leftover(storage, path)
            except (AsyncCheckpointError, OSError) as e:
                report.errors.append(f"could not remove {path}: {' '.join(str(e).split())}")
                continue
        report.removed.append((path, reason))
    if not dry_run:
        for token in set(known) - set(alive):
            storage.remove(record_path(root, token))  # a dead writer's owner record

    def in_use(url: str) -> bool:  # an upload into a step a live writer is writing
        return _owner(storage, layout.parent(url)[0]) in alive

    report.aborted, report.young_uploads, errs = abort_uploads(storage, root, min_age, now, dry_run, in_use)
    report.errors += errs

    infos = list_in(storage, root)
    report.snapshots = sum(1 for i in infos if i.tier != Kind.PERMANENT)
    by_step = {i.step: i for i in infos if i.tier == Kind.PERMANENT}
    history = [
        CheckpointRecord(step=i.step, time=i.time, metrics=dict(i.metrics), tier=i.tier) for i in infos
    ]
    plan = (
        plan_deletions(history, list(policies), now, protected=read_protected(storage, root))
        if policies
        else []
    )
    for s in plan:
        info = by_step[s]
        if not dry_run:
            try:
                decommit_and_remove(storage, info.path, s)
            except (AsyncCheckpointError, OSError) as e:
                report.errors.append(f"could not delete step {s} ({info.path}): {' '.join(str(e).split())}")
                continue
        report.deleted.append(info)
    deleted = {i.step for i in report.deleted}
    report.kept = sorted(s for s in by_step if s not in deleted)
    for kind in KINDS:
        live_infos = [i for i in infos if i.tier == kind and i.step not in deleted]
        _sweep_store(storage, root, kind, live_infos, report, min_age)
    return report


def _sweep_store(
    storage: Storage, root: str, kind: Kind, infos: list[CheckpointInfo], report: GcReport, min_age: float
) -> None:
    """Remove the parts of ``kind``'s chunk store that no committed step references and no
    live writer may still commit (``pruner.sweep_chunks``)."""
    if not storage.listdir(layout.chunk_store(layout.kind_root(root, kind))):
        return
    live: set[str] = set()
    for info in infos:
        refs = step_references(storage, info.path)
        if refs is None:  # its references are unknown: delete no part
            report.errors.append(
                f"chunk store of {kind} not swept: the manifest of {info.path} cannot be read"
            )
            return
        live |= refs
    try:
        report.chunks += sweep_chunks(storage, root, kind, live, dry_run=report.dry_run, min_age=min_age)
    except (AsyncCheckpointError, OSError) as e:
        report.errors.append(f"could not sweep the chunk store of {kind}: {' '.join(str(e).split())}")


def _committed_since(storage: Storage, path: str) -> bool:
    """Whether a step directory listed as a leftover has a valid manifest now."""
    step = layout.parse_step(layout.parent(path)[1])
    if step is None:
        return False
    try:
        return read_manifest(storage, path).step == step
    except (CorruptCheckpointError, OSError):
        return False

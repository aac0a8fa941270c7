"""The only code that deletes: retention, snapshot rotation, temp sweeps and ``gc``.

Decisions come from the pure policies in ``policy.py`` over the catalog's history.  A deletion
first *decommits* the step (POSIX: an atomic rename into ``.tmp/``; object stores: the
manifest goes first), then removes the files, so a crash mid-delete never leaves a
half-deleted step that looks committed.  Whatever the policies say, the newest permanent
step, steps in flight and protected steps are never deleted.  A failed delete is logged and
retried at the next prune; it never fails training.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor

from . import layout
from .catalog import Catalog, read_manifest, read_protected, unabandon
from .chunkstore import referenced, unreferenced
from .errors import CorruptCheckpointError
from .layout import KINDS, Kind
from .ownership import DEFAULT_TTL, is_alive, owner_of, owners, record_path
from .policy import RetentionPolicy, plan_deletions
from .storage import AtomicRename, MultipartUploads, Storage, exists, renames_atomically

__all__ = [
    "Pruner",
    "decommit",
    "decommit_and_remove",
    "sweep_tmp",
    "step_references",
    "sweep_chunks",
    "abort_uploads",
]

log = logging.getLogger("asyncckpt")


def decommit(storage: Storage, path: str, step: int, owner: str | None = None) -> str:
    """Make step directory ``path`` no longer a checkpoint; returns what is left to remove
    (named with ``owner``'s token, so nobody else sweeps it while its owner lives)."""
    base, _ = layout.parent(path)
    if isinstance(storage, AtomicRename):
        trash_dir = layout.tmp_dir(base)
        storage.makedirs(trash_dir)
        trash = layout.join(trash_dir, layout.tmp_dirname(step, owner))
        storage.rename_dir(path, trash)  # out of the step namespace atomically
        return trash
    storage.remove(layout.join(path, layout.MANIFEST))  # object store: the manifest goes first
    return path


def decommit_and_remove(storage: Storage, path: str, step: int) -> None:
    """Delete step directory ``path``: decommit it first, then remove its files."""
    storage.remove(decommit(storage, path, step))


def sweep_tmp(storage: Storage, root: str, ttl: float = DEFAULT_TTL, now: float | None = None) -> list[str]:
    """Remove in-progress directories under ``root`` whose owner is provably gone; returns them.

    POSIX only: a temp directory is removed unless its owner's record says the owner lives
    (a writer writes its record before anything else, so no record means no owner).  A
    live writer's work is never touched.  Dead owners' records go too.  On object stores a
    prefix without a manifest is left to ``gc``.
    """
    if not isinstance(storage, AtomicRename):
        return []
    now = time.time() if now is None else now
    known = owners(storage, root)
    alive = {t for t, (rec, mtime) in known.items() if is_alive(rec, mtime, now)}
    removed = []
    for kind in KINDS:
        tmp = layout.tmp_dir(layout.kind_root(root, kind))
        for name in storage.listdir(tmp):
            if not layout.is_tmp_name(name) or owner_of(name) in alive:
                continue
            path = layout.join(tmp, name)
            storage.remove(path)
            removed.append(path)
    for token in set(known) - alive:
        storage.remove(record_path(root, token))
    return removed


def step_references(storage: Storage, path: str) -> frozenset[str] | None:
    """The chunk-store objects committed step ``path`` references; empty once someone else
    deleted it; None when it is there but its manifest cannot be read (its references are
    unknown, so no part may be deleted)."""
    try:
        return frozenset(referenced(read_manifest(storage, path)))
    except CorruptCheckpointError as e:
        if storage.stat(path) is not None:
            log.warning("asyncckpt: chunk store not swept: %s", e)
            return None
        return frozenset()


def sweep_chunks(
    storage: Storage,
    root: str,
    kind: Kind,
    live_refs: Collection[str],
    me: str | None = None,
    held: Collection[str] = (),
    in_flight: Collection[int] | Callable[[], Collection[int]] = (),
    dry_run: bool = False,
    known: Collection[str] | None = None,
    min_age: float = 0.0,
) -> list[str]:
    """Delete the chunk-store objects of ``kind`` that no committed step references
    (``live_refs``, from every committed manifest of the kind root) and that nobody alive may
    still commit (``chunkstore.unreferenced``); returns their paths.

    ``min_age`` (``gc``) spares parts written less than that many seconds ago.

    The store is listed *before* the owner records are read and ``in_flight`` is asked (a
    callable is called after the listing): a writer writes its record before its first
    object, and a save counts as in flight before its writer writes a part, so an object
    written after the listing is never seen, and one written before is seen together with
    its live owner and its step in flight.  (Steps in flight taken before the listing would
    miss a save submitted meanwhile, and its parts would be deleted under it.)
    """
    store = layout.chunk_store(layout.kind_root(root, kind))
    names = storage.listdir(store)
    if not names:
        return []
    steps = in_flight() if callable(in_flight) else in_flight
    now = time.time()
    alive = {t for t, (rec, mtime) in owners(storage, root).items() if is_alive(rec, mtime, now)}
    if me is not None:
        alive.add(me)
    out = [
        layout.join(store, n)
        for n in unreferenced(names, live_refs, alive.__contains__, me, held, steps, known)
    ]
    if min_age > 0:  # gc: a part written recently may belong to a save or an upload under way
        stats = [storage.stat(p) for p in out]
        out = [
            p
            for p, st in zip(out, stats)
            if st is not None and st.mtime is not None and now - st.mtime >= min_age
        ]
    if not dry_run and out:
        # one request (or unlink) per part: many at once, as a step of 1 GiB has 256 parts
        with ThreadPoolExecutor(min(8, len(out)), "asyncckpt-sweep") as pool:
            list(pool.map(storage.remove, out))
    return out


def abort_uploads(
    storage: Storage,
    root: str,
    min_age: float,
    now: float,
    dry_run: bool = False,
    in_use: Callable[[str], bool] = lambda url: False,
) -> tuple[list[tuple[str, str, float | None]], list[tuple[str, float | None]], list[str]]:
    """Abort the multipart uploads that killed writers left under ``root``; never one that
    ``in_use`` says belongs to a live writer.

    Returns (aborted: url, id, age), (skipped: url, age), errors.
    """
    if not isinstance(storage, MultipartUploads):
        return [], [], []
    aborted, young, errors = [], [], []
    for url, upload_id, started in storage.pending_uploads(root):
        age = None if started is None else max(0.0, now - started)
        if min_age > 0 and (age is None or age < min_age) or in_use(url):
            young.append((url, age))
            continue
        if not dry_run:
            try:
                storage.abort_upload(url, upload_id)
            except OSError as e:
                errors.append(f"could not abort the upload of {url}: {e}")
                continue
        aborted.append((url, upload_id, age))
    return aborted, young, errors


class Pruner:
    """Applies retention and snapshot rotation to one root after each commit."""

    def __init__(
        self,
        storage: Storage,
        root: str,
        catalog: Catalog,
        policies: Sequence[RetentionPolicy],
        snapshot_slots: int | None,
        owner: str | None = None,
        chunks: bool = False,
        ranks: int = 1,
        in_flight: Callable[[], Collection[int]] | None = None,
        known_only: bool = False,
    ) -> None:
        """``snapshot_slots`` None keeps every snapshot (ranks other than 0 never delete);
        ``owner`` is the writer's token, which names its trash; ``chunks``: this writer saves
        differential steps, so their chunk stores are swept after every prune; ``ranks``: how
        many ranks write them (with several, this rank cannot see the others' saves in flight:
        it deletes only parts it saw referenced, and ``gc`` the orphans of a dead run);
        ``known_only``: the same for a remote tier, whose uploads bring parts before their
        manifest."""
        self.owner = owner
        self.chunks = chunks
        # the saves in flight *now*: a sweep asks after listing the store (sweep_chunks)
        self.in_flight_now = in_flight
        self._known: set[str] | None = (
            set() if ranks > 1 or known_only else None
        )  # parts a step it saw referenced
        self._refs: dict[tuple[Kind, int], frozenset[str]] = {}  # committed manifests are immutable
        self._held: dict[Kind, frozenset[str]] = {}  # each kind's parent: what the next save may reuse
        self.storage = storage
        self.root = root
        self.catalog = catalog
        self.policies = list(policies)
        self.snapshot_slots = snapshot_slots
        self._failed: set[tuple[Kind, int]] = set()
        self._trash: set[str] = set()  # decommitted, but removing the files failed: retried

    def plan(self, in_flight: Collection[int] = ()) -> list[tuple[Kind, int]]:
        """What :meth:`apply` would delete now."""
        history = self.catalog.history()
        protected = read_protected(self.storage, self.root) if self.policies else set()
        victims = [
            (Kind.PERMANENT, s)
            for s in plan_deletions(history, self.policies, time.time(), protected=protected, in_flight=in_flight)
        ] if self.policies else []  # fmt: skip
        if self.snapshot_slots is not None:
            snaps = sorted(r.step for r in history if r.tier == Kind.SNAPSHOT)
            victims += [(Kind.SNAPSHOT, s) for s in snaps[: max(0, len(snaps) - self.snapshot_slots)]]
        # a rollback's abandoned steps go once the new line has committed a step past them
        newest = max((r.step for r in history if r.tier == Kind.PERMANENT), default=-1)
        spared = protected if self.policies else read_protected(self.storage, self.root)
        victims += [(k, s) for k, s in sorted(self.catalog.abandoned()) if s < newest and s not in spared]
        victims += [v for v in sorted(self._failed) if v not in victims and self.catalog.has(*v)]
        return victims

    def apply(self, in_flight: Collection[int] = ()) -> list[tuple[Kind, int]]:
        """Delete what the policies drop, plus snapshots beyond the slots; never raises."""
        for trash in sorted(self._trash):
            self._remove(trash)
        try:
            victims = self.plan(in_flight)
        except Exception as e:  # e.g. the protected set could not be read: delete nothing
            log.warning("asyncckpt: retention skipped: %s", e)
            return []
        deleted = [v for v in victims if self.delete(*v)]
        for kind in KINDS:
            if self.chunks or any(k is kind for k, _ in deleted):
                self._sweep(kind, in_flight)
        return deleted

    def hold(self, kind: Kind, step: int, objects: Collection[str]) -> None:
        """Step ``step`` of ``kind`` committed referencing ``objects``: remember them, and
        keep them (the writer's next parent) even if the step is deleted meanwhile."""
        refs = frozenset(objects)
        self._refs[(kind, step)] = self._held[kind] = refs
        if self._known is not None:
            self._known |= refs

    def _live_refs(self, kind: Kind) -> frozenset[str] | None:
        """What the committed steps of ``kind`` reference; None when a manifest cannot be read
        (its references are unknown, so nothing may be deleted)."""
        steps = {r.step for r in self.catalog.history() if Kind(r.tier) is kind}
        steps |= {s for k, s in self.catalog.abandoned() if k is kind}
        for key in [key for key in self._refs if key[0] is kind and key[1] not in steps]:
            del self._refs[key]
        out: set[str] = set()
        for step in steps:
            refs = self._refs.get((kind, step))
            if refs is None:
                refs = step_references(self.storage, layout.step_dir(self.root, kind, step))
                if refs is None:
                    return None
                self._refs[(kind, step)] = refs
                if self._known is not None:
                    self._known |= refs
            out |= refs
        return frozenset(out)

    def _sweep(self, kind: Kind, in_flight: Collection[int]) -> None:
        now = self.in_flight_now
        steps: Collection[int] | Callable[[], Collection[int]] = (
            in_flight if now is None else (lambda: set(in_flight) | set(now()))
        )
        try:
            if not self.chunks and not self.storage.listdir(
                layout.chunk_store(layout.kind_root(self.root, kind))
            ):
                return  # a plain writer on a root without parts: no manifest need be read
            live = self._live_refs(kind)
            if live is None:
                return
            gone = sweep_chunks(
                self.storage, self.root, kind, live, self.owner, self._held.get(kind, ()), steps,
                known=self._known,
            )  # fmt: skip
        except Exception as e:  # retention must never fail training
            log.warning(
                "asyncckpt: could not sweep the chunk store (%s); will retry after the next commit", e
            )
            return
        if gone:
            if self._known is not None:
                self._known -= {layout.parent(p)[1] for p in gone}
            log.info("asyncckpt: removed %d unreferenced chunk objects of %s", len(gone), kind)

    def _remove(self, trash: str) -> None:
        try:
            self.storage.remove(trash)
        except Exception as e:
            log.warning("asyncckpt: could not remove %s (%s); will retry after the next commit", trash, e)
            self._trash.add(trash)
        else:
            self._trash.discard(trash)

    def delete(self, kind: Kind, step: int) -> bool:
        """Delete one committed step; False (and retried later) if that failed."""
        path = layout.step_dir(self.root, kind, step)
        try:
            # already gone (e.g. `asyncckpt gc`)?  Only a rename needs to know; on an object
            # store decommit and remove are fine with nothing there
            if renames_atomically(self.storage) and not exists(self.storage, path):
                self.catalog.discard(kind, step)
                self._failed.discard((kind, step))
                return True
            trash = decommit(self.storage, path, step, self.owner)
        except Exception as e:  # retention must never fail training
            log.warning("asyncckpt: could not delete %s (%s); will retry after the next commit", path, e)
            self._failed.add((kind, step))
            return False
        was_abandoned = (kind, step) in self.catalog.abandoned()
        self.catalog.discard(kind, step)  # no longer a checkpoint, whatever happens next
        self._failed.discard((kind, step))
        self._remove(trash)
        if was_abandoned:
            try:
                unabandon(self.storage, self.root, step)
            except OSError as e:
                log.warning("asyncckpt: could not remove the abandoned mark of step %d: %s", step, e)
        log.info("asyncckpt: retention deleted %s", path)
        return True

"""The ``asyncckpt`` command line: list, inspect, verify, export and clean up checkpoints.

Every sub-command reads checkpoints the way ``resume`` does: through the validated manifest,
never unpickling anything.  Results go to stdout; progress bars and errors go to stderr.
Expected failures (a missing root or step, a corrupt checkpoint, a bad option) print one line,
``asyncckpt: error: ...``, and exit nonzero.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from . import layout
from .errors import AsyncCheckpointError, CheckpointNotFoundError, ConfigError, CorruptCheckpointError
from .handle import CheckpointInfo
from .manifest import Manifest
from .progress import Progress, human_bytes
from .resume import list_checkpoints, list_leftovers, read_manifest
from .storage import Storage, storage_for

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


# --------------------------------------------------------------------------- formatting


def iso_time(t: float) -> str:
    """Epoch seconds as local ISO 8601 with its UTC offset."""
    return datetime.fromtimestamp(t, timezone.utc).astimezone().isoformat(timespec="seconds")


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return json.dumps(v) if not isinstance(v, str) else v


def _fmt_metrics(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt_value(v)}" for k, v in metrics.items()) or "-"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# --------------------------------------------------------------------------- locating checkpoints


@dataclass(frozen=True)
class Target:
    """One committed step directory picked on the command line."""

    root: str
    step: int
    tier: str
    path: str


def _norm(path: str) -> str:
    if path.startswith("file://"):  # storage_for serves file:// with plain local paths
        path = path[len("file://") :]
    return path.rstrip("/") if "://" in path else os.path.abspath(path)


def _parent(path: str) -> tuple[str, str]:
    head, _, name = path.rstrip("/").rpartition("/")
    return head, name


def _require_root(storage: Storage, root: str) -> None:
    if not storage.exists(root):
        raise CheckpointNotFoundError(f"checkpoint root {root} does not exist")
    if "://" not in root and not os.path.isdir(root):  # Storage has no isdir; URLs have no files-vs-dirs
        raise ConfigError(f"checkpoint root {root} is not a directory")


def _split_step(path: str) -> Target | None:
    """The Target named by a ``ROOT[/snapshots]/step_XXXXXXXXX`` path, else None."""
    parent, name = _parent(path)
    step = layout.parse_step(name)
    if step is None:
        return None
    grand, pname = _parent(parent)
    if pname == layout.SNAPSHOT_DIR:
        return Target(grand, step, "snapshot", path)
    return Target(parent, step, "permanent", path)


def resolve(arg: str, step: int | None = None) -> tuple[Storage, Target]:
    """The step directory that ``ROOT``, ``ROOT/step_XXXXXXXXX`` or ``ROOT --step N`` names.

    Without a step, the newest committed checkpoint (for one step, the permanent copy wins).

    Raises:
        CheckpointNotFoundError: the root or the step does not exist, or nothing is committed.
        ConfigError: a step directory and a different ``--step`` were both given.
    """
    path = _norm(arg)
    storage = storage_for(path, _OPTIONS.value)
    named = _split_step(path)
    if named is not None:
        if step is not None and step != named.step:
            raise ConfigError(f"{path} is step {named.step} but --step says {step}; give one of them")
        if not storage.exists(path):
            raise CheckpointNotFoundError(f"{path} does not exist")
        return storage, named
    _require_root(storage, path)
    infos = list_checkpoints(path, storage_options=_OPTIONS.value)
    if step is None:
        if not infos:
            raise CheckpointNotFoundError(f"no committed checkpoint under {path}" + _leftover_hint(path))
        info = infos[-1]
        return storage, Target(path, info.step, info.tier, info.path)
    matches = [i for i in infos if i.step == step]
    if not matches:
        if any(
            layout.parse_step(_parent(p)[1]) == step
            for p in list_leftovers(path, storage_options=_OPTIONS.value)
        ):
            raise CheckpointNotFoundError(
                f"step {step} under {path} is not committed (its manifest is missing or invalid); "
                "`asyncckpt gc` removes it"
            )
        have = ", ".join(str(s) for s in sorted({i.step for i in infos})[-10:]) or "none"
        raise CheckpointNotFoundError(f"no checkpoint for step {step} under {path}; committed steps: {have}")
    info = matches[-1]
    return storage, Target(path, info.step, info.tier, info.path)


def _leftover_hint(root: str) -> str:
    n = len(list_leftovers(root, storage_options=_OPTIONS.value))
    return f" ({n} uncommitted leftover{'s' * (n != 1)}; see `asyncckpt ls`)" if n else ""


def _load_manifest(storage: Storage, target: Target) -> Manifest:
    m = read_manifest(storage, target.path)
    if m.step != target.step:
        raise CorruptCheckpointError(
            f"{target.path}: its manifest says step {m.step}; the directory was renamed or damaged"
        )
    return m


def _protected(storage: Storage, root: str) -> set[int]:
    from .retention import Retention

    return Retention(storage, root, [], 0).protected


def _leftover_reason(storage: Storage, path: str) -> str:
    parent, _ = _parent(path)
    if _parent(parent)[1] == layout.TMP_DIR:
        return "in-progress or abandoned save"
    if not storage.is_regular_file(layout.join(path, layout.MANIFEST)):
        return "no manifest: never committed"
    try:
        m = read_manifest(storage, path)
    except (AsyncCheckpointError, OSError):
        return "invalid manifest"
    return f"manifest names step {m.step}"


# --------------------------------------------------------------------------- ls


def _info_json(info: CheckpointInfo, protected: set[int]) -> dict[str, Any]:
    return {
        "step": info.step,
        "tier": info.tier,
        "path": info.path,
        "time": info.time,
        "committed_at": iso_time(info.time),
        "bytes": info.bytes,
        "size": human_bytes(info.bytes),
        "world_size": info.world_size,
        "metrics": info.metrics,
        "protected": info.tier == "permanent" and info.step in protected,
        "upload": getattr(info, "upload", None),
    }


def _tier_text(info: CheckpointInfo, protected: set[int]) -> str:
    notes = []
    if info.tier == "permanent" and info.step in protected:
        notes.append("protected")
    if getattr(info, "upload", None) == "pending":
        notes.append("upload pending")
    return info.tier + (f" ({', '.join(notes)})" if notes else "")


def cmd_ls(a: argparse.Namespace) -> int:
    root = _norm(a.root)
    storage = storage_for(root, _OPTIONS.value)
    _require_root(storage, root)
    infos = list_checkpoints(root, storage_options=_OPTIONS.value)
    protected = _protected(storage, root)
    leftovers = [
        {"path": p, "status": "uncommitted", "reason": _leftover_reason(storage, p)}
        for p in list_leftovers(root, storage_options=_OPTIONS.value)
    ]
    if a.json:
        doc = {"root": root, "checkpoints": [_info_json(i, protected) for i in infos], "leftovers": leftovers}
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    if infos:
        rows = [
            [
                str(i.step),
                _tier_text(i, protected),
                iso_time(i.time),
                human_bytes(i.bytes),
                _fmt_metrics(i.metrics),
            ]
            for i in infos
        ]
        print(_table(["STEP", "TIER", "COMMITTED", "SIZE", "METRICS"], rows, right=(0, 3)))
        total = sum(i.bytes for i in infos)
        print(f"{len(infos)} committed checkpoint{'s' * (len(infos) != 1)}, {human_bytes(total)} in {root}")
    else:
        print(f"no committed checkpoints in {root}")
    if leftovers:
        print(f"\nuncommitted leftovers ({len(leftovers)}; `asyncckpt gc {a.root}` removes them):")
        for lo in leftovers:
            print(f"  UNCOMMITTED  {lo['path']}  ({lo['reason']})")
    return EXIT_OK


# --------------------------------------------------------------------------- inspect


def _walk_state(node: dict[str, Any], path: str, out: dict[str, Any], objects: dict[str, str]) -> None:
    """Collect plain values (by dotted path) and object classes from the manifest's state tree."""
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


def _state_summary(m: Manifest) -> tuple[dict[str, Any], dict[str, str]]:
    values: dict[str, Any] = {}
    objects: dict[str, str] = {}
    for key, node in m.state.items():
        _walk_state(node, str(key), values, objects)
    return values, objects


def _clip(text: str, width: int = 100) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def cmd_inspect(a: argparse.Namespace) -> int:
    storage, target = resolve(a.path, a.step)
    m = _load_manifest(storage, target)
    values, objects = _state_summary(m)
    tensors: list[dict[str, Any]] = [
        {
            "name": fqn,
            "dtype": t.dtype,
            "shape": list(t.shape),
            "bytes": sum(c.nbytes for c in t.chunks),
            "chunks": len(t.chunks),
        }
        for fqn, t in m.tensors.items()
    ]
    if a.json:
        doc = {
            "path": target.path,
            "step": m.step,
            "tier": target.tier,
            "world_size": m.world_size,
            "created_at": m.created_at,
            "committed_at": iso_time(m.created_at),
            "library_version": m.library_version,
            "torch_version": m.torch_version,
            "schema_version": m.schema_version,
            "bytes": m.total_bytes,
            "files": {k: dict(v) for k, v in m.files.items()},
            "metrics": m.metrics,
            "objects": objects,
            "values": values,
            "tensors": tensors,
        }
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    tensor_bytes = sum(t["bytes"] for t in tensors)
    print(f"checkpoint   {target.path}")
    fields = [
        ("step", str(m.step)),
        ("tier", target.tier),
        ("committed", iso_time(m.created_at)),
        ("world_size", str(m.world_size)),
        ("size", f"{human_bytes(m.total_bytes)} in {len(m.files)} files"),
        ("asyncckpt", m.library_version or "?"),
        ("torch", m.torch_version or "?"),
        ("schema", str(m.schema_version)),
        ("metrics", _fmt_metrics(m.metrics)),
    ]
    for k, v in fields:
        print(f"{k:<12} {v}")
    if objects:
        print(f"\nobjects ({len(objects)}):")
        for p, cls in objects.items():
            print(f"  {p}  <{cls}>")
    if values:
        print(f"\nvalues ({len(values)}):")
        for p, v in values.items():
            print(f"  {p} = {_clip(json.dumps(v))}")
    print(f"\ntensors ({len(tensors)}, {human_bytes(tensor_bytes)}):")
    rows = [
        [
            t["name"],
            t["dtype"],
            "[" + ", ".join(map(str, t["shape"])) + "]",
            human_bytes(t["bytes"]),
            str(t["chunks"]),
        ]
        for t in tensors
    ]
    table = _table(["NAME", "DTYPE", "SHAPE", "BYTES", "CHUNKS"], rows, right=(3, 4))
    print("\n".join("  " + line for line in table.splitlines()))
    return EXIT_OK


# --------------------------------------------------------------------------- verify


def _verify_bytes(m: Manifest) -> int:
    """Bytes ``verify_files`` reports progress for (files without a whole-file crc)."""
    return sum(
        c.length for t in m.tensors.values() for c in t.chunks if "crc32" not in m.files.get(c.file, {})
    )


def _verify_one(storage: Storage, target: Target) -> list[str]:
    from .reader import verify_files

    try:
        m = _load_manifest(storage, target)
    except (CorruptCheckpointError, OSError) as e:
        return [_one_line(e)]
    label = layout.step_dirname(target.step)
    with Progress(_verify_bytes(m), label) as bar:
        return verify_files(storage, target.path, m, progress=bar.update)


def cmd_verify(a: argparse.Namespace) -> int:
    if a.all:
        if a.step is not None or _split_step(_norm(a.path)) is not None:
            raise ConfigError("--all verifies every checkpoint under a root; do not name a step too")
        root = _norm(a.path)
        storage = storage_for(root, _OPTIONS.value)
        _require_root(storage, root)
        targets = [
            Target(root, i.step, i.tier, i.path)
            for i in list_checkpoints(root, storage_options=_OPTIONS.value)
        ]
        if not targets:
            raise CheckpointNotFoundError(f"no committed checkpoint under {root}" + _leftover_hint(root))
    else:
        storage, target = resolve(a.path, a.step)
        targets = [target]
    failed = 0
    for t in targets:
        problems = _verify_one(storage, t)
        name = t.path
        if problems:
            failed += 1
            print(f"FAILED  {name}")
            for p in problems:
                print(f"  {p}")
        else:
            print(f"OK      {name}")
    if len(targets) > 1:
        print(
            f"{len(targets) - failed} of {len(targets)} checkpoints OK"
            + (f", {failed} FAILED" if failed else "")
        )
    return EXIT_FAIL if failed else EXIT_OK


# --------------------------------------------------------------------------- export


def cmd_export(a: argparse.Namespace) -> int:
    from .export import DTYPES, export_safetensors, parse_size

    dtype = DTYPES[a.dtype] if a.dtype else None
    max_shard = parse_size(a.max_shard_size)
    storage, target = resolve(a.path, a.step)
    m = _load_manifest(storage, target)
    total = sum(
        c.nbytes
        for f, t in m.tensors.items()
        if not a.only or any(f.startswith(p) for p in a.only)
        for c in t.chunks
    )

    def on_file(path: str, n: int, nbytes: int) -> None:
        bar.close()
        print(f"wrote {path}  ({n} tensor{'s' * (n != 1)}, {human_bytes(nbytes)})")

    with Progress(total, "export") as bar:
        res = export_safetensors(
            storage,
            target.path,
            m,
            a.out,
            only=a.only or (),
            strip_prefix=a.strip_prefix,
            dtype=dtype,
            max_shard_size=max_shard,
            overwrite=a.force,
            progress=bar.update,
            on_file=on_file,
        )
    if res.index:
        print(f"wrote {res.index}")
    for name in res.removed:
        print(f"removed stale {name}")
    print(
        f"exported {res.tensors} tensor{'s' * (res.tensors != 1)} ({human_bytes(res.total_bytes)}) "
        f"from step {target.step} "
        f"into {len(res.files)} file{'s' * (len(res.files) != 1)}"
    )
    return EXIT_OK


# --------------------------------------------------------------------------- gc


def _parse_age(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid age {text!r}; use e.g. 0, 90s, 30m, 1h, 2d") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid age {text!r}: must be >= 0")
    return value


def _age_s(path: str, now: float) -> float | None:
    """Seconds since anything directly in ``path`` last changed; None when unknown (URLs).

    os.stat is used directly because the Storage protocol has no modification times.
    """
    if "://" in path:
        return None
    try:
        newest = os.lstat(path).st_mtime
        if os.path.isdir(path) and not os.path.islink(path):
            with os.scandir(path) as it:
                for e in it:
                    with contextlib.suppress(OSError):
                        newest = max(newest, e.stat(follow_symlinks=False).st_mtime)
    except OSError:
        return None
    return max(0.0, now - newest)


def _remove_leftover(storage: Storage, path: str) -> None:
    parent, name = _parent(path)
    step = layout.parse_step(name)
    if step is not None and storage.atomic_rename:
        # out of the step namespace first, as retention does, so a crash mid-delete leaves
        # nothing under a step name; object stores cannot rename, and need not: no valid
        # manifest means the step was never visible
        trash_dir = layout.join(parent, layout.TMP_DIR)
        storage.makedirs(trash_dir)
        trash = layout.join(trash_dir, layout.tmp_dirname(step))
        storage.rename_dir(path, trash)
        path = trash
    storage.rmtree(path)


def _abort_uploads(
    storage: Storage, root: str, a: argparse.Namespace, now: float, errors: list[str]
) -> tuple[int, int]:
    """Abort the multipart uploads that killed writers left under ``root`` (object stores
    keep their parts, invisible to listings, until then); returns (aborted, too recent)."""
    pending = getattr(storage, "pending_uploads", None)
    if pending is None:
        return 0, 0
    verb = "would abort" if a.dry_run else "aborted"
    aborted = young = 0
    for url, upload_id, started in pending(root):
        age = None if started is None else max(0.0, now - started)
        if a.min_age > 0 and (age is None or age < a.min_age):
            young += 1
            when = "unknown" if age is None else f"{age:.0f}s"
            print(f"skipped multipart upload {url}: begun {when} ago, it may be a save in progress")
            continue
        if not a.dry_run:
            try:
                storage.abort_upload(url, upload_id)  # type: ignore[attr-defined]
            except (AsyncCheckpointError, OSError) as e:
                errors.append(_one_line(e))
                print(f"could not abort the upload of {url}: {_one_line(e)}", file=sys.stderr)
                continue
        aborted += 1
        begun = "" if age is None else f", begun {age:.0f}s ago"
        print(f"{verb} abandoned multipart upload {url}  (id {upload_id[:16]}{begun})")
    return aborted, young


def _retention_policies(a: argparse.Namespace) -> list[Any]:
    from .policy import KeepBest, KeepEvery, KeepLast

    policies: list[Any] = []
    if a.keep_last is not None:
        policies.append(KeepLast(a.keep_last))
    if a.keep_every is not None:
        policies.append(KeepEvery(a.keep_every))
    if a.keep_best is not None:
        if not a.metric:
            raise ConfigError(
                "--keep-best needs --metric NAME (a metric recorded with save_async), e.g. --metric loss"
            )
        policies.append(KeepBest(a.keep_best, a.metric, a.mode))
    elif a.metric is not None:
        raise ConfigError("--metric is only used with --keep-best K")
    return policies


def cmd_gc(a: argparse.Namespace) -> int:
    from .policy import PERMANENT, CheckpointRecord, plan_deletions
    from .retention import Retention

    policies = _retention_policies(a)
    root = _norm(a.root)
    storage = storage_for(root, _OPTIONS.value)
    _require_root(storage, root)
    if _split_step(root) is not None:
        raise ConfigError(f"gc takes a checkpoint root, not a step directory: {root}")
    now = time.time()
    verb = "would remove" if a.dry_run else "removed"
    errors: list[str] = []

    # 1. uncommitted leftovers
    removed, young = 0, []
    for path in list_leftovers(root, storage_options=_OPTIONS.value):
        age = _age_s(path, now)
        if a.min_age > 0 and (age is None or age < a.min_age):
            young.append((path, age))
            continue
        reason = _leftover_reason(storage, path)
        if not a.dry_run:
            try:
                _remove_leftover(storage, path)
            except (AsyncCheckpointError, OSError) as e:
                errors.append(_one_line(e))
                print(f"could not remove {path}: {_one_line(e)}", file=sys.stderr)
                continue
        removed += 1
        print(f"{verb} uncommitted {path}  ({reason})")
    for path, age in young:
        when = "its age is unknown on this storage" if age is None else f"it changed {age:.0f}s ago"
        print(
            f"skipped uncommitted {path}: {when}, so it may be a save in progress "
            "(--min-age 0 removes it anyway)"
        )
    aborted, young_uploads = _abort_uploads(storage, root, a, now, errors)

    # 2. retention over the committed checkpoints
    infos = list_checkpoints(root, storage_options=_OPTIONS.value)
    snapshots = sum(1 for i in infos if i.tier != PERMANENT)
    retention = Retention(storage, root, policies, snapshot_slots=snapshots, existing=infos)
    history = [
        CheckpointRecord(step=i.step, time=i.time, metrics=dict(i.metrics), tier=i.tier) for i in infos
    ]
    plan = plan_deletions(history, policies, now, protected=retention.protected) if policies else []
    by_step = {i.step: i for i in infos if i.tier == PERMANENT}
    if policies and not a.dry_run:
        deleted = sorted(s for tier, s in retention.apply() if tier == PERMANENT)
        for s in sorted(set(plan) - set(deleted)):
            errors.append(f"could not delete step {s} ({by_step[s].path})")
            print(f"asyncckpt: could not delete {by_step[s].path}", file=sys.stderr)
    else:
        deleted = plan
    for s in deleted:
        i = by_step[s]
        print(f"{verb} step {s}  {i.path}  ({human_bytes(i.bytes)})")
    kept = sorted(s for s in by_step if s not in set(deleted))
    freed = sum(by_step[s].bytes for s in deleted)

    def n(count: int, what: str) -> str:
        return f"{count} {what}{'s' * (count != 1)}"

    uploads = f", {n(aborted, 'abandoned multipart upload')}" if aborted else ""
    summary = (
        f"{'dry run: would remove' if a.dry_run else 'removed'} {n(removed, 'uncommitted leftover')}{uploads} "
        f"and {n(len(deleted), 'checkpoint')} ({human_bytes(freed)}); "
        f"kept {n(len(kept), 'permanent checkpoint')}"
    )
    if kept:
        summary += f" (steps {', '.join(map(str, kept[:20]))}{', ...' if len(kept) > 20 else ''})"
    if snapshots:
        summary += f"; {n(snapshots, 'snapshot')} untouched"
    if young:
        summary += f"; skipped {n(len(young), 'recent leftover')} (--min-age)"
    if young_uploads:
        summary += f"; skipped {n(young_uploads, 'recent multipart upload')} (--min-age)"
    if not policies:
        summary += "; no --keep option given, so every committed checkpoint is kept"
    print(summary)
    if errors:
        print(f"asyncckpt: error: {len(errors)} removal(s) failed", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


# --------------------------------------------------------------------------- bench


def _import_bench() -> Any:
    """``benchmarks.bench_stall`` from the repository checkout, or None."""
    try:
        from benchmarks import bench_stall

        return bench_stall
    except ModuleNotFoundError as e:
        if e.name not in ("benchmarks", "benchmarks.bench_stall"):
            raise
    # An editable install run from elsewhere: the checkout is the package's parent directory.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(repo, "benchmarks", "bench_stall.py")):
        return None
    sys.path.insert(0, repo)
    try:
        from benchmarks import bench_stall

        return bench_stall
    except ModuleNotFoundError:
        return None
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(repo)


def cmd_bench(a: argparse.Namespace) -> int:
    bench = _import_bench()
    if bench is None:
        raise ConfigError(
            "`asyncckpt bench` needs the benchmarks/ package of the asyncckpt repository checkout; "
            "run it from the repository root (python -m asyncckpt bench)"
        )
    size = a.size_gib if a.size_gib is not None else (1 / 16 if a.quick else 1.0)
    reps = a.reps if a.reps is not None else (3 if a.quick else 5)
    try:
        result = bench.run(size, a.tensors, reps, a.dir)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    print(bench.format_table(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {a.json}")
    return EXIT_FAIL if any("error" in m for m in result["methods"].values()) else EXIT_OK


# --------------------------------------------------------------------------- parser


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _size_arg(text: str) -> str:
    from .export import parse_size

    try:
        parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


class _Options:
    """fsspec storage options for URL roots: ``--storage-options JSON`` or the environment."""

    value: dict[str, Any] | None = None

    @classmethod
    def load(cls, text: str | None) -> None:
        text = text if text is not None else os.environ.get("ASYNCCKPT_STORAGE_OPTIONS")
        if not text:
            cls.value = None
            return
        try:
            value = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"--storage-options must be a JSON object: {e}") from None
        if not isinstance(value, dict):
            raise ConfigError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
        cls.value = value


_OPTIONS = _Options


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command except ``demo`` (which parses its own)."""
    from . import __version__

    p = argparse.ArgumentParser(prog="asyncckpt", description="Asynchronous PyTorch checkpoints.")
    p.add_argument("--version", action="version", version=f"asyncckpt {__version__}")
    p.add_argument(
        "--storage-options",
        metavar="JSON",
        default=None,
        help="fsspec options for URL roots, e.g. credentials or "
        '\'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\' '
        "(default: $ASYNCCKPT_STORAGE_OPTIONS)",
    )
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.add_parser("demo", help="train, crash mid-save, resume bit-exactly; compare stalls", add_help=False)

    def add(name: str, help: str, description: str, func: Callable[[argparse.Namespace], int]) -> Any:
        sp = sub.add_parser(name, help=help, description=description)
        sp.set_defaults(func=func, parser=sp)
        return sp

    def step_args(sp: Any) -> None:
        sp.add_argument(
            "path", metavar="ROOT[/step_XXXXXXXXX]", help="a checkpoint root or one step directory"
        )
        sp.add_argument("--step", type=int, default=None, help="pick step N under ROOT (default: the newest)")

    sp = add(
        "ls", "list committed checkpoints and uncommitted leftovers",
        "List the committed checkpoints under ROOT (step, tier, commit time, size, metrics), "
        "then any uncommitted leftovers (interrupted saves, step directories without a valid manifest).",
        cmd_ls,
    )  # fmt: skip
    sp.add_argument("root", metavar="ROOT")
    sp.add_argument("--json", action="store_true", help='print {"checkpoints": [...], "leftovers": [...]}')

    sp = add(
        "inspect", "show a checkpoint's manifest, plain values and tensors",
        "Show one checkpoint (default: the newest committed under ROOT): manifest fields, metrics, "
        "the plain values saved in the state (by dotted path) and every tensor's dtype, shape and size.",
        cmd_inspect,
    )  # fmt: skip
    step_args(sp)
    sp.add_argument("--json", action="store_true", help="print everything as one JSON object")

    sp = add(
        "verify", "check every file and checksum of a checkpoint",
        "Read every byte of a checkpoint and check file sizes, crc32 checksums and that the stored "
        "blobs tile each shard. Exits 0 only if every file checks.",
        cmd_verify,
    )  # fmt: skip
    step_args(sp)
    sp.add_argument("--all", action="store_true", help="verify every committed checkpoint under ROOT")

    sp = add(
        "export", "write the tensors as safetensors (sharded past --max-shard-size)",
        "Write a checkpoint's tensors to OUT/model.safetensors, or, when they exceed --max-shard-size, "
        "to a Hugging Face sharded set (model-00001-of-0000N.safetensors + model.safetensors.index.json). "
        "Reads one output shard's tensors at a time; checksums are verified while reading.",
        cmd_export,
    )  # fmt: skip
    step_args(sp)
    sp.add_argument("out", metavar="OUT", help="output directory (created if needed)")
    sp.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                    help="cast floating-point tensors (default: keep the saved dtype)")  # fmt: skip
    sp.add_argument("--only", nargs="+", action="extend", metavar="PREFIX", default=None,
                    help="keep tensors whose name starts with one of these prefixes, e.g. --only model. "
                         "(give OUT before --only, or repeat --only per prefix)")  # fmt: skip
    sp.add_argument("--strip-prefix", metavar="PREFIX", default=None,
                    help="remove PREFIX from tensor names (default: the --only prefix when there is exactly "
                         "one and it ends with '.'; '' keeps names as they are)")  # fmt: skip
    sp.add_argument("--max-shard-size", type=_size_arg, default="5GB", metavar="SIZE",
                    help="largest output file before sharding, e.g. 5GB (10^9), 2GiB (2^30) (default 5GB)")  # fmt: skip
    sp.add_argument("--force", action="store_true", help="replace an earlier export in OUT")

    sp = add(
        "gc", "remove uncommitted leftovers; apply retention",
        "Remove uncommitted leftovers (interrupted saves under .tmp/, step directories without a valid "
        "manifest), abort the multipart uploads that killed writers left under ROOT on S3, and, when a --keep option is given, delete the committed checkpoints that no --keep "
        "option keeps (a checkpoint survives if any of them keeps it). The newest checkpoint and the "
        "steps in ROOT/.protected.json are never deleted; snapshots are not touched. A deletion first "
        "moves the step out of the way (into .tmp/), so an interrupted gc never leaves a half-deleted "
        "checkpoint that looks committed.",
        cmd_gc,
    )  # fmt: skip
    sp.add_argument("root", metavar="ROOT")
    sp.add_argument("--dry-run", action="store_true", help="print what would be removed; change nothing")
    sp.add_argument("--keep-last", type=_positive(int), metavar="K", default=None,
                    help="keep the K newest checkpoints")  # fmt: skip
    sp.add_argument("--keep-every", type=_positive(int), metavar="K", default=None,
                    help="keep every step divisible by K")  # fmt: skip
    sp.add_argument("--keep-best", type=_positive(int), metavar="K", default=None,
                    help="keep the K checkpoints with the best --metric")  # fmt: skip
    sp.add_argument("--metric", metavar="NAME", default=None, help="metric for --keep-best, e.g. loss")
    sp.add_argument("--mode", choices=["min", "max"], default="min",
                    help="for --keep-best: min (lower is better, default) or max")  # fmt: skip
    sp.add_argument("--min-age", type=_parse_age, default=3600.0, metavar="AGE",
                    help="leave leftovers that changed (and multipart uploads begun) more recently than AGE "
                         "alone, since they may be a save in progress; on object stores, where a leftover's "
                         "age is unknown, only --min-age 0 removes it (default 1h; e.g. 0, 30m, 2d)")  # fmt: skip

    sp = add(
        "bench", "measure the trainer stall per save against torch.save and DCP",
        "Run benchmarks/bench_stall.py (needs the repository checkout) and print its table.",
        cmd_bench,
    )  # fmt: skip
    sp.add_argument("--size-gib", type=_positive(float), default=None,
                    help="state size in GiB (default 1.0; --quick: 1/16)")  # fmt: skip
    sp.add_argument(
        "--tensors", type=_positive(int), default=100, help="number of fp32 tensors (default 100)"
    )
    sp.add_argument(
        "--reps", type=_positive(int), default=None, help="repetitions per method (default 5; --quick 3)"
    )
    sp.add_argument("--dir", default=None, help="parent directory for the temporary checkpoints")
    sp.add_argument("--json", metavar="PATH", default=None, help="also write the full results to PATH")
    sp.add_argument("--quick", action="store_true", help="smoke test: 64 MiB, 3 reps")
    return p


@contextlib.contextmanager
def _quiet_broken_pipe() -> Iterator[None]:
    try:
        yield
    except BrokenPipeError:  # `asyncckpt ls ROOT | head`: not an error
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        raise


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``asyncckpt`` console script and of ``python -m asyncckpt``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        p.print_help()
        return 0 if argv else 2
    if argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    try:
        args, extra = p.parse_known_args(argv)
        if getattr(args, "func", None) is None:
            p.error("choose a COMMAND")
        if extra:  # reported by the sub-command's parser, so its usage line is the one shown
            args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # argparse has printed its usage line and message
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    try:
        _OPTIONS.load(args.storage_options)
        with _quiet_broken_pipe():
            return int(args.func(args))
    except BrokenPipeError:
        return 141
    except KeyboardInterrupt:
        print("asyncckpt: interrupted", file=sys.stderr)
        return 130
    except (AsyncCheckpointError, OSError) as e:
        print(f"asyncckpt: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())

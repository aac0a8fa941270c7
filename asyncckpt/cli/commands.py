"""The ``asyncckpt`` sub-commands: each calls ``maintenance`` (or export, bench) and prints.

Every sub-command reads checkpoints the way ``resume`` does: through the validated manifest,
never unpickling anything.  Results go to stdout; progress bars and errors go to stderr.
Expected failures (a missing root or step, a corrupt checkpoint, a bad option) print one line,
``asyncckpt: error: ...``, and exit nonzero.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from .. import layout, maintenance
from ..catalog import normalize_root
from ..errors import ConfigError, CorruptCheckpointError
from ..handle import CheckpointInfo
from ..progress import Progress, human_bytes

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


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
        "upload": info.upload,
        "part_bytes": info.part_bytes,
        "own_bytes": info.own_bytes,
    }


def _tier_text(info: CheckpointInfo, protected: set[int]) -> str:
    notes = []
    if info.tier == "permanent" and info.step in protected:
        notes.append("protected")
    if info.upload == "pending":
        notes.append("upload pending")
    return info.tier + (f" ({', '.join(notes)})" if notes else "")


def cmd_ls(a: argparse.Namespace) -> int:
    listing = maintenance.ls(a.root, _OPTIONS.value)
    root, infos, protected = listing.root, listing.checkpoints, listing.protected
    leftovers = [{"path": p, "status": "uncommitted", "reason": r} for p, r in listing.leftovers]
    if a.json:
        doc = {
            "root": root,
            "checkpoints": [_info_json(i, protected) for i in infos],
            "leftovers": leftovers,
            "disk_bytes": listing.disk_bytes,
            "store": {"objects": listing.store_objects, "bytes": listing.store_bytes},
        }
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
        n = len(infos)
        print(f"{n} committed checkpoint{'s' * (n != 1)}, {human_bytes(listing.total_bytes)} in {root}")
        if listing.store_objects:
            print(
                f"disk use {human_bytes(listing.disk_bytes)}: differential steps share "
                f"{listing.store_objects} parts ({human_bytes(listing.store_bytes)}) in the chunk store"
            )
    else:
        print(f"no committed checkpoints in {root}")
    if leftovers:
        print(f"\nuncommitted leftovers ({len(leftovers)}; `asyncckpt gc {a.root}` removes them):")
        for lo in leftovers:
            print(f"  UNCOMMITTED  {lo['path']}  ({lo['reason']})")
    return EXIT_OK


# --------------------------------------------------------------------------- inspect


def _clip(text: str, width: int = 100) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _size_text(m: Any) -> str:
    from ..chunkstore import part_bytes

    text = f"{human_bytes(m.total_bytes)} in {len(m.files)} files"
    shared, own = part_bytes(m)
    if shared:
        text = (
            f"{human_bytes(shared)} of parts in the chunk store ({human_bytes(own)} written by this step, "
            f"{human_bytes(shared - own)} shared with earlier steps)"
        ) + (f", and {text}" if m.files else "")
    return text


def cmd_inspect(a: argparse.Namespace) -> int:
    from ..chunkstore import part_bytes

    _, target, m = maintenance.resolve(a.path, a.step, _OPTIONS.value)
    values, objects = maintenance.state_summary(m)
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
            "bytes": m.total_bytes + part_bytes(m)[0],
            "part_bytes": part_bytes(m)[0],
            "own_bytes": part_bytes(m)[1],
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
        ("size", _size_text(m)),
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


def _report(path: str, problems: list[str]) -> None:
    if problems:
        print(f"FAILED  {path}")
        for p in problems:
            print(f"  {p}")
    else:
        print(f"OK      {path}")


def cmd_verify(a: argparse.Namespace) -> int:
    if not a.all:
        try:
            storage, target, m = maintenance.resolve(a.path, a.step, _OPTIONS.value)
        except CorruptCheckpointError as e:  # a step was found, but its manifest is bad
            _report(normalize_root(a.path), [_one_line(e)])
            return EXIT_FAIL
        with Progress(maintenance.verify_bytes(m), layout.step_dirname(target.step)) as bar:
            problems = maintenance.verify(storage, target, m, progress=bar.update)
        _report(target.path, problems)
        return EXIT_FAIL if problems else EXIT_OK
    if a.step is not None or layout.parse_step(layout.parent(a.path)[1]) is not None:
        raise ConfigError("--all verifies every checkpoint under a root; do not name a step too")
    checked = failed = vanished = 0
    bars = lambda m, t: Progress(maintenance.verify_bytes(m), layout.step_dirname(t.step))  # noqa: E731
    for r in maintenance.verify_root(a.path, _OPTIONS.value, progress=bars):
        if r.vanished:
            vanished += 1
            print(f"GONE    {r.target.path}  (deleted by retention or gc while verifying)")
            continue
        checked += 1
        failed += bool(r.problems)
        _report(r.target.path, r.problems)
    if checked + vanished > 1:
        gone = f", {vanished} deleted meanwhile" if vanished else ""
        print(
            f"{checked - failed} of {checked} checkpoints OK"
            + (f", {failed} FAILED" if failed else "")
            + gone
        )
    return EXIT_FAIL if failed else EXIT_OK


# --------------------------------------------------------------------------- export


def _export_dcp(a: argparse.Namespace) -> int:
    from ..export_dcp import export_dcp

    if a.dtype or a.only or a.strip_prefix is not None:
        raise ConfigError(
            "--format dcp writes every tensor as saved: drop --dtype, --only and --strip-prefix"
        )
    storage, target, m = maintenance.resolve(a.path, a.step, _OPTIONS.value)
    with Progress(sum(c.nbytes for t in m.tensors.values() for c in t.chunks), "export") as bar:
        res = export_dcp(storage, target.path, m, a.out, overwrite=a.force, progress=bar.update)
    print(
        f"exported {res.tensors} tensor{'s' * (res.tensors != 1)} ({human_bytes(res.total_bytes)}) from step "
        f"{target.step} as a plain DCP checkpoint in {res.directory}; stock dcp.load reads it"
    )
    return EXIT_OK


def cmd_export(a: argparse.Namespace) -> int:
    from ..export import DTYPES, export_safetensors, parse_size

    if a.format == "dcp":
        return _export_dcp(a)

    dtype = DTYPES[a.dtype] if a.dtype else None
    max_shard = parse_size(a.max_shard_size)
    storage, target, m = maintenance.resolve(a.path, a.step, _OPTIONS.value)
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


def _retention_policies(a: argparse.Namespace) -> list[Any]:
    from ..policy import KeepBest, KeepEvery, KeepLast

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
    policies = _retention_policies(a)
    r = maintenance.gc(a.root, policies, min_age=a.min_age,
                       dry_run=a.dry_run, storage_options=_OPTIONS.value)  # fmt: skip
    verb = "would remove" if a.dry_run else "removed"
    for path, reason in r.removed:
        print(f"{verb} uncommitted {path}  ({reason})")
    for path, who in r.in_use:
        print(f"skipped {path}: a save in progress by a live writer ({who})")
    for path, age in r.young:
        when = "its age is unknown on this storage" if age is None else f"it changed {age:.0f}s ago"
        print(
            f"skipped uncommitted {path}: {when}, so it may be a save in progress (--min-age 0 removes it anyway)"
        )
    for url, age in r.young_uploads:
        when = "unknown" if age is None else f"{age:.0f}s"
        print(f"skipped multipart upload {url}: begun {when} ago, it may be a save in progress")
    for url, upload_id, age in r.aborted:
        begun = "" if age is None else f", begun {age:.0f}s ago"
        print(
            f"{'would abort' if a.dry_run else 'aborted'} abandoned multipart upload {url}  (id {upload_id[:16]}{begun})"
        )
    for info in r.deleted:
        print(f"{verb} step {info.step}  {info.path}  ({human_bytes(info.bytes)})")
    for e in r.errors:
        print(f"asyncckpt: {e}", file=sys.stderr)

    def n(count: int, what: str) -> str:
        return f"{count} {what}{'s' * (count != 1)}"

    uploads = f", {n(len(r.aborted), 'abandoned multipart upload')}" if r.aborted else ""
    if r.chunks:
        print(f"{verb} {len(r.chunks)} chunk-store parts that no committed checkpoint references")
    freed = sum(i.bytes for i in r.deleted)
    summary = (
        f"{'dry run: would remove' if a.dry_run else 'removed'} {n(len(r.removed), 'uncommitted leftover')}{uploads} "
        f"and {n(len(r.deleted), 'checkpoint')} ({human_bytes(freed)}); "
        f"kept {n(len(r.kept), 'permanent checkpoint')}"
    )
    if r.kept:
        summary += f" (steps {', '.join(map(str, r.kept[:20]))}{', ...' if len(r.kept) > 20 else ''})"
    if r.snapshots:
        summary += f"; {n(r.snapshots, 'snapshot')} untouched"
    if r.in_use:
        summary += f"; skipped {n(len(r.in_use), 'save')} in progress"
    if r.young:
        summary += f"; skipped {n(len(r.young), 'recent leftover')} (--min-age)"
    if r.young_uploads:
        summary += f"; skipped {n(len(r.young_uploads), 'recent multipart upload')} (--min-age)"
    if not policies:
        summary += "; no --keep option given, so every committed checkpoint is kept"
    print(summary)
    if r.errors:
        print(f"asyncckpt: error: {len(r.errors)} removal(s) failed", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


# --------------------------------------------------------------------------- bench


def cmd_bench(a: argparse.Namespace) -> int:
    from .. import bench  # imported only here: no other command needs it

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

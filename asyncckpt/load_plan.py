"""Compare a checkpoint with the live state, and apply it once every byte is verified.

A resume has two phases.  :func:`plan` (phase 1, before any read) decides, for every saved
tensor, where its bytes go: a *shadow* host buffer, never the live tensor.  It checks keys,
shapes, dtypes and optimizer structure against the live state and raises
:class:`~asyncckpt.StateMismatchError` on any difference, saying what differs and what to do.
The reader then fills the shadows and verifies every checksum.  Only then does
:meth:`LoadPlan.apply` (phase 2) copy the shadows into the live tensors and hand plain values
and state dicts to their objects.  A failure anywhere in phase 1 leaves the live state exactly
as it was.

What a checkpoint covers: a selective save records its selection (``include`` /
``exclude`` patterns and a save dtype) in the manifest.  Live entries outside it are left
untouched without any flag; inside it, every live tensor must be in the checkpoint.  A
resume that must restore something (``require=``) the selection did not cover fails.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import StateMismatchError
from .manifest import DTYPE_NAMES, DTYPES, Manifest
from .state import flatten_state, is_stateful, matches, selected, tensor_fqns

__all__ = ["LoadPlan", "plan"]

log = logging.getLogger("asyncckpt")

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype))


def _lossless(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether every ``src`` value is exactly representable in ``dst`` (floats only)."""
    if src == dst:
        return True
    if src not in _FLOATS or dst not in _FLOATS:
        return False
    fi, fo = torch.finfo(src), torch.finfo(dst)
    return fo.bits >= fi.bits and fo.max >= fi.max and fo.eps <= fi.eps


@dataclass
class LoadPlan:
    """Where each saved tensor's bytes go, and how they reach the live state."""

    manifest: Manifest
    state: dict[str, Any]
    shadows: dict[str, torch.Tensor]  # fqn -> buffer the reader fills (phase 1)
    live: dict[str, torch.Tensor]  # fqn -> live tensor updated in place (phase 2)
    keys: list[str]  # top-level state keys to apply
    owned: set[str] = field(default_factory=set)  # shadows that are the caller's (pool) memory
    skip: Callable[[str], bool] = lambda fqn: False

    def apply(self) -> None:
        """Phase 2: copy every shadow into its live tensor, then apply the state tree."""
        final: dict[str, torch.Tensor] = {}
        stream = torch.cuda.Stream() if any(t.is_cuda for t in self.live.values()) else None
        with torch.no_grad():
            for fqn, shadow in self.shadows.items():
                target = self.live.get(fqn)
                if target is None:  # no live tensor: the object gets one of its own
                    final[fqn] = shadow.clone() if fqn in self.owned else shadow
                    continue
                if target.is_cuda and stream is not None:
                    with torch.cuda.stream(stream):
                        target.copy_(shadow, non_blocking=True)
                else:
                    target.copy_(shadow)  # casts, and honours conj/neg views
                final[fqn] = target
        if stream is not None:
            stream.synchronize()
        applier = _Applier(final, self.skip)
        for key in self.keys:
            applier.apply(self.state, key, self.manifest.state[key], key)


class _Planner:
    def __init__(self, m: Manifest, *, strict: bool, exclude: Sequence[str], cast: bool) -> None:
        self.m, self.strict, self.exclude, self.cast = m, strict, list(exclude), cast
        sel = m.selection or {}
        self.sel_include: list[str] | None = sel.get("include")
        self.sel_exclude: list[str] = list(sel.get("exclude") or [])
        saved_cast = sel.get("cast")
        self.saved_cast = DTYPES.get(saved_cast) if isinstance(saved_cast, str) else None
        self.shadows: dict[str, torch.Tensor] = {}
        self.live: dict[str, torch.Tensor] = {}
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self.mismatched: list[str] = []
        self.lossy: list[str] = []
        self.untouched: list[str] = []

    def excluded(self, fqn: str) -> bool:
        return bool(self.exclude) and matches(fqn, self.exclude)

    def covered(self, fqn: str) -> bool:
        """Whether the checkpoint's selection covers ``fqn`` (all, for a full save)."""
        return selected(fqn, self.sel_include, self.sel_exclude)

    def _dtype_ok(self, fqn: str, saved: torch.dtype, live: torch.dtype) -> bool:
        if saved == live:
            return True
        if self.saved_cast is not None and saved == self.saved_cast and _lossless(saved, live):
            return True  # saved with SelectOptions(dtype=...): back to the live dtype, exactly
        if self.cast and saved in _FLOATS and live in _FLOATS:
            if not _lossless(saved, live):
                self.lossy.append(f"{fqn} ({_name(saved)} -> {_name(live)})")
            return True
        return False

    def target(self, fqn: str, live: torch.Tensor | None, pool: Mapping[str, torch.Tensor]) -> None:
        if self.excluded(fqn):
            return
        entry = self.m.tensors[fqn]
        shape, dtype = torch.Size(entry.shape), entry.torch_dtype
        if live is not None and live.layout == torch.strided:
            if live.shape != shape:
                self.mismatched.append(f"{fqn}: checkpoint shape {list(shape)}, live {list(live.shape)}")
                return
            if not self._dtype_ok(fqn, dtype, live.dtype):
                self.mismatched.append(f"{fqn}: checkpoint dtype {entry.dtype}, live {_name(live.dtype)}")
                return
            self.live[fqn] = live
        self.shadows[fqn] = _shadow(fqn, shape, dtype, live, pool)

    def walk(self, node: dict[str, Any], live: Any, pool: Mapping[str, torch.Tensor]) -> None:
        kind = node["t"]
        if kind in ("tensor", "ndarray"):
            self.target(node["fqn"], live if isinstance(live, torch.Tensor) else None, pool)
        elif kind == "object":
            self.walk(node["sd"], live, pool)
        elif kind == "dict":
            live_d = live if isinstance(live, Mapping) else {}
            for k, child in node["items"]:
                self.walk(child, live_d.get(k), pool)
        elif kind in ("list", "tuple"):
            live_l = live if isinstance(live, (list, tuple)) else []
            for i, child in enumerate(node["items"]):
                self.walk(child, live_l[i] if i < len(live_l) else None, pool)


def _shadow(
    fqn: str,
    shape: torch.Size,
    dtype: torch.dtype,
    live: torch.Tensor | None,
    pool: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """A buffer for ``fqn``'s saved bytes: the staging pool's slot when it fits, else new."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()  # type: ignore[assignment,misc]
    if isinstance(live, DTensor):  # DCP reads this rank's shards into a DTensor of that layout
        return torch.empty_like(live, dtype=dtype)
    view = pool.get(fqn)
    if view is not None and view.shape == shape and view.dtype == dtype:
        return view
    pin = live is not None and live.is_cuda and torch.cuda.is_available()
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


def _optimizer_problems(key: str, node: dict[str, Any], live: Any) -> list[str]:
    """Param-group structure of a saved optimizer against the live one."""
    if not isinstance(live, torch.optim.Optimizer) or node["t"] != "object":
        return []
    saved = dict(node["sd"].get("items", []))
    groups = saved.get("param_groups")
    if groups is None or groups.get("t") != "list":
        return []
    saved_sizes = []
    for g in groups["items"]:
        params = dict(g.get("items", [])).get("params") if g.get("t") == "dict" else None
        saved_sizes.append(len(params["items"]) if params and params.get("t") in ("list", "tuple") else -1)
    live_sizes = [len(g["params"]) for g in live.param_groups]
    if saved_sizes != live_sizes:
        return [
            f"{key}: the checkpoint's optimizer has param groups of sizes {saved_sizes}, the live one "
            f"{live_sizes}; build the optimizer over the same parameters and groups as when it was "
            f"saved, or pass exclude=['{key}'] to keep its current state"
        ]
    return []


def plan(
    state: dict[str, Any],
    manifest: Manifest,
    *,
    strict: bool = True,
    exclude: Sequence[str] = (),
    allow_missing: bool = False,
    cast: bool = False,
    require: Sequence[str] = (),
    pool: Mapping[str, torch.Tensor] | None = None,
) -> LoadPlan:
    """Phase 1: check the checkpoint against the live state and choose a shadow per tensor.

    Args:
        state: the live state, as given to the checkpointer.
        manifest: the checkpoint's manifest.
        strict: keys must match (within the checkpoint's selection); with False, missing and
            extra keys are tolerated.  Shapes must always match, and dtypes unless ``cast``.
        exclude: fqn patterns left untouched in the live state.
        allow_missing: live keys the checkpoint lacks are left as they are.
        cast: allow float dtypes to differ; a lossy cast (e.g. float32 into float16) is
            warned about, never silent.
        require: fqn patterns that must be restored; a checkpoint whose selection does not
            cover them is refused.
        pool: buffers to read into (the checkpointer's staging slot), by fqn; a buffer is used
            when its shape and dtype fit, anything else is allocated.

    Raises:
        StateMismatchError: what differs, and what to do.
    """
    _materialize_sharded_optimizers(state, manifest, exclude)
    p = _Planner(manifest, strict=strict, exclude=exclude, cast=cast)
    pool = pool or {}
    keys, problems = [], []
    for key, value in state.items():
        if p.excluded(key):
            continue
        node = manifest.state.get(key)
        live_sd = value.state_dict() if is_stateful(value) else value
        live_fqns = {f for f in flatten_state({key: value}).tensors if not p.excluded(f)}
        if node is None:
            if p.covered(key) or any(p.covered(f) for f in live_fqns):
                p.missing.append(key)
            else:
                p.untouched.append(key)
            continue
        problems += _optimizer_problems(key, node, value)
        p.walk(node, live_sd if node["t"] == "object" else value, pool)
        keys.append(key)
        saved = {f for f in tensor_fqns(node) if not p.excluded(f)}
        # A live tensor the checkpoint lacks would silently keep its value: missing, unless
        # the checkpoint's selection left it out on purpose (then it is untouched).  Other
        # Stateful objects (optimizers) may have no state yet: their load_state_dict judges.
        if not is_stateful(value) or isinstance(value, torch.nn.Module):
            for f in sorted(live_fqns - saved):
                (p.missing if p.covered(f) else p.untouched).append(f)
            if isinstance(value, torch.nn.Module):
                p.unexpected += sorted(saved - live_fqns)
    for key in manifest.state:
        if key not in state and not p.excluded(key):
            p.unexpected.append(key)
    saved = {q for k, node in manifest.state.items() for q in saved_paths(node, k)}
    for pattern in require:
        wanted = [k for k in state if matches(k, [pattern])] + [
            f for f in _live_fqns(state, p) if matches(f, [pattern])
        ]
        lacking = sorted({f for f in wanted if not p.covered(f) or f.split(".")[0] not in manifest.state})
        if not any(matches(q, [pattern]) for q in saved):
            lacking = lacking or [pattern]  # nothing in the checkpoint answers to it
        if lacking:
            problems.append(
                f"required {pattern!r} is not in this checkpoint (it was saved with include="
                f"{p.sel_include} exclude={p.sel_exclude}): {', '.join(lacking[:10])}; resume from a "
                "checkpoint that holds it, or drop it from require="
            )
    if allow_missing or not strict:
        p.missing = []
    if p.missing:
        problems.append(
            f"missing from the checkpoint: {', '.join(p.missing[:20])}; pass exclude=[...] to keep "
            "those live values, or allow_missing=True"
        )
    if p.unexpected and strict:
        problems.append(
            f"in the checkpoint but not in the state: {', '.join(p.unexpected[:20])}; add them to the "
            "state, or pass strict=False to ignore them"
        )
    if p.mismatched:
        problems.append(
            f"differs: {'; '.join(p.mismatched[:20])}. Build the model as it was saved; to leave these "
            "entries (and the optimizer state that goes with them) as they are, pass exclude=[...] "
            "naming both; for float dtypes only, cast=True converts"
        )
    if problems:
        raise StateMismatchError(
            f"checkpoint step {manifest.step} does not match the live state: " + " | ".join(problems)
        )
    if p.lossy:
        msg = f"asyncckpt: resume casts with loss of precision: {', '.join(p.lossy[:20])}"
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    if p.untouched:
        log.info(
            "asyncckpt: not in step %d's selection, left as they are: %s", manifest.step, p.untouched[:20]
        )
    pool_ids = {id(v) for v in pool.values()}
    owned = {f for f, t in p.shadows.items() if id(t) in pool_ids}
    return LoadPlan(manifest, state, p.shadows, p.live, keys, owned, p.excluded)


def _live_fqns(state: dict[str, Any], p: _Planner) -> list[str]:
    return [f for f in flatten_state(state).tensors if not p.excluded(f)]


class _Applier:
    """Phase 2's tree walk: rebuild values from the tree with the loaded tensors, merged over
    the live values, so whatever the checkpoint does not hold (a selective save's left-out
    entries, ``exclude=``) keeps its live value."""

    def __init__(self, dest: Mapping[str, torch.Tensor], excluded: Callable[[str], bool]) -> None:
        self.dest, self.excluded = dest, excluded

    def decode(self, node: dict[str, Any], live: Any, path: str) -> Any:
        kind = node["t"]
        if self.excluded(path):
            return live
        if kind == "value":
            return node["v"]
        if kind == "tensor":
            return self.dest.get(node["fqn"], live)
        if kind == "ndarray":
            return self.dest[node["fqn"]].numpy() if node["fqn"] in self.dest else live
        if kind == "object":
            return self.decode(node["sd"], live, path)
        if kind == "dict":
            out = dict(live) if isinstance(live, Mapping) else {}
            for k, c in node["items"]:
                sub = f"{path}.{k}"
                if self.excluded(sub) and k not in out:
                    continue  # excluded, and nothing live to keep
                out[k] = self.decode(c, out.get(k), sub)
            return out
        live_l = live if isinstance(live, (list, tuple)) else []
        items = [
            self.decode(c, live_l[i] if i < len(live_l) else None, f"{path}.{i}")
            for i, c in enumerate(node["items"])
        ]
        return tuple(items) if kind == "tuple" else items

    def apply(self, container: Any, key: Any, node: dict[str, Any], path: str) -> None:
        """Apply ``node`` to ``container[key]`` in place where possible."""
        if self.excluded(path):
            return
        live = container[key]
        kind = node["t"]
        if is_stateful(live) and kind == "object":
            live_sd = live.state_dict()
            sd = self.decode(node["sd"], live_sd, path)
            if isinstance(live, torch.nn.Module):  # extras were refused or waived by the plan
                sd = {k: v for k, v in sd.items() if k in live_sd}
            live.load_state_dict(sd)
        elif isinstance(live, torch.Tensor) and kind == "tensor":
            src = self.dest.get(node["fqn"])
            if src is not None and src is not live:
                with torch.no_grad():
                    live.copy_(src)
        elif isinstance(live, dict) and kind == "dict":
            for k, c in node["items"]:
                sub = f"{path}.{k}"
                if k in live:
                    self.apply(live, k, c, sub)
                elif not self.excluded(sub):
                    live[k] = self.decode(c, None, sub)
        elif isinstance(live, list) and kind == "list" and len(live) == len(node["items"]):
            for i, c in enumerate(node["items"]):
                self.apply(live, i, c, f"{path}.{i}")
        else:
            container[key] = self.decode(node, live, path)


def saved_paths(node: dict[str, Any], path: str) -> Iterator[str]:
    """Every dotted path the tree holds: tensors, plain values and containers."""
    yield path
    kind = node["t"]
    if kind == "object":
        yield from saved_paths(node["sd"], path)
    elif kind == "dict":
        for k, c in node["items"]:
            yield from saved_paths(c, f"{path}.{k}")
    elif kind in ("list", "tuple"):
        for i, c in enumerate(node["items"]):
            yield from saved_paths(c, f"{path}.{i}")


def _materialize_sharded_optimizers(
    state: dict[str, Any], manifest: Manifest, exclude: Sequence[str]
) -> None:
    """Give a fresh optimizer over DTensor (FSDP2) params its state before loading.

    Its state must be DTensors laid out like the params, so the checkpoint can be read into
    it (and resharded) by DCP; full plain tensors would break the next step.  DCP's own helper
    runs one zero-lr step on zero grads to create that state (zeros: no trained value moves).
    """
    for key, obj in state.items():
        if key not in manifest.state or (exclude and matches(key, exclude)):
            continue
        if not isinstance(obj, torch.optim.Optimizer) or obj.state:
            continue
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover
            return
        if any(isinstance(q, DTensor) for g in obj.param_groups for q in g["params"]):
            from torch.distributed.checkpoint.state_dict import _init_optim_state

            _init_optim_state(obj)

"""App state <-> a flat ``{fqn: tensor}`` plus a JSON tree of everything else.

The tree mirrors the structure of the user's state (dicts with str or int keys, lists,
tuples, Stateful objects) with tensors replaced by references to their fully qualified name
(fqn).  Tensors go through DCP; the tree, holding plain values, goes into the manifest.  On load
the tree is rebuilt with the loaded tensors and applied to the live objects in place.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError, StateMismatchError, UnsupportedStateError
from .manifest import DTYPE_NAMES, Manifest, dtype_name

__all__ = ["FlatState", "flatten_state", "is_stateful", "LoadTargets", "plan_load"]

_PLAIN = (bool, int, float, str, type(None))


def is_stateful(obj: Any) -> bool:
    """Modules, optimizers, schedulers and anything with state_dict()/load_state_dict()."""
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


@dataclass
class FlatState:
    """A flattened view of the live state: tensor references (not copies) and a JSON tree."""

    tensors: dict[str, torch.Tensor]
    tree: dict[str, Any]
    paths: dict[str, tuple[str | int, ...]] = field(default_factory=dict)

    def signature(self) -> tuple[tuple[str, torch.dtype, tuple[int, ...], str], ...]:
        """What the staging pool depends on: names, dtypes, shapes and devices."""
        return tuple((k, t.dtype, tuple(t.shape), t.device.type) for k, t in self.tensors.items())


def _where(path: Sequence[str | int]) -> str:
    return "state" + "".join(f"[{p!r}]" for p in path)


class _Flattener:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.paths: dict[str, tuple[str | int, ...]] = {}

    def add_tensor(self, t: torch.Tensor, fqn: str, path: tuple[str | int, ...]) -> None:
        if t.is_nested:
            raise UnsupportedStateError(
                f"{_where(path)}: nested tensors are not supported; save its components "
                "(t.unbind()) as a list, or pad it to a dense tensor"
            )
        if t.layout != torch.strided:
            raise UnsupportedStateError(f"{_where(path)}: {t.layout} tensors are not supported; densify it")
        if t.device.type == "meta":
            raise UnsupportedStateError(f"{_where(path)}: meta tensors hold no data and cannot be saved")
        if t.dtype not in DTYPE_NAMES:
            dtype_name(t.dtype)  # raises TypeError
        if fqn in self.tensors:
            raise ConfigError(
                f"{_where(path)}: its flattened name {fqn!r} collides with another entry; "
                "rename one of the keys (dots join nested keys)"
            )
        self.tensors[fqn] = t
        self.paths[fqn] = path

    def encode(self, value: Any, fqn: str, path: tuple[str | int, ...]) -> dict[str, Any]:
        if isinstance(value, torch.Tensor):
            self.add_tensor(value.detach(), fqn, path)
            return {"t": "tensor", "fqn": fqn}
        if isinstance(value, _PLAIN):
            return {"t": "value", "v": value}
        if isinstance(value, Mapping):
            items = []
            for k, v in value.items():
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise UnsupportedStateError(
                        f"{_where(path)}: key {k!r} is a {type(k).__name__}; "
                        "only str and int keys can be saved"
                    )
                items.append([k, self.encode(v, f"{fqn}.{k}", (*path, k))])
            return {"t": "dict", "items": items}
        if isinstance(value, (list, tuple)):
            kind = "tuple" if isinstance(value, tuple) else "list"
            elems = [self.encode(v, f"{fqn}.{i}", (*path, i)) for i, v in enumerate(value)]
            return {"t": kind, "items": elems}
        if type(value).__module__ == "numpy":
            if hasattr(value, "__array_interface__") and getattr(value, "ndim", 0) > 0:
                self.add_tensor(torch.from_numpy(value), fqn, path)
                return {"t": "ndarray", "fqn": fqn}
            if hasattr(value, "item"):
                return {"t": "value", "v": value.item()}
        if is_stateful(value):
            sd = value.state_dict()
            return {"t": "object", "cls": type(value).__name__, "sd": self.encode(sd, fqn, path)}
        raise UnsupportedStateError(
            f"{_where(path)}: cannot checkpoint a {type(value).__name__}. Supported are "
            "objects with state_dict()/load_state_dict(), tensors, dicts, lists, tuples and "
            "JSON values (int, float, str, bool, None)"
        )


def flatten_state(state: Mapping[str, Any]) -> FlatState:
    """Flatten the user's state; raises TypeError/ConfigError naming the offending key."""
    if not isinstance(state, Mapping):
        raise ConfigError(
            f"state must be a dict of name -> object, got {type(state).__name__}; "
            'e.g. state={"model": model, "optim": optimizer}'
        )
    fl = _Flattener()
    tree = {}
    for key, value in state.items():
        if not isinstance(key, str) or not key or "." in key:
            raise ConfigError(
                f"state key {key!r} is invalid: top-level keys must be non-empty strings without dots"
            )
        tree[key] = fl.encode(value, key, (key,))
    return FlatState(tensors=fl.tensors, tree=tree, paths=fl.paths)


def select_state(flat: FlatState, include: Sequence[str] | None, exclude: Sequence[str]) -> FlatState:
    """Keep only the entries that ``include`` names (None: all) and ``exclude`` does not.

    Patterns are fqn prefixes (``"optim"`` covers ``optim.state.0.exp_avg``) or fnmatch
    patterns.  Dict entries are selected one by one; a list or tuple is kept or dropped as
    a whole, so positions never shift.
    """

    def wanted(fqn: str) -> bool:
        return (include is None or _matches(fqn, include)) and not _matches(fqn, exclude)

    def reachable(fqn: str) -> bool:  # something below fqn may be wanted
        if _matches(fqn, exclude):
            return False
        return include is None or _matches(fqn, include) or any(p.startswith(fqn + ".") for p in include)

    def prune(node: dict[str, Any], fqn: str) -> dict[str, Any] | None:
        kind = node["t"]
        if kind in ("tensor", "ndarray", "value", "list", "tuple"):
            return node if wanted(fqn) else None
        if not reachable(fqn):
            return None
        if kind == "object":
            sd = prune(node["sd"], fqn)
            return None if sd is None else {**node, "sd": sd}
        items = [[k, c] for k, child in node["items"] if (c := prune(child, f"{fqn}.{k}")) is not None]
        if not items and node["items"] and not wanted(fqn):
            return None
        return {"t": "dict", "items": items}

    tree = {k: n for k, node in flat.tree.items() if (n := prune(node, k)) is not None}
    kept = set().union(*(_tensor_fqns(n) for n in tree.values())) if tree else set()
    return FlatState(
        tensors={k: t for k, t in flat.tensors.items() if k in kept},
        tree=tree,
        paths={k: v for k, v in flat.paths.items() if k in kept},
    )


# --------------------------------------------------------------------------- loading


@dataclass
class LoadTargets:
    """Where each checkpoint tensor is loaded, and how the result is applied afterwards."""

    dest: dict[str, torch.Tensor]
    finalize: Callable[[], None]


def _matches(fqn: str, patterns: Sequence[str]) -> bool:
    """``fqn`` equals a pattern, lies under it (``optim`` covers ``optim.state.0``) or fnmatches."""
    return any(fqn == p or fqn.startswith(p + ".") or fnmatch.fnmatchcase(fqn, p) for p in patterns)


class _Planner:
    def __init__(self, manifest: Manifest, strict: bool, exclude: Sequence[str]) -> None:
        self.m = manifest
        self.strict = strict
        self.exclude = list(exclude)
        self.dest: dict[str, torch.Tensor] = {}
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self.mismatched: list[str] = []

    def excluded(self, fqn: str) -> bool:
        return bool(self.exclude) and _matches(fqn, self.exclude)

    def target(self, fqn: str, live: torch.Tensor | None) -> None:
        """Choose the tensor ``fqn`` loads into: the live one in place when it fits."""
        if self.excluded(fqn):
            return
        entry = self.m.tensors[fqn]
        shape, dtype = torch.Size(entry.shape), entry.torch_dtype
        if live is not None and live.layout == torch.strided:
            if live.shape == shape and live.dtype == dtype:
                self.dest[fqn] = live.detach()
                return
            if live.shape == shape and live.dtype.is_floating_point and dtype.is_floating_point:
                # saved with save_dtype (e.g. bf16): load, then copy into the live dtype
                self.dest[fqn] = torch.empty(shape, dtype=dtype)
                return
            self.mismatched.append(
                f"{fqn}: checkpoint {entry.dtype}{list(shape)} vs live "
                f"{DTYPE_NAMES.get(live.dtype, live.dtype)}{list(live.shape)}"
            )
            return
        self.dest[fqn] = torch.empty(shape, dtype=dtype)

    def walk(self, node: dict[str, Any], live: Any, compare: bool) -> None:
        """Pick targets for every tensor under ``node``; ``compare`` checks live-only keys."""
        kind = node["t"]
        if kind in ("tensor", "ndarray"):
            live_t = live if isinstance(live, torch.Tensor) else None
            self.target(node["fqn"], live_t)
        elif kind == "object":
            self.walk(node["sd"], live, compare)
        elif kind == "dict":
            live_d = live if isinstance(live, Mapping) else {}
            for k, child in node["items"]:
                self.walk(child, live_d.get(k), compare)
        elif kind in ("list", "tuple"):
            live_l = live if isinstance(live, (list, tuple)) else []
            for i, child in enumerate(node["items"]):
                self.walk(child, live_l[i] if i < len(live_l) else None, compare)


def _tensor_fqns(node: dict[str, Any]) -> set[str]:
    kind = node["t"]
    if kind in ("tensor", "ndarray"):
        return {node["fqn"]}
    if kind == "object":
        return _tensor_fqns(node["sd"])
    if kind == "dict":
        return set().union(*(_tensor_fqns(c) for _, c in node["items"]))
    if kind in ("list", "tuple"):
        return set().union(*(_tensor_fqns(c) for c in node["items"]))
    return set()


def _decode(node: dict[str, Any], dest: Mapping[str, torch.Tensor], live: Any) -> Any:
    """Rebuild a Python value from the tree with loaded tensors (live ones if excluded)."""
    kind = node["t"]
    if kind == "value":
        return node["v"]
    if kind == "tensor":
        return dest[node["fqn"]] if node["fqn"] in dest else live
    if kind == "ndarray":
        return dest[node["fqn"]].numpy() if node["fqn"] in dest else live
    if kind == "object":
        return _decode(node["sd"], dest, live)
    if kind == "dict":
        live_d = live if isinstance(live, Mapping) else {}
        out = {}
        for k, c in node["items"]:
            v = _decode(c, dest, live_d.get(k))
            if v is not None or c["t"] == "value":
                out[k] = v
        return out
    live_l = live if isinstance(live, (list, tuple)) else []
    items = [_decode(c, dest, live_l[i] if i < len(live_l) else None) for i, c in enumerate(node["items"])]
    return tuple(items) if kind == "tuple" else items


def _apply(container: Any, key: Any, node: dict[str, Any], dest: Mapping[str, torch.Tensor]) -> None:
    """Apply ``node`` to ``container[key]`` in place where possible."""
    live = container[key]
    kind = node["t"]
    if is_stateful(live) and kind == "object":
        live.load_state_dict(_decode(node["sd"], dest, live.state_dict()))
    elif isinstance(live, torch.Tensor) and kind == "tensor":
        src = dest.get(node["fqn"])
        if src is not None and src.data_ptr() != live.data_ptr():
            with torch.no_grad():
                live.copy_(src)
    elif isinstance(live, dict) and kind == "dict":
        for k, c in node["items"]:
            if k in live:
                _apply(live, k, c, dest)
            else:
                live[k] = _decode(c, dest, None)
    elif isinstance(live, list) and kind == "list" and len(live) == len(node["items"]):
        for i, c in enumerate(node["items"]):
            _apply(live, i, c, dest)
    else:
        container[key] = _decode(node, dest, live)


def _materialize_sharded_optimizer_state(obj: Any) -> None:
    """Give a fresh optimizer over DTensor (FSDP2) params its state before loading.

    Its state must be DTensors laid out like the params, so the checkpoint can be loaded
    into it in place (and resharded) by DCP; full plain tensors would break the next step.
    DCP's own helper runs one zero-lr step on zero grads to create that state.
    """
    if not isinstance(obj, torch.optim.Optimizer) or obj.state:
        return
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return
    params = [q for g in obj.param_groups for q in g["params"]]
    if any(isinstance(q, DTensor) for q in params):
        from torch.distributed.checkpoint.state_dict import _init_optim_state

        _init_optim_state(obj)


def plan_load(
    state: dict[str, Any],
    manifest: Manifest,
    *,
    strict: bool = True,
    exclude: Sequence[str] = (),
    allow_missing: bool = False,
) -> LoadTargets:
    """Compare the live state with the checkpoint and choose a destination per tensor.

    Args:
        state: the live state, as given to the checkpointer.
        manifest: the checkpoint's manifest.
        strict: raise StateMismatchError on any difference in keys, shapes or dtypes.
        exclude: fqn patterns (fnmatch, or a prefix) left untouched in the live state.
        allow_missing: keys of the live state that the checkpoint lacks are left as they are.
    """
    for key, value in state.items():
        if key in manifest.state and not (exclude and _matches(key, exclude)):
            _materialize_sharded_optimizer_state(value)
    p = _Planner(manifest, strict, exclude)
    for key, value in state.items():
        if p.excluded(key):
            continue
        node = manifest.state.get(key)
        if node is None:
            p.missing.append(key)
            continue
        live_flat = flatten_state({key: value}) if strict else None
        p.walk(node, value.state_dict() if is_stateful(value) and node["t"] == "object" else value, True)
        # A live tensor the checkpoint lacks would silently keep its current value: always a
        # mismatch.  Extra saved tensors matter for modules (load_state_dict would reject
        # them); in plain containers they are simply assigned, like plain values.  Other
        # Stateful objects (optimizers) may have no state yet; their load_state_dict judges.
        if live_flat is not None and (not is_stateful(value) or isinstance(value, torch.nn.Module)):
            saved = {f for f in _tensor_fqns(node) if not p.excluded(f)}
            live_keys = {f for f in live_flat.tensors if not p.excluded(f)}
            p.missing += sorted(live_keys - saved)
            if isinstance(value, torch.nn.Module):
                p.unexpected += sorted(saved - live_keys)
    for key in manifest.state:
        if key not in state and not p.excluded(key):
            p.unexpected.append(key)
    if allow_missing:
        p.missing = []
    problems = []
    if p.missing:
        problems.append(f"missing from the checkpoint: {', '.join(p.missing[:20])}")
    if p.unexpected and strict:
        problems.append(f"in the checkpoint but not in the state: {', '.join(p.unexpected[:20])}")
    if p.mismatched and strict:
        problems.append(f"shape/dtype differs: {'; '.join(p.mismatched[:20])}")
    if problems:
        raise StateMismatchError(
            f"checkpoint step {manifest.step} does not match the live state: "
            + " | ".join(problems)
            + ". Fix the state, or pass exclude=[...] / allow_missing=True / strict=False "
            "to load what matches."
        )

    def finalize() -> None:
        for key in list(state):
            node = manifest.state.get(key)
            if node is not None and not p.excluded(key):
                _apply(state, key, node, p.dest)

    return LoadTargets(dest=p.dest, finalize=finalize)

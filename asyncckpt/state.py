"""App state <-> a flat ``{fqn: tensor}`` plus a JSON tree of everything else.

The tree mirrors the structure of the user's state (dicts with str or int keys, lists,
tuples, Stateful objects) with tensors replaced by references to their fully qualified name
(fqn).  Tensors go through DCP; the tree, holding plain values, goes into the manifest.  On load
the tree is rebuilt with the loaded tensors and applied to the live objects in place.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .errors import ConfigError, UnsupportedStateError
from .manifest import DTYPE_NAMES, dtype_name

if TYPE_CHECKING:
    from .options import SelectOptions

__all__ = [
    "FlatState", "flatten_state", "select_state", "is_stateful", "matches", "selected", "tensor_fqns", "Selector"
]  # fmt: skip

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


def matches(fqn: str, patterns: Sequence[str]) -> bool:
    """``fqn`` equals a pattern, lies under it (``optim`` covers ``optim.state.0``) or fnmatches."""
    return any(fqn == p or fqn.startswith(p + ".") or fnmatch.fnmatchcase(fqn, p) for p in patterns)


def selected(fqn: str, include: Sequence[str] | None, exclude: Sequence[str]) -> bool:
    """Whether a selection (``include`` None: everything) covers ``fqn``."""
    return (include is None or matches(fqn, include)) and not matches(fqn, exclude)


def select_state(flat: FlatState, include: Sequence[str] | None, exclude: Sequence[str]) -> FlatState:
    """Keep only the entries that ``include`` names (None: all) and ``exclude`` does not.

    Patterns are fqn prefixes (``"optim"`` covers ``optim.state.0.exp_avg``) or fnmatch
    patterns.  Dict entries are selected one by one; a list or tuple is kept or dropped as
    a whole, so positions never shift.
    """

    def wanted(fqn: str) -> bool:
        return selected(fqn, include, exclude)

    def reachable(fqn: str) -> bool:  # something below fqn may be wanted
        if matches(fqn, exclude):
            return False
        return include is None or matches(fqn, include) or any(p.startswith(fqn + ".") for p in include)

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
    kept = set().union(*(tensor_fqns(n) for n in tree.values())) if tree else set()
    return FlatState(
        tensors={k: t for k, t in flat.tensors.items() if k in kept},
        tree=tree,
        paths={k: v for k, v in flat.paths.items() if k in kept},
    )


def tensor_fqns(node: dict[str, Any], kinds: tuple[str, ...] = ("tensor", "ndarray")) -> set[str]:
    """Every tensor fqn under a node of the state tree (of the given leaf kinds)."""
    kind = node["t"]
    if kind in ("tensor", "ndarray"):
        return {node["fqn"]} if kind in kinds else set()
    if kind == "object":
        return tensor_fqns(node["sd"], kinds)
    if kind == "dict":
        return set().union(*(tensor_fqns(c, kinds) for _, c in node["items"]))
    if kind in ("list", "tuple"):
        return set().union(*(tensor_fqns(c, kinds) for c in node["items"]))
    return set()


class Selector:
    """The live state, flattened and cut to the selection."""

    def __init__(self, state: dict[str, Any], select: SelectOptions) -> None:
        self.select = select
        self.state = state

    @property
    def state(self) -> dict[str, Any]:
        return self._state

    @state.setter
    def state(self, state: dict[str, Any]) -> None:
        self.include, self.exclude = self.select.patterns(state)
        self._state = state

    def recorded(self) -> dict[str, Any] | None:
        """The selection as the manifest records it; None when everything is saved as is."""
        dtype = self.select.dtype
        if self.include is None and not self.exclude and dtype is None:
            return None
        return {
            "include": self.include,
            "exclude": self.exclude,
            "cast": DTYPE_NAMES[dtype] if dtype is not None else None,
        }

    def flat(self) -> FlatState:
        flat = flatten_state(self.state)
        if self.include is not None or self.exclude:
            flat = select_state(flat, self.include, self.exclude)
        return flat

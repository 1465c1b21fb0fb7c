"""Patching a user's model in place by swapping its class (shared by the compat drop-ins).

``patch`` in :mod:`protofast.compat.protopnet` and :mod:`protofast.compat.pipnet` replaces the object's class with
a generated subclass ``type(name, (FastMixin, UserClass), ...)``: the mixin's ``forward`` (and helpers) come first
in the MRO, everything else is the user's class, ``isinstance`` stays true, ``nn.DataParallel`` replicas keep the
class, and ``unpatch`` restores the original class. One subclass is generated per (mixin, user class) and cached.

Pickling (``torch.save``): the generated class cannot be found by name, so :class:`PatchedMixin` reduces to
``rebuild(mixin, base, ...)``, which regenerates it on load.
"""
from __future__ import annotations

import copyreg
from typing import Dict, Tuple

__all__ = ["PatchedMixin", "patched_class", "rebuild", "unwrap", "is_patched", "swap_in", "swap_out"]

_CACHE: Dict[Tuple[type, type], type] = {}


class PatchedMixin:
    """Base of the compat mixins: marks patched objects and makes them picklable (protocol ≥ 2)."""

    _protofast_patched = True

    def __reduce_ex__(self, protocol):
        rv = super().__reduce_ex__(protocol)
        cls = type(self)
        if isinstance(rv, tuple) and rv and rv[0] is copyreg.__newobj__ and rv[1][0] is cls:
            return (rebuild, (cls._protofast_mixin, cls._protofast_base) + tuple(rv[1][1:])) + tuple(rv[2:])
        raise TypeError(f"cannot pickle a patched {cls.__name__} with protocol {protocol}; use protocol >= 2 "
                        f"(torch.save's default) or unpatch() first")


def patched_class(mixin: type, base: type) -> type:
    """The cached subclass ``(mixin, base)`` named like ``base``."""
    sub = _CACHE.get((mixin, base))
    if sub is None:
        sub = type(base.__name__, (mixin, base),
                   {"__module__": base.__module__, "__qualname__": base.__qualname__, "_protofast_base": base,
                    "_protofast_mixin": mixin,
                    "__doc__": f"{base.__name__} patched by {mixin.__module__} (fused forward)."})
        _CACHE[(mixin, base)] = sub
    return sub


def rebuild(mixin: type, base: type, *args):
    """Unpickling hook: an empty instance of the patched subclass of ``base`` (state is set by pickle)."""
    cls = patched_class(mixin, base)
    return cls.__new__(cls, *args)


def unwrap(model, marker: str):
    """The model inside ``nn.DataParallel``/DDP wrappers: follow ``.module`` until an object has ``marker``."""
    while hasattr(model, "module") and not hasattr(model, marker):
        model = model.module
    return model


def is_patched(net) -> bool:
    return bool(getattr(type(net), "_protofast_patched", False))


def swap_in(net, mixin: type) -> None:
    if not is_patched(net):
        net.__class__ = patched_class(mixin, type(net))


def swap_out(net) -> None:
    if is_patched(net):
        net.__class__ = type(net)._protofast_base

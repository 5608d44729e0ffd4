"""Layer 1: loads the extension and registers its XLA FFI handlers, one per platform."""

from __future__ import annotations

import jax

from fa3_jax import _fa3_jax_ext as _ext

# XLA names platforms "cpu" and "CUDA" in FFI registration; JAX lowers for "cpu" and "cuda".
_REGISTERED: dict[str, set[str]] = {}

for _name, _by_platform in _ext.registrations().items():
    for _platform, _capsule in _by_platform.items():
        jax.ffi.register_ffi_target(_name, _capsule, platform=_platform)
        _REGISTERED.setdefault(_name, set()).add(_platform.lower())


def cuda_built() -> bool:
    """Whether this installed build contains the Hopper (sm_90a) kernels."""
    return bool(_ext.cuda_built)


def cuda_head_dims() -> tuple[int, ...]:
    """Head dims with Hopper kernels in this build (empty without CUDA)."""
    return tuple(int(x) for x in str(_ext.cuda_head_dims).split(",") if x)


def platforms() -> frozenset[str]:
    """Platforms ("cpu", "cuda") for which every fa3_jax FFI target is registered."""
    sets = list(_REGISTERED.values())
    return frozenset(set.intersection(*sets)) if sets else frozenset()

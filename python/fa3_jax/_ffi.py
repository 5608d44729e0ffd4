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


def workspace_bytes(direction: str, q_shape, k_shape, v_shape, deterministic=False) -> int:
    """Bytes of the uint8 workspace result the CUDA ``fa3_{direction}`` custom call takes.

    XLA allocates it like any other result, so it shows in ``compiled.memory_analysis()``; the
    size comes from the kernels' own layout (``sm90_*_workspace_bytes`` in cpp/flash.h)."""
    b, sq, hq, d = q_shape
    sk, hkv, dv = k_shape[1], k_shape[2], v_shape[3]
    if direction == "fwd":
        return int(_ext.sm90_fwd_workspace_bytes(b, sq, sk, hq, hkv, d, dv))
    return int(_ext.sm90_bwd_workspace_bytes(b, sq, sk, hq, hkv, d, dv, bool(deterministic)))

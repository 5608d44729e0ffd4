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


def fwd_tile_size(head_dim: int, head_dim_v: int, fp8: bool = False) -> tuple[int, int]:
    """(block_m, block_n) of the Hopper forward for these head dims (``fp8``: of the FP8 forward)
    (cpp/hopper/tile_size.h, the one place tile sizes are chosen; known to every build, CUDA or
    not)."""
    block_m, block_n = _ext.fwd_tile_size(int(head_dim), int(head_dim_v), bool(fp8))
    return int(block_m), int(block_n)


def fwd_page_rows() -> int:
    """Paged KV caches whose page_size is a multiple of this are read in place by the Hopper
    forward (cpp/hopper/tile_size.h, kFwdPageRows); others are gathered first."""
    return int(_ext.fwd_page_rows)


FP8_HEAD_DIMS = (64, 128, 256)  # of the Hopper FP8 forward (cpp/hopper/flash_fwd_sm90.cu)


def cuda_unsupported_fp8(head_dim: int, head_dim_v: int, block_q: int, block_k: int) -> str | None:
    """Why the Hopper FP8 forward of this build cannot take these head dims and descale blocks
    (0, 0: per tensor), or None."""
    if not cuda_built():
        return ("this fa3_jax build has no CUDA kernels; reinstall with nvcc available "
                "(FA3_JAX_CUDA=ON), or run on CPU")
    dims = tuple(d for d in FP8_HEAD_DIMS if d in cuda_head_dims())
    if head_dim != head_dim_v or head_dim not in dims:
        return (f"the Hopper FP8 forward supports head_dim == head_dim_v in {dims}, got "
                f"head_dim={head_dim}, head_dim_v={head_dim_v}")
    tiles = fwd_tile_size(head_dim, head_dim_v, fp8=True)
    if (block_q, block_k) not in ((0, 0), tiles):
        return (f"the Hopper FP8 forward takes per-tensor descales or per-block ones on its tiles "
                f"{tiles} (fa3_jax.fp8.scale_blocks), got blocks ({block_q}, {block_k})")
    return None


FP8_QUANTIZE_MAX_BLOCK_ROWS = 128  # of the Hopper quantization kernel (flash.h)


def cuda_unsupported_fp8_quantize(head_dim: int, block_rows: int) -> str | None:
    """Why the Hopper FP8 quantization kernel cannot take this head_dim and block (0: per
    tensor), or None. It is compiled for every FP8 head dim whatever the build's attention dims."""
    if not cuda_built():
        return ("this fa3_jax build has no CUDA kernels; reinstall with nvcc available "
                "(FA3_JAX_CUDA=ON), or run on CPU")
    if head_dim not in FP8_HEAD_DIMS:
        return f"the Hopper FP8 quantization supports head_dim in {FP8_HEAD_DIMS}, got {head_dim}"
    if block_rows > FP8_QUANTIZE_MAX_BLOCK_ROWS:
        return (f"the Hopper FP8 quantization takes blocks of at most "
                f"{FP8_QUANTIZE_MAX_BLOCK_ROWS} rows, got {block_rows}")
    return None


def cuda_unsupported(dtype, head_dim: int, head_dim_v: int) -> str | None:
    """Why the Hopper kernels of this build cannot take q of this dtype and head dims, or None.

    The one place that decides it: the CUDA lowering raises this sentence, and the drop-in
    ``dot_product_attention`` falls back to jax.nn with it as the warning."""
    import jax.numpy as jnp  # noqa: PLC0415 (keeps this module's import light)
    if not cuda_built():
        return ("this fa3_jax build has no CUDA kernels; reinstall with nvcc available "
                "(FA3_JAX_CUDA=ON), or run on CPU")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        return (f"the Hopper kernels take float16 or bfloat16 q/k/v, got {jnp.dtype(dtype)}; "
                "float32 is supported on the CPU backend only")
    built = cuda_head_dims()
    if head_dim not in built or not (head_dim_v == head_dim or (head_dim, head_dim_v) == (192, 128)):
        return (f"the Hopper kernels support head_dim in {built} with head_dim_v == head_dim "
                f"(or 192 with 128), got head_dim={head_dim}, head_dim_v={head_dim_v}")
    return None


def cuda_call_stats() -> dict[str, int]:
    """Process totals of the CUDA custom-call handler: ``calls`` (executions) and ``captured``
    (executions while XLA captured the stream into a command buffer; its replays then run the
    kernels without calling the handler). Zeros on a build without CUDA."""
    if not cuda_built():
        return dict(calls=0, captured=0)
    calls, captured = _ext.cuda_call_stats()
    return dict(calls=int(calls), captured=int(captured))


def platforms() -> frozenset[str]:
    """Platforms ("cpu", "cuda") for which the dense FFI targets (fa3_fwd, fa3_bwd) are
    registered. Of the packed-sequence targets (fa3_*_varlen, fa3_*_segments) only the varlen
    ones have CUDA handlers so far; the FP8 forward (fa3_fwd_fp8) has one."""
    sets = [_REGISTERED[n] for n in ("fa3_fwd", "fa3_bwd") if n in _REGISTERED]
    return frozenset(set.intersection(*sets)) if sets else frozenset()


def workspace_bytes(direction: str, q_shape, k_shape, v_shape, deterministic=False,
                    num_seqs=0, fp8=False, segments=False, seqused=False, num_splits=0,
                    diag_lo=None, diag_hi=None, page_size=0) -> int:
    """Bytes of the uint8 workspace result the CUDA ``fa3_{direction}`` custom call takes.

    XLA allocates it like any other result, so it shows in ``compiled.memory_analysis()``; the
    size comes from the kernels' own layout (``sm90_*_workspace_bytes`` in cpp/flash.h).
    num_seqs: sequences per batch row of a varlen call (``fa3_*_varlen``), 0 when dense.
    fp8: the FP8 forward (``fa3_fwd_fp8``; v_shape the usual [batch, seqlen_k, heads_kv, dv]).
    segments: a segment-id call (``fa3_*_segments``).
    seqused, num_splits: a KV-cache forward (``fa3_fwd_kvcache``) and its split count (0:
    heuristic); page_size: its pool's page size when the kernel reads the pages (0: contiguous).
    diag_lo, diag_hi: the backward's band (None: unbounded); it picks the GQA group split, whose
    float32 dK/dV partials live in the workspace."""
    b, sq, hq, d = q_shape
    sk, hkv, dv = k_shape[1], k_shape[2], v_shape[3]
    if direction == "fwd":
        return int(_ext.sm90_fwd_workspace_bytes(b, sq, sk, hq, hkv, d, dv, int(num_seqs),
                                                 bool(fp8), bool(segments), bool(seqused),
                                                 int(num_splits), int(page_size)))
    band = {k: int(x) for k, x in (("diag_lo", diag_lo), ("diag_hi", diag_hi)) if x is not None}
    return int(_ext.sm90_bwd_workspace_bytes(b, sq, sk, hq, hkv, d, dv, bool(deterministic),
                                             int(num_seqs), bool(segments), **band))


def fp8_quantize_workspace_bytes(batch: int, heads_kv: int, block_rows: int) -> int:
    """Bytes of the uint8 workspace result of the CUDA ``fa3_fp8_quantize`` call."""
    return int(_ext.sm90_fp8_quantize_workspace_bytes(int(batch), int(heads_kv), int(block_rows)))

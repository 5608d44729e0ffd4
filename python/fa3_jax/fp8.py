"""FP8 attention: quantization to float8_e4m3fn with block scales and incoherent processing.

``fp8_attention(q, k, v)`` takes float32/float16/bfloat16 inputs, quantizes them to e4m3 and
runs the FP8 forward (``attention.fp8_forward``; cpp/flash.h, "FP8"), as the FlashAttention-3
paper (section 3.3) describes:

- Block quantization (``block_quantize=True``): one scale per block of query rows of one head,
  and one per block of keys (and of values) of one kv head. The blocks are the Hopper forward's
  tiles (``scale_blocks``: block_m query rows, block_n keys, from cpp/hopper/tile_size.h), so
  that the kernel applies one scalar per tile. Otherwise one scale per (batch, kv head) for each
  of q, k, v: the "per-tensor" baseline, the descale form ``flash_attention`` takes.
- Incoherent processing (``incoherent=True``): q and k are both multiplied by M = diag(s) H /
  sqrt(d) along head_dim, H the Sylvester Hadamard matrix and s random signs drawn from ``seed``.
  M is orthogonal, so (q M)(k M)ᵀ = q kᵀ: the scores do not change, while outliers
  (a few entries far larger than the rest) are spread over the whole head_dim, which shrinks
  the quantization error of the scores. The transform is a fast Walsh-Hadamard transform,
  log2(d) butterfly stages, O(d log d) per row; head_dim must be a power of two.

The pass runs as one custom call per tensor (``_primitives.fp8_quantize_p``; the Hopper kernel
cpp/hopper/flash_fp8_quantize_sm90.cu, the CPU one cpp/cpu/fp8_quantize_cpu.cc): it reads the
input once (per-tensor scales: twice), applies signs and Walsh-Hadamard transform in registers,
takes each block's amax and writes e4m3 and the descales. The same pass in jnp
(``hadamard_transform``, ``quantize_blocks``, ``quantize_per_head``; ``fused=False``) is the
reference it is tested against: both do the same float32 operations in the same order, so the
bytes agree but for rare values one e4m3 step apart (tests/test_fp8.py, tests/test_gpu_fp8.py).
16k tokens x 2048 hidden, q, k, v, H200: 0.113 ms at head dim 128 and 0.155 ms at 256; as XLA
ops 1.23 ms and 1.38 ms, more than the attention kernel.

Scale convention: the stored e4m3 value times its descale is the true value; descale =
amax / 448 (448 is e4m3's largest finite value), 1 for an all-zero block.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from fa3_jax import _ffi, _primitives
from fa3_jax.attention import (FP8_DTYPE, _check_float, bottom_right_band, check_qkv,
                               fp8_forward)

E4M3_MAX = float(jnp.finfo(FP8_DTYPE).max)  # 448


def scale_blocks(head_dim: int, head_dim_v: int) -> tuple[int, int]:
    """(query rows, keys) per FP8 scale block: the Hopper FP8 forward's (block_m, block_n) tile,
    so that its kernel applies one descale per tile. cpp/hopper/tile_size.h is the one place that
    chooses them (e.g. (128, 128) at head_dims 64, 128 and 256)."""
    return _ffi.fwd_tile_size(head_dim, head_dim_v, fp8=True)


def random_signs(seed, head_dim: int) -> jax.Array:
    """The ±1 float32 vector s of incoherent processing, drawn from ``seed`` (an int, possibly
    traced): the same for q and k of one call."""
    return jax.random.rademacher(jax.random.PRNGKey(seed), (head_dim,), dtype=jnp.float32)


def _check_power_of_two(d):
    if d < 1 or d & (d - 1):
        raise ValueError(f"fa3_jax: the Hadamard transform needs a power-of-two head_dim "
                         f"(64, 128, 256, ...), got {d}")
    return d


def hadamard_transform(x, signs=None):
    """x M with M = diag(signs) H / sqrt(d) along the last axis (float32), H the d x d Sylvester
    Hadamard matrix (H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]]). M is orthogonal, so applying
    it to both q and k leaves q kᵀ unchanged. Fast Walsh-Hadamard transform: log2(d) butterfly
    stages of adds and subtracts, O(d log d) per row; d must be a power of two."""
    d = _check_power_of_two(x.shape[-1])
    y = x.astype(jnp.float32)
    if signs is not None:
        y = y * signs
    lead = y.shape[:-1]
    h = 1
    while h < d:
        # Stage h: within each run of 2h entries, (a, b) -> (a + b, a - b) for the halves a, b.
        y = y.reshape(lead + (d // (2 * h), 2, h))
        a, b = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2)
        h *= 2
    return y.reshape(lead + (d,)) * np.float32(1.0 / math.sqrt(d))


def _descale(amax):
    # An all-zero block stores zeros whatever its scale; 1 keeps the division finite.
    return jnp.where(amax > 0, amax / E4M3_MAX, 1.0).astype(jnp.float32)


def _to_e4m3(x, descale_per_row):
    # Clip before the cast: e4m3fn has no infinity, and a value rounding past 448 would be nan.
    y = jnp.clip(x / descale_per_row[..., None], -E4M3_MAX, E4M3_MAX)
    return y.astype(FP8_DTYPE)


def quantize_blocks(x, block: int):
    """x [batch, seqlen, heads, dim] -> (e4m3 x, float32 descale [batch, heads, ceil(seqlen /
    block)]): one scale per block of ``block`` rows of one head (the last block may be short)."""
    x = x.astype(jnp.float32)
    b, s, h, _ = x.shape
    n = -(-s // block)
    ax = jnp.pad(jnp.abs(x), ((0, 0), (0, n * block - s), (0, 0), (0, 0)))
    amax = jnp.max(ax.reshape(b, n, block, h, -1), axis=(2, 4))  # [b, n, h]
    descale = _descale(amax)
    per_row = jnp.repeat(descale, block, axis=1)[:, :s]  # [b, s, h]
    return _to_e4m3(x, per_row), jnp.transpose(descale, (0, 2, 1))


def quantize_per_head(x, heads_kv: int):
    """x [batch, seqlen, heads, dim] -> (e4m3 x, float32 descale [batch, heads_kv]): one scale
    per (batch, kv head), shared by the heads // heads_kv query heads of a GQA group."""
    x = x.astype(jnp.float32)
    b, s, h, d = x.shape
    amax = jnp.max(jnp.abs(x).reshape(b, s, heads_kv, h // heads_kv, d), axis=(1, 3, 4))
    descale = _descale(amax)
    per_row = jnp.repeat(descale, h // heads_kv, axis=1)[:, None, :]  # [b, 1, h]
    return _to_e4m3(x, per_row), descale


def quantize(q, k, v, *, block_quantize=True, incoherent=True, seed=0, fused=True):
    """The quantization pass of fp8_attention. Returns ((q8, k8, v8), (descale_q, descale_k,
    descale_v), (block_q, block_k)); blocks (0, 0) mean per-(batch, kv head) descales.
    ``fused``: one custom call per tensor (the Hopper or CPU kernel); False: the same pass as
    jnp ops, for comparison."""
    b, sq, sk, hq, hkv, d, dv = check_qkv(q, k, v)
    bq, bk = scale_blocks(d, dv) if block_quantize else (0, 0)
    x8, descales = (_quantize_fused if fused else _quantize)(q, k, v, seed, bq, bk, incoherent)
    return x8, descales, (bq, bk)


@partial(jax.jit, static_argnums=(4, 5, 6))
def _quantize(q, k, v, seed, block_q, block_k, incoherent):
    # One jitted computation, so that an eager call compiles it once rather than op by op;
    # inside a caller's jit it is inlined and fuses with its neighbours.
    if incoherent:
        signs = random_signs(seed, q.shape[3])
        q, k = hadamard_transform(q, signs), hadamard_transform(k, signs)
    if block_q:
        (q8, dq), (k8, dk), (v8, dvs) = (quantize_blocks(q, block_q), quantize_blocks(k, block_k),
                                         quantize_blocks(v, block_k))
    else:
        (q8, dq), (k8, dk), (v8, dvs) = (quantize_per_head(x, k.shape[2]) for x in (q, k, v))
    return (q8, k8, v8), (dq, dk, dvs)


@partial(jax.jit, static_argnums=(4, 5, 6))
def _quantize_fused(q, k, v, seed, block_q, block_k, incoherent):
    b, d = q.shape[0], q.shape[3]
    if incoherent:
        _check_power_of_two(d)
    # One sign vector per batch row (the kernels' layout, cpp/flash.h); unread without Hadamard.
    signs = (jnp.broadcast_to(random_signs(seed, d), (b, d)) if incoherent
             else jnp.zeros((b, 0), jnp.float32))
    group = q.shape[2] // k.shape[2]
    q8, dq = _primitives.fp8_quantize(q, signs, block_rows=block_q, group=1 if block_q else group,
                                      hadamard=incoherent)
    k8, dk = _primitives.fp8_quantize(k, signs, block_rows=block_k, group=1, hadamard=incoherent)
    v8, dvs = _primitives.fp8_quantize(v, signs, block_rows=block_k, group=1, hadamard=False)
    return (q8, k8, v8), (dq, dk, dvs)


def _check_bool(name, x):
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"fa3_jax: {name} must be a bool, got {type(x).__name__}")
    return bool(x)


def fp8_attention(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1),
                  softcap=0.0, return_lse=False, block_quantize=True, incoherent=True, seed=0,
                  fused_quantize=True):
    """Attention with q, k, v quantized to float8_e4m3fn inside (forward only).

    Args:
      q, k, v: float32, float16 or bfloat16, shaped as for ``flash_attention`` ([batch, seqlen,
        heads, head_dim]; GQA/MQA as there).
      softmax_scale, causal, window_size, softcap, return_lse: as for ``flash_attention``
        (softmax_scale defaults to 1/sqrt(head_dim), unchanged by the Hadamard transform).
      block_quantize: one scale per query block and per key/value block (the Hopper forward's
        tiles, ``scale_blocks``); False: one per (batch, kv head) for each of q, k, v.
      incoherent: multiply q and k by the same random-sign Hadamard matrix along head_dim
        first (leaves q kᵀ unchanged, spreads outliers); head_dim must be a power of two.
      seed: int (may be traced) for the random signs.
      fused_quantize: quantize with the fused kernel (default); False runs the same pass as jnp
        ops (``quantize(..., fused=False)``), for comparison.

    Returns:
      out [batch, seqlen_q, heads_q, head_dim_v] in q's dtype (the FP8 forward writes bfloat16),
      and lse [batch, heads_q, seqlen_q] float32 if return_lse.

    Gradients raise (forward only for now). Runs on the CPU backend and, at head_dim ==
    head_dim_v in (64, 128, 256), on the Hopper FP8 kernel (e4m3 WGMMA). Works under jit and
    vmap.
    """
    b, sq, sk, hq, hkv, d, dv = check_qkv(q, k, v)
    block_quantize = _check_bool("block_quantize", block_quantize)
    incoherent = _check_bool("incoherent", incoherent)
    if incoherent and d & (d - 1):
        raise ValueError(f"fa3_jax: incoherent processing (a Hadamard transform along head_dim) "
                         f"needs a power-of-two head_dim (64, 128, 256), got {d}; pass "
                         "incoherent=False")
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else _check_float(
        "softmax_scale", softmax_scale, positive=True)
    softcap = _check_float("softcap", softcap, min_value=0.0)
    diag_lo, diag_hi = bottom_right_band(sq, sk, causal, window_size)
    (q8, k8, v8), descales, (bq, bk) = quantize(q, k, v, block_quantize=block_quantize,
                                                incoherent=incoherent, seed=seed,
                                                fused=_check_bool("fused_quantize",
                                                                  fused_quantize))
    out, lse = fp8_forward(q8, k8, v8, *descales, softmax_scale=scale, softcap=softcap,
                           diag_lo=diag_lo, diag_hi=diag_hi, block_q=bq, block_k=bk)
    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out

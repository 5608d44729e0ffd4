"""Layer 4: ``flash_attention_varlen``, FlashAttention's variable-length API.

Sequences of different lengths are packed back to back along one token axis, with no padding:
q ``[total_q, heads_q, head_dim]``, k/v ``[total_k, heads_kv, head_dim(_v)]`` and int32
``cu_seqlens_q`` / ``cu_seqlens_k`` ``[num_seqs + 1]`` (cumulative lengths from 0). The kernels
cut their work per sequence (cpp/flash.h): no mask is materialised and no block straddles two
sequences. Internally this is the dense layout with batch 1 plus the cu_seqlens operands, so
``vmap`` folds into that batch axis and head sharding works as for ``flash_attention``.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from fa3_jax.attention import (_check_float, _PackedConfig, as_int32_array, bottom_right_band,
                               check_qkv, packed_attention)


def _check_cu_seqlens(name, x):
    x = as_int32_array(name, x, "[num_seqs + 1]")
    if x.ndim != 1 or x.shape[0] < 2:
        raise ValueError(f"fa3_jax: {name} must have rank 1 and shape [num_seqs + 1] with "
                         f"num_seqs >= 1, got shape {tuple(x.shape)}")
    return x


def _check_max_seqlen(name, x):
    if isinstance(x, jax.core.Tracer):
        raise TypeError(f"fa3_jax: {name} must be a static Python int, got a traced value")
    if not isinstance(x, numbers.Integral) or isinstance(x, bool) or x < 1:
        raise ValueError(f"fa3_jax: {name} must be an int >= 1, got {x!r}")
    return int(x)


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q, max_seqlen_k,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           return_lse=False, deterministic=False):
    """FlashAttention over variable-length sequences packed along one token axis.

    Args:
      q: [total_q, heads_q, head_dim]; sequence s is rows cu_seqlens_q[s] .. cu_seqlens_q[s+1].
      k: [total_k, heads_kv, head_dim]; heads_q a multiple of heads_kv (GQA/MQA).
      v: [total_k, heads_kv, head_dim_v].
      cu_seqlens_q, cu_seqlens_k: int32 [num_seqs + 1], cumulative sequence lengths starting at 0
        (device arrays: they are read by the kernels, never on the host). Query sequence s
        attends to key sequence s only.
      max_seqlen_q, max_seqlen_k: static ints >= 1, at least the longest query / key sequence
        (the Hopper kernels size their grids by them: rows of a longer sequence past them are
        left unwritten; the CPU backend reads the lengths).
      softmax_scale, softcap, deterministic: as in flash_attention.
      causal, window_size: as in flash_attention, bottom-right aligned in each sequence: with
        i, j positions inside sequence s of lengths lq, lk, query i sees key j when
        i + lk - lq - left <= j <= i + lk - lq + right (causal: right = 0).
      return_lse: also return lse [heads_q, total_q] float32 (natural log).

    Returns:
      out [total_q, heads_q, head_dim_v] in q's dtype (and lse if return_lse). Tokens outside every
      sequence (past cu_seqlens_q[-1]) and query rows that see no key get out = 0, lse = -inf and
      zero gradients; key rows outside every sequence get zero dk, dv.

    Bad cu_seqlens never read or write out of bounds: each entry is clamped to [0, total] and
    raised to the running maximum of the entries before it, so a decreasing entry makes an empty
    sequence (negative lengths are empty), sequences never overlap, and entries past total end
    the last sequence at total. Gradients (jax.grad) flow to q, k, v, and through lse when
    returned. Works under jit, grad and vmap (over a leading axis of all five arrays); under
    multi-device jit the heads axis stays sharded (the token axis is gathered). On a Hopper GPU
    forward and backward run on the sm90 kernels; max_seqlen_q/k must then be true bounds (rows
    of a sequence past them are never touched out of bounds, but their results are left
    unwritten).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"fa3_jax: {name} must be an array, got {type(x).__name__}")
        if x.ndim != 3:
            raise ValueError(f"fa3_jax: {name} must have rank 3 [total, heads, head_dim] in "
                             f"flash_attention_varlen, got shape {tuple(x.shape)}")
    _, total_q, total_k, hq, _, d, _ = check_qkv(
        *(jax.ShapeDtypeStruct((1,) + tuple(x.shape), x.dtype) for x in (q, k, v)))
    cu_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q)
    cu_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k)
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"fa3_jax: cu_seqlens_q and cu_seqlens_k must both be [num_seqs + 1] "
                         f"(the same num_seqs), got {tuple(cu_q.shape)} and {tuple(cu_k.shape)}")
    mq = _check_max_seqlen("max_seqlen_q", max_seqlen_q)
    mk = _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else _check_float(
        "softmax_scale", softmax_scale, positive=True)
    softcap = _check_float("softcap", softcap, min_value=0.0)
    # Band relative to each sequence's own bottom-right diagonal (lk - lq), so sq = sk here.
    diag_lo, diag_hi = bottom_right_band(0, 0, causal, window_size)
    if not isinstance(deterministic, (bool, np.bool_)):
        raise TypeError(f"fa3_jax: deterministic must be a bool, got {type(deterministic).__name__}")
    cfg = _PackedConfig("varlen", scale, softcap, int(diag_lo), int(diag_hi), bool(deterministic),
                        mq, mk)
    out, lse = packed_attention(q[None], k[None], v[None], cu_q[None], cu_k[None], cfg)
    out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


def cu_seqlens_from_lengths(lengths):
    """int32 [num_seqs + 1] cumulative lengths (from 0) of the given sequence lengths."""
    lengths = jnp.asarray(lengths, jnp.int32)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(lengths, dtype=jnp.int32)])


"""Layer 4: ``flash_attention_varlen``, FlashAttention's variable-length API.

Sequences of different lengths are packed back to back along one token axis, with no padding:
q ``[total_q, heads_q, head_dim]``, k/v ``[total_k, heads_kv, head_dim(_v)]`` and int32
``cu_seqlens_q`` / ``cu_seqlens_k`` ``[num_seqs + 1]`` (cumulative lengths from 0). The kernels
cut their work per sequence (cpp/flash.h): no mask is materialised and no block straddles two
sequences. Internally this is the dense layout with batch 1 plus the cu_seqlens operands, so
``vmap`` folds into that batch axis and head sharding works as for ``flash_attention``.

A token axis sharded over devices is gathered, unless ``context_parallel`` names a strategy:
then the call runs as segment ids derived from the cu_seqlens (sequence s is id s + 1, tokens
outside every sequence id 0), which run context-parallel as ``flash_attention`` does.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from fa3_jax.attention import (_check_float, _PackedConfig, as_int32_array, bottom_right_band,
                               check_qkv, packed_attention)
from fa3_jax.context_parallel import check_strategy


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
                           return_lse=False, deterministic=False, context_parallel="gather"):
    """FlashAttention over variable-length sequences packed along one token axis.

    Args:
      q: [total_q, heads_q, head_dim]; sequence s is rows cu_seqlens_q[s] .. cu_seqlens_q[s+1].
      k: [total_k, heads_kv, head_dim]; heads_q a multiple of heads_kv (GQA/MQA).
      v: [total_k, heads_kv, head_dim_v].
      cu_seqlens_q, cu_seqlens_k: int32 [num_seqs + 1], cumulative sequence lengths starting at 0
        (device arrays: they are read by the kernels, never on the host). Query sequence s
        attends to key sequence s only.
      max_seqlen_q, max_seqlen_k: static ints >= 1, at least the longest query / key sequence
        (the Hopper kernels bound their grids by them: with a longer sequence some rows are
        left unwritten; the CPU backend reads the lengths).
      softmax_scale, softcap, deterministic: as in flash_attention.
      causal, window_size: as in flash_attention, bottom-right aligned in each sequence: with
        i, j positions inside sequence s of lengths lq, lk, query i sees key j when
        i + lk - lq - left <= j <= i + lk - lq + right (causal: right = 0).
      return_lse: also return lse [heads_q, total_q] float32 (natural log).
      context_parallel: how a token axis sharded over devices runs under multi-device jit.
        "gather" (default): q/k/v are gathered and each device runs the varlen kernels on every
        token. "ring" or "all_gather": the call runs as segment ids built from the cu_seqlens
        (``flash_attention(..., q_segment_ids=, kv_segment_ids=)`` on a batch of 1), so K/V
        chunks travel around the devices (or are all-gathered once) and no device holds every
        query: O(total / n) memory for the attention. On one device the result is the same
        (within rounding); the segment-id kernels are slower than the varlen ones on Hopper
        (README, "Packed sequences"), so name a strategy only where the token axis is sharded.
        With causal or a window, per-sequence bottom-right alignment matches the segment ids'
        alignment on the whole token axis only when query and key sequences end together, so
        these strategies then need ``cu_seqlens_q is cu_seqlens_k`` (the same array) and
        total_q == total_k (self-attention over packed documents); otherwise a ValueError.

    Returns:
      out [total_q, heads_q, head_dim_v] in q's dtype (and lse if return_lse). Tokens outside every
      sequence (past cu_seqlens_q[-1]) and query rows that see no key get out = 0, lse = -inf and
      zero gradients; key rows outside every sequence get zero dk, dv.

    Bad cu_seqlens never read or write out of bounds: each entry is clamped to [0, total] and
    raised to the running maximum of the entries before it, so a decreasing entry makes an empty
    sequence (negative lengths are empty), sequences never overlap, and entries past total end
    the last sequence at total. Gradients (jax.grad) flow to q, k, v, and through lse when
    returned. Works under jit, grad and vmap (over a leading axis of all five arrays); under
    multi-device jit the heads axis stays sharded (the token axis: see context_parallel). On a
    Hopper GPU forward and backward run on the sm90 kernels, whose grids follow the tokens (a
    loose max_seqlen, such as the packed length, costs no time); max_seqlen_q/k must still be
    true bounds (with a longer sequence some rows are left unwritten, never out of bounds).
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
    check_strategy(context_parallel)
    if context_parallel == "gather":
        cfg = _PackedConfig("varlen", scale, softcap, int(diag_lo), int(diag_hi),
                            bool(deterministic), mq, mk)
        out, lse = packed_attention(q[None], k[None], v[None], cu_q[None], cu_k[None], cfg)
    else:
        if (causal or tuple(window_size) != (-1, -1)) and (cu_seqlens_q is not cu_seqlens_k
                                                           or total_q != total_k):
            raise ValueError(
                f"fa3_jax: flash_attention_varlen(context_parallel={context_parallel!r}) with "
                f"causal or a window runs on positions along the whole token axis, which match "
                f"each sequence's bottom-right alignment only for self-attention: pass the same "
                f"array as cu_seqlens_q and cu_seqlens_k, with total_q == total_k (got "
                f"{'the same' if cu_seqlens_q is cu_seqlens_k else 'different'} arrays, totals "
                f"{total_q} and {total_k}); or use context_parallel='gather'")
        # Whole-axis band: bottom-right over (total_q, total_k), here equal when it matters.
        diag_lo, diag_hi = bottom_right_band(total_q, total_k, causal, window_size)
        cfg = _PackedConfig("segments", scale, softcap, int(diag_lo), int(diag_hi),
                            bool(deterministic), context_parallel=context_parallel)
        ids_q, ids_k = segment_ids_from_cu_seqlens(cu_q, total_q), segment_ids_from_cu_seqlens(
            cu_k, total_k)
        out, lse = packed_attention(q[None], k[None], v[None], ids_q[None], ids_k[None], cfg)
    out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


def cu_seqlens_from_lengths(lengths):
    """int32 [num_seqs + 1] cumulative lengths (from 0) of the given sequence lengths."""
    lengths = jnp.asarray(lengths, jnp.int32)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(lengths, dtype=jnp.int32)])



def segment_ids_from_cu_seqlens(cu_seqlens, total):
    """int32 [total] segment ids of varlen's layout: token t of sequence s gets id s + 1, tokens
    outside every sequence 0. cu_seqlens is first clamped as the kernels clamp it (each entry to
    [0, total], then raised to the running maximum), so bad entries give empty sequences."""
    cu = jax.lax.cummax(jnp.clip(cu_seqlens.astype(jnp.int32), 0, total), axis=0)
    t = jnp.arange(total, dtype=jnp.int32)
    # s + 1 where cu[s] <= t < cu[s + 1]
    ids = jnp.searchsorted(cu, t, side="right").astype(jnp.int32)
    return jnp.where(t < cu[-1], ids, 0)

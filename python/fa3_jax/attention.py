"""Layer 4: argument checking, the custom VJP, and ``flash_attention``."""

from __future__ import annotations

import dataclasses
import math
import numbers
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from fa3_jax._primitives import UNBOUNDED, bwd_p, fp8_fwd_p, fwd_p, packed_bwd_p, packed_fwd_p
from fa3_jax.context_parallel import check_strategy

SUPPORTED_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)
FP8_DTYPE = jnp.float8_e4m3fn  # q/k/v of the FP8 forward (with descales; cpp/flash.h)
MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static parameters of one attention call (hashable: a nondiff argument of the VJP)."""
    softmax_scale: float
    softcap: float
    diag_lo: int
    diag_hi: int
    deterministic: bool
    context_parallel: str = "ring"
    load_balance: int = 0

    def fwd_params(self):
        return dict(softmax_scale=self.softmax_scale, softcap=self.softcap,
                    diag_lo=self.diag_lo, diag_hi=self.diag_hi,
                    context_parallel=self.context_parallel, load_balance=self.load_balance)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, cfg: _Config):
    return tuple(fwd_p.bind(q, k, v, **cfg.fwd_params()))


def _attention_fwd(q, k, v, cfg: _Config):
    out, lse = fwd_p.bind(q, k, v, **cfg.fwd_params())
    return (out, lse), (q, k, v, out, lse)


def _attention_bwd(cfg: _Config, res, cts):
    q, k, v, out, lse = res
    dout, dlse = cts
    # The lse cotangent is zeros unless the caller differentiates through the returned lse.
    dq, dk, dv = bwd_p.bind(q, k, v, out, lse, dout.astype(q.dtype), dlse.astype(jnp.float32),
                            deterministic=cfg.deterministic, **cfg.fwd_params())
    return dq, dk, dv


_attention.defvjp(_attention_fwd, _attention_bwd)


@dataclasses.dataclass(frozen=True)
class _PackedConfig:
    """Static parameters of a packed-sequence call: varlen (meta = cu_seqlens) or segment ids."""
    packing: str  # "varlen" or "segments"
    softmax_scale: float
    softcap: float
    diag_lo: int
    diag_hi: int
    deterministic: bool
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    # Segment ids only (varlen's packed token axis is never sequence-sharded): how a sharded
    # sequence runs, and the load-balanced layout, as for _Config.
    context_parallel: str = "ring"
    load_balance: int = 0

    def fwd_params(self):
        return dict(packing=self.packing, softmax_scale=self.softmax_scale, softcap=self.softcap,
                    diag_lo=self.diag_lo, diag_hi=self.diag_hi, max_seqlen_q=self.max_seqlen_q,
                    max_seqlen_k=self.max_seqlen_k, context_parallel=self.context_parallel,
                    load_balance=self.load_balance)


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def packed_attention(q, k, v, meta_q, meta_k, cfg: _PackedConfig):
    """Dense-layout q/k/v [batch, seqlen, heads, dim] with int32 metadata; returns (out, lse).
    Internal: flash_attention (segment ids) and flash_attention_varlen check the arguments."""
    return tuple(packed_fwd_p.bind(q, k, v, meta_q, meta_k, **cfg.fwd_params()))


def _packed_fwd(q, k, v, meta_q, meta_k, cfg: _PackedConfig):
    out, lse = packed_fwd_p.bind(q, k, v, meta_q, meta_k, **cfg.fwd_params())
    return (out, lse), (q, k, v, meta_q, meta_k, out, lse)


def _packed_bwd(cfg: _PackedConfig, res, cts):
    q, k, v, meta_q, meta_k, out, lse = res
    dout, dlse = cts
    dq, dk, dv = packed_bwd_p.bind(q, k, v, out, lse, dout.astype(q.dtype),
                                   dlse.astype(jnp.float32), meta_q, meta_k,
                                   deterministic=cfg.deterministic, **cfg.fwd_params())
    return dq, dk, dv, None, None  # integer metadata has no cotangent


packed_attention.defvjp(_packed_fwd, _packed_bwd)


# ---------------------------------------------------------------------------------------------
# Argument checking: every message names the argument, what was seen and what is supported.
# ---------------------------------------------------------------------------------------------

def _shape_dtype(name, x):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"fa3_jax: {name} must be an array, got {type(x).__name__}")
    return tuple(x.shape), jnp.dtype(x.dtype)


def check_qkv(q, k, v, names=("q", "k", "v"), fp8=False):
    """Validates q/k/v shapes and dtypes (float8_e4m3fn if fp8); returns (batch, sq, sk, hq, hkv,
    d, dv)."""
    nq, nk, nv = names
    (qs, qt), (ks, kt), (vs, vt) = _shape_dtype(nq, q), _shape_dtype(nk, k), _shape_dtype(nv, v)
    for name, s in ((nq, qs), (nk, ks), (nv, vs)):
        if len(s) != 4:
            raise ValueError(f"fa3_jax: {name} must have rank 4 [batch, seqlen, heads, head_dim], "
                             f"got shape {s}")
    allowed = (FP8_DTYPE,) if fp8 else SUPPORTED_DTYPES
    for name, t in ((nq, qt), (nk, kt), (nv, vt)):
        if t not in [jnp.dtype(d) for d in allowed]:
            raise TypeError(f"fa3_jax: {name} has dtype {t}; supported: float32, float16, "
                            "bfloat16 (and float8_e4m3fn with descales, forward only)")
    if not qt == kt == vt:
        raise TypeError(f"fa3_jax: {nq}, {nk}, {nv} must share one dtype, got {qt}, {kt}, {vt}")
    b, sq, hq, d = qs
    if ks[0] != b or vs[0] != b:
        raise ValueError(f"fa3_jax: batch sizes differ: {nq} {qs}, {nk} {ks}, {nv} {vs}")
    if ks[1] != vs[1] or ks[2] != vs[2]:
        raise ValueError(f"fa3_jax: {nk} and {nv} must agree on [batch, seqlen_k, heads_kv], got "
                         f"{nk} {ks} and {nv} {vs}")
    if ks[3] != d:
        raise ValueError(f"fa3_jax: {nq} and {nk} must share head_dim, got {nq} {qs} and "
                         f"{nk} {ks}")
    sk, hkv, dv = ks[1], ks[2], vs[3]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"fa3_jax: heads_q ({hq}, from {nq} {qs}) must be a multiple of "
                         f"heads_kv ({hkv}, from {nk} {ks})")
    for name, dim in (("head_dim", d), ("head_dim_v", dv)):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"fa3_jax: {name}={dim} is not supported; 1..{MAX_HEAD_DIM} on CPU, "
                             "64/96/128/192/256 on Hopper")
    if min(b, sq, sk) < 1:
        raise ValueError(f"fa3_jax: empty inputs are not supported: {nq} {qs}, {nk} {ks}")
    return b, sq, sk, hq, hkv, d, dv


def _check_float(name, x, *, min_value=None, positive=False):
    if isinstance(x, jax.core.Tracer):
        raise TypeError(f"fa3_jax: {name} must be a static Python float, got a traced value")
    if not isinstance(x, numbers.Real) or isinstance(x, bool):
        raise TypeError(f"fa3_jax: {name} must be a float, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x) or (positive and x <= 0) or (min_value is not None and x < min_value):
        req = "a finite float > 0" if positive else f"a finite float >= {min_value}"
        raise ValueError(f"fa3_jax: {name} must be {req}, got {x}")
    return x


def _check_window(window_size):
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, (int, np.integer)) and not isinstance(w, bool)
                       for w in window_size)):
        raise TypeError("fa3_jax: window_size must be a pair of ints (left, right), -1 meaning "
                        f"unbounded; got {window_size!r}")
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise ValueError(f"fa3_jax: window_size entries must be >= -1 (-1: unbounded), got "
                         f"{(left, right)}")
    return left, right


def check_context_parallel(context_parallel, load_balance, sq, sk, names=("q", "k")):
    """Validates the context-parallel arguments; returns (strategy, load_balance)."""
    check_strategy(context_parallel)
    if (not isinstance(load_balance, (int, np.integer)) or isinstance(load_balance, bool)
            or load_balance < 0):
        raise TypeError(f"fa3_jax: load_balance must be an int >= 0 (0: natural token order, n: "
                        f"the layout of load_balance_reorder(x, n)), got {load_balance!r}")
    n = int(load_balance)
    if n and (sq % (2 * n) or sk % (2 * n)):
        raise ValueError(f"fa3_jax: load_balance={n} splits the sequence into 2n = {2 * n} "
                         f"chunks; seqlen of {names[0]} ({sq}) and {names[1]} ({sk}) must be "
                         f"multiples of {2 * n}")
    return context_parallel, n


def as_int32_array(name, x, shape_doc):
    """x as an int32 array (device arrays pass through untouched: no host sync); else a
    TypeError naming the argument."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        if isinstance(x, (list, tuple)) or isinstance(x, np.ndarray):
            x = jnp.asarray(x, jnp.int32)
        else:
            raise TypeError(f"fa3_jax: {name} must be an int32 array {shape_doc}, got "
                            f"{type(x).__name__}")
    if jnp.dtype(x.dtype) != jnp.dtype(jnp.int32):
        raise TypeError(f"fa3_jax: {name} must be int32 {shape_doc}, got dtype {x.dtype}")
    return x


def check_segment_ids(q_segment_ids, kv_segment_ids, b, sq, sk):
    """Validates segment ids (int32 [batch, seqlen_q] / [batch, seqlen_k]; both or neither);
    returns them, or None."""
    if q_segment_ids is None and kv_segment_ids is None:
        return None
    if q_segment_ids is None or kv_segment_ids is None:
        missing = "q_segment_ids" if q_segment_ids is None else "kv_segment_ids"
        raise ValueError(f"fa3_jax: segment ids take both q_segment_ids and kv_segment_ids; "
                         f"{missing} is None (for self-attention pass the same ids twice)")
    ids = []
    for name, x, s, src in (("q_segment_ids", q_segment_ids, sq, "q"),
                            ("kv_segment_ids", kv_segment_ids, sk, "k")):
        x = as_int32_array(name, x, f"[batch, seqlen_{src[0]}]")
        if tuple(x.shape) != (b, s):
            raise ValueError(f"fa3_jax: {name} must have shape [batch, seqlen of {src}] = "
                             f"{(b, s)}, got {tuple(x.shape)}")
        ids.append(x)
    return tuple(ids)


def _is_fp8(x):
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and \
        jnp.dtype(x.dtype).itemsize == 1


def check_fp8_call(q, k, v, descales):
    """Whether this is an FP8 call: q, k, v all float8_e4m3fn with the three descales. Mixed
    FP8 and wider q/k/v, another FP8 format, or descales without FP8 inputs raise."""
    names = ("descale_q", "descale_k", "descale_v")
    fp8 = [_is_fp8(x) for x in (q, k, v)]
    given = [n for n, d in zip(names, descales) if d is not None]
    if not any(fp8):
        if given:
            raise TypeError(f"fa3_jax: {', '.join(given)} apply to float8_e4m3fn q/k/v only; got "
                            f"q of dtype {getattr(q, 'dtype', type(q).__name__)}")
        return False
    dtypes = ", ".join(str(jnp.dtype(x.dtype)) if hasattr(x, "dtype") else type(x).__name__
                       for x in (q, k, v))
    if not all(fp8):
        raise TypeError(f"fa3_jax: q, k and v must be all float8_e4m3fn (FP8 forward) or all "
                        f"float32/float16/bfloat16, got {dtypes}; quantize all three, or use "
                        "fa3_jax.fp8_attention, which quantizes wider inputs itself")
    if any(jnp.dtype(x.dtype) != jnp.dtype(FP8_DTYPE) for x in (q, k, v)):
        raise TypeError(f"fa3_jax: the FP8 forward takes float8_e4m3fn q/k/v, got {dtypes}")
    missing = [n for n, d in zip(names, descales) if d is None]
    if missing:
        raise ValueError(f"fa3_jax: float8_e4m3fn q/k/v need descale_q, descale_k and descale_v "
                         f"(float32 [batch, heads_kv]; the true value is the stored one times "
                         f"the descale; pass ones for unscaled values); missing: "
                         f"{', '.join(missing)}")
    return True


def check_descales(descales, b, hkv):
    """Validates per-tensor FP8 descales: float32 [batch, heads_kv] arrays."""
    for name, d in zip(("descale_q", "descale_k", "descale_v"), descales):
        shape, dtype = _shape_dtype(name, d)
        if dtype != jnp.dtype(jnp.float32):
            raise TypeError(f"fa3_jax: {name} must be float32 [batch, heads_kv], got dtype {dtype}")
        if shape != (b, hkv):
            raise ValueError(f"fa3_jax: {name} must have shape [batch, heads_kv] = {(b, hkv)}, "
                             f"got {shape}")


def fp8_forward(q8, k8, v8, descale_q, descale_k, descale_v, *, softmax_scale, softcap, diag_lo,
                diag_hi, block_q=0, block_k=0):
    """The FP8 forward on checked operands (cpp/flash.h gives the descale forms); returns
    (out bfloat16, lse float32). Forward only: differentiating it raises. Internal."""
    return tuple(fp8_fwd_p.bind(q8, k8, v8, descale_q, descale_k, descale_v,
                                softmax_scale=float(softmax_scale), softcap=float(softcap),
                                diag_lo=int(diag_lo), diag_hi=int(diag_hi), block_q=int(block_q),
                                block_k=int(block_k)))


def bottom_right_band(sq, sk, causal, window_size):
    """The band (diag_lo, diag_hi) for FlashAttention's bottom-right aligned causal/window."""
    left, right = _check_window(window_size)
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"fa3_jax: causal must be a bool, got {type(causal).__name__}")
    if causal:
        right = 0 if right < 0 else min(right, 0)
    off = sk - sq
    lo = off - left if left >= 0 else -UNBOUNDED
    hi = off + right if right >= 0 else UNBOUNDED
    return lo, hi


def flash_attention(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, return_lse=False, deterministic=False, context_parallel="ring",
                    load_balance=0, q_segment_ids=None, kv_segment_ids=None, descale_q=None,
                    descale_k=None, descale_v=None):
    """FlashAttention: softmax(q kᵀ * scale) v, fused, in O(seqlen) memory.

    Args:
      q: [batch, seqlen_q, heads_q, head_dim].
      k: [batch, seqlen_k, heads_kv, head_dim]; heads_q must be a multiple of heads_kv
        (GQA/MQA; query head h uses kv head h // (heads_q // heads_kv)).
      v: [batch, seqlen_k, heads_kv, head_dim_v].
      softmax_scale: multiplies q·k; default 1/sqrt(head_dim).
      causal: query i sees key j only when j <= i + seqlen_k - seqlen_q (bottom-right aligned, as
        in FlashAttention; for seqlen_q == seqlen_k this is the usual lower triangle).
      window_size: (left, right); query i sees key j when
        i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right; -1 is unbounded.
        causal is right = 0.
      softcap: if > 0, scores become softcap * tanh(scores / softcap) (after the scale).
      return_lse: also return the log-sum-exp of the scores, [batch, heads_q, seqlen_q] float32.
      deterministic: the backward gives bit-identical gradients run to run (the CPU backward
        always does; on Hopper it orders the dQ accumulation, at some cost).
      context_parallel: how a sequence axis sharded over a mesh axis runs under multi-device
        jit: "ring" (default; K/V chunks pass around the devices, O(seqlen / n) memory each),
        "all_gather" (K/V gathered once; for short sequences) or "gather" (q/k/v gathered, the
        whole sequence computed on every device). No effect unless the sequence is sharded.
        See fa3_jax.context_parallel.
      load_balance: 0, or n: the sequence axis of q, k, v is in the load-balanced layout of
        ``load_balance_reorder(x, n)`` (device i of n holds chunks i and 2n-1-i), the outputs
        come back in that layout, and causal/window masks apply to the true positions. Sharded
        n-way, causal work is then even across devices; otherwise (one device, another shard
        count) the sequence is reordered around the kernel. seqlens must divide by 2n.
      q_segment_ids, kv_segment_ids: int32 [batch, seqlen_q] and [batch, seqlen_k] (both or
        neither), for packed rows: on top of causal/window (on positions in the row), query i
        sees key j only where both ids are equal and nonzero. Id 0 is padding: such a query row
        gets out = 0, lse = -inf and zero gradients. Key tiles whose ids cannot match are
        skipped. Sharding works as without them: batch and heads stay local, a sharded
        sequence runs context-parallel (the ids are in the same layout as q and k; with
        load_balance, reorder them like the tokens). CPU backend and Hopper (16-bit).
      descale_q, descale_k, descale_v: FP8 (forward only): with q, k, v all float8_e4m3fn, three
        float32 [batch, heads_kv] arrays; the true value of an element is its stored value times
        its (batch, kv head)'s descale (query head h uses kv head h // (heads_q // heads_kv)).
        out is then bfloat16; gradients raise; segment ids and load_balance are not supported.
        Runs on the CPU backend and on the Hopper FP8 kernel (head_dim == head_dim_v in 64,
        128, 256; descales > 0 there, as the kernel folds them into the softmax scale).
        fa3_jax.fp8_attention quantizes wider inputs itself.

    Returns:
      out [batch, seqlen_q, heads_q, head_dim_v] in q's dtype, and lse if return_lse.
      A query row that sees no key gets out = 0, lse = -inf, and zero gradients.

    Dtypes: float32, float16, bfloat16 on CPU; float16 and bfloat16 on Hopper, head_dim in
    64/96/128/192/256 with head_dim_v == head_dim (or 192 with 128). Gradients (jax.grad) flow to
    q, k, v, and through lse too when it is returned. Works under jit, vmap, grad, checkpoint and
    multi-device jit (batch and head axes stay sharded, a sharded sequence runs
    context-parallel; see the package docstring).
    """
    descales = (descale_q, descale_k, descale_v)
    fp8 = check_fp8_call(q, k, v, descales)
    b, sq, sk, hq, hkv, d, dv = check_qkv(q, k, v, fp8=fp8)
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else _check_float(
        "softmax_scale", softmax_scale, positive=True)
    softcap = _check_float("softcap", softcap, min_value=0.0)
    diag_lo, diag_hi = bottom_right_band(sq, sk, causal, window_size)
    if not isinstance(deterministic, (bool, np.bool_)):
        raise TypeError(f"fa3_jax: deterministic must be a bool, got {type(deterministic).__name__}")
    strategy, n = check_context_parallel(context_parallel, load_balance, sq, sk)
    ids = check_segment_ids(q_segment_ids, kv_segment_ids, b, sq, sk)
    if fp8:
        check_descales(descales, b, hkv)
        if ids is not None or n:
            raise ValueError("fa3_jax: FP8 (float8_e4m3fn) inputs do not support segment ids or "
                             "load_balance yet")
        out, lse = fp8_forward(q, k, v, *descales, softmax_scale=scale, softcap=softcap,
                               diag_lo=diag_lo, diag_hi=diag_hi)
        return (out, lse) if return_lse else out
    if ids is not None:
        pcfg = _PackedConfig("segments", scale, softcap, int(diag_lo), int(diag_hi),
                             bool(deterministic), context_parallel=strategy, load_balance=n)
        out, lse = packed_attention(q, k, v, *ids, pcfg)
    else:
        cfg = _Config(scale, softcap, int(diag_lo), int(diag_hi), bool(deterministic), strategy,
                      n)
        out, lse = _attention(q, k, v, cfg)
    return (out, lse) if return_lse else out


def attention_with_band(q, k, v, *, softmax_scale, softcap, diag_lo, diag_hi,
                        deterministic=False, context_parallel="ring", load_balance=0,
                        segment_ids=None):
    """Like flash_attention but with the band given directly; returns (out, lse). Internal.
    segment_ids: None or a checked (q_segment_ids, kv_segment_ids) pair."""
    if segment_ids is not None:
        pcfg = _PackedConfig("segments", float(softmax_scale), float(softcap), int(diag_lo),
                             int(diag_hi), bool(deterministic), context_parallel=context_parallel,
                             load_balance=int(load_balance))
        return packed_attention(q, k, v, *segment_ids, pcfg)
    cfg = _Config(float(softmax_scale), float(softcap), int(diag_lo), int(diag_hi),
                  bool(deterministic), context_parallel, int(load_balance))
    return _attention(q, k, v, cfg)

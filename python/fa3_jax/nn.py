"""A drop-in for ``jax.nn.dot_product_attention`` backed by fa3_jax.

Same arguments and semantics, including jax.nn's top-left aligned ``is_causal`` and its
``local_window_size`` (query i sees keys i - left .. i + right). ``query_seq_lengths`` and
``key_value_seq_lengths`` run on the kernels: query rows past their length give 0, keys past
theirs are masked, as in jax.nn. Without ``is_causal`` / ``local_window_size`` they run as varlen
(one sequence [0, length) per batch row); with them as segment ids (id 1 for the first ``length``
tokens), whose band is on positions in the row, which is exactly jax.nn's top-left band for any
seqlen_q and seqlen_k (varlen's per-sequence bottom-right band is not). Both on Hopper and CPU.
Arguments the kernels cannot express (``bias``, ``mask``) fall back to
``jax.nn.dot_product_attention`` with a warning, once per argument. ``implementation="xla"`` or
``"cudnn"`` calls jax.nn with that implementation; ``None`` or ``"fa3"`` uses fa3_jax.
float64 inputs (with x64 enabled) fall back to jax.nn too, with a warning. As in jax.nn, the
residual of ``return_residual=True`` is in the query's dtype and carries no gradient
(``flash_attention(return_lse=True)`` returns a float32, differentiable lse instead).
Differences: a query row that sees no key gives 0 here (jax.nn's XLA path averages v), and the
residual of such a row (padding included) is -inf where jax.nn's is a large negative number.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from fa3_jax import _ffi
from fa3_jax._primitives import UNBOUNDED
from fa3_jax.attention import (_check_float, _PackedConfig, attention_with_band,
                               check_context_parallel, check_qkv, packed_attention)

class FallbackWarner:
    """Warns once per reason key that ``who`` hands such calls to ``to`` (the drop-in, the Flax
    and the Equinox adapters each have one); ``warned`` holds the keys already warned about."""

    def __init__(self, who, to):
        self.who, self.to, self.warned = who, to, set()

    def __call__(self, key, reason):
        if key in self.warned:
            return
        self.warned.add(key)
        warnings.warn(f"{self.who}: {reason}; falling back to {self.to} for such calls",
                      stacklevel=3)


_warn_once = FallbackWarner("fa3_jax.dot_product_attention", "jax.nn.dot_product_attention")
_WARNED = _warn_once.warned


def _window(local_window_size):
    if local_window_size is None:
        return None
    if isinstance(local_window_size, (int, np.integer)) and not isinstance(local_window_size, bool):
        local_window_size = (int(local_window_size), int(local_window_size))
    if (not isinstance(local_window_size, (tuple, list)) or len(local_window_size) != 2
            or not all(isinstance(w, (int, np.integer)) for w in local_window_size)):
        raise TypeError("fa3_jax: local_window_size must be an int or a pair of ints, got "
                        f"{local_window_size!r}")
    left, right = (int(w) for w in local_window_size)
    if left < 0 or right < 0:
        raise ValueError(f"fa3_jax: local_window_size entries must be >= 0, got {(left, right)}")
    return left, right


def static_mask_kind(mask, attn_shape):
    """Which kernel mask a boolean ``mask`` (broadcastable to ``attn_shape``, ``[..., T, S]``) is:
    "none" (every key visible, or mask is None), "causal" (jax.nn's top-left lower triangle) or
    None (anything else, or a traced mask: its values are unknown while tracing). For the
    Flax and Equinox adapters, which serve such masks with the kernels."""
    if mask is None:
        return "none"
    if isinstance(mask, jax.core.Tracer):
        return None
    m = np.asarray(mask).astype(bool)
    try:
        if np.broadcast_shapes(m.shape, tuple(attn_shape)) != tuple(attn_shape):
            return None
    except ValueError:
        return None
    t, s = attn_shape[-2:]
    m = m.reshape((1,) * max(0, 2 - m.ndim) + m.shape)
    m = m.reshape((-1,) + m.shape[-2:])
    m = np.broadcast_to(m, (m.shape[0], t, s))
    if m.all():
        return "none"
    if (m == np.tril(np.ones((t, s), bool))).all():
        return "causal"
    return None


def _is_float64(x):
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.dtype(dtype) == jnp.float64


def _check_lengths(lengths, b, name):
    """jax.nn's [B] int32 lengths, checked with jax.nn's own messages."""
    lengths = jnp.asarray(lengths)
    # jax.nn's own checks, with its messages.
    if lengths.ndim != 1:
        raise ValueError(f"{name} ndim should be 1, but got {lengths.ndim}")
    if lengths.dtype != np.dtype("int32"):
        raise ValueError(f"{name} dtype should be int32, but got {lengths.dtype}")
    if lengths.shape[0] != b:
        raise ValueError(f"{name} shape should be [{b}]: but got {lengths.shape}")
    return lengths


def _lengths_to_segment_ids(lengths, b, n, name):
    """jax.nn's [B] int32 lengths as segment ids [B, n]: 1 for positions < length, else 0."""
    if lengths is None:
        return jnp.ones((b, n), jnp.int32)
    lengths = _check_lengths(lengths, b, name)
    return (jnp.arange(n, dtype=jnp.int32)[None, :] < lengths[:, None]).astype(jnp.int32)


def _lengths_to_cu_seqlens(lengths, b, n, name):
    """jax.nn's [B] int32 lengths as varlen cu_seqlens [B, 2]: one sequence [0, length) per row
    (lengths past n are clamped by the kernels' cu_seqlens policy)."""
    if lengths is None:
        return jnp.tile(jnp.array([[0, n]], jnp.int32), (b, 1))
    lengths = _check_lengths(lengths, b, name)
    return jnp.stack([jnp.zeros_like(lengths), lengths], axis=1)


def _gpu_unsupported(query, value):
    """Why the Hopper kernels can't take this call on a CUDA default backend, or None."""
    if jax.default_backend() != "gpu":
        return None
    return _ffi.cuda_unsupported(query.dtype, query.shape[-1], value.shape[-1])


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None,
                          is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
                          local_window_size=None, implementation=None, return_residual=False,
                          context_parallel="ring", load_balance=0):
    """``jax.nn.dot_product_attention`` with fa3_jax kernels. Shapes (B)TNH / (B)SKH.

    See the module docstring for what falls back. ``return_residual=True`` also returns the
    log-sum-exp, shaped (B)TN in the query's dtype with no gradient, like jax.nn's residual.
    Two fa3_jax-only keywords, as in ``flash_attention``: ``context_parallel`` ("ring",
    "all_gather", "gather": how a sharded sequence axis runs under multi-device jit) and
    ``load_balance`` (n: the sequence is in the layout of ``fa3_jax.load_balance_reorder(x, n)``).
    """
    kwargs = dict(scale=scale, is_causal=is_causal, query_seq_lengths=query_seq_lengths,
                  key_value_seq_lengths=key_value_seq_lengths,
                  local_window_size=local_window_size, return_residual=return_residual)
    if implementation in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(query, key, value, bias, mask,
                                            implementation=implementation, **kwargs)
    if implementation not in (None, "fa3"):
        raise ValueError("fa3_jax: implementation must be None, 'fa3', 'xla' or 'cudnn', got "
                         f"{implementation!r}")
    fallback = [(n, "is not supported by the fa3_jax kernels")
                for n, x in (("bias", bias), ("mask", mask)) if x is not None]
    lengths = [(n, x) for n, x in (("query_seq_lengths", query_seq_lengths),
                                   ("key_value_seq_lengths", key_value_seq_lengths))
               if x is not None]
    if any(_is_float64(x) for x in (query, key, value)):
        fallback.append(("float64", "inputs are not supported by the fa3_jax kernels"))
    elif why := _gpu_unsupported(query, value):
        fallback.append(("query", f"is not supported on this GPU ({why})"))
    if fallback:
        for arg, reason in fallback:
            _warn_once(arg, f"{arg} {reason}")
        return jax.nn.dot_product_attention(query, key, value, bias, mask, **kwargs)

    ranks = {getattr(x, "ndim", None) for x in (query, key, value)}
    if ranks == {3}:
        query, key, value = query[None], key[None], value[None]
        unbatch = True
    elif ranks == {4}:
        unbatch = False
    else:
        raise ValueError("fa3_jax: query, key and value must all be rank 4 (BTNH) or all rank 3 "
                         f"(TNH), got shapes {[getattr(x, 'shape', None) for x in (query, key, value)]}")
    b, t, s, n, kh, h, hv = check_qkv(query, key, value, names=("query", "key", "value"))
    strategy, shards = check_context_parallel(context_parallel, load_balance, t, s,
                                              names=("query", "key"))
    sc = 1.0 / math.sqrt(h) if scale is None else _check_float("scale", scale, positive=True)
    # jax.nn aligns causal and windows top-left: query i sees key j iff i - left <= j <= i + right.
    lo, hi = -UNBOUNDED, UNBOUNDED
    window = _window(local_window_size)
    if window is not None:
        lo, hi = -window[0], window[1]
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"fa3_jax: is_causal must be a bool, got {type(is_causal).__name__}")
    if is_causal:
        hi = min(hi, 0)
    segment_ids = None
    if lengths and shards:
        raise ValueError("fa3_jax: load_balance is not supported with query_seq_lengths / "
                         "key_value_seq_lengths yet; pass load_balance=0")
    if lengths and lo == -UNBOUNDED and hi == UNBOUNDED:
        # No band: one varlen sequence per batch row (the Hopper kernels take these).
        cu = (_lengths_to_cu_seqlens(query_seq_lengths, b, t, "query_seq_lengths"),
              _lengths_to_cu_seqlens(key_value_seq_lengths, b, s, "key_value_seq_lengths"))
        pcfg = _PackedConfig("varlen", sc, 0.0, lo, hi, False, t, s)
        out, lse = packed_attention(query, key, value, *cu, pcfg)
    else:
        if lengths:
            segment_ids = (_lengths_to_segment_ids(query_seq_lengths, b, t, "query_seq_lengths"),
                           _lengths_to_segment_ids(key_value_seq_lengths, b, s,
                                                   "key_value_seq_lengths"))
        out, lse = attention_with_band(query, key, value, softmax_scale=sc, softcap=0.0,
                                       diag_lo=lo, diag_hi=hi, context_parallel=strategy,
                                       load_balance=shards, segment_ids=segment_ids)
    if unbatch:
        out, lse = out[0], lse[0]
    if not return_residual:
        return out
    # jax.nn's residual: [(B,) T, N] in the inputs' dtype, and no gradient flows through it.
    lse = jnp.swapaxes(lse, -1, -2).astype(query.dtype)  # [(B,) N, T] -> [(B,) T, N]
    return out, jax.lax.stop_gradient(lse)

"""A pure-jnp float32 reference with flash_attention's signature (used by the tests)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fa3_jax.attention import bottom_right_band, check_qkv


def band_mask(sq, sk, diag_lo, diag_hi):
    """[sq, sk] bool: key j visible to query i iff diag_lo <= j - i <= diag_hi."""
    diag_lo, diag_hi = max(diag_lo, -sq - 1), min(diag_hi, sk + 1)  # unbounded -> int32 range
    rel = jnp.arange(sk)[None, :] - jnp.arange(sq)[:, None]
    return (rel >= diag_lo) & (rel <= diag_hi)


def attention_reference(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, return_lse=False, deterministic=False,
                        compute_dtype=jnp.float32, band=None):
    """Materialises the scores in `compute_dtype` (float32 by default; pass q.dtype for a
    same-precision baseline). Fully masked rows give out = 0 and lse = -inf, like the kernels.
    `band=(diag_lo, diag_hi)` overrides causal/window_size. `deterministic` is accepted and
    ignored so that the signature matches flash_attention."""
    del deterministic
    b, sq, sk, hq, hkv, d, dv = check_qkv(q, k, v)
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    diag_lo, diag_hi = band if band is not None else bottom_right_band(sq, sk, causal, window_size)
    g = hq // hkv
    qf = q.astype(compute_dtype)
    kf = jnp.repeat(k.astype(compute_dtype), g, axis=2)
    vf = jnp.repeat(v.astype(compute_dtype), g, axis=2)
    # HIGHEST: on GPUs XLA would otherwise run float32 products in TF32.
    hi = jax.lax.Precision.HIGHEST
    s = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, preferred_element_type=jnp.float32, precision=hi)
    s = s * scale
    if softcap > 0:
        s = softcap * jnp.tanh(s / softcap)
    s = s.astype(compute_dtype)
    mask = band_mask(sq, sk, diag_lo, diag_hi)[None, None]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m_safe = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0))
    p = jnp.exp(s - m_safe)
    l = jnp.sum(p.astype(jnp.float32), axis=-1, keepdims=True)
    l_safe = jnp.where(l > 0, l, 1.0)
    p = (p / l_safe.astype(p.dtype)).astype(compute_dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, vf, preferred_element_type=jnp.float32, precision=hi)
    out = out.astype(q.dtype)
    lse = jnp.where(l[..., 0] > 0, jnp.log(l_safe[..., 0]) + m_safe[..., 0].astype(jnp.float32),
                    -jnp.inf)
    return (out, lse) if return_lse else out

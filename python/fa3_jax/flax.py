"""fa3_jax as a Flax ``attention_fn`` (NNX ``MultiHeadAttention`` and Linen
``MultiHeadDotProductAttention``).

    from flax import nnx
    import fa3_jax.flax
    attn = nnx.MultiHeadAttention(8, 512, attention_fn=fa3_jax.flax.dot_product_attention,
                                  decode=False, rngs=nnx.Rngs(0))
    y = attn(x, is_causal=True)                      # served by the fa3_jax kernels

    import flax.linen as nn
    from functools import partial
    attn = nn.MultiHeadDotProductAttention(
        8, attention_fn=partial(fa3_jax.flax.dot_product_attention, is_causal=True))

``dot_product_attention`` takes the arguments Flax passes to an attention_fn (those of
``flax.nnx.dot_product_attention`` and of ``flax.linen.dot_product_attention``) and computes the
same function. What the kernels serve, and what falls back to Flax's own
``dot_product_attention`` (with a warning, once per reason):

| call                                                     | served by                         |
|----------------------------------------------------------|-----------------------------------|
| no mask, no bias; ``is_causal`` (NNX, or ``partial``)    | fa3_jax kernels                   |
| a concrete (not traced) mask that is all True, or the    | fa3_jax kernels (as no mask /     |
| top-left lower triangle (``make_causal_mask``, eager)    | causal)                           |
| a traced mask (any mask built inside ``jit``), any other | Flax                              |
| mask, a bias                                             |                                   |
| dropout active (``dropout_rate > 0``, not deterministic) | Flax                              |
| ``module`` given (sowing attention weights)              | Flax                              |
| Linen's custom einsums (``qk_attn_weights_einsum``, ...) | Flax                              |

A traced mask's values are unknown at trace time, so even a causal mask made under ``jit`` falls
back: pass ``is_causal=True`` instead of a causal mask to keep the kernels. Served calls compute
softmax in float32 whatever ``force_fp32_for_softmax`` says, and ignore ``precision`` (as Flax's
own jax.nn fast path does). Inputs are promoted to ``dtype`` (or their common dtype) as Flax
does; any number of batch dimensions (or none) is accepted. Flax itself is imported only when a
call falls back, so this module imports without it.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from fa3_jax import nn as _nn

_warn_once = _nn.FallbackWarner("fa3_jax.flax.dot_product_attention",
                                "Flax's dot_product_attention")
_WARNED = _warn_once.warned


def _promote(query, key, value, dtype, promote_dtype):
    if promote_dtype is not None:  # NNX's hook: promote_dtype((q, k, v), dtype=...)
        return promote_dtype((query, key, value), dtype=dtype)
    if dtype is None:
        dtype = jnp.result_type(query, key, value)
        if not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.result_type(dtype, jnp.float32)
    return tuple(jnp.asarray(x, dtype) for x in (query, key, value))


def _flax_fallback(query, key, value, bias, mask, flax_kwargs, linen_kwargs, is_causal,
                   promote_dtype, module):
    """Flax's own dot_product_attention: Linen's when a Linen-only argument was passed (Linen
    passes ``force_fp32_for_softmax`` to every attention_fn that takes it) or ``module`` is a Linen
    module, NNX's otherwise."""
    import flax.linen as linen
    if any(v is not None for v in linen_kwargs.values()) or isinstance(module, linen.Module):
        if is_causal:  # Linen has no is_causal: the same mask, made explicit
            t, s = query.shape[-3], key.shape[-3]
            causal = jnp.tril(jnp.ones((t, s), bool)).reshape((1,) * (query.ndim - 2) + (t, s))
            mask = causal if mask is None else jnp.logical_and(mask, causal)
        linen_kwargs = {k: v for k, v in linen_kwargs.items() if v is not None}
        return linen.dot_product_attention(query, key, value, bias, mask, module=module,
                                           **flax_kwargs, **linen_kwargs)
    from flax import nnx
    extra = {} if promote_dtype is None else dict(promote_dtype=promote_dtype)
    return nnx.dot_product_attention(query, key, value, bias, mask, module=module,
                                     is_causal=is_causal, **flax_kwargs, **extra)


def dot_product_attention(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                          dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                          precision=None, module=None, *, is_causal=False, promote_dtype=None,
                          force_fp32_for_softmax=None, einsum_dot_general=None,
                          qk_attn_weights_einsum=None, attn_weights_value_einsum=None):
    """Flax's attention_fn with fa3_jax kernels. Shapes as Flax's: query
    ``[batch..., q_length, num_heads, head_dim]``, key/value ``[batch..., kv_length, kv_heads,
    head_dim(_v)]``; returns ``[batch..., q_length, num_heads, head_dim_v]``.

    ``is_causal`` is jax.nn's top-left aligned causal mask. See the module docstring for which
    calls the kernels serve and which fall back to Flax.
    """
    flax_kwargs = dict(broadcast_dropout=broadcast_dropout, dropout_rng=dropout_rng,
                       dropout_rate=dropout_rate, deterministic=deterministic, dtype=dtype,
                       precision=precision)
    linen_kwargs = dict(force_fp32_for_softmax=force_fp32_for_softmax,
                        einsum_dot_general=einsum_dot_general,
                        qk_attn_weights_einsum=qk_attn_weights_einsum,
                        attn_weights_value_einsum=attn_weights_value_einsum)
    q, k, v = _promote(query, key, value, dtype, promote_dtype)

    fallback = None
    if q.ndim < 3 or not q.ndim == k.ndim == v.ndim:
        fallback = ("rank", f"query/key/value ranks {q.ndim}/{k.ndim}/{v.ndim} are not served")
    elif not deterministic and dropout_rate > 0.0:
        fallback = ("dropout", f"attention dropout (dropout_rate={dropout_rate}) is not served")
    elif module is not None:
        fallback = ("module", "sowing the attention weights (module=...) needs them materialized")
    elif einsum_dot_general or qk_attn_weights_einsum or attn_weights_value_einsum:
        fallback = ("einsum", "custom einsums are not served")
    elif bias is not None:
        fallback = ("bias", "bias is not served")
    if fallback is None:
        kind = _nn.static_mask_kind(mask, q.shape[:-3] + (q.shape[-2], q.shape[-3], k.shape[-3]))
        if kind is None:
            fallback = ("mask", "a traced mask, or one other than all-True or causal, is not "
                        "served (pass is_causal=True for causal attention)")
    if fallback is not None:
        _warn_once(*fallback)
        return _flax_fallback(q, k, v, bias, mask, flax_kwargs, linen_kwargs, is_causal,
                              promote_dtype, module)

    batch = q.shape[:-3]
    if len(batch) > 1:  # the kernels take one batch axis (or none)
        q, k, v = (x.reshape((math.prod(batch),) + x.shape[-3:]) for x in (q, k, v))
    out = _nn.dot_product_attention(q, k, v, is_causal=bool(is_causal) or kind == "causal")
    return out.reshape(batch + out.shape[-3:])

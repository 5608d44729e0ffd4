"""``equinox.nn.MultiheadAttention`` with fa3_jax attention.

    import fa3_jax.equinox
    attn = fa3_jax.equinox.MultiheadAttention(8, 512, key=jax.random.PRNGKey(0))
    y = jax.vmap(partial(attn, is_causal=True))(x, x, x)      # x [batch, seq, 512]

``MultiheadAttention`` is a subclass of Equinox's: the same constructor, fields, parameters (the
same ``key`` gives the same weights) and call signature, plus a keyword ``is_causal`` (jax.nn's
top-left aligned causal mask). ``MultiheadAttention.from_equinox(m)`` converts an existing
Equinox module, weights included. The kernels serve calls with no mask, ``is_causal=True``, or a
concrete (not traced) mask that is all True or the lower triangle; they take the heads as
[seq, heads, size], so ``jax.vmap`` over a batch becomes the kernels' batch axis. Other calls
run Equinox's own attention, with a warning once per reason: a traced mask (any mask built
under ``jit``: use ``is_causal=True`` instead), any other mask, active dropout (``dropout_p > 0``
and not ``inference``), float64, or a shape/dtype the GPU kernels lack.
Requires equinox (an optional dependency of fa3_jax).
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp

from fa3_jax import nn as _nn

_warn_once = _nn.FallbackWarner("fa3_jax.equinox.MultiheadAttention",
                                "equinox.nn.MultiheadAttention's attention")
_WARNED = _warn_once.warned


class MultiheadAttention(eqx.nn.MultiheadAttention):
    """``equinox.nn.MultiheadAttention`` whose attention runs on the fa3_jax kernels."""

    @classmethod
    def from_equinox(cls, module: eqx.nn.MultiheadAttention) -> "MultiheadAttention":
        """The same module (weights, sizes, dropout) as an fa3_jax MultiheadAttention."""
        if not isinstance(module, eqx.nn.MultiheadAttention):
            raise TypeError("fa3_jax: from_equinox takes an equinox.nn.MultiheadAttention, got "
                            f"{type(module).__name__}")
        new = object.__new__(cls)
        for f in dataclasses.fields(module):
            object.__setattr__(new, f.name, getattr(module, f.name))
        return new

    def __call__(self, query, key_, value, mask=None, *, key=None, inference=None,
                 deterministic=None, process_heads=None, is_causal=False):
        """As ``equinox.nn.MultiheadAttention.__call__`` (query [q_seq, query_size], key_/value
        [kv_seq, key_size/value_size], mask [q_seq, kv_seq] or [heads, q_seq, kv_seq]), plus
        ``is_causal``. Returns [q_seq, output_size]."""
        if deterministic is not None:  # Equinox's deprecated spelling of inference
            inference = deterministic
        dropout_on = self.dropout.p > 0 and not (
            self.dropout.inference if inference is None else inference)
        kind = _nn.static_mask_kind(mask, (self.num_heads, query.shape[0], key_.shape[0]))
        why = None
        if dropout_on:
            why = ("dropout", f"attention dropout (dropout_p={self.dropout.p}) is not served")
        elif kind is None:
            why = ("mask", "a traced mask, or one other than all-True or causal, is not served "
                   "(pass is_causal=True for causal attention)")
        if why is None:
            out = self._fa3_attention(query, key_, value, process_heads,
                                      is_causal or kind == "causal")
            if out is not None:
                return out
            why = ("dtype", "float64, or a dtype/head size the GPU kernels lack, is not served")
        _warn_once(*why)
        if is_causal:  # Equinox has no is_causal: the same mask, made explicit
            causal = jnp.tril(jnp.ones((query.shape[0], key_.shape[0]), bool))
            mask = causal if mask is None else jnp.logical_and(mask, causal)
        return super().__call__(query, key_, value, mask, key=key, inference=inference,
                                process_heads=process_heads)

    def _fa3_attention(self, query, key_, value, process_heads, causal):
        """The attention on the kernels, or None where they can't take these heads."""
        if key_.shape[0] != value.shape[0]:
            raise ValueError("key and value must both be sequences of equal length.")
        q = self._project(self.query_proj, query)  # [q_seq, heads, qk_size]
        k = self._project(self.key_proj, key_)     # [kv_seq, heads, qk_size]
        v = self._project(self.value_proj, value)  # [kv_seq, heads, vo_size]
        if process_heads is not None:
            shapes = (q.shape, k.shape, v.shape)
            q, k, v = process_heads(q, k, v)
            if (q.shape, k.shape, v.shape) != shapes:
                raise ValueError("process_heads must not change the shape of the heads.")
        if _nn._is_float64(q) or _nn._gpu_unsupported(q, v):
            return None
        attn = _nn.dot_product_attention(q, k, v, is_causal=bool(causal))
        return jax.vmap(self.output_proj)(attn.reshape(query.shape[0], -1))

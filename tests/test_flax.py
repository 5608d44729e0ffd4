"""fa3_jax.flax.dot_product_attention as the attention_fn of Flax's NNX and Linen multi-head
attention, against the same modules with Flax's default attention: forward and gradients, which
calls the kernels serve and which fall back."""

import warnings
from functools import partial

import jax
import jax.numpy as jnp
import pytest

import fa3_jax
from fa3_jax import flax as fflax
from fa3_jax import nn as fnn
from util import max_err

nnx = pytest.importorskip("flax.nnx")
linen = pytest.importorskip("flax.linen")

FA3 = fflax.dot_product_attention


def _served(fn, *args):
    text = str(jax.make_jaxpr(fn)(*args))
    return "fa3_fwd" in text


def _kernels_take(dtype, head_dim):
    """Whether the kernels take this dtype and head size on the default backend (CPU: always;
    elsewhere the drop-in falls back, so "served" checks expect the fallback)."""
    x = jax.ShapeDtypeStruct((1, 1, 1, head_dim), dtype)
    return fnn._gpu_unsupported(x, x) is None


def _fallback_warnings(record):
    return [str(w.message) for w in record if "fa3_jax.flax" in str(w.message)]


def _nnx_pair(**kw):
    """Two NNX MultiHeadAttention modules with identical weights: Flax's attention, fa3_jax's."""
    make = lambda fn: nnx.MultiHeadAttention(  # noqa: E731
        num_heads=4, in_features=32, qkv_features=64, decode=False, attention_fn=fn,
        rngs=nnx.Rngs(0), **kw)
    return make(nnx.dot_product_attention), make(FA3)


def _nnx_loss(model, x, **call_kw):
    graphdef, state = nnx.split(model)

    def loss(state, x):
        y = nnx.merge(graphdef, state)(x, **call_kw)
        return jnp.sum(jnp.sin(y)), y
    return loss, state


@pytest.mark.parametrize("is_causal", [False, True])
def test_nnx_served_matches_flax(is_causal):
    ref_m, m = _nnx_pair()
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 24, 32))
    loss, state = _nnx_loss(m, x, is_causal=is_causal)
    ref_loss, ref_state = _nnx_loss(ref_m, x, is_causal=is_causal)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        (_, y), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(state, x)
        assert _served(loss, state, x) == _kernels_take(jnp.float32, 16)
    assert _fallback_warnings(rec) == []
    (_, y_ref), g_ref = jax.jit(jax.value_and_grad(ref_loss, has_aux=True))(ref_state, x)
    assert max_err(y, y_ref) < 1e-5
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert max_err(a, b) < 1e-4


def test_nnx_dropout_and_traced_mask_fall_back():
    ref_m, m = _nnx_pair(dropout_rate=0.25)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 32))
    fflax._WARNED.clear()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y = nnx.jit(lambda m, x: m(x, deterministic=False, rngs=nnx.Rngs(dropout=7)))(m, x)
        m(x[:1], deterministic=False, rngs=nnx.Rngs(dropout=7))
    msgs = _fallback_warnings(rec)
    assert len(msgs) == 1 and "dropout" in msgs[0], msgs
    y_ref = nnx.jit(lambda m, x: m(x, deterministic=False, rngs=nnx.Rngs(dropout=7)))(ref_m, x)
    assert max_err(y, y_ref) < 1e-6  # Flax's own computation, same dropout bits

    # Dropout off: served again. A causal mask made under jit is traced: it falls back.
    assert _served(lambda x: m(x, deterministic=True), x) == _kernels_take(jnp.float32, 16)
    def masked(model, x):
        return model(x, deterministic=True, mask=nnx.make_causal_mask(x[..., 0]))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert not _served(partial(masked, m), x)
        y = nnx.jit(masked)(m, x)
    assert any("mask" in s for s in _fallback_warnings(rec))
    assert max_err(y, nnx.jit(masked)(ref_m, x)) < 1e-6


def _linen_pair(attention_fn, **kw):
    make = lambda fn: linen.MultiHeadDotProductAttention(  # noqa: E731
        num_heads=4, qkv_features=64, attention_fn=fn, **kw)
    return make(linen.dot_product_attention), make(attention_fn)


def test_linen_served_matches_flax():
    """No mask; an eager causal mask (recognised, served as causal); is_causal through partial
    under jit (served) against Flax with the causal mask."""
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 20, 32))
    causal = linen.make_causal_mask(x[..., 0])
    ref_mod, mod = _linen_pair(FA3)
    params = ref_mod.init(jax.random.PRNGKey(4), x)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y = mod.apply(params, x)
        y_causal = mod.apply(params, x, mask=causal)
    assert _fallback_warnings(rec) == []
    assert max_err(y, ref_mod.apply(params, x)) < 1e-5
    assert max_err(y_causal, ref_mod.apply(params, x, mask=causal)) < 1e-5

    _, mod_causal = _linen_pair(partial(FA3, is_causal=True))

    def loss(module, mask, params):
        y = module.apply(params, x, mask=mask)
        return jnp.sum(jnp.sin(y)), y
    fa3_loss, ref_loss = partial(loss, mod_causal, None), partial(loss, ref_mod, causal)
    assert _served(fa3_loss, params) == _kernels_take(jnp.float32, 16)
    (_, y), g = jax.jit(jax.value_and_grad(fa3_loss, has_aux=True))(params)
    (_, y_ref), g_ref = jax.jit(jax.value_and_grad(ref_loss, has_aux=True))(params)
    assert max_err(y, y_ref) < 1e-5
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert max_err(a, b) < 1e-4


def test_linen_dropout_and_bias_fall_back_to_linen():
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 12, 32))
    ref_mod, mod = _linen_pair(FA3, dropout_rate=0.3, deterministic=False)
    params = ref_mod.init(jax.random.PRNGKey(6), x)
    rngs = {"dropout": jax.random.PRNGKey(8)}
    fflax._WARNED.clear()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y = jax.jit(mod.apply)(params, x, rngs=rngs)
    assert any("dropout" in s for s in _fallback_warnings(rec))
    assert max_err(y, jax.jit(ref_mod.apply)(params, x, rngs=rngs)) < 1e-6

    # A bias (here as a direct call with Linen's arguments) goes to Linen's function.
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 12, 4, 16)) for i in range(3))
    bias = jax.random.normal(jax.random.PRNGKey(9), (2, 4, 12, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = jax.jit(partial(FA3, force_fp32_for_softmax=False))(q, k, v, bias)
    assert max_err(got, jax.jit(linen.dot_product_attention)(q, k, v, bias)) < 1e-6


def test_batch_dims_and_dtype_promotion():
    """Flax allows any number of batch axes (or none) and promotes to ``dtype``."""
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 3, 10, 4, 16)) for i in range(3))
    got = jax.jit(partial(FA3, dtype=jnp.bfloat16, is_causal=True))(q, k, v)
    ref = jax.jit(partial(nnx.dot_product_attention, dtype=jnp.bfloat16, is_causal=True))(q, k, v)
    assert got.dtype == ref.dtype == jnp.bfloat16 and got.shape == ref.shape
    assert max_err(got, ref) < 2e-2
    got = jax.jit(FA3)(q[0, 0], k[0, 0], v[0, 0])
    assert max_err(got, jax.jit(nnx.dot_product_attention)(q[0, 0], k[0, 0], v[0, 0])) < 1e-5
    assert fa3_jax.flax is fflax

"""The drop-in dot_product_attention against jax.nn.dot_product_attention."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3_jax
from fa3_jax import nn as fnn
from util import assert_close_to_reference, make_qkv, max_err


@pytest.mark.parametrize("kw", [dict(), dict(is_causal=True), dict(local_window_size=(5, 3)),
                                dict(local_window_size=4, is_causal=True), dict(scale=0.2)])
@pytest.mark.parametrize("t,s", [(33, 33), (20, 45)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_jax_nn(kw, t, s, dtype):
    q, k, v = make_qkv(2, t, s, 4, 2, 64, dtype=dtype)
    got = fa3_jax.dot_product_attention(q, k, v, **kw)
    ref32 = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), **kw)
    ref_lp = jax.nn.dot_product_attention(q, k, v, **kw)
    assert got.shape == ref32.shape and got.dtype == q.dtype
    assert_close_to_reference(got, ref32, ref_lp, dtype, "out")


def test_grad_matches_jax_nn():
    q, k, v = make_qkv(2, 24, 24, 4, 2, 64)
    f = lambda fn: jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, is_causal=True) ** 2), (0, 1, 2))  # noqa
    for a, b in zip(f(fa3_jax.dot_product_attention)(q, k, v), f(jax.nn.dot_product_attention)(q, k, v)):
        assert max_err(a, b) < 1e-4


def test_rank3_and_residual():
    q, k, v = make_qkv(1, 12, 12, 2, 2, 64)
    q, k, v = q[0], k[0], v[0]
    out, res = fa3_jax.dot_product_attention(q, k, v, return_residual=True)
    ref, ref_res = jax.nn.dot_product_attention(q, k, v, return_residual=True)
    assert out.shape == ref.shape and res.shape == ref_res.shape == (12, 2)
    assert max_err(out, ref) < 1e-5 and max_err(res, ref_res) < 1e-4


@pytest.mark.parametrize("arg", ["mask", "bias"])
def test_fallback_warns_once_and_matches(arg):
    q, k, v = make_qkv(2, 10, 10, 2, 2, 64)
    extra = {"mask": dict(mask=jnp.tril(jnp.ones((1, 1, 10, 10), bool))),
             "bias": dict(bias=jnp.ones((1, 1, 10, 10)))}[arg]
    fnn._WARNED.discard(arg)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = fa3_jax.dot_product_attention(q, k, v, **extra)
        fa3_jax.dot_product_attention(q, k, v, **extra)
    msgs = [str(x.message) for x in w if arg in str(x.message)]
    assert len(msgs) == 1, msgs
    assert max_err(got, jax.nn.dot_product_attention(q, k, v, **extra)) < 1e-6


def test_explicit_xla_implementation_passes_through():
    q, k, v = make_qkv(1, 8, 8, 2, 2, 64)
    a = fa3_jax.dot_product_attention(q, k, v, implementation="xla")
    np.testing.assert_array_equal(np.asarray(a),
                                  np.asarray(jax.nn.dot_product_attention(q, k, v, implementation="xla")))


def test_flax_attention_fn():
    flax_nn = pytest.importorskip("flax.linen")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 64))
    mk = lambda fn: flax_nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=64, attention_fn=fn)  # noqa
    params = mk(flax_nn.dot_product_attention).init(jax.random.PRNGKey(1), x)

    def fa3_fn(query, key, value, bias=None, mask=None, **kwargs):
        return fa3_jax.dot_product_attention(query, key, value, bias, mask)

    got = mk(fa3_fn).apply(params, x)
    ref = mk(flax_nn.dot_product_attention).apply(params, x)
    assert max_err(got, ref) < 1e-5

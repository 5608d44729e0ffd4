"""Bad input raises ValueError/TypeError naming the argument, what was seen, and what works."""

import jax
import jax.numpy as jnp
import pytest

import fa3_jax
from util import make_qkv


def _qkv(**kw):
    return make_qkv(1, 8, 8, 4, 2, 64, **kw)


@pytest.mark.parametrize("mutate,exc,pattern", [
    (lambda q, k, v: (q[0], k, v), ValueError, r"q must have rank 4.*\(8, 4, 64\)"),
    (lambda q, k, v: (q, k[..., :32], v), ValueError, r"q and k must share head_dim"),
    (lambda q, k, v: (q, k[:, :5], v), ValueError, r"k and v must agree"),
    (lambda q, k, v: (q[:, :, :3], k, v), ValueError, r"heads_q \(3.*multiple of heads_kv \(2"),
    (lambda q, k, v: (q, k.astype(jnp.bfloat16), v), TypeError, r"share one dtype.*bfloat16"),
    (lambda q, k, v: (q.astype(jnp.int32), k, v), TypeError, r"q has dtype int32; supported"),
    (lambda q, k, v: (jnp.zeros((1, 8, 4, 300)), jnp.zeros((1, 8, 2, 300)), v[..., :1].repeat(300, -1)),
     ValueError, r"head_dim=300 is not supported"),
    (lambda q, k, v: (q, k, [1, 2]), TypeError, r"v must be an array"),
    (lambda q, k, v: (q[:1, :, :], k[:1, :0], v[:1, :0]), ValueError, r"empty inputs"),
])
def test_shape_and_dtype_errors(mutate, exc, pattern):
    q, k, v = mutate(*_qkv())
    with pytest.raises(exc, match=pattern):
        fa3_jax.flash_attention(q, k, v)


@pytest.mark.parametrize("kw,exc,pattern", [
    (dict(window_size=(3,)), TypeError, r"window_size must be a pair of ints"),
    (dict(window_size=(-2, 0)), ValueError, r"window_size entries must be >= -1.*\(-2, 0\)"),
    (dict(softcap=-1.0), ValueError, r"softcap must be a finite float >= 0.0"),
    (dict(softmax_scale=0.0), ValueError, r"softmax_scale must be a finite float > 0"),
    (dict(softmax_scale="a"), TypeError, r"softmax_scale must be a float"),
    (dict(causal=1), TypeError, r"causal must be a bool"),
])
def test_option_errors(kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fa3_jax.flash_attention(*_qkv(), **kw)


def test_traced_scale_is_rejected():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="softmax_scale must be a static Python float"):
        jax.jit(lambda s: fa3_jax.flash_attention(q, k, v, softmax_scale=s))(0.1)


def test_dot_product_attention_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="implementation must be"):
        fa3_jax.dot_product_attention(q, k, v, implementation="triton")
    with pytest.raises(ValueError, match="local_window_size entries must be >= 0"):
        fa3_jax.dot_product_attention(q, k, v, local_window_size=(-1, 2))
    with pytest.raises(ValueError, match="rank 4 .* or all rank 3"):
        fa3_jax.dot_product_attention(q, k[0], v)
    with pytest.raises(ValueError, match=r"key and value must agree"):
        fa3_jax.dot_product_attention(q, k, v[:, :3])


def test_ffi_handler_returns_error_instead_of_abort():
    # Bypass the Python checks: the C++ handler must reject inconsistent shapes with an error.
    from fa3_jax import _primitives
    q, k, v = _qkv()
    with pytest.raises(Exception, match=r"fa3_jax: v has shape"):
        jax.jit(lambda q, k, v: _primitives._fwd_ffi(q, k, v, 1.0, 0.0, -10, 10, False))(q, k, v[:, :5])

"""Gradients against jax.grad of the float32 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3_jax
from util import check_backward, fresh_key, make_qkv, max_err


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("sq,sk", [(1, 1), (7, 7), (113, 203), (203, 113)])
@pytest.mark.parametrize("causal", [False, True])
def test_lengths(dtype, sq, sk, causal):
    q, k, v = make_qkv(2, sq, sk, 4, 2, 64, dtype=dtype)
    check_backward(q, k, v, causal=causal)


def test_long_sequence():
    q, k, v = make_qkv(1, 1000, 1000, 2, 1, 64, dtype=jnp.bfloat16)
    check_backward(q, k, v, causal=True)


@pytest.mark.parametrize("d,dv", [(64, 64), (96, 96), (128, 128), (192, 128), (256, 256)])
def test_head_dims(d, dv):
    q, k, v = make_qkv(1, 70, 90, 2, 1, d, dv, dtype=jnp.bfloat16)
    check_backward(q, k, v, causal=True)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (6, 1)])
def test_mha_gqa_mqa(hq, hkv):
    q, k, v = make_qkv(2, 65, 97, hq, hkv, 64, dtype=jnp.float32)
    check_backward(q, k, v, window_size=(9, 3))


@pytest.mark.parametrize("kw", [dict(window_size=(16, 0)), dict(window_size=(5, 7), causal=True),
                                dict(softcap=10.0, softmax_scale=0.4), dict(softcap=5.0, causal=True)])
def test_features(kw):
    q, k, v = make_qkv(1, 80, 120, 4, 2, 64, dtype=jnp.float16)
    check_backward(q * 2, k, v, **kw)


def test_fully_masked_rows_zero_grad():
    q, k, v = make_qkv(1, 40, 16, 2, 1, 64)
    dq, dk, dv = check_backward(q, k, v, causal=True)
    assert np.all(np.asarray(dq[:, :24]) == 0)
    for g in (dq, dk, dv):
        assert np.isfinite(np.asarray(g)).all()


def test_band_with_no_visible_key_at_all():
    q, k, v = make_qkv(1, 8, 8, 1, 1, 64)
    out, lse = fa3_jax.flash_attention(q, k, v, window_size=(0, 0), causal=True, return_lse=True)
    # (0, 0) keeps the diagonal only: every row sees exactly one key.
    np.testing.assert_allclose(np.asarray(out), np.asarray(v), rtol=1e-6)
    g = jax.grad(lambda q: fa3_jax.flash_attention(q, k[:, :3], v[:, :3], causal=True).sum())(q)
    assert np.all(np.asarray(g[:, :5]) == 0) and np.isfinite(np.asarray(g)).all()


def test_gradient_through_lse():
    q, k, v = make_qkv(1, 30, 50, 2, 1, 64)
    w = jax.random.normal(fresh_key(), (1, 2, 30))

    def f(fn):
        def loss(q, k, v):
            out, lse = fn(q, k, v, causal=True, return_lse=True)
            return jnp.sum(out ** 2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0) * w)
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    for g, r in zip(f(fa3_jax.flash_attention), f(fa3_jax.attention_reference)):
        assert max_err(g, r) < 1e-4


def test_deterministic_flag_gives_identical_bits():
    q, k, v = make_qkv(2, 100, 100, 4, 2, 64, dtype=jnp.bfloat16)
    f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fa3_jax.flash_attention(
        q, k, v, causal=True, deterministic=True).astype(jnp.float32) ** 2), argnums=(0, 1, 2)))
    first = [np.asarray(x) for x in f(q, k, v)]
    for _ in range(3):
        for a, b in zip(first, f(q, k, v)):
            np.testing.assert_array_equal(a, np.asarray(b))

"""Forward out and lse against the float32 reference, error bounded by a same-precision baseline."""

import jax.numpy as jnp
import numpy as np
import pytest

import fa3_jax
from util import check_forward, make_qkv

DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq,sk", [(1, 1), (7, 7), (113, 203), (203, 113), (1000, 1000), (1, 300)])
@pytest.mark.parametrize("causal", [False, True])
def test_lengths(dtype, sq, sk, causal):
    q, k, v = make_qkv(2, sq, sk, 4, 2, 64, dtype=dtype)
    check_forward(q, k, v, causal=causal)


@pytest.mark.parametrize("d,dv", [(64, 64), (96, 96), (128, 128), (192, 192), (192, 128), (256, 256),
                                  (32, 48)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_head_dims(d, dv, dtype):
    q, k, v = make_qkv(1, 77, 130, 2, 1, d, dv, dtype=dtype)
    check_forward(q, k, v, causal=True)
    check_forward(q, k, v)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (6, 1)])
def test_mha_gqa_mqa(hq, hkv):
    q, k, v = make_qkv(2, 65, 97, hq, hkv, 64, dtype=jnp.bfloat16)
    check_forward(q, k, v, causal=True)
    check_forward(q, k, v, window_size=(9, 3))


@pytest.mark.parametrize("window", [(0, 0), (16, 0), (5, 7), (-1, 3), (20, -1), (300, 300)])
@pytest.mark.parametrize("sq,sk", [(128, 128), (64, 200), (200, 64)])
def test_windows(window, sq, sk):
    q, k, v = make_qkv(1, sq, sk, 2, 2, 64, dtype=jnp.float16)
    check_forward(q, k, v, window_size=window)
    check_forward(q, k, v, window_size=window, causal=True)


@pytest.mark.parametrize("softcap", [5.0, 30.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap_and_scale(softcap, dtype):
    q, k, v = make_qkv(2, 50, 90, 4, 2, 64, dtype=dtype)
    q = q * 3  # large scores so that the cap matters
    check_forward(q, k, v, softcap=softcap, softmax_scale=0.3)
    check_forward(q, k, v, softcap=softcap, causal=True)


def test_fully_masked_rows_give_zero_and_neg_inf():
    # seqlen_q > seqlen_k, causal bottom-right: the first sq - sk rows see no key.
    q, k, v = make_qkv(1, 40, 16, 2, 1, 64, dtype=jnp.float32)
    out, lse = check_forward(q, k, v, causal=True)
    assert np.all(np.asarray(out[:, :24]) == 0)
    assert np.all(np.isneginf(np.asarray(lse[:, :, :24])))
    assert np.all(np.isfinite(np.asarray(lse[:, :, 24:])))


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = make_qkv(1, 33, 33, 2, 2, 64)
    a = fa3_jax.flash_attention(q, k, v)
    b = fa3_jax.flash_attention(q, k, v, softmax_scale=1 / 8)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_lse_is_natural_log():
    q, k, v = make_qkv(1, 9, 11, 1, 1, 64)
    _, lse = fa3_jax.flash_attention(q, k, v, return_lse=True)
    s = np.einsum("qd,kd->qk", np.asarray(q[0, :, 0], np.float64),
                  np.asarray(k[0, :, 0], np.float64)) / 8
    np.testing.assert_allclose(np.asarray(lse[0, 0]), np.log(np.exp(s).sum(-1)), rtol=1e-5)

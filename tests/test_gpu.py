"""Hopper kernels through JAX (skipped without a Hopper GPU and a CUDA build)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3_jax
from util import check_backward, check_forward, make_qkv, to_gpu

pytestmark = pytest.mark.gpu

HDIMS = [(64, 64), (96, 96), (128, 128), (192, 192), (192, 128), (256, 256)]


LENGTHS = [(1, 1), (7, 7), (113, 203), (1000, 1000), (4097, 4097), (300, 1000), (1000, 300)]
# Every length for bf16; fp16 shares the code path, so two lengths per head dim for it.
FWD_CASES = ([(jnp.bfloat16, sq, sk) for sq, sk in LENGTHS]
             + [(jnp.float16, sq, sk) for sq, sk in ((113, 203), (1000, 300))])


@pytest.mark.parametrize("dtype,sq,sk", FWD_CASES)
@pytest.mark.parametrize("d,dv", HDIMS)
@pytest.mark.parametrize("causal", [False, True])
def test_forward(dtype, d, dv, sq, sk, causal):
    if d not in fa3_jax.cuda_head_dims():
        pytest.skip(f"head_dim {d} not in this build")
    q, k, v = to_gpu(*make_qkv(1 if sq > 2000 else 2, sq, sk, 4, 2, d, dv, dtype=dtype))
    check_forward(q, k, v, causal=causal)


# Shapes long enough for the large dense tile (cpp/hopper/tile_size.h, fwd_use_large_tile): at
# head dim 64 a 192-row tile with three consumer warpgroups, from 512 rows and keys (full) or 1k
# rows (causal). Each warpgroup passes over the key blocks its rows do not see: rows past seqlen_q
# (1100; 600 and 513 full), rows of no key at all (bottom-right, 1500 x 1100) and a block past
# the diagonal.
@pytest.mark.parametrize("sq,sk,kw", [(8193, 8193, dict(causal=True)),
                                      (8200, 9001, dict(causal=True)),
                                      (1100, 1100, dict(causal=True)),
                                      (1500, 1100, dict(causal=True)),
                                      (1030, 2000, dict(causal=True, softcap=15.0)),
                                      (1100, 1030, dict(softcap=15.0)),
                                      (2000, 1500, dict()),
                                      (600, 517, dict()),
                                      (513, 1000, dict(softcap=15.0))])
def test_forward_large_tile(sq, sk, kw):
    if 64 not in fa3_jax.cuda_head_dims():
        pytest.skip("head_dim 64 not in this build")
    q, k, v = to_gpu(*make_qkv(1, sq, sk, 4, 2, 64, dtype=jnp.bfloat16))
    check_forward(q, k, v, **kw)


# Head dim 192 / 192 runs a 128 x 64 tile with a TMA-stored O where seqlen_k <= 1024
# (tile_size.h, kShortTileMaxSeqlenK192) and its 128 x 112 tile above that (1025). Batch 4 x 8
# heads x 8 row blocks is more tiles than SMs, so CTAs reuse the O buffer across tiles; GQA,
# windows, softcap and rows past seqlen_q or with no key (bottom-right, 1000 x 600) included.
@pytest.mark.parametrize("sq,sk,kw", [(1024, 1024, dict()),
                                      (1024, 1024, dict(causal=True)),
                                      (1025, 1025, dict(causal=True)),
                                      (1000, 600, dict(causal=True, softcap=15.0)),
                                      (517, 1000, dict(window_size=(100, 37))),
                                      (999, 64, dict())])
def test_forward_short_tile_192(sq, sk, kw):
    if 192 not in fa3_jax.cuda_head_dims():
        pytest.skip("head_dim 192 not in this build")
    q, k, v = to_gpu(*make_qkv(4, sq, sk, 8, 2, 192, dtype=jnp.bfloat16))
    check_forward(q, k, v, **kw)


@pytest.mark.parametrize("kw", [dict(window_size=(64, 0)), dict(window_size=(100, 37)),
                                dict(softcap=15.0), dict(softcap=15.0, causal=True)])
@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2), (8, 1)])
def test_forward_features(kw, hq, hkv):
    d = 128 if 128 in fa3_jax.cuda_head_dims() else fa3_jax.cuda_head_dims()[0]
    q, k, v = to_gpu(*make_qkv(2, 333, 517, hq, hkv, d, dtype=jnp.bfloat16))
    check_forward(q * 2, k, v, **kw)


BWD_CASES = ([(jnp.bfloat16, sq, sk) for sq, sk in ((1, 1), (113, 203), (1000, 1000), (300, 700))]
             + [(jnp.float16, 113, 203)])


@pytest.mark.parametrize("dtype,sq,sk", BWD_CASES)
@pytest.mark.parametrize("d,dv", HDIMS)
@pytest.mark.parametrize("causal", [False, True])
def test_backward(dtype, d, dv, sq, sk, causal):
    if d not in fa3_jax.cuda_head_dims():
        pytest.skip(f"head_dim {d} not in this build")
    q, k, v = to_gpu(*make_qkv(2, sq, sk, 4, 2, d, dv, dtype=dtype))
    check_backward(q, k, v, causal=causal)


@pytest.mark.parametrize("kw", [dict(window_size=(64, 0)), dict(softcap=15.0, causal=True)])
@pytest.mark.parametrize("hq,hkv", [(8, 2), (8, 1)])
def test_backward_features(kw, hq, hkv):
    d = 128 if 128 in fa3_jax.cuda_head_dims() else fa3_jax.cuda_head_dims()[0]
    q, k, v = to_gpu(*make_qkv(2, 257, 385, hq, hkv, d, dtype=jnp.bfloat16))
    check_backward(q, k, v, **kw)


def test_deterministic_backward_bits():
    d = 128 if 128 in fa3_jax.cuda_head_dims() else fa3_jax.cuda_head_dims()[0]
    q, k, v = to_gpu(*make_qkv(2, 1024, 1024, 8, 2, d, dtype=jnp.bfloat16))
    f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fa3_jax.flash_attention(
        q, k, v, causal=True, deterministic=True).astype(jnp.float32) ** 2), argnums=(0, 1, 2)))
    first = [np.asarray(x) for x in f(q, k, v)]
    for _ in range(5):
        for a, b in zip(first, f(q, k, v)):
            np.testing.assert_array_equal(a, np.asarray(b))


def test_float32_on_gpu_is_a_clear_error():
    q, k, v = to_gpu(*make_qkv(1, 8, 8, 2, 2, 64))
    with pytest.raises(ValueError, match="float32 is supported on the CPU backend only"):
        jax.jit(fa3_jax.flash_attention)(q, k, v)


@pytest.mark.parametrize("split", [None, 2, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_gqa_group_split(monkeypatch, split, causal):
    # The GQA group split (bwd_group_split, cpp/hopper/flash_bwd_launch_sm90.h): each (key block,
    # kv head) as several CTAs writing float32 dK/dV partials that a reduce kernel sums in a fixed
    # order. None: the rule (causal, group 8: 2 CTAs; full: 1); 2, 4: forced through
    # FA3_JAX_BWD_GROUP_SPLIT. Gradients must match the reference, deterministic mode stay
    # bit-identical.
    from fa3_jax import _ffi
    if split is None:
        monkeypatch.delenv("FA3_JAX_BWD_GROUP_SPLIT", raising=False)
    else:
        monkeypatch.setenv("FA3_JAX_BWD_GROUP_SPLIT", str(split))
    d = 128 if 128 in fa3_jax.cuda_head_dims() else fa3_jax.cuda_head_dims()[0]
    q, k, v = to_gpu(*make_qkv(2, 300, 517, 16, 2, d, dtype=jnp.bfloat16))
    if split is None and d == 128:
        # The rule's partials show in the workspace: causal asks for them, full does not (hdim
        # 128 only: the only head dim compiled with the split; others fall back to one CTA).
        shapes = (q.shape, k.shape, v.shape)
        causal_ws = _ffi.workspace_bytes("bwd", *shapes, diag_lo=-(1 << 40), diag_hi=517 - 300)
        full_ws = _ffi.workspace_bytes("bwd", *shapes)
        assert causal_ws >= full_ws + 2 * 2 * 517 * 2 * 2 * d * 4, (causal_ws, full_ws)
    check_backward(q, k, v, causal=causal)
    f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fa3_jax.flash_attention(
        q, k, v, causal=causal, deterministic=True).astype(jnp.float32) ** 2), argnums=(0, 1, 2)))
    first = [np.asarray(x) for x in f(q, k, v)]
    for a, b in zip(first, f(q, k, v)):
        np.testing.assert_array_equal(a, np.asarray(b))

"""Decode-shaped calls on the Hopper forward: split-KV (Flash-Decoding) and GQA packing.

The kernel picks both per call (cpp/hopper/flash_fwd_launch_sm90.h: plan_fwd; tile_size.h:
fwd_num_splits): few query rows over many keys split the keys across CTAs and merge the partial
results by their LSE; seqlen_q 1 with GQA packs a KV group's query heads into one tile. Every
case here is checked against a float32 reference (out, lse, -inf rows), and
test_forced_splits re-runs small cases in a subprocess with FA3_JAX_FWD_NUM_SPLITS set, which
forces splits on shapes the heuristic would not split, empty splits included.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import fa3_jax
from fa3_jax import _ffi
from util import check_backward, check_forward, make_qkv, to_gpu

pytestmark = pytest.mark.gpu

FORCED = os.environ.get("FA3_JAX_FWD_NUM_SPLITS")


def _hdim():
    return 128 if 128 in fa3_jax.cuda_head_dims() else fa3_jax.cuda_head_dims()[0]


def _splits(q, k, v):
    """Whether the kernel runs split-KV on these shapes: only then is the workspace larger than
    the 16-byte tile counter."""
    return _ffi.workspace_bytes("fwd", q.shape, k.shape, v.shape) > 16


HEADS = [(32, 8), (8, 1), (8, 8)]  # GQA 4, MQA, MHA


@pytest.mark.parametrize("sk", [1, 7, 113, 1000, 4097])
@pytest.mark.parametrize("sq", [1, 4, 7, 16])
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("causal", [False, True])
def test_decode_forward(sq, sk, hq, hkv, causal):
    d = _hdim()
    q, k, v = to_gpu(*make_qkv(2, sq, sk, hq, hkv, d, dtype=jnp.bfloat16))
    check_forward(q, k, v, causal=causal)


@pytest.mark.parametrize("kw", [dict(window_size=(100, 0)), dict(window_size=(700, 3)),
                                dict(softcap=15.0), dict(softcap=15.0, causal=True),
                                dict(causal=True, window_size=(1, 0))])
@pytest.mark.parametrize("sq", [1, 7])
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_decode_features(kw, sq, hq, hkv):
    q, k, v = to_gpu(*make_qkv(2, sq, 3001, hq, hkv, _hdim(), dtype=jnp.bfloat16))
    assert FORCED or _splits(q, k, v)
    check_forward(q * 2, k, v, **kw)


def test_decode_128k():
    q, k, v = to_gpu(*make_qkv(1, 1, 131072, 32, 8, _hdim(), dtype=jnp.bfloat16))
    assert FORCED or _splits(q, k, v)
    check_forward(q, k, v, causal=True)


@pytest.mark.parametrize("sq,hq,hkv,kw", [(1, 32, 8, dict(causal=True)), (4, 32, 8, dict()),
                                          (16, 8, 1, dict(causal=True)),
                                          (7, 8, 8, dict(window_size=(500, 0)))])
def test_decode_backward(sq, hq, hkv, kw):
    """The backward is unchanged but reads the split forward's out and lse."""
    q, k, v = to_gpu(*make_qkv(2, sq, 2049, hq, hkv, _hdim(), dtype=jnp.bfloat16))
    assert FORCED or _splits(q, k, v)
    check_backward(q, k, v, **kw)


@pytest.mark.parametrize("sk", [1, 7, 113, 1000])
@pytest.mark.parametrize("sq", [1, 7, 130])
@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(window_size=(5, 2))])
def test_forced_splits_case(sk, sq, kw):
    """Run by test_forced_splits (skipped otherwise): every split count on awkward lengths, rows
    with no visible key (causal, seqlen_q > seqlen_k) and splits with no key block."""
    if not FORCED:
        pytest.skip("runs in test_forced_splits' subprocess")
    q, k, v = to_gpu(*make_qkv(2, sq, sk, 8, 2, _hdim(), dtype=jnp.bfloat16))
    check_forward(q, k, v, **kw)
    if sq == 7 and sk == 113:
        check_backward(q, k, v, **kw)


@pytest.mark.parametrize("num_splits", [3, 64])
def test_forced_splits(num_splits):
    if FORCED:
        pytest.skip("already inside the forced-splits subprocess")
    env = dict(os.environ, FA3_JAX_FWD_NUM_SPLITS=str(num_splits))
    tests = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        "-p", "no:xdist", "-m", "gpu", f"{__file__}::test_forced_splits_case"],
                       cwd=tests, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-2000:]

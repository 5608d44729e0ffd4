"""flash_attention with q_segment_ids / kv_segment_ids on the Hopper kernels against the float32
masked reference of test_segment_ids.py (skipped without a Hopper GPU and a CUDA build)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3_jax
from util import (ATOL, check_drop_in_seq_lengths, fresh_key, gpu_head_dims, make_qkv, max_err,
                  packed_ids, segment_reference, to_gpu)

pytestmark = pytest.mark.gpu


def run(q, k, v, q_ids, kv_ids, **kw):
    return jax.jit(lambda *a: fa3_jax.flash_attention(
        *a[:3], q_segment_ids=a[3], kv_segment_ids=a[4], return_lse=True, **kw))(
            *to_gpu(q, k, v, q_ids, kv_ids))


def check(q, k, v, q_ids, kv_ids, **kw):
    """Kernel error within twice that of the reference run in q's dtype (plus ATOL); lse against
    the float32 reference, -inf exactly where it is; rows that see no key exactly 0."""
    out, lse = run(q, k, v, q_ids, kv_ids, **kw)
    ref_fn = jax.jit(partial(segment_reference, **kw))
    ref, ref_lse = ref_fn(*(x.astype(jnp.float32) for x in (q, k, v)), q_ids, kv_ids)
    low, _ = ref_fn(q, k, v, q_ids, kv_ids)
    base, err = max_err(low, ref), max_err(out, ref)
    assert not np.isnan(np.asarray(out, np.float32)).any()
    assert err <= 2 * base + ATOL[jnp.dtype(q.dtype)], (err, base)
    assert max_err(lse, ref_lse) <= 2e-3, max_err(lse, ref_lse)
    empty = np.isneginf(np.asarray(ref_lse))  # [b, h, sq]
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), empty)
    assert not np.asarray(out, np.float32)[empty.transpose(0, 2, 1)].any()
    return out, lse


# Documents of odd lengths, padding (id 0) in the middle and at the end of a row.
DOCS = [[1, 7, 113, 1000, 3], [500, 21, 600], [1300]]


def doc_ids(b, s, rows, zero_runs=((0, 300, 340), (1, 480, 531))):
    """packed_ids, then the given (row, start, end) runs set to padding."""
    ids = np.asarray(packed_ids(b, s, rows)).copy()
    for r, lo, hi in zero_runs:
        ids[r, lo:hi] = 0
    return jnp.asarray(ids)


KW = {"full": dict(), "causal": dict(causal=True), "window": dict(window_size=(100, 37)),
      "softcap_causal": dict(causal=True, softcap=15.0)}


@pytest.mark.parametrize("kw", list(KW))
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (4, 1)])
def test_packed_documents(kw, hq, hkv):
    """Sorted runs of lengths 1, 7, 113, 1000, padding runs, GQA / MQA."""
    s = 1400
    ids = doc_ids(3, s, DOCS)
    for d in gpu_head_dims():
        q, k, v = make_qkv(3, s, s, hq, hkv, d, dtype=jnp.bfloat16)
        check(q * 2, k, v, ids, ids, **KW[kw])


@pytest.mark.parametrize("kw", ["causal", "window", "full"])
def test_seqlen_q_ne_k(kw):
    """seqlen_q != seqlen_k (both ways) with the band bottom-right aligned on positions."""
    d = gpu_head_dims()[-1]
    for sq, sk in ((300, 1129), (1129, 300)):
        q, k, v = make_qkv(2, sq, sk, 8, 2, d, dtype=jnp.float16)
        q_ids = packed_ids(2, sq, [[sq // 3, sq - sq // 3 - 5], [1, sq - 1]])
        kv_ids = packed_ids(2, sk, [[sk // 2, sk - sk // 2], [sk // 4, sk - sk // 4 - 9]])
        check(q, k, v, q_ids, kv_ids, **KW[kw])


@pytest.mark.parametrize("kw", ["full", "causal"])
def test_interleaved_ids(kw):
    """Unsorted ids (random from a few values, zeros included): correct, just slower."""
    rng = np.random.default_rng(0)
    q_ids = jnp.asarray(rng.integers(0, 4, (2, 777)), jnp.int32)
    kv_ids = jnp.asarray(rng.integers(-1, 3, (2, 901)), jnp.int32)  # negative ids are ids too
    q, k, v = make_qkv(2, 777, 901, 4, 2, gpu_head_dims()[0], dtype=jnp.bfloat16)
    check(q, k, v, q_ids, kv_ids, **KW[kw])


def test_rows_without_keys():
    """Query ids absent from the keys, a row of all padding, and a causal row whose document
    starts after it: out 0, lse -inf, never NaN."""
    q, k, v = make_qkv(3, 200, 200, 2, 2, gpu_head_dims()[0], dtype=jnp.bfloat16)
    ones = np.ones(200)
    q_ids = jnp.asarray(np.stack([5 * ones, 0 * ones, np.r_[ones[:100], 2 * ones[:100]]]),
                        jnp.int32)
    kv_ids = jnp.asarray(np.stack([ones, ones, np.r_[2 * ones[:150], ones[:50]]]), jnp.int32)
    out, lse = check(q, k, v, q_ids, kv_ids, causal=True)
    assert np.isneginf(np.asarray(lse)[:2]).all() and not np.asarray(out, np.float32)[:2].any()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_one_document_equals_dense(dtype):
    """One id everywhere: every block is uniform, so the result is the dense kernel's, bit for
    bit (same tiles, same order, no segment mask)."""
    for d in gpu_head_dims():  # 256 tiles: the dense plan does not split the keys either
        q, k, v = make_qkv(4, 1000, 1000, 8, 2, d, dtype=dtype)
        ids = jnp.ones((4, 1000), jnp.int32)
        for kw in (dict(), dict(causal=True)):
            out, lse = run(q, k, v, ids, ids, **kw)
            dense, dense_lse = jax.jit(partial(fa3_jax.flash_attention, return_lse=True, **kw))(
                *to_gpu(q, k, v))
            assert max_err(out, dense) == 0 and max_err(lse, dense_lse) == 0


def grads(fn, q, k, v, q_ids, kv_ids, dout, **kw):
    """(dq, dk, dv) of sum(out * dout) + sum(finite lse) through fn (flash_attention's signature
    or segment_reference's)."""
    def loss(q, k, v):
        o, l = fn(q, k, v, q_ids, kv_ids, **kw)
        return (jnp.sum(o.astype(jnp.float32) * dout)
                + jnp.sum(jnp.where(jnp.isneginf(l), 0.0, l)))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def kernel_fn(q, k, v, q_ids, kv_ids, **kw):
    return fa3_jax.flash_attention(q, k, v, q_segment_ids=q_ids, kv_segment_ids=kv_ids,
                                   return_lse=True, **kw)


def check_grads(q, k, v, q_ids, kv_ids, deterministic=False, **kw):
    """dq, dk, dv within twice the error of the reference in q's dtype (plus 2 ATOL); padding
    tokens (id 0) get exactly zero gradients."""
    q, k, v, q_ids, kv_ids = to_gpu(q, k, v, q_ids, kv_ids)
    dout = jax.random.normal(fresh_key(), q.shape[:3] + v.shape[3:], jnp.float32)
    got = grads(kernel_fn, q, k, v, q_ids, kv_ids, dout, deterministic=deterministic, **kw)
    want = grads(segment_reference, *(x.astype(jnp.float32) for x in (q, k, v)), q_ids, kv_ids,
                 dout, **kw)
    low = grads(segment_reference, q, k, v, q_ids, kv_ids, dout, **kw)
    for name, g, w, lo, ids in zip(("dq", "dk", "dv"), got, want, low, (q_ids, kv_ids, kv_ids)):
        assert not np.isnan(np.asarray(g, np.float32)).any(), name
        err, base = max_err(g, w), max_err(lo, w)
        assert err <= 2 * base + 2 * ATOL[jnp.dtype(q.dtype)], (name, err, base)
        assert not np.asarray(g, np.float32)[np.asarray(ids) == 0].any(), name
    return got


@pytest.mark.parametrize("kw", ["full", "causal", "window", "softcap_causal"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (4, 1)])
def test_gradients_packed_documents(kw, hq, hkv):
    s = 1400
    ids = doc_ids(2, s, DOCS[:2])
    for d in gpu_head_dims():
        q, k, v = make_qkv(2, s, s, hq, hkv, d, dtype=jnp.bfloat16)
        check_grads(q, k, v, ids, ids, **KW[kw])


@pytest.mark.parametrize("kw", ["causal", "full"])
def test_gradients_seqlen_q_ne_k_and_interleaved(kw):
    d = gpu_head_dims()[-1]
    q, k, v = make_qkv(2, 300, 1129, 8, 2, d, dtype=jnp.float16)
    q_ids = packed_ids(2, 300, [[100, 195], [1, 299]])
    kv_ids = packed_ids(2, 1129, [[564, 565], [282, 838]])
    check_grads(q, k, v, q_ids, kv_ids, **KW[kw])
    rng = np.random.default_rng(1)
    q_ids = jnp.asarray(rng.integers(0, 4, (2, 300)), jnp.int32)
    kv_ids = jnp.asarray(rng.integers(0, 4, (2, 1129)), jnp.int32)
    check_grads(q, k, v, q_ids, kv_ids, **KW[kw])


@pytest.mark.parametrize("kw", ["causal", "window"])
def test_gradients_deterministic(kw):
    """deterministic=True: bit-identical gradients on a second run, and correct."""
    s = 1400
    ids = doc_ids(2, s, DOCS[:2])
    q, k, v = make_qkv(2, s, s, 8, 2, gpu_head_dims()[0], dtype=jnp.bfloat16)
    first = check_grads(q, k, v, ids, ids, deterministic=True, **KW[kw])
    dout = jax.random.normal(fresh_key(), q.shape, jnp.float32)
    a = grads(kernel_fn, *to_gpu(q, k, v, ids, ids), dout, deterministic=True, **KW[kw])
    b = grads(kernel_fn, *to_gpu(q, k, v, ids, ids), dout, deterministic=True, **KW[kw])
    assert len(first) == 3
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize("kw", [dict(is_causal=True), dict(local_window_size=(30, 2)),
                                dict(is_causal=True, local_window_size=(12, 0))],
                         ids=["causal", "window", "causal_window"])
def test_dot_product_attention_seq_lengths_with_band(kw):
    """The drop-in's seq lengths with jax.nn's top-left band run as segment ids on the Hopper
    kernels (seqlen_q != seqlen_k): no fallback warning, jax.nn's values and gradients. Every
    valid query row sees a key (jax.nn averages v over rows that see none; fa3_jax gives 0)."""
    d = gpu_head_dims()[0]
    q, k, v = make_qkv(3, 140, 150, 4, 2, d, dtype=jnp.bfloat16)
    dout = jax.random.normal(fresh_key(), (3, 140, 4, d))
    check_drop_in_seq_lengths(*to_gpu(q, k, v), dout, **kw)

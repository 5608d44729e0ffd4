"""flash_attention with q_segment_ids / kv_segment_ids, and dot_product_attention's sequence
lengths, against float32 references (a masked dense one, and attention_reference per segment)."""

import re
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import fa3_jax
from util import fresh_key, make_qkv, max_err, packed_ids, segment_reference


def run(q, k, v, q_ids, kv_ids, **kw):
    return fa3_jax.flash_attention(q, k, v, q_segment_ids=q_ids, kv_segment_ids=kv_ids,
                                   return_lse=True, **kw)


ROWS = [[7, 113, 1, 30], [64, 64, 64], [200]]  # the last row: one segment, 56 padding tokens


@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(window_size=(16, 3)),
                                dict(causal=True, softcap=15.0)],
                         ids=["full", "causal", "window", "causal_softcap"])
def test_forward_and_backward(kw):
    q, k, v = make_qkv(3, 256, 256, 4, 2, 32)
    ids = packed_ids(3, 256, ROWS)
    out, lse = run(q, k, v, ids, ids, **kw)
    ref, ref_lse = jax.jit(partial(segment_reference, **kw))(q, k, v, ids, ids)
    assert max_err(out, ref) <= 2e-5 and max_err(lse, ref_lse) <= 1e-4
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(np.asarray(ref_lse)))
    pad = np.asarray(ids) == 0
    assert not np.asarray(out)[pad].any() and np.isneginf(np.asarray(lse).transpose(0, 2, 1)[pad]).all()

    dout = jax.random.normal(fresh_key(), out.shape)

    def loss(fn, q, k, v):
        o, l = fn(q, k, v, ids, ids, **kw)
        return jnp.sum(o * dout) + jnp.sum(jnp.where(jnp.isneginf(l), 0.0, l))

    got = jax.jit(jax.grad(partial(loss, run), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(partial(loss, segment_reference), argnums=(0, 1, 2)))(q, k, v)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert max_err(g, w) <= 1e-4, (name, max_err(g, w))
        assert not np.asarray(g)[pad].any(), name  # padding tokens: zero gradients


def test_self_attention_matches_attention_reference_per_segment():
    """Packed causal self-attention equals attention_reference on each document alone."""
    q, k, v = make_qkv(1, 160, 160, 2, 1, 16)
    lengths = [1, 7, 113, 39]
    ids = packed_ids(1, 160, [lengths])
    out = fa3_jax.flash_attention(q, k, v, causal=True, q_segment_ids=ids, kv_segment_ids=ids)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        ref = fa3_jax.attention_reference(q[:, sl], k[:, sl], v[:, sl], causal=True)
        assert max_err(out[:, sl], ref) <= 2e-5
        start += n


def test_seqlen_q_ne_k_gqa_bf16():
    q, k, v = make_qkv(2, 70, 129, 8, 2, 64, dtype=jnp.bfloat16)
    q_ids = packed_ids(2, 70, [[30, 40], [1, 60]])
    kv_ids = packed_ids(2, 129, [[50, 79], [10, 100]])
    out, lse = run(q, k, v, q_ids, kv_ids, causal=True)
    ref, ref_lse = segment_reference(*(x.astype(jnp.float32) for x in (q, k, v)), q_ids, kv_ids,
                                     causal=True)
    assert max_err(out, ref) <= 2e-2 and max_err(lse, ref_lse) <= 1e-3


def test_jit_and_vmap():
    q, k, v = make_qkv(4, 48, 48, 2, 2, 16)
    ids = packed_ids(4, 48, [[10, 38], [48], [1, 1, 5], [20, 20]])
    f = jax.jit(lambda *a: run(*a, causal=True))
    out, lse = f(q, k, v, ids, ids)
    eager = run(q, k, v, ids, ids, causal=True)
    assert max_err(out, eager[0]) == 0 and max_err(lse, eager[1]) == 0
    vout, vlse = jax.vmap(lambda *a: run(*(x[None] for x in a), causal=True))(q, k, v, ids, ids)
    assert max_err(vout[:, 0], out) == 0 and max_err(vlse[:, 0], lse) == 0


@pytest.mark.parametrize("kw,exc,pattern", [
    (dict(q_segment_ids=jnp.ones((2, 8), jnp.int32)), ValueError, r"kv_segment_ids is None"),
    (dict(q_segment_ids=jnp.ones((2, 8)), kv_segment_ids=jnp.ones((2, 8), jnp.int32)),
     TypeError, r"q_segment_ids must be int32 .*float32"),
    (dict(q_segment_ids=jnp.ones((2, 8), jnp.int32), kv_segment_ids=jnp.ones((2, 7), jnp.int32)),
     ValueError, r"kv_segment_ids must have shape \[batch, seqlen of k\] = \(2, 8\), got \(2, 7\)"),
])
def test_errors(kw, exc, pattern):
    q, k, v = make_qkv(2, 8, 8, 2, 2, 16)
    with pytest.raises(exc, match=pattern):
        fa3_jax.flash_attention(q, k, v, **kw)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices")
@pytest.mark.parametrize("hq,hkv", [(8, 4), (4, 4)])
def test_batch_and_head_sharding(hq, hkv):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    q, k, v = make_qkv(4, 64, 64, hq, hkv, 32)
    ids = packed_ids(4, 64, [[10, 54], [64], [3, 3, 3], [30, 30]])
    spec = NamedSharding(mesh, P("data", None, "model", None))
    id_spec = NamedSharding(mesh, P("data", None))
    qs, ks, vs = (jax.device_put(x, spec) for x in (q, k, v))
    ids_s = jax.device_put(ids, id_spec)

    def loss(q, k, v, ids):
        return jnp.sum(run(q, k, v, ids, ids, causal=True)[0] ** 2)

    fwd = jax.jit(lambda *a: run(*a, a[-1], causal=True))
    out, lse = fwd(qs, ks, vs, ids_s)
    ref_out, ref_lse = run(q, k, v, ids, ids, causal=True)
    assert max_err(out, ref_out) == 0 and max_err(lse, ref_lse) == 0
    assert out.sharding.is_equivalent_to(spec, 4)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    for g, r in zip(grad(qs, ks, vs, ids_s), jax.grad(loss, argnums=(0, 1, 2))(q, k, v, ids)):
        assert max_err(g, r) == 0 and g.sharding.is_equivalent_to(spec, 4)
    for f in (fwd, grad):
        text = f.lower(qs, ks, vs, ids_s).compile().as_text()
        assert not re.findall(r"\ball-gather(?:-start)?\(", text)


# ---- dot_product_attention: query_seq_lengths / key_value_seq_lengths on the kernels ----------

# Every valid query row sees a key here (jax.nn averages v over rows that see none; we give 0).
@pytest.mark.parametrize("kw", [dict(), dict(is_causal=True), dict(local_window_size=(30, 2))],
                         ids=["full", "causal", "window"])
@pytest.mark.parametrize("which", ["both", "q", "kv"])
def test_dot_product_attention_seq_lengths(kw, which):
    q, k, v = make_qkv(3, 40, 50, 4, 2, 32)
    lengths = dict(query_seq_lengths=jnp.array([40, 17, 1], jnp.int32),
                   key_value_seq_lengths=jnp.array([50, 20, 33], jnp.int32))
    if which == "q":
        lengths.pop("key_value_seq_lengths")
    elif which == "kv":
        lengths.pop("query_seq_lengths")
    f = partial(fa3_jax.dot_product_attention, **kw, **lengths)
    ref = partial(jax.nn.dot_product_attention, implementation="xla", **kw, **lengths)
    text = str(jax.make_jaxpr(f)(q, k, v))
    assert "fa3_fwd_packed" in text  # served by the kernels
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        out = f(q, k, v)
    assert max_err(out, ref(q, k, v)) <= 2e-5
    dout = jax.random.normal(fresh_key(), out.shape)
    g = jax.grad(lambda *a: jnp.sum(f(*a) * dout), (0, 1, 2))(q, k, v)
    r = jax.grad(lambda *a: jnp.sum(ref(*a) * dout), (0, 1, 2))(q, k, v)
    for name, a, b in zip(("dq", "dk", "dv"), g, r):
        assert max_err(a, b) <= 1e-4, (name, max_err(a, b))


def test_dot_product_attention_seq_length_errors():
    q, k, v = make_qkv(2, 8, 8, 2, 2, 16)
    with pytest.raises(ValueError, match="query_seq_lengths dtype should be int32"):
        fa3_jax.dot_product_attention(q, k, v, query_seq_lengths=jnp.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"key_value_seq_lengths shape should be \[2\]"):
        fa3_jax.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.array([1], jnp.int32))

"""flash_attention_varlen against fa3_jax.attention_reference run on each sequence (float32)."""

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import fa3_jax
from fa3_jax.varlen import cu_seqlens_from_lengths
from util import ATOL, fresh_key, max_err


def safe_cu(cu, total):
    """The documented policy for bad cu_seqlens: clamp to [0, total], then running maximum."""
    return np.maximum.accumulate(np.clip(np.asarray(cu, np.int64), 0, total))


def varlen_reference(q, k, v, cu_q, cu_k, **kw):
    """attention_reference on each sequence (those of equal lengths batched together, under one
    jit); rows outside every sequence: out 0, lse -inf."""
    cq, ck = safe_cu(cu_q, q.shape[0]), safe_cu(cu_k, k.shape[0])
    groups = {}
    for s in range(len(cq) - 1):
        q0, q1, k0, k1 = int(cq[s]), int(cq[s + 1]), int(ck[s]), int(ck[s + 1])
        if q1 > q0 and k1 > k0:  # else no rows, or rows that see no key
            groups.setdefault((q1 - q0, k1 - k0), []).append((q0, k0))

    @jax.jit
    def ref(q, k, v):
        out = jnp.zeros(q.shape[:2] + v.shape[2:], jnp.float32)
        lse = jnp.full((q.shape[1], q.shape[0]), -jnp.inf, jnp.float32)
        for (lq, lk), starts in groups.items():
            qs = jnp.stack([q[q0:q0 + lq] for q0, _ in starts])
            ks = jnp.stack([k[k0:k0 + lk] for _, k0 in starts])
            vs = jnp.stack([v[k0:k0 + lk] for _, k0 in starts])
            o, l = fa3_jax.attention_reference(qs, ks, vs, return_lse=True, **kw)
            for n, (q0, _) in enumerate(starts):
                out = out.at[q0:q0 + lq].set(o[n].astype(jnp.float32))
                lse = lse.at[:, q0:q0 + lq].set(l[n])
        return out, lse

    return ref(q, k, v)


def make(lens_q, lens_k, hq, hkv, d, dv=None, pad_q=0, pad_k=0, dtype=jnp.float32):
    """Packed q/k/v with `pad_*` tokens after the last sequence, and their cu_seqlens."""
    dv = d if dv is None else dv
    cq, ck = cu_seqlens_from_lengths(lens_q), cu_seqlens_from_lengths(lens_k)
    tq, tk = sum(lens_q) + pad_q, sum(lens_k) + pad_k
    kq, kk, kv = jax.random.split(fresh_key(), 3)
    q = jax.random.normal(kq, (tq, hq, d)).astype(dtype)
    k = jax.random.normal(kk, (tk, hkv, d)).astype(dtype)
    v = jax.random.normal(kv, (tk, hkv, dv)).astype(dtype)
    return q, k, v, cq, ck


def run(q, k, v, cq, ck, **kw):
    # The longest sequence is at most the token count; the CPU backend reads the true lengths.
    return fa3_jax.flash_attention_varlen(q, k, v, cq, ck, max_seqlen_q=q.shape[0],
                                          max_seqlen_k=k.shape[0], return_lse=True, **kw)


def check(q, k, v, cq, ck, atol=None, **kw):
    out, lse = run(q, k, v, cq, ck, **kw)
    ref, ref_lse = varlen_reference(*(x.astype(jnp.float32) for x in (q, k, v)), cq, ck, **kw)
    assert out.shape == (q.shape[0], q.shape[1], v.shape[2]) and out.dtype == q.dtype
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == jnp.float32
    tol = ATOL[jnp.dtype(q.dtype)] if atol is None else atol
    assert max_err(out, ref) <= tol, max_err(out, ref)
    assert max_err(lse, ref_lse) <= 1e-4, max_err(lse, ref_lse)
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(np.asarray(ref_lse)))
    return out, lse


ODD = [0, 1, 7, 113, 1000]
SHAPES = {
    "odd": (ODD, ODD),
    "many_short": ([3, 1, 17, 65, 9] * 6,) * 2,  # few distinct lengths: a quick reference
    "one_long": ([777], [777]),
    "q_ne_k": ([5, 64, 1, 30, 0, 70], [9, 40, 17, 0, 3, 129]),
}


KW = {"full": dict(), "causal": dict(causal=True), "window": dict(window_size=(16, 0)),
      "window2_softcap": dict(window_size=(5, 9), softcap=20.0)}


@pytest.mark.parametrize("shape,kw", [(s, k) for s in ("odd", "q_ne_k") for k in KW] + [
    ("many_short", "causal"), ("many_short", "window2_softcap"), ("one_long", "full"),
    ("one_long", "window")])
def test_forward(shape, kw):
    kw = KW[kw]
    lens_q, lens_k = SHAPES[shape]
    q, k, v, cq, ck = make(lens_q, lens_k, 4, 2, 32, 24, pad_q=3, pad_k=2)
    out, lse = check(q, k, v, cq, ck, **kw)
    # Tokens past cu_seqlens_q[-1]: out 0, lse -inf.
    assert not np.asarray(out[-3:]).any() and np.isneginf(np.asarray(lse[:, -3:])).all()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_forward_low_precision_mqa(dtype):
    q, k, v, cq, ck = make([33, 0, 129, 1], [40, 5, 100, 1], 4, 1, 64, dtype=dtype)
    check(q, k, v, cq, ck, causal=True, atol=2e-2)


def _grads(fn, q, k, v, dout, dlse):
    def loss(q, k, v):
        out, lse = fn(q, k, v)
        lse = jnp.where(jnp.isneginf(lse), 0.0, lse)
        return jnp.sum(out.astype(jnp.float32) * dout) + jnp.sum(lse * dlse)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("shape,kw", [
    ("odd", dict(causal=True)),
    ("q_ne_k", dict(window_size=(7, 3))),
    ("many_short", dict(softcap=10.0)),
])
def test_backward(shape, kw):
    lens_q, lens_k = SHAPES[shape] if shape != "many_short" else ([3, 1, 17, 65, 9] * 2,) * 2
    q, k, v, cq, ck = make(lens_q, lens_k, 4, 2, 32, pad_q=2, pad_k=4)
    dout = jax.random.normal(fresh_key(), q.shape[:2] + v.shape[2:])
    dlse = jax.random.normal(fresh_key(), (q.shape[1], q.shape[0]))
    got = jax.jit(partial(_grads, lambda *a: run(*a, cq, ck, **kw)))(q, k, v, dout, dlse)
    ref = jax.jit(partial(_grads, lambda *a: varlen_reference(*a, cq, ck, **kw)))(q, k, v, dout,
                                                                                dlse)
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        assert max_err(g, r) <= 1e-4, (name, max_err(g, r))
    # Rows outside every sequence get zero gradients.
    assert not np.asarray(got[0][-2:]).any()
    assert not np.asarray(got[1][-4:]).any() and not np.asarray(got[2][-4:]).any()


def test_jit_traced_cu_seqlens_and_vmap():
    lens = [[5, 0, 20, 7], [1, 30, 0, 1], [32, 0, 0, 0]]
    qs, ks, vs, cqs, cks = zip(*(make(x, x, 2, 2, 16, pad_q=32 - sum(x), pad_k=32 - sum(x))
                                 for x in lens))
    q, k, v, cq, ck = (jnp.stack(x) for x in (qs, ks, vs, cqs, cks))
    f = jax.jit(lambda q, k, v, cq, ck: fa3_jax.flash_attention_varlen(
        q, k, v, cq, ck, max_seqlen_q=32, max_seqlen_k=32, causal=True, return_lse=True))
    # One compilation serves every cu_seqlens (they are traced device arrays).
    for i in range(3):
        out, lse = f(q[i], k[i], v[i], cq[i], ck[i])
        ref, ref_lse = varlen_reference(q[i], k[i], v[i], cq[i], ck[i], causal=True)
        assert max_err(out, ref) <= 2e-5 and max_err(lse, ref_lse) <= 1e-4
    assert f._cache_size() == 1
    out, lse = jax.vmap(f)(q, k, v, cq, ck)
    for i in range(3):
        o, l = f(q[i], k[i], v[i], cq[i], ck[i])
        assert max_err(out[i], o) == 0 and max_err(lse[i], l) == 0


@pytest.mark.parametrize("cu_q,cu_k", [
    ([0, 10, 5, 20], [0, 10, 5, 20]),                      # non-monotonic
    ([-5, 3, -1, 12], [-100, 2, 9, 2]),                    # negative entries / lengths
    ([0, 5, 1 << 30, 2 ** 31 - 1], [3, 2 ** 31 - 1, 0, 7]),  # far past the end
    ([-(2 ** 31), 0, 40, 40], [0, 0, 0, 0]),               # int32 min; every key empty
])
def test_bad_cu_seqlens_stay_in_bounds(cu_q, cu_k):
    """Never reads or writes out of bounds: entries are clamped to [0, total] and raised to the
    running maximum (documented in flash_attention_varlen and cpp/flash.h)."""
    q, k, v, _, _ = make([40], [30], 2, 1, 16)
    cq, ck = jnp.array(cu_q, jnp.int32), jnp.array(cu_k, jnp.int32)
    f = partial(fa3_jax.flash_attention_varlen, max_seqlen_q=40, max_seqlen_k=30, causal=True,
                return_lse=True)
    out, lse = f(q, k, v, cq, ck)
    ref, ref_lse = varlen_reference(q, k, v, cu_q, cu_k, causal=True)
    assert max_err(out, ref) <= 2e-5 and max_err(lse, ref_lse) <= 1e-4
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v, cq, ck)[0] ** 2),
                             (0, 1, 2)))(q, k, v)
    ref_grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(varlen_reference(
        q, k, v, cu_q, cu_k, causal=True)[0] ** 2), (0, 1, 2)))(q, k, v)
    for g, r in zip(grads, ref_grads):
        assert np.isfinite(np.asarray(g)).all() and max_err(g, r) <= 1e-4


def _qkv3():
    q, k, v, cq, ck = make([3, 5], [3, 5], 4, 2, 16)
    return q, k, v, cq, ck


@pytest.mark.parametrize("mutate,exc,pattern", [
    (lambda q, k, v, cq, ck: (q[None], k, v, cq, ck), ValueError, r"q must have rank 3"),
    (lambda q, k, v, cq, ck: (q, k, v, cq.astype(jnp.float32), ck), TypeError,
     r"cu_seqlens_q must be int32 .*float32"),
    (lambda q, k, v, cq, ck: (q, k, v, cq, ck[None]), ValueError,
     r"cu_seqlens_k must have rank 1.*\(1, 3\)"),
    (lambda q, k, v, cq, ck: (q, k, v, cq[:1], ck[:1]), ValueError, r"num_seqs >= 1"),
    (lambda q, k, v, cq, ck: (q, k, v, cq, ck[:2]), ValueError,
     r"cu_seqlens_q and cu_seqlens_k must both be \[num_seqs \+ 1\].*\(3,\) and \(2,\)"),
    (lambda q, k, v, cq, ck: (q, k[:, :, :8], v, cq, ck), ValueError, r"share head_dim"),
    (lambda q, k, v, cq, ck: (q, k, v, "a", ck), TypeError, r"cu_seqlens_q must be an int32"),
])
def test_argument_errors(mutate, exc, pattern):
    args = mutate(*_qkv3())
    with pytest.raises(exc, match=pattern):
        fa3_jax.flash_attention_varlen(*args, max_seqlen_q=5, max_seqlen_k=5)


@pytest.mark.parametrize("kw,pattern", [
    (dict(max_seqlen_q=0, max_seqlen_k=5), r"max_seqlen_q must be an int >= 1, got 0"),
    (dict(max_seqlen_q=5, max_seqlen_k=2.5), r"max_seqlen_k must be an int >= 1"),
])
def test_max_seqlen_errors(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        fa3_jax.flash_attention_varlen(*_qkv3(), **kw)


def test_cuda_lowering_raises_clearly():
    """Head dim 16 has no Hopper kernel (and a CPU-only build none at all): a clear error when
    lowered for CUDA, naming the call."""
    q, k, v, cq, ck = _qkv3()
    f = jax.jit(lambda q, k, v, cq, ck: fa3_jax.flash_attention_varlen(
        q, k, v, cq, ck, max_seqlen_q=5, max_seqlen_k=5))
    with pytest.raises(ValueError, match=r"variable-length attention forward on a CUDA device: "):
        f.trace(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), cq,
                ck).lower(lowering_platforms=("cuda",))


def test_ffi_handler_rejects_bad_metadata_shape():
    from fa3_jax import _primitives
    q, k, v, cq, ck = _qkv3()
    with pytest.raises(Exception, match=r"fa3_jax: cu_seqlens_k has shape \[1, 2\]"):
        jax.jit(lambda q, k, v, a, b: _primitives._packed_fwd_local(
            q, k, v, a, b, "varlen", 1.0, 0.0, -10, 10, 5, 5))(q[None], k[None], v[None],
                                                               cq[None], ck[None, :2])


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices")
def test_head_sharding_stays_local():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    q, k, v, cq, ck = make([3, 100, 0, 17, 64], [3, 90, 5, 17, 64], 8, 4, 32, pad_q=4)
    spec = NamedSharding(mesh, P(None, "model", None))
    qs, ks, vs = (jax.device_put(x, spec) for x in (q, k, v))

    def loss(q, k, v, cq, ck):
        out, lse = run(q, k, v, cq, ck, causal=True)
        return jnp.sum(out ** 2) + jnp.sum(jnp.where(jnp.isneginf(lse), 0.0, lse))

    fwd = jax.jit(partial(run, causal=True))
    out, lse = fwd(qs, ks, vs, cq, ck)
    ref_out, ref_lse = run(q, k, v, cq, ck, causal=True)
    assert max_err(out, ref_out) == 0 and max_err(lse, ref_lse) == 0
    assert out.sharding.is_equivalent_to(spec, 3)
    assert lse.sharding.is_equivalent_to(NamedSharding(mesh, P("model", None)), 2)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    for g, r in zip(grad(qs, ks, vs, cq, ck), jax.grad(loss, argnums=(0, 1, 2))(q, k, v, cq, ck)):
        assert max_err(g, r) == 0 and g.sharding.is_equivalent_to(spec, 3)
    for f in (fwd, grad):
        text = f.lower(qs, ks, vs, cq, ck).compile().as_text()
        assert not re.findall(r"\ball-gather(?:-start)?\(", text)


@pytest.mark.parametrize("strategy", ["ring", "all_gather"])
@pytest.mark.parametrize("case", ["causal", "window_softcap", "q_ne_k_full"])
def test_context_parallel_strategies_on_one_device(strategy, case):
    """context_parallel="ring"/"all_gather" runs as segment ids built from the cu_seqlens: on one
    device the same out, lse and gradients as the varlen kernels and the per-sequence reference,
    empty sequences and tokens past the last sequence included."""
    if case == "q_ne_k_full":  # no band: any cu_seqlens pair
        q, k, v, cq, ck = make([5, 0, 30, 1, 7], [9, 3, 0, 40, 2], 4, 2, 32, pad_q=3, pad_k=5)
        kw = {}
    else:
        q, k, v, cq, _ = make([1, 7, 0, 113, 20], [1, 7, 0, 113, 20], 4, 2, 32, pad_q=4, pad_k=4)
        ck = cq  # the same array: self-attention, whole-axis positions match
        kw = dict(causal=True) if case == "causal" else dict(window_size=(9, 2), softcap=15.0)
    out, lse = run(q, k, v, cq, ck, context_parallel=strategy, **kw)
    ref, ref_lse = varlen_reference(q, k, v, cq, ck, **kw)
    assert max_err(out, ref) <= 2e-5 and max_err(lse, ref_lse) <= 1e-4
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(np.asarray(ref_lse)))
    dout = jax.random.normal(fresh_key(), q.shape[:2] + v.shape[2:])
    dlse = jax.random.normal(fresh_key(), (q.shape[1], q.shape[0]))
    got = jax.jit(partial(_grads, lambda *a: run(*a, cq, ck, context_parallel=strategy, **kw)))(
        q, k, v, dout, dlse)
    want = jax.jit(partial(_grads, lambda *a: run(*a, cq, ck, **kw)))(q, k, v, dout, dlse)
    for name, g, r in zip(("dq", "dk", "dv"), got, want):
        assert max_err(g, r) <= 1e-4, (name, max_err(g, r))


def test_segment_ids_from_bad_cu_seqlens():
    """The ids follow the kernels' clamping: entries clamped to [0, total], then running max."""
    from fa3_jax.varlen import segment_ids_from_cu_seqlens
    for cu, total in (([0, 3, 3, 7], 9), ([-5, 3, -1, 12], 10), ([2, 5, 1 << 30, 2 ** 31 - 1], 8)):
        got = np.asarray(segment_ids_from_cu_seqlens(jnp.array(cu, jnp.int32), total))
        c = safe_cu(cu, total)
        want = np.zeros(total, np.int32)
        for s in range(len(c) - 1):
            want[c[s]:c[s + 1]] = s + 1
        np.testing.assert_array_equal(got, want)


def test_context_parallel_argument_errors():
    q, k, v, cq, ck = _qkv3()
    with pytest.raises(ValueError, match=r"context_parallel must be one of"):
        run(q, k, v, cq, cq, context_parallel="rings")
    # causal needs one and the same cu_seqlens array (and equal totals) for a whole-axis band.
    with pytest.raises(ValueError, match=r"pass the same array as cu_seqlens_q and cu_seqlens_k"
                                         r".*got different arrays, totals 8 and 8"):
        run(q, k, v, cq, ck, causal=True, context_parallel="ring")
    with pytest.raises(ValueError, match=r"got the same arrays, totals 8 and 6"):
        run(q, k[:6], v[:6], cq, cq, window_size=(2, 0), context_parallel="all_gather")

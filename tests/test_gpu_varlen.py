"""flash_attention_varlen on the Hopper kernels against a per-sequence float32 reference
(skipped without a Hopper GPU and a CUDA build)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3_jax
from test_varlen import make, safe_cu, varlen_reference
from util import ATOL, check_drop_in_seq_lengths, gpu_head_dims, max_err, to_gpu

pytestmark = pytest.mark.gpu


def check(q, k, v, cq, ck, max_seqlen_q=None, max_seqlen_k=None, **kw):
    """Kernel error within twice that of the same reference run in q's dtype (plus ATOL); lse
    against the float32 reference; rows outside every sequence exactly 0 / -inf."""
    cq_np, ck_np = np.asarray(cq), np.asarray(ck)
    if max_seqlen_q is None:  # the true longest sequence, after the documented clamping
        max_seqlen_q = max(int(np.diff(safe_cu(cq_np, q.shape[0])).max()), 1)
        max_seqlen_k = max(int(np.diff(safe_cu(ck_np, k.shape[0])).max()), 1)
    q, k, v, cq, ck = to_gpu(q, k, v, cq, ck)
    out, lse = jax.jit(lambda *a: fa3_jax.flash_attention_varlen(
        *a, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, return_lse=True, **kw))(
            q, k, v, cq, ck)
    ref, ref_lse = varlen_reference(*(x.astype(jnp.float32) for x in (q, k, v)), cq_np, ck_np,
                                    **kw)
    low, _ = varlen_reference(q, k, v, cq_np, ck_np, **kw)
    base = max_err(low, ref)
    err = max_err(out, ref)
    assert err <= 2 * base + ATOL[jnp.dtype(q.dtype)], (err, base)
    assert max_err(lse, ref_lse) <= 2e-3, max_err(lse, ref_lse)
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(np.asarray(ref_lse)))
    covered = np.zeros(q.shape[0], bool)
    c = safe_cu(cq_np, q.shape[0])
    covered[c[0]:c[-1]] = True
    assert not np.asarray(out)[~covered].any()
    return out, lse


ODD = [0, 1, 7, 113, 1000]
SHORT = [0, 1, 3, 17, 40]
KW = {"full": dict(), "causal": dict(causal=True), "window": dict(window_size=(100, 37)),
      "softcap_causal": dict(causal=True, softcap=15.0)}


@pytest.mark.parametrize("kw", list(KW))
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (4, 1)])
def test_forward_odd_lengths(kw, hq, hkv):
    """Lengths 0, 1, 7, 113, 1000 with seqlen_q != seqlen_k per sequence, GQA / MQA, padding."""
    for d in gpu_head_dims():
        q, k, v, cq, ck = make(ODD + [300], [5, 0, 1000, 113, 7, 1], hq, hkv, d, pad_q=5,
                               pad_k=3, dtype=jnp.bfloat16)
        check(q * 2, k, v, cq, ck, **KW[kw])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_forward_many_short(dtype):
    # Few distinct lengths keep the per-length-pair reference small.
    rng = np.random.default_rng(0)
    lens_q = rng.choice(SHORT, 300).tolist()
    lens_k = rng.choice(SHORT, 300).tolist()
    q, k, v, cq, ck = make(lens_q, lens_k, 4, 2, gpu_head_dims()[-1], dtype=dtype)
    check(q, k, v, cq, ck, causal=True)
    check(q, k, v, cq, ck, window_size=(8, 8))


@pytest.mark.parametrize("kw", ["full", "causal"])
def test_forward_one_long(kw):
    q, k, v, cq, ck = make([4097], [3000], 2, 1, gpu_head_dims()[-1], pad_q=1, dtype=jnp.bfloat16)
    check(q, k, v, cq, ck, **KW[kw])


def test_forward_loose_max_seqlen():
    """A max_seqlen above the true maximum changes nothing: the grids number the blocks of the
    sequences (varlen_sm90.h), bounded by the tokens rather than num_seqs x max_seqlen."""
    q, k, v, cq, ck = make([130, 7, 260], [50, 300, 1], 4, 2, gpu_head_dims()[0], dtype=jnp.bfloat16)
    check(q, k, v, cq, ck, max_seqlen_q=q.shape[0], max_seqlen_k=k.shape[0], causal=True)
    rng = np.random.default_rng(2)  # two lengths a side keep the reference small
    lens_q = rng.choice([1, 129], 60).tolist() + [1000]
    lens_k = rng.choice([3, 128], 60).tolist() + [777]
    for d, kw in ((gpu_head_dims()[0], "full"), (gpu_head_dims()[-1], "causal")):
        q, k, v, cq, ck = make(lens_q, lens_k, 4, 2, d, pad_q=3, dtype=jnp.bfloat16)
        check(q, k, v, cq, ck, max_seqlen_q=q.shape[0], max_seqlen_k=k.shape[0], **KW[kw])


@pytest.mark.parametrize("cu_q,cu_k", [
    ([0, 300, 150, 700], [0, 300, 150, 700]),                     # non-monotonic
    ([-5, 3, -1, 612], [-100, 2, 409, 2]),                        # negative entries / lengths
    ([0, 5, 1 << 30, 2 ** 31 - 1], [3, 2 ** 31 - 1, 0, 7]),       # far past the end
    ([-(2 ** 31), 0, 400, 400], [0, 0, 0, 0]),                    # int32 min; every key empty
    ([10, 200, 390, 600], [20, 100, 200, 300]),                   # uncovered head and tail rows
])
def test_bad_cu_seqlens_stay_in_bounds(cu_q, cu_k):
    q, k, v, _, _ = make([640], [500], 4, 2, gpu_head_dims()[0], dtype=jnp.bfloat16)
    cq, ck = np.array(cu_q, np.int32), np.array(cu_k, np.int32)
    check(q, k, v, cq, ck, max_seqlen_q=640, max_seqlen_k=500, causal=True)


def test_vmap_batch_rows():
    """vmap folds into the kernels' batch axis: each batch row has its own cu_seqlens."""
    lens = [[5, 0, 200, 7], [1, 130, 0, 81], [212, 0, 0, 0]]
    d = gpu_head_dims()[0]
    made = [make(x, x[::-1], 4, 2, d, pad_q=212 - sum(x), pad_k=212 - sum(x),
                 dtype=jnp.bfloat16) for x in lens]
    q, k, v, cq, ck = (jnp.stack(x) for x in zip(*made))
    q, k, v, cq, ck = to_gpu(q, k, v, cq, ck)
    f = jax.jit(jax.vmap(lambda q, k, v, cq, ck: fa3_jax.flash_attention_varlen(
        q, k, v, cq, ck, max_seqlen_q=212, max_seqlen_k=212, causal=True, return_lse=True)))
    out, lse = f(q, k, v, cq, ck)
    for i in range(len(lens)):
        ref, ref_lse = varlen_reference(*(x[i].astype(jnp.float32) for x in (q, k, v)),
                                        np.asarray(cq[i]), np.asarray(ck[i]), causal=True)
        assert max_err(out[i], ref) <= 2e-2 and max_err(lse[i], ref_lse) <= 2e-3


def _grads(fn, q, k, v, dout, dlse):
    def loss(q, k, v):
        out, lse = fn(q, k, v)
        lse = jnp.where(jnp.isneginf(lse), 0.0, lse)
        return jnp.sum(out.astype(jnp.float32) * dout) + jnp.sum(lse * dlse)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def check_grads(q, k, v, cq, ck, deterministic=False, max_seqlen_q=None, max_seqlen_k=None,
                **kw):
    """dq, dk, dv (through out and lse) within twice the error of the same reference run in q's
    dtype (plus ATOL) of the float32 reference; rows outside every sequence exactly zero.
    max_seqlen_*: the true longest sequence unless given."""
    cq_np, ck_np = np.asarray(cq), np.asarray(ck)
    mq = max_seqlen_q or max(int(np.diff(safe_cu(cq_np, q.shape[0])).max()), 1)
    mk = max_seqlen_k or max(int(np.diff(safe_cu(ck_np, k.shape[0])).max()), 1)
    dout = jax.random.normal(jax.random.PRNGKey(7), q.shape[:2] + v.shape[2:])
    dlse = jax.random.normal(jax.random.PRNGKey(8), (q.shape[1], q.shape[0]))
    q, k, v, cq, ck, dout, dlse = to_gpu(q, k, v, cq, ck, dout, dlse)
    kernel = lambda q, k, v: fa3_jax.flash_attention_varlen(  # noqa: E731
        q, k, v, cq, ck, max_seqlen_q=mq, max_seqlen_k=mk, return_lse=True,
        deterministic=deterministic, **kw)
    got = jax.jit(lambda *a: _grads(kernel, *a))(q, k, v, dout, dlse)
    ref = jax.jit(lambda *a: _grads(lambda *b: varlen_reference(*b, cq_np, ck_np, **kw), *a))(
        *(x.astype(jnp.float32) for x in (q, k, v)), dout, dlse)
    low = jax.jit(lambda *a: _grads(lambda *b: varlen_reference(*b, cq_np, ck_np, **kw), *a))(
        q, k, v, dout, dlse)
    for name, g, r, l in zip(("dq", "dk", "dv"), got, ref, low):
        err, base = max_err(g, r), max_err(l, r)
        assert err <= 2 * base + ATOL[jnp.dtype(q.dtype)], (name, err, base)
    for g, cu in zip(got, (cq_np, ck_np, ck_np)):
        c = safe_cu(cu, g.shape[0])
        outside = np.ones(g.shape[0], bool)
        outside[c[0]:c[-1]] = False
        assert not np.asarray(g)[outside].any()
    return got


@pytest.mark.parametrize("kw", list(KW))
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_backward_odd_lengths(kw, hq, hkv):
    for d in gpu_head_dims():
        q, k, v, cq, ck = make(ODD + [300], [5, 0, 1000, 113, 7, 1], hq, hkv, d, pad_q=5,
                               pad_k=3, dtype=jnp.bfloat16)
        check_grads(q, k, v, cq, ck, **KW[kw])


def test_backward_many_short_and_one_long():
    rng = np.random.default_rng(1)
    lens_q, lens_k = rng.choice(SHORT, 200).tolist(), rng.choice(SHORT, 200).tolist()
    q, k, v, cq, ck = make(lens_q, lens_k, 4, 1, gpu_head_dims()[-1], dtype=jnp.bfloat16)
    check_grads(q, k, v, cq, ck, causal=True)
    q, k, v, cq, ck = make([2049], [3000], 2, 1, gpu_head_dims()[-1], pad_q=1, dtype=jnp.bfloat16)
    check_grads(q, k, v, cq, ck, window_size=(300, 0))


@pytest.mark.parametrize("kw", ["full", "causal"])
def test_backward_loose_max_seqlen(kw):
    """max_seqlen = the token count with many short sequences and a few long ones: every block
    of every sequence is covered (the numbered blocks of varlen_sm90.h), deterministic mode
    bit-identical."""
    rng = np.random.default_rng(3)  # two lengths a side keep the reference small
    lens_q = rng.choice([1, 129], 40).tolist() + [1000]
    lens_k = rng.choice([3, 128], 40).tolist() + [513]
    q, k, v, cq, ck = make(lens_q, lens_k, 4, 2, gpu_head_dims()[-1], pad_q=2, pad_k=5,
                           dtype=jnp.bfloat16)
    loose = dict(max_seqlen_q=q.shape[0], max_seqlen_k=k.shape[0], **KW[kw])
    a = check_grads(q, k, v, cq, ck, deterministic=True, **loose)
    dout = jax.random.normal(jax.random.PRNGKey(7), q.shape[:2] + v.shape[2:])
    dlse = jax.random.normal(jax.random.PRNGKey(8), (q.shape[1], q.shape[0]))
    args = to_gpu(q, k, v, dout, dlse)
    cq, ck = to_gpu(cq, ck)
    kernel = lambda q, k, v: fa3_jax.flash_attention_varlen(  # noqa: E731
        q, k, v, cq, ck, return_lse=True, deterministic=True, **loose)
    b = jax.jit(lambda *x: _grads(kernel, *x))(*args)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_backward_bad_cu_seqlens_and_deterministic():
    q, k, v, _, _ = make([640], [500], 4, 2, gpu_head_dims()[0], dtype=jnp.bfloat16)
    cq = np.array([10, 200, 150, 390, 600], np.int32)
    ck = np.array([-20, 100, 2 ** 31 - 1, 200, 300], np.int32)
    a = check_grads(q, k, v, cq, ck, causal=True, deterministic=True)
    b = check_grads(q, k, v, cq, ck, causal=True, deterministic=True)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_dot_product_attention_seq_lengths_on_the_kernels():
    """The drop-in's query/key_value_seq_lengths without a band run as varlen (one sequence per
    batch row) on the Hopper kernels: no fallback warning, jax.nn's values and gradients."""
    d = gpu_head_dims()[0]
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (3, 140, 4, d), jnp.bfloat16)
               for i in range(3))
    dout = jax.random.normal(jax.random.PRNGKey(5), (3, 140, 4, d))
    check_drop_in_seq_lengths(*to_gpu(q, k, v), dout)

"""flash_attention_with_kvcache against a float64 numpy reference on the gathered cache."""

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import fa3_jax

ODD = [0, 1, 7, 113, 1000]  # cache_seqlens of the five batch rows
CAPACITY = 1024              # tokens per row: room for 1000 + 7 new ones


# ---------------------------------------------------------------------------------------------
# The reference: the documented semantics written out in numpy, float64.
# ---------------------------------------------------------------------------------------------

def ref_append(k_cache, v_cache, lengths, k_new, v_new, page_table):
    """Caches after the append and the per-row start, with the documented clamping: start in
    [0, capacity - seqlen_new]; writes to a page outside [0, num_pages) are dropped."""
    kc, vc = np.array(k_cache), np.array(v_cache)
    n = 0 if k_new is None else k_new.shape[1]
    if page_table is None:
        capacity = kc.shape[1]
    else:
        pt = np.asarray(page_table)
        num_pages, page_size = kc.shape[:2]
        capacity = pt.shape[1] * page_size
    start = np.clip(np.asarray(lengths, np.int64), 0, capacity - n)
    for b in range(len(start)):
        for t in range(n):
            pos = start[b] + t
            if page_table is None:
                kc[b, pos], vc[b, pos] = k_new[b, t], v_new[b, t]
            else:
                page = pt[b, pos // page_size]
                if 0 <= page < num_pages:
                    kc[page, pos % page_size] = k_new[b, t]
                    vc[page, pos % page_size] = v_new[b, t]
    return kc, vc, start + n


def ref_view(cache, page_table):
    """The contiguous [batch, capacity, ...] view; pages outside [0, num_pages) read as zeros."""
    if page_table is None:
        return np.asarray(cache)
    pt = np.asarray(page_table)
    valid = (pt >= 0) & (pt < cache.shape[0])
    view = np.where(valid[:, :, None, None, None], cache[np.where(valid, pt, 0)], 0)
    return view.reshape((pt.shape[0], -1) + cache.shape[2:])


def ref_attention(q, k, v, total, *, causal=True, window_size=(-1, -1), softcap=0.0):
    """float64 attention of row b's queries against keys [0, total[b]), bottom-right aligned."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    b, sq, hq, d = q.shape
    g = hq // k.shape[2]
    out = np.zeros((b, sq, hq, v.shape[3]))
    lse = np.full((b, hq, sq), -np.inf)
    left, right = window_size
    if causal:
        right = 0 if right < 0 else min(right, 0)
    for r in range(b):
        length = int(total[r])
        kr = np.repeat(k[r, :length], g, axis=1)  # [L, hq, d]
        vr = np.repeat(v[r, :length], g, axis=1)
        s = np.einsum("qhd,khd->hqk", q[r], kr) / np.sqrt(d)
        if softcap > 0:
            s = softcap * np.tanh(s / softcap)
        rel = np.arange(length)[None, :] - np.arange(sq)[:, None] - (length - sq)
        mask = np.ones_like(rel, bool)
        if left >= 0:
            mask &= rel >= -left
        if right >= 0:
            mask &= rel <= right
        s = np.where(mask[None], s, -np.inf)
        m = s.max(axis=-1, keepdims=True) if length else np.full((hq, sq, 1), -np.inf)
        seen = np.isfinite(m[..., 0])
        p = np.exp(s - np.where(np.isfinite(m), m, 0))
        l = p.sum(-1)
        o = np.einsum("hqk,khd->qhd", p / np.where(l > 0, l, 1)[..., None], vr)
        out[r] = np.where(seen.T[..., None], o, 0)
        lse[r] = np.where(seen, np.log(np.where(l > 0, l, 1)) + np.where(seen, m[..., 0], 0),
                          -np.inf)
    return out, lse


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

_rng = np.random.default_rng(14)


def normal(shape, dtype=jnp.float32):
    """Fresh random values (numpy: no compilation per shape, as jax.random would need)."""
    return jnp.asarray(_rng.standard_normal(shape, np.float32), dtype)


def make_cache(lengths, hkv, d, dv, page_size=0, capacity=CAPACITY, spare_pages=3,
               dtype=jnp.float32):
    """Random caches (garbage past each length too) and, when paged, a shuffled page table
    over a pool with spare pages."""
    b = len(lengths)
    if not page_size:
        return normal((b, capacity, hkv, d), dtype), normal((b, capacity, hkv, dv), dtype), None
    pages = capacity // page_size
    num_pages = b * pages + spare_pages
    perm = np.random.default_rng(len(lengths) * page_size).permutation(num_pages)
    page_table = jnp.asarray(perm[:b * pages].reshape(b, pages), jnp.int32)
    return (normal((num_pages, page_size, hkv, d), dtype),
            normal((num_pages, page_size, hkv, dv), dtype), page_table)


@partial(jax.jit, static_argnames=("kw",))
def _call(q, k_cache, v_cache, lengths, k_new, v_new, page_table, kw):
    return fa3_jax.flash_attention_with_kvcache(q, k_cache, v_cache, lengths, k_new=k_new,
                                                v_new=v_new, page_table=page_table,
                                                return_lse=True, **dict(kw))


def check(lengths, *, hq=4, hkv=2, d=32, dv=24, sq=1, seqlen_new=1, page_size=0,
          dtype=jnp.float32, atol=2e-5, lse_atol=1e-4, capacity=CAPACITY, num_splits=0,
          row_rtol=0.0, **kw):
    """Runs one call and compares it with the float64 reference: |out - ref| <= atol + row_rtol *
    (the largest |ref| of its (row, head)), lse within lse_atol."""
    lengths = jnp.asarray(lengths, jnp.int32)
    b = lengths.shape[0]
    k_cache, v_cache, page_table = make_cache(lengths, hkv, d, dv, page_size, capacity=capacity,
                                              dtype=dtype)
    q = normal((b, sq, hq, d), dtype)
    k_new = normal((b, seqlen_new, hkv, d), dtype) if seqlen_new else None
    v_new = normal((b, seqlen_new, hkv, dv), dtype) if seqlen_new else None
    res = _call(q, k_cache, v_cache, lengths, k_new, v_new, page_table,
                tuple(sorted(dict(kw, num_splits=num_splits).items())))
    out, lse = res[:2]
    kc, vc, total = ref_append(k_cache, v_cache, lengths, k_new, v_new, page_table)
    if seqlen_new:
        assert len(res) == 4
        np.testing.assert_array_equal(np.asarray(res[2]), kc)
        np.testing.assert_array_equal(np.asarray(res[3]), vc)
    ref, ref_lse = ref_attention(q, ref_view(kc, page_table), ref_view(vc, page_table), total,
                                 **kw)
    assert out.shape == (b, sq, hq, dv) and out.dtype == dtype
    assert lse.shape == (b, hq, sq) and lse.dtype == jnp.float32
    out, lse = np.asarray(jnp.asarray(out, jnp.float32)), np.asarray(lse)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    tol = atol + row_rtol * np.max(np.abs(ref), axis=-1, keepdims=True)
    assert np.all(np.abs(out - ref) <= tol), np.max(np.abs(out - ref) - tol)
    fin = np.isfinite(ref_lse)
    assert np.max(np.abs(lse[fin] - ref_lse[fin]), initial=0) <= lse_atol
    return out, lse


# ---------------------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------------------

KW = {"causal": dict(), "full": dict(causal=False), "window": dict(window_size=(16, 0)),
      "window_softcap": dict(causal=False, window_size=(9, 2), softcap=15.0)}


@pytest.mark.parametrize("sq,seqlen_new,heads,kw", [
    (1, 1, (4, 4), "causal"),
    (1, 7, (4, 2), "causal"),
    (4, 0, (4, 1), "causal"),
    (4, 7, (4, 1), "window"),
    (1, 0, (4, 2), "full"),
    (4, 1, (8, 2), "window_softcap"),
])
def test_contiguous(sq, seqlen_new, heads, kw):
    check(ODD, hq=heads[0], hkv=heads[1], sq=sq, seqlen_new=seqlen_new, **KW[kw])


@pytest.mark.parametrize("page_size,sq,seqlen_new,kw", [
    (16, 1, 1, "causal"),
    (16, 4, 7, "window_softcap"),
    (64, 4, 7, "causal"),
    (64, 1, 0, "window"),
    (256, 1, 7, "full"),
    (256, 4, 1, "causal"),
    (8, 1, 1, "causal"),     # no multiple of 16: the gathered view
    (24, 4, 7, "window"),
])
def test_paged(page_size, sq, seqlen_new, kw):
    check(ODD, page_size=page_size, sq=sq, seqlen_new=seqlen_new, **KW[kw])


def test_low_precision_gqa():
    check(ODD, hq=8, hkv=2, d=64, dv=64, sq=4, seqlen_new=7, dtype=jnp.bfloat16, atol=2e-2,
          lse_atol=2e-2)
    check(ODD, hq=4, hkv=1, d=64, dv=64, sq=1, seqlen_new=1, page_size=64, dtype=jnp.float16,
          atol=3e-3, lse_atol=3e-3)


def test_empty_caches():
    """No visible key: out 0, lse -inf, no NaN (all-empty cache; causal rows before the first
    key when seqlen_q > cache_seqlens + seqlen_new)."""
    out, lse = check([0, 0, 0], sq=4, seqlen_new=0)
    assert not out.any() and np.isneginf(lse).all()
    out, lse = check([0, 0, 2], sq=4, seqlen_new=1, page_size=16)
    assert np.isneginf(lse[0, :, :3]).all() and np.isfinite(lse[0, :, 3]).all()
    assert np.isneginf(lse[2, :, 0]).all() and np.isfinite(lse[2, :, 1:]).all()


@pytest.mark.parametrize("page_size", [0, 8, 16, 128])  # 8: through the gathered view
def test_bad_metadata_stays_in_bounds(page_size):
    """cache_seqlens outside [0, capacity - seqlen_new] are clamped; page indices outside
    [0, num_pages) read zeros and drop writes. The reference applies the same policy, and the
    whole returned cache is compared, so no write lands anywhere else."""
    lengths = [-5, 2000, 2 ** 31 - 1, -(2 ** 31), 1020, 1010]
    if not page_size:
        check(lengths, sq=4, seqlen_new=7)
        check(lengths, sq=4, seqlen_new=0)  # no append: the kernel clamps the lengths itself
        return
    lengths = jnp.asarray(lengths, jnp.int32)
    k_cache, v_cache, page_table = make_cache(lengths, 2, 32, 24, page_size)
    bad = np.array(page_table)
    bad[0, 0] = -1                  # write target and read of row 0
    bad[1, -1] = k_cache.shape[0]   # one past the pool: row 1 (clamped to the end) writes there
    bad[2, 3] = -(2 ** 31)
    bad[3, :] = 2 ** 31 - 1
    bad[5] = bad[4]                 # rows 4, 5 share pages: row 4 sees row 5's 1010..1016
    q, k_new, v_new = normal((6, 4, 4, 32)), normal((6, 7, 2, 32)), normal((6, 7, 2, 24))
    bad = jnp.asarray(bad)
    out, lse, kc, vc = _call(q, k_cache, v_cache, lengths, k_new, v_new, bad, ())
    rk, rv, total = ref_append(k_cache, v_cache, lengths, k_new, v_new, bad)
    for got, want in ((kc, rk), (vc, rv)):
        np.testing.assert_array_equal(np.asarray(got), want)
    kc, vc = np.asarray(kc), np.asarray(vc)
    ref, ref_lse = ref_attention(q, ref_view(kc, bad), ref_view(vc, bad), total)
    assert not np.isnan(np.asarray(out)).any()
    assert np.max(np.abs(np.asarray(out) - ref)) <= 2e-5
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(ref_lse))


@pytest.mark.gpu
@pytest.mark.parametrize("page_size,seqlen_new,sq", [(0, 1, 1), (0, 7, 4), (64, 1, 1),
                                                     (256, 7, 4)])
def test_gpu_bf16(page_size, seqlen_new, sq):
    """On a Hopper GPU (the default device): the split-KV kernel over the cache (seqused_k)."""
    check(ODD, hq=8, hkv=2, d=128, dv=128, sq=sq, seqlen_new=seqlen_new, page_size=page_size,
          dtype=jnp.bfloat16, atol=2e-2, lse_atol=2e-2)


LONG = [0, 1, 7, 113, 1000, 4097]  # cache_seqlens, up to past 4k
LONG_CAPACITY = 4112               # room for 4097 + 7 new tokens (and garbage past each length)


def test_long_rows_cpu():
    """The CPU backend on the long lengths (num_splits is accepted and ignored there)."""
    check(LONG, hq=4, hkv=1, d=32, dv=32, sq=7, seqlen_new=7, capacity=LONG_CAPACITY,
          num_splits=3)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [0, 1, 3])
@pytest.mark.parametrize("heads,sq,seqlen_new,kw", [
    ((8, 2), 1, 1, "causal"),          # GQA, one query: packed group
    ((8, 1), 1, 7, "full"),            # MQA, 7 appended, packed
    ((8, 2), 1, 1, "window"),          # one query, window: packed, masked by position
    ((8, 2), 7, 7, "window"),          # 7 queries, window: 28 packed rows (q transposed)
    ((8, 2), 4, 1, "causal"),          # speculative: 4 queries, causal rows by position
    ((32, 2), 7, 7, "causal"),         # 112 packed rows of 16 heads a position
    ((8, 1), 17, 1, "causal"),         # 136 rows would not fit one tile: unpacked
    ((4, 4), 1, 1, "window_softcap"),  # MHA, window and softcap
])
def test_gpu_split_kv(num_splits, heads, sq, seqlen_new, kw):
    """Hopper split-KV over the cache: forced 1 and 3 splits and the heuristic, lengths 0 to
    4097 in one batch (empty rows: out 0, lse -inf; lengths below seqlen_q: causal rows that
    see no key), GQA packing where it applies."""
    check(LONG, hq=heads[0], hkv=heads[1], d=128, dv=128, sq=sq, seqlen_new=seqlen_new,
          capacity=LONG_CAPACITY, num_splits=num_splits, dtype=jnp.bfloat16, atol=2e-2,
          lse_atol=2e-2, **KW[kw])


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [0, 1, 3])
@pytest.mark.parametrize("page_size,heads,sq,seqlen_new,kw", [
    (128, (8, 2), 1, 1, "causal"),       # pages of one key block, packed GQA
    (256, (8, 1), 7, 7, "window"),       # two blocks a page, 56 packed rows
    (16, (8, 2), 4, 1, "causal"),        # speculative on 16-row boxes, packed
    (16, (8, 2), 1, 7, "full"),          # 8 pages a block: one 16-row box each
    (64, (4, 4), 4, 1, "window_softcap"),  # 64-row boxes (kFwdPageRowsLarge)
    (192, (8, 2), 4, 7, "causal"),       # 64-row boxes, blocks across page edges
    (48, (8, 1), 1, 1, "window"),        # 16-row boxes, three a page
])
def test_gpu_paged_kernel(num_splits, page_size, heads, sq, seqlen_new, kw):
    """Hopper reading the pages itself (page_size a multiple of 16: whole blocks, or 64- or
    16-row boxes for smaller pages): shuffled pages, lengths 0 to 4097, forced splits."""
    check(LONG, hq=heads[0], hkv=heads[1], d=128, dv=128, sq=sq, seqlen_new=seqlen_new,
          page_size=page_size, capacity=4608, num_splits=num_splits, dtype=jnp.bfloat16,
          atol=2e-2, lse_atol=2e-2, **KW[kw])


@pytest.mark.gpu
def test_gpu_paged_small_boxes_long_splits():
    """bench_decode's shape (8 rows of 16k, 32 / 8 heads of 128) on pages of 16: the page size
    picks the split kernel's tile and split count (tile_size.h, fwd_use_decode_tile), so the
    lowering's workspace size must see it too (it once did not, and the FFI check refused these
    calls). Odd lengths and a one-token append; each row's outputs are far above atol."""
    atol, row_rtol = 1e-4, 1e-2  # bf16 out: rounding costs up to 2^-8 (0.4%) of a value
    out, _ = check([16384, 16383, 9000, 4097, 1000, 16000, 7, 12345], hq=32, hkv=8, d=128,
                   dv=128, page_size=16, capacity=16384, dtype=jnp.bfloat16, atol=atol,
                   row_rtol=row_rtol, lse_atol=1e-2, seqlen_new=1)
    assert np.min(np.max(np.abs(out), axis=-1)) > 10 * atol


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [16, 128])
def test_gpu_paged_bad_pages(page_size):
    """Page indices outside the pool read as zeros on the kernel path too (TMA zero fill), and
    nothing is read or written out of bounds; the reference applies the same policy."""
    lengths = jnp.asarray([300, 1000, 5, 700], jnp.int32)
    k_cache, v_cache, table = make_cache(lengths, 2, 128, 128, page_size, dtype=jnp.bfloat16)
    bad = np.array(table)
    bad[0, 1] = -1
    bad[1, 3] = k_cache.shape[0]
    bad[1, 5] = 2 ** 31 - 1
    bad[3, 0] = -(2 ** 31)
    bad = jnp.asarray(bad)
    q = normal((4, 1, 8, 128), jnp.bfloat16)
    for n in (0, 3):
        out, lse = _call(q, k_cache, v_cache, lengths, None, None, bad,
                         (("num_splits", n),))
        ref, ref_lse = ref_attention(q, ref_view(k_cache, bad), ref_view(v_cache, bad), lengths)
        out = np.asarray(jnp.asarray(out, jnp.float32))
        assert not np.isnan(out).any()
        assert np.max(np.abs(out - ref)) <= 2e-2
        assert np.max(np.abs(np.asarray(lse) - ref_lse)) <= 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [0, 16])
def test_gpu_bad_lengths_no_append(page_size):
    """Without an append the lengths reach the kernel unclipped (python/fa3_jax/kvcache.py): it
    clamps them to [0, capacity] as the CPU backend and the reference do."""
    check([-5, 2000, 2 ** 31 - 1, -(2 ** 31), 1020, 1010], hq=8, hkv=2, d=128, dv=128, sq=4,
          seqlen_new=0, page_size=page_size, dtype=jnp.bfloat16, atol=2e-2, lse_atol=2e-2)


@pytest.mark.gpu
def test_gpu_empty_caches():
    """Every row empty, no append: out 0 and lse -inf, never NaN (all splits empty)."""
    for n in (0, 3):
        out, lse = check([0, 0, 0], hq=8, hkv=2, d=128, dv=128, seqlen_new=0, num_splits=n,
                         dtype=jnp.bfloat16, atol=0, lse_atol=0)
        assert (out == 0).all() and np.isneginf(lse).all()


# ---------------------------------------------------------------------------------------------
# Transformations: in-place append under donation, jit, vmap, sharding
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("page_size", [0, 64])
def test_donated_append_is_in_place(page_size):
    lengths = jnp.array([3, 0, 100], jnp.int32)
    k_cache, v_cache, page_table = make_cache(lengths, 2, 32, 32, page_size, capacity=256)
    # Buffers that XLA owns (an array made from numpy may borrow numpy's memory, which a
    # donation cannot reuse).
    k_cache, v_cache = k_cache + 0, v_cache + 0
    q, k_new = normal((3, 1, 4, 32)), normal((3, 1, 2, 32))
    want = ref_append(k_cache, v_cache, lengths, k_new, k_new, page_table)[0]

    def step(q, k_cache, v_cache, lengths, k_new, page_table):
        return fa3_jax.flash_attention_with_kvcache(q, k_cache, v_cache, lengths, k_new=k_new,
                                                    v_new=k_new, page_table=page_table)

    step = jax.jit(step, donate_argnums=(1, 2))
    text = step.lower(q, k_cache, v_cache, lengths, k_new, page_table).compile().as_text()
    assert re.search(r"input_output_alias=\{ \{1\}: \(1, \{\}, may-alias\), "
                     r"\{2\}: \(2, \{\}, may-alias\)", text), text[:400]
    # No op copies a whole cache: the scatter works on the parameter's buffer.
    cache_type = "f32[" + ",".join(map(str, k_cache.shape)) + "]"
    assert not [l for l in text.splitlines() if f"{cache_type}" in l and " copy(" in l]
    pointer = k_cache.unsafe_buffer_pointer()
    _, k2, _ = step(q, k_cache, v_cache, lengths, k_new, page_table)
    assert k_cache.is_deleted() and k2.unsafe_buffer_pointer() == pointer
    np.testing.assert_array_equal(np.asarray(k2), want)


def test_jit_traced_lengths_and_vmap():
    f = jax.jit(lambda q, kc, vc, l, kn, vn: fa3_jax.flash_attention_with_kvcache(
        q, kc, vc, l, k_new=kn, v_new=vn, return_lse=True))
    k_cache, v_cache, _ = make_cache([0] * 3, 2, 16, 16, capacity=64)
    q, k_new, v_new = normal((3, 2, 4, 16)), normal((3, 2, 2, 16)), normal((3, 2, 2, 16))
    lens = jnp.array([[0, 5, 62], [1, 40, 0]], jnp.int32)
    for lengths in lens:  # one compilation for every length
        out, lse, kc, vc = f(q, k_cache, v_cache, lengths, k_new, v_new)
        rk, rv, total = ref_append(k_cache, v_cache, lengths, k_new, v_new, None)
        ref, _ = ref_attention(q, rk, rv, total)
        assert np.max(np.abs(np.asarray(out) - ref)) <= 2e-5
    assert f._cache_size() == 1
    stack = lambda x: jnp.stack([x, x * 2])  # noqa: E731
    outs = jax.vmap(f)(stack(q), stack(k_cache), stack(v_cache), lens, stack(k_new),
                       stack(v_new))
    for i in range(2):
        one = f(q * (i + 1), k_cache * (i + 1), v_cache * (i + 1), lens[i], k_new * (i + 1),
                v_new * (i + 1))
        for got, want in zip(outs, one):
            np.testing.assert_allclose(np.asarray(got[i]), np.asarray(want), rtol=1e-6,
                                       atol=1e-6)


def test_vmap_paged_pool():
    """vmap over calls on a paged cache whose pages the kernel reads (page_size 128): a mapped
    pool (each instance its own) and a shared one; an index outside the pool stays outside."""
    lengths = jnp.array([3, 200], jnp.int32)
    k_cache, v_cache, table = make_cache(lengths, 2, 16, 16, page_size=128, capacity=256,
                                         spare_pages=1)
    table = table.at[1, 1].set(-3)  # row 1's keys 128..199 read as zeros
    q = normal((2, 1, 4, 16))
    f = jax.jit(lambda q, kc, vc, pt: fa3_jax.flash_attention_with_kvcache(
        q, kc, vc, lengths, page_table=pt, return_lse=True))
    qs, tables = jnp.stack([q, -q]), jnp.stack([table, table[::-1]])
    mapped = jax.vmap(f)(qs, jnp.stack([k_cache, 2 * k_cache]), jnp.stack([v_cache, 2 * v_cache]),
                         tables)
    shared = jax.vmap(f, in_axes=(0, None, None, 0))(qs, k_cache, v_cache, tables)
    for i, scale in enumerate((1, 2)):
        for outs, s in ((mapped, scale), (shared, 1)):
            one = f(qs[i], k_cache * s, v_cache * s, tables[i])
            for got, want in zip(outs, one):
                np.testing.assert_allclose(np.asarray(got[i]), np.asarray(want), rtol=1e-6,
                                           atol=1e-6)
    out, lse = f(q, k_cache, v_cache, table)
    ref, ref_lse = ref_attention(q, ref_view(k_cache, table), ref_view(v_cache, table), lengths)
    assert np.max(np.abs(np.asarray(out) - ref)) <= 2e-5
    assert np.max(np.abs(np.asarray(lse) - ref_lse)) <= 1e-4


def _collective_sizes(text):
    """Element counts of the results of every collective in compiled HLO text."""
    sizes = []
    for m in re.finditer(r"= \w+\[([\d,]*)\][^=]*? (all-gather|all-to-all|collective-permute|"
                         r"all-reduce|reduce-scatter)\(", text):
        sizes.append(int(np.prod([int(x) for x in m.group(1).split(",") if x])))
    return sizes


@pytest.mark.parametrize("page_size", [0, 16, 128])
def test_batch_head_sharding_stays_local(page_size):
    """Batch and heads sharded over a 4 x 2 mesh: the same results, and no collective moves any
    cache. A contiguous cache (sharded like q) needs none at all; a paged pool is shared by the
    rows, so it is sharded on heads only and each replica receives every row's new tokens (an
    all-gather of k_new/v_new-sized data, never of the pool)."""
    devices = np.array(jax.devices("cpu")[:8])
    if devices.size < 8:
        pytest.skip("needs 8 CPU devices (conftest sets them)")
    mesh = Mesh(devices.reshape(4, 2), ("data", "model"))
    lengths = jnp.array([0, 7, 113, 50], jnp.int32)
    k_cache, v_cache, page_table = make_cache(lengths, 2, 32, 32, page_size, capacity=128)
    q, k_new = normal((4, 1, 4, 32)), normal((4, 1, 2, 32))
    f = jax.jit(lambda q, kc, vc, l, kn, pt: fa3_jax.flash_attention_with_kvcache(
        q, kc, vc, l, k_new=kn, v_new=kn, page_table=pt))
    want = [np.asarray(x) for x in f(q, k_cache, v_cache, lengths, k_new, page_table)]
    t = NamedSharding(mesh, P("data", None, "model", None))
    pool = NamedSharding(mesh, P(None, None, "model", None)) if page_size else t
    rows = NamedSharding(mesh, P("data"))
    args = [jax.device_put(q, t), jax.device_put(k_cache, pool), jax.device_put(v_cache, pool),
            jax.device_put(lengths, rows), jax.device_put(k_new, t),
            None if page_table is None else jax.device_put(page_table, rows)]
    sizes = _collective_sizes(f.lower(*args).compile().as_text())
    if page_size:
        assert max(sizes, default=0) <= k_new.size, sizes
    else:
        assert not sizes, sizes
    got = f(*args)
    assert got[1].sharding.is_equivalent_to(pool, 4)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

def _args(paged=False):
    q, kn, vn = normal((2, 1, 4, 16)), normal((2, 1, 2, 16)), normal((2, 1, 2, 8))
    if paged:
        kc, vc = normal((6, 16, 2, 16)), normal((6, 16, 2, 8))
        pt = jnp.arange(6, dtype=jnp.int32).reshape(2, 3)
    else:
        kc, vc, pt = normal((2, 32, 2, 16)), normal((2, 32, 2, 8)), None
    return dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=jnp.array([1, 2], jnp.int32),
                k_new=kn, v_new=vn, page_table=pt)


def _with(paged=False, **changes):
    a = _args(paged)
    for key, fn in changes.items():
        a[key] = fn(a[key]) if callable(fn) else fn
    return a


@pytest.mark.parametrize("args,exc,pattern", [
    (_with(q=lambda x: x[0]), ValueError, r"q must have rank 4"),
    (_with(k_cache=lambda x: x[0]), ValueError, r"k_cache must have rank 4"),
    (_with(q=lambda x: x.astype(jnp.float16)), TypeError, r"must share one dtype"),
    (_with(q=lambda x: jnp.concatenate([x, x[:, :, :1]], 2)), ValueError,
     r"heads_q \(5.*multiple of heads_kv \(2"),
    (_with(v_cache=lambda x: x[:, :16]), ValueError, r"k_cache and v_cache must agree"),
    (_with(cache_seqlens=lambda x: x.astype(jnp.float32)), TypeError,
     r"cache_seqlens must be int32"),
    (_with(cache_seqlens=lambda x: x[:1]), ValueError, r"cache_seqlens must have shape \[batch\]"),
    (_with(v_new=None), ValueError, r"k_new and v_new go together; v_new is None"),
    (_with(k_new=lambda x: x[:, :, :1]), ValueError, r"k_new must have shape .*\[2, seqlen_new, "
                                                      r"2, 16\]"),
    (_with(v_new=lambda x: jnp.concatenate([x, x], 1)), ValueError, r"same seqlen_new"),
    (_with(k_new=lambda x: x.astype(jnp.bfloat16)), TypeError, r"k_new must have the cache's "
                                                               r"dtype"),
    (_with(k_new=lambda x: jnp.zeros((2, 33, 2, 16)), v_new=lambda x: jnp.zeros((2, 33, 2, 8))),
     ValueError, r"seqlen_new \(33.*capacity of 32"),
    (_with(k_new=lambda x: x[:, :0], v_new=lambda x: x[:, :0]), ValueError,
     r"seqlen_new = 0; pass k_new=None"),
    (_with(True, page_table=lambda x: x.astype(jnp.float32)), TypeError,
     r"page_table must be int32"),
    (_with(True, page_table=lambda x: x[:1]), ValueError, r"page_table must have shape \[batch, "
                                                          r"max_pages_per_seq\] with batch = 2"),
    (_with(True, v_cache=lambda x: x[:, :8]), ValueError,
     r"k_cache and v_cache must agree on \[num_pages, page_size, heads_kv\]"),
    (_with(True, k_cache=lambda x: x[0]), ValueError, r"k_cache must have rank 4 \[num_pages"),
    (_with(True, k_new=lambda x: jnp.zeros((2, 49, 2, 16)),
           v_new=lambda x: jnp.zeros((2, 49, 2, 8))), ValueError, r"capacity of 48"),
], ids=lambda x: None)
def test_argument_errors(args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fa3_jax.flash_attention_with_kvcache(**args)


@pytest.mark.parametrize("kw,exc,pattern", [
    (dict(num_splits=-1), ValueError, r"num_splits must be an int >= 0"),
    (dict(num_splits=True), ValueError, r"num_splits"),
    (dict(window_size=(1,)), TypeError, r"window_size must be a pair"),
    (dict(softcap=-1.0), ValueError, r"softcap"),
    (dict(causal="yes"), TypeError, r"causal must be a bool"),
])
def test_option_errors(kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fa3_jax.flash_attention_with_kvcache(**_args(), **kw)


def test_num_splits_accepted():
    a = _args()
    base = fa3_jax.flash_attention_with_kvcache(**a)[0]
    for n in (1, 4):
        np.testing.assert_array_equal(np.asarray(
            fa3_jax.flash_attention_with_kvcache(**a, num_splits=n)[0]), np.asarray(base))


def test_generation_benchmark_emits_the_same_tokens(capsys):
    """benchmarks/generate_kvcache.py at tiny sizes: the fa3_jax loops (contiguous and paged)
    emit jax.nn's greedy tokens."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "generate_kvcache.py"
    spec = importlib.util.spec_from_file_location("generate_kvcache", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with jax.default_device(jax.devices("cpu")[0]):
        assert bench.main(["--batch", "2", "--prompt", "13", "--new", "6", "--layers", "1",
                           "--d-model", "32", "--heads", "4", "--kv-heads", "1", "--head-dim",
                           "8", "--vocab", "64", "--page-size", "4", "--dtype", "float32"]) == 0
    rows = [l for l in capsys.readouterr().out.splitlines()
            if l.startswith(("fa3_jax", "jax.nn/xla"))]
    assert len(rows) == 3 and rows[0].endswith("(reference)")
    assert all(r.endswith("yes") for r in rows[1:]), rows

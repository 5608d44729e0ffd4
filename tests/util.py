"""Shared helpers: random inputs and error bounds relative to a same-precision reference."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import fa3_jax
from fa3_jax.attention import bottom_right_band
from fa3_jax.reference import band_mask

_counter = [0]


def fresh_key():
    """A new PRNG key per call, so every check draws fresh inputs."""
    _counter[0] += 1
    return jax.random.PRNGKey(1000 + _counter[0])


def to_gpu(*xs):
    """The arrays put on the first GPU (GPU tests; their inputs are made on the CPU)."""
    dev = jax.devices("gpu")[0]
    return [jax.device_put(x, dev) for x in xs]


def gpu_head_dims():
    """The head dims a GPU test sweeps: 64 and 128 where built, else the first built one."""
    built = fa3_jax.cuda_head_dims()
    return [d for d in (64, 128) if d in built] or [built[0]]


def make_qkv(b, sq, sk, hq, hkv, d, dv=None, dtype=jnp.float32, key=None):
    dv = d if dv is None else dv
    kq, kk, kv = jax.random.split(fresh_key() if key is None else key, 3)
    q = jax.random.normal(kq, (b, sq, hq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, sk, hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, sk, hkv, dv), jnp.float32).astype(dtype)
    return q, k, v


def max_err(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32))
    b = np.asarray(jnp.asarray(b, jnp.float32))
    both_inf = np.isinf(a) & np.isinf(b) & (np.sign(a) == np.sign(b))
    with np.errstate(invalid="ignore"):  # inf - inf where both are -inf lse: masked below
        d = np.where(both_inf, 0.0, np.abs(a - b))
    return float(np.max(d)) if d.size else 0.0


ATOL = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.float16): 2e-3,
        jnp.dtype(jnp.bfloat16): 1e-2}


def assert_close_to_reference(got, ref32, ref_same, dtype, what, factor=2.0):
    """|got - ref32| <= factor * |ref_same - ref32| + atol(dtype); no NaN anywhere."""
    got_np = np.asarray(jnp.asarray(got, jnp.float32))
    assert not np.isnan(got_np).any(), f"{what}: NaN in result"
    err = max_err(got, ref32)
    base = max_err(ref_same, ref32)
    bound = factor * base + ATOL[jnp.dtype(dtype)]
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} (baseline {base:.3g})"
    return err, base


def check_forward(q, k, v, *, rtol_factor=2.0, **kw):
    out, lse = fa3_jax.flash_attention(q, k, v, return_lse=True, **kw)
    # Jitted references: one compilation each instead of one per jnp op (slow on GPUs).
    ref = jax.jit(partial(fa3_jax.attention_reference, return_lse=True, **kw))
    ref32, lse32 = ref(q, k, v)
    ref_lp, _ = jax.jit(partial(fa3_jax.attention_reference, return_lse=True,
                                compute_dtype=q.dtype, **kw))(q, k, v)
    assert out.shape == ref32.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == jnp.float32
    assert_close_to_reference(out, ref32, ref_lp, q.dtype, "out", rtol_factor)
    # lse is computed in float32 from low-precision inputs: its error is the float32 one.
    lse_err = max_err(lse, lse32)
    assert lse_err <= 1e-4 * (1 + float(np.nanmax(np.abs(np.where(np.isfinite(lse32), lse32, 0))))), \
        f"lse max error {lse_err:.3g}"
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(np.asarray(lse32)))
    return out, lse


def grads(fn, q, k, v, dout, **kw):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v, **kw).astype(jnp.float32) * dout.astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def check_backward(q, k, v, factor=2.0, **kw):
    dout = jax.random.normal(fresh_key(), q.shape[:3] + (v.shape[3],), jnp.float32).astype(q.dtype)
    got = grads(fa3_jax.flash_attention, q, k, v, dout, **kw)
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    ref32 = grads(fa3_jax.attention_reference, q32, k32, v32, dout, **kw)
    ref_lp = grads(lambda *a, **kk: fa3_jax.attention_reference(*a, compute_dtype=q.dtype, **kk),
                   q, k, v, dout, **kw)
    for name, g, r, rl, x in zip(("dq", "dk", "dv"), got, ref32, ref_lp, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert_close_to_reference(g, r, rl, q.dtype, name, factor)
    return got


def assert_same_quantization(got, want, max_fraction=1e-4):
    """got, want: ((q8, k8, v8), (descale_q, descale_k, descale_v)) of fa3_jax.fp8.quantize. The
    descales must be equal; the e4m3 values equal but for at most ``max_fraction`` of them, and
    those one e4m3 step apart (a product rounded on the other side of a tie: XLA's fusions may
    round y * (1 / descale) differently from the kernels' separate float32 multiplies). Returns
    the number of values that differ."""
    def ordinal(x8):  # e4m3 codes in value order (+0 and -0 both 0)
        u = np.asarray(x8).view(np.uint8).astype(np.int32)
        return np.where(u & 0x80, -(u & 0x7f), u & 0x7f)

    (g8, gs), (w8, ws) = got, want
    for a, b in zip(gs, ws):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    differ = total = 0
    for a, b in zip(g8, w8):
        assert a.dtype == b.dtype == jnp.float8_e4m3fn and a.shape == b.shape
        steps = np.abs(ordinal(a) - ordinal(b))
        assert steps.max(initial=0) <= 1, f"e4m3 values {int(steps.max())} steps apart"
        differ += int(np.count_nonzero(steps))
        total += steps.size
    assert differ <= max_fraction * total, f"{differ} of {total} e4m3 values differ"
    return differ


def check_drop_in_seq_lengths(q, k, v, dout, **kw):
    """fa3_jax.dot_product_attention with jax.nn's query/key_value_seq_lengths (batch 3; lengths
    [140, 17, 1] and [130, 20, 93]) and ``kw``: served by the packed primitive with no fallback
    warning, and equal to jax.nn's XLA path in float32 in values and gradients."""
    import warnings  # noqa: PLC0415
    lengths = dict(query_seq_lengths=jnp.array([140, 17, 1], jnp.int32),
                   key_value_seq_lengths=jnp.array([130, 20, 93], jnp.int32))
    f = lambda *a: fa3_jax.dot_product_attention(*a, **kw, **lengths)  # noqa: E731
    ref = lambda *a: jax.nn.dot_product_attention(  # noqa: E731
        *(x.astype(jnp.float32) for x in a), implementation="xla", **kw, **lengths)
    assert "fa3_fwd_packed" in str(jax.make_jaxpr(f)(q, k, v))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        out = jax.jit(f)(q, k, v)
    assert max_err(out, ref(q, k, v)) <= 2e-2
    g = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * dout), (0, 1, 2)))(q, k, v)
    r = jax.grad(lambda *a: jnp.sum(ref(*a) * dout), (0, 1, 2))(q, k, v)
    for name, a, b in zip(("dq", "dk", "dv"), g, r):
        assert max_err(a, b) <= 5e-2 * max(1.0, float(jnp.max(jnp.abs(b)))), name


def packed_ids(b, s, lengths_per_row):
    """[b, s] ids: row r holds segments of the given lengths (ids 1, 2, ...), then padding 0."""
    ids = np.zeros((b, s), np.int32)
    for r, lengths in enumerate(lengths_per_row):
        pos = 0
        for n, length in enumerate(lengths):
            ids[r, pos:pos + length] = n + 1
            pos += length
    return jnp.asarray(ids)


def segment_reference(q, k, v, q_ids, kv_ids, *, causal=False, window_size=(-1, -1),
                      softcap=0.0):
    """Float32, materialised scores: the band of flash_attention and the id compare."""
    b, sq, hq, d = q.shape
    sk, g = k.shape[1], hq // k.shape[2]
    lo, hi = bottom_right_band(sq, sk, causal, window_size)
    mask = band_mask(sq, sk, lo, hi)[None] & (q_ids[:, :, None] == kv_ids[:, None, :]) & (
        q_ids[:, :, None] != 0)
    kf, vf = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, kf, precision="highest") / np.sqrt(d)
    if softcap > 0:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(mask[:, None], s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, -1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, -1, keepdims=True)
    out = jnp.einsum("bhqk,bkhd->bqhd", p / jnp.where(l > 0, l, 1), vf, precision="highest")
    lse = jnp.where(l[..., 0] > 0, jnp.log(jnp.where(l > 0, l, 1))[..., 0] + m[..., 0], -jnp.inf)
    return out, lse

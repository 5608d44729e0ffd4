"""JAX's own dot_product_attention test cases, run on fa3_jax's drop-in.

The cases follow the ``testDotProductAttention*`` methods of ``tests/nn_test.py`` in jax-ml/jax
(v0.10.2): the same shapes, dtypes, mask modes and tolerances, written here as this project's
tests. Where upstream compares ``implementation="cudnn"`` with the default, these compare
``fa3_jax.dot_product_attention`` with ``jax.nn.dot_product_attention(implementation="xla")``.
Each test also asserts which path served the call: the fa3_jax kernels (an ``fa3_fwd`` /
``fa3_bwd`` primitive in the jaxpr, upstream's "is cuDNN called" check) or the jax.nn fallback.
"""

import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3_jax
from fa3_jax import nn as fnn

ref_sdpa = partial(jax.nn.dot_product_attention, implementation="xla")


def _close(got, want, tol):
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape,
                                                                 got.dtype, want.dtype)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol)


def _served_by_kernels(fn, *args):
    """True when tracing fn(*args) binds an fa3_jax kernel primitive (no jax.nn fallback)."""
    text = str(jax.make_jaxpr(fn)(*args))
    return "fa3_fwd" in text or "fa3_bwd" in text


def _kernels_take(dtype, head_dim):
    """Whether the kernels take this dtype and head size on the default backend (CPU: always;
    elsewhere the drop-in falls back, so "served" checks expect the fallback)."""
    x = jax.ShapeDtypeStruct((1, 1, 1, head_dim), dtype)
    return fnn._gpu_unsupported(x, x) is None


@pytest.mark.parametrize("use_vmap", [False, True])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_dot_product_attention(dtype, group, use_vmap):
    """Upstream testDotProductAttention: MHA/GQA, vmap, outputs, residual and VJPs."""
    b, s, t, n, h = 2, 128, 128, 4, 32
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    q = jax.random.normal(keys[0], (b, t, n, h), dtype)
    k = jax.random.normal(keys[1], (b, s, n // group, h), dtype)
    v = jax.random.normal(keys[2], (b, s, n // group, h), dtype)
    dout = jax.random.normal(keys[3], (b, t, n, h), dtype)
    dlse = jax.random.normal(keys[4], (b, t, n), dtype)

    def run(fn, vmapped):
        fn_res = partial(fn, return_residual=True)
        if vmapped:  # over the batch: the drop-in then sees rank-3 (TNH) inputs
            fn, fn_res = jax.vmap(fn), jax.vmap(fn_res)
        out, vjp = jax.vjp(fn, q, k, v)
        (out_res, lse), vjp_res = jax.vjp(fn_res, q, k, v)
        return out, out_res, lse, vjp(dout), vjp_res((dout, dlse))

    # Eager, as upstream: jax.nn's float16 XLA path retries a CPU-unsupported dot precision only
    # outside jit.
    got = run(fa3_jax.dot_product_attention, use_vmap)
    want = run(ref_sdpa, False)
    fwd = jax.vmap(fa3_jax.dot_product_attention) if use_vmap else fa3_jax.dot_product_attention
    assert _served_by_kernels(fwd, q, k, v) == _kernels_take(dtype, h)
    # out, out with residual, residual ([B, T, N] in the query's dtype), the two VJPs.
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        _close(g, w, 0.01)
    # No gradient flows through the residual: its cotangent changes nothing.
    for g, g_res in zip(got[3], got[4]):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(g_res, np.float32))


MASK_MODES = ["bias", "causal", "padding", "custom", ("causal", "padding"), ("custom", "padding"),
              ("bias", "causal"), ("causal", "sliding_window")]


@pytest.mark.parametrize("mode", MASK_MODES, ids=lambda m: m if isinstance(m, str) else "+".join(m))
def test_dot_product_attention_mask(mode):
    """Upstream testDotProductAttentionMask: every mask mode, gradients including dbias."""
    mode = (mode,) if isinstance(mode, str) else mode
    dtype = jnp.bfloat16
    b, s, t, n, h = 2, 128, 128, 4, 32
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    q = jax.random.normal(keys[0], (b, t, n, h), dtype)
    k = jax.random.normal(keys[1], (b, s, n, h), dtype)
    v = jax.random.normal(keys[2], (b, s, n, h), dtype)
    dout = jax.random.normal(keys[3], (b, t, n, h), dtype)
    bias = jax.random.normal(keys[4], (1, n, t, s), dtype) if "bias" in mode else None
    mask = jnp.tril(jnp.ones((t, s), bool))[None, None] if "custom" in mode else None
    q_len = jnp.array([t // 2, t // 4], jnp.int32) if "padding" in mode else None
    kv_len = jnp.array([s // 4, s // 2], jnp.int32) if "padding" in mode else None
    causal = "causal" in mode
    window = ((3, 2) if causal else (3, 0)) if "sliding_window" in mode else None

    def call(fn, q, k, v, bias):
        return fn(q, k, v, bias, mask, is_causal=causal, query_seq_lengths=q_len,
                  key_value_seq_lengths=kv_len, local_window_size=window)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fa3_jax.dot_product_attention")
        out, vjp = jax.vjp(partial(call, fa3_jax.dot_product_attention), q, k, v, bias)
        out_ref, vjp_ref = jax.vjp(partial(call, ref_sdpa), q, k, v, bias)
        served = _served_by_kernels(partial(call, fa3_jax.dot_product_attention), q, k, v, bias)
    # Causal masks, windows and (as segment ids, CPU backend) sequence lengths are the kernels'
    # own; bias and masks fall back.
    kernel_modes = {"causal", "sliding_window"} | ({"padding"} if jax.default_backend() == "cpu"
                                                   else set())
    assert served == (set(mode) <= kernel_modes and _kernels_take(dtype, h)), mode

    _close(out, out_ref, 0.01)
    dq, dk, dv, dbias = vjp(dout)
    dq_ref, dk_ref, dv_ref, dbias_ref = vjp_ref(dout)
    _close(dq, dq_ref, 0.02)
    _close(dk, dk_ref, 0.02)
    _close(dv, dv_ref, 0.01)
    if bias is not None:
        _close(dbias, dbias_ref, 0.02)


def test_float64_falls_back_with_one_warning():
    """Upstream testDotProductAttentionFloat64MaskDebugInfs, and float64 without a mask: x64
    inputs go to jax.nn (one warning), never a TypeError, and no spurious inf."""
    t, s, kh, n, h = 5, 7, 3, 6, 11
    with jax.enable_x64(True):
        q, k, v = (jax.random.normal(jax.random.PRNGKey(i), shape, jnp.float64)
                   for i, shape in enumerate([(t, n, h), (s, kh, h), (s, kh, h)]))
        fnn._WARNED.discard("float64")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = fa3_jax.dot_product_attention(q, k, v, is_causal=True)
            fa3_jax.dot_product_attention(q, k, v, is_causal=True)
        assert [str(w.message) for w in seen if "float64" in str(w.message)] != []
        assert len(seen) == 1, [str(w.message) for w in seen]
        assert out.dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(out),
                                      np.asarray(ref_sdpa(q, k, v, is_causal=True)))

        mask = jnp.arange(s) <= s // 2
        zeros = [jnp.zeros(x.shape, jnp.float64) for x in (q, k, v)]
        with warnings.catch_warnings(record=True) as seen, jax.debug_infs(True):
            warnings.simplefilter("always")
            out = fa3_jax.dot_product_attention(*zeros, mask=mask)
            out.block_until_ready()
        assert all(str(w.message).startswith("fa3_jax.dot_product_attention") for w in seen)
        np.testing.assert_array_equal(np.asarray(out), np.zeros((t, n, h)))


@pytest.mark.parametrize("use_vmap", [False, True])
def test_dot_product_attention_bias_gradient(use_vmap):
    """Upstream testDotProductAttentionBiasGradient (batch 2 here, upstream 1 and 16): the bias
    fallback keeps jax.nn's bias gradient, also under vmap."""
    dtype = jnp.bfloat16
    b, s, n, h = 2, 128, 4, 32
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    x = jax.random.normal(keys[0], (b, s, n, h), dtype)
    bias = jax.random.normal(keys[1], (b, n, s, s), dtype)
    mask = jnp.ones((1, 1, s), bool)

    def attention(fn, x, bias, mask):
        return fn(x, x, x, bias=bias, mask=mask, is_causal=False)

    def fwd_bwd(fn):
        f = partial(attention, fn)
        if use_vmap:
            f = jax.vmap(f, in_axes=(0, 0, None))
        y, vjp = jax.vjp(f, x, bias, mask)
        return y, vjp(x)[1]

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fa3_jax.dot_product_attention")
        y, dbias = jax.jit(partial(fwd_bwd, fa3_jax.dot_product_attention))()
    y_ref, dbias_ref = jax.jit(partial(fwd_bwd, ref_sdpa))()
    _close(y, y_ref, 1e-6)
    _close(dbias, dbias_ref, 0.1)

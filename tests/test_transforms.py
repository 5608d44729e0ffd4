"""jit, grad, value_and_grad, vmap (folded into batch), checkpoint, and nestings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3_jax
from util import make_qkv, max_err


def _loss(fn, **kw):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, **kw)))


def _close(a, b, tol=2e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert max_err(x, y) <= tol, max_err(x, y)


def test_jit_matches_eager():
    q, k, v = make_qkv(2, 31, 47, 4, 2, 64)
    _close(jax.jit(fa3_jax.flash_attention, static_argnames="causal")(q, k, v, causal=True),
           fa3_jax.flash_attention(q, k, v, causal=True), 0)


def test_value_and_grad_under_jit():
    q, k, v = make_qkv(2, 31, 47, 4, 2, 64)
    got = jax.jit(jax.value_and_grad(_loss(fa3_jax.flash_attention, causal=True), (0, 1, 2)))(q, k, v)
    ref = jax.value_and_grad(_loss(fa3_jax.attention_reference, causal=True), (0, 1, 2))(q, k, v)
    _close(got, ref, 5e-5)


@pytest.mark.parametrize("in_axes", [(0, 0, 0), (1, None, None), (None, 2, 2), (0, None, 0)])
def test_vmap(in_axes):
    base = make_qkv(3, 17, 23, 4, 2, 64)
    args = []
    for x, ax in zip(base, in_axes):
        args.append(x if ax is None else jnp.stack([x, x * 0.5 + 0.1, -x], axis=ax))
    got = jax.vmap(lambda q, k, v: fa3_jax.flash_attention(q, k, v, causal=True), in_axes)(*args)
    ref = jax.vmap(lambda q, k, v: fa3_jax.attention_reference(q, k, v, causal=True), in_axes)(*args)
    _close(got, ref)


def test_vmap_folds_into_one_kernel_call():
    q, k, v = make_qkv(2, 9, 9, 2, 2, 64)
    qs = jnp.stack([q, q, q])
    jaxpr = jax.make_jaxpr(jax.vmap(lambda q: fa3_jax.flash_attention(q, k, v)))(qs)
    text = str(jaxpr)
    assert text.count("fa3_fwd") == 1 and "while" not in text and "scan" not in text
    hlo = jax.jit(jax.vmap(lambda q: fa3_jax.flash_attention(q, k, v))).lower(qs).as_text()
    assert "while" not in hlo and hlo.count("custom_call_target = \"fa3_fwd\"") <= 1


def test_vmap_of_grad_and_grad_of_vmap():
    q, k, v = make_qkv(2, 13, 19, 2, 1, 64)
    qs, ks, vs = (jnp.stack([x, 2 * x]) for x in (q, k, v))
    f = _loss(fa3_jax.flash_attention, causal=True)
    r = _loss(fa3_jax.attention_reference, causal=True)
    _close(jax.vmap(jax.grad(f, (0, 1, 2)))(qs, ks, vs), jax.vmap(jax.grad(r, (0, 1, 2)))(qs, ks, vs),
           1e-4)
    sf = lambda *a: jnp.sum(jax.vmap(f)(*a))  # noqa: E731
    sr = lambda *a: jnp.sum(jax.vmap(r)(*a))  # noqa: E731
    _close(jax.jit(jax.grad(sf, (0, 1, 2)))(qs, ks, vs), jax.grad(sr, (0, 1, 2))(qs, ks, vs), 1e-4)


def test_checkpoint_and_nesting():
    q, k, v = make_qkv(2, 21, 21, 4, 4, 64)
    f = jax.checkpoint(_loss(fa3_jax.flash_attention, window_size=(4, 2)))
    r = _loss(fa3_jax.attention_reference, window_size=(4, 2))
    _close(jax.jit(jax.grad(f, (0, 1, 2)))(q, k, v), jax.grad(r, (0, 1, 2))(q, k, v), 5e-5)
    # The residuals saved for the backward are q, k, v, out and lse only.
    res = jax.vjp(lambda q, k, v: fa3_jax.flash_attention(q, k, v), q, k, v)[1]
    shapes = sorted(tuple(x.shape) for x in jax.tree.leaves(res) if hasattr(x, "shape"))
    assert shapes == sorted([q.shape, k.shape, v.shape, q.shape, (2, 4, 21)])


def test_second_jit_reuses_compilation_and_static_params_matter():
    q, k, v = make_qkv(1, 16, 16, 2, 2, 64)
    f = jax.jit(lambda q, k, v: (fa3_jax.flash_attention(q, k, v, causal=True),
                                 fa3_jax.flash_attention(q, k, v)))
    a, b = f(q, k, v)
    assert max_err(a, b) > 1e-3  # causal and full differ

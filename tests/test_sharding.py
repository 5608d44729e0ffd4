"""Multi-device jit on 8 CPU devices: batch/head sharding stays local (no all-gather of q/k/v)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import fa3_jax
from util import make_qkv, max_err

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices "
                                "(tests/conftest.py sets --xla_force_host_platform_device_count=8)")


def _mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


def _put(mesh, spec, *xs):
    return [jax.device_put(x, NamedSharding(mesh, spec)) for x in xs]


def _collectives(compiled_text):
    return re.findall(r"\b(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)"
                      r"(?:-start)?\(", compiled_text)


def _loss(q, k, v):
    return jnp.sum(fa3_jax.flash_attention(q, k, v, causal=True).astype(jnp.float32) ** 2)


@pytest.mark.parametrize("hq,hkv", [(8, 4), (4, 4)])
def test_batch_and_head_sharding_forward_backward(hq, hkv):
    mesh = _mesh()
    q, k, v = make_qkv(4, 48, 64, hq, hkv, 64)
    spec = P("data", None, "model", None)
    qs, ks, vs = _put(mesh, spec, q, k, v)
    fwd = jax.jit(lambda q, k, v: fa3_jax.flash_attention(q, k, v, causal=True, return_lse=True))
    out, lse = fwd(qs, ks, vs)
    ref_out, ref_lse = fa3_jax.flash_attention(q, k, v, causal=True, return_lse=True)
    assert max_err(out, ref_out) == 0 and max_err(lse, ref_lse) == 0
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, spec), 4)
    assert lse.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "model", None)), 3)
    text = fwd.lower(qs, ks, vs).compile().as_text()
    assert _collectives(text) == [], _collectives(text)

    grad = jax.jit(jax.grad(_loss, argnums=(0, 1, 2)))
    got = grad(qs, ks, vs)
    ref = jax.grad(_loss, argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, ref):
        assert max_err(g, r) == 0
        assert g.sharding.is_equivalent_to(NamedSharding(mesh, spec), 4)
    text = grad.lower(qs, ks, vs).compile().as_text()
    # The scalar loss needs one all-reduce; q, k, v and their gradients are never gathered.
    assert "all-gather" not in _collectives(text), _collectives(text)


def test_sequence_sharding_is_gathered_and_correct():
    mesh = _mesh()
    q, k, v = make_qkv(2, 64, 64, 4, 4, 64)
    qs, ks, vs = _put(mesh, P(None, "model", None, None), q, k, v)
    # context_parallel="gather": the opt-out of the ring (tests/test_context_parallel.py).
    out = jax.jit(lambda q, k, v: fa3_jax.flash_attention(q, k, v, causal=True,
                                                          context_parallel="gather"))(qs, ks, vs)
    assert max_err(out, fa3_jax.flash_attention(q, k, v, causal=True)) == 0


def test_mqa_head_sharding_falls_back_to_replicated_heads():
    mesh = _mesh()
    q, k, v = make_qkv(2, 32, 32, 8, 1, 64)
    qs, = _put(mesh, P("data", None, "model", None), q)
    ks, vs = _put(mesh, P("data", None, None, None), k, v)
    got = jax.jit(jax.grad(_loss, argnums=(0, 1, 2)))(qs, ks, vs)
    for g, r in zip(got, jax.grad(_loss, argnums=(0, 1, 2))(q, k, v)):
        assert max_err(g, r) == 0


def test_shard_map():
    shard_map = jax.shard_map
    mesh = _mesh()
    q, k, v = make_qkv(4, 32, 40, 8, 4, 64)
    spec = P("data", None, "model", None)
    f = jax.jit(shard_map(lambda q, k, v: fa3_jax.flash_attention(q, k, v, window_size=(8, 0)),
                          mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec))
    got = f(*_put(mesh, spec, q, k, v))
    assert max_err(got, fa3_jax.flash_attention(q, k, v, window_size=(8, 0))) == 0


@pytest.mark.parametrize("hq,hkv,block", [(8, 4, True), (4, 4, False), (8, 1, True)])
def test_fp8_forward_batch_and_head_sharding_stays_local(hq, hkv, block):
    """The FP8 forward's operands (e4m3 q/k/v and their per-tensor or per-block descales) keep
    their batch/head sharding: same result as one device, no collective in the compiled call."""
    mesh = _mesh()
    q, k, v = make_qkv(4, 40, 72, hq, hkv, 64)
    (q8, k8, v8), scales, (bq, bk) = fa3_jax.fp8.quantize(q, k, v, block_quantize=block)

    def attend(q8, k8, v8, dq, dk, dv):
        return fa3_jax.attention.fp8_forward(q8, k8, v8, dq, dk, dv, softmax_scale=0.125,
                                             softcap=0.0, diag_lo=-(1 << 30), diag_hi=32,
                                             block_q=bq, block_k=bk)

    head = "model" if hkv > 1 else None  # MQA keeps heads whole (see the dense MQA test)
    t = P("data", None, head, None)
    s = P("data", head, None) if block else P("data", head)
    args = _put(mesh, t, q8, k8, v8) + _put(mesh, s, *scales)
    fwd = jax.jit(attend)
    out, lse = fwd(*args)
    ref_out, ref_lse = attend(q8, k8, v8, *scales)
    assert max_err(out, ref_out) == 0 and max_err(lse, ref_lse) == 0
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, t), 4)
    text = fwd.lower(*args).compile().as_text()
    assert _collectives(text) == [], _collectives(text)

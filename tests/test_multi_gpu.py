"""Several Hopper GPUs in one process (skipped with fewer than 2): every GPU runs the kernels,
batch- and head-sharded jit matches one GPU with no all-gather, a data-parallel Flax training
step tracks one GPU's losses, and a training step runs with XLA's command buffers on and off."""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import fa3_jax
from util import check_backward, check_forward, make_qkv, max_err

pytestmark = pytest.mark.gpu
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _gpus():
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


needs_two = pytest.mark.skipif(len(_gpus()) < 2, reason="needs 2 GPUs")


def _collectives(text):
    return re.findall(r"\b(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)"
                      r"(?:-start)?\(", text)


def _rel_err(a, b):
    return max_err(a, b) / (float(np.max(np.abs(np.asarray(b, np.float32)))) + 1e-6)


@needs_two
@pytest.mark.parametrize("causal", [False, True])
def test_every_gpu_runs_forward_and_backward(causal):
    """The same call on each GPU: correct against the float32 reference, on that GPU."""
    for dev in _gpus():
        q, k, v = (jax.device_put(x, dev) for x in make_qkv(2, 333, 517, 8, 2, 128,
                                                              dtype=jnp.bfloat16))
        out, _ = check_forward(q, k, v, causal=causal)
        assert out.devices() == {dev}, (out.devices(), dev)
        grads = check_backward(q, k, v, causal=causal)
        assert all(g.devices() == {dev} for g in grads)


def _loss(q, k, v, deterministic):
    o = fa3_jax.flash_attention(q, k, v, causal=True, deterministic=deterministic)
    return jnp.sum(o.astype(jnp.float32) * jnp.cos(jnp.arange(o.shape[-1], dtype=jnp.float32)))


@needs_two
@pytest.mark.parametrize("spec_name", ["batch", "heads"])
@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2)])
def test_sharded_jit_matches_one_gpu(spec_name, hq, hkv):
    gpus = _gpus()[:2]
    mesh = Mesh(np.array(gpus), ("x",))
    spec = P("x", None, None, None) if spec_name == "batch" else P(None, None, "x", None)
    q, k, v = make_qkv(4, 1000, 1000, hq, hkv, 128, dtype=jnp.bfloat16)
    one = [jax.device_put(x, gpus[0]) for x in (q, k, v)]
    two = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)]

    fwd = jax.jit(lambda q, k, v: fa3_jax.flash_attention(q, k, v, causal=True))
    grad = jax.jit(jax.grad(_loss, argnums=(0, 1, 2)), static_argnums=3)
    fwd_text = fwd.lower(*two).compile().as_text()
    grad_text = grad.lower(*two, True).compile().as_text()
    assert _collectives(fwd_text) == [], _collectives(fwd_text)
    assert "all-gather" not in _collectives(grad_text), _collectives(grad_text)

    out2, out1 = fwd(*two), fwd(*one)
    assert out2.sharding.is_equivalent_to(NamedSharding(mesh, spec), 4), out2.sharding
    # Each (batch, head) tile is computed by the same kernel code either way: equal bits.
    np.testing.assert_array_equal(np.asarray(out2), np.asarray(out1))
    g2, g1 = grad(*two, True), grad(*one, True)
    for name, a, b in zip(("dq", "dk", "dv"), g2, g1):
        assert a.sharding.is_equivalent_to(NamedSharding(mesh, spec), 4), (name, a.sharding)
        assert _rel_err(a, b) < 1e-2, (name, _rel_err(a, b))


@needs_two
@pytest.mark.parametrize("strategy,load_balance", [("ring", 2), ("ring", 0), ("all_gather", 2)])
def test_sequence_sharded_matches_one_gpu(strategy, load_balance):
    """Context parallelism on 2 GPUs (q/k/v sharded along the sequence; causal, GQA, chunks of
    250): out and gradients match one GPU, and the ring moves K/V by collective-permute only."""
    gpus = _gpus()[:2]
    mesh = Mesh(np.array(gpus), ("seq",))
    q, k, v = make_qkv(1, 1000, 1000, 8, 2, 128, dtype=jnp.bfloat16)
    lay = ((lambda x: fa3_jax.load_balance_reorder(x, load_balance)) if load_balance
           else (lambda x: x))
    back = ((lambda x: fa3_jax.load_balance_restore(x, load_balance)) if load_balance
            else (lambda x: x))

    def loss(q, k, v, lb=0):
        o = fa3_jax.flash_attention(q, k, v, causal=True, load_balance=lb,
                                    context_parallel=strategy)
        w = jnp.cos(jnp.arange(o.shape[-1], dtype=jnp.float32))
        return jnp.sum(o.astype(jnp.float32) * w)

    one = [jax.device_put(x, gpus[0]) for x in (q, k, v)]
    two = [jax.device_put(lay(x), NamedSharding(mesh, P(None, "seq"))) for x in (q, k, v)]
    fwd = jax.jit(partial(fa3_jax.flash_attention, causal=True, context_parallel=strategy),
                  static_argnames="load_balance")
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    assert _rel_err(back(fwd(*two, load_balance=load_balance)), fwd(*one)) < 1e-2
    for name, a, b in zip(("dq", "dk", "dv"), grad(*two, load_balance), grad(*one)):
        assert _rel_err(back(a), b) < 1e-2, (name, _rel_err(back(a), b))
    if strategy == "ring":
        found = set(_collectives(grad.lower(*two, load_balance).compile().as_text()))
        assert found == {"collective-permute"}, found


@needs_two
@pytest.mark.parametrize("load_balance", [2, 0])
def test_sequence_sharded_segment_ids_match_one_gpu(load_balance):
    """Packed documents (segment ids, 50 padding tokens) on a sequence sharded over 2 GPUs: the
    ring matches one GPU in out, lse and gradients; padding rows get out 0 and lse -inf."""
    gpus = _gpus()[:2]
    mesh = Mesh(np.array(gpus), ("seq",))
    q, k, v = make_qkv(1, 1000, 1000, 8, 2, 128, dtype=jnp.bfloat16)
    ids = np.zeros((1, 1000), np.int32)
    ids[0, :137], ids[0, 137:537], ids[0, 537:750], ids[0, 750:950] = 1, 2, 3, 4
    ids = jnp.asarray(ids)
    lay = ((lambda x: fa3_jax.load_balance_reorder(x, load_balance)) if load_balance
           else (lambda x: x))
    back = ((lambda x, axis=1: fa3_jax.load_balance_restore(x, load_balance, axis))
            if load_balance else (lambda x, axis=1: x))

    def attn(q, k, v, ids, lb=0):
        return fa3_jax.flash_attention(q, k, v, causal=True, load_balance=lb, q_segment_ids=ids,
                                       kv_segment_ids=ids, return_lse=True)

    def loss(q, k, v, ids, lb=0):
        o = attn(q, k, v, ids, lb)[0]
        return jnp.sum(o.astype(jnp.float32) * jnp.cos(jnp.arange(o.shape[-1], dtype=jnp.float32)))

    one = [jax.device_put(x, gpus[0]) for x in (q, k, v, ids)]
    two = [jax.device_put(lay(x), NamedSharding(mesh, P(None, "seq"))) for x in (q, k, v, ids)]
    fwd = jax.jit(attn, static_argnums=4)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=4)
    (out2, lse2), (out1, lse1) = fwd(*two, load_balance), fwd(*one)
    out2, lse2 = back(out2), back(lse2, 2)
    assert _rel_err(out2, out1) < 1e-2 and max_err(lse2, lse1) < 1e-2
    assert not np.isnan(np.asarray(out2, np.float32)).any()
    assert np.all(np.asarray(out2[0, 950:]) == 0)
    assert np.all(np.isneginf(np.asarray(lse2[0, :, 950:])))
    for name, a, b in zip(("dq", "dk", "dv"), grad(*two, load_balance), grad(*one)):
        assert _rel_err(back(a), b) < 1e-2, (name, _rel_err(back(a), b))
    found = set(_collectives(grad.lower(*two, load_balance).compile().as_text()))
    assert "collective-permute" in found and found <= {"collective-permute", "all-gather"}, found



@needs_two
def test_varlen_token_axis_sharded_matches_one_gpu():
    """flash_attention_varlen with its packed token axis sharded over 2 GPUs and
    context_parallel="ring" (segment-id kernels on a ring) matches the varlen kernels on one GPU
    in out, lse and gradients; tokens past the last sequence get out 0 and lse -inf."""
    gpus = _gpus()[:2]
    mesh = Mesh(np.array(gpus), ("seq",))
    q, k, v = (x[0] for x in make_qkv(1, 1000, 1000, 8, 2, 128, dtype=jnp.bfloat16))
    cu = jnp.array([0, 137, 537, 537, 750, 950], jnp.int32)  # an empty sequence, 50 padding

    def attn(q, k, v, cu, strategy="gather"):
        return fa3_jax.flash_attention_varlen(q, k, v, cu, cu, max_seqlen_q=400, max_seqlen_k=400,
                                              causal=True, return_lse=True,
                                              context_parallel=strategy)

    def loss(q, k, v, cu, strategy="gather"):
        o = attn(q, k, v, cu, strategy)[0]
        return jnp.sum(o.astype(jnp.float32) * jnp.cos(jnp.arange(o.shape[-1], dtype=jnp.float32)))

    one = [jax.device_put(x, gpus[0]) for x in (q, k, v, cu)]
    two = [jax.device_put(x, NamedSharding(mesh, P("seq"))) for x in (q, k, v)] + [
        jax.device_put(cu, NamedSharding(mesh, P()))]
    fwd = jax.jit(attn, static_argnums=4)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=4)
    (out2, lse2), (out1, lse1) = fwd(*two, "ring"), fwd(*one)
    assert _rel_err(out2, out1) < 1e-2 and max_err(lse2, lse1) < 1e-2
    assert not np.isnan(np.asarray(out2, np.float32)).any()
    assert np.all(np.asarray(out2[950:]) == 0) and np.all(np.isneginf(np.asarray(lse2[:, 950:])))
    for name, a, b in zip(("dq", "dk", "dv"), grad(*two, "ring"), grad(*one)):
        assert _rel_err(a, b) < 1e-2, (name, _rel_err(a, b))
    found = set(_collectives(grad.lower(*two, "ring").compile().as_text()))
    assert "collective-permute" in found and found <= {"collective-permute", "all-gather"}, found


def _train_module():
    spec = importlib.util.spec_from_file_location("train_transformer",
                                                  ROOT / "benchmarks" / "train_transformer.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # Flax's dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@needs_two
def test_data_parallel_training_tracks_one_gpu():
    """A Flax training step with the batch split over 2 GPUs gives one GPU's losses."""
    tt = _train_module()
    gpus = _gpus()[:2]
    mesh = Mesh(np.array(gpus), ("data",))
    steps, batch, seq, vocab = 8, 8, 512, 64
    model = tt.Transformer(vocab, 2, 8, 2, 128, "fa3_jax", jnp.bfloat16)
    batches = tt.make_batches(jax.random.PRNGKey(0), steps, batch, seq, vocab)
    params0 = model.init(jax.random.PRNGKey(1), batches[0][:, :-1])

    def loss_fn(params, tokens):
        logits = model.apply(params, tokens[:, :-1])
        return -jnp.mean(jnp.sum(jax.nn.one_hot(tokens[:, 1:], vocab)
                                 * jax.nn.log_softmax(logits), axis=-1))

    @jax.jit
    def step(params, tokens):
        loss, g = jax.value_and_grad(loss_fn)(params, tokens)
        return jax.tree.map(lambda p, g: p - 0.01 * g, params, g), loss

    def run(put_params, put_tokens):
        params, losses, text = put_params(params0), [], None
        for tokens in batches:
            tokens = put_tokens(tokens)
            if text is None:
                text = step.lower(params, tokens).compile().as_text()
            params, loss = step(params, tokens)
            losses.append(float(loss))
        return losses, text

    one, _ = run(lambda p: jax.device_put(p, gpus[0]), lambda t: jax.device_put(t, gpus[0]))
    two, text = run(lambda p: jax.device_put(p, NamedSharding(mesh, P())),
                    lambda t: jax.device_put(t, NamedSharding(mesh, P("data"))))
    # The attention inputs stay batch-sharded: the only collectives are gradient reductions.
    assert "all-gather" not in _collectives(text), _collectives(text)
    print("losses, 1 GPU :", " ".join(f"{x:.4f}" for x in one))
    print("losses, 2 GPUs:", " ".join(f"{x:.4f}" for x in two))
    assert np.isfinite(two).all() and two[-1] < two[0]
    np.testing.assert_allclose(two, one, rtol=5e-3, atol=5e-3)


_CMD_BUFFER_SCRIPT = r"""
import json
import jax, jax.numpy as jnp
import fa3_jax
from fa3_jax import _ffi

kq, kk, kv, kw = jax.random.split(jax.random.PRNGKey(0), 4)
shape = (2, 384, 4, 64)
q, k, v = (jax.random.normal(x, shape, jnp.float32).astype(jnp.bfloat16) for x in (kq, kk, kv))
w = jax.random.normal(kw, shape, jnp.float32)

def loss(q, k, v):
    o = fa3_jax.flash_attention(q, k, v, causal=True, deterministic=True)
    return jnp.sum(o.astype(jnp.float32) * w) / 100.0

@jax.jit
def step(q, k, v):
    l, g = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
    return l, tuple((x.astype(jnp.float32) - 0.5 * gx.astype(jnp.float32)).astype(x.dtype)
                    for x, gx in zip((q, k, v), g))

losses = []
for _ in range(8):
    l, (q, k, v) = step(q, k, v)
    losses.append(float(l))
print(json.dumps(dict(losses=losses, **_ffi.cuda_call_stats())))
"""


def _run_with_flags(flags):
    env = dict(os.environ, XLA_FLAGS=flags, CUDA_VISIBLE_DEVICES=os.environ.get(
        "CUDA_VISIBLE_DEVICES", "0").split(",")[0], XLA_PYTHON_CLIENT_PREALLOCATE="false")
    res = subprocess.run([sys.executable, "-c", _CMD_BUFFER_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_training_step_with_command_buffers_on_and_off():
    """XLA's command buffers (CUDA graphs) capture the fa3 calls (the handler sees its stream
    capturing), and their replays give the losses of plain launches (deterministic backward, so
    bit for bit)."""
    base = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                    if "command_buffer" not in f and "host_platform_device_count" not in f)
    runs = {
        "default": _run_with_flags(f"{base} --xla_gpu_graph_min_graph_size=1"),
        "custom calls": _run_with_flags(
            f"{base} --xla_gpu_graph_min_graph_size=1 "
            "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL"),
        "off": _run_with_flags(f"{base} --xla_gpu_enable_command_buffer="),
    }
    for name, r in runs.items():
        print(f"command buffers {name:>12}: handler calls {r['calls']}, during capture "
              f"{r['captured']}; losses " + " ".join(repr(x) for x in r["losses"]))
    off = runs["off"]
    assert off["captured"] == 0 and off["calls"] == 16  # 8 steps x (forward + backward)
    assert len(set(off["losses"])) > 1, "the loss must change from step to step"
    assert runs["custom calls"]["captured"] >= 2, "no fa3 call was captured in a command buffer"
    for name in ("default", "custom calls"):
        np.testing.assert_array_equal(runs[name]["losses"], off["losses"], err_msg=name)

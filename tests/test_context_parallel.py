"""Context parallelism on 8 CPU devices: a sequence-sharded q/k/v under jit runs as a ring (or
with K/V all-gathered), equal to one device in forward and gradients, without gathering q/k/v."""

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import fa3_jax
from fa3_jax import context_parallel as cp
from util import fresh_key, make_qkv, max_err, packed_ids, segment_reference

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices "
                                "(tests/conftest.py sets --xla_force_host_platform_device_count=8)")

TOL = 2e-5  # float32: the ring merges per-step results through the lse, in another order


def _mesh(shape, names):
    n = int(np.prod(shape))
    return Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


def _collectives(text):
    found = re.findall(r"\b(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)"
                       r"(?:-start)?\(", text)
    return {name: found.count(name) for name in sorted(set(found))}


def _attention_and_grads(dout, dlse, **kw):
    """Jitted (out, lse) of attn(q, k, v, *ids) and the gradients of <out, dout> + <lse, dlse>
    (dlse exercises the lse cotangent); ids: none, or (q_segment_ids, kv_segment_ids). They run
    sharded when their inputs are."""
    def attn(q, k, v, *ids):
        seg = dict(zip(("q_segment_ids", "kv_segment_ids"), ids))
        return fa3_jax.flash_attention(q, k, v, return_lse=True, **seg, **kw)

    def loss(*args):
        out, lse = attn(*args)
        return jnp.sum(out * dout) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * dlse)

    return jax.jit(attn), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _gathered_dtypes(text):
    """Element types of every all-gather's result in compiled HLO text."""
    kinds = set()
    for m in re.finditer(r"=\s*(.*?)\s+all-gather(?:-start)?\(", text):
        kinds.update(re.findall(r"\b([a-z]+[0-9]*)\[", m.group(1)))
    return kinds


def _check_sequence_parallel(mesh, spec, q, k, v, ids=(), *, load_balance=0, strategy="ring",
                             **kw):
    """Runs attention on q/k/v sharded by ``spec`` (segment ids ``ids``, if any, sharded like
    their sequence) and checks out, lse and gradients against one device and the float32
    reference, padding rows (id 0) included. Returns the collectives of the forward and the
    gradient, and the element types all-gathered."""
    n = load_balance
    dout = jax.random.normal(fresh_key(), q.shape[:3] + (v.shape[3],), jnp.float32)
    dlse = jax.random.normal(fresh_key(), (q.shape[0], q.shape[2], q.shape[1]), jnp.float32)
    ref_fwd, ref_grad = _attention_and_grads(dout, dlse, **kw)
    ref_out, ref_lse = ref_fwd(q, k, v, *ids)
    ref_grads = ref_grad(q, k, v, *ids)
    f32_out, f32_lse = (segment_reference(q, k, v, *ids, **kw) if ids else
                        fa3_jax.attention_reference(q, k, v, return_lse=True, **kw))
    assert max_err(ref_out, f32_out) <= TOL and max_err(ref_lse, f32_lse) <= TOL

    # The load-balanced layout is applied outside jit, as to token ids on the host.
    lay = (lambda x, axis=1: cp.load_balance_reorder(x, n, axis)) if n else (lambda x, axis=1: x)
    back = (lambda x, axis=1: cp.load_balance_restore(x, n, axis)) if n else (lambda x, axis=1: x)
    sharding = NamedSharding(mesh, spec)
    id_sharding = NamedSharding(mesh, P(*tuple(spec)[:2]))
    args = [jax.device_put(lay(x), sharding) for x in (q, k, v)]
    args += [jax.device_put(lay(x), id_sharding) for x in ids]
    fwd, grad = _attention_and_grads(lay(dout), lay(dlse, 2), load_balance=n,
                                     context_parallel=strategy, **kw)
    out, lse = fwd(*args)
    assert out.sharding.is_equivalent_to(sharding, 4), out.sharding
    out, lse = back(out), back(lse, 2)
    assert max_err(out, ref_out) <= TOL and max_err(lse, ref_lse) <= TOL
    # Rows that see no key (padding, or a document with no visible key): out 0, lse -inf.
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(np.asarray(ref_lse)))
    assert not np.isnan(np.asarray(out)).any()
    for name, g, r in zip(("dq", "dk", "dv"), grad(*args), ref_grads):
        assert g.sharding.is_equivalent_to(sharding, 4), (name, g.sharding)
        err = max_err(back(g), r)
        assert err <= TOL, f"{name}: max error {err:.3g}"
    texts = [f.lower(*args).compile().as_text() for f in (fwd, grad)]
    return ([_collectives(t) for t in texts], set().union(*map(_gathered_dtypes, texts)))


SEQ = P(None, "seq", None, None)
BATCH_SEQ = P("data", "seq", None, None)
HEAD_SEQ = P(None, "seq", "model", None)

# (mesh shape, axis names, spec, batch, seqlen, heads_q, heads_kv, head_dim, load_balance, kw)
CASES = {
    "4way-causal": ((4,), ("seq",), SEQ, 2, 64, 4, 2, 32, 0, dict(causal=True)),
    "4way-full-gqa": ((4,), ("seq",), SEQ, 1, 96, 8, 2, 64, 0, dict()),
    "8way-causal-balanced": ((8,), ("seq",), SEQ, 1, 144, 4, 4, 32, 8, dict(causal=True)),
    "8way-window-softcap": ((8,), ("seq",), SEQ, 1, 192, 4, 1, 32, 0,
                            dict(window_size=(20, 5), softcap=8.0)),
    "2x4-batch-causal-balanced": ((2, 4), ("data", "seq"), BATCH_SEQ, 2, 64, 4, 2, 32, 4,
                                  dict(causal=True)),
    "2x4-heads-window": ((4, 2), ("seq", "model"), HEAD_SEQ, 1, 128, 4, 2, 32, 4,
                         dict(window_size=(40, 0))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ring_equals_one_device(case):
    shape, names, spec, b, s, hq, hkv, d, lb, kw = CASES[case]
    q, k, v = make_qkv(b, s, s, hq, hkv, d)
    (fwd, grad), _ = _check_sequence_parallel(_mesh(shape, names), spec, q, k, v,
                                              load_balance=lb, **kw)
    # Ring: K/V and dK/dV travel by collective-permute; nothing is gathered, in either direction.
    assert "all-gather" not in fwd and "all-gather" not in grad, (fwd, grad)
    assert fwd.get("collective-permute", 0) >= 2 and grad.get("collective-permute", 0) >= 4, \
        (fwd, grad)
    if shape == (4,):
        # K and V travel as one buffer, the last step sends none: n - 1 = 3 transfers forward;
        # the backward adds 3 of K|V and 3 of dK|dV (two hops of the running sums, one home).
        assert fwd["collective-permute"] == 3 and grad["collective-permute"] == 9, (fwd, grad)
    print(f"{case}: forward {fwd}, forward+backward {grad}")


def test_all_gather_strategy_equals_one_device():
    q, k, v = make_qkv(2, 64, 64, 4, 2, 32)
    (fwd, grad), _ = _check_sequence_parallel(_mesh((4,), ("seq",)), SEQ, q, k, v,
                                              load_balance=4, strategy="all_gather", causal=True)
    assert set(fwd) == {"all-gather"} and "reduce-scatter" in grad, (fwd, grad)
    assert "collective-permute" not in grad, grad


def test_sequence_lengths_differ():
    """seqlen_q != seqlen_k: chunks of different lengths, bottom-right aligned causal band."""
    q, _, _ = make_qkv(1, 64, 64, 4, 2, 32)
    _, k, v = make_qkv(1, 128, 128, 4, 2, 32)
    (fwd, _), _ = _check_sequence_parallel(_mesh((4,), ("seq",)), SEQ, q, k, v, causal=True)
    assert "all-gather" not in fwd, fwd


# ---- segment ids (packed documents) on a sharded sequence --------------------------------------

# (mesh shape, axis names, spec, batch, seqlen, heads_q, heads_kv, head_dim, load_balance,
#  document lengths per batch row (the rest padding), kw)
SEGMENT_CASES = {
    "4way-causal-gqa": ((4,), ("seq",), SEQ, 2, 64, 4, 2, 32, 0, [[7, 20, 1, 30], [33, 31]],
                        dict(causal=True)),
    "4way-causal-balanced": ((4,), ("seq",), SEQ, 1, 64, 4, 4, 32, 4, [[5, 40, 11]],
                             dict(causal=True)),
    "2x4-batch-window-softcap": ((2, 4), ("data", "seq"), BATCH_SEQ, 2, 128, 4, 1, 32, 0,
                                 [[60, 50], [128]], dict(window_size=(20, 3), softcap=8.0)),
}


@pytest.mark.parametrize("case", list(SEGMENT_CASES))
def test_segment_ids_ring_equals_one_device(case):
    shape, names, spec, b, s, hq, hkv, d, lb, docs, kw = SEGMENT_CASES[case]
    q, k, v = make_qkv(b, s, s, hq, hkv, d)
    ids = packed_ids(b, s, docs)
    (fwd, grad), gathered = _check_sequence_parallel(_mesh(shape, names), spec, q, k, v,
                                                     (ids, ids), load_balance=lb, **kw)
    # K/V (and dK/dV) travel by collective-permute as without ids; only the int32 key ids are
    # all-gathered, once.
    assert fwd.get("collective-permute", 0) >= 2 and grad.get("collective-permute", 0) >= 4, \
        (fwd, grad)
    assert gathered <= {"s32"}, gathered
    if shape == (4,):
        assert fwd["collective-permute"] == 3 and grad["collective-permute"] == 9, (fwd, grad)


def test_segment_ids_all_gather_and_lengths_differ():
    """The all_gather strategy with the load-balanced layout; and seqlen_q != seqlen_k (the
    queries are the last 64 tokens of a 128-token packed row)."""
    q, k, v = make_qkv(2, 64, 64, 4, 2, 32)
    ids = packed_ids(2, 64, [[9, 50], [1, 63]])
    _, gathered = _check_sequence_parallel(_mesh((4,), ("seq",)), SEQ, q, k, v, (ids, ids),
                                           load_balance=4, strategy="all_gather", causal=True)
    assert gathered <= {"s32", "f32"}, gathered  # K/V once (float32 here), and the ids
    q, _, _ = make_qkv(1, 64, 64, 4, 2, 32)
    _, k, v = make_qkv(1, 128, 128, 4, 2, 32)
    kv_ids = packed_ids(1, 128, [[40, 50, 30]])
    _check_sequence_parallel(_mesh((4,), ("seq",)), SEQ, q, k, v, (kv_ids[:, 64:], kv_ids),
                             causal=True)


def test_segment_ids_load_balanced_on_one_device():
    """load_balance with segment ids and no sharded sequence: the kernels see natural order."""
    q, k, v = make_qkv(1, 64, 64, 4, 2, 32)
    ids = packed_ids(1, 64, [[10, 30, 20]])
    ref = fa3_jax.flash_attention(q, k, v, causal=True, q_segment_ids=ids, kv_segment_ids=ids)
    lay = [fa3_jax.load_balance_reorder(x, 2) for x in (q, k, v, ids)]
    out = jax.jit(partial(fa3_jax.flash_attention, causal=True, load_balance=2))(
        *lay[:3], q_segment_ids=lay[3], kv_segment_ids=lay[3])
    assert max_err(fa3_jax.load_balance_restore(out, 2), ref) <= TOL


def test_memory_falls_with_shard_count():
    q, k, v = make_qkv(1, 1024, 1024, 4, 2, 64)

    def temp_bytes(n, strategy):
        mesh = _mesh((n,), ("seq",))
        args = [jax.device_put(x, NamedSharding(mesh, SEQ)) for x in (q, k, v)]
        loss = lambda q, k, v: jnp.sum(fa3_jax.flash_attention(  # noqa: E731
            q, k, v, causal=True, context_parallel=strategy) ** 2)
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    ring = {n: temp_bytes(n, "ring") for n in (2, 4, 8)}
    gathered = temp_bytes(8, "gather")
    print(f"per-device temp bytes, forward+backward, seq 1024: ring {ring}, gather (8) {gathered}")
    assert ring[8] < ring[4] < ring[2], ring
    assert ring[8] <= 0.6 * ring[4] and ring[8] < gathered / 4, (ring, gathered)


def test_block_band_skips_and_normalises():
    # Causal (band <= 0) on 16 x 16 blocks: below the diagonal full, on it causal, above skipped.
    assert cp.block_band(-cp.UNBOUNDED, 0, 32, 0, 16, 16) == (-cp.UNBOUNDED, cp.UNBOUNDED)
    assert cp.block_band(-cp.UNBOUNDED, 0, 16, 16, 16, 16) == (-cp.UNBOUNDED, 0)
    assert cp.block_band(-cp.UNBOUNDED, 0, 0, 16, 16, 16) is None
    # A window of 20 back: block 32 back is partly visible, block 48 back is not.
    assert cp.block_band(-20, 0, 48, 16, 16, 16) == (12, cp.UNBOUNDED)
    assert cp.block_band(-20, 0, 64, 16, 16, 16) is None


def _render(calls, rows, cols):
    """How often each (local query, key) element is computed by ``calls``."""
    count = np.zeros((rows, cols), np.int32)
    for c in calls or ():
        i, j = np.arange(c.q1 - c.q0)[:, None], np.arange(c.k1 - c.k0)[None, :]
        count[c.q0:c.q1, c.k0:c.k1] += ((j - i >= c.lo) & (j - i <= c.hi)).astype(np.int32)
    return count


@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_step_calls_compute_each_visible_pair_once(n, balanced):
    """Every ring step's kernel calls (and the row halves the backward splits the own step into)
    cover exactly the visible (query, key) pairs of the global band, each once; the
    load-balanced causal layout needs one call per step."""
    c = 2 if balanced else 1
    shards = cp.SeqShards("seq", n, balanced, "ring")
    for sq, sk in ((12, 12), (6, 12), (18, 6)):
        cq, ck = sq // (n * c), sk // (n * c)
        bands = {"causal": (-cp.UNBOUNDED, sk - sq), "full": (-cp.UNBOUNDED, cp.UNBOUNDED),
                 "window": (sk - sq - 3, sk - sq + 1), "wide window": (sk - sq - 9, sk - sq)}
        for name, (lo, hi) in bands.items():
            for t in range(n):
                plans = cp._step_plans(shards, t, cq, ck, lo, hi)
                for r, calls in enumerate(plans):
                    gq = np.concatenate([np.arange(cq) + x * cq for x in shards.chunk_ids(r)])
                    gk = np.concatenate([np.arange(ck) + x * ck
                                         for x in shards.chunk_ids((r - t) % n)])
                    d = gk[None, :] - gq[:, None]
                    want = ((d >= lo) & (d <= hi)).astype(np.int32)
                    where = f"{name} sq={sq} sk={sk} step {t} device {r}: {calls}"
                    np.testing.assert_array_equal(_render(calls, c * cq, c * ck), want, where)
                    for m in range(c * cq + 1):
                        halves = cp.split_calls(calls, m)
                        assert all(x.q1 <= m for x in halves[0] or ()), where
                        assert all(x.q0 >= m for x in halves[1] or ()), where
                        got = sum(_render(h, c * cq, c * ck) for h in halves)
                        np.testing.assert_array_equal(got, want, f"{where} split {m}")
                    if balanced and name in ("causal", "full") and sq == sk:
                        assert calls is None or len(calls) == 1, where
    # The balanced causal layout's own step is the local causal mask, in one call.
    assert cp._step_plans(shards, 0, 4, 4, -cp.UNBOUNDED, 0)[0] == (
        cp.Call(0, 4 * c, 0, 4 * c, -cp.UNBOUNDED, 0),) if balanced else True


def test_load_balance_helpers():
    x = jnp.arange(2 * 24).reshape(2, 24)
    y = fa3_jax.load_balance_reorder(x, 3)
    # 6 chunks of 4: device 0 holds chunks 0 and 5, device 1 chunks 1 and 4, device 2 chunks 2, 3.
    order = [0, 5, 1, 4, 2, 3]
    np.testing.assert_array_equal(y[0], np.concatenate([np.arange(4 * c, 4 * c + 4)
                                                        for c in order]))
    np.testing.assert_array_equal(fa3_jax.load_balance_restore(y, 3), x)
    lse = jnp.arange(24.0).reshape(1, 1, 24)
    np.testing.assert_array_equal(fa3_jax.load_balance_restore(
        fa3_jax.load_balance_reorder(lse, 2, axis=-1), 2, axis=2), lse)
    with pytest.raises(ValueError, match="multiple of 10"):
        fa3_jax.load_balance_reorder(x, 5)


def test_argument_errors():
    q, k, v = make_qkv(1, 24, 24, 2, 2, 32)
    with pytest.raises(ValueError, match="context_parallel must be one of"):
        fa3_jax.flash_attention(q, k, v, context_parallel="ulysses")
    with pytest.raises(ValueError, match="multiples of 16"):
        fa3_jax.flash_attention(q, k, v, load_balance=8)
    with pytest.raises(TypeError, match="load_balance must be an int"):
        fa3_jax.flash_attention(q, k, v, load_balance=True)


@pytest.mark.parametrize("sharded", [False, True])
def test_load_balanced_layout_without_matching_shards(sharded):
    """The layout is honoured on one device and on a shard count it was not made for (there the
    sequence is gathered): same result as natural order."""
    q, k, v = make_qkv(1, 64, 64, 4, 2, 32)
    ref = fa3_jax.flash_attention(q, k, v, causal=True)
    args = [fa3_jax.load_balance_reorder(x, 2) for x in (q, k, v)]
    if sharded:
        args = [jax.device_put(x, NamedSharding(_mesh((4,), ("seq",)), SEQ)) for x in args]
    out = jax.jit(partial(fa3_jax.flash_attention, causal=True, load_balance=2))(*args)
    assert max_err(fa3_jax.load_balance_restore(out, 2), ref) <= TOL


def test_drop_in_under_checkpoint():
    """The jax.nn drop-in (top-left causal), under jax.checkpoint, on a sequence-sharded batch."""
    mesh = _mesh((2, 4), ("data", "seq"))
    q, k, v = make_qkv(2, 64, 64, 4, 2, 32)
    attn = jax.checkpoint(partial(fa3_jax.dot_product_attention, is_causal=True))

    def loss(q, k, v):
        return jnp.sum(jnp.sin(attn(q, k, v)))

    ref = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    args = [jax.device_put(x, NamedSharding(mesh, BATCH_SEQ)) for x in (q, k, v)]
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    got = step(*args)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):  # the loss sums 16k terms
        assert max_err(g, r) <= TOL * max(1.0, float(jnp.max(jnp.abs(r))))
    assert "all-gather" not in _collectives(step.lower(*args).compile().as_text())


def test_flax_training_step():
    """A jit-compiled Flax training step, tokens sharded over batch (2) and sequence (4) in the
    load-balanced layout, equals the same step on one device in natural order."""
    nn = pytest.importorskip("flax.linen")
    vocab, seqlen, width, heads, kv_heads, shards = 32, 64, 64, 4, 2, 4

    class Block(nn.Module):
        load_balance: int

        @nn.compact
        def __call__(self, tokens, positions):
            x = nn.Embed(vocab, width)(tokens) + nn.Embed(seqlen, width)(positions)
            b, s, _ = x.shape
            q = nn.Dense(width, use_bias=False)(x).reshape(b, s, heads, width // heads)
            kv = nn.Dense(2 * kv_heads * (width // heads), use_bias=False)(x)
            k, v = jnp.split(kv.reshape(b, s, 2 * kv_heads, width // heads), 2, axis=2)
            attention = nn.remat(lambda mdl, q, k, v: fa3_jax.flash_attention(
                q, k, v, causal=True, load_balance=self.load_balance))
            a = attention(self, q, k, v).reshape(b, s, width)
            return nn.Dense(vocab)(x + nn.Dense(width)(a))

    tokens = jax.random.randint(fresh_key(), (2, seqlen + 1), 0, vocab)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = jnp.broadcast_to(jnp.arange(seqlen), inputs.shape)
    params = Block(0).init(fresh_key(), inputs, positions)

    def step(model, params, inputs, positions, labels):
        def loss(params):
            logits = model.apply(params, inputs, positions)
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))
        value, grads = jax.value_and_grad(loss)(params)
        return value, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    ref_loss, ref_params = jax.jit(partial(step, Block(0)))(params, inputs, positions, labels)

    mesh = _mesh((2, shards), ("data", "seq"))
    tok = NamedSharding(mesh, P("data", "seq"))
    lay = [jax.device_put(fa3_jax.load_balance_reorder(x, shards), tok)
           for x in (inputs, positions, labels)]
    sharded = jax.jit(partial(step, Block(shards)))
    loss, new_params = sharded(params, *lay)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5
    for g, r in zip(jax.tree.leaves(new_params), jax.tree.leaves(ref_params)):
        assert max_err(g, r) <= 1e-5
    text = sharded.lower(params, *lay).compile().as_text()
    assert "collective-permute" in _collectives(text), _collectives(text)


@pytest.mark.parametrize("strategy", ["ring", "all_gather"])
def test_varlen_token_axis_sharded(strategy):
    """flash_attention_varlen with its packed token axis sharded 4 ways and
    context_parallel=ring/all_gather: equal to one device (the varlen kernels) in out, lse and
    gradients; only int32 (the key ids) and, for all_gather, K/V are all-gathered, never q."""
    from test_varlen import make
    mesh = _mesh((4,), ("seq",))
    q, k, v, cu, _ = make([7, 30, 1, 0, 60, 22], [7, 30, 1, 0, 60, 22], 4, 2, 32, pad_q=8,
                          pad_k=8)
    kw = dict(causal=True, max_seqlen_q=128, max_seqlen_k=128, return_lse=True)
    dout = jax.random.normal(fresh_key(), q.shape[:2] + v.shape[2:])
    dlse = jax.random.normal(fresh_key(), (q.shape[1], q.shape[0]))

    def compiled(**extra):
        def attn(q, k, v, cu):
            return fa3_jax.flash_attention_varlen(q, k, v, cu, cu, **kw, **extra)

        def loss(q, k, v, cu):
            out, lse = attn(q, k, v, cu)
            return jnp.sum(out * dout) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * dlse)

        return jax.jit(attn), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    ref_fwd, ref_grad = compiled()
    ref_out, ref_lse = ref_fwd(q, k, v, cu)
    sharding = NamedSharding(mesh, P("seq", None, None))
    args = [jax.device_put(x, sharding) for x in (q, k, v)] + [cu]
    fwd, grad = compiled(context_parallel=strategy)
    out, lse = fwd(*args)
    assert out.sharding.is_equivalent_to(sharding, 3), out.sharding
    assert max_err(out, ref_out) <= TOL and max_err(lse, ref_lse) <= TOL
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(np.asarray(ref_lse)))
    for name, g, r in zip(("dq", "dk", "dv"), grad(*args), ref_grad(q, k, v, cu)):
        assert g.sharding.is_equivalent_to(sharding, 3), (name, g.sharding)
        assert max_err(g, r) <= TOL, (name, max_err(g, r))
    texts = [f.lower(*args).compile().as_text() for f in (fwd, grad)]
    gathered = set().union(*map(_gathered_dtypes, texts))
    if strategy == "ring":
        assert gathered <= {"s32"}, gathered
        assert _collectives(texts[0]).get("collective-permute", 0) == 3, _collectives(texts[0])
    else:
        assert gathered <= {"s32", "f32"}, gathered
    # The gather default all-gathers q itself (float32 here): the strategies above do not.
    assert "f32" in _gathered_dtypes(ref_fwd.lower(*args).compile().as_text())

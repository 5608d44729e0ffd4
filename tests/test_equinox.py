"""fa3_jax inside an Equinox model: a jit-compiled training step matches jax.nn attention."""

import jax
import jax.numpy as jnp
import pytest

import fa3_jax
from util import max_err

eqx = pytest.importorskip("equinox")


class Attention(eqx.Module):
    qkv: eqx.nn.Linear
    out: eqx.nn.Linear
    heads: int = eqx.field(static=True)
    use_fa3: bool = eqx.field(static=True)

    def __init__(self, dim, heads, use_fa3, key):
        k1, k2 = jax.random.split(key)
        self.qkv = eqx.nn.Linear(dim, 3 * dim, key=k1)
        self.out = eqx.nn.Linear(dim, dim, key=k2)
        self.heads = heads
        self.use_fa3 = use_fa3

    def __call__(self, x):  # x [seq, dim]
        s, d = x.shape
        q, k, v = jnp.split(jax.vmap(self.qkv)(x), 3, axis=-1)
        q, k, v = (t.reshape(1, s, self.heads, d // self.heads) for t in (q, k, v))
        if self.use_fa3:
            a = fa3_jax.flash_attention(q, k, v, causal=True)
        else:
            a = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return jax.vmap(self.out)(a.reshape(s, d))


def test_equinox_training_step_matches_jax_nn():
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 24, 64))  # batch of sequences, vmapped

    def make(flag):
        return Attention(64, 4, flag, key)

    @eqx.filter_jit
    def step(model, x):
        def loss(m):
            return jnp.mean(jax.vmap(m)(x) ** 2)
        value, grads = eqx.filter_value_and_grad(loss)(model)
        model = jax.tree.map(lambda p, g: p - 0.1 * g, model, grads)
        return model, value

    m_fa3, m_ref = make(True), make(False)
    for _ in range(3):
        m_fa3, l_fa3 = step(m_fa3, x)
        m_ref, l_ref = step(m_ref, x)
        assert abs(float(l_fa3) - float(l_ref)) < 1e-5
    assert max_err(m_fa3.qkv.weight, m_ref.qkv.weight) < 1e-5


# fa3_jax.equinox.MultiheadAttention against equinox.nn.MultiheadAttention with the same weights.

def _pair(**kw):
    from fa3_jax.equinox import MultiheadAttention
    args = dict(num_heads=4, query_size=32, key_size=24, value_size=20, output_size=28,
                qk_size=16, vo_size=8, use_query_bias=True, use_value_bias=True,
                use_output_bias=True, **kw)
    key = jax.random.PRNGKey(3)
    return eqx.nn.MultiheadAttention(**args, key=key), MultiheadAttention(**args, key=key)


def _inputs(b=2, t=10, s=13):
    ks = jax.random.split(jax.random.PRNGKey(4), 3)
    return (jax.random.normal(ks[0], (b, t, 32)), jax.random.normal(ks[1], (b, s, 24)),
            jax.random.normal(ks[2], (b, s, 20)))


def _served_as_expected(fn, *args):
    """Whether fn binds the kernels, where they take float32 with these head sizes (16 and 8;
    CPU: always). Elsewhere the module falls back to Equinox's attention instead."""
    from fa3_jax import nn as fnn
    x = jax.ShapeDtypeStruct((1, 1, 1, 16), jnp.float32)
    v = jax.ShapeDtypeStruct((1, 1, 1, 8), jnp.float32)
    return ("fa3_fwd" in str(jax.make_jaxpr(fn)(*args))) == (fnn._gpu_unsupported(x, v) is None)


@pytest.mark.parametrize("causal", [False, True])
def test_multihead_attention_matches_equinox(causal):
    ref, mod = _pair()
    q, k, v = _inputs()
    mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool)) if causal else None

    def loss(m, q, k, v, **kw):
        y = jax.vmap(lambda q, k, v: m(q, k, v, **kw))(q, k, v)
        return jnp.sum(jnp.sin(y)), y

    grad = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))
    (_, y), g = grad(mod, q, k, v, is_causal=causal)
    (_, y_ref), g_ref = grad(ref, q, k, v, mask=mask)
    assert _served_as_expected(lambda q: loss(mod, q, k, v, is_causal=causal), q)
    assert y.shape == y_ref.shape == (2, 10, 28)
    assert max_err(y, y_ref) < 1e-5
    leaves, ref_leaves = jax.tree.leaves(g), jax.tree.leaves(g_ref)
    assert len(leaves) == len(ref_leaves) == 7
    for a, b in zip(leaves, ref_leaves):
        assert max_err(a, b) < 1e-4
    # A concrete causal mask (eager call) is recognised and served as is_causal.
    if causal:
        assert max_err(mod(q[0], k[0], v[0], mask), ref(q[0], k[0], v[0], mask)) < 1e-5


def test_multihead_attention_fallbacks_and_conversion():
    import warnings
    from fa3_jax import equinox as feqx
    ref, mod = _pair(dropout_p=0.2)
    q, k, v = (x[0] for x in _inputs())
    feqx._WARNED.clear()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y = mod(q, k, v, key=jax.random.PRNGKey(5))  # dropout on: Equinox's own attention
        mask = jax.random.bernoulli(jax.random.PRNGKey(6), 0.7, (10, 13)).at[:, 0].set(True)
        y_mask = eqx.filter_jit(lambda m, mask: m(q, k, v, mask, inference=True))(mod, mask)
    msgs = [str(w.message) for w in rec if "fa3_jax.equinox" in str(w.message)]
    assert len(msgs) == 2 and "dropout" in msgs[0] and "mask" in msgs[1], msgs
    assert max_err(y, ref(q, k, v, key=jax.random.PRNGKey(5))) < 1e-6
    assert max_err(y_mask, ref(q, k, v, mask, inference=True)) < 1e-6
    assert _served_as_expected(lambda q: mod(q, k, v, inference=True), q)

    converted = feqx.MultiheadAttention.from_equinox(ref)
    assert isinstance(converted, eqx.nn.MultiheadAttention)
    assert max_err(converted(q, k, v, inference=True), ref(q, k, v, inference=True)) < 1e-5

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

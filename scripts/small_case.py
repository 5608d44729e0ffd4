"""One small forward + backward through the Hopper kernels, for compute-sanitizer."""

import jax
import jax.numpy as jnp

import fa3_jax

key = jax.random.PRNGKey(0)
for d in fa3_jax.cuda_head_dims():
    for causal in (False, True):
        kq, kk, kv, key = jax.random.split(key, 4)
        q = jax.random.normal(kq, (1, 200, 4, d), jnp.bfloat16)
        k = jax.random.normal(kk, (1, 333, 2, d), jnp.bfloat16)
        v = jax.random.normal(kv, (1, 333, 2, d), jnp.bfloat16)
        f = lambda q, k, v: jnp.sum(fa3_jax.flash_attention(q, k, v, causal=causal).astype(jnp.float32))  # noqa
        val, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)
        jax.block_until_ready(grads)
        print(f"head_dim {d} causal {causal}: ok, loss {float(val):.4f}")

# Decode shapes: split-KV (few tiles, many keys), seqlen_q-1 GQA packing in the kernel and
# seqlen_q-4 row packing around it; FA3_JAX_FWD_NUM_SPLITS=5 adds empty splits at seqlen_k 300.
for sq, sk, kw in ((1, 1000, dict(causal=True)), (4, 1000, dict()), (7, 300, dict(causal=True)),
                   (1, 300, dict(window_size=(100, 0)))):
    kq, kk, kv, key = jax.random.split(key, 4)
    d = fa3_jax.cuda_head_dims()[0]
    q = jax.random.normal(kq, (2, sq, 8, d), jnp.bfloat16)
    k = jax.random.normal(kk, (2, sk, 2, d), jnp.bfloat16)
    v = jax.random.normal(kv, (2, sk, 2, d), jnp.bfloat16)
    out, lse = jax.jit(lambda q, k, v: fa3_jax.flash_attention(q, k, v, return_lse=True, **kw))(q, k, v)  # noqa
    jax.block_until_ready(out)
    print(f"decode sq {sq} sk {sk} {kw}: ok, sum {float(jnp.sum(out.astype(jnp.float32))):.4f}")
# Varlen with out-of-range and non-monotonic cu_seqlens: clamped on the device (cpp/flash.h), so
# every kernel must stay in bounds.
d = fa3_jax.cuda_head_dims()[0]
kq, kk, kv, key = jax.random.split(key, 4)
q = jax.random.normal(kq, (300, 4, d), jnp.bfloat16)
k = jax.random.normal(kk, (250, 2, d), jnp.bfloat16)
v = jax.random.normal(kv, (250, 2, d), jnp.bfloat16)
cu_q = jnp.array([-5, 90, 40, 700, 2 ** 31 - 1, 299], jnp.int32)
cu_k = jnp.array([3, 2 ** 31 - 1, 0, 100, -7, 7], jnp.int32)
fv = lambda q: fa3_jax.flash_attention_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=300,  # noqa
                                              max_seqlen_k=250, causal=True)
val, grad = jax.jit(jax.value_and_grad(lambda q: jnp.sum(fv(q).astype(jnp.float32))))(q)
jax.block_until_ready(grad)
print(f"varlen head_dim {d}: ok, loss {float(val):.4f}")

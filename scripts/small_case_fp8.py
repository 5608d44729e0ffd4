"""Small calls of the Hopper FP8 forward, for compute-sanitizer: per-tensor and per-block
descales, causal with seqlen_q != seqlen_k, GQA, lengths that are not multiples of 16 (the vt
padding) and rows that see no key."""

import jax
import jax.numpy as jnp

import fa3_jax
from fa3_jax import fp8

key = jax.random.PRNGKey(0)
for d in (x for x in (64, 128, 256) if x in fa3_jax.cuda_head_dims()):
    for sq, sk, causal, block in ((200, 333, False, True), (333, 200, True, False),
                                  (7, 1, True, True)):
        kq, kk, kv, key = jax.random.split(key, 4)
        q = jax.random.normal(kq, (1, sq, 4, d), jnp.bfloat16)
        k = jax.random.normal(kk, (1, sk, 2, d), jnp.bfloat16)
        v = jax.random.normal(kv, (1, sk, 2, d), jnp.bfloat16)
        out, lse = jax.jit(lambda q, k, v: fa3_jax.fp8_attention(
            q, k, v, causal=causal, block_quantize=block, return_lse=True))(q, k, v)
        jax.block_until_ready(out)
        print(f"fp8 head_dim {d} sq {sq} sk {sk} causal {causal} block {block}: ok, "
              f"sum {float(jnp.sum(out.astype(jnp.float32))):.4f}")

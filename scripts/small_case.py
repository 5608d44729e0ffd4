"""One small forward + backward through the Hopper kernels, for compute-sanitizer.

`python scripts/small_case.py [HEAD_DIMS]`: HEAD_DIMS (e.g. 64,96) restricts the run to those
compiled head dims (default: all). On an H200 in session 14 compute-sanitizer itself segfaulted
(rc 139) at varying points, in three of three whole-script racecheck runs and in one of five
per-head-dim ones; scripts/device_check.sh runs it per head dim, so that a crash costs one part.
"""

import sys

import jax
import jax.numpy as jnp

import fa3_jax

if len(sys.argv) > 1:
    _wanted = tuple(int(x) for x in sys.argv[1].split(","))
    _missing = set(_wanted) - set(fa3_jax.cuda_head_dims())
    if _missing:
        sys.exit(f"head dims {sorted(_missing)} are not compiled: {fa3_jax.cuda_head_dims()}")
    fa3_jax.cuda_head_dims = lambda: _wanted  # noqa: E731 (the cases below ask it)

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
# Segment ids (forward and backward, both the plain and the deterministic backward): packed
# documents with padding id 0 in the middle and at the end, interleaved ids, seqlen_q != seqlen_k,
# causal. The prepare kernels read the ids and write block ranges into the workspace.
kq, kk, kv, key = jax.random.split(key, 4)
q = jax.random.normal(kq, (2, 211, 4, d), jnp.bfloat16)
k = jax.random.normal(kk, (2, 333, 2, d), jnp.bfloat16)
v = jax.random.normal(kv, (2, 333, 2, d), jnp.bfloat16)
q_ids = jnp.stack([jnp.repeat(jnp.array([1, 0, 2, 3, 0], jnp.int32), jnp.array([50, 9, 100, 40, 12]),
                              total_repeat_length=211),
                   jnp.arange(211, dtype=jnp.int32) % 3])
kv_ids = jnp.stack([jnp.repeat(jnp.array([1, 0, 2, 3, 0], jnp.int32), jnp.array([70, 20, 150, 80, 13]),
                               total_repeat_length=333),
                    jnp.arange(333, dtype=jnp.int32) % 3])
for det in (False, True):
    fs = lambda q, k, v: jnp.sum(fa3_jax.flash_attention(  # noqa
        q, k, v, causal=True, q_segment_ids=q_ids, kv_segment_ids=kv_ids,
        deterministic=det).astype(jnp.float32))
    val, grads = jax.jit(jax.value_and_grad(fs, argnums=(0, 1, 2)))(q, k, v)
    jax.block_until_ready(grads)
    print(f"segment ids head_dim {d} deterministic {det}: ok, loss {float(val):.4f}")
# More tiles than SMs, so each persistent CTA runs several tiles and reuses its shared memory
# across them (the next tile's Q and K/V loads against the last tile's O store, which at hdim 256
# goes through the V ring; the 128 x 176 tile at hdim 128 from 8k keys): forward only, every
# head dim, full and causal.
for d in fa3_jax.cuda_head_dims():
    # 16 x 8 x 2 tiles; at hdim 128, 8 x 17 tiles of 8192 keys (the wide tile, unsplit).
    shapes = ((16, False, 256, 256), (16, True, 256, 256)) + (((1, False, 2176, 8192),)
                                                              if d == 128 else ())
    for b, causal, sq, sk in shapes:
        kq, kk, kv, key = jax.random.split(key, 4)
        q = jax.random.normal(kq, (b, sq, 8, d), jnp.bfloat16)
        k = jax.random.normal(kk, (b, sk, 8, d), jnp.bfloat16)
        v = jax.random.normal(kv, (b, sk, 8, d), jnp.bfloat16)
        out = jax.jit(lambda q, k, v: fa3_jax.flash_attention(q, k, v, causal=causal))(q, k, v)
        jax.block_until_ready(out)
        print(f"many tiles head_dim {d} causal {causal} {sq}x{sk}: ok, "
              f"sum {float(jnp.sum(out.astype(jnp.float32))):.4f}")

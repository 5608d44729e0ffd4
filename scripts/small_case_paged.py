"""Small paged KV-cache decode calls for compute-sanitizer: pages of 16 (the 16-row boxes, V and
upper-K producer warps) and 64 at every compiled head dim, 48 at the first, each with one page
index out of range (read as zeros) and with the split count chosen (0) and forced (3)."""
import jax
import jax.numpy as jnp
import numpy as np

import fa3_jax

key = jax.random.PRNGKey(0)
dims = fa3_jax.cuda_head_dims()
cases = [(page, d) for d in dims for page in (16, 64)] + [(48, dims[0])]
for page, d in cases:
    kq, kk, kv, key = jax.random.split(key, 4)
    b, hkv, hq, cap = 2, 2, 8, 1024
    pages = b * cap // page
    q = jax.random.normal(kq, (b, 1, hq, d), jnp.bfloat16)
    kc = jax.random.normal(kk, (pages, page, hkv, d), jnp.bfloat16)
    vc = jax.random.normal(kv, (pages, page, hkv, d), jnp.bfloat16)
    table = np.random.default_rng(0).permutation(pages).astype(np.int32).reshape(b, cap // page)
    table[1, 2] = pages + 5  # out of range: must read as zeros, never out of bounds
    lengths = jnp.asarray([1000, 333], jnp.int32)
    for ns in (0, 3):
        out = jax.jit(lambda q, k, v, n, t, ns=ns: fa3_jax.flash_attention_with_kvcache(
            q, k, v, n, page_table=t, causal=True, num_splits=ns))(q, kc, vc, lengths,
                                                                   jnp.asarray(table))
        out = np.asarray(out.astype(jnp.float32))
        print(f"head_dim {d} page {page} splits {ns}: nan {np.isnan(out).any()} "
              f"sum {out.sum():.4f}", flush=True)

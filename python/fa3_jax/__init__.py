"""fa3_jax: FlashAttention-3 for JAX.

Public API:
  flash_attention(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1),
                  softcap=0.0, return_lse=False, deterministic=False, context_parallel="ring",
                  load_balance=0, q_segment_ids=None, kv_segment_ids=None,
                  descale_q=None, descale_k=None, descale_v=None)
                               (float8_e4m3fn q/k/v with float32 [batch, heads_kv] descales:
                               the FP8 forward, out bfloat16)
  fp8_attention(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1),
                softcap=0.0, return_lse=False, block_quantize=True, incoherent=True, seed=0)
                               quantizes to e4m3 inside (block scales, Hadamard), forward only
  flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q, max_seqlen_k,
                         softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                         return_lse=False, deterministic=False)
                               packed variable-length sequences (q [total_q, heads, dim])
  flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, *, k_new=None, v_new=None,
                               page_table=None, softmax_scale=None, causal=True,
                               window_size=(-1, -1), softcap=0.0, num_splits=0,
                               return_lse=False)
                               decoding against a contiguous or paged KV cache, appending
                               k_new/v_new in place (a donated cache under jit)
  dot_product_attention(...)   drop-in for jax.nn.dot_product_attention
  attention_reference(...)     pure-jnp float32 reference, flash_attention's signature
  load_balance_reorder(x, n, axis=1), load_balance_restore(x, n, axis=1)
                               natural token order <-> the load-balanced layout of n shards
  cuda_built(), cuda_head_dims()
  fa3_jax.flax.dot_product_attention   a Flax attention_fn (NNX and Linen); needs flax
  fa3_jax.equinox.MultiheadAttention   equinox.nn.MultiheadAttention on fa3_jax; needs equinox

Layers (each imports only the ones above it): _ffi (FFI registration) -> _primitives
(primitives, batching, custom_partitioning with a Shardy rule; context_parallel holds the
per-shard ring and all-gather schedules it calls) -> attention (custom_vjp, checks,
flash_attention; varlen: flash_attention_varlen) -> nn (jax.nn drop-in).

| feature                               | CPU backend            | Hopper (sm_90a)               |
|---------------------------------------|------------------------|-------------------------------|
| dtypes                                | f32, f16, bf16         | f16, bf16                     |
| head_dim (head_dim_v)                 | 1..256 (any)           | 64, 96, 128, 192 (128), 256   |
| causal / window / softcap / GQA / MQA | yes                    | yes                           |
| forward + backward                    | yes                    | yes (see README for status)   |
| deterministic backward                | always                 | option                        |
| jit / grad / vmap / checkpoint        | yes                    | yes                           |
| context parallelism (sequence sharding) | ring, all-gather, load-balanced causal | same |
| varlen (cu_seqlens; context-parallel as segment ids) | yes (fwd + bwd) | yes (fwd + bwd)  |
| segment ids (context-parallel too)    | yes (fwd + bwd)        | yes (fwd + bwd)               |
| KV cache (contiguous, paged), append  | yes (forward)          | split-KV + GQA packing; pages read in place (multiples of 16) |
| FP8 (e4m3) forward                    | yes (dequantize + f32) | yes (hdim 64/128/256, dense)  |

Sharding (multi-device jit): batch and head axes stay sharded (heads split kv-head-major and
only when the split divides heads_kv). A sharded sequence axis runs context-parallel
(``context_parallel="ring"`` by default: K/V travel around the mesh axis by collective-permute,
each step one kernel call on the local queries, fully masked steps skipped; "all_gather" gathers
K/V once; "gather" computes the whole sequence on every device); ``load_balance=n`` with
``load_balance_reorder`` evens out causal work. A sharded head_dim axis is all-gathered. See
fa3_jax.context_parallel.
"""

from fa3_jax._ffi import cuda_built, cuda_head_dims
from fa3_jax.attention import flash_attention
from fa3_jax.context_parallel import load_balance_reorder, load_balance_restore
from fa3_jax.fp8 import fp8_attention
from fa3_jax.kvcache import flash_attention_with_kvcache
from fa3_jax.nn import dot_product_attention
from fa3_jax.reference import attention_reference
from fa3_jax.varlen import flash_attention_varlen

__all__ = ["flash_attention", "flash_attention_varlen", "flash_attention_with_kvcache",
           "fp8_attention", "dot_product_attention",
           "attention_reference", "load_balance_reorder", "load_balance_restore", "cuda_built", "cuda_head_dims"]
__version__ = "0.1.0"


def __getattr__(name):
    # The Flax and Equinox adapters load on first use: their libraries are optional.
    if name in ("flax", "equinox"):
        import importlib
        return importlib.import_module(f"fa3_jax.{name}")
    raise AttributeError(f"module 'fa3_jax' has no attribute {name!r}")

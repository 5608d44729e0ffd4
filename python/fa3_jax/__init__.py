"""fa3_jax: FlashAttention-3 for JAX.

Public API:
  flash_attention(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1),
                  softcap=0.0, return_lse=False, deterministic=False)
  dot_product_attention(...)   drop-in for jax.nn.dot_product_attention
  attention_reference(...)     pure-jnp float32 reference, flash_attention's signature
  cuda_built(), cuda_head_dims()

Layers (each imports only the ones above it): _ffi (FFI registration) -> _primitives
(primitives, batching, custom_partitioning with a Shardy rule) -> attention (custom_vjp,
checks, flash_attention) -> nn (jax.nn drop-in).

| feature                               | CPU backend            | Hopper (sm_90a)               |
|---------------------------------------|------------------------|-------------------------------|
| dtypes                                | f32, f16, bf16         | f16, bf16                     |
| head_dim (head_dim_v)                 | 1..256 (any)           | 64, 96, 128, 192 (128), 256   |
| causal / window / softcap / GQA / MQA | yes                    | yes                           |
| forward + backward                    | yes                    | yes (see README for status)   |
| deterministic backward                | always                 | option                        |
| jit / grad / vmap / checkpoint        | yes                    | yes                           |

Sharding (multi-device jit): batch and head axes stay sharded (heads split kv-head-major and
only when the split divides heads_kv); a sharded sequence or head_dim axis is all-gathered before
the kernel (context parallelism is not implemented yet).
"""

from fa3_jax._ffi import cuda_built, cuda_head_dims
from fa3_jax.attention import flash_attention
from fa3_jax.nn import dot_product_attention
from fa3_jax.reference import attention_reference

__all__ = ["flash_attention", "dot_product_attention", "attention_reference", "cuda_built",
           "cuda_head_dims"]
__version__ = "0.1.0"

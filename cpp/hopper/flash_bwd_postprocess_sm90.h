// fa3_jax Hopper backward, step 3 of 3: dq = dq_accum * softmax_scale in the output dtype, from the
// head-major float32 accumulator [b, h, seqlen_q_pad, d] to the row-major dq [b, seqlen_q, h, d].
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace fa3::sm90_bwd {

struct BwdPostParams {
  const float* dq_accum;
  void* dq;
  float scale;
  int batch, seqlen_q, seqlen_q_pad, heads_q, head_dim;
};

inline constexpr int kPostThreads = 256;

// Each thread converts 4 consecutive head-dim elements (16-byte load, 8-byte store); head dims
// are multiples of 32, so a group never straddles two rows.
template <class Element>
__global__ void __launch_bounds__(kPostThreads) flash_bwd_postprocess_sm90(const BwdPostParams p) {
  const int64_t groups_per_row = p.head_dim / 4;
  const int64_t total = int64_t(p.batch) * p.seqlen_q * p.heads_q * groups_per_row;
  for (int64_t g = blockIdx.x * int64_t(kPostThreads) + threadIdx.x; g < total;
       g += int64_t(gridDim.x) * kPostThreads) {
    const int d = int(g % groups_per_row) * 4;
    int64_t rest = g / groups_per_row;
    const int h = int(rest % p.heads_q);
    rest /= p.heads_q;
    const int i = int(rest % p.seqlen_q);
    const int64_t b = rest / p.seqlen_q;
    const float4 a = *reinterpret_cast<const float4*>(
        p.dq_accum + ((b * p.heads_q + h) * p.seqlen_q_pad + i) * p.head_dim + d);
    union { Element e[4]; uint2 u; } o;
    o.e[0] = Element(a.x * p.scale);
    o.e[1] = Element(a.y * p.scale);
    o.e[2] = Element(a.z * p.scale);
    o.e[3] = Element(a.w * p.scale);
    *reinterpret_cast<uint2*>(static_cast<Element*>(p.dq) + g * 4) = o.u;
  }
}

}  // namespace fa3::sm90_bwd

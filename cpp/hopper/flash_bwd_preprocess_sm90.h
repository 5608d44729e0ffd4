// fa3_jax Hopper backward, step 1 of 3: per-row statistics and workspace initialisation.
//   dpsum[b,h,i]    = sum_d dO[b,i,h,d] * O[b,i,h,d] - dlse[b,h,i]  (float32; "D_i" in the paper;
//                     dlse, the lse cotangent, is optional)
//   lse_log2[b,h,i] = lse[b,h,i] * log2(e), and +inf where lse = -inf (empty rows) or i >= seqlen_q,
//                     so that exp2(s - lse_log2) = 0 there and the main kernel needs no row checks;
//   dq_accum[b,h,i,:] = 0 and the deterministic-mode semaphores = 0 (the workspace is not zeroed).
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace fa3::sm90_bwd {

struct BwdPreParams {
  const void* out;     // [b, seqlen_q, heads_q, head_dim_v]
  const void* dout;    // like out
  const float* lse;    // [b, heads_q, seqlen_q]
  const float* dlse;   // [b, heads_q, seqlen_q] or null
  float* lse_log2;     // [b, heads_q, seqlen_q_pad]
  float* dpsum;        // [b, heads_q, seqlen_q_pad]
  float* dq_accum;     // [b, heads_q, seqlen_q_pad, head_dim]
  int* semaphores;     // [b, heads_q, sem_per_head]
  int seqlen_q, seqlen_q_pad, heads_q, head_dim, head_dim_v, sem_per_head;
};

inline constexpr int kPreThreads = 256;
inline constexpr int kPreRowsPerWarp = 4;
inline constexpr int kPreRowsPerBlock = kPreThreads / 32 * kPreRowsPerWarp;

template <class Element>
__device__ __forceinline__ float dot8(uint4 a, uint4 b) {
  const Element* x = reinterpret_cast<const Element*>(&a);
  const Element* y = reinterpret_cast<const Element*>(&b);
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < 8; ++e) s += float(x[e]) * float(y[e]);
  return s;
}

// grid (ceil(seqlen_q_pad / kPreRowsPerBlock), heads_q, batch); one warp per row, 16-byte loads.
template <class Element>
__global__ void __launch_bounds__(kPreThreads) flash_bwd_preprocess_sm90(const BwdPreParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h = blockIdx.y, b = blockIdx.z;
  const int64_t bh = int64_t(b) * p.heads_q + h;
#pragma unroll 1
  for (int r = 0; r < kPreRowsPerWarp; ++r) {
    const int i = blockIdx.x * kPreRowsPerBlock + warp * kPreRowsPerWarp + r;
    if (i >= p.seqlen_q_pad) break;
    float dsum = 0.f, lse2 = INFINITY;
    if (i < p.seqlen_q) {
      const int64_t row = ((int64_t(b) * p.seqlen_q + i) * p.heads_q + h) * p.head_dim_v;
      const uint4* o = reinterpret_cast<const uint4*>(static_cast<const Element*>(p.out) + row);
      const uint4* g = reinterpret_cast<const uint4*>(static_cast<const Element*>(p.dout) + row);
      for (int c = lane; c < p.head_dim_v / 8; c += 32) dsum += dot8<Element>(o[c], g[c]);
#pragma unroll
      for (int off = 16; off > 0; off /= 2) dsum += __shfl_xor_sync(0xffffffffu, dsum, off);
      if (p.dlse) dsum -= p.dlse[bh * p.seqlen_q + i];
      const float l = p.lse[bh * p.seqlen_q + i];
      lse2 = l == -INFINITY ? INFINITY : l * 1.4426950408889634f;
    }
    if (lane == 0) {
      p.dpsum[bh * p.seqlen_q_pad + i] = dsum;
      p.lse_log2[bh * p.seqlen_q_pad + i] = lse2;
    }
    float4* acc = reinterpret_cast<float4*>(p.dq_accum + (bh * p.seqlen_q_pad + i) * p.head_dim);
    for (int c = lane; c < p.head_dim / 4; c += 32) acc[c] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  if (blockIdx.x == 0) {
    for (int t = threadIdx.x; t < p.sem_per_head; t += kPreThreads) p.semaphores[bh * p.sem_per_head + t] = 0;
  }
}

}  // namespace fa3::sm90_bwd

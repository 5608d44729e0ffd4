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
  int seqlen_q, seqlen_q_pad, heads_q, sem_per_head;
};

inline constexpr int kPreThreads = 256;
inline constexpr int kPreRowsPerBlock = 64;  // divides seqlen_q_pad (a multiple of kBwdSeqlenQPad)

template <class Element>
__device__ __forceinline__ float dot8(uint4 a, uint4 b) {
  const Element* x = reinterpret_cast<const Element*>(&a);
  const Element* y = reinterpret_cast<const Element*>(&b);
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < 8; ++e) s += float(x[e]) * float(y[e]);
  return s;
}

// grid (seqlen_q_pad / kPreRowsPerBlock, heads_q, batch). The kernel is bound by memory latency, so
// each warp issues the 16-byte loads of all its rows (8) before reducing any: a row of O / dO is
// kVecs vectors, read by kLanesPerRow lanes (a power of two; lanes past kVecs idle), 32 / kLanesPerRow
// rows per pass. The block's dq_accum rows are contiguous and zeroed with coalesced float4 stores.
template <class Element, int kHeadDim, int kHeadDimV>
__global__ void __launch_bounds__(kPreThreads) flash_bwd_preprocess_sm90(const BwdPreParams p) {
  constexpr int kVecs = kHeadDimV / 8;
  constexpr int kLanesPerRow = kVecs <= 8 ? 8 : kVecs <= 16 ? 16 : 32;
  constexpr int kVecsPerLane = (kVecs + kLanesPerRow - 1) / kLanesPerRow;
  constexpr int kRowsPerPass = 32 / kLanesPerRow;
  constexpr int kRowsPerWarp = kPreRowsPerBlock / (kPreThreads / 32);
  constexpr int kPasses = kRowsPerWarp / kRowsPerPass;
  static_assert(kHeadDimV % 8 == 0 && kRowsPerWarp % kRowsPerPass == 0, "whole 16-byte vectors and passes");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h = blockIdx.y, b = blockIdx.z;
  const int64_t bh = int64_t(b) * p.heads_q + h;
  const int row0 = blockIdx.x * kPreRowsPerBlock + warp * kRowsPerWarp + lane / kLanesPerRow;
  const int c0 = lane % kLanesPerRow;
  uint4 o[kPasses][kVecsPerLane], g[kPasses][kVecsPerLane];
#pragma unroll
  for (int r = 0; r < kPasses; ++r) {
    const int i = row0 + r * kRowsPerPass;
    const int64_t row = ((int64_t(b) * p.seqlen_q + i) * p.heads_q + h) * kHeadDimV;
    const uint4* po = reinterpret_cast<const uint4*>(static_cast<const Element*>(p.out) + row);
    const uint4* pg = reinterpret_cast<const uint4*>(static_cast<const Element*>(p.dout) + row);
#pragma unroll
    for (int v = 0; v < kVecsPerLane; ++v) {
      const int c = c0 + v * kLanesPerRow;
      const bool ok = i < p.seqlen_q && c < kVecs;
      o[r][v] = ok ? po[c] : make_uint4(0, 0, 0, 0);
      g[r][v] = ok ? pg[c] : make_uint4(0, 0, 0, 0);
    }
  }
#pragma unroll
  for (int r = 0; r < kPasses; ++r) {
    const int i = row0 + r * kRowsPerPass;
    float dsum = 0.f;
#pragma unroll
    for (int v = 0; v < kVecsPerLane; ++v) dsum += dot8<Element>(o[r][v], g[r][v]);
#pragma unroll
    for (int off = kLanesPerRow / 2; off > 0; off /= 2) dsum += __shfl_xor_sync(0xffffffffu, dsum, off);
    if (c0 == 0) {
      float lse2 = INFINITY;
      if (i < p.seqlen_q) {
        if (p.dlse) dsum -= p.dlse[bh * p.seqlen_q + i];
        const float l = p.lse[bh * p.seqlen_q + i];
        lse2 = l == -INFINITY ? INFINITY : l * 1.4426950408889634f;
      }
      p.dpsum[bh * p.seqlen_q_pad + i] = dsum;
      p.lse_log2[bh * p.seqlen_q_pad + i] = lse2;
    }
  }
  float4* acc = reinterpret_cast<float4*>(p.dq_accum + (bh * p.seqlen_q_pad + int64_t(blockIdx.x) * kPreRowsPerBlock) * kHeadDim);
#pragma unroll
  for (int c = threadIdx.x; c < kPreRowsPerBlock * kHeadDim / 4; c += kPreThreads) acc[c] = make_float4(0.f, 0.f, 0.f, 0.f);
  if (blockIdx.x == 0) {
    for (int t = threadIdx.x; t < p.sem_per_head; t += kPreThreads) p.semaphores[bh * p.sem_per_head + t] = 0;
  }
}

}  // namespace fa3::sm90_bwd

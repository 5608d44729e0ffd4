// fa3_jax Hopper backward, step 1 of 3: per-row statistics and workspace initialisation.
//   dpsum[b,h,i]    = sum_d dO[b,i,h,d] * O[b,i,h,d] - dlse[b,h,i]  (float32; "D_i" in the paper;
//                     dlse, the lse cotangent, is optional)
//   lse_log2[b,h,i] = lse[b,h,i] * log2(e), and +inf where lse = -inf (empty rows) or i >= seqlen_q,
//                     so that exp2(s - lse_log2) = 0 there and the main kernel needs no row checks;
//   dq_accum[b,h,i,:] = 0 and the deterministic-mode semaphores = 0 (the workspace is not zeroed).
// Varlen: one CTA per (64-row block of a sequence, head, batch row), the blocks numbered over the
// sequences of the batch row in kBwdSeqlenQPad-row units (sm90::varlen_block), writing its rows at
// its padded position (varlen_q_block_row), past the sequence's end as if past seqlen_q, up to
// the sequence's last whole kBwdSeqlenQPad rows (the main kernel reads whole query blocks).
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

#include "flash_bwd_tile_size_sm90.h"
#include "varlen_sm90.h"

namespace fa3::sm90_bwd {

// Varlen: where the query blocks of sequence s (index s_in_row within its batch row, starting at
// row offset_q) sit in the per-(batch, head) planes of dq_accum, lse_log2, dpsum and the
// semaphores: FlashAttention-3's padded layout, each sequence starting at a multiple of G =
// kBwdSeqlenQPad rows at or after offset_q + G s, so that a sequence's blocks are whole
// fragment-ordered tiles and no two sequences share a block (a sequence of L rows owns at least
// round_up(L, G) plane rows). Planes then need seqlen_q + G num_seqs rows.
__host__ __device__ __forceinline__ int varlen_q_block_row(int offset_q, int s_in_row) {
  return (offset_q + kBwdSeqlenQPad * s_in_row) / kBwdSeqlenQPad * kBwdSeqlenQPad;
}

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
  sm90::VarlenParams varlen;  // cu_q null: dense
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
// Launch bounds of 2 CTAs per SM (up to 128 registers): left free, ptxas aimed at 3 (80 registers)
// and spilled at hdim 192 (8 passes of 2 x 16 bytes in flight per thread: 91 registers unspilled);
// 16 warps of 16 loads each in flight still cover the memory latency.
template <class Element, int kHeadDim, int kHeadDimV>
__global__ void __launch_bounds__(kPreThreads, 2) flash_bwd_preprocess_sm90(const BwdPreParams p) {
  constexpr int kVecs = kHeadDimV / 8;
  constexpr int kLanesPerRow = kVecs <= 8 ? 8 : kVecs <= 16 ? 16 : 32;
  constexpr int kVecsPerLane = (kVecs + kLanesPerRow - 1) / kLanesPerRow;
  constexpr int kRowsPerPass = 32 / kLanesPerRow;
  constexpr int kRowsPerWarp = kPreRowsPerBlock / (kPreThreads / 32);
  constexpr int kPasses = kRowsPerWarp / kRowsPerPass;
  static_assert(kHeadDimV % 8 == 0 && kRowsPerWarp % kRowsPerPass == 0, "whole 16-byte vectors and passes");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h = blockIdx.y;
  // The block's rows: global rows src0 + r of batch row b for r < rows, statistics and dq_accum
  // at plane rows dst0 + r (the same rows when dense).
  int b = blockIdx.z, src0 = blockIdx.x * kPreRowsPerBlock, rows = p.seqlen_q - src0, dst0 = src0;
  if (p.varlen.cu_q) {
    // blockIdx.x: part blockIdx.x % kParts of numbered kBwdSeqlenQPad-row block blockIdx.x / kParts.
    constexpr int kParts = kBwdSeqlenQPad / kPreRowsPerBlock;
    int s_in_row, block;
    if (!sm90::varlen_block(p.varlen, b, blockIdx.x / kParts, s_in_row, block)) return;
    const sm90::SeqSpan s = sm90::varlen_span(p.varlen, b * p.varlen.num_seqs + s_in_row);
    const int m0 = (block * kParts + blockIdx.x % kParts) * kPreRowsPerBlock;
    b = s.batch;
    src0 = s.offset_q + m0;
    rows = s.len_q - m0;
    dst0 = varlen_q_block_row(s.offset_q, s_in_row) + m0;
  }
  const int64_t bh = int64_t(b) * p.heads_q + h;
  const int row0 = warp * kRowsPerWarp + lane / kLanesPerRow;  // within the block
  const int c0 = lane % kLanesPerRow;
  uint4 o[kPasses][kVecsPerLane], g[kPasses][kVecsPerLane];
#pragma unroll
  for (int r = 0; r < kPasses; ++r) {
    const int i = row0 + r * kRowsPerPass;
    const int64_t row = ((int64_t(b) * p.seqlen_q + src0 + i) * p.heads_q + h) * kHeadDimV;
    const uint4* po = reinterpret_cast<const uint4*>(static_cast<const Element*>(p.out) + row);
    const uint4* pg = reinterpret_cast<const uint4*>(static_cast<const Element*>(p.dout) + row);
#pragma unroll
    for (int v = 0; v < kVecsPerLane; ++v) {
      const int c = c0 + v * kLanesPerRow;
      const bool ok = i < rows && c < kVecs;
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
      if (i < rows) {
        if (p.dlse) dsum -= p.dlse[bh * p.seqlen_q + src0 + i];
        const float l = p.lse[bh * p.seqlen_q + src0 + i];
        lse2 = l == -INFINITY ? INFINITY : l * 1.4426950408889634f;
      }
      p.dpsum[bh * p.seqlen_q_pad + dst0 + i] = dsum;
      p.lse_log2[bh * p.seqlen_q_pad + dst0 + i] = lse2;
    }
  }
  float4* acc = reinterpret_cast<float4*>(p.dq_accum + (bh * p.seqlen_q_pad + dst0) * kHeadDim);
#pragma unroll
  for (int c = threadIdx.x; c < kPreRowsPerBlock * kHeadDim / 4; c += kPreThreads) acc[c] = make_float4(0.f, 0.f, 0.f, 0.f);
  if (p.varlen.cu_q) {
    if (threadIdx.x == 0) p.semaphores[bh * p.sem_per_head + dst0 / 64] = 0;
  } else if (blockIdx.x == 0) {
    for (int t = threadIdx.x; t < p.sem_per_head; t += kPreThreads) p.semaphores[bh * p.sem_per_head + t] = 0;
  }
}

}  // namespace fa3::sm90_bwd

// fa3_jax Hopper backward, step 3 of 3: dq = dq_accum * softmax_scale in the output dtype, from the
// fragment-ordered float32 accumulator to the row-major dq [b, seqlen_q, h, d].
//
// dq_accum [b, h, seqlen_q_pad, d] is stored per 64-row query block (kDqBlockRows x d floats) in the
// order the main kernel's dQ accumulators sit in registers. A block's dQ is a row of 64 x kAtomN
// WGMMA atoms dealt round-robin to the kColSplit consumer warpgroups that share it (atom a to
// warpgroup a % kColSplit; kColSplit = 1 when the warpgroups split dQ by rows and one owns the
// block), each thread holding the atoms of its warpgroup in turn. In the WGMMA C layout, value
// 4k+v of thread t (t < 128 within its warpgroup) is row 16 (t/32) + (t%32)/4 + 8 (v/2) and, with
// G = kAtomN/8 column groups per atom, column kAtomN (wg + kColSplit (k / G)) + 8 (k % G) + 2 (t%4)
// + v%2. Float4 k of thread t is stored at float4 k * 128 + t of its warpgroup's part of the block.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

#include "flash_bwd_preprocess_sm90.h"

namespace fa3::sm90_bwd {

struct BwdPostParams {
  const float* dq_accum;
  void* dq;
  float scale;
  int batch, seqlen_q, seqlen_q_pad, heads_q;
  sm90::VarlenParams varlen;  // cu_q null: dense; else one CTA per (block, head, sequence)
};

inline constexpr int kPostThreads = 256;
inline constexpr int kDqBlockRows = 64;  // one WGMMA M tile of the main kernel's dQ product

// One CTA per (64-row query block, head, batch): coalesced 16-byte loads of the fragment-ordered
// tile, scattered into a row-major 16-bit tile in shared memory, then 16-byte row stores to dq.
template <class Element, int kHeadDim, int kAtomN, int kColSplit>
__global__ void __launch_bounds__(kPostThreads) flash_bwd_postprocess_sm90(const BwdPostParams p) {
  // +8 elements per row: the 4-byte scatter stores of a warp (8 rows x 4 column pairs) then fall
  // in distinct banks for every head dim, and rows stay 16-byte aligned.
  constexpr int kRowPad = kHeadDim + 8;
  __shared__ __align__(16) Element tile[kDqBlockRows * kRowPad];
  constexpr int kChunks = kDqBlockRows * kHeadDim / kColSplit / (4 * 128);  // float4s per thread
  constexpr int kGroups = kAtomN / 8;
  static_assert(kHeadDim % (kColSplit * kAtomN) == 0, "whole dQ atoms per warpgroup");
  const int h = blockIdx.y;
  // Global rows src0 + r (r < rows) of batch row b, from plane rows dst0 + r of dq_accum.
  int b = blockIdx.z, src0 = blockIdx.x * kDqBlockRows, rows = p.seqlen_q - src0, dst0 = src0;
  if (p.varlen.cu_q) {
    // blockIdx.x: part blockIdx.x % kParts of numbered kBwdSeqlenQPad-row block blockIdx.x / kParts
    // (sm90::varlen_block).
    constexpr int kParts = kBwdSeqlenQPad / kDqBlockRows;
    int s_in_row, block;
    if (!sm90::varlen_block(p.varlen, b, blockIdx.x / kParts, s_in_row, block)) return;
    const sm90::SeqSpan s = sm90::varlen_span(p.varlen, b * p.varlen.num_seqs + s_in_row);
    src0 = (block * kParts + blockIdx.x % kParts) * kDqBlockRows;
    if (src0 >= s.len_q) return;
    b = s.batch;
    rows = s.len_q - src0;
    dst0 = varlen_q_block_row(s.offset_q, s_in_row) + src0;
    src0 += s.offset_q;
  }
  const int64_t block = (int64_t(b) * p.heads_q + h) * p.seqlen_q_pad + dst0;
  const float4* src = reinterpret_cast<const float4*>(p.dq_accum + block * kHeadDim);
  // All loads first (the kernel is bound by memory latency), then the scatter into the tile.
  constexpr int kLoads = kDqBlockRows * kHeadDim / 4 / kPostThreads;
  static_assert(kLoads * kPostThreads * 4 == kDqBlockRows * kHeadDim, "whole float4s per thread");
  float4 a[kLoads];
#pragma unroll
  for (int l = 0; l < kLoads; ++l) a[l] = src[threadIdx.x + l * kPostThreads];
#pragma unroll
  for (int l = 0; l < kLoads; ++l) {
    const int g = threadIdx.x + l * kPostThreads;
    const int t = g % 128, k = (g / 128) % kChunks, wg = g / (128 * kChunks);
    const int row = 16 * (t / 32) + (t % 32) / 4;
    const int col = kAtomN * (wg + kColSplit * (k / kGroups)) + 8 * (k % kGroups) + 2 * (t % 4);
    union { Element e[2]; uint32_t u; } lo, hi;
    lo.e[0] = Element(a[l].x * p.scale);
    lo.e[1] = Element(a[l].y * p.scale);
    hi.e[0] = Element(a[l].z * p.scale);
    hi.e[1] = Element(a[l].w * p.scale);
    *reinterpret_cast<uint32_t*>(&tile[row * kRowPad + col]) = lo.u;
    *reinterpret_cast<uint32_t*>(&tile[(row + 8) * kRowPad + col]) = hi.u;
  }
  __syncthreads();
  constexpr int kVecs = kHeadDim * int(sizeof(Element)) / 16;  // 16-byte vectors per row
  rows = min(kDqBlockRows, rows);
  Element* dq = static_cast<Element*>(p.dq);
  for (int g = threadIdx.x; g < rows * kVecs; g += kPostThreads) {
    const int row = g / kVecs, c = g % kVecs;
    const int64_t i = int64_t(src0) + row;
    *reinterpret_cast<uint4*>(dq + ((int64_t(b) * p.seqlen_q + i) * p.heads_q + h) * kHeadDim + c * 8) =
        *reinterpret_cast<const uint4*>(&tile[row * kRowPad + c * 8]);
  }
}

// GQA group split (bwd_group_split > 1): dK / dV = the sum over the parts' float32 partials
// [split, batch, seqlen_k, heads_kv, kHeadDim + kHeadDimV] (dK columns first), in part order, so
// the result does not depend on scheduling. Grid-stride over pairs of adjacent columns.
struct BwdDkvReduceParams {
  const float* partial;
  void* dk;  // [batch, seqlen_k, heads_kv, kHeadDim]
  void* dv;  // [batch, seqlen_k, heads_kv, kHeadDimV]
  int64_t rows;  // batch * seqlen_k * heads_kv
  int split;
};

template <class Element, int kHeadDim, int kHeadDimV>
__global__ void __launch_bounds__(kPostThreads) flash_bwd_dkv_reduce(const BwdDkvReduceParams p) {
  constexpr int kPairs = (kHeadDim + kHeadDimV) / 2;
  static_assert(kHeadDim % 2 == 0 && kHeadDimV % 2 == 0, "column pairs");
  const int64_t total = p.rows * kPairs, part_stride = p.rows * kPairs;
  const float2* src = reinterpret_cast<const float2*>(p.partial);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    float2 acc = src[i];
    for (int s = 1; s < p.split; ++s) {
      const float2 x = src[s * part_stride + i];
      acc.x += x.x;
      acc.y += x.y;
    }
    const int64_t row = i / kPairs;
    const int c = int(i % kPairs) * 2;
    Element* dst = c < kHeadDim ? static_cast<Element*>(p.dk) + row * kHeadDim + c
                                : static_cast<Element*>(p.dv) + row * kHeadDimV + (c - kHeadDim);
    dst[0] = Element(acc.x);
    dst[1] = Element(acc.y);
  }
}

}  // namespace fa3::sm90_bwd

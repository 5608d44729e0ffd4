// fa3_jax Hopper forward, split-KV (Flash-Decoding) merge: the float32 partial results of the
// num_splits key ranges of a query row become out (input dtype) and lse. It runs inside the split
// kernel, in the CTA that finishes a tile's last split (FwdEpilogue::merge_splits), not as a
// second kernel.
//
// Split s of a row holds O_s (normalised over its keys) and lse_s; with
// lse = log(sum_s exp(lse_s)), out = sum_s exp(lse_s - lse) * O_s. A split with no visible key
// has lse_s = -inf and its O_s was never written (the workspace is not zeroed), so it is skipped,
// not weighted by 0: a row with no visible key in any split gets out 0 and lse -inf, never NaN.
//
// Every consumer thread merges (row, 4-column chunk) items, splits in rounds of kCombineRound:
// each round's LSE and O_s loads are in flight together (an empty split's unwritten O_s is loaded
// too and skipped, never multiplied), then the round merges online: running max m, running sum
// l of exp(lse_s - m) and the accumulator, rescaled when m grows. The loads go to L2
// (ld.global.cg): the partials were written by other SMs, and this SM's L1 may hold stale lines
// of them (lse_accum rows of neighbouring tiles share lines).
// History: as a second kernel (one warp per row, 128-thread blocks) this merge took 3.3-3.7 us
// (ncu, H200) at 8 x 4k and 8 x 16k (2 splits), next to the split kernel's 40 / 129 us
// (h200_2026-11-22s9d_decode.txt; 32/8 heads x 128, seqlen_q 1, 256 rows).
#pragma once

#include <cutlass/numeric_conversion.h>

#include <cmath>
#include <cstdint>

namespace fa3::sm90 {

inline constexpr int kCombineRound = 8;  // splits whose loads are in flight together

// Rows [0, rows) of one tile, by kThreads threads (tid: this one's index). Work items are (row,
// 4-column chunk) pairs; a thread takes kItems of them at a time and issues all their loads
// (each split's LSE and O_s chunk, for a round of kCombineRound splits) before any math, so one
// memory round trip serves kItems items. lse_accum / o_accum point at split 0's LSE / O_s of
// row 0; split s's lie s * split_stride floats (O_s: s * split_stride * kHeadDimV) further.
template <class Element, int kHeadDimV, int kThreads, int kItems>
CUTLASS_DEVICE void merge_split_rows(int num_splits, int64_t split_stride, float const* lse_accum,
                                     float const* o_accum, int rows, Element* out,
                                     int64_t out_row_stride, float* lse_out,
                                     int64_t lse_row_stride, int tid) {
  static_assert(kHeadDimV % 4 == 0, "4-column chunks");
  constexpr int kChunks = kHeadDimV / 4;
  int const items = rows * kChunks;
  for (int item0 = tid; item0 < items; item0 += kItems * kThreads) {
    float m[kItems], l[kItems];  // running max of the LSEs, sum of exp(lse_s - m)
    float4 acc[kItems];
    CUTLASS_PRAGMA_UNROLL
    for (int k = 0; k < kItems; ++k) {
      m[k] = -INFINITY;
      l[k] = 0.f;
      acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    for (int s0 = 0; s0 < num_splits; s0 += kCombineRound) {
      int const n = min(kCombineRound, num_splits - s0);
      float lse_s[kItems][kCombineRound];
      float4 o[kItems][kCombineRound];
      CUTLASS_PRAGMA_UNROLL
      for (int k = 0; k < kItems; ++k) {
        int const item = item0 + k * kThreads;
        int const r = item / kChunks, c = (item - r * kChunks) * 4;
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < kCombineRound; ++j) {
          lse_s[k][j] = -INFINITY;
          if (j < n && item < items) {
            int64_t const row = int64_t(s0 + j) * split_stride + r;
            lse_s[k][j] = __ldcg(lse_accum + row);
            o[k][j] = __ldcg(reinterpret_cast<float4 const*>(o_accum + row * kHeadDimV + c));
          }
        }
      }
      CUTLASS_PRAGMA_UNROLL
      for (int k = 0; k < kItems; ++k) {
        float m_new = m[k];
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < kCombineRound; ++j) m_new = fmaxf(m_new, lse_s[k][j]);
        if (m_new == -INFINITY) continue;  // every split so far empty
        float const scale = expf(m[k] - m_new);  // 0 while m is -inf
        float4& a = acc[k];
        a.x *= scale;
        a.y *= scale;
        a.z *= scale;
        a.w *= scale;
        l[k] *= scale;
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < kCombineRound; ++j) {
          // An empty split's O_s is garbage (never written): skipped, not multiplied by 0.
          if (lse_s[k][j] == -INFINITY) continue;
          float const w = expf(lse_s[k][j] - m_new);
          l[k] += w;
          a.x = fmaf(w, o[k][j].x, a.x);
          a.y = fmaf(w, o[k][j].y, a.y);
          a.z = fmaf(w, o[k][j].z, a.z);
          a.w = fmaf(w, o[k][j].w, a.w);
        }
        m[k] = m_new;
      }
    }
    cutlass::NumericArrayConverter<Element, float, 4> to_element;
    CUTLASS_PRAGMA_UNROLL
    for (int k = 0; k < kItems; ++k) {
      int const item = item0 + k * kThreads;
      if (item >= items) continue;
      int const r = item / kChunks, c = (item - r * kChunks) * 4;
      float const inv = l[k] > 0.f ? 1.f / l[k] : 0.f;
      if (c == 0) lse_out[r * lse_row_stride] = m[k] == -INFINITY ? -INFINITY : m[k] + logf(l[k]);
      cutlass::Array<float, 4> const v = {acc[k].x * inv, acc[k].y * inv, acc[k].z * inv,
                                          acc[k].w * inv};
      *reinterpret_cast<cutlass::Array<Element, 4>*>(out + r * out_row_stride + c) = to_element(v);
    }
  }
}

}  // namespace fa3::sm90

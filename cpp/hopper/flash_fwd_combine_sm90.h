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
// One warp per row, splits in rounds of kCombineRound: lane j loads split j's LSE while every lane
// loads its 4-column chunks of each split's O_s, all in one round trip (the O_s loads do not wait
// for the LSEs; an empty split's unwritten O_s is loaded too and dropped by a select, never
// multiplied), then the round merges online: running max m, running sum l of exp(lse_s - m) and
// the accumulator, rescaled when m grows. The loads go to L2 (ld.global.cg): the partials were
// written by other SMs, and this SM's L1 may hold stale lines of them (lse_accum rows of
// neighbouring tiles share lines).
// History: as a second kernel (one warp per row, 128-thread blocks) this merge took 3.3-3.7 us
// (ncu, H200) at 8 x 4k and 8 x 16k (2 splits), next to the split kernel's 40 / 129 us
// (h200_2026-11-22s9d_decode.txt; 32/8 heads x 128, seqlen_q 1, 256 rows).
#pragma once

#include <cutlass/numeric_conversion.h>

#include <cmath>
#include <cstdint>

namespace fa3::sm90 {

inline constexpr int kCombineRound = 8;  // splits whose O_s loads are in flight together

// One row, by one warp (lane = its lane). lse_accum / o_accum point at split 0's LSE / O_s of the
// row; split s's lie s * split_stride floats (O_s: s * split_stride * kHeadDimV) further.
template <class Element, int kHeadDimV>
CUTLASS_DEVICE void merge_split_row(int num_splits, int64_t split_stride, float const* lse_accum,
                                    float const* o_accum, Element* out, float* lse_out, int lane) {
  static_assert(kHeadDimV % 4 == 0, "4 columns a lane a chunk");
  constexpr int kChunks = (kHeadDimV + 127) / 128;  // 4-column chunks per lane
  float m = -INFINITY, l = 0.f;  // running max of the LSEs, sum of exp(lse_s - m)
  float4 acc[kChunks];
  CUTLASS_PRAGMA_UNROLL
  for (int k = 0; k < kChunks; ++k) acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int s0 = 0; s0 < num_splits; s0 += kCombineRound) {
    int const n = min(kCombineRound, num_splits - s0);
    float const lse_s = lane < n ? __ldcg(lse_accum + int64_t(s0 + lane) * split_stride) : -INFINITY;
    float4 o[kChunks][kCombineRound];
    CUTLASS_PRAGMA_UNROLL
    for (int k = 0; k < kChunks; ++k) {
      int const c = (lane + 32 * k) * 4;
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < kCombineRound; ++j) {
        if (j < n && c < kHeadDimV)
          o[k][j] = __ldcg(reinterpret_cast<float4 const*>(
              o_accum + int64_t(s0 + j) * split_stride * kHeadDimV + c));
      }
    }
    float round_max = lse_s;
    for (int offset = 16; offset > 0; offset /= 2)
      round_max = fmaxf(round_max, __shfl_xor_sync(0xffffffffu, round_max, offset));
    float const m_new = fmaxf(m, round_max);
    if (m_new == -INFINITY) continue;  // every split so far empty
    float const scale = expf(m - m_new);  // 0 while m is -inf
    float const w = lse_s == -INFINITY ? 0.f : expf(lse_s - m_new);
    float w_sum = w;
    for (int offset = 16; offset > 0; offset /= 2)
      w_sum += __shfl_xor_sync(0xffffffffu, w_sum, offset);
    l = l * scale + w_sum;
    m = m_new;
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < kCombineRound; ++j) {
      float const wj = __shfl_sync(0xffffffffu, w, j);
      bool const use = j < n && wj > 0.f;  // an empty split's O_s is garbage: select, not 0 * O_s
      CUTLASS_PRAGMA_UNROLL
      for (int k = 0; k < kChunks; ++k) {
        float4& a = acc[k];
        float const sj = j == 0 ? scale : 1.f;  // the rescale rides on the first split's FMA
        a.x = use ? fmaf(wj, o[k][j].x, a.x * sj) : a.x * sj;
        a.y = use ? fmaf(wj, o[k][j].y, a.y * sj) : a.y * sj;
        a.z = use ? fmaf(wj, o[k][j].z, a.z * sj) : a.z * sj;
        a.w = use ? fmaf(wj, o[k][j].w, a.w * sj) : a.w * sj;
      }
    }
  }
  float const inv = l > 0.f ? 1.f / l : 0.f;
  if (lane == 0) *lse_out = m == -INFINITY ? -INFINITY : m + logf(l);
  cutlass::NumericArrayConverter<Element, float, 4> to_element;
  CUTLASS_PRAGMA_UNROLL
  for (int k = 0; k < kChunks; ++k) {
    int const c = (lane + 32 * k) * 4;
    if (c < kHeadDimV) {
      cutlass::Array<float, 4> const v = {acc[k].x * inv, acc[k].y * inv, acc[k].z * inv,
                                          acc[k].w * inv};
      *reinterpret_cast<cutlass::Array<Element, 4>*>(out + c) = to_element(v);
    }
  }
}

}  // namespace fa3::sm90

// fa3_jax Hopper forward, split-KV (Flash-Decoding) second pass: merges the float32 partial
// results of the num_splits key ranges of every query row into out (input dtype) and lse.
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
// the accumulator, rescaled when m grows. The pass reads num_splits * head_dim_v * 4 bytes per
// row, small next to the K/V the first pass reads whenever splitting pays; what it costs is its
// latency. Measured on H200 (benchmarks/measured/h200_2026-11-22s9d_decode.txt; 32/8 heads x 128,
// seqlen_q 1, 256 rows): the former form (the LSEs read twice, each O_s load after its LSE) took
// 3.9-4.3 us (ncu) at 8 x 4k and 8 x 16k (2 splits), 8.1-8.3 us at 1 x 128k (16 splits), next to
// the split kernel's 40 / 129 / 130 us; this form 3.3-3.7 us at 8 x 4k and 8 x 16k. bench_decode
// K/V TB/s, before -> after, same call: 8 x 4k flash_attention 3.52 -> 3.57, cache 3.47 -> 3.55;
// 1 x 128k 4.18 -> 4.24, 4.17 -> 4.23; the unsplit and 2-split rows from 16k up within 1%.
// Measured and not taken (session 12, h200_2026-11-23s12d_decode.txt, dec12 branch history): the
// merge inside the split kernel, by the CTA whose split of a tile arrives last in a per-tile
// counter (zeroed by the tile counter's memset), with no second kernel. The CUPTI sum of
// bench_decode (fa3_jax ms, this kernel's time included) rose on every split row, 8 x 4k / 8 x
// 16k / 1 x 128k / 8 x 16k at seqlen_q 4 / 16: 0.0378 / 0.1259 / 0.1268 / 0.1305 / 0.1347 ->
// 0.0396 / 0.1273 / 0.1283 / 0.1319 / 0.1398 (best variant: the count an atom.acq_rel after a
// consumer barrier, the merge as (row, 4-column chunk) items over the 256 consumer threads; a
// warp per row and per-thread fences: +2.5 us, and +7.9 us with 64-row tiles). The tail after
// the slowest split (drain its stores, count, load the partials from L2, store out) costs what
// this kernel does, and any code after the epilogue in the split kernel's tile loop pushed its
// 232-register consumers into 92-116 bytes of spills in the mainloop (0 before).
#pragma once

#include <cutlass/numeric_conversion.h>

#include <cmath>
#include <cstdint>

namespace fa3::sm90 {

struct FwdCombineParams {
  int num_splits;
  int num_rows;  // batch * heads * seqlen_q, in the forward kernel's tile coordinates
  int seqlen_q, heads, head_dim_v;
  float const* lse_accum;  // [num_splits, num_rows]
  float const* o_accum;    // [num_splits, num_rows, head_dim_v]
  void* out;
  int64_t out_row_stride, out_head_stride, out_batch_stride;  // in elements
  float* lse;
  int64_t lse_row_stride, lse_head_stride, lse_batch_stride;
};

inline constexpr int kCombineWarps = 4;  // rows per 128-thread block
inline constexpr int kCombineRound = 8;  // splits whose O_s loads are in flight together
inline constexpr int kCombineChunks = 2;  // 4-column chunks per lane: head_dim_v <= 256

template <class Element>
__global__ void __launch_bounds__(kCombineWarps * 32)
    flash_fwd_combine_sm90(FwdCombineParams const p) {
  int const lane = threadIdx.x % 32;
  int const row = blockIdx.x * kCombineWarps + threadIdx.x / 32;
  if (row >= p.num_rows) return;

  float m = -INFINITY, l = 0.f;  // running max of the LSEs, sum of exp(lse_s - m)
  float4 acc[kCombineChunks];
  CUTLASS_PRAGMA_UNROLL
  for (int k = 0; k < kCombineChunks; ++k) acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int s0 = 0; s0 < p.num_splits; s0 += kCombineRound) {
    int const n = min(kCombineRound, p.num_splits - s0);
    float const lse_s =
        lane < n ? p.lse_accum[int64_t(s0 + lane) * p.num_rows + row] : -INFINITY;
    float4 o[kCombineChunks][kCombineRound];
    CUTLASS_PRAGMA_UNROLL
    for (int k = 0; k < kCombineChunks; ++k) {
      int const c = (lane + 32 * k) * 4;
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < kCombineRound; ++j) {
        if (j < n && c < p.head_dim_v)
          o[k][j] = *reinterpret_cast<float4 const*>(
              p.o_accum + (int64_t(s0 + j) * p.num_rows + row) * p.head_dim_v + c);
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
      for (int k = 0; k < kCombineChunks; ++k) {
        float4& a = acc[k];
        float const sj = j == 0 ? scale : 1.f;  // the rescale rides on the first split's FMA
        a.x = use ? fmaf(wj, o[k][j].x, a.x * sj) : a.x * sj;
        a.y = use ? fmaf(wj, o[k][j].y, a.y * sj) : a.y * sj;
        a.z = use ? fmaf(wj, o[k][j].z, a.z * sj) : a.z * sj;
        a.w = use ? fmaf(wj, o[k][j].w, a.w * sj) : a.w * sj;
      }
    }
  }
  float const lse = m == -INFINITY ? -INFINITY : m + logf(l);
  float const inv = l > 0.f ? 1.f / l : 0.f;

  int const i = row % p.seqlen_q;
  int const hb = row / p.seqlen_q;
  int const b = hb / p.heads, h = hb - b * p.heads;
  if (lane == 0)
    p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + i * p.lse_row_stride] = lse;
  Element* out = static_cast<Element*>(p.out) + b * p.out_batch_stride +
                 h * p.out_head_stride + i * p.out_row_stride;
  cutlass::NumericArrayConverter<Element, float, 4> to_element;
  CUTLASS_PRAGMA_UNROLL
  for (int k = 0; k < kCombineChunks; ++k) {
    int const c = (lane + 32 * k) * 4;
    if (c < p.head_dim_v) {
      cutlass::Array<float, 4> const v = {acc[k].x * inv, acc[k].y * inv, acc[k].z * inv,
                                          acc[k].w * inv};
      *reinterpret_cast<cutlass::Array<Element, 4>*>(out + c) = to_element(v);
    }
  }
}

}  // namespace fa3::sm90

// fa3_jax Hopper forward, split-KV (Flash-Decoding) second pass: merges the float32 partial
// results of the num_splits key ranges of every query row into out (input dtype) and lse.
//
// Split s of a row holds O_s (normalised over its keys) and lse_s; with
// lse = log(sum_s exp(lse_s)), out = sum_s exp(lse_s - lse) * O_s. A split with no visible key
// has lse_s = -inf and its O_s was never written (the workspace is not zeroed), so it is skipped,
// not weighted by 0: a row with no visible key in any split gets out 0 and lse -inf, never NaN.
//
// One warp per row: the lanes reduce the split LSEs, then each lane merges 4 columns at a time
// (float4 loads; head_dim_v is a multiple of 32). The pass reads num_splits * head_dim_v * 4
// bytes per row, small next to the K/V the first pass reads whenever splitting pays.
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

template <class Element>
__global__ void __launch_bounds__(kCombineWarps * 32)
    flash_fwd_combine_sm90(FwdCombineParams const p) {
  int const lane = threadIdx.x % 32;
  int const row = blockIdx.x * kCombineWarps + threadIdx.x / 32;
  if (row >= p.num_rows) return;

  float lse_max = -INFINITY;
  for (int s = lane; s < p.num_splits; s += 32)
    lse_max = fmaxf(lse_max, p.lse_accum[int64_t(s) * p.num_rows + row]);
  for (int offset = 16; offset > 0; offset /= 2)
    lse_max = fmaxf(lse_max, __shfl_xor_sync(0xffffffffu, lse_max, offset));
  float sum = 0.f;
  if (lse_max != -INFINITY) {
    for (int s = lane; s < p.num_splits; s += 32)
      sum += expf(p.lse_accum[int64_t(s) * p.num_rows + row] - lse_max);  // exp(-inf) = 0
  }
  for (int offset = 16; offset > 0; offset /= 2)
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  float const lse = lse_max == -INFINITY ? -INFINITY : lse_max + logf(sum);

  int const i = row % p.seqlen_q;
  int const hb = row / p.seqlen_q;
  int const b = hb / p.heads, h = hb - b * p.heads;
  if (lane == 0)
    p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + i * p.lse_row_stride] = lse;
  Element* out = static_cast<Element*>(p.out) + b * p.out_batch_stride +
                 h * p.out_head_stride + i * p.out_row_stride;
  cutlass::NumericArrayConverter<Element, float, 4> to_element;
  for (int c = lane * 4; c < p.head_dim_v; c += 32 * 4) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    if (lse != -INFINITY) {
      for (int s = 0; s < p.num_splits; ++s) {
        float const lse_s = p.lse_accum[int64_t(s) * p.num_rows + row];
        if (lse_s == -INFINITY) continue;
        float const w = expf(lse_s - lse);
        float4 const o = *reinterpret_cast<float4 const*>(
            p.o_accum + (int64_t(s) * p.num_rows + row) * p.head_dim_v + c);
        acc.x = fmaf(w, o.x, acc.x);
        acc.y = fmaf(w, o.y, acc.y);
        acc.z = fmaf(w, o.z, acc.z);
        acc.w = fmaf(w, o.w, acc.w);
      }
    }
    cutlass::Array<float, 4> const v = {acc.x, acc.y, acc.z, acc.w};
    *reinterpret_cast<cutlass::Array<Element, 4>*>(out + c) = to_element(v);
  }
}

}  // namespace fa3::sm90

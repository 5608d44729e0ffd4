// fa3_jax Hopper: online softmax over WGMMA accumulators, in base 2.
//
// Scores stay unscaled in the accumulator; scale_log2 = softmax_scale * log2(e) (or
// softcap * log2(e) once the softcap tanh has been applied) is folded into one FMA per element
// before exp2. row_sum is kept per thread (a partial over its columns) and reduced over the
// quad only once, in finalize(), because every rescale multiplies all partials alike.
#pragma once

#include <cmath>

#include "utils.h"

namespace fa3::sm90 {

template <int kNRows>
struct OnlineSoftmax {
  float row_max[kNRows];
  float row_sum[kNRows];
  float scale_log2;

  CUTLASS_DEVICE explicit OnlineSoftmax(float scale_log2_) : scale_log2(scale_log2_) {}

  // Turns the scores of one key block into probabilities (in place), updates the running
  // max / sum and returns the factor by which the output accumulator must be rescaled.
  // block_scale (> 0) multiplies this block's scores first (an FP8 per-block k descale): it
  // scales the block's max once and rides on the exponent's FMA, so the running max stays in
  // the units of the scaled scores without a multiply per score.
  // kSkipRescale (FP8): when no row max of the warp grew in this block, the returned factors
  // are all exactly 1 and `rescaled` is false, so the caller skips the output rescale (a
  // multiply per accumulator register); the decision is warp-uniform (vote), so that is a
  // uniform branch, and the results are the same bits as with the rescale. Keeping a stale max
  // until some row grows by 2^8 (P up to 256, inside e4m3's 448) skipped nearly every rescale
  // but rounds each row's largest P, 1 at the running max, to e4m3 as well: 3x the P-rounding
  // error on peaked rows (tests/test_gpu_fp8.py, windows), so it is not done.
  // kChainsMax: max and sum as that many independent chains per row (FP8: 4; one serial chain of
  // 32 dependent FMNMX / FADD per row was the consumers' longest latency chain, ncu "Stall
  // Wait"; 16-bit kernels keep 1). In the 16-bit kernels 4 chains cost 0.2-3.7% at hdim 64 / 128,
  // the skipped rescale 1-6%, both together 1-6% (session 15,
  // h200_2026-11-23s15f_softmax_chains.txt, h200_2026-11-23s15e_softmax_skip_chains.txt).
  bool rescaled = true;

  template <bool kIsFirst, bool kSkipRescale = false, int kChainsMax = 1, class TensorS>
  CUTLASS_DEVICE cute::array<float, kNRows> step(TensorS& acc_s, float block_scale = 1.f) {
    Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
    static_assert(decltype(size<0>(s))::value == kNRows);
    constexpr int kCols = decltype(size<1>(s))::value;
    constexpr int kChains = kCols % kChainsMax == 0 ? kChainsMax : 1;
    cute::array<float, kNRows> o_scale;
    float const scale = scale_log2 * block_scale;
    float m_new[kNRows];
    CUTLASS_PRAGMA_UNROLL
    for (int mi = 0; mi < kNRows; ++mi) {
      float part[kChains];
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kChains; ++c) part[c] = s(mi, c);
      CUTLASS_PRAGMA_UNROLL
      for (int ni = kChains; ni < kCols; ++ni)
        part[ni % kChains] = fmaxf(part[ni % kChains], s(mi, ni));
      float m = part[0];
      CUTLASS_PRAGMA_UNROLL
      for (int c = 1; c < kChains; ++c) m = fmaxf(m, part[c]);
      m = quad_max(m) * block_scale;
      m_new[mi] = kIsFirst ? m : fmaxf(m, row_max[mi]);
    }
    bool keep = false;  // no row max of the warp changed (kSkipRescale)
    if constexpr (kSkipRescale && !kIsFirst) {
      bool same = true;
      CUTLASS_PRAGMA_UNROLL
      for (int mi = 0; mi < kNRows; ++mi) same = same && m_new[mi] == row_max[mi];
      keep = __all_sync(0xffffffffu, same);
    }
    rescaled = !kIsFirst && !keep;
    CUTLASS_PRAGMA_UNROLL
    for (int mi = 0; mi < kNRows; ++mi) {
      float const m = m_new[mi];  // == row_max[mi] where keep
      // A row with every key masked so far keeps max -inf; subtracting 0 then makes its
      // probabilities exp2(-inf) = 0 instead of NaN.
      float const m_scaled = m == -INFINITY ? 0.f : m * scale_log2;
      o_scale[mi] = kIsFirst || keep ? 1.f : fast_exp2(row_max[mi] * scale_log2 - m_scaled);
      row_max[mi] = m;
      float part[kChains];
      CUTLASS_PRAGMA_UNROLL
      for (int ni = 0; ni < kCols; ++ni) {
        float const x = fmaf(s(mi, ni), scale, -m_scaled);
        s(mi, ni) = fast_exp2(x);
        part[ni % kChains] = ni < kChains ? s(mi, ni) : part[ni % kChains] + s(mi, ni);
      }
      float sum = part[0];
      CUTLASS_PRAGMA_UNROLL
      for (int c = 1; c < kChains; ++c) sum += part[c];
      row_sum[mi] = kIsFirst ? sum : fmaf(row_sum[mi], o_scale[mi], sum);
    }
    return o_scale;
  }

  // Reduces the row sums; returns 1 / sum (0 for rows with no visible key) and writes the
  // natural-log LSE (-inf for such rows) into lse.
  CUTLASS_DEVICE cute::array<float, kNRows> finalize(cute::array<float, kNRows>& lse) {
    cute::array<float, kNRows> inv;
    CUTLASS_PRAGMA_UNROLL
    for (int mi = 0; mi < kNRows; ++mi) {
      float const sum = quad_sum(row_sum[mi]);
      bool const empty = sum == 0.f || sum != sum;
      inv[mi] = empty ? 0.f : 1.f / sum;
      lse[mi] = empty ? -INFINITY
                      : (row_max[mi] * scale_log2 + __log2f(sum)) * float(M_LN2);
    }
    return inv;
  }
};

// acc_o[row, :] *= scale[row].
template <size_t kNRows, class TensorO>
CUTLASS_DEVICE void rescale_rows(TensorO& acc_o, cute::array<float, kNRows> const& scale) {
  Tensor o = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));
  static_assert(decltype(size<0>(o))::value == kNRows);
  CUTLASS_PRAGMA_UNROLL
  for (int mi = 0; mi < kNRows; ++mi) {
    CUTLASS_PRAGMA_UNROLL
    for (int ni = 0; ni < size<1>(o); ++ni) o(mi, ni) *= scale[mi];
  }
}

}  // namespace fa3::sm90

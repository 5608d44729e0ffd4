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
  template <bool kIsFirst, class TensorS>
  CUTLASS_DEVICE cute::array<float, kNRows> step(TensorS& acc_s) {
    Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
    static_assert(decltype(size<0>(s))::value == kNRows);
    cute::array<float, kNRows> o_scale;
    CUTLASS_PRAGMA_UNROLL
    for (int mi = 0; mi < kNRows; ++mi) {
      float m = kIsFirst ? -INFINITY : row_max[mi];
      CUTLASS_PRAGMA_UNROLL
      for (int ni = 0; ni < size<1>(s); ++ni) m = fmaxf(m, s(mi, ni));
      m = quad_max(m);
      // A row with every key masked so far keeps max -inf; subtracting 0 then makes its
      // probabilities exp2(-inf) = 0 instead of NaN.
      float const m_scaled = m == -INFINITY ? 0.f : m * scale_log2;
      o_scale[mi] = kIsFirst ? 1.f : fast_exp2(row_max[mi] * scale_log2 - m_scaled);
      row_max[mi] = m;
      float sum = 0.f;
      CUTLASS_PRAGMA_UNROLL
      for (int ni = 0; ni < size<1>(s); ++ni) {
        s(mi, ni) = fast_exp2(fmaf(s(mi, ni), scale_log2, -m_scaled));
        sum += s(mi, ni);
      }
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

// fa3_jax Hopper forward epilogue: O (input dtype) and LSE (float32, natural log) of one tile,
// written straight from the accumulator registers with row bounds checks, and the fill of
// tiles whose rows see no key at all (out 0, lse -inf). Rows are bounded by the tile's sequence
// (mask.seqlen_q rows from offset_q; dense: the batch row); varlen_prepare fills the rows outside
// every sequence.
#pragma once

#include "flash_fwd_traits_sm90.h"
#include "utils.h"

namespace fa3::sm90 {

template <class Traits>
struct FwdEpilogue {
  using Element = typename Traits::Element;
  using Params = typename Traits::Params;
  static constexpr int kBlockM = Traits::kBlockM, kHeadDimV = Traits::kHeadDimV;

  template <class TensorO, class Mask>
  static CUTLASS_DEVICE void store(Params const& p, TensorO const& tOrO,
                                   cute::array<float, 2> const& lse, TileCoord t,
                                   Mask const& mask, int offset_q, int mma_tidx) {
    Tensor o = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));  // (rows, cols)
    static_assert(decltype(size<0>(o))::value == 2);
    AccCoord const coord(mma_tidx);
    int const seqlen_q = mask.seqlen_q;
    Element* out = p.out + t.batch * p.out_batch_stride + int64_t(t.head) * kHeadDimV +
                   offset_q * p.out_row_stride;
    float* lse_row = p.lse + (int64_t(t.batch) * p.sched.heads + t.head) * get<0>(p.shape_q) +
                     offset_q;
    // Pairs are converted as they are stored: a converted copy of the whole accumulator would
    // not fit next to it in the register budget at head dim 256.
    cutlass::NumericArrayConverter<Element, float, 2> to_element;
    CUTLASS_PRAGMA_UNROLL
    for (int mi = 0; mi < size<0>(o); ++mi) {
      int const i = t.m_block * kBlockM + coord.row0 + AccCoord::row_offset(mi);
      if (i >= seqlen_q) continue;
      Element* out_row = out + i * p.out_row_stride + coord.col0;
      // Columns (ni, ni + 1) are adjacent in memory and in registers: one 4-byte store.
      CUTLASS_PRAGMA_UNROLL
      for (int ni = 0; ni < size<1>(o); ni += 2) {
        cutlass::Array<float, 2> const pair = {o(mi, ni), o(mi, ni + 1)};
        *reinterpret_cast<cutlass::Array<Element, 2>*>(out_row + AccCoord::col_offset(ni)) =
            to_element(pair);
      }
      if (mma_tidx % 4 == 0) lse_row[i] = lse[mi];
    }
  }

  template <class Mask>
  static CUTLASS_DEVICE void store_empty(Params const& p, TileCoord t, Mask const& mask,
                                         int offset_q, int mma_tidx) {
    int const seqlen_q = mask.seqlen_q;
    Element* out = p.out + t.batch * p.out_batch_stride + int64_t(t.head) * kHeadDimV +
                   offset_q * p.out_row_stride;
    constexpr int kChunks = kHeadDimV / 8;  // 16-byte chunks per row
    for (int idx = mma_tidx; idx < kBlockM * kChunks; idx += Traits::kNumMmaThreads) {
      int const i = t.m_block * kBlockM + idx / kChunks;
      if (i < seqlen_q)
        *reinterpret_cast<uint4*>(out + i * p.out_row_stride + (idx % kChunks) * 8) =
            make_uint4(0, 0, 0, 0);
    }
    float* lse_row = p.lse + (int64_t(t.batch) * p.sched.heads + t.head) * get<0>(p.shape_q) +
                     offset_q;
    for (int r = mma_tidx; r < kBlockM; r += Traits::kNumMmaThreads) {
      int const i = t.m_block * kBlockM + r;
      if (i < seqlen_q) lse_row[i] = -INFINITY;
    }
  }
};

}  // namespace fa3::sm90

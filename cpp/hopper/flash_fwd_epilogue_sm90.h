// fa3_jax Hopper forward epilogue: O (input dtype; FP8: bfloat16) and LSE (float32, natural log)
// of one tile, written straight from the accumulator registers with row bounds checks, and the
// fill of tiles whose rows see no key at all (out 0, lse -inf). Rows are bounded by the tile's
// sequence (mask.seqlen_q rows from offset_q; dense: the batch row); varlen_prepare fills the rows
// outside every sequence. With split-KV (sched.num_splits > 1; dense calls only) the tile's
// float32 O and its LSE go to the workspace instead, for the combine kernel (the kSplit
// instantiation). The kSplit kernel with one split (a KV-cache call the plan does not split)
// writes out / lse itself, as the dense kernel does, and no combine kernel runs: measured on
// H200 (bench_decode, 64 x 8k, 3 rounds, benchmarks/measured/h200_2026-11-23s13d_decode_ab.txt),
// the contiguous cache 4.40 -> 4.43 TB/s, pages of 16 4.29 -> 4.32 (the combine took 2.9 us of
// 485). ptxas, split kernels: hdim 128 0 spill bytes as before, hdim 256 64 -> 48, hdim 192
// 0 -> 4 (benchmarks/measured/ptxas_2026-11-23s13_spills.txt).
#pragma once

#include "flash_fwd_traits_sm90.h"
#include "named_barrier.h"
#include "utils.h"

namespace fa3::sm90 {

template <class Traits>
struct FwdEpilogue {
  using Element = typename Traits::ElementOut;  // of out (FP8 inputs: bfloat16)
  static_assert(sizeof(Element) == 2, "store_empty writes rows in 8-element chunks");
  using Params = typename Traits::Params;
  static constexpr int kBlockM = Traits::kBlockM, kHeadDimV = Traits::kHeadDimV;

  // First row of (t.split, t.batch, t.head) in the split-KV partial buffers (dense layout: a
  // varlen call never splits).
  static CUTLASS_DEVICE int64_t partial_row0(Params const& p, TileCoord t) {
    int64_t const hb = int64_t(t.batch) * p.sched.heads + t.head;
    return (int64_t(t.split) * p.sched.num_hb + hb) * p.mask.seqlen_q;
  }

  template <class TensorO, class Mask>
  static CUTLASS_DEVICE void store(Params const& p, typename Traits::SharedStorage& ss,
                                   TensorO const& tOrO, cute::array<float, 2> const& lse,
                                   TileCoord t, Mask const& mask, int offset_q, int mma_tidx) {
    Tensor o = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));  // (rows, cols)
    static_assert(decltype(size<0>(o))::value == 2);
    AccCoord const coord(mma_tidx);
    int const seqlen_q = mask.seqlen_q;
    if constexpr (Traits::kTmaStoreO) {
      store_tma(p, ss, tOrO, t, mma_tidx);
      float* lse_head = p.lse + t.batch * p.lse_batch_stride + t.head * p.lse_head_stride;
      CUTLASS_PRAGMA_UNROLL
      for (int mi = 0; mi < size<0>(o); ++mi) {
        int const i = t.m_block * kBlockM + coord.row0 + AccCoord::row_offset(mi);
        if (i < seqlen_q && mma_tidx % 4 == 0) lse_head[i * p.lse_row_stride] = lse[mi];
      }
      return;
    }
    if (Traits::kSplit && p.sched.num_splits > 1) {
      int64_t const row0 = partial_row0(p, t);
      CUTLASS_PRAGMA_UNROLL
      for (int mi = 0; mi < size<0>(o); ++mi) {
        int const i = t.m_block * kBlockM + coord.row0 + AccCoord::row_offset(mi);
        if (i >= seqlen_q) continue;
        float* o_row = p.o_accum + (row0 + i) * kHeadDimV + coord.col0;
        CUTLASS_PRAGMA_UNROLL
        for (int ni = 0; ni < size<1>(o); ni += 2)
          *reinterpret_cast<float2*>(o_row + AccCoord::col_offset(ni)) =
              make_float2(o(mi, ni), o(mi, ni + 1));
        if (mma_tidx % 4 == 0) p.lse_accum[row0 + i] = lse[mi];
      }
      return;
    }
    Element* out = p.out + t.batch * p.out_batch_stride + t.head * p.out_head_stride +
                   offset_q * p.out_row_stride;
    float* lse_head = p.lse + t.batch * p.lse_batch_stride + t.head * p.lse_head_stride +
                      offset_q * p.lse_row_stride;
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
      if (mma_tidx % 4 == 0) lse_head[i * p.lse_row_stride] = lse[mi];
    }
  }

  // O of the tile through shared memory: each consumer warpgroup waits until its previous TMA
  // store has read its part of the buffer (kOAliasesV: until all warpgroups are done with the
  // V ring, which then holds O), writes its 64 rows there (16-bit pairs, in the PV
  // accumulator's order), fences them for the async proxy, and one of its threads issues the TMA
  // store (rows past the tensor's end are dropped by the TMA unit) without waiting for it.
  template <class TensorO>
  static CUTLASS_DEVICE void store_tma(Params const& p, typename Traits::SharedStorage& ss,
                                       TensorO const& tOrO, TileCoord t, int mma_tidx) {
    int const wg = mma_tidx / 128;
    bool const issuer = mma_tidx % 128 == 0;
    FwdNamedBarrier const bar = fwd_epilogue_barrier(wg);
    if constexpr (Traits::kOAliasesV) {
      // O goes into the V ring: every warpgroup's last P V WGMMA must have read it. (The previous
      // tile's TMA stores have read O: the producer waited for that before this tile's V.)
      named_barrier_sync(Traits::kNumMmaThreads, FwdNamedBarrier::EpilogueAll);
    } else {
      if (issuer) tma_store_wait<0>();
      named_barrier_sync(128, bar);
    }
    Tensor sO = make_tensor(make_smem_ptr(Traits::smem_o(ss)), typename Traits::SmemLayoutOTile{});
    typename Traits::TiledMmaPV mma_pv;
    Tensor tOsO = mma_pv.get_thread_slice(mma_tidx).partition_C(sO);
    static_assert(decltype(size(tOsO))::value == decltype(size(tOrO))::value);
    cutlass::NumericArrayConverter<Element, float, 2> to_element;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tOrO); i += 2) {
      cutlass::Array<float, 2> const pair = {tOrO(i), tOrO(i + 1)};
      *reinterpret_cast<cutlass::Array<Element, 2>*>(&tOsO(i)) = to_element(pair);
    }
    cutlass::arch::fence_view_async_shared();
    named_barrier_sync(128, bar);
    if (issuer) {
      Tensor mO = p.tma_o.get_tma_tensor(p.shape_o)(_, _, t.head, t.batch);
      Tensor gO = local_tile(mO, Shape<_64, Int<kHeadDimV>>{},
                             make_coord(t.m_block * Traits::kNumMmaWarpGroups + wg, _0{}));
      Tensor sOw =
          make_tensor(make_smem_ptr(Traits::smem_o(ss)), typename Traits::SmemLayoutO{})(_, _, wg);
      auto [tOgO, tOsOw] = tma_partition(p.tma_o, _0{}, Layout<_1>{}, group_modes<0, 2>(sOw),
                                         group_modes<0, 2>(gO));
      copy(p.tma_o, tOsOw, tOgO);
      tma_store_arrive();
      if constexpr (Traits::kOAliasesV) {  // hand the V ring back once the store has read it
        tma_store_wait<0>();
        ss.o_free.arrive();
      }
    }
  }

  // A tile (or split) with no visible key. A split only marks its LSE -inf: the combine kernel
  // never reads the O of such a split, so it is not written.
  template <class Mask>
  static CUTLASS_DEVICE void store_empty(Params const& p, TileCoord t, Mask const& mask,
                                         int offset_q, int mma_tidx) {
    int const seqlen_q = mask.seqlen_q;
    if (Traits::kSplit && p.sched.num_splits > 1) {
      int64_t const row0 = partial_row0(p, t);
      for (int r = mma_tidx; r < kBlockM; r += Traits::kNumMmaThreads) {
        int const i = t.m_block * kBlockM + r;
        if (i < seqlen_q) p.lse_accum[row0 + i] = -INFINITY;
      }
      return;
    }
    Element* out = p.out + t.batch * p.out_batch_stride + t.head * p.out_head_stride +
                   offset_q * p.out_row_stride;
    constexpr int kChunks = kHeadDimV / 8;  // 16-byte chunks per row
    for (int idx = mma_tidx; idx < kBlockM * kChunks; idx += Traits::kNumMmaThreads) {
      int const i = t.m_block * kBlockM + idx / kChunks;
      if (i < seqlen_q)
        *reinterpret_cast<uint4*>(out + i * p.out_row_stride + (idx % kChunks) * 8) =
            make_uint4(0, 0, 0, 0);
    }
    float* lse_head = p.lse + t.batch * p.lse_batch_stride + t.head * p.lse_head_stride +
                      offset_q * p.lse_row_stride;
    for (int r = mma_tidx; r < kBlockM; r += Traits::kNumMmaThreads) {
      int const i = t.m_block * kBlockM + r;
      if (i < seqlen_q) lse_head[i * p.lse_row_stride] = -INFINITY;
    }
  }
};

}  // namespace fa3::sm90

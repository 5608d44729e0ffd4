// fa3_jax Hopper: the one masking policy of the forward kernel.
//
// Key j is visible to query i iff j < seqlen_k and diag_lo <= j - i <= diag_hi (flash.h).
// The policy answers three questions: which key blocks a query block must visit at all
// (blocks entirely outside the band are skipped), whether a visited block needs per-element
// masking (only blocks crossing a band edge or the end of the keys), and the masking itself.
// diag_lo / diag_hi arrive clamped to [-seqlen_q, seqlen_k] so that all arithmetic fits in int.
// SegmentBandMask adds segment ids (flash.h) to the same three answers.
// kGrouped (the split-KV kernel): the tile's rows may be (query position, query head of a GQA
// group) pairs, rows_per_pos heads per position (GQA packing, flash_fwd_launch_sm90.h: pack_gqa):
// row r is query position r / rows_per_pos, and the band is on positions. seqlen_q stays the
// row count (the epilogue's bound). The division runs once per row of a masked block only.
#pragma once

#include <cmath>

#include "segments_sm90.h"
#include "utils.h"

namespace fa3::sm90 {

// kBothEdges: every masked block compares each element against both edges (the split kernel
// and FP8; apply).
template <int kBlockM, int kBlockN, bool kGrouped = false, bool kBothEdges = kGrouped>
struct BandMask {
  int seqlen_q, seqlen_k;
  int diag_lo, diag_hi;
  int rows_per_pos = 1;  // kGrouped only; positions = seqlen_q / rows_per_pos

  // The query position of tile row `row`.
  CUTLASS_DEVICE int pos(int row) const {
    if constexpr (kGrouped)
      return row / rows_per_pos;
    else
      return row;
  }

  // Key blocks [n_min, n_max) that hold at least one visible key for m_block; empty when
  // n_max <= n_min.
  CUTLASS_DEVICE void n_block_range(int m_block, int& n_min, int& n_max) const {
    n_block_range_rows(m_block * kBlockM, m_block * kBlockM + kBlockM, n_min, n_max);
  }
  // The same for the tile rows [row_begin, row_end) alone (one consumer warpgroup's rows).
  CUTLASS_DEVICE void n_block_range_rows(int row_begin, int row_end, int& n_min,
                                         int& n_max) const {
    int const i_first = pos(row_begin);
    int const i_last = pos(min(row_end, seqlen_q) - 1);
    int const j_first = max(0, i_first + diag_lo);
    int const j_last = min(seqlen_k - 1, i_last + diag_hi);
    if (row_begin >= seqlen_q || j_last < j_first) {
      n_min = n_max = 0;
      return;
    }
    n_min = j_first / kBlockN;
    n_max = j_last / kBlockN + 1;
  }

  CUTLASS_DEVICE bool needs_mask(int m_block, int n_block) const {
    int const i0 = pos(m_block * kBlockM), i1 = pos(m_block * kBlockM + kBlockM - 1);
    int const j0 = n_block * kBlockN;
    return j0 + kBlockN > seqlen_k                    // past the last key
           || j0 + kBlockN - 1 - i0 > diag_hi         // crosses the upper band edge
           || j0 - i1 < diag_lo;                      // crosses the lower band edge
  }

  // acc_s: one warpgroup's 64 x kBlockN WGMMA accumulator; coord: where its elements sit.
  template <class TensorS>
  CUTLASS_DEVICE void apply(TensorS& acc_s, AccCoord const& coord, int m_block,
                            int n_block) const {
    // Blocks the band's lower edge does not cross (every causal block but those of a query block
    // whose rows run far past seqlen_q) compare each element once, against the upper edge and
    // the keys' end, rather than twice. Measured on H200 (test_fwd_sm90 --time, hdim 64, bf16,
    // 16k tokens, three interleaved runs, 2026-11-23,
    // benchmarks/measured/h200_2026-11-23s12f_tile_boundary.txt, call 8), causal TFLOP/s at
    // 512 / 1k / 2k: 229.5 / 306.5 / 408.0 -> 236.3 / 312.1 / 413.6; full unchanged. The split
    // kernel keeps the one form (not measured there; ptxas: +16 spill bytes at hdim 256 with
    // both), and so does FP8 (its hdim 128 kernel lost speed at 4k-16k with this and the tile
    // ring together: flash_fwd_kernel_sm90.h, tile_coord). The 16-bit hdim 128 dense kernel
    // makes this choice on its first key block only and calls apply_edges<true> inside its
    // key-block loop (tile_size.h, fwd_loop_mask_both_edges).
    if (kBothEdges || n_block * kBlockN - pos(m_block * kBlockM + kBlockM - 1) < diag_lo)
      apply_edges<true>(acc_s, coord, m_block, n_block);
    else
      apply_edges<false>(acc_s, coord, m_block, n_block);
  }
  template <bool kLower, class TensorS>
  CUTLASS_DEVICE void apply_edges(TensorS& acc_s, AccCoord const& coord, int m_block,
                                  int n_block) const {
    Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
    static_assert(decltype(size<0>(s))::value == 2);
    int const j0 = n_block * kBlockN + coord.col0;
    CUTLASS_PRAGMA_UNROLL
    for (int mi = 0; mi < size<0>(s); ++mi) {
      int const i = pos(m_block * kBlockM + coord.row0 + AccCoord::row_offset(mi));
      // Visible columns of this row, relative to the thread's first column: [col_lo, col_hi).
      int const col_hi = min(seqlen_k, i + diag_hi + 1) - j0;
      int const col_lo = i + diag_lo - j0;
      CUTLASS_PRAGMA_UNROLL
      for (int ni = 0; ni < size<1>(s); ++ni) {
        int const col = AccCoord::col_offset(ni);
        if (col >= col_hi || (kLower && col < col_lo)) s(mi, ni) = -INFINITY;
      }
    }
  }
};

// The band plus segment ids: key j is visible to query i only if q_ids[i] == k_ids[j] != 0.
// Located per tile (the kernel's Params::locate): the ids of the tile's batch row, and the
// prepare kernels' ranges for its query block (segments_sm90.h). Visits only the key blocks
// inside both the band's range and the segment hull; masks element by element every block
// outside the uniform range (key blocks whose rows all hold the query block's one id), where
// only the band can mask, so blocks inside a long document cost what dense blocks cost. The
// decision reads registers only: a uniform-id load per block on the consumers' path cost 3-5%
// (H200, hdim 128, 16k tokens in 11 documents, segments / dense forward: full 0.67 -> 0.70,
// causal 0.69 -> 0.72). ptxas (2026-11-22, session 7): 0 spill bytes at hdim 64, 96, 128 and
// 192/128; 64 at hdim 192, 136 at hdim 256.
// A masked key block of at most two runs (a document boundary inside it: SegmentRuns) gives
// each row one interval of visible columns, compared like the band's; only blocks of three
// runs or more load their key ids, one per column. (One id load per element made the blocks at
// every document's edges cost several dense blocks: at 16k tokens in documents that do not
// start on a 128-row edge, segments took 1.33-1.49x varlen's time, 0.93-1.08x where they do,
// benchmarks/measured/h200_2026-11-22s7_segments_alignment.txt.)
template <int kBlockM, int kBlockN>
struct SegmentBandMask : BandMask<kBlockM, kBlockN> {
  using Band = BandMask<kBlockM, kBlockN>;
  int32_t const* q_ids;  // this batch row's [seqlen_q]
  int32_t const* k_ids;  // [seqlen_k]
  SegmentRuns const* k_runs;  // this batch row's key blocks' runs
  int n_first, n_last;   // the segment hull of key blocks, [n_first, n_last)
  int u_first, u_last;   // the uniform range, [u_first, u_last)

  CUTLASS_DEVICE void n_block_range(int m_block, int& n_min, int& n_max) const {
    Band::n_block_range(m_block, n_min, n_max);
    n_min = max(n_min, n_first);
    n_max = min(n_max, n_last);
  }

  CUTLASS_DEVICE bool needs_mask(int m_block, int n_block) const {
    return Band::needs_mask(m_block, n_block) || n_block < u_first || n_block >= u_last;
  }

  template <class TensorS>
  CUTLASS_DEVICE void apply(TensorS& acc_s, AccCoord const& coord, int m_block,
                            int n_block) const {
    Band::apply(acc_s, coord, m_block, n_block);
    Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
    static_assert(decltype(size<0>(s))::value == 2);
    int qid[2];  // one id per row, then one key id at a time: few live registers (hdim 256)
    CUTLASS_PRAGMA_UNROLL
    for (int mi = 0; mi < 2; ++mi) {
      int const i = m_block * kBlockM + coord.row0 + AccCoord::row_offset(mi);
      qid[mi] = i < this->seqlen_q ? __ldg(q_ids + i) : 0;
    }
    SegmentRuns const runs = __ldg(k_runs + n_block);
    if (runs.w) {
      // Row mi sees the block-relative columns [c_lo, c_hi): the run holding its id, if any.
      // Columns past seqlen_k are past the last run and masked by the band already.
      int c_lo[2], c_hi[2];
      CUTLASS_PRAGMA_UNROLL
      for (int mi = 0; mi < 2; ++mi) {
        bool const first = qid[mi] != 0 && qid[mi] == runs.x;
        bool const second = qid[mi] != 0 && qid[mi] == runs.y && runs.x != runs.y;
        c_lo[mi] = (first ? 0 : runs.z) - coord.col0;
        c_hi[mi] = (first ? runs.z : second ? kBlockN : runs.z) - coord.col0;
      }
      CUTLASS_PRAGMA_UNROLL
      for (int ni = 0; ni < size<1>(s); ++ni) {
        int const col = AccCoord::col_offset(ni);
        CUTLASS_PRAGMA_UNROLL
        for (int mi = 0; mi < 2; ++mi)
          if (col < c_lo[mi] || col >= c_hi[mi]) s(mi, ni) = -INFINITY;
      }
      return;
    }
    int const j0 = n_block * kBlockN + coord.col0;
    CUTLASS_PRAGMA_UNROLL
    for (int ni = 0; ni < size<1>(s); ++ni) {
      int const j = j0 + AccCoord::col_offset(ni);
      // Keys past seqlen_k read id 0 here; the band has masked them already.
      int const kid = j < this->seqlen_k ? __ldg(k_ids + j) : 0;
      CUTLASS_PRAGMA_UNROLL
      for (int mi = 0; mi < 2; ++mi)
        if (qid[mi] == 0 || kid != qid[mi]) s(mi, ni) = -INFINITY;
    }
  }
};

}  // namespace fa3::sm90

// fa3_jax Hopper forward: host-side pieces shared by the entry points (flash_fwd_sm90.cu)
// and the per-head-dim instantiation files (flash_fwd_hdim*_sm90.cu): the GQA packing rule, the
// call's plan (packing, large tile, split count) and the workspace layout. No CuTe here.
//
// Split-KV (Flash-Decoding) and GQA packing are chosen here per call (plan_fwd, pack_gqa; the
// split count's rule is fwd_num_splits in tile_size.h).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "../cuda_device.h"
#include "../flash.h"
#include "fp8_vt_sm90.h"
#include "segments_sm90.h"
#include "tile_size.h"
#include "varlen_sm90.h"

namespace fa3::sm90_fwd {

// GQA packing (FA3's PackGQA), decided on the host from the shapes and the band: with
// seqlen_q == 1 the query heads of one KV group become the rows of one tile (row r = query head
// h_kv * group + r), so a CTA reads each K/V block once for the whole group instead of once per
// query head. It needs no copy: Q, out and lse are the same bytes seen with other strides. It
// is taken only where every packed row sees the same keys, i.e. the one query row sees all of
// them (diag_lo <= 0 and diag_hi >= seqlen_k - 1: no window cuts the keys; bottom-right causal
// with seqlen_q 1 is such a case), since the kernel's band would otherwise mask the packed rows
// as if they were different query positions.
// With seqused_k (a KV cache) the split kernel's mask knows which query position each packed
// row is (mask.h, kGrouped: rows_per_pos = group), so every band packs, windows included.
// Cache calls with seqlen_q > 1 arrive packed by the caller instead (FwdParams::packed_group,
// python/fa3_jax/_primitives.py): the same rows, (position, head) pairs, with the same mask.
// Varlen and segment-id calls are never packed (nor split) yet.
// FP8 calls are never packed (nor split): the per-block descales are per query head (flash.h).
inline bool packable_gqa_shape(FwdParams const& p) {
  return p.seqlen_q == 1 && p.heads_q > p.heads_kv && p.num_seqs == 0 && !p.q_segment_ids &&
         p.dtype != DType::kFloat8E4M3;
}
inline bool pack_gqa(FwdParams const& p) {
  if (!packable_gqa_shape(p)) return false;
  if (p.seqused_k) return true;
  return p.diag_lo <= 0 && p.diag_hi >= p.seqlen_k - 1;
}

// The grid as the kernel sees it: query rows and heads per tile coordinates, and the split.
struct FwdPlan {
  bool packed;
  bool large;  // the dense call runs the large tile (tile_size.h, fwd_use_large_tile)
  bool decode;  // the split call runs the decode tile (tile_size.h, fwd_use_decode_tile)
  int seqlen_q, heads;  // of the tiles (packed: the group's heads as rows, heads_kv heads)
  int num_m_blocks, num_tiles_unsplit, num_splits;
};

// Test hook: FA3_JAX_FWD_NUM_SPLITS=n forces n splits (1..kMaxSplits) on every call, including
// more splits than key blocks (empty splits). Read once per process, so the workspace size
// Python asked for and the launch always agree.
inline int forced_num_splits() {
  static int const forced = [] {
    char const* env = std::getenv("FA3_JAX_FWD_NUM_SPLITS");
    return env ? std::clamp(std::atoi(env), 0, sm90::kMaxSplits) : 0;
  }();
  return forced;
}

inline FwdPlan plan_fwd(FwdParams const& p, bool packed, int num_sms) {
  bool const fp8 = p.dtype == DType::kFloat8E4M3;
  sm90::FwdTileSize const ts = sm90::fwd_tile_size(int(p.head_dim), int(p.head_dim_v), fp8);
  FwdPlan plan;
  plan.packed = packed;
  plan.seqlen_q = int(packed ? p.heads_q / p.heads_kv : p.seqlen_q);
  plan.heads = int(packed ? p.heads_kv : p.heads_q);
  plan.num_m_blocks = (plan.seqlen_q + ts.block_m - 1) / ts.block_m;
  plan.num_tiles_unsplit = plan.num_m_blocks * plan.heads * int(p.batch);
  int const num_n_blocks = int((p.seqlen_k + ts.block_n - 1) / ts.block_n);
  // The caller's count (FwdParams::num_splits, the KV cache's num_splits), else the test hook,
  // else the heuristic; at most kMaxSplits. A KV-cache call sizes the split by seqlen_k, the
  // cache's capacity (its lengths live on the device).
  int const forced = p.num_splits > 0
                         ? int(std::min<int64_t>(p.num_splits, sm90::kMaxSplits))
                         : forced_num_splits();
  plan.num_splits =
      p.num_seqs > 0 || p.q_segment_ids || fp8 ? 1
      : forced > 0          ? forced
                            : sm90::fwd_num_splits(plan.num_tiles_unsplit, num_n_blocks, num_sms);
  // The decode tile (16-bit split calls; tile_size.h, fwd_use_decode_tile): its own rows per tile
  // and key blocks, and the split count for its CTAs per SM unless the caller fixed it.
  bool const split = plan.num_splits > 1 || p.seqused_k;
  int64_t const keys_per_split =
      int64_t((num_n_blocks + plan.num_splits - 1) / plan.num_splits) * ts.block_n;
  bool const small_boxes = p.page_table && p.page_size % sm90::kFwdPageRowsLarge != 0;
  plan.decode = split && !fp8 && p.num_seqs == 0 && !p.q_segment_ids &&
                sm90::fwd_use_decode_tile(int(p.head_dim), int(p.head_dim_v), keys_per_split,
                                          small_boxes);
  if (plan.decode && forced == 0) {
    sm90::FwdTileSize const td = sm90::fwd_tile_size_decode(int(p.head_dim), int(p.head_dim_v));
    int const tiles = (plan.seqlen_q + td.block_m - 1) / td.block_m * plan.heads * int(p.batch);
    int const blocks = int((p.seqlen_k + td.block_n - 1) / td.block_n);
    plan.num_splits =
        sm90::fwd_num_splits(tiles, blocks, num_sms * sm90::fwd_ctas_per_sm(td.block_m));
    plan.decode = plan.num_splits > 1 || p.seqused_k;  // else the dense kernel, unsplit
  }
  // The large tile (its own block_m at hdim 64) runs only unsplit, so the split rule above
  // counts default tiles; launch_fwd_plan counts the large tile's own. Dense calls only (not
  // varlen, segment ids, KV cache, split or packed).
  bool const full_band = p.diag_lo <= -(p.seqlen_q - 1) && p.diag_hi >= p.seqlen_k - 1;
  bool const from_key0 = p.diag_lo <= -(p.seqlen_q - 1);
  plan.large = !packed && plan.num_splits == 1 && p.num_seqs == 0 && !p.q_segment_ids &&
               !p.seqused_k &&
               sm90::fwd_use_large_tile(int(p.head_dim), int(p.head_dim_v), fp8, full_band,
                                        from_key0, p.seqlen_q, p.seqlen_k);
  return plan;
}

// Workspace: the tile counter (in 256 bytes), then either (varlen) the clamped cu_seqlens,
// (segment ids) the block stats and hulls (segments_sm90.h), (split-KV) lse_accum and o_accum,
// 256-byte aligned, or (FP8 but hdim 128, which transposes V in the kernel) vt, V transposed
// (fp8_vt_sm90.h).
inline constexpr size_t kCounterBytes = 256;
inline size_t align256(size_t n) { return (n + 255) / 256 * 256; }
inline size_t partial_lse_bytes(FwdParams const& p, FwdPlan const& plan) {
  return align256(size_t(plan.num_splits) * p.batch * plan.heads * plan.seqlen_q * sizeof(float));
}
inline size_t workspace_bytes(FwdParams const& p, FwdPlan const& plan) {
  if (p.num_seqs > 0)
    return kCounterBytes +
           sm90::varlen_workspace_bytes(p.batch, p.num_seqs, p.seqlen_q, p.seqlen_k);
  if (p.q_segment_ids) {
    sm90::FwdTileSize const ts = sm90::fwd_tile_size(int(p.head_dim), int(p.head_dim_v));
    return kCounterBytes + sm90::segment_workspace_bytes(p.batch, p.seqlen_q, p.seqlen_k,
                                                         ts.block_m, ts.block_n);
  }
  if (p.dtype == DType::kFloat8E4M3)  // vt, unless the kernel transposes V itself
    return kCounterBytes + (sm90::fwd_fp8_transpose_v_in_kernel(int(p.head_dim))
                                ? 0
                                : sm90::vt_bytes(p.batch, p.seqlen_k, p.heads_kv, p.head_dim_v));
  if (plan.num_splits <= 1) return kCounterBytes;  // one split: out / lse written directly
  return kCounterBytes + partial_lse_bytes(p, plan) +
         size_t(plan.num_splits) * p.batch * plan.heads * plan.seqlen_q * p.head_dim_v *
             sizeof(float);
}

inline int num_sms_here() {
  return std::max(cuda::device_facts(cuda::current_device()).num_sms, 0);
}

// Defined in flash_fwd_launch_template_sm90.h and explicitly instantiated, per head dim, in
// flash_fwd_hdim<D>_sm90.cu: one call of one dtype (kFloat16, kBFloat16, or kFloat8E4M3 at the
// FP8 head dims) and head dim pair.
template <DType kDType, int kHeadDim, int kHeadDimV>
const char* run_fwd_sm90_hdim(const FwdParams& p, void* workspace, cudaStream_t_ stream);

}  // namespace fa3::sm90_fwd

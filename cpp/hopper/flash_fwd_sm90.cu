// fa3_jax Hopper forward: the flash.h entry points (sm90_supports_fwd, sm90_fwd_workspace_bytes,
// run_fwd_sm90) and the one list of compiled instantiations.
//
// Split-KV (Flash-Decoding) and GQA packing are chosen here per call (plan_fwd, pack_gqa; the
// split count's rule is fwd_num_splits in tile_size.h).
//
// Instantiations: {fp16, bf16} x head dims {64, 96, 128, 192, 256} plus (192, dv 128), each
// dense, split-KV, varlen and segment ids; FP8 (e4m3, dense only) at head dims 64, 128 and 256.
// head_dims.h selects the head dims to build (all dtypes); the supports query then reports
// exactly what was built.
#ifndef CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED  // WGMMA N = 80, 112 (see flash_fwd_traits_sm90.h)
#endif

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>

#include "../cuda_device.h"
#include "../flash.h"
#include "flash_fwd_combine_sm90.h"
#include "flash_fwd_kernel_sm90.h"
#include "fp8_vt_sm90.h"
#include "head_dims.h"
#include "segments_sm90.h"
#include "tile_size.h"

#define FA3_JAX_FWD_HDIM(N) FA3_JAX_BUILD_HDIM(N)

namespace fa3 {
namespace {

using namespace cute;

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
bool packable_gqa_shape(FwdParams const& p) {
  return p.seqlen_q == 1 && p.heads_q > p.heads_kv && p.num_seqs == 0 && !p.q_segment_ids &&
         p.dtype != DType::kFloat8E4M3;
}
bool pack_gqa(FwdParams const& p) {
  if (!packable_gqa_shape(p)) return false;
  if (p.seqused_k) return true;
  return p.diag_lo <= 0 && p.diag_hi >= p.seqlen_k - 1;
}

// The grid as the kernel sees it: query rows and heads per tile coordinates, and the split.
struct FwdPlan {
  bool packed;
  bool large;  // the dense call runs the large tile (tile_size.h, fwd_use_large_tile)
  int seqlen_q, heads;  // of the tiles (packed: the group's heads as rows, heads_kv heads)
  int num_m_blocks, num_tiles_unsplit, num_splits;
};

// Test hook: FA3_JAX_FWD_NUM_SPLITS=n forces n splits (1..kMaxSplits) on every call, including
// more splits than key blocks (empty splits). Read once per process, so the workspace size
// Python asked for and the launch always agree.
int forced_num_splits() {
  static int const forced = [] {
    char const* env = std::getenv("FA3_JAX_FWD_NUM_SPLITS");
    return env ? std::clamp(std::atoi(env), 0, sm90::kMaxSplits) : 0;
  }();
  return forced;
}

FwdPlan plan_fwd(FwdParams const& p, bool packed, int num_sms) {
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
constexpr size_t kCounterBytes = 256;
size_t align256(size_t n) { return (n + 255) / 256 * 256; }
size_t partial_lse_bytes(FwdParams const& p, FwdPlan const& plan) {
  return align256(size_t(plan.num_splits) * p.batch * plan.heads * plan.seqlen_q * sizeof(float));
}
size_t workspace_bytes(FwdParams const& p, FwdPlan const& plan) {
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
  if (plan.num_splits <= 1 && !p.seqused_k) return kCounterBytes;  // seqused_k: always kSplit
  return kCounterBytes + partial_lse_bytes(p, plan) +
         size_t(plan.num_splits) * p.batch * plan.heads * plan.seqlen_q * p.head_dim_v *
             sizeof(float);
}

int num_sms_here() { return std::max(cuda::device_facts(cuda::current_device()).num_sms, 0); }

template <class Element, int kHeadDim, int kHeadDimV, sm90::FwdMode kMode, bool kLarge = false>
const char* launch_fwd_plan(const FwdParams& p, FwdPlan const& plan, void* workspace,
                            cudaStream_t stream) {
  constexpr bool kFp8 = sizeof(Element) == 1;
  constexpr sm90::FwdTileSize ts = kLarge ? sm90::fwd_tile_size_large(kHeadDim, kHeadDimV, kFp8)
                                          : sm90::fwd_tile_size(kHeadDim, kHeadDimV, kFp8);
  static_assert(!kLarge || (kMode == sm90::FwdMode::kDense && ts.block_n > 0));
  using Traits = sm90::FwdTraits<kHeadDim, kHeadDimV, ts.block_m, ts.block_n, ts.stages,
                                 ts.producer_regs, ts.consumer_regs, Element, kMode>;
  using ElementOut = typename Traits::ElementOut;
  constexpr bool kSplit = Traits::kSplit, varlen = Traits::kVarlen;
  // FP8 with the V transpose kernel (fp8_vt_sm90.h), not inside the attention kernel.
  constexpr bool kLoadVt = Traits::kLoadVt;
  using ShapeQKV = typename Traits::ShapeQKV;
  using StrideQKV = typename Traits::StrideQKV;

  int const b = int(p.batch), sk = int(p.seqlen_k);
  int const hq = int(p.heads_q), hkv = int(p.heads_kv);
  cuda::DeviceFacts const& dev = cuda::device_facts(cuda::current_device());
  // Tile coordinates: sq rows per head, h heads (packed: the group's query heads are the rows).
  int const sq = plan.seqlen_q, h = plan.heads;
  int const group = hq / hkv;
  // TMA boxes need non-empty tensors; with seqlen_k == 0 every tile is empty and none loads.
  int const sk_tma = std::max(sk, 1);

  // Paged (kSplit only, sm90_supports_fwd): K/V are the pool, (page_size, d, hkv, num_pages), and
  // the producer picks the page of each key block (FwdMainloop::load).
  bool const paged = p.page_table != nullptr;
  int const kv_rows = paged ? int(p.page_size) : sk_tma;
  int const kv_batch = paged ? int(p.num_pages) : b;

  typename Traits::Params kp;
  kp.shape_q = ShapeQKV(sq, kHeadDim, h, b);
  kp.shape_k = ShapeQKV(kv_rows, kHeadDim, hkv, kv_batch);
  kp.page_table = p.page_table;
  kp.page_table_stride = paged ? int(p.seqlen_k / p.page_size) : 0;
  kp.page_size = paged ? int(p.page_size) : 0;
  kp.page_blocks = paged && p.page_size % ts.block_n == 0 ? int(p.page_size / ts.block_n) : 0;
  // FP8 reads vt [b, hkv, dv, sk16] (fp8_vt_sm90.h), written here into the workspace: rows of
  // keys, the TMA's 16-byte row stride alignment being one reason sk16 is seqlen_k rounded up to
  // 16. (sk_vt is at least 16: with seqlen_k 0 no tile loads, but the descriptor needs a shape.)
  int const sk16 = (sk + 15) / 16 * 16, sk_vt = std::max(sk16, 16);
  void const* v_ptr = p.v;
  sm90::VtParams vp{};  // FP8: launched right before the attention kernel (below)
  if constexpr (kFp8) {
    if (!workspace) return "the sm90 FP8 forward needs its workspace";
  }
  if constexpr (kLoadVt) {
    auto* vt = reinterpret_cast<uint8_t*>(static_cast<char*>(workspace) + kCounterBytes);
    vp = {static_cast<uint8_t const*>(p.v), vt, sk, sk16, hkv, kHeadDimV, 0, 0};
    v_ptr = vt;
  }
  kp.shape_v = kLoadVt ? ShapeQKV(kHeadDimV, sk_vt, hkv, b)
                    : ShapeQKV(kv_rows, kHeadDimV, hkv, kv_batch);
  // Q [b, seqlen_q, hq, d]; packed (seqlen_q 1): row r of head h_kv is query head h_kv * group + r.
  StrideQKV const stride_q =
      plan.packed ? StrideQKV(int64_t(kHeadDim), _1{}, int64_t(group) * kHeadDim,
                              int64_t(hq) * kHeadDim)
                  : StrideQKV(int64_t(hq) * kHeadDim, _1{}, int64_t(kHeadDim),
                              int64_t(sq) * hq * kHeadDim);
  StrideQKV const stride_k(int64_t(hkv) * kHeadDim, _1{}, int64_t(kHeadDim),
                           int64_t(paged ? kv_rows : sk) * hkv * kHeadDim);
  StrideQKV const stride_v =
      kLoadVt ? StrideQKV(int64_t(sk_vt), _1{}, int64_t(kHeadDimV) * sk_vt,
                          int64_t(hkv) * kHeadDimV * sk_vt)
              : StrideQKV(int64_t(hkv) * kHeadDimV, _1{}, int64_t(kHeadDimV),
                          int64_t(paged ? kv_rows : sk) * hkv * kHeadDimV);
  auto gmem = [](const void* ptr) { return make_gmem_ptr(static_cast<Element const*>(ptr)); };
  kp.tma_q = make_tma_copy(SM90_TMA_LOAD{}, make_tensor(gmem(p.q), kp.shape_q, stride_q),
                           typename Traits::SmemLayoutQ{},
                           select<0, 2>(typename Traits::TileShapeQK{}), _1{});
  kp.tma_k = make_tma_copy(SM90_TMA_LOAD{}, make_tensor(gmem(p.k), kp.shape_k, stride_k),
                           take<0, 2>(typename Traits::SmemLayoutK{}),
                           select<1, 2>(typename Traits::TileShapeQK{}), _1{});
  kp.tma_v = make_tma_copy(SM90_TMA_LOAD{}, make_tensor(gmem(v_ptr), kp.shape_v, stride_v),
                           take<0, 2>(typename Traits::SmemLayoutVLoad{}),
                           typename Traits::TileShapeVLoad{}, _1{});
  // Pages smaller than a block are read as boxes of kPageRowsLarge rows where the page size
  // allows, else of kPageRows (FwdMainloop::load makes the same choice).
  constexpr int kBoxLarge = Traits::kPageRowsLarge, kBoxSmall = Traits::kPageRows;
  bool const large_boxes = p.page_size % kBoxLarge == 0;
  int const box_rows = large_boxes ? kBoxLarge : kBoxSmall;
  if constexpr (kSplit) {
    if (paged && kp.page_blocks == 0) {
      // The pool as boxes of `rows` rows: box i of page q is box q * (page_size / rows) + i,
      // rows * hkv * d elements apart (FwdMainloop::load).
      auto boxes = [&](void const* ptr, int rows, int d) {
        int const count = int(p.num_pages * (p.page_size / rows));  // < 2^30 (sm90_supports_fwd)
        return make_tensor(gmem(ptr), ShapeQKV(rows, d, hkv, count),
                           StrideQKV(int64_t(hkv) * d, _1{}, int64_t(d), int64_t(rows) * hkv * d));
      };
      if (large_boxes) {
        kp.tma_k_page_large = make_tma_copy(SM90_TMA_LOAD{}, boxes(p.k, kBoxLarge, kHeadDim),
                                            typename Traits::SmemLayoutKPageLarge{},
                                            Shape<Int<kBoxLarge>, Int<kHeadDim>>{}, _1{});
        kp.tma_v_page_large = make_tma_copy(SM90_TMA_LOAD{}, boxes(p.v, kBoxLarge, kHeadDimV),
                                            typename Traits::SmemLayoutVPageLarge{},
                                            Shape<Int<kBoxLarge>, Int<kHeadDimV>>{}, _1{});
      } else {
        kp.tma_k_page = make_tma_copy(SM90_TMA_LOAD{}, boxes(p.k, kBoxSmall, kHeadDim),
                                      typename Traits::SmemLayoutKPage{},
                                      Shape<Int<kBoxSmall>, Int<kHeadDim>>{}, _1{});
        kp.tma_v_page = make_tma_copy(SM90_TMA_LOAD{}, boxes(p.v, kBoxSmall, kHeadDimV),
                                      typename Traits::SmemLayoutVPage{},
                                      Shape<Int<kBoxSmall>, Int<kHeadDimV>>{}, _1{});
      }
    }
  }
  kp.v_warp = kSplit && paged && kp.page_blocks == 0 && sm90::fwd_paged_v_warp(box_rows);
  kp.k_warp = kp.v_warp && Traits::kPagedKWarp;

  // Clamping the band to [-seqlen_q, seqlen_k] keeps its meaning and all index math in int.
  // Packed dense rows all see every key (pack_gqa), which the unbounded band says. With
  // seqused_k the tiles take their band from kp.varlen's diag_lo / diag_hi instead
  // (Params::locate), on query positions: packed rows are (position, head) pairs, rows_per_pos
  // of them per position (mask.h, kGrouped).
  int64_t const lo = plan.packed ? -int64_t(sq) : std::clamp<int64_t>(p.diag_lo, -int64_t(sq), int64_t(sk));
  int64_t const hi = plan.packed ? int64_t(sk) : std::clamp<int64_t>(p.diag_hi, -int64_t(sq), int64_t(sk));
  kp.mask = {};  // segment fields (SegmentBandMask) are per tile: Params::locate
  kp.mask.seqlen_q = sq;
  kp.mask.seqlen_k = sk;
  kp.mask.diag_lo = int(lo);
  kp.mask.diag_hi = int(hi);
  kp.seqused_k = p.seqused_k;
  if (p.seqused_k) {
    // Relative to each row's bottom-right diagonal, pre-clamped to +-(sq + sk) (< 2^31 by
    // sm90_supports_fwd) as for varlen (sm90::varlen_diag).
    int64_t const far = int64_t(sq) + sk;
    kp.varlen.diag_lo = int(std::clamp<int64_t>(p.diag_lo, -far, far));
    kp.varlen.diag_hi = int(std::clamp<int64_t>(p.diag_hi, -far, far));
    kp.mask.rows_per_pos = plan.packed ? group : int(p.packed_group);
  }

  // Varlen: tiles are (numbered query block, head, batch row) (sm90::varlen_block); each tile
  // finds its sequence on the device. A varlen plan is never packed or split (plan_fwd).
  int const seqs = varlen ? int(p.num_seqs) : 1;
  int const span_q = varlen ? int(std::min<int64_t>(p.max_seqlen_q, sq)) : sq;
  int const span_k = varlen ? int(std::min<int64_t>(p.max_seqlen_k, sk)) : sk;
  bool longest_first = hi < sk;
  if constexpr (varlen) {
    sm90::VarlenPrepParams prep;
    prep.raw_q = p.cu_seqlens_q;
    prep.raw_k = p.cu_seqlens_k;
    prep.batch = b;
    prep.num_seqs = seqs;
    prep.seqlen_q = sq;
    prep.seqlen_k = sk;
    if (!sm90::varlen_workspace(prep, static_cast<char*>(workspace) + kCounterBytes, ts.block_m,
                                span_q, 0, span_k))
      return "sm90 varlen forward: query blocks below the numbering's smallest block";
    prep.fill[0] = {p.out, int64_t(hq) * kHeadDimV * int64_t(sizeof(ElementOut)), false};
    prep.lse = p.lse;
    prep.lse_heads = hq;
    if (!sm90::launch_varlen_prepare(prep, stream)) return "sm90 varlen prepare kernel launch failed";
    // Pre-clamped to +-(sq + sk) (< 2^31 by sm90_supports_fwd): the per-sequence band keeps its
    // meaning (sm90::varlen_diag).
    int64_t const far = int64_t(sq) + sk;
    kp.varlen = {prep.cu_q, prep.cu_k, seqs, prep.block_seq_q, prep.block_stride_q,
                 int(std::clamp<int64_t>(p.diag_lo, -far, far)),
                 int(std::clamp<int64_t>(p.diag_hi, -far, far))};
    longest_first = p.diag_hi < span_k;
  }
  if constexpr (Traits::kSegments) {
    if (!workspace) return "the sm90 segment-id forward needs its workspace";
    sm90::SegmentPrepParams prep;
    prep.q_ids = p.q_segment_ids;
    prep.k_ids = p.kv_segment_ids;
    prep.batch = b;
    prep.seqlen_q = sq;
    prep.seqlen_k = sk;
    prep.block_m = ts.block_m;
    prep.block_n = ts.block_n;
    prep.by_keys = false;
    if (!sm90::launch_segment_prepare(prep, static_cast<char*>(workspace) + kCounterBytes, stream,
                                      kp.seg))
      return "sm90 segment-id prepare kernel launch failed";
  }

  int const num_m_blocks = varlen ? kp.varlen.block_stride : (span_q + ts.block_m - 1) / ts.block_m;
  int const num_hb = h * b;
  // K/V bytes one (head, sequence) pair pulls through L2 (shared by the query heads of a group).
  int const heads_per_kv = h / hkv;
  int64_t const kv_bytes = std::max<int64_t>(
      1, int64_t(span_k) * (kHeadDim + kHeadDimV) * sizeof(Element) / heads_per_kv);
  int const l2_share = sm90::fwd_l2_section_divisor(kHeadDim, Traits::kFp8, Traits::kLocated,
                                                    longest_first);
  int const l2_group =
      int(std::clamp<int64_t>(int64_t(dev.l2_bytes) / l2_share / kv_bytes, 1, num_hb));
  kp.sched = {num_m_blocks, h, num_hb, 0, 0, num_m_blocks * num_hb * plan.num_splits,
              longest_first, plan.num_splits, /*claim_on_demand=*/false};
  sm90::set_sections(kp.sched, l2_group);
  kp.qheads_per_kvhead = heads_per_kv;
  int const grid = std::min(kp.sched.num_tiles, std::max(dev.num_sms, 1));
  kp.sched.claim_on_demand = !kSplit && longest_first &&
                             kp.sched.num_tiles <= sm90::kClaimOnDemandMaxTilesPerCta * grid;
  // With at most one tile per CTA there is nothing to balance: no counter and no memset (short
  // calls then cost one launch).
  int* tile_counter = static_cast<int*>(workspace);
  kp.tile_counter = kp.sched.num_tiles > grid ? tile_counter : nullptr;
  if (kp.tile_counter && cudaMemsetAsync(kp.tile_counter, 0, sizeof(int), stream) != cudaSuccess)
    return "cannot reset the sm90 forward tile counter";

  constexpr float kLog2e = 1.4426950408889634f;
  kp.has_softcap = p.softcap > 0.f;
  kp.softcap_pre = kp.has_softcap ? p.softmax_scale / p.softcap : 0.f;
  kp.scale_log2 = (kp.has_softcap ? p.softcap : p.softmax_scale) * kLog2e;
  kp.out = static_cast<ElementOut*>(p.out);
  kp.descale_q = p.descale_q;
  kp.descale_k = p.descale_k;
  kp.descale_v = p.descale_v;
  // Per block: the blocks are this kernel's tiles (sm90_supports_fwd checked it).
  kp.descale_nq = p.descale_block_q > 0 ? (int(p.seqlen_q) + ts.block_m - 1) / ts.block_m : 0;
  kp.descale_nk = p.descale_block_k > 0 ? (sk + ts.block_n - 1) / ts.block_n : 0;
  // out [b, seqlen_q, hq, dv] and lse [b, hq, seqlen_q] in tile coordinates (row, head, batch).
  kp.out_batch_stride = int64_t(p.seqlen_q) * hq * kHeadDimV;
  kp.out_row_stride = plan.packed ? int64_t(kHeadDimV) : int64_t(hq) * kHeadDimV;
  kp.out_head_stride = plan.packed ? int64_t(group) * kHeadDimV : int64_t(kHeadDimV);
  if constexpr (Traits::kTmaStoreO) {
    kp.shape_o = ShapeQKV(sq, kHeadDimV, h, b);
    kp.tma_o = make_tma_copy(
        SM90_TMA_STORE{},
        make_tensor(make_gmem_ptr(static_cast<ElementOut*>(p.out)), kp.shape_o,
                    StrideQKV(kp.out_row_stride, _1{}, kp.out_head_stride, kp.out_batch_stride)),
        take<0, 2>(typename Traits::SmemLayoutO{}), Shape<_64, Int<kHeadDimV>>{}, _1{});
  }
  kp.lse = p.lse;
  kp.lse_batch_stride = int64_t(hq) * p.seqlen_q;
  kp.lse_row_stride = 1;
  kp.lse_head_stride = plan.packed ? int64_t(group) : int64_t(p.seqlen_q);
  kp.lse_accum = nullptr;
  kp.o_accum = nullptr;
  if (kSplit) {
    if (!workspace) return "the sm90 split-KV forward needs its workspace";
    char* ws = static_cast<char*>(workspace);
    kp.lse_accum = reinterpret_cast<float*>(ws + kCounterBytes);
    kp.o_accum = reinterpret_cast<float*>(ws + kCounterBytes + partial_lse_bytes(p, plan));
  }

  auto kernel = sm90::flash_fwd_kernel_sm90<Traits>;
  constexpr int kSmemBytes = sizeof(typename Traits::SharedStorage);
  static cuda::PerDevice<cudaError_t> smem_limit_set;
  if (cuda::set_smem_limit_once(smem_limit_set, kernel, kSmemBytes) != cudaSuccess)
    return "cannot raise the shared-memory limit of the sm90 forward kernel";
  if constexpr (kLoadVt) {
    // The V transpose, then the attention kernel as its programmatic dependent: the attention
    // CTAs start (prologue, Q and K loads, first S) while the transpose's last CTAs still run,
    // and wait for vt before their first V load (FwdMainloop::load). Nothing may sit between the
    // two launches in the stream (the tile counter's memset is above). Without keys there is
    // no transpose (and no tile loads anything): a plain launch.
    if (!sm90::launch_fp8_transpose_v(vp, b, stream)) return "sm90 FP8 V transpose launch failed";
    if (sk > 0) {
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(grid);
      cfg.blockDim = dim3(Traits::kNumThreads);
      cfg.dynamicSmemBytes = kSmemBytes;
      cfg.stream = stream;
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr[0].val.programmaticStreamSerializationAllowed = 1;
      cfg.attrs = attr;
      cfg.numAttrs = 1;
      if (cudaLaunchKernelEx(&cfg, kernel, kp) != cudaSuccess || cuda::launch_failed())
        return "sm90 FP8 forward kernel launch failed";
      return nullptr;
    }
  }
  kernel<<<grid, Traits::kNumThreads, kSmemBytes, reinterpret_cast<cudaStream_t>(stream)>>>(kp);
  if (cuda::launch_failed()) return "sm90 forward kernel launch failed";
  if constexpr (!kSplit) return nullptr;

  sm90::FwdCombineParams cp;
  cp.num_splits = plan.num_splits;
  cp.num_rows = num_hb * sq;
  cp.seqlen_q = sq;
  cp.heads = h;
  cp.head_dim_v = kHeadDimV;
  cp.lse_accum = kp.lse_accum;
  cp.o_accum = kp.o_accum;
  cp.out = p.out;
  cp.out_row_stride = kp.out_row_stride;
  cp.out_head_stride = kp.out_head_stride;
  cp.out_batch_stride = kp.out_batch_stride;
  cp.lse = p.lse;
  cp.lse_row_stride = kp.lse_row_stride;
  cp.lse_head_stride = kp.lse_head_stride;
  cp.lse_batch_stride = kp.lse_batch_stride;
  static_assert(kHeadDimV <= 32 * 4 * sm90::kCombineChunks, "combine: 4 columns a lane a chunk");
  int const combine_blocks = (cp.num_rows + sm90::kCombineWarps - 1) / sm90::kCombineWarps;
  sm90::flash_fwd_combine_sm90<ElementOut>
      <<<combine_blocks, sm90::kCombineWarps * 32, 0, stream>>>(cp);
  if (cuda::launch_failed()) return "sm90 forward split-KV combine kernel launch failed";
  return nullptr;
}

template <class Element, int kHeadDim, int kHeadDimV>
const char* launch_fwd(const FwdParams& p, void* workspace, cudaStream_t stream) {
  if (p.batch == 0 || p.seqlen_q == 0 || p.heads_q == 0) return nullptr;
  FwdPlan const plan = plan_fwd(p, pack_gqa(p), num_sms_here());
  using sm90::FwdMode;
  if constexpr (sizeof(Element) == 1) {  // FP8: never varlen, packed or split (plan_fwd)
    return launch_fwd_plan<Element, kHeadDim, kHeadDimV, FwdMode::kDense>(p, plan, workspace,
                                                                          stream);
  } else {
    if (p.cu_seqlens_q)
      return launch_fwd_plan<Element, kHeadDim, kHeadDimV, FwdMode::kVarlen>(p, plan, workspace,
                                                                             stream);
    if (p.q_segment_ids)  // never packed or split (plan_fwd)
      return launch_fwd_plan<Element, kHeadDim, kHeadDimV, FwdMode::kSegments>(p, plan, workspace,
                                                                               stream);
    if constexpr (sm90::fwd_tile_size_large(kHeadDim, kHeadDimV).block_n > 0) {
      if (plan.large)
        return launch_fwd_plan<Element, kHeadDim, kHeadDimV, FwdMode::kDense, true>(
            p, plan, workspace, stream);
    }
    return plan.num_splits > 1 || p.seqused_k
               ? launch_fwd_plan<Element, kHeadDim, kHeadDimV, FwdMode::kSplit>(p, plan,
                                                                                workspace, stream)
               : launch_fwd_plan<Element, kHeadDim, kHeadDimV, FwdMode::kDense>(p, plan,
                                                                                workspace, stream);
  }
}

template <class Element>
const char* dispatch_hdim(const FwdParams& p, void* workspace, cudaStream_t stream) {
#if FA3_JAX_FWD_HDIM(64)
  if (p.head_dim == 64 && p.head_dim_v == 64)
    return launch_fwd<Element, 64, 64>(p, workspace, stream);
#endif
#if FA3_JAX_FWD_HDIM(96)
  if (p.head_dim == 96 && p.head_dim_v == 96)
    return launch_fwd<Element, 96, 96>(p, workspace, stream);
#endif
#if FA3_JAX_FWD_HDIM(128)
  if (p.head_dim == 128 && p.head_dim_v == 128)
    return launch_fwd<Element, 128, 128>(p, workspace, stream);
#endif
#if FA3_JAX_FWD_HDIM(192)
  if (p.head_dim == 192 && p.head_dim_v == 192)
    return launch_fwd<Element, 192, 192>(p, workspace, stream);
  if (p.head_dim == 192 && p.head_dim_v == 128)
    return launch_fwd<Element, 192, 128>(p, workspace, stream);
#endif
#if FA3_JAX_FWD_HDIM(256)
  if (p.head_dim == 256 && p.head_dim_v == 256)
    return launch_fwd<Element, 256, 256>(p, workspace, stream);
#endif
  return "head dim not compiled into the sm90 forward kernel";
}

// FP8 head dims: the power-of-two ones, which fp8_attention's Hadamard transform also needs.
const char* dispatch_hdim_fp8(const FwdParams& p, void* workspace, cudaStream_t stream) {
  using E4M3 = cutlass::float_e4m3_t;
#if FA3_JAX_FWD_HDIM(64)
  if (p.head_dim == 64 && p.head_dim_v == 64) return launch_fwd<E4M3, 64, 64>(p, workspace, stream);
#endif
#if FA3_JAX_FWD_HDIM(128)
  if (p.head_dim == 128 && p.head_dim_v == 128)
    return launch_fwd<E4M3, 128, 128>(p, workspace, stream);
#endif
#if FA3_JAX_FWD_HDIM(256)
  if (p.head_dim == 256 && p.head_dim_v == 256)
    return launch_fwd<E4M3, 256, 256>(p, workspace, stream);
#endif
  return "head dim not compiled into the sm90 FP8 forward kernel";
}

// #if, not expressions: with FA3_JAX_SELECTED_HDIMS an unselected FA3_JAX_FWD_HDIM(N) is an
// undefined identifier (it reads as 0 only in the preprocessor).
bool hdim_compiled(int64_t d, int64_t dv) {
#if FA3_JAX_FWD_HDIM(64)
  if (d == 64 && dv == 64) return true;
#endif
#if FA3_JAX_FWD_HDIM(96)
  if (d == 96 && dv == 96) return true;
#endif
#if FA3_JAX_FWD_HDIM(128)
  if (d == 128 && dv == 128) return true;
#endif
#if FA3_JAX_FWD_HDIM(192)
  if (d == 192 && (dv == 192 || dv == 128)) return true;
#endif
#if FA3_JAX_FWD_HDIM(256)
  if (d == 256 && dv == 256) return true;
#endif
  return false;
}

}  // namespace

bool sm90_supports_fwd(const FwdParams& p) {
  if (p.dtype == DType::kFloat8E4M3) {
    // Dense only, head dims 64 / 128 / 256, per-block descales only on this kernel's tiles.
    if (p.head_dim != p.head_dim_v || (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256))
      return false;
    if (p.cu_seqlens_q || p.q_segment_ids || !p.descale_q || !p.descale_k || !p.descale_v)
      return false;
    if (p.descale_block_q > 0 || p.descale_block_k > 0) {
      sm90::FwdTileSize const ts = sm90::fwd_tile_size(int(p.head_dim), int(p.head_dim_v), true);
      if (p.descale_block_q != ts.block_m || p.descale_block_k != ts.block_n) return false;
    }
  } else if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) {
    return false;
  }
  if (!hdim_compiled(p.head_dim, p.head_dim_v)) return false;
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) return false;
  // Tile coordinates and TMA box coordinates are 32-bit.
  int64_t const kMax = int64_t(1) << 30;
  // Segment ids: 16-bit only (FP8 returned above); the prepare grids' y is the batch.
  if (p.q_segment_ids && (p.cu_seqlens_q || p.batch > 65535)) return false;
  // seqused_k: the dense 16-bit layout only (flash.h). Paged: with seqused_k, pages of a
  // multiple of 16 rows, page and pool counts within the TMA's 32-bit coordinates.
  if (p.seqused_k && (p.cu_seqlens_q || p.q_segment_ids || p.dtype == DType::kFloat8E4M3))
    return false;
  // Rows packed by the caller: whole groups of one KV head's query heads, KV cache calls only.
  if (p.packed_group != 1 &&
      (!p.seqused_k || p.packed_group < 1 || p.heads_q != p.heads_kv ||
       p.seqlen_q % p.packed_group != 0))
    return false;
  if (p.page_table) {
    // Pages of whole key blocks, or of whole kFwdPageRows-row boxes (tile_size.h).
    if (!p.seqused_k || p.page_size < 1 || p.page_size % sm90::kFwdPageRows != 0 ||
        p.num_pages >= (int64_t(1) << 30) || p.seqlen_k % p.page_size != 0 ||
        p.num_pages * (p.page_size / sm90::kFwdPageRows) >= (int64_t(1) << 30))
      return false;
  }
  if (p.cu_seqlens_q) {
    // Tiles (numbered query block, head, batch row) are numbered in int (the bound for the
    // smallest block_m); the prepare grid's y is the batch.
    if (p.num_seqs < 1 || p.num_seqs >= kMax || p.batch > 65535 ||
        int64_t(sm90::varlen_block_bound(p.seqlen_q, p.num_seqs,
                                         std::min(p.max_seqlen_q, p.seqlen_q), 64)) *
                p.heads_q * p.batch >= kMax)
      return false;
  }
  return p.seqlen_q < kMax && p.seqlen_k < kMax && p.batch * p.heads_q < kMax;
}

// The dynamic tile scheduler's counter (reset by run_fwd_sm90 on the stream) and either the
// clamped cu_seqlens (varlen: num_seqs > 0), the segment stats and hulls (q_segment_ids non-null;
// only whether it is null matters here) or, where the shapes call for split-KV, the partial
// results. The band is not among the shapes Python passes (cpp/module.cc), so the size covers
// both the packed and the unpacked GQA plan.
size_t sm90_fwd_workspace_bytes(const FwdParams& p) {
  if (p.batch <= 0 || p.seqlen_q <= 0 || p.heads_q <= 0 || p.heads_kv <= 0) return kCounterBytes;
  int const num_sms = num_sms_here();
  size_t bytes = workspace_bytes(p, plan_fwd(p, false, num_sms));
  if (packable_gqa_shape(p)) bytes = std::max(bytes, workspace_bytes(p, plan_fwd(p, true, num_sms)));
  return bytes;
}

const char* run_fwd_sm90(const FwdParams& p, void* workspace, cudaStream_t_ stream) {
  if (!sm90_supports_fwd(p)) return "unsupported dtype or head dim for the sm90 forward";
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  // Without a workspace the kernel falls back to the static round-robin schedule (dense,
  // unsplit only: split-KV reports an error).
  if (p.cu_seqlens_q && !workspace) return "the sm90 varlen forward needs its workspace";
  if (p.q_segment_ids && !workspace) return "the sm90 segment-id forward needs its workspace";
  if (p.dtype == DType::kFloat8E4M3) return dispatch_hdim_fp8(p, workspace, s);
  if (p.dtype == DType::kFloat16) return dispatch_hdim<cutlass::half_t>(p, workspace, s);
  return dispatch_hdim<cutlass::bfloat16_t>(p, workspace, s);
}

}  // namespace fa3

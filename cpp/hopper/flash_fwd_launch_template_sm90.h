// fa3_jax Hopper forward: the launch of one call (launch_fwd_plan: TMA descriptors, band, tile
// scheduler, the V transpose and split-KV combine passes) for one (dtype, head dim) pair.
// Included only by the per-head-dim instantiation files flash_fwd_hdim*_sm90.cu, each of which
// instantiates run_fwd_sm90_hdim (FA3_FWD_INSTANTIATE*) for its head dims, so the kernels of one
// head dim compile in their own translation unit; the entry points are in flash_fwd_sm90.cu.
//
// Instantiations: {fp16, bf16} x head dims {64, 96, 128, 192, 256} plus (192, dv 128), each
// dense, split-KV, varlen and segment ids; FP8 (e4m3, dense only) at head dims 64, 128 and 256.
#pragma once

#ifndef CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED  // WGMMA N = 80, 112 (see flash_fwd_traits_sm90.h)
#endif

#include <cuda_runtime.h>

#include <algorithm>

#include "../cuda_device.h"
#include "../flash.h"
#include "flash_fwd_combine_sm90.h"
#include "flash_fwd_kernel_sm90.h"
#include "flash_fwd_launch_sm90.h"
#include "fp8_vt_sm90.h"
#include "head_dims.h"
#include "segments_sm90.h"
#include "tile_size.h"

namespace fa3::sm90_fwd {

using namespace cute;

// Which of a head dim's tiles a launch runs (tile_size.h): the default one, the dense call's
// large tile (plan.large) or the split call's decode tile (plan.decode).
enum class FwdTile { kDefault, kLarge, kDecode };

template <class Element, int kHeadDim, int kHeadDimV, sm90::FwdMode kMode,
          FwdTile kTile = FwdTile::kDefault>
const char* launch_fwd_plan(const FwdParams& p, FwdPlan const& plan, void* workspace,
                            cudaStream_t stream) {
  constexpr bool kFp8 = sizeof(Element) == 1;
  constexpr sm90::FwdTileSize ts =
      kTile == FwdTile::kLarge    ? sm90::fwd_tile_size_large(kHeadDim, kHeadDimV, kFp8)
      : kTile == FwdTile::kDecode ? sm90::fwd_tile_size_decode(kHeadDim, kHeadDimV)
                                  : sm90::fwd_tile_size(kHeadDim, kHeadDimV, kFp8);
  static_assert(kTile != FwdTile::kLarge || (kMode == sm90::FwdMode::kDense && ts.block_n > 0));
  static_assert(kTile != FwdTile::kDecode || (kMode == sm90::FwdMode::kSplit && ts.block_n > 0));
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
  int const grid = std::min(kp.sched.num_tiles, std::max(dev.num_sms, 1) * Traits::kCtasPerSm);
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
  if (!kSplit || plan.num_splits == 1) return nullptr;  // one split wrote out / lse itself

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
        return launch_fwd_plan<Element, kHeadDim, kHeadDimV, FwdMode::kDense, FwdTile::kLarge>(
            p, plan, workspace, stream);
    }
    if constexpr (sm90::fwd_tile_size_decode(kHeadDim, kHeadDimV).block_n > 0) {
      if (plan.decode)
        return launch_fwd_plan<Element, kHeadDim, kHeadDimV, FwdMode::kSplit, FwdTile::kDecode>(
            p, plan, workspace, stream);
    }
    return plan.num_splits > 1 || p.seqused_k
               ? launch_fwd_plan<Element, kHeadDim, kHeadDimV, FwdMode::kSplit>(p, plan,
                                                                                workspace, stream)
               : launch_fwd_plan<Element, kHeadDim, kHeadDimV, FwdMode::kDense>(p, plan,
                                                                                workspace, stream);
  }
}

template <DType kDType, int kHeadDim, int kHeadDimV>
const char* run_fwd_sm90_hdim(const FwdParams& p, void* workspace, cudaStream_t_ stream) {
  using Element = typename sm90::ElementOf<kDType>::type;
  return launch_fwd<Element, kHeadDim, kHeadDimV>(p, workspace, stream);
}

}  // namespace fa3::sm90_fwd

// The 16-bit instantiations of one head dim pair, and the FP8 one (head dims 64, 128, 256).
#define FA3_FWD_INSTANTIATE(D, DV)                                                         \
  template const char* fa3::sm90_fwd::run_fwd_sm90_hdim<fa3::DType::kFloat16, D, DV>(     \
      const fa3::FwdParams&, void*, fa3::cudaStream_t_);                                  \
  template const char* fa3::sm90_fwd::run_fwd_sm90_hdim<fa3::DType::kBFloat16, D, DV>(    \
      const fa3::FwdParams&, void*, fa3::cudaStream_t_);
#define FA3_FWD_INSTANTIATE_FP8(D)                                                          \
  template const char* fa3::sm90_fwd::run_fwd_sm90_hdim<fa3::DType::kFloat8E4M3, D, D>(    \
      const fa3::FwdParams&, void*, fa3::cudaStream_t_);

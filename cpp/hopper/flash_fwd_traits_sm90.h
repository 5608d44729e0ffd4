// fa3_jax Hopper forward: compile-time configuration (tile shapes, shared-memory layouts,
// WGMMA and TMA types) and the kernel's runtime parameters.
//
// Templated on the element type: fp16 / bf16, or float_e4m3_t (FP8, kDense only, bfloat16 out).
// The e4m3 WGMMA takes both operands K-major only, so for P @ V the V tile must have the keys
// contiguous: the 16-bit kernel reads its row-major V tile as an MN-major operand, while the FP8
// kernel loads vt [batch, heads_kv, head_dim_v, seqlen_k rounded up to 16], a transposed copy of
// V it writes into its workspace first, with the keys of each aligned group of 16 permuted so
// that the S accumulator's registers are the P operand (fp8_vt_sm90.h, convert_p_to_e4m3); at
// head dim 128 (kVtInKernel) it loads V row-major and transposes it in shared memory into the
// same layout (FwdMainloop::transpose_v).
#pragma once

// WGMMA N sizes that are not multiples of 32 (block_n 80 and 112) exist only with this switch;
// without it the op selector silently falls back to N = 16 instructions. It must be seen before
// the first include of cute/arch/mma_sm90.hpp: the build passes it on the command line too.
#ifndef CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#endif

#include <cute/tensor.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "mask.h"
#include "tile_scheduler.h"
#include "tile_size.h"
#include "varlen_sm90.h"

namespace fa3::sm90 {

using namespace cute;

// The kernel's three instantiations per head dim and dtype. Compile-time, not runtime branches,
// because each costs the dense path when it is only a branch away:
//  - kSplit: split-KV (tiles write float32 partials for the combine kernel); the partial-store
//    path next to the regular one pushed the head-dim-256 consumers (128-register O
//    accumulator) into spills inside the mainloop.
//  - kVarlen: tiles look their sequence up in cu_seqlens (Params::locate) and carry its band in
//    registers; the dense kernel reads its band from the parameters instead (the kernel's
//    `mask`). The register copy cost the dense kernel 1.5-4% from 512 to 8k tokens (H200, hdim
//    64, 2026-11-22, TFLOP/s: causal 1k 294 -> 284, 2k 366 -> 355, 8k 444 -> 437); with this
//    split it is back (294, 365, 444).
//  - kSegments: segment ids (segments_sm90.h): tiles locate their segment hull and uniform ids
//    and mask with SegmentBandMask; 16-bit only, never split or GQA-packed, so the dense and
//    split kernels neither carry the ids nor test for them.
// A varlen or segments call never splits (flash_fwd_launch_sm90.h: plan_fwd). A KV-cache call
// (flash.h, seqused_k) always runs kSplit, with one split where the plan says so: its tiles locate
// their batch row's key length (Params::locate), which only the split kernel carries; with one
// split they write out / lse directly and no combine kernel runs (flash_fwd_epilogue_sm90.h).
enum class FwdMode { kDense, kSplit, kVarlen, kSegments };

template <int kHeadDim_, int kHeadDimV_, int kBlockM_, int kBlockN_, int kStages_,
          int kProducerRegs_, int kConsumerRegs_, class Element_, FwdMode kMode_ = FwdMode::kDense>
struct FwdTraits {
  using Element = Element_;
  using ElementAccum = float;
  static constexpr bool kFp8 = sizeof(Element) == 1;
  // FP8 writes bfloat16 (flash.h); the 16-bit kernels write their input dtype.
  using ElementOut = cute::conditional_t<kFp8, cutlass::bfloat16_t, Element>;
  static constexpr int kHeadDim = kHeadDim_, kHeadDimV = kHeadDimV_;
  static constexpr int kBlockM = kBlockM_, kBlockN = kBlockN_, kStages = kStages_;
  static constexpr bool kSplit = kMode_ == FwdMode::kSplit;
  static constexpr bool kVarlen = kMode_ == FwdMode::kVarlen;
  static constexpr bool kSegments = kMode_ == FwdMode::kSegments;
  // Tiles find their mask (and offsets) on the device rather than reading the parameters'.
  // kSplit: the key length of a KV-cache call (seqused_k); decode-shaped calls are memory-bound,
  // so the register copy of the band that kDense avoids costs nothing measurable there.
  static constexpr bool kLocated = kVarlen || kSegments || kSplit;
  // kSplit: the whole of warp 0 runs the producer (FwdMainloop::load), so that a key block of a
  // paged cache with pages smaller than a block arrives as boxes issued by one lane each rather
  // than one after the other by one thread: pages of 16, 8 x 16k, seqlen_q 4, 1.96 -> 3.25
  // TB/s on H200 (tile_size.h, kFwdPageRows); contiguous rows unchanged within 1%.
  static constexpr bool kProducerWarp = kSplit;
  // FP8: V arrives row-major and producer warps 2-3 transpose it in shared memory
  // (FwdMainloop::transpose_v) rather than the attention kernel reading vt, which the
  // fp8_vt_sm90.h kernel writes first (tile_size.h, fwd_fp8_transpose_v_in_kernel).
  static constexpr bool kVtInKernel = kFp8 && fwd_fp8_transpose_v_in_kernel(kHeadDim_);
  // Masked blocks inside the key-block loop compare both band edges (BandMask::apply_edges<true>);
  // only the first block chooses (tile_size.h, fwd_loop_mask_both_edges). FP8 and split-KV
  // always compare both (Mask, below).
  static constexpr bool kLoopMaskBothEdges =
      kMode_ == FwdMode::kDense && !kFp8 && fwd_loop_mask_both_edges(kHeadDim_, kHeadDimV_);

  static_assert(sizeof(Element) == 2 || cute::is_same_v<Element, cutlass::float_e4m3_t>,
                "fp16, bf16 or e4m3 inputs");
  static_assert(!kFp8 || kMode_ == FwdMode::kDense,
                "FP8 is dense only: no split-KV partials, varlen offsets or segment ids (issue 11 scope)");
  static_assert(!kFp8 || kBlockN % 32 == 0,
                "FP8: block_n is the K of the e4m3 P @ V WGMMA, 32 per instruction");
  static_assert(kBlockM == 128 || (kBlockM == 192 && !kFp8) || (kBlockM == 64 && kSplit),
                "two or three consumer warpgroups of 64 query rows each (FP8: two); one: the "
                "split kernel's decode tile");
  static_assert(kBlockN % 16 == 0, "block_n is the K dimension of the P @ V WGMMA");
  static_assert(kHeadDim % 32 == 0 && kHeadDimV % 32 == 0, "head dims in 32-element steps");

  // Consumer schedule (tile_size.h, fwd_schedule).
  static constexpr FwdSchedule kSchedule = fwd_schedule(kHeadDim, kHeadDimV, kFp8, kBlockM);
  static constexpr bool kPingpong = kSchedule.pingpong && kBlockM > 64;
  static constexpr bool kRescaleOFirst = kSchedule.rescale_o_first;
  static constexpr int kNumMmaWarpGroups = kBlockM / 64;
  static constexpr int kNumMmaThreads = kNumMmaWarpGroups * 128;
  static constexpr int kNumThreads = kNumMmaThreads + 128;  // + one producer warpgroup
  static constexpr int kProducerRegs = kProducerRegs_, kConsumerRegs = kConsumerRegs_;
  // setmaxnreg.inc only takes what setmaxnreg.dec gave back: the split must use exactly the
  // registers allocated at launch (65536 / threads rounded down to 8 per thread: 168 at 384
  // threads, 128 at 512).
  // CTAs per SM (tile_size.h, fwd_ctas_per_sm: two for the 64-row decode tile), which share the
  // SM's 65536 registers.
  static constexpr int kCtasPerSm = fwd_ctas_per_sm(kBlockM);
  static constexpr int kLaunchRegs = 65536 / (kNumThreads * kCtasPerSm) / 8 * 8;
  static_assert(128 * kProducerRegs + kNumMmaThreads * kConsumerRegs == kLaunchRegs * kNumThreads,
                "producer / consumer register split must add up to the launch allocation");

  using TileShapeQK = Shape<Int<kBlockM>, Int<kBlockN>, Int<kHeadDim>>;   // (M, N, D)
  using TileShapePV = Shape<Int<kBlockM>, Int<kHeadDimV>, Int<kBlockN>>;  // (M, Dv, N)
  using AtomLayoutMma = Layout<Shape<Int<kNumMmaWarpGroups>, _1, _1>>;

  // S = Q K^T: both operands K-major in smem.
  using TiledMmaQK = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, ElementAccum, TileShapeQK>(), AtomLayoutMma{}));
  // O += P V: P from registers. 16-bit: V^T read MN-major straight from the row-major V tile;
  // FP8: the loaded vt tile is K-major.
  using TiledMmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, ElementAccum, TileShapePV, GMMA::Major::K,
                           kFp8 ? GMMA::Major::K : GMMA::Major::MN>(),
      AtomLayoutMma{}));

  static_assert(size<1>(typename TiledMmaQK::AtomShape_MNK{}) == kBlockN,
                "S = Q K^T must be one WGMMA wide (CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED missing?)");
  static_assert(size<1>(typename TiledMmaPV::AtomShape_MNK{}) == kHeadDimV,
                "O += P V must be one WGMMA wide");

  using SmemLayoutQ = decltype(tile_to_shape(
      cutlass::gemm::collective::detail::ss_smem_selector<GMMA::Major::K, Element, Int<kBlockM>,
                                                          Int<kHeadDim>>(),
      Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutK = decltype(tile_to_shape(
      cutlass::gemm::collective::detail::ss_smem_selector<GMMA::Major::K, Element, Int<kBlockN>,
                                                          Int<kHeadDim>>(),
      Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  using SmemLayoutV = decltype(tile_to_shape(
      cutlass::gemm::collective::detail::ss_smem_selector<GMMA::Major::K, Element, Int<kBlockN>,
                                                          Int<kHeadDimV>>(),
      Shape<Int<kBlockN>, Int<kHeadDimV>, Int<kStages>>{}));
  // (Dv, N, PIPE), the B operand of P @ V. 16-bit: a view of the row-major V tile (the
  // transpose costs nothing but a descriptor bit); FP8: the vt tile as loaded, keys contiguous.
  using SmemLayoutVt = cute::conditional_t<
      kFp8,
      decltype(tile_to_shape(
          cutlass::gemm::collective::detail::ss_smem_selector<GMMA::Major::K, Element,
                                                              Int<kHeadDimV>, Int<kBlockN>>(),
          Shape<Int<kHeadDimV>, Int<kBlockN>, Int<kStages>>{})),
      decltype(composition(SmemLayoutV{},
                           make_ordered_layout(Shape<Int<kHeadDimV>, Int<kBlockN>, Int<kStages>>{},
                                               Step<_2, _1, _3>{})))>;
  // What the V TMA writes: (N, Dv, PIPE) from v rows (16-bit, and FP8 with kVtInKernel: the
  // staging ring transpose_v reads) or (Dv, N, PIPE) from vt rows (FP8), and the matching tile of
  // the global tensor.
  static constexpr bool kLoadVt = kFp8 && !kVtInKernel;
  using SmemLayoutVLoad = cute::conditional_t<kLoadVt, SmemLayoutVt, SmemLayoutV>;
  using TileShapeVLoad = cute::conditional_t<kLoadVt, Shape<Int<kHeadDimV>, Int<kBlockN>>,
                                             Shape<Int<kBlockN>, Int<kHeadDimV>>>;

  using PipelineK = cutlass::PipelineTmaAsync<kStages>;
  using PipelineV = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename PipelineK::PipelineState;

  // Split-KV tiles may hold GQA-packed rows of several query positions (mask.h, kGrouped).
  using Mask = cute::conditional_t<kSegments, SegmentBandMask<kBlockM, kBlockN>,
                                   BandMask<kBlockM, kBlockN, kSplit, kSplit || kFp8>>;

  // O leaves through shared memory and one TMA store per consumer warpgroup (its 64 rows), which
  // runs while the warpgroup starts its next tile, where tile_size.h says so
  // (fwd_store_o_with_tma), shared memory has room for the block_m x dv 16-bit tile and the layout
  // is the dense one: varlen tiles stop at their sequence's end, which a TMA box cannot (the
  // tensor's bounds are the batch row's), and split-KV tiles write float32 partials. Otherwise
  // registers to global.
  using SmemLayoutO = decltype(tile_to_shape(
      cutlass::gemm::collective::detail::ss_smem_selector<GMMA::Major::K, ElementOut, _64,
                                                          Int<kHeadDimV>>(),
      Shape<_64, Int<kHeadDimV>, Int<kNumMmaWarpGroups>>{}));
  // The (block_m, dv) view of it that the PV accumulator partitions: row r of warpgroup w's part
  // is tile row 64 w + r.
  using SmemLayoutOTile = decltype(composition(
      SmemLayoutO{}, make_layout(Shape<Shape<_64, Int<kNumMmaWarpGroups>>, Int<kHeadDimV>>{},
                                 Stride<Stride<_1, Int<64 * kHeadDimV>>, _64>{})));

  static constexpr uint32_t kBytesQ = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kBytesK = kBlockN * kHeadDim * sizeof(Element);
  static constexpr uint32_t kBytesV = kBlockN * kHeadDimV * sizeof(Element);

  template <int kOElements, int kQBuffers = 1>
  struct SharedStorageT {
    // 1024-byte alignment: the 128-byte swizzle pattern repeats every 1024 bytes and the WGMMA
    // descriptors assume a pattern-aligned base. kQBuffers Q tiles, back to back (kQStages).
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ> * kQBuffers, 1024> q;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>, 1024> k;
    // The V ring; with kVtInKernel the staging ring of the row-major tiles (on v_load_full /
    // v_load_empty), then the transposed ring the P @ V WGMMA reads (pipe_v's slots, smem_vt).
    // One array rather than a second, empty one elsewhere: an empty 1024-aligned member still
    // takes 1 KB and moved every 16-bit kernel's barriers.
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutVLoad> +
                                                   (kVtInKernel ? cute::cosize_v<SmemLayoutVt> : 0),
                                      1024> v;
    alignas(1024) cute::array_aligned<ElementOut, kOElements, 1024> o;  // kTmaStoreO only
    cutlass::arch::ClusterTransactionBarrier q_full[kQBuffers];  // TMA of Q landed
    cutlass::arch::ClusterBarrier q_empty[kQBuffers];            // consumers done reading Q
    // kOAliasesV: the TMA stores of the tile's O have read it out of the V ring (one arrive per
    // consumer warpgroup); the producer waits for it before the next tile's first V load.
    cutlass::arch::ClusterBarrier o_free;
    // Tile ids handed from the scheduler thread to the TMA thread and the consumers (a 2-deep
    // ring), and each tile's coordinates, decoded by the scheduler thread (4 deep: entry seq is
    // written only once every reader has taken entry seq - 2, so after the consumers' epilogue
    // of tile seq - 3 has read entry seq - 3 again; entry seq - 4 is long dead).
    int tile_ids[2];
    TileCoord tile_coords[4];
    cutlass::arch::ClusterBarrier tile_full[2], tile_empty[2];
    cutlass::arch::ClusterBarrier tile_want;  // the TMA thread asks for its next tile
    typename PipelineK::SharedStorage pipe_k;
    typename PipelineV::SharedStorage pipe_v;
    // kVtInKernel: the staging ring's barriers (TMA landed / transposed out of), and per slot a
    // barrier whose first phase the TMA thread completes, before a plain arrive on v_load_full,
    // in the slot after the last V tile once no more tiles come (FwdMainloop::finish_v).
    cutlass::arch::ClusterTransactionBarrier v_load_full[kVtInKernel ? kStages : 1];
    cutlass::arch::ClusterBarrier v_load_empty[kVtInKernel ? kStages : 1];
    cutlass::arch::ClusterBarrier v_done[kVtInKernel ? kStages : 1];
  };
  // Where Q, K, V and a separate O tile exceed shared memory (16-bit head dim 256: 224 KB without
  // O), O is written into the V ring instead, which holds no live data between the tile's last
  // P V WGMMA (both warpgroups') and the next tile's first V load (FA3 does the same).
  static constexpr bool kWantTmaStoreO =
      fwd_store_o_with_tma(kHeadDim, kHeadDimV, kBlockM) && !kSplit && !kVarlen;
  static constexpr bool kOSeparateFits =
      sizeof(SharedStorageT<cute::cosize_v<SmemLayoutO>>) <= 227 * 1024;
  static constexpr bool kOAliasesV =
      kWantTmaStoreO && !kOSeparateFits &&
      cute::cosize_v<SmemLayoutO> * sizeof(ElementOut) <=
          cute::cosize_v<SmemLayoutVLoad> * sizeof(Element);
  static constexpr bool kTmaStoreO = kWantTmaStoreO && (kOSeparateFits || kOAliasesV);
  // Each tile's epilogue runs under the next tile's first S WGMMA (tile_size.h,
  // fwd_defer_epilogue): dense tiles whose O does not live in the V ring.
  static constexpr bool kDeferEpilogue = kMode_ == FwdMode::kDense && !kOAliasesV &&
                                         fwd_defer_epilogue(kHeadDim_, kHeadDimV_, kFp8, kBlockM);
  static constexpr int kOElements = kTmaStoreO && !kOAliasesV ? cute::cosize_v<SmemLayoutO> : 0;
  // Q tiles in shared memory (tile_size.h, fwd_double_buffer_q): with two, tile j's Q loads into
  // buffer j % 2 while tile j - 1 still reads the other, so the producer issues it as soon as it
  // has issued tile j - 1's last load, not only once tile j - 1's last S WGMMA has retired. Where
  // it fits next to the O tile (which keeps its shared memory first); never with split-KV (its
  // tiles are decode's, one per CTA) or FP8.
  static constexpr int kQStages =
      fwd_double_buffer_q(kHeadDim, kHeadDimV, kFp8) && !kSplit &&
              sizeof(SharedStorageT<kOElements, 2>) <= 227 * 1024
          ? 2
          : 1;
  using SharedStorage = SharedStorageT<kOElements, kQStages>;
  // Q buffer of the tile this CTA runs as its q_tile_count-th non-empty tile, and the phase of
  // that buffer's barriers (q_full, q_empty) for it.
  static CUTLASS_DEVICE int q_buffer(int q_tile_count) {
    return kQStages == 1 ? 0 : q_tile_count & 1;
  }
  static CUTLASS_DEVICE uint32_t q_phase(int q_tile_count) {
    return uint32_t(kQStages == 1 ? q_tile_count : q_tile_count >> 1) & 1;
  }
  static CUTLASS_DEVICE Element* smem_q(SharedStorage& ss, int q_buf) {
    return ss.q.data() + q_buf * cute::cosize_v<SmemLayoutQ>;
  }
  // The (Dv, N, PIPE) V ring the P @ V WGMMA reads (kVtInKernel: after the staging ring).
  static CUTLASS_DEVICE Element* smem_vt(SharedStorage& ss) {
    return ss.v.data() + (kVtInKernel ? cute::cosize_v<SmemLayoutVLoad> : 0);
  }
  // The O tile's shared memory (kTmaStoreO): its own buffer, or the start of the V ring.
  static CUTLASS_DEVICE ElementOut* smem_o(SharedStorage& ss) {
    if constexpr (kOAliasesV)
      return reinterpret_cast<ElementOut*>(ss.v.data());
    else
      return ss.o.data();
  }
  static_assert(sizeof(SharedStorage) <= 227 * 1024, "tile does not fit in shared memory");

  // Global tensors are (seqlen, head_dim, heads, batch); head_dim is contiguous.
  using ShapeQKV = cute::Shape<int32_t, int32_t, int32_t, int32_t>;
  using StrideQKV = cute::Stride<int64_t, _1, int64_t, int64_t>;
  using GmemTensorQKV = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)),
                                             ShapeQKV{}, StrideQKV{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensorQKV{}, SmemLayoutQ{},
                                      select<0, 2>(TileShapeQK{}), _1{}));
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensorQKV{},
                                      take<0, 2>(SmemLayoutK{}), select<1, 2>(TileShapeQK{}),
                                      _1{}));
  // Paged caches whose pages are smaller than a key block (kSplit; FwdMainloop::load): K and V
  // tiles arrive as boxes of kPageRows rows, each from its own page, or of kPageRowsLarge rows
  // where the page size allows (tile_size.h, kFwdPageRows, kFwdPageRowsLarge). The row-major
  // (N, Dv) V layout also for FP8, which never pages, so that the types exist for every
  // instantiation.
  static constexpr int kPageRows = kFwdPageRows;
  // Split-KV with 16-row boxes (Params::v_warp): warp 3 issues the upper half of K's boxes
  // (Params::k_warp; tile_size.h, fwd_paged_k_warp). Compiled out where not taken.
  static constexpr bool kPagedKWarp = kSplit && fwd_paged_k_warp(kProducerRegs);
  static constexpr int kPageRowsLarge =
      kBlockN % kFwdPageRowsLarge == 0 ? kFwdPageRowsLarge : kPageRows;
  static_assert(kBlockN % kPageRows == 0, "a key block is whole page boxes");
  // The first kRows rows of one stage (a by-mode tiler: rows [0, kRows), every column).
  template <int kRows, class SmemLayout, int kDim>
  using SmemLayoutPageT = decltype(composition(
      take<0, 2>(SmemLayout{}), make_tile(Layout<Int<kRows>>{}, Layout<Int<kDim>>{})));
  template <int kRows, class SmemLayout, int kDim>
  using TmaPageT = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensorQKV{},
                                          SmemLayoutPageT<kRows, SmemLayout, kDim>{},
                                          Shape<Int<kRows>, Int<kDim>>{}, _1{}));
  using SmemLayoutKPage = SmemLayoutPageT<kPageRows, SmemLayoutK, kHeadDim>;
  using SmemLayoutVPage = SmemLayoutPageT<kPageRows, SmemLayoutV, kHeadDimV>;
  using SmemLayoutKPageLarge = SmemLayoutPageT<kPageRowsLarge, SmemLayoutK, kHeadDim>;
  using SmemLayoutVPageLarge = SmemLayoutPageT<kPageRowsLarge, SmemLayoutV, kHeadDimV>;
  using TmaKPage = TmaPageT<kPageRows, SmemLayoutK, kHeadDim>;
  using TmaVPage = TmaPageT<kPageRows, SmemLayoutV, kHeadDimV>;
  using TmaKPageLarge = TmaPageT<kPageRowsLarge, SmemLayoutK, kHeadDim>;
  using TmaVPageLarge = TmaPageT<kPageRowsLarge, SmemLayoutV, kHeadDimV>;
  // Global V is (seqlen_k, dv, heads, batch), or for FP8 vt (dv, seqlen_k rounded up to 16,
  // heads, batch): the same types, with the contiguous mode second.
  using TmaV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensorQKV{},
                                      take<0, 2>(SmemLayoutVLoad{}), TileShapeVLoad{}, _1{}));

  // out as (rows, dv, heads, batch) with the tiles' row and head strides (packed tiles too).
  using GmemTensorO = decltype(make_tensor(make_gmem_ptr(static_cast<ElementOut*>(nullptr)),
                                           ShapeQKV{}, StrideQKV{}));
  using TmaO = decltype(make_tma_copy(SM90_TMA_STORE{}, GmemTensorO{}, take<0, 2>(SmemLayoutO{}),
                                      Shape<_64, Int<kHeadDimV>>{}, _1{}));

  struct Params {
    TmaQ tma_q;
    TmaK tma_k;
    TmaV tma_v;
    TmaKPage tma_k_page;  // kSplit with pages smaller than a key block only
    TmaVPage tma_v_page;
    TmaKPageLarge tma_k_page_large;  // ... whose page size is a multiple of kPageRowsLarge
    TmaVPageLarge tma_v_page_large;
    TmaO tma_o;  // kTmaStoreO only
    ShapeQKV shape_o;
    ShapeQKV shape_q, shape_k, shape_v;
    Mask mask;  // dense band; varlen: per sequence (locate)
    TileSchedulerParams sched;
    int* tile_counter;  // zeroed before launch; nullptr: static round-robin schedule
    int qheads_per_kvhead;
    float scale_log2;   // factor on the (capped) score before exp2
    float softcap_pre;  // softmax_scale / softcap, used only when has_softcap
    bool has_softcap;
    // Rows (m_block * kBlockM + r) and heads are those of the tiles; with GQA packing a tile row
    // is one query head of a KV group, so both strides are explicit.
    ElementOut* out;
    int64_t out_row_stride, out_head_stride, out_batch_stride;  // in elements
    float* lse;
    int64_t lse_row_stride, lse_head_stride, lse_batch_stride;
    // With kSplit tiles write float32 partial results here instead (workspace):
    // lse_accum [num_splits, batch, heads, seqlen_q], o_accum [..., kHeadDimV], rows in tile
    // coordinates; flash_fwd_combine_sm90.h merges them into out and lse.
    float* lse_accum;
    float* o_accum;
    // kVarlen; with kSplit and seqused_k, only its diag_lo / diag_hi (the band relative to each
    // batch row's bottom-right diagonal, pre-clamped as for varlen).
    VarlenParams varlen;
    // kSplit only: int32 [batch] keys used per batch row (flash.h), or null (all seqlen_k).
    int32_t const* seqused_k;
    // kSplit only, paged K/V (flash.h, "Paged"), or null: int32 [batch, page_table_stride];
    // shape_k / shape_v are then (page_size, d, heads_kv, num_pages). page_blocks > 0: a page
    // holds page_blocks key blocks (one TMA load per block); 0: pages are smaller than a block
    // and a block is kBlockN / kPageRows boxes of kPageRows rows (tma_k_page, tma_v_page), or
    // where page_size is a multiple of kPageRowsLarge, boxes of that many (tma_*_page_large);
    // those descriptors see the pool as (box rows, d, heads_kv, num_pages * boxes per page).
    int32_t const* page_table;
    int page_table_stride, page_blocks, page_size;
    // kSplit only: warp 2 loads V while warp 0 loads Q and K (FwdMainloop::load), so that
    // each ring's boxes are issued by a warp of its own (tile_size.h, fwd_paged_v_warp).
    bool v_warp;
    // kPagedKWarp with v_warp: warp 3 issues the upper half of K's boxes, warp 0 the lower.
    bool k_warp;
    // FP8 descales (kFp8 only; flash.h, "FP8"). Per tensor (descale_nk == 0): q, k, v
    // [batch, heads_kv]. Per tile (descale_nk > 0; the scale blocks are this kernel's tiles):
    // q [batch, heads_q, descale_nq], k and v [batch, heads_kv, descale_nk].
    float const* descale_q;
    float const* descale_k;
    float const* descale_v;
    int descale_nq, descale_nk;
    // kSegments only. Last, so that the other modes' parameters keep their offsets.
    SegmentParams seg;

    // Resolves a scheduler tile to its sequence: t.batch becomes the batch row, `mask` the
    // sequence's band, (offset_q, offset_k) where its rows start in the batch row. Dense: the
    // whole batch row. Split: the whole batch row, with seqused_k its first seqused_k[b] keys.
    // Segments: the whole batch row, and the band plus the query block's
    // segment hull and ids. Varlen: t.m_block is a numbered query block of batch row t.batch
    // (varlen_block) and becomes the block's index in its sequence; false when it is past the
    // row's last block (the grid's bound is not exact): then nothing is loaded, computed or
    // written.
    CUTLASS_DEVICE bool locate(TileCoord& t, Mask& m, int& offset_q,
                               int& offset_k) const {
      m = mask;
      offset_q = offset_k = 0;
      if constexpr (kVarlen) {
        int s_in_row, m_block;
        if (!varlen_block(varlen, t.batch, t.m_block, s_in_row, m_block)) return false;
        SeqSpan const s = varlen_span(varlen, t.batch * varlen.num_seqs + s_in_row);
        t.m_block = m_block;
        t.batch = s.batch;
        offset_q = s.offset_q;
        offset_k = s.offset_k;
        m = {s.len_q, s.len_k, varlen_diag(varlen.diag_lo, s.len_q, s.len_k),
             varlen_diag(varlen.diag_hi, s.len_q, s.len_k)};
        return true;
      } else if constexpr (kSplit) {
        if (seqused_k) {  // the first len keys of the batch row, band bottom-right aligned to them
          int const len = min(max(__ldg(seqused_k + t.batch), 0), mask.seqlen_k);
          int const positions = mask.seqlen_q / mask.rows_per_pos;  // GQA-packed: rows / group
          m = {mask.seqlen_q, len, varlen_diag(varlen.diag_lo, positions, len),
               varlen_diag(varlen.diag_hi, positions, len), mask.rows_per_pos};
        }
      } else if constexpr (kSegments) {
        SegmentRanges const r =
            __ldg(seg.ranges + int64_t(t.batch) * seg.num_q_blocks + t.m_block);
        m.n_first = r.x;
        m.n_last = r.y;
        m.u_first = r.z;
        m.u_last = r.w;
        m.q_ids = seg.q_ids + int64_t(t.batch) * mask.seqlen_q;
        m.k_ids = seg.k_ids + int64_t(t.batch) * mask.seqlen_k;
        m.k_runs = seg.k_runs + int64_t(t.batch) * seg.num_k_blocks;
      }
      return true;
    }
  };
};

}  // namespace fa3::sm90

// fa3_jax Hopper backward: the main kernel's parameters and compile-time configuration (tile
// sizes from flash_bwd_tile_size_sm90.h, shared-memory layouts, pipelines, WGMMA atoms, register
// budgets, the dQ path). The kernel is flash_bwd_kernel_sm90.h; its dQ writer and dK/dV stores are
// flash_bwd_epilogue_sm90.h.
#pragma once

#include <cuda_fp16.h>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>
#include <cutlass/gemm/collective/builders/sm90_common.inl>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/pipeline.hpp>

#include "flash_bwd_preprocess_sm90.h"
#include "flash_bwd_tile_size_sm90.h"
#include "named_barrier.h"
#include "segments_sm90.h"

namespace fa3::sm90_bwd {

using namespace cute;

struct BwdMainParams {
  const void* q;
  const void* k;
  const void* v;
  const void* dout;
  void* dk;
  void* dv;
  float* dq_accum;        // [b, heads_q, seqlen_q_pad, head_dim], zeroed by the preprocess kernel
  const float* lse_log2;  // [b, heads_q, seqlen_q_pad]
  const float* dpsum;     // [b, heads_q, seqlen_q_pad]
  int* semaphores;        // [b, heads_q, sem_per_head], zeroed by the preprocess kernel
  int batch, seqlen_q, seqlen_k, seqlen_q_pad, heads_q, heads_kv, group, sem_per_head;
  int diag_lo, diag_hi;   // clamped to [-(seqlen_q + 1), seqlen_k + 1] by the host
  float scale;            // softmax_scale (applied to dK here, to dQ in the postprocess)
  float scale_log2;       // softmax_scale * log2(e)
  float softcap_log2;     // softcap * log2(e)
  float scale_div_softcap;
  bool deterministic;
  // Causal bands on the dense layout: CTAs take their (key block, kv head, batch) in key-block-major
  // order (flash_bwd_kernel_sm90's start; set by the launcher, see there).
  bool key_block_major;
  // Varlen (cu_q non-null): grid x numbers the key blocks of all sequences of batch row z
  // (sm90::varlen_block; varlen.block_seq holds the key blocks); each CTA works inside its sequence,
  // with the band relative to the sequence's bottom-right diagonal and its query blocks at their
  // padded plane rows (varlen_q_block_row).
  sm90::VarlenParams varlen;
  // Segment ids (Tr::kSegments only; dense layout): per key block the hull and uniform range of
  // query blocks (segments_sm90.h, by_keys).
  sm90::SegmentParams seg;
  // GQA group split (flash_bwd_launch_sm90.h, bwd_group_split): grid y numbers (kv head, part)
  // slots, part p covering query heads p * group / group_split .. of the group; with
  // group_split > 1 dK/dV go to dkv_partial as float32 (dK already scaled).
  // Last, after seg, so that the other fields keep their constant-bank offsets: with these two
  // before varlen and the first query head held from the kernel's start, the hdim 64 kernels'
  // SASS changed (loads and moves reordered, same instruction mix) and they ran 2-3% slower
  // (h200_2026-11-22s11_bwd64_bisect.txt). Now they compile to the same SASS as before the split.
  int group_split;
  float* dkv_partial;
};

// kSegments: the segment-id variant (a template flag, like the forward's FwdMode, so that the
// dense kernel neither carries the ids nor tests for them).
template <int kHeadDim_, int kHeadDimV_, class Element_, bool kHasSoftcap_, bool kSegments_ = false>
struct BwdTraitsSm90 {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kHeadDimV = kHeadDimV_;
  static constexpr bool kHasSoftcap = kHasSoftcap_;
  static constexpr bool kSegments = kSegments_;
  // The GQA group split (bwd_group_split) is compiled in at hdim 128 only, where it was measured:
  // in the hdim 64 kernel its CTA bookkeeping cost 2-4% (standalone driver, H200, 512-16k, MHA;
  // h200_2026-11-22s10b_bwd64_bisect.txt), and segment-id calls never split.
  static constexpr bool kGroupSplit = kHeadDim_ == 128 && kHeadDimV_ == 128 && !kSegments_;
  static constexpr BwdTileSize kTile = bwd_tile_size_sm90(kHeadDim, kHeadDimV, kHasSoftcap);
  static constexpr int kBlockM = kTile.block_m;
  static constexpr int kBlockN = kTile.block_n;
  static constexpr int kNumMmaWG = 2;
  static constexpr int kNumMmaThreads = kNumMmaWG * cutlass::NumThreadsPerWarpGroup;
  static constexpr int kNumThreads = kNumMmaThreads + cutlass::NumThreadsPerWarpGroup;  // + producer
  // setmaxnreg budgets: 24 * 128 + 240 * 256 <= 65536 registers of the SM.
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  // Q/dO pipeline depth. 2 measured faster than 3 at hdim 128 (H200, bf16, 16k tokens, full:
  // 366 vs 326 TFLOP/s): one step is long enough to hide a load, and 3 stages cost 32 KB.
  // FA3_BWD_QDO_STAGES overrides it for experiments (shared memory permitting).
#ifdef FA3_BWD_QDO_STAGES
  static constexpr int kStages = FA3_BWD_QDO_STAGES;
#else
  static constexpr int kStages = 2;
#endif
  // Warpgroups split keys (M of S^T, dK, dV) when the key block is 64 per warpgroup; otherwise
  // they split queries for S^T/dP^T and the head dim for dK/dV.
  static constexpr bool kSplitKeys = kBlockN == 64 * kNumMmaWG;
  static constexpr int kDkvSplit = kSplitKeys ? 1 : kNumMmaWG;
  static_assert(kSplitKeys || kBlockN == 64, "key block must be 64 per warpgroup or 64 in all");
  // dQ = dS K is split over the warpgroups along its rows when the query block is one 64-row M
  // tile per warpgroup (hdim 64: each warpgroup computes a whole 64-row dQ block), otherwise
  // (block_m 64) along the head dim.
  static constexpr bool kDqSplitM = kBlockM == 64 * kNumMmaWG;
  static constexpr int kDqRowSplit = kDqSplitM ? kNumMmaWG : 1;  // warpgroups along dQ's rows
  static constexpr int kDqColSplit = kDqSplitM ? 1 : kNumMmaWG;  // ... and along its columns
  static_assert(kBlockM == 64 * kDqRowSplit, "query block: one 64-row M tile, or one per warpgroup");
  static_assert(!kDqSplitM || kSplitKeys, "128 query rows need the key split (S^T N = queries)");
  static_assert(kBwdSeqlenQPad % kBlockM == 0, "workspace planes hold whole query blocks");
  static_assert(kHeadDim % (16 * kNumMmaWG) == 0 && kHeadDimV % (16 * kNumMmaWG) == 0,
                "head dims must split into 16-wide GMMA tiles per warpgroup");

  using AtomLayoutSplitM = Layout<Shape<Int<kNumMmaWG>, _1, _1>>;
  using AtomLayoutSplitN = Layout<Shape<_1, Int<kNumMmaWG>, _1>>;
  using AtomLayoutSdP = std::conditional_t<kSplitKeys, AtomLayoutSplitM, AtomLayoutSplitN>;
  static constexpr int kSdPN = kSplitKeys ? kBlockM : kBlockM / kNumMmaWG;
  // S^T = K Q^T: M = keys, N = queries, K = head dim; both operands K-major.
  using TiledMmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kSdPN>, Int<kHeadDim>>>(),
      AtomLayoutSdP{}));
  using TiledMmadP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kSdPN>, Int<kHeadDimV>>>(),
      AtomLayoutSdP{}));
  // dK += dS^T Q, dV += P^T dO: M = keys, N = head dim, K = queries; B MN-major. When warpgroups
  // split keys, a warpgroup's S^T/dP^T accumulator rows are exactly its dK/dV rows, so P^T and
  // dS^T feed the MMA straight from registers (RS: no shared-memory round trip for P, half the
  // shared-memory operand traffic); otherwise both come from shared memory (SS).
  static constexpr bool kDkvRS = kSplitKeys;
  template <int kN>
  using TiledMmaKV = decltype(make_tiled_mma(
      std::conditional_t<kDkvRS,
          decltype(GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kN / kDkvSplit>, Int<kBlockM>>,
                                        GMMA::Major::K, GMMA::Major::MN>()),
          decltype(GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kN / kDkvSplit>, Int<kBlockM>>,
                                        GMMA::Major::K, GMMA::Major::MN>())>{},
      AtomLayoutSdP{}));
  using TiledMmadK = TiledMmaKV<kHeadDim>;
  using TiledMmadV = TiledMmaKV<kHeadDimV>;
  // dS double-buffered when shared memory allows (RS path: no P buffer), so a warpgroup can write
  // step i+1's dS while the other still reads step i's in its dQ product.
  static constexpr int kStagesdS = kDkvRS ? 2 : 1;
  // dQ = dS K: M = queries, N = head dim, K = keys; both MN-major. Split over warpgroups by rows or
  // by columns (kDqSplitM).
  using TiledMmadQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim / kDqColSplit>, Int<kBlockN>>,
                           GMMA::Major::MN, GMMA::Major::MN>(),
      std::conditional_t<kDqSplitM, AtomLayoutSplitM, AtomLayoutSplitN>{}));
  // With the column split, dQ atoms along N are dealt to the warpgroups round-robin (hdim 96:
  // 64 x 16 atoms, not 64 x 48): the dQ fragment order and its un-permutation in the postprocess
  // depend on this width.
  static constexpr int kDqAtomN = decltype(size<1>(typename TiledMmadQ::AtomShape_MNK{}))::value;

  // Swizzle atoms: Q/dO are read K-major (S^T, dP^T) and MN-major with N = d / kDkvSplit per
  // warpgroup (dK, dV), so their atom width must divide that slice; likewise K for dQ's columns.
  using SmemAtomQ = decltype(cutlass::gemm::collective::detail::ss_smem_selector<
                             GMMA::Major::K, Element, Int<kBlockM>, Int<kHeadDim / kDkvSplit>>());
  using SmemAtomdO = decltype(cutlass::gemm::collective::detail::ss_smem_selector<
                              GMMA::Major::K, Element, Int<kBlockM>, Int<kHeadDimV / kDkvSplit>>());
  using SmemAtomK = decltype(cutlass::gemm::collective::detail::ss_smem_selector<
                             GMMA::Major::K, Element, Int<kBlockN>, Int<kHeadDim / kDqColSplit>>());
  using SmemAtomV = decltype(cutlass::gemm::collective::detail::ss_smem_selector<
                             GMMA::Major::K, Element, Int<kBlockN>, Int<kHeadDimV>>());
  // P and dS as (queries, keys), queries contiguous: the accumulator pairs of S^T are adjacent
  // queries (32-bit stores), dQ reads it MN-major and dK/dV read the transpose K-major.
  using SmemAtomPdS = decltype(cutlass::gemm::collective::detail::ss_smem_selector<
                               GMMA::Major::MN, Element, Int<kBlockM>, Int<kBlockN>>());

  using SmemLayoutQ = decltype(tile_to_shape(SmemAtomQ{}, Shape<Int<kBlockM>, Int<kHeadDim>, Int<kStages>>{}));
  using SmemLayoutdO = decltype(tile_to_shape(SmemAtomdO{}, Shape<Int<kBlockM>, Int<kHeadDimV>, Int<kStages>>{}));
  using SmemLayoutK = decltype(tile_to_shape(SmemAtomK{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  using SmemLayoutV = decltype(tile_to_shape(SmemAtomV{}, Shape<Int<kBlockN>, Int<kHeadDimV>>{}));
  using SmemLayoutPdS = decltype(tile_to_shape(SmemAtomPdS{}, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  using SmemLayoutdS = decltype(tile_to_shape(SmemAtomPdS{}, Shape<Int<kBlockM>, Int<kBlockN>, Int<kStagesdS>>{}));
  // Transposed views (same memory): (d, queries, stage), (d, keys), (keys, queries).
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockM>, Int<kStages>>{},
                                 Stride<Int<kBlockM>, _1, Int<kBlockM * kHeadDim>>{})));
  using SmemLayoutdOt = decltype(composition(
      SmemLayoutdO{}, make_layout(Shape<Int<kHeadDimV>, Int<kBlockM>, Int<kStages>>{},
                                  Stride<Int<kBlockM>, _1, Int<kBlockM * kHeadDimV>>{})));
  using SmemLayoutKt = decltype(composition(
      SmemLayoutK{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, Stride<Int<kBlockN>, _1>{})));
  using SmemLayoutPdSt = decltype(composition(
      SmemLayoutPdS{}, make_layout(Shape<Int<kBlockN>, Int<kBlockM>>{}, Stride<Int<kBlockM>, _1>{})));
  using SmemLayoutdSt = decltype(composition(
      SmemLayoutdS{}, make_layout(Shape<Int<kBlockN>, Int<kBlockM>, Int<kStagesdS>>{},
                                  Stride<Int<kBlockM>, _1, Int<kBlockM * kBlockN>>{})));

  // TMA: global tensors are (seqlen, d, head, batch); one box per (block, head, batch).
  using ShapeQKV = Shape<int, int, int, int>;
  using StrideQKV = Stride<int64_t, _1, int64_t, int64_t>;
  template <int kRows, int kCols, class SLayout>
  using TmaLoad = decltype(make_tma_copy(
      SM90_TMA_LOAD{}, make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), ShapeQKV{}, StrideQKV{}),
      SLayout{}, Shape<Int<kRows>, Int<kCols>>{}, _1{}));
  using TmaQ = TmaLoad<kBlockM, kHeadDim, decltype(take<0, 2>(SmemLayoutQ{}))>;
  using TmadO = TmaLoad<kBlockM, kHeadDimV, decltype(take<0, 2>(SmemLayoutdO{}))>;
  using TmaK = TmaLoad<kBlockN, kHeadDim, SmemLayoutK>;
  using TmaV = TmaLoad<kBlockN, kHeadDimV, SmemLayoutV>;
  // Q with its lse_log2 rows and dO with its dpsum rows arrive on separate pipelines (as in
  // FlashAttention-3), so S^T = K Q^T starts without waiting for dO.
  static constexpr uint32_t kTxBytesQ = kBlockM * kHeadDim * sizeof(Element) + kBlockM * sizeof(float);
  static constexpr uint32_t kTxBytesdO = kBlockM * kHeadDimV * sizeof(Element) + kBlockM * sizeof(float);
  static constexpr uint32_t kTxBytesKV = (kBlockN * kHeadDim + kBlockN * kHeadDimV) * sizeof(Element);
  using Pipeline = cutlass::PipelineTmaAsync<kStages>;

  // One warpgroup's dQ tile (64 x d/2 floats, or 64 x d with the row split: the next 64-row block),
  // stored in fragment order: float4 j of consumer thread t at j * 128 + t, so a warp's 128-bit
  // stores cover 512 contiguous bytes; warpgroup w's tile follows w - 1's in dq_accum.
  static constexpr int kDqWgFloats = kBlockM * kHeadDim / kNumMmaWG;
  static_assert(kDqWgFloats % (4 * cutlass::NumThreadsPerWarpGroup) == 0, "dQ fragment is whole float4s");

  template <int kDqSmemFloats>
  struct SharedStorageT {
    cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cosize_v<SmemLayoutV>, 1024> v;
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cosize_v<SmemLayoutdO>, 1024> dout;
    // P^T is only staged in shared memory for the SS dK/dV path.
    cute::array_aligned<Element, kDkvRS ? 0 : cosize_v<SmemLayoutPdS>, 1024> p;
    cute::array_aligned<Element, cosize_v<SmemLayoutdS>, 1024> ds;
    cute::array_aligned<float, kBlockM * kStages, 128> lse;
    cute::array_aligned<float, kBlockM * kStages, 128> dpsum;
    cute::array_aligned<float, kDqSmemFloats, 128> dq;  // (4, 128 threads, chunks, WG), see above
    typename Pipeline::SharedStorage pipeline_q;
    typename Pipeline::SharedStorage pipeline_do;
    cutlass::arch::ClusterTransactionBarrier barrier_kv;
  };
  // dQ goes through shared memory and the writer warp's bulk reduce-add. Each warpgroup's tile
  // passes through in kDqRounds parts per step (one slot per warpgroup, kDqSlotFloats each):
  // 1 where the whole tile fits, 32 KB (hdim 128) .. 48 KB (hdim 192); hdim 256 (208 KB without
  // it) has 16 KB left, so its 2 x 32 KB go through 4 rounds of 2 x 8 KB. Measured at hdim 256
  // against float4 atomics (H200, bf16, 16k tokens, scripts/dev_bwd.sh timing, 512..16k): full
  // 224 264 301 321 335 341 -> 256 304 336 355 365 370 TFLOP/s, causal 159 213 262 298 329 345 ->
  // 181 242 291 326 364 376 (h200_2026-11-22s7b_bwd256_dq_rounds.txt). Tried and slower there:
  // one dO stage so that 2 rounds of 16 KB fit (full 306 at 4k: dO loads no longer hidden); the
  // dQ GEMM in two column slices, each stored once done (337 against 345 at 4k); a ring of two
  // 4 KB half slots per warpgroup on mbarriers, the writer one piece behind (329 against 350).
  // +1024: the dynamic shared memory base is rounded up to the 1024-byte swizzle alignment.
  // FA3_BWD_DQ_ATOMIC (experiments only) forces the float4 atomic path.
  template <int kRounds>
  static constexpr bool kDqFits = int(sizeof(SharedStorageT<kBlockM * kHeadDim / kRounds>)) + 1024 <= 227 * 1024;
  // kDqInStages (hdim 256): half of each warpgroup's tile (chunks 0..7) goes instead through the
  // warpgroup's column half of the step's Q stage (16 KB), which it no longer reads once its dK
  // product is done; the writer adds it and then releases the Q stage together with the
  // consumers. The other half goes through the slot in kDqRounds = 2 rounds (not 4 for the whole
  // tile). ncu of the 4-round design (H200, causal 8k): about 40% of the consumers' stall samples
  // at the rounds' dQEmpty barrier and 10% in their proxy fences. The whole tile through the Q
  // and dO halves (no rounds) moved the stalls to the Q/dO loads, which wait for the writer's
  // release: full 4k 349 -> 341 TFLOP/s, causal 8k 355 -> 359. Half and half as here, against
  // 4 rounds (H200, bf16, 16k tokens, scripts/dev_bwd.sh timing, 512..16k): full 254 300 331 349
  // 362 364 -> 280 348 394 424 421 421 TFLOP/s, causal 179 239 286 321 356 367 -> 186 257 329
  // 383 422 420 (h200_2026-11-22s8b_bwd256.txt).
#ifdef FA3_BWD_DQ_ATOMIC
  static constexpr bool kDqInStages = false;
  static constexpr int kDqRounds = 0;
#else
  static constexpr bool kDqInStages = !kDqFits<2> && !kDkvRS && kDkvSplit == 2 && kHeadDim == kHeadDimV;
  static constexpr int kDqRounds = kDqInStages ? 2 : kDqFits<1> ? 1 : kDqFits<2> ? 2 : kDqFits<4> ? 4 : 0;
#endif
  static constexpr bool kDqBulk = kDqRounds > 0;
  // Chunks (float4 per thread) of the tile that go through the slot: all, or the second half.
  static constexpr int kDqSlotTileFloats = kDqInStages ? kDqWgFloats / 2 : kDqWgFloats;
  static constexpr int kDqSlotFloats = kDqBulk ? kDqSlotTileFloats / kDqRounds : 0;
  // One warpgroup's column half of a Q stage: elements (its offset in the stage, times wg).
  static constexpr int kQHalfElems = kBlockM * kHeadDim / 2;
  static_assert(!kDqInStages || kQHalfElems * int(sizeof(Element)) == kDqWgFloats / 2 * int(sizeof(float)),
                "a Q half holds half of one warpgroup's float32 dQ tile");
  static_assert(!kDqInStages || (SmemLayoutQ{}(0, kHeadDim / 2, 0) == kQHalfElems &&
                                 SmemLayoutQ{}(kBlockM - 1, kHeadDim / 2 - 1, 0) < kQHalfElems &&
                                 SmemLayoutQ{}(kBlockM - 1, kHeadDim - 1, 0) < 2 * kQHalfElems &&
                                 SmemLayoutQ{}(0, 0, 1) == 2 * kQHalfElems),
                "the column halves of a Q stage are contiguous (the warpgroups' dK operands)");
  static_assert(!kDqBulk || kDqSlotFloats % (4 * cutlass::NumThreadsPerWarpGroup) == 0,
                "a dQ slot holds whole float4s of every thread");
  using SharedStorage = SharedStorageT<kNumMmaWG * kDqSlotFloats>;
  static_assert(kDqBulk || !kDqSplitM, "the atomic dQ path orders one 64-row block per CTA step");
  static constexpr int kSmemBytes = int(sizeof(SharedStorage)) + 1024;
  // The epilogue stages dK in the Q buffers and dV in the dO buffers (flash_bwd_kernel_sm90 end)
  // where they hold a whole key block and rows are whole swizzle groups (not hdim 96).
  static constexpr bool kStagedEpilogue = kHeadDim % 64 == 0 && kHeadDimV % 64 == 0 &&
                                          cosize_v<SmemLayoutQ> >= kBlockN * kHeadDim &&
                                          cosize_v<SmemLayoutdO> >= kBlockN * kHeadDimV;
  static_assert(kSmemBytes <= 227 * 1024, "shared memory over the sm_90 per-block limit");
};

}  // namespace fa3::sm90_bwd

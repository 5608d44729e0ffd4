// fa3_jax Hopper backward, step 2 of 3: the main kernel (FlashAttention-3 structure).
//
// One CTA per (key block n, kv head, batch). K and V of the block stay in shared memory and dK, dV
// in registers for the whole CTA; the CTA walks the query blocks that the band mask leaves visible,
// for every query head of its GQA group, so dK/dV of a kv head are summed without a temporary.
// Warp specialization: warpgroup 0 is the producer (one thread issues TMA loads of K, V once and of
// Q + lse_log2 and dO + dpsum per query block through two 2-stage mbarrier pipelines; it keeps 24
// registers), warpgroups 1 and 2 are consumers (240 registers each) doing, per query block:
//   S^T  = K Q^T                  (WGMMA SS, M = keys)          P^T = exp2(S^T*scale*log2e - lse)
//   dP^T = V dO^T                 (WGMMA SS)                     dS^T = P^T * (dP^T - dpsum) [*dtanh]
//   dV  += P^T dO,  dK += dS^T Q  (WGMMA RS from registers when warpgroups split keys, else SS)
//   dS (and P for SS) -> shared memory (16-bit)
//   dQ   = dS K                   (WGMMA SS, fresh accumulator) -> dq_accum (see below)
// Why transposed (S^T rather than S): a warpgroup's accumulator rows are then keys, which is the
// M dimension of the dK/dV products, so P^T/dS^T written by a thread are read back by its own
// warpgroup when the warpgroups split keys (hdim <= 128).
// dQ accumulation (FlashAttention-3's design): dq_accum holds each (head, 64-row query block) tile in
// fragment order (flash_bwd_postprocess_sm90.h un-permutes it). Each consumer warpgroup stores its
// float32 dQ tile to shared memory with 128-bit stores, and warp 1 of the producer warpgroup adds
// it to dq_accum with one bulk reduce-add (cp.reduce.async.bulk ... add.f32) per tile; dQFull/
// dQEmpty named barriers give one step of slack, so consumers never wait on global memory. hdim
// 256 (16 KB of shared memory left) passes half of each tile through its slot in 2 rounds of a
// quarter tile (kDqRounds), a consumer waiting until the writer's previous bulk add has read the
// slot, and the other half through the warpgroup's column half of the step's Q stage once its dK
// product is done (kDqInStages). Float4 atomics in the same fragment order remain for experiments
// (FA3_BWD_DQ_ATOMIC): at hdim 256 they held L2 at 93-95% of its throughput (66% with 4 rounds).
// Deterministic mode orders the dQ adds of the key blocks of one (query block, head) with a
// semaphore: key block n adds only after blocks n_lo..n-1 have added, so the float sums are
// bit-identical run to run. The dQ writer warp (or, with atomics, each consumer warpgroup) waits
// on it before a tile's first add and releases it once all of the tile's adds are complete in
// global memory.
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
  // query blocks (segments_sm90.h, by_keys). Last: the other fields keep their offsets.
  sm90::SegmentParams seg;
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

// ---- small device helpers -----------------------------------------------------------------------

// Issue one batch of WGMMAs C (+)= A B over the K mode, committed as one group (not waited on).
template <bool kZeroInit, class TiledMma, class TA, class TB, class TC>
__device__ __forceinline__ void wgmma_gemm(TiledMma& mma, TA const& a, TB const& b, TC& c) {
  constexpr bool kRegA = !is_base_of<GMMA::DescriptorIterator, typename TiledMma::FrgTypeA>::value;
  if constexpr (kRegA) warpgroup_fence_operand(const_cast<TA&>(a));
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTLASS_PRAGMA_UNROLL
  for (int kb = 0; kb < size<2>(a); ++kb) {
    cute::gemm(mma, a(_, _, kb), b(_, _, kb), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(c);
  if constexpr (kRegA) warpgroup_fence_operand(const_cast<TA&>(a));
}

// A 16-bit copy of an accumulator, reshaped from the C layout ((2,2,N/8), MMA_M, MMA_N) to the
// register-A layout ((2,2,2), MMA_M, (N/16, MMA_N)) of the next WGMMA: the k16 slices of A are
// consecutive pairs of n8 column groups of C, so no data moves.
template <class AccLayout>
__device__ __forceinline__ auto acc_as_a_layout(AccLayout acc) {
  auto n8 = logical_divide(get<0, 2>(acc), Tile<_2>{});  // ((2, N/16))
  return make_layout(make_layout(get<0, 0>(acc), get<0, 1>(acc), get<0, 0>(n8)), get<1>(acc),
                     coalesce(make_layout(get<0, 1>(n8), get<2>(acc))));
}

__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <class Element>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  union { Element e[2]; uint32_t u; } r;
  r.e[0] = Element(a);
  r.e[1] = Element(b);
  return r.u;
}

__device__ __forceinline__ int ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void red_release_add(int* p, int v) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void st_shared_f32x4(uint32_t smem_addr, float4 v) {
  asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};" ::"r"(smem_addr), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w)
               : "memory");
}

// Adds `bytes` of float32 from shared memory to global memory (element-wise, at L2), as one async
// bulk operation of the executing thread's current bulk group.
__device__ __forceinline__ void bulk_reduce_add_f32(float* gmem, const float* smem, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;" ::"l"(gmem),
               "r"(cast_smem_ptr_to_uint(smem)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void bulk_commit_group() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }

// Until at most kPending bulk groups of this thread still read their shared-memory source.
template <int kPending>
__device__ __forceinline__ void bulk_wait_group_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kPending) : "memory");
}

// Until every bulk group of this thread has completed, its global writes included.
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

// Orders this thread's generic-proxy global accesses with its async-proxy (bulk) ones.
__device__ __forceinline__ void fence_proxy_async_global() { asm volatile("fence.proxy.async.global;" ::: "memory"); }

// First dQ adder of query block m in deterministic mode: the lowest key block that sees it.
__device__ __forceinline__ int first_key_block(int m0, int diag_lo, int block_n) {
  return max(0, m0 + diag_lo) / block_n;
}

// threadIdx.x, read anew: not merged with earlier thread-index arithmetic by the compiler.
__device__ __forceinline__ int fresh_thread_idx() {
  uint32_t t;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
  return int(t);
}

// The staged dK/dV epilogue's tile layout: kCols-wide 16-bit rows, 16-byte chunk c of row r at
// chunk c ^ (r % 8) (kCols a multiple of 64, so the swizzle stays within the row).
template <int kCols>
__device__ __forceinline__ int staged_offset(int r, int c) {
  static_assert(kCols % 64 == 0, "whole groups of 8 chunks per row");
  return r * kCols + (((c / 8) ^ (r % 8)) * 8) + c % 8;
}

// Rows 0 .. rows-1 of a staged tile to global rows of `stride` elements, one 16-byte chunk per
// thread and step (consecutive threads: consecutive chunks of a row).
template <int kCols, class Element>
__device__ __forceinline__ void store_staged_rows(Element* gmem, int64_t stride, const Element* smem, int rows,
                                                  int tid, int threads) {
  constexpr int kChunks = kCols / 8;
  for (int g = tid; g < rows * kChunks; g += threads) {
    const int r = g / kChunks, c = g % kChunks;
    *reinterpret_cast<uint4*>(gmem + r * stride + c * 8) =
        *reinterpret_cast<const uint4*>(smem + r * kCols + ((c ^ (r % 8)) * 8));
  }
}

// ---- the kernel ---------------------------------------------------------------------------------

template <class Tr>
struct BwdKernelArgs {
  typename Tr::TmaQ tma_q;
  typename Tr::TmadO tma_do;
  typename Tr::TmaK tma_k;
  typename Tr::TmaV tma_v;
  BwdMainParams p;
};

// Host: TMA descriptors over the (seqlen, d, head, batch) views of q, dout, k, v.
template <class Tr>
BwdKernelArgs<Tr> make_bwd_kernel_args(const BwdMainParams& p, int batch) {
  using Element = typename Tr::Element;
  auto view = [&](const void* ptr, int seqlen, int d, int heads) {
    return make_tensor(make_gmem_ptr(static_cast<const Element*>(ptr)), make_shape(seqlen, d, heads, batch),
                       make_stride(int64_t(heads) * d, _1{}, int64_t(d), int64_t(seqlen) * heads * d));
  };
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN;
  return {make_tma_copy(SM90_TMA_LOAD{}, view(p.q, p.seqlen_q, Tr::kHeadDim, p.heads_q),
                        take<0, 2>(typename Tr::SmemLayoutQ{}), Shape<Int<kBlockM>, Int<Tr::kHeadDim>>{}, _1{}),
          make_tma_copy(SM90_TMA_LOAD{}, view(p.dout, p.seqlen_q, Tr::kHeadDimV, p.heads_q),
                        take<0, 2>(typename Tr::SmemLayoutdO{}), Shape<Int<kBlockM>, Int<Tr::kHeadDimV>>{}, _1{}),
          make_tma_copy(SM90_TMA_LOAD{}, view(p.k, p.seqlen_k, Tr::kHeadDim, p.heads_kv),
                        typename Tr::SmemLayoutK{}, Shape<Int<kBlockN>, Int<Tr::kHeadDim>>{}, _1{}),
          make_tma_copy(SM90_TMA_LOAD{}, view(p.v, p.seqlen_k, Tr::kHeadDimV, p.heads_kv),
                        typename Tr::SmemLayoutV{}, Shape<Int<kBlockN>, Int<Tr::kHeadDimV>>{}, _1{}),
          p};
}

__device__ __forceinline__ void bulk_load_g2s(void* smem, const void* gmem, uint32_t bytes, uint64_t* mbar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
          cast_smem_ptr_to_uint(smem)),
      "l"(gmem), "r"(bytes), "r"(cast_smem_ptr_to_uint(mbar))
      : "memory");
}

// The dQ writer (warp 1 of the producer warpgroup): per step, waits until each consumer warpgroup
// has stored its dQ tile in shared memory (dQFull), adds it to dq_accum with one bulk reduce-add,
// and hands the buffer back (dQEmpty) once the bulk copy has read it. The first dQEmpty arrival
// marks the buffers empty, so a consumer only waits when the add of its previous tile is still
// reading shared memory: one step of slack. No arrival follows the last step (no one waits on it).
// q_row0: plane row of the sequence's first query block (0 when dense); diag_lo: its band.
template <class Tr>
__device__ __forceinline__ void store_dq(const BwdMainParams& p, typename Tr::SharedStorage& ss, int b, int hkv,
                                         int n_block, int m_lo, int num_m, int n_iter, int q_row0,
                                         int diag_lo) {
  constexpr int kNumMmaWG = Tr::kNumMmaWG;
  constexpr int kRounds = Tr::kDqRounds;
  constexpr int kBarThreads = cutlass::NumThreadsPerWarpGroup + cutlass::NumThreadsPerWarp;
  constexpr uint32_t kSlotBytes = Tr::kDqSlotFloats * sizeof(float);
  const bool lane0 = cute::elect_one_sync();
  for (int w = 0; w < kNumMmaWG; ++w) sm90::named_barrier_arrive(kBarThreads, sm90::bwd_dq_empty(w));
  int h = hkv * p.group, m_block = m_lo;
  CUTLASS_PRAGMA_NO_UNROLL
  for (int it = 0; it < n_iter; ++it) {
    const int m0 = m_block * Tr::kBlockM;
    float* dst = p.dq_accum + ((int64_t(b) * p.heads_q + h) * p.seqlen_q_pad + q_row0 + m0) * Tr::kHeadDim;
    int* sem = p.semaphores + (int64_t(b) * p.heads_q + h) * p.sem_per_head + (q_row0 + m0) / 64;
    if (p.deterministic && lane0) {
      // Key blocks first_key_block(m) .. n-1 have each added this tile once.
      const int turn = n_block - first_key_block(m0, diag_lo, Tr::kBlockN);
      while (ld_acquire(sem) < turn) {}
      fence_proxy_async_global();  // their adds are visible to this thread's bulk adds
    }
    __syncwarp();  // reconverge before the named barriers
    constexpr int kSlotBase = Tr::kDqWgFloats - Tr::kDqSlotTileFloats;  // the slot's part of the tile
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRounds; ++r) {
      CUTLASS_PRAGMA_UNROLL
      for (int w = 0; w < kNumMmaWG; ++w) {
        sm90::named_barrier_sync(kBarThreads, sm90::bwd_dq_full(w));
        if (lane0) {
          bulk_reduce_add_f32(dst + w * Tr::kDqWgFloats + kSlotBase + r * Tr::kDqSlotFloats,
                              ss.dq.data() + w * Tr::kDqSlotFloats, kSlotBytes);
          bulk_commit_group();
        }
      }
      const bool last = it + 1 == n_iter && r + 1 == kRounds;
      if (p.deterministic && r + 1 == kRounds && !Tr::kDqInStages) {
        if (lane0) {
          bulk_wait_all();  // the adds are done in global memory, not only read from shared memory
          fence_proxy_async_global();
          red_release_add(sem, 1);
        }
        __syncwarp();
        if (!last) {
          for (int w = 0; w < kNumMmaWG; ++w) sm90::named_barrier_arrive(kBarThreads, sm90::bwd_dq_empty(w));
        }
      } else {
        static_assert(kNumMmaWG == 2, "bulk group waits below are written for two consumer warpgroups");
        if (lane0) bulk_wait_group_read<1>();
        __syncwarp();
        if (!last) sm90::named_barrier_arrive(kBarThreads, sm90::bwd_dq_empty(0));
        if (lane0) bulk_wait_group_read<0>();
        __syncwarp();
        if (!last) sm90::named_barrier_arrive(kBarThreads, sm90::bwd_dq_empty(1));
      }
    }
    if constexpr (Tr::kDqInStages) {
      // The first half of each tile, from the warpgroups' Q halves; then the Q stage is released
      // (the consumers have arrived on it too).
      const int stage = it % Tr::kStages;
      CUTLASS_PRAGMA_UNROLL
      for (int w = 0; w < kNumMmaWG; ++w) {
        sm90::named_barrier_sync(kBarThreads, sm90::bwd_dq_stage_full(w));
        if (lane0) {
          bulk_reduce_add_f32(dst + w * Tr::kDqWgFloats,
                              reinterpret_cast<const float*>(ss.q.data() + (2 * stage + w) * Tr::kQHalfElems),
                              Tr::kDqWgFloats / 2 * sizeof(float));
        }
      }
      if (lane0) {
        bulk_commit_group();
        if (p.deterministic) {
          bulk_wait_all();  // the adds are done in global memory, not only read from shared memory
          fence_proxy_async_global();
          red_release_add(sem, 1);
        } else {
          bulk_wait_group_read<0>();
        }
        ss.pipeline_q.empty_barrier_[stage].arrive();
      }
      __syncwarp();
    }
    if (++m_block == m_lo + num_m) {
      m_block = m_lo;
      ++h;
    }
  }
  if (lane0) bulk_wait_all();  // shared memory must outlive the last copy
  __syncwarp();
  if constexpr (Tr::kDqInStages) {
    // The epilogue may overwrite the Q stages (its dQEmpty wait).
    for (int w = 0; w < kNumMmaWG; ++w) sm90::named_barrier_arrive(kBarThreads, sm90::bwd_dq_empty(w));
  }
}

template <class Tr>
__global__ void __launch_bounds__(Tr::kNumThreads, 1)
    flash_bwd_kernel_sm90(const __grid_constant__ BwdKernelArgs<Tr> args) {
  using Element = typename Tr::Element;
  using Pipeline = typename Tr::Pipeline;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN;
  constexpr int kHeadDim = Tr::kHeadDim, kHeadDimV = Tr::kHeadDimV;
  constexpr int kMmaThreads = Tr::kNumMmaThreads;
  const BwdMainParams& p = args.p;

  extern __shared__ char smem_raw[];
  auto& ss = *reinterpret_cast<typename Tr::SharedStorage*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));

  const int warp_group = __shfl_sync(0xffffffffu, threadIdx.x / cutlass::NumThreadsPerWarpGroup, 0);
  int hkv = blockIdx.y, n_block = blockIdx.x, b = blockIdx.z;
  // Which key block, kv head and batch row. CTAs start in launch order (x fastest); with a causal
  // band a key block's work falls with its index (fewer query blocks see it), and a CTA covers
  // the whole GQA group, so in the launch order the heavy first key blocks of the last (head,
  // batch) pairs start late and run alone at the end. key_block_major renumbers the CTAs so that
  // key block 0 of every pair starts first, then key block 1, ...: heaviest first (a list
  // schedule of 132 SMs ends 1.6% past the mean load at hdim 128, 4k, causal, GQA 16/4, batch 4,
  // launch order 28% past; the launcher says when, with measurements). Ascending key blocks per
  // pair also keep the deterministic dQ order's waits on CTAs launched earlier.
  if (p.key_block_major) {
    const int pairs = int(gridDim.y * gridDim.z);
    const int linear = int(blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z));
    n_block = linear / pairs;
    hkv = linear % pairs % int(gridDim.y);
    b = linear % pairs / int(gridDim.y);
  }
  // The CTA's sequence: lengths, band, where its rows start (offset_*), and the plane row of its
  // first query block (q_row0). Dense: the whole batch row. Varlen: blockIdx.x is a numbered key
  // block of batch row blockIdx.z (sm90::varlen_block), n_block its index in its sequence.
  int seqlen_q = p.seqlen_q, seqlen_k = p.seqlen_k, diag_lo = p.diag_lo,
      diag_hi = p.diag_hi, offset_q = 0, offset_k = 0, q_row0 = 0;
  if (p.varlen.cu_q) {
    int s_in_row;
    // Past the row's last key block: nothing to compute or write.
    if (!sm90::varlen_block(p.varlen, b, blockIdx.x, s_in_row, n_block)) return;
    const sm90::SeqSpan s = sm90::varlen_span(p.varlen, b * p.varlen.num_seqs + s_in_row);
    b = s.batch;
    seqlen_q = s.len_q;
    seqlen_k = s.len_k;
    diag_lo = sm90::varlen_diag(p.varlen.diag_lo, s.len_q, s.len_k);
    diag_hi = sm90::varlen_diag(p.varlen.diag_hi, s.len_q, s.len_k);
    offset_q = s.offset_q;
    offset_k = s.offset_k;
    q_row0 = varlen_q_block_row(s.offset_q, s_in_row);
  }
  const int n0 = n_block * kBlockN;

  // Query blocks with at least one visible (query, key) pair for this key block:
  // m0 <= n_end - 1 - diag_lo and min(m0 + kBlockM, seqlen_q) - 1 >= n0 - diag_hi.
  const int n_end = min(n0 + kBlockN, seqlen_k);
  const int hi_num = n_end - 1 - diag_lo;
  int m_hi = hi_num < 0 ? 0 : min((seqlen_q + kBlockM - 1) / kBlockM, hi_num / kBlockM + 1);
  const int lo_num = n0 - diag_hi;
  int m_lo = lo_num <= 0 ? 0 : (lo_num > seqlen_q - 1 ? m_hi : lo_num / kBlockM);
  // Segment ids: only the query blocks of this key block's segment hull. Not in deterministic
  // mode, whose dQ semaphores count every key block of the band (first_key_block): there each
  // adds its tile, zeros where the ids mask everything.
  // Query blocks [u_first, u_last) hold only this key block's one id: no id compare there.
  int u_first = 0, u_last = 0;
  if constexpr (Tr::kSegments) {
    const sm90::SegmentRanges r = __ldg(p.seg.ranges + int64_t(b) * p.seg.num_k_blocks + n_block);
    if (!p.deterministic) {
      m_lo = max(m_lo, r.x);
      m_hi = min(m_hi, r.y);
    }
    u_first = r.z;
    u_last = r.w;
  }
  const int num_m = max(m_hi - m_lo, 0);
  // Step `it` covers query head hkv * group + it / num_m and query block m_lo + it % num_m.
  const int n_iter = num_m * p.group;

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQ{});        // (M, d, STAGE)
  Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), typename Tr::SmemLayoutdO{});   // (M, dv, STAGE)
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutK{});        // (N, d)
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Tr::SmemLayoutV{});        // (N, dv)

  typename Pipeline::Params pipe_params;
  pipe_params.transaction_bytes = Tr::kTxBytesQ;
  pipe_params.role = warp_group == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipe_params.is_leader = threadIdx.x == 0;  // the one producer thread that arms the barriers
  // kDqInStages: the dQ writer also releases each Q stage, once its bulk adds have read it.
  pipe_params.num_consumers = kMmaThreads + (Tr::kDqInStages ? 1 : 0);
  if (threadIdx.x == 0) ss.barrier_kv.init(1);
  Pipeline pipeline_q(ss.pipeline_q, pipe_params, Shape<_1, _1, _1>{});  // inits + fences its barriers
  pipe_params.num_consumers = kMmaThreads;
  pipe_params.transaction_bytes = Tr::kTxBytesdO;
  Pipeline pipeline_do(ss.pipeline_do, pipe_params, Shape<_1, _1, _1>{});
  __syncthreads();

  if (warp_group == 0) {
    // ---- producer: thread 0 issues every TMA (none at all when no query block is visible) --------
    cutlass::arch::warpgroup_reg_dealloc<Tr::kProducerRegs>();
    if (threadIdx.x == 0 && n_iter > 0) {
      // Rows past a varlen sequence's end load the next sequence's rows (or TMA's zero fill): its
      // keys are masked, and its query rows have lse_log2 = +inf (the preprocess), so P = dS = 0.
      Tensor mK = domain_offset(make_coord(offset_k, _0{}),
                                args.tma_k.get_tma_tensor(make_shape(p.seqlen_k, kHeadDim, p.heads_kv, p.batch))(_, _, hkv, b));
      Tensor mV = domain_offset(make_coord(offset_k, _0{}),
                                args.tma_v.get_tma_tensor(make_shape(p.seqlen_k, kHeadDimV, p.heads_kv, p.batch))(_, _, hkv, b));
      Tensor gK = local_tile(mK, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, _0{}));   // (N, d)
      Tensor gV = local_tile(mV, Shape<Int<kBlockN>, Int<kHeadDimV>>{}, make_coord(n_block, _0{}));  // (N, dv)
      auto [tKgK, tKsK] = tma_partition(args.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
      auto [tVgV, tVsV] = tma_partition(args.tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
      ss.barrier_kv.arrive_and_expect_tx(Tr::kTxBytesKV);
      auto* kv_bar = reinterpret_cast<cutlass::arch::ClusterTransactionBarrier::ValueType*>(&ss.barrier_kv);
      copy(args.tma_k.with(*kv_bar, 0), tKgK, tKsK);
      copy(args.tma_v.with(*kv_bar, 0), tVgV, tVsV);

      Tensor mQ = args.tma_q.get_tma_tensor(make_shape(p.seqlen_q, kHeadDim, p.heads_q, p.batch));
      Tensor mdO = args.tma_do.get_tma_tensor(make_shape(p.seqlen_q, kHeadDimV, p.heads_q, p.batch));
      auto state = cutlass::make_producer_start_state<Pipeline>();
      // Query head and block of step it (it / num_m, it % num_m) as counters, not a division per
      // step in the 24-register producer (at hdim 256 it still spills 4 bytes, one load a step).
      int h = hkv * p.group, m_block = m_lo;
      CUTLASS_PRAGMA_NO_UNROLL
      for (int it = 0; it < n_iter; ++it) {
        Tensor gQ = local_tile(domain_offset(make_coord(offset_q, _0{}), mQ(_, _, h, b)),
                               Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, _0{}));
        Tensor gdO = local_tile(domain_offset(make_coord(offset_q, _0{}), mdO(_, _, h, b)),
                                Shape<Int<kBlockM>, Int<kHeadDimV>>{}, make_coord(m_block, _0{}));
        auto [tQgQ, tQsQ] = tma_partition(args.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
        auto [tdOgdO, tdOsdO] = tma_partition(args.tma_do, _0{}, Layout<_1>{}, group_modes<0, 2>(sdO), group_modes<0, 2>(gdO));
        // Both pipelines advance in lockstep, so one state (stage index and phase) serves both.
        const int stage = state.index();
        // lse_log2 / dpsum rows are padded to seqlen_q_pad, so a whole block is always readable.
        const int64_t row = (int64_t(b) * p.heads_q + h) * p.seqlen_q_pad + q_row0 + int64_t(m_block) * kBlockM;
        pipeline_q.producer_acquire(state);  // also arms the stage's barrier with kTxBytesQ
        auto* bar_q = pipeline_q.producer_get_barrier(state);
        copy(args.tma_q.with(*bar_q, 0), tQgQ, tQsQ(_, stage));
        bulk_load_g2s(ss.lse.data() + stage * kBlockM, p.lse_log2 + row, kBlockM * sizeof(float), bar_q);
        pipeline_do.producer_acquire(state);  // kTxBytesdO
        auto* bar_do = pipeline_do.producer_get_barrier(state);
        copy(args.tma_do.with(*bar_do, 0), tdOgdO, tdOsdO(_, stage));
        bulk_load_g2s(ss.dpsum.data() + stage * kBlockM, p.dpsum + row, kBlockM * sizeof(float), bar_do);
        ++state;
        if (++m_block == m_lo + num_m) {
          m_block = m_lo;
          ++h;
        }
      }
    } else if constexpr (Tr::kDqBulk) {
      if (threadIdx.x / cutlass::NumThreadsPerWarp == 1 && n_iter > 0) store_dq<Tr>(p, ss, b, hkv, n_block, m_lo, num_m, n_iter, q_row0, diag_lo);
    }
    return;
  }

  // ---- consumers ------------------------------------------------------------------------------
  cutlass::arch::warpgroup_reg_alloc<Tr::kConsumerRegs>();
  const int tid = threadIdx.x - cutlass::NumThreadsPerWarpGroup;  // 0 .. kMmaThreads-1
  const int wg = warp_group - 1;
  const int64_t k_row_stride = int64_t(p.heads_kv) * kHeadDim;
  const int64_t v_row_stride = int64_t(p.heads_kv) * kHeadDimV;

  Tensor sQt = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQt{});      // (d, M, STAGE)
  Tensor sdOt = make_tensor(make_smem_ptr(ss.dout.data()), typename Tr::SmemLayoutdOt{}); // (dv, M, STAGE)
  Tensor sKt = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutKt{});      // (d, N)
  Tensor sPt = make_tensor(make_smem_ptr(ss.p.data()), typename Tr::SmemLayoutPdSt{});    // (N, M)
  Tensor sdS = make_tensor(make_smem_ptr(ss.ds.data()), typename Tr::SmemLayoutdS{});     // (M, N, DS_STAGE)
  Tensor sdSt = make_tensor(make_smem_ptr(ss.ds.data()), typename Tr::SmemLayoutdSt{});   // (N, M, DS_STAGE)

  typename Tr::TiledMmaS mma_s;
  typename Tr::TiledMmadP mma_dp;
  typename Tr::TiledMmadK mma_dk;
  typename Tr::TiledMmadV mma_dv;
  typename Tr::TiledMmadQ mma_dq;
  // Operand descriptors are the same for all 128 threads of a warpgroup.
  const int wg_thread = wg * cutlass::NumThreadsPerWarpGroup;
  auto wg_s = mma_s.get_slice(wg_thread);
  auto wg_dp = mma_dp.get_slice(wg_thread);
  auto wg_dk = mma_dk.get_slice(wg_thread);
  auto wg_dv = mma_dv.get_slice(wg_thread);
  auto wg_dq = mma_dq.get_slice(wg_thread);
  Tensor tSrK = wg_s.partition_fragment_A(sK);       // (MMA, MMA_N_keys, MMA_K)
  Tensor tSrQ = wg_s.partition_fragment_B(sQ);       // (MMA, MMA_M_q, MMA_K, STAGE)
  Tensor tdPrV = wg_dp.partition_fragment_A(sV);
  Tensor tdPrdO = wg_dp.partition_fragment_B(sdO);
  Tensor tdVrdO = wg_dv.partition_fragment_B(sdOt);
  Tensor tdKrQ = wg_dk.partition_fragment_B(sQt);
  Tensor tdQrdS = wg_dq.partition_fragment_A(sdS);   // (MMA, MMA_M, MMA_K, DS_STAGE)
  Tensor tdQrK = wg_dq.partition_fragment_B(sKt);

  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_dk = mma_dk.get_thread_slice(tid);
  auto thr_dv = mma_dv.get_thread_slice(tid);
  Tensor tdKrdK = partition_fragment_C(mma_dk, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor tdVrdV = partition_fragment_C(mma_dv, Shape<Int<kBlockN>, Int<kHeadDimV>>{});
  clear(tdKrdK);
  clear(tdVrdV);

  Tensor tScS_once = thr_s.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{}));  // (key, query)
  Tensor tdSsdS = thr_s.partition_C(sdSt);  // (MMA, MMA_N, MMA_M, DS_STAGE)

  if (n_iter > 0) ss.barrier_kv.wait(0);
  cutlass::PipelineState<Tr::kStages> state;
  CUTLASS_PRAGMA_NO_UNROLL
  for (int it = 0; it < n_iter; ++it) {
    const int stage = state.index();
    const int ds_stage = Tr::kStagesdS == 1 ? 0 : it % Tr::kStagesdS;
    pipeline_q.consumer_wait(state);
    const int h = hkv * p.group + it / num_m;
    const int m_block = m_lo + it % num_m;
    const int m0 = m_block * kBlockM;
    // (key, query) coordinates of this thread's S^T values. At hdim 64 from a fresh read of the
    // thread index every step: derived once before the loop, the compiler kept them live across
    // it and spilled them (4 bytes, with softcap 16, reloaded every step; fresh: 0 and 8). At hdim
    // 128 the fresh ones spilled 12 bytes (0 derived once), at 96/192/256 they changed nothing.
    auto tScS = [&] {
      if constexpr (kHeadDim <= 64) {
        return mma_s.get_thread_slice(fresh_thread_idx() - cutlass::NumThreadsPerWarpGroup)
            .partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{}));
      } else {
        return tScS_once;
      }
    }();

    Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kBlockN>, Int<kBlockM>>{});
    Tensor tdPrdP = partition_fragment_C(mma_dp, Shape<Int<kBlockN>, Int<kBlockM>>{});
    wgmma_gemm<true>(mma_s, tSrK, tSrQ(_, _, _, stage), tSrS);
    pipeline_do.consumer_wait(state);
    wgmma_gemm<true>(mma_dp, tdPrV, tdPrdO(_, _, _, stage), tdPrdP);

    // Per-query statistics. Accumulator value i = j + 2 v + 4 k of the single 64 x N atom sits in
    // column col0 + 8 k + j, where col0 = 2 (t % 4) plus the warpgroup's column offset: the 8
    // threads of a warp with the same t % 4 share the same 2 N / 8 columns.
    //  * hdim <= 128 (warpgroups split keys, N = block_m: 16 or 32 columns per thread), shuffled as
    //    FlashAttention-3's ShuffleLSE / ShuffledPsum: the thread of row group r = (t % 32) / 4
    //    keeps only the two statistics of groups k = r (mod 8), and value i takes its own from lane
    //    4 (k % 8) + t % 4. 2 + 2 registers (4 + 4 at block_m 128) instead of 16 + 16 (32 + 32)
    //    keep hdim 64..128 within the 240-register budget.
    //  * hdim 192/256 (warpgroups split queries, N = 32: 8 columns) have registers to spare and
    //    keep all of their statistics, with no shuffles on the way to the exponentials.
    // lse is read while the MMAs run.
    static_assert(decltype(size<1>(tSrS))::value == 1 && decltype(size<2>(tSrS))::value == 1,
                  "one WGMMA atom per warpgroup for S^T/dP^T");
    constexpr int kStatGroups = Tr::kSdPN / 8;  // column groups of 8 per accumulator row
    static_assert(decltype(size(tSrS))::value == 4 * kStatGroups, "one statistics pair per column group");
    constexpr bool kShuffleStats = Tr::kSplitKeys;
    static_assert(!kShuffleStats || kStatGroups % 8 == 0, "shuffled pairs cover the 8 row groups evenly");
    constexpr int kHeld = kShuffleStats ? 2 * kStatGroups / 8 : 2 * kStatGroups;
    const int lane = tid % cutlass::NumThreadsPerWarp;
    const float* s_lse = ss.lse.data() + stage * kBlockM + get<1>(tScS(0));
    const float* s_dpsum = ss.dpsum.data() + stage * kBlockM + get<1>(tScS(0));
    // Statistics of this thread's columns from shared memory: lse before the exponentials; dpsum
    // without softcap only once dP^T is complete (registers fewer at the peak, while dP^T is in
    // flight: hdim 64 spilled without it), with softcap with lse (ptxas spills less at 96/128).
    auto load_stats = [&](const float* s_stat, float* held) {
      if constexpr (kShuffleStats) {
        const int r = lane / 4;
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < kHeld / 2; ++c) {
          const float2 v2 = *reinterpret_cast<const float2*>(s_stat + 8 * (r + 8 * c));
          held[2 * c] = v2.x, held[2 * c + 1] = v2.y;
        }
      } else {
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < kHeld; ++c) held[c] = s_stat[8 * (c / 2) + c % 2];
      }
    };
    float lse_r[kHeld], dpsum_r[kHeld];
    load_stats(s_lse, lse_r);
    if constexpr (Tr::kHasSoftcap) load_stats(s_dpsum, dpsum_r);
    // The statistic of the columns of group k, j = 0 / 1.
    auto stat = [&](const float* held, int k, int j) {
      if constexpr (kShuffleStats) {
        return __shfl_sync(0xffffffffu, held[2 * (k / 8) + j], 4 * (k % 8) + lane % 4);
      } else {
        return held[2 * k + j];
      }
    };
    // Blocks entirely inside the band and inside seqlen_k need no per-element mask (rows past
    // seqlen_q have lse_log2 = +inf, so their P is 0 without one).
    // Segment ids: also every block pair whose rows are not all of one and the same segment.
    bool seg_mask = false;
    if constexpr (Tr::kSegments) seg_mask = m_block < u_first || m_block >= u_last;
    const bool need_mask = seg_mask || !(n0 + kBlockN <= seqlen_k && n0 - (m0 + kBlockM - 1) >= diag_lo &&
                                         n0 + kBlockN - 1 - m0 <= diag_hi);
    // Softcap derivative 1 - tanh^2, kept as packed fp16 pairs (16 registers instead of 32): it
    // only scales dS, which is rounded to 16 bits anyway.
    uint32_t dtanh2[Tr::kHasSoftcap ? decltype(size(tSrS))::value / 2 : 1];
    warpgroup_wait<1>();
    // Segment ids of a masked block pair: from the blocks' runs (segments_sm90.h) where a block
    // holds at most two, by row index only; else loaded, one id per element (mask.h has the
    // forward's measurement of what those loads cost).
    sm90::SegmentRuns q_runs{}, k_runs{};
    if constexpr (Tr::kSegments) {
      if (seg_mask) {
        q_runs = __ldg(p.seg.q_runs + int64_t(b) * p.seg.num_q_blocks + m_block);
        k_runs = __ldg(p.seg.k_runs + int64_t(b) * p.seg.num_k_blocks + n_block);
      }
    }
    auto masked = [&](int i) {
      const int kn = n0 + get<0>(tScS(i)), diag = kn - (m0 + get<1>(tScS(i)));
      if constexpr (Tr::kSegments) {
        if (seg_mask) {  // q_segment_ids[qm] == kv_segment_ids[kn] != 0 (rows past the ends: 0)
          const int qm = m0 + get<1>(tScS(i));
          const int qid = qm >= seqlen_q ? 0
                          : q_runs.w     ? sm90::segment_run_id(q_runs, qm - m0)
                                         : __ldg(p.seg.q_ids + int64_t(b) * p.seqlen_q + qm);
          const int kid = kn >= seqlen_k ? 0
                          : k_runs.w     ? sm90::segment_run_id(k_runs, kn - n0)
                                         : __ldg(p.seg.k_ids + int64_t(b) * p.seqlen_k + kn);
          if (qid == 0 || qid != kid) return true;
        }
      }
      return !(kn < seqlen_k && diag >= diag_lo && diag <= diag_hi);
    };
    // Without softcap the mask is a pass of its own before the exponentials (-inf logits, only on
    // boundary blocks): fused into their loop, its coordinates and comparisons stayed live across
    // it and spilled (hdim 64 at block_m 128: 92 bytes, about 20 local loads/stores per step).
    // With softcap the mask must follow tanh; there, fused into the loop (P = 0) spills least.
    if constexpr (!Tr::kHasSoftcap) {
      if (need_mask) {
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(tSrS); ++i) tSrS(i) = masked(i) ? -INFINITY : tSrS(i);
      }
    }
    // Values 4 k + 2 v + {0, 1} (rows +0/+8, adjacent columns) share the two statistics of group k.
    // exp2(-inf - lse_log2) = 0: lse_log2 is never -inf (the preprocess makes empty rows +inf).
    CUTLASS_PRAGMA_UNROLL
    for (int k = 0; k < kStatGroups; ++k) {
      const float lse0 = stat(lse_r, k, 0), lse1 = stat(lse_r, k, 1);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 4 * k; i < 4 * k + 4; i += 2) {
        if constexpr (Tr::kHasSoftcap) {
          const float t0 = tanh_approx(tSrS(i) * p.scale_div_softcap);
          const float t1 = tanh_approx(tSrS(i + 1) * p.scale_div_softcap);
          dtanh2[i / 2] = pack2<cutlass::half_t>(1.f - t0 * t0, 1.f - t1 * t1);
          float pv[2] = {exp2_approx(t0 * p.softcap_log2 - lse0), exp2_approx(t1 * p.softcap_log2 - lse1)};
          if (need_mask) {
            CUTLASS_PRAGMA_UNROLL
            for (int j = 0; j < 2; ++j) pv[j] = masked(i + j) ? 0.f : pv[j];
          }
          tSrS(i) = pv[0];
          tSrS(i + 1) = pv[1];
        } else {
          tSrS(i) = exp2_approx(tSrS(i) * p.scale_log2 - lse0);
          tSrS(i + 1) = exp2_approx(tSrS(i + 1) * p.scale_log2 - lse1);
        }
      }
    }
    warpgroup_wait<0>();
    if constexpr (!Tr::kHasSoftcap) load_stats(s_dpsum, dpsum_r);
    if constexpr (Tr::kStagesdS == 1) {
      // The other warpgroup may still be reading the previous step's P/dS in its dQ/dK/dV MMAs.
      sm90::named_barrier_sync(kMmaThreads, sm90::BwdNamedBarrier::PdSFree);
    }
    // dS = P (dP - dpsum) [* dtanh], then P and dS rounded to 16 bits: value pairs 2k, 2k+1
    // (adjacent queries, adjacent in sPt/sdSt) become one 32-bit register and one 32-bit store.
    // P^T stays in registers for the RS dV product, or goes to shared memory for the SS one.
    // Without softcap, in one pass: the float32 S^T/dP^T die as the 16-bit P^T/dS^T grow (the
    // register peak of hdim 64 at block_m 128). With softcap, dS in place first and then the
    // packing: ptxas spills less that way with the tanh derivatives live (0 bytes at hdim 96/128,
    // against 12..20 in one pass).
    constexpr bool kOnePass = !Tr::kHasSoftcap;
    Tensor rdS = make_tensor_like<Element>(tdPrdP);
    Tensor rdS32 = recast<uint32_t>(rdS);
    Tensor rP = make_tensor_like<Element>(tSrS);
    Tensor rP32 = recast<uint32_t>(rP);
    Tensor tdSsdS_cur = tdSsdS(_, _, _, ds_stage);
    Tensor tPsP = thr_s.partition_C(sPt);  // SS dV path only
    auto pack_pair = [&](int i, float ds0, float ds1) {
      rdS32(i / 2) = pack2<Element>(ds0, ds1);
      *reinterpret_cast<uint32_t*>(&tdSsdS_cur(i)) = rdS32(i / 2);
      rP32(i / 2) = pack2<Element>(tSrS(i), tSrS(i + 1));
      if constexpr (!Tr::kDkvRS) *reinterpret_cast<uint32_t*>(&tPsP(i)) = rP32(i / 2);
    };
    CUTLASS_PRAGMA_UNROLL
    for (int k = 0; k < kStatGroups; ++k) {
      const float dpsum0 = stat(dpsum_r, k, 0), dpsum1 = stat(dpsum_r, k, 1);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 4 * k; i < 4 * k + 4; i += 2) {
        float ds0 = tSrS(i) * (tdPrdP(i) - dpsum0);
        float ds1 = tSrS(i + 1) * (tdPrdP(i + 1) - dpsum1);
        if constexpr (Tr::kHasSoftcap) {
          const float2 dt = __half22float2(reinterpret_cast<const __half2&>(dtanh2[i / 2]));
          ds0 *= dt.x;
          ds1 *= dt.y;
        }
        if constexpr (kOnePass) {
          pack_pair(i, ds0, ds1);
        } else {
          tdPrdP(i) = ds0;
          tdPrdP(i + 1) = ds1;
        }
      }
    }
    if constexpr (!kOnePass) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(tdPrdP); i += 2) pack_pair(i, tdPrdP(i), tdPrdP(i + 1));
    }
    if constexpr (Tr::kDkvRS) {
      // dV += P^T dO, issued once P^T and dS^T are in 16 bits; it overlaps the barrier wait below.
      wgmma_gemm<false>(mma_dv, make_tensor(rP.data(), acc_as_a_layout(tSrS.layout())), tdVrdO(_, _, _, stage), tdVrdV);
    }
    // Generic-proxy stores must be fenced before WGMMA (async proxy) reads them.
    cutlass::arch::fence_view_async_shared();
    sm90::named_barrier_sync(kMmaThreads, sm90::BwdNamedBarrier::PdSWritten);

    Tensor tdQrdQ = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
    wgmma_gemm<true>(mma_dq, tdQrdS(_, _, _, ds_stage), tdQrK, tdQrdQ);
    if constexpr (Tr::kDkvRS) {
      wgmma_gemm<false>(mma_dk, make_tensor(rdS.data(), acc_as_a_layout(tdPrdP.layout())), tdKrQ(_, _, _, stage), tdKrdK);
      warpgroup_wait<1>();  // dV and dQ done; dK keeps the tensor cores busy during the dQ store
      pipeline_do.consumer_release(state);  // dO and dpsum of this stage are no longer read
    } else {
      wgmma_gemm<false>(mma_dv, wg_dv.partition_fragment_A(sPt), tdVrdO(_, _, _, stage), tdVrdV);
      wgmma_gemm<false>(mma_dk, wg_dk.partition_fragment_A(sdSt(_, _, 0)), tdKrQ(_, _, _, stage), tdKrdK);
      warpgroup_wait<2>();  // dQ done; dV and dK keep the tensor cores busy during the dQ store
    }

    // This warpgroup's dQ tile, value 4j+v of thread t as float4 j*128+t (fragment order).
    static_assert(decltype(size(tdQrdQ))::value * cutlass::NumThreadsPerWarpGroup == Tr::kDqWgFloats,
                  "each warpgroup owns a 64 x d/2 (or, split by rows, 64 x d) dQ tile");
    constexpr int kDqChunks = Tr::kDqWgFloats / (4 * cutlass::NumThreadsPerWarpGroup);
    const int wg_tid = tid % cutlass::NumThreadsPerWarpGroup;
    auto dq_chunk = [&](int j) {
      return make_float4(tdQrdQ(4 * j), tdQrdQ(4 * j + 1), tdQrdQ(4 * j + 2), tdQrdQ(4 * j + 3));
    };
    if constexpr (Tr::kDqBulk) {
      // Chunks r * kSlotChunks .. of round r through this warpgroup's slot.
      constexpr int kBarThreads = cutlass::NumThreadsPerWarpGroup + cutlass::NumThreadsPerWarp;
      // kDqInStages: the slot carries chunks kDqChunks/2.., and chunks 0.. follow through the
      // warpgroup's Q half once dK is done.
      constexpr int kSlotChunks = Tr::kDqSlotFloats / (4 * cutlass::NumThreadsPerWarpGroup);
      constexpr int kSlotBase = kDqChunks - kSlotChunks * Tr::kDqRounds;
      const uint32_t sdq = cast_smem_ptr_to_uint(ss.dq.data() + wg * Tr::kDqSlotFloats + 4 * wg_tid);
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < Tr::kDqRounds; ++r) {
        sm90::named_barrier_sync(kBarThreads, sm90::bwd_dq_empty(wg));  // the previous round was read
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < kSlotChunks; ++c) {
          st_shared_f32x4(sdq + c * 16 * cutlass::NumThreadsPerWarpGroup, dq_chunk(kSlotBase + r * kSlotChunks + c));
        }
        cutlass::arch::fence_view_async_shared();  // visible to the bulk copy (async proxy)
        sm90::named_barrier_arrive(kBarThreads, sm90::bwd_dq_full(wg));
      }
      if constexpr (Tr::kDqInStages) {
        warpgroup_wait<1>();  // dV done: dO and dpsum of this stage are no longer read
        pipeline_do.consumer_release(state);
        warpgroup_wait<0>();  // dK done: this warpgroup no longer reads its Q half
        const uint32_t sq = cast_smem_ptr_to_uint(ss.q.data() + (2 * stage + wg) * Tr::kQHalfElems) + 16 * wg_tid;
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < kSlotBase; ++c) st_shared_f32x4(sq + c * 16 * cutlass::NumThreadsPerWarpGroup, dq_chunk(c));
        cutlass::arch::fence_view_async_shared();
        sm90::named_barrier_arrive(kBarThreads, sm90::bwd_dq_stage_full(wg));
      }
    } else {
      float4* gdq = reinterpret_cast<float4*>(
                        p.dq_accum + ((int64_t(b) * p.heads_q + h) * p.seqlen_q_pad + q_row0 + m0) * kHeadDim +
                        wg * Tr::kDqWgFloats) + wg_tid;
      int* sem = p.semaphores + (int64_t(b) * p.heads_q + h) * p.sem_per_head + (q_row0 + m0) / 64;
      const auto order_barrier = sm90::bwd_dq_order(wg);
      if (p.deterministic) {
        // Key blocks n_lo(m) .. n-1 each add once per warpgroup before this block adds. ">=", not
        // "==": the other warpgroup of this CTA may already have counted its own add.
        const int turn = Tr::kNumMmaWG * (n_block - first_key_block(m0, diag_lo, kBlockN));
        if (wg_tid == 0) {
          while (ld_acquire(sem) < turn) {}
        }
        sm90::named_barrier_sync(cutlass::NumThreadsPerWarpGroup, order_barrier);
      }
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < kDqChunks; ++j) atomicAdd(gdq + j * cutlass::NumThreadsPerWarpGroup, dq_chunk(j));
      if (p.deterministic) {
        __threadfence();
        sm90::named_barrier_sync(cutlass::NumThreadsPerWarpGroup, order_barrier);
        if (wg_tid == 0) red_release_add(sem, 1);
      }
    }
    if constexpr (!Tr::kDkvRS && !Tr::kDqInStages) {
      warpgroup_wait<1>();  // dV done: dO and dpsum of this stage are no longer read
      pipeline_do.consumer_release(state);
    }
    warpgroup_wait<0>();
    pipeline_q.consumer_release(state);  // Q and lse of this stage are no longer read (kDqInStages:
                                         // the writer's arrival follows its bulk read)
    ++state;
  }

  // Epilogue: dK * softmax_scale and dV (rows past seqlen_k dropped).
  const int valid_n = n_end - n0;
  const int64_t k_row = int64_t(b) * p.seqlen_k + offset_k + n0;
  Element* gdk = static_cast<Element*>(p.dk) + (k_row * p.heads_kv + hkv) * kHeadDim;
  Element* gdv = static_cast<Element*>(p.dv) + (k_row * p.heads_kv + hkv) * kHeadDimV;
  if constexpr (Tr::kStagedEpilogue) {
    // Through shared memory (dK in the Q buffers, dV in the dO buffers, which no one reads any
    // more), then whole 16-byte row chunks to global memory: a warp's accumulator pairs cover 8
    // rows x 16 bytes, half of each 32-byte sector, so stores straight from registers take twice
    // the instructions and write sectors in halves. Rows are row-major with 16-byte chunk c of
    // row r at c ^ (r % 8): the 8 rows of a warp's pair stores fall in distinct banks.
    // Both warpgroups must be done with Q/dO (the other may still run its last dK/dV product);
    // PdSWritten is otherwise idle by now. kDqInStages: and the dQ writer's last bulk adds have
    // read the Q stages (its final dQEmpty arrival).
    if constexpr (Tr::kDqInStages) {
      if (n_iter > 0) {
        sm90::named_barrier_sync(cutlass::NumThreadsPerWarpGroup + cutlass::NumThreadsPerWarp, sm90::bwd_dq_empty(wg));
      }
    }
    sm90::named_barrier_sync(kMmaThreads, sm90::BwdNamedBarrier::PdSWritten);
    Element* sdk = ss.q.data();
    Element* sdv = ss.dout.data();
    // Coordinates from a fresh read of the thread index: derived from `tid`, the compiler shares
    // them with the mainloop's lane arithmetic and keeps those values live across the loop (hdim
    // 128 spilled 20 bytes, reloaded in the loop).
    const int etid = fresh_thread_idx() - cutlass::NumThreadsPerWarpGroup;
    Tensor tdKcdK_s = mma_dk.get_thread_slice(etid).partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
    Tensor tdVcdV_s = mma_dv.get_thread_slice(etid).partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDimV>>{}));
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tdKrdK); i += 2) {
      const int r = get<0>(tdKcdK_s(i)), c = get<1>(tdKcdK_s(i));
      *reinterpret_cast<uint32_t*>(sdk + staged_offset<kHeadDim>(r, c)) =
          pack2<Element>(tdKrdK(i) * p.scale, tdKrdK(i + 1) * p.scale);
    }
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tdVrdV); i += 2) {
      const int r = get<0>(tdVcdV_s(i)), c = get<1>(tdVcdV_s(i));
      *reinterpret_cast<uint32_t*>(sdv + staged_offset<kHeadDimV>(r, c)) = pack2<Element>(tdVrdV(i), tdVrdV(i + 1));
    }
    sm90::named_barrier_sync(kMmaThreads, sm90::BwdNamedBarrier::PdSWritten);
    store_staged_rows<kHeadDim>(gdk, k_row_stride, sdk, valid_n, etid, kMmaThreads);
    store_staged_rows<kHeadDimV>(gdv, v_row_stride, sdv, valid_n, etid, kMmaThreads);
    return;
  }
  Tensor gdK = make_tensor(make_gmem_ptr(gdk), Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_stride(k_row_stride, _1{}));
  Tensor gdV = make_tensor(make_gmem_ptr(gdv), Shape<Int<kBlockN>, Int<kHeadDimV>>{}, make_stride(v_row_stride, _1{}));
  Tensor tdKgdK = thr_dk.partition_C(gdK);
  Tensor tdVgdV = thr_dv.partition_C(gdV);
  Tensor tdKcdK = thr_dk.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  Tensor tdVcdV = thr_dv.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDimV>>{}));
  CUTLASS_PRAGMA_UNROLL
  for (int i = 0; i < size(tdKrdK); i += 2) {
    if (get<0>(tdKcdK(i)) < valid_n) {
      *reinterpret_cast<uint32_t*>(&tdKgdK(i)) = pack2<Element>(tdKrdK(i) * p.scale, tdKrdK(i + 1) * p.scale);
    }
  }
  CUTLASS_PRAGMA_UNROLL
  for (int i = 0; i < size(tdVrdV); i += 2) {
    if (get<0>(tdVcdV(i)) < valid_n) {
      *reinterpret_cast<uint32_t*>(&tdVgdV(i)) = pack2<Element>(tdVrdV(i), tdVrdV(i + 1));
    }
  }
}

}  // namespace fa3::sm90_bwd

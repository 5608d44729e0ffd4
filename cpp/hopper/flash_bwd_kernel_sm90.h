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
// Configuration: flash_bwd_traits_sm90.h; dQ writer and dK/dV store helpers: flash_bwd_epilogue_sm90.h.
#pragma once

#include <cuda_fp16.h>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>
#include <cutlass/pipeline/pipeline.hpp>

#include "flash_bwd_epilogue_sm90.h"
#include "flash_bwd_traits_sm90.h"
#include "named_barrier.h"
#include "segments_sm90.h"
#include "utils.h"

namespace fa3::sm90_bwd {

using namespace cute;

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
  // Grid y numbers (kv head, part) slots: the CTA's query heads first_head() .. + group / split - 1.
  // Only Tr::kGroupSplit kernels split (bwd_group_split): a constant 1 keeps part out of the
  // others' registers (the segment-id kernel spilled 4 bytes at hdim 128, hdim 64 ran 2-4% slower).
  const int split = Tr::kGroupSplit ? p.group_split : 1;
  const int part = hkv % split;
  hkv /= split;
  // The first query head, computed in each warp role where it is used: held from here, it
  // reordered the hdim 64 kernels' code and they ran 2-3% slower (see BwdMainParams::group_split).
  auto first_head = [&] { return hkv * p.group + part * (p.group / split); };
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
  if constexpr (Tr::kSegments) {
    const sm90::SegmentRanges r = __ldg(p.seg.ranges + int64_t(b) * p.seg.num_k_blocks + n_block);
    if (!p.deterministic) {
      m_lo = max(m_lo, r.x);
      m_hi = min(m_hi, r.y);
    }
  }
  const int num_m = max(m_hi - m_lo, 0);
  // Step `it` covers query head first_head() + it / num_m and query block m_lo + it % num_m.
  const int n_iter = num_m * (p.group / split);

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
    // ---- producer: warp 0 runs the load loop, its thread 0 issues every TMA (none at all when no
    // query block is visible). The whole warp walks the loop, not thread 0 alone: its counters and
    // TMA coordinates are then warp-uniform and live in uniform registers, outside the 24 of the
    // producer (thread 0 alone spilled 4 bytes at hdim 192, and 96 with softcap, one reload a step;
    // the whole warp: 0, ptxas of session 10).
    cutlass::arch::warpgroup_reg_dealloc<Tr::kProducerRegs>();
    const int warp = cutlass::canonical_warp_idx_sync();
    const bool issuer = threadIdx.x == 0;  // the pipelines' leader (pipe_params.is_leader)
    if (warp == 0 && n_iter > 0) {
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
      if (issuer) {
        ss.barrier_kv.arrive_and_expect_tx(Tr::kTxBytesKV);
        auto* kv_bar = reinterpret_cast<cutlass::arch::ClusterTransactionBarrier::ValueType*>(&ss.barrier_kv);
        copy(args.tma_k.with(*kv_bar, 0), tKgK, tKsK);
        copy(args.tma_v.with(*kv_bar, 0), tVgV, tVsV);
      }

      Tensor mQ = args.tma_q.get_tma_tensor(make_shape(p.seqlen_q, kHeadDim, p.heads_q, p.batch));
      Tensor mdO = args.tma_do.get_tma_tensor(make_shape(p.seqlen_q, kHeadDimV, p.heads_q, p.batch));
      auto state = cutlass::make_producer_start_state<Pipeline>();
      // Query head and block of step it (it / num_m, it % num_m) as counters, not a division per
      // step in the 24-register producer.
      int h = first_head(), m_block = m_lo;
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
        pipeline_q.producer_acquire(state);  // the issuer also arms the stage's barrier (kTxBytesQ)
        if (issuer) {
          auto* bar_q = pipeline_q.producer_get_barrier(state);
          copy(args.tma_q.with(*bar_q, 0), tQgQ, tQsQ(_, stage));
          bulk_load_g2s(ss.lse.data() + stage * kBlockM, p.lse_log2 + row, kBlockM * sizeof(float), bar_q);
        }
        pipeline_do.producer_acquire(state);  // kTxBytesdO
        if (issuer) {
          auto* bar_do = pipeline_do.producer_get_barrier(state);
          copy(args.tma_do.with(*bar_do, 0), tdOgdO, tdOsdO(_, stage));
          bulk_load_g2s(ss.dpsum.data() + stage * kBlockM, p.dpsum + row, kBlockM * sizeof(float), bar_do);
        }
        ++state;
        if (++m_block == m_lo + num_m) {
          m_block = m_lo;
          ++h;
        }
      }
    } else if constexpr (Tr::kDqBulk) {
      if (warp == 1 && n_iter > 0) store_dq<Tr>(p, ss, b, first_head(), n_block, m_lo, num_m, n_iter, q_row0, diag_lo);
    }
    return;
  }

  // ---- consumers ------------------------------------------------------------------------------
  cutlass::arch::warpgroup_reg_alloc<Tr::kConsumerRegs>();
  const int tid = threadIdx.x - cutlass::NumThreadsPerWarpGroup;  // 0 .. kMmaThreads-1
  const int wg = warp_group - 1;

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
    const int h = first_head() + it / num_m;
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
    sm90::wgmma_gemm<true, -1>(mma_s, tSrK, tSrQ(_, _, _, stage), tSrS);
    pipeline_do.consumer_wait(state);
    sm90::wgmma_gemm<true, -1>(mma_dp, tdPrV, tdPrdO(_, _, _, stage), tdPrdP);

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
    if constexpr (Tr::kSegments) {
      // Query blocks [r.z, r.w) hold only this key block's one id: no id compare there. Read per
      // step (an L1 hit): kept from before the loop, hdim 64 spilled the pair (8 bytes).
      const int2 u = __ldg(reinterpret_cast<const int2*>(p.seg.ranges + int64_t(b) * p.seg.num_k_blocks + n_block) + 1);
      seg_mask = m_block < u.x || m_block >= u.y;
    }
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
          const float t0 = sm90::fast_tanh(tSrS(i) * p.scale_div_softcap);
          const float t1 = sm90::fast_tanh(tSrS(i + 1) * p.scale_div_softcap);
          dtanh2[i / 2] = pack2<cutlass::half_t>(1.f - t0 * t0, 1.f - t1 * t1);
          float pv[2] = {sm90::fast_exp2(t0 * p.softcap_log2 - lse0), sm90::fast_exp2(t1 * p.softcap_log2 - lse1)};
          if (need_mask) {
            CUTLASS_PRAGMA_UNROLL
            for (int j = 0; j < 2; ++j) pv[j] = masked(i + j) ? 0.f : pv[j];
          }
          tSrS(i) = pv[0];
          tSrS(i + 1) = pv[1];
        } else {
          tSrS(i) = sm90::fast_exp2(tSrS(i) * p.scale_log2 - lse0);
          tSrS(i + 1) = sm90::fast_exp2(tSrS(i + 1) * p.scale_log2 - lse1);
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
    // This thread's dS^T addresses: at hdim 64 from a fresh read of the thread index, as tScS
    // above (kept from before the loop, the base address spilled: 8 bytes, session 10).
    Tensor tdSsdS_cur = [&] {
      if constexpr (kHeadDim <= 64) {
        return mma_s.get_thread_slice(fresh_thread_idx() - cutlass::NumThreadsPerWarpGroup)
            .partition_C(sdSt)(_, _, _, ds_stage);
      } else {
        return tdSsdS(_, _, _, ds_stage);
      }
    }();
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
      sm90::wgmma_gemm<false, -1>(mma_dv, make_tensor(rP.data(), sm90::acc_as_a_operand(tSrS.layout())), tdVrdO(_, _, _, stage), tdVrdV);
    }
    // Generic-proxy stores must be fenced before WGMMA (async proxy) reads them.
    cutlass::arch::fence_view_async_shared();
    sm90::named_barrier_sync(kMmaThreads, sm90::BwdNamedBarrier::PdSWritten);

    Tensor tdQrdQ = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
    sm90::wgmma_gemm<true, -1>(mma_dq, tdQrdS(_, _, _, ds_stage), tdQrK, tdQrdQ);
    if constexpr (Tr::kDkvRS) {
      sm90::wgmma_gemm<false, -1>(mma_dk, make_tensor(rdS.data(), sm90::acc_as_a_operand(tdPrdP.layout())), tdKrQ(_, _, _, stage), tdKrdK);
      warpgroup_wait<1>();  // dV and dQ done; dK keeps the tensor cores busy during the dQ store
      pipeline_do.consumer_release(state);  // dO and dpsum of this stage are no longer read
    } else {
      sm90::wgmma_gemm<false, -1>(mma_dv, wg_dv.partition_fragment_A(sPt), tdVrdO(_, _, _, stage), tdVrdV);
      sm90::wgmma_gemm<false, -1>(mma_dk, wg_dk.partition_fragment_A(sdSt(_, _, 0)), tdKrQ(_, _, _, stage), tdKrdK);
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
  store_dk_dv<Tr>(p, ss, tdKrdK, tdVrdV, mma_dk, mma_dv, tid, b, hkv, part, offset_k, n0, n_end - n0, wg, n_iter);
}

}  // namespace fa3::sm90_bwd

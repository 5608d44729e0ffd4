// fa3_jax Hopper backward, step 2 of 3: the main kernel (FlashAttention-3 structure).
//
// One CTA per (key block n, kv head, batch). K and V of the block stay in shared memory and dK, dV
// in registers for the whole CTA; the CTA walks the query blocks that the band mask leaves visible,
// for every query head of its GQA group, so dK/dV of a kv head are summed without a temporary.
// Per query block (Q, dO, lse_log2, dpsum double-buffered with cp.async, one block ahead):
//   S^T  = K Q^T                  (WGMMA SS, M = keys)          P^T = exp2(S^T*scale*log2e - lse)
//   dP^T = V dO^T                 (WGMMA SS)                     dS^T = P^T * (dP^T - dpsum) [*dtanh]
//   P^T, dS^T -> shared memory (16-bit)
//   dQ   = dS K                   (WGMMA SS, fresh accumulator) -> float2 atomics into dq_accum
//   dV  += P^T dO,  dK += dS^T Q  (WGMMA SS, register accumulators)
// Why transposed (S^T rather than S): a warpgroup's accumulator rows are then keys, which is the
// M dimension of the dK/dV products, so P^T/dS^T written by a thread are read back by its own
// warpgroup when the warpgroups split keys (hdim <= 128).
// Deterministic mode orders the dQ atomics of the key blocks of one (query block, head) with a
// semaphore: key block n adds only after blocks n_lo..n-1 have added, so the float sums are
// bit-identical run to run.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/cutlass.h>
#include <cutlass/gemm/collective/builders/sm90_common.inl>
#include <cutlass/numeric_types.h>

#include "flash_bwd_tile_size_sm90.h"

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
  int seqlen_q, seqlen_k, seqlen_q_pad, heads_q, heads_kv, group, sem_per_head;
  int diag_lo, diag_hi;   // clamped to [-(seqlen_q + 1), seqlen_k + 1] by the host
  float scale;            // softmax_scale (applied to dK here, to dQ in the postprocess)
  float scale_log2;       // softmax_scale * log2(e)
  float softcap_log2;     // softcap * log2(e)
  float scale_div_softcap;
  bool deterministic;
};

// Named barriers (id 0 is __syncthreads). NamedBarrier adds CUTLASS's reserved count to these.
enum class BwdBarrier : uint32_t {
  kPdSWritten = 0,  // both warpgroups wrote P^T and dS^T to shared memory
  kDqOrderWG0 = 1,  // deterministic mode: the warpgroup's turn to add dQ (WG1 uses +1)
};

template <int kHeadDim_, int kHeadDimV_, class Element_, bool kHasSoftcap_>
struct BwdTraitsSm90 {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kHeadDimV = kHeadDimV_;
  static constexpr bool kHasSoftcap = kHasSoftcap_;
  static constexpr BwdTileSize kTile = bwd_tile_size_sm90(kHeadDim, kHeadDimV);
  static constexpr int kBlockM = kTile.block_m;
  static constexpr int kBlockN = kTile.block_n;
  static constexpr int kNumMmaWG = 2;
  static constexpr int kNumThreads = kNumMmaWG * cutlass::NumThreadsPerWarpGroup;
  static constexpr int kStages = 2;
  // Warpgroups split keys (M of S^T, dK, dV) when the key block is 64 per warpgroup; otherwise
  // they split queries for S^T/dP^T and the head dim for dK/dV.
  static constexpr bool kSplitKeys = kBlockN == 64 * kNumMmaWG;
  static constexpr int kDkvSplit = kSplitKeys ? 1 : kNumMmaWG;
  static_assert(kSplitKeys || kBlockN == 64, "key block must be 64 per warpgroup or 64 in all");
  static_assert(kBlockM == 64, "the dQ product is one 64-row M tile split over warpgroups along d");
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
  // dK += dS^T Q, dV += P^T dO: M = keys, N = head dim, K = queries; A K-major, B MN-major.
  using TiledMmadK = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim / kDkvSplit>, Int<kBlockM>>,
                           GMMA::Major::K, GMMA::Major::MN>(),
      AtomLayoutSdP{}));
  using TiledMmadV = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kHeadDimV / kDkvSplit>, Int<kBlockM>>,
                           GMMA::Major::K, GMMA::Major::MN>(),
      AtomLayoutSdP{}));
  // dQ = dS K: M = queries, N = head dim (split over warpgroups), K = keys; both MN-major.
  using TiledMmadQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim / kNumMmaWG>, Int<kBlockN>>,
                           GMMA::Major::MN, GMMA::Major::MN>(),
      AtomLayoutSplitN{}));

  // Swizzle atoms: Q/dO are read K-major (S^T, dP^T) and MN-major with N = d / kDkvSplit per
  // warpgroup (dK, dV), so their atom width must divide that slice; likewise K for dQ's d / 2.
  using SmemAtomQ = decltype(cutlass::gemm::collective::detail::ss_smem_selector<
                             GMMA::Major::K, Element, Int<kBlockM>, Int<kHeadDim / kDkvSplit>>());
  using SmemAtomdO = decltype(cutlass::gemm::collective::detail::ss_smem_selector<
                              GMMA::Major::K, Element, Int<kBlockM>, Int<kHeadDimV / kDkvSplit>>());
  using SmemAtomK = decltype(cutlass::gemm::collective::detail::ss_smem_selector<
                             GMMA::Major::K, Element, Int<kBlockN>, Int<kHeadDim / kNumMmaWG>>());
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

  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cosize_v<SmemLayoutV>, 1024> v;
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cosize_v<SmemLayoutdO>, 1024> dout;
    cute::array_aligned<Element, cosize_v<SmemLayoutPdS>, 1024> p;
    cute::array_aligned<Element, cosize_v<SmemLayoutPdS>, 1024> ds;
    cute::array_aligned<float, kBlockM * kStages, 16> lse;
    cute::array_aligned<float, kBlockM * kStages, 16> dpsum;
  };
  // +1024: the dynamic shared memory base is rounded up to the 1024-byte swizzle alignment.
  static constexpr int kSmemBytes = int(sizeof(SharedStorage)) + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "shared memory over the sm_90 per-block limit");
};

// ---- small device helpers -----------------------------------------------------------------------

// Issue one batch of WGMMAs C (+)= A B over the K mode, committed as one group (not waited on).
template <bool kZeroInit, class TiledMma, class TA, class TB, class TC>
__device__ __forceinline__ void wgmma_gemm(TiledMma& mma, TA const& a, TB const& b, TC& c) {
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

// cp.async a (rows, cols) tile, 16 bytes per instruction; rows >= valid_rows are zero-filled so
// padded queries/keys contribute finite zeros.
template <int kThreads, int kRows, int kCols, class Element, class SmemTensor>
__device__ __forceinline__ void cp_async_tile(SmemTensor&& s, const Element* g, int64_t row_stride,
                                              int valid_rows, int tid) {
  constexpr int kChunksPerRow = kCols * int(sizeof(Element)) / 16;
  constexpr int kElemsPerChunk = 16 / int(sizeof(Element));
  static_assert(kRows * kChunksPerRow % kThreads == 0, "tile must split evenly over threads");
  CUTLASS_PRAGMA_UNROLL
  for (int c = tid; c < kRows * kChunksPerRow; c += kThreads) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * kElemsPerChunk;
    const bool ok = r < valid_rows;
    const Element* src = g + (ok ? int64_t(r) * row_stride + col : 0);
    const uint32_t dst = cast_smem_ptr_to_uint(&s(r, col));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0));
  }
}

__device__ __forceinline__ int ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void red_release_add(int* p, int v) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// ---- the kernel ---------------------------------------------------------------------------------

template <class Tr>
__global__ void __launch_bounds__(Tr::kNumThreads, 1) flash_bwd_kernel_sm90(const __grid_constant__ BwdMainParams p) {
  using Element = typename Tr::Element;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN;
  constexpr int kHeadDim = Tr::kHeadDim, kHeadDimV = Tr::kHeadDimV;
  constexpr int kThreads = Tr::kNumThreads;

  extern __shared__ char smem_raw[];
  auto& ss = *reinterpret_cast<typename Tr::SharedStorage*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));

  const int tid = threadIdx.x;
  const int wg = __shfl_sync(0xffffffffu, tid / cutlass::NumThreadsPerWarpGroup, 0);
  const int n_block = blockIdx.x, hkv = blockIdx.y, b = blockIdx.z;
  const int n0 = n_block * kBlockN;
  const int seqlen_q = p.seqlen_q, seqlen_k = p.seqlen_k;

  // Query blocks with at least one visible (query, key) pair for this key block:
  // m0 <= n_end - 1 - diag_lo and min(m0 + kBlockM, seqlen_q) - 1 >= n0 - diag_hi.
  const int n_end = min(n0 + kBlockN, seqlen_k);
  const int hi_num = n_end - 1 - p.diag_lo;
  const int m_hi = hi_num < 0 ? 0 : min((seqlen_q + kBlockM - 1) / kBlockM, hi_num / kBlockM + 1);
  const int lo_num = n0 - p.diag_hi;
  const int m_lo = lo_num <= 0 ? 0 : (lo_num > seqlen_q - 1 ? m_hi : lo_num / kBlockM);
  const int num_m = max(m_hi - m_lo, 0);
  const int n_iter = num_m * p.group;

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQ{});        // (M, d, STAGE)
  Tensor sQt = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQt{});      // (d, M, STAGE)
  Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), typename Tr::SmemLayoutdO{});   // (M, dv, STAGE)
  Tensor sdOt = make_tensor(make_smem_ptr(ss.dout.data()), typename Tr::SmemLayoutdOt{}); // (dv, M, STAGE)
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutK{});        // (N, d)
  Tensor sKt = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutKt{});      // (d, N)
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Tr::SmemLayoutV{});        // (N, dv)
  Tensor sP = make_tensor(make_smem_ptr(ss.p.data()), typename Tr::SmemLayoutPdS{});      // (M, N)
  Tensor sPt = make_tensor(make_smem_ptr(ss.p.data()), typename Tr::SmemLayoutPdSt{});    // (N, M)
  Tensor sdS = make_tensor(make_smem_ptr(ss.ds.data()), typename Tr::SmemLayoutPdS{});    // (M, N)
  Tensor sdSt = make_tensor(make_smem_ptr(ss.ds.data()), typename Tr::SmemLayoutPdSt{});  // (N, M)
  (void)sP;

  const Element* gq = static_cast<const Element*>(p.q);
  const Element* gk = static_cast<const Element*>(p.k);
  const Element* gv = static_cast<const Element*>(p.v);
  const Element* gdo = static_cast<const Element*>(p.dout);
  const int64_t q_row_stride = int64_t(p.heads_q) * kHeadDim;
  const int64_t do_row_stride = int64_t(p.heads_q) * kHeadDimV;
  const int64_t k_row_stride = int64_t(p.heads_kv) * kHeadDim;
  const int64_t v_row_stride = int64_t(p.heads_kv) * kHeadDimV;

  // Iteration it covers query head hkv * group + it / num_m and query block m_lo + it % num_m.
  auto load_q_do = [&](int it, int stage) {
    const int h = hkv * p.group + it / num_m;
    const int m0 = (m_lo + it % num_m) * kBlockM;
    const int valid = min(kBlockM, seqlen_q - m0);
    cp_async_tile<kThreads, kBlockM, kHeadDim>(sQ(_, _, stage),
        gq + ((int64_t(b) * seqlen_q + m0) * p.heads_q + h) * kHeadDim, q_row_stride, valid, tid);
    cp_async_tile<kThreads, kBlockM, kHeadDimV>(sdO(_, _, stage),
        gdo + ((int64_t(b) * seqlen_q + m0) * p.heads_q + h) * kHeadDimV, do_row_stride, valid, tid);
    // lse_log2 / dpsum rows are padded to seqlen_q_pad, so a whole block is always readable.
    const int64_t row = (int64_t(b) * p.heads_q + h) * p.seqlen_q_pad + m0;
    constexpr int kVec = kBlockM / 4;
    if (tid < 2 * kVec) {
      const int c = tid % kVec;
      const float* src = (tid < kVec ? p.lse_log2 : p.dpsum) + row + 4 * c;
      float* dst = (tid < kVec ? ss.lse.data() : ss.dpsum.data()) + stage * kBlockM + 4 * c;
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(cast_smem_ptr_to_uint(dst)), "l"(src));
    }
  };

  cp_async_tile<kThreads, kBlockN, kHeadDim>(sK, gk + ((int64_t(b) * seqlen_k + n0) * p.heads_kv + hkv) * kHeadDim,
                                             k_row_stride, n_end - n0, tid);
  cp_async_tile<kThreads, kBlockN, kHeadDimV>(sV, gv + ((int64_t(b) * seqlen_k + n0) * p.heads_kv + hkv) * kHeadDimV,
                                              v_row_stride, n_end - n0, tid);
  if (n_iter > 0) load_q_do(0, 0);
  cp_async_fence();

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
  Tensor tdVrP = wg_dv.partition_fragment_A(sPt);
  Tensor tdVrdO = wg_dv.partition_fragment_B(sdOt);
  Tensor tdKrdS = wg_dk.partition_fragment_A(sdSt);
  Tensor tdKrQ = wg_dk.partition_fragment_B(sQt);
  Tensor tdQrdS = wg_dq.partition_fragment_A(sdS);
  Tensor tdQrK = wg_dq.partition_fragment_B(sKt);

  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_dk = mma_dk.get_thread_slice(tid);
  auto thr_dv = mma_dv.get_thread_slice(tid);
  auto thr_dq = mma_dq.get_thread_slice(tid);
  Tensor tdKrdK = partition_fragment_C(mma_dk, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor tdVrdV = partition_fragment_C(mma_dv, Shape<Int<kBlockN>, Int<kHeadDimV>>{});
  clear(tdKrdK);
  clear(tdVrdV);

  Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{}));  // (key, query)
  Tensor tPsP = thr_s.partition_C(sPt);
  Tensor tdSsdS = thr_s.partition_C(sdSt);

  CUTLASS_PRAGMA_NO_UNROLL
  for (int it = 0; it < n_iter; ++it) {
    const int stage = it & 1;
    // This step's Q/dO have landed, and every thread finished the previous step (so its stage,
    // P and dS buffers may be overwritten).
    cp_async_wait<0>();
    cutlass::arch::fence_view_async_shared();
    __syncthreads();
    if (it + 1 < n_iter) load_q_do(it + 1, stage ^ 1);
    cp_async_fence();

    const int h = hkv * p.group + it / num_m;
    const int m_block = m_lo + it % num_m;
    const int m0 = m_block * kBlockM;

    Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kBlockN>, Int<kBlockM>>{});
    Tensor tdPrdP = partition_fragment_C(mma_dp, Shape<Int<kBlockN>, Int<kBlockM>>{});
    wgmma_gemm<true>(mma_s, tSrK, tSrQ(_, _, _, stage), tSrS);
    wgmma_gemm<true>(mma_dp, tdPrV, tdPrdO(_, _, _, stage), tdPrdP);

    const float* s_lse = ss.lse.data() + stage * kBlockM;
    const float* s_dpsum = ss.dpsum.data() + stage * kBlockM;
    // Blocks entirely inside the band and inside seqlen_k need no per-element mask (rows past
    // seqlen_q have lse_log2 = +inf, so their P is 0 without one).
    const bool need_mask = !(n0 + kBlockN <= seqlen_k && n0 - (m0 + kBlockM - 1) >= p.diag_lo &&
                             n0 + kBlockN - 1 - m0 <= p.diag_hi);
    Tensor dtanh = make_fragment_like(tSrS);
    warpgroup_wait<1>();
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tSrS); ++i) {
      const int kn = get<0>(tScS(i)), qm = get<1>(tScS(i));
      float x;
      if constexpr (Tr::kHasSoftcap) {
        const float t = tanh_approx(tSrS(i) * p.scale_div_softcap);
        dtanh(i) = 1.f - t * t;
        x = t * p.softcap_log2;
      } else {
        x = tSrS(i) * p.scale_log2;
      }
      float pv = exp2_approx(x - s_lse[qm]);
      if (need_mask) {
        const int diag = (n0 + kn) - (m0 + qm);
        const bool visible = n0 + kn < seqlen_k && diag >= p.diag_lo && diag <= p.diag_hi;
        pv = visible ? pv : 0.f;
      }
      tSrS(i) = pv;
    }
    warpgroup_wait<0>();
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tdPrdP); ++i) {
      float ds = tSrS(i) * (tdPrdP(i) - s_dpsum[get<1>(tScS(i))]);
      if constexpr (Tr::kHasSoftcap) ds *= dtanh(i);
      tdPrdP(i) = ds;
    }
    // Accumulator values 2k, 2k+1 are adjacent queries, adjacent in sPt/sdSt: one 32-bit store.
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tSrS); i += 2) {
      *reinterpret_cast<uint32_t*>(&tPsP(i)) = pack2<Element>(tSrS(i), tSrS(i + 1));
      *reinterpret_cast<uint32_t*>(&tdSsdS(i)) = pack2<Element>(tdPrdP(i), tdPrdP(i + 1));
    }
    // Generic-proxy stores must be fenced before WGMMA (async proxy) reads them.
    cutlass::arch::fence_view_async_shared();
    cutlass::arch::NamedBarrier::sync(kThreads, static_cast<uint32_t>(BwdBarrier::kPdSWritten));

    Tensor tdQrdQ = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
    wgmma_gemm<true>(mma_dq, tdQrdS, tdQrK, tdQrdQ);
    wgmma_gemm<false>(mma_dv, tdVrP, tdVrdO(_, _, _, stage), tdVrdV);
    wgmma_gemm<false>(mma_dk, tdKrdS, tdKrQ(_, _, _, stage), tdKrdK);
    warpgroup_wait<2>();  // dQ done; dV and dK keep the tensor cores busy during the atomics

    float* dq_rows = p.dq_accum + ((int64_t(b) * p.heads_q + h) * p.seqlen_q_pad + m0) * kHeadDim;
    Tensor gdQ = make_tensor(make_gmem_ptr(dq_rows), Shape<Int<kBlockM>, Int<kHeadDim>>{},
                             Stride<Int<kHeadDim>, _1>{});
    Tensor tdQgdQ = thr_dq.partition_C(gdQ);
    int* sem = p.semaphores + (int64_t(b) * p.heads_q + h) * p.sem_per_head + m_block;
    const uint32_t order_barrier = static_cast<uint32_t>(BwdBarrier::kDqOrderWG0) + wg;
    if (p.deterministic) {
      // Key blocks n_lo(m) .. n-1 each add once per warpgroup before this block adds. ">=", not
      // "==": the other warpgroup of this CTA may already have counted its own add.
      const int n_lo = max(0, m0 + p.diag_lo) / kBlockN;
      const int turn = Tr::kNumMmaWG * (n_block - n_lo);
      if (tid % cutlass::NumThreadsPerWarpGroup == 0) {
        while (ld_acquire(sem) < turn) {}
      }
      cutlass::arch::NamedBarrier::sync(cutlass::NumThreadsPerWarpGroup, order_barrier);
    }
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tdQrdQ); i += 2) {
      atomicAdd(reinterpret_cast<float2*>(&tdQgdQ(i)), make_float2(tdQrdQ(i), tdQrdQ(i + 1)));
    }
    if (p.deterministic) {
      __threadfence();
      cutlass::arch::NamedBarrier::sync(cutlass::NumThreadsPerWarpGroup, order_barrier);
      if (tid % cutlass::NumThreadsPerWarpGroup == 0) red_release_add(sem, 1);
    }
    warpgroup_wait<0>();
  }

  // Epilogue: dK * softmax_scale and dV, straight from registers (rows past seqlen_k dropped).
  const int valid_n = n_end - n0;
  Element* gdk = static_cast<Element*>(p.dk) + ((int64_t(b) * seqlen_k + n0) * p.heads_kv + hkv) * kHeadDim;
  Element* gdv = static_cast<Element*>(p.dv) + ((int64_t(b) * seqlen_k + n0) * p.heads_kv + hkv) * kHeadDimV;
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

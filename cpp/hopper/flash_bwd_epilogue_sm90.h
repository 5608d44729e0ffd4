// fa3_jax Hopper backward: the main kernel's output side (flash_bwd_kernel_sm90.h).
//
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

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "flash_bwd_traits_sm90.h"
#include "named_barrier.h"

namespace fa3::sm90_bwd {

using namespace cute;

template <class Element>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  union { Element e[2]; uint32_t u; } r;
  r.e[0] = Element(a);
  r.e[1] = Element(b);
  return r.u;
}

// threadIdx.x, read anew: not merged with earlier thread-index arithmetic by the compiler.
__device__ __forceinline__ int fresh_thread_idx() {
  uint32_t t;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
  return int(t);
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

// The dQ writer (warp 1 of the producer warpgroup): per step, waits until each consumer warpgroup
// has stored its dQ tile in shared memory (dQFull), adds it to dq_accum with one bulk reduce-add,
// and hands the buffer back (dQEmpty) once the bulk copy has read it. The first dQEmpty arrival
// marks the buffers empty, so a consumer only waits when the add of its previous tile is still
// reading shared memory: one step of slack. No arrival follows the last step (no one waits on it).
// q_row0: plane row of the sequence's first query block (0 when dense); diag_lo: its band.
template <class Tr>
__device__ __forceinline__ void store_dq(const BwdMainParams& p, typename Tr::SharedStorage& ss, int b, int h0,
                                         int n_block, int m_lo, int num_m, int n_iter, int q_row0,
                                         int diag_lo) {
  constexpr int kNumMmaWG = Tr::kNumMmaWG;
  constexpr int kRounds = Tr::kDqRounds;
  constexpr int kBarThreads = cutlass::NumThreadsPerWarpGroup + cutlass::NumThreadsPerWarp;
  constexpr uint32_t kSlotBytes = Tr::kDqSlotFloats * sizeof(float);
  const bool lane0 = cute::elect_one_sync();
  for (int w = 0; w < kNumMmaWG; ++w) sm90::named_barrier_arrive(kBarThreads, sm90::bwd_dq_empty(w));
  int h = h0, m_block = m_lo;
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

// f(i, r, c, x, y) for each pair of adjacent columns (c, c + 1) of row r that thread `thread` of
// `mma` holds in its (kRows x kCols) accumulator `acc`, at acc(i) and acc(i + 1): x and y are
// their values times `scale`.
template <int kRows, int kCols, class Acc, class Mma, class F>
__device__ __forceinline__ void for_each_acc_pair(Acc const& acc, Mma const& mma, int thread, float scale, F&& f) {
  Tensor coord = mma.get_thread_slice(thread).partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kCols>>{}));
  CUTLASS_PRAGMA_UNROLL
  for (int i = 0; i < size(acc); i += 2) f(i, get<0>(coord(i)), get<1>(coord(i)), acc(i) * scale, acc(i + 1) * scale);
}

// The epilogue of a CTA: dK * softmax_scale and dV of its key block (valid_n rows; rows past
// seqlen_k dropped) from the consumers' accumulators to global memory. Called by the consumer
// warpgroups only (warpgroup wg of them); n_iter > 0 when the CTA ran any step.
template <class Tr, class TensorDK, class TensorDV, class MmaDK, class MmaDV>
__device__ __forceinline__ void store_dk_dv(const BwdMainParams& p, typename Tr::SharedStorage& ss,
                                            TensorDK const& tdKrdK, TensorDV const& tdVrdV, MmaDK const& mma_dk,
                                            MmaDV const& mma_dv, int tid, int b, int hkv, int part, int offset_k,
                                            int n0, int valid_n, int wg, int n_iter) {
  using Element = typename Tr::Element;
  constexpr int kBlockN = Tr::kBlockN, kHeadDim = Tr::kHeadDim, kHeadDimV = Tr::kHeadDimV;
  constexpr int kMmaThreads = Tr::kNumMmaThreads;
  const int64_t k_row_stride = int64_t(p.heads_kv) * kHeadDim;
  const int64_t v_row_stride = int64_t(p.heads_kv) * kHeadDimV;
  const int64_t k_row = int64_t(b) * p.seqlen_k + offset_k + n0;
  Element* gdk = static_cast<Element*>(p.dk) + (k_row * p.heads_kv + hkv) * kHeadDim;
  Element* gdv = static_cast<Element*>(p.dv) + (k_row * p.heads_kv + hkv) * kHeadDimV;
  if (Tr::kGroupSplit && p.group_split > 1) {
    // GQA group split: this part's float32 partials (dK scaled), summed by flash_bwd_dkv_reduce.
    constexpr int kCols = kHeadDim + kHeadDimV;
    float* gp = p.dkv_partial + ((int64_t(part) * p.batch * p.seqlen_k + k_row) * p.heads_kv + hkv) * kCols;
    const int64_t row_stride = int64_t(p.heads_kv) * kCols;
    const int etid = fresh_thread_idx() - cutlass::NumThreadsPerWarpGroup;
    for_each_acc_pair<kBlockN, kHeadDim>(tdKrdK, mma_dk, etid, p.scale, [&](int, int r, int c, float x, float y) {
      if (r < valid_n) *reinterpret_cast<float2*>(gp + r * row_stride + c) = make_float2(x, y);
    });
    for_each_acc_pair<kBlockN, kHeadDimV>(tdVrdV, mma_dv, etid, 1.f, [&](int, int r, int c, float x, float y) {
      if (r < valid_n) *reinterpret_cast<float2*>(gp + r * row_stride + kHeadDim + c) = make_float2(x, y);
    });
    return;
  }
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
    for_each_acc_pair<kBlockN, kHeadDim>(tdKrdK, mma_dk, etid, p.scale, [&](int, int r, int c, float x, float y) {
      *reinterpret_cast<uint32_t*>(sdk + staged_offset<kHeadDim>(r, c)) = pack2<Element>(x, y);
    });
    for_each_acc_pair<kBlockN, kHeadDimV>(tdVrdV, mma_dv, etid, 1.f, [&](int, int r, int c, float x, float y) {
      *reinterpret_cast<uint32_t*>(sdv + staged_offset<kHeadDimV>(r, c)) = pack2<Element>(x, y);
    });
    sm90::named_barrier_sync(kMmaThreads, sm90::BwdNamedBarrier::PdSWritten);
    store_staged_rows<kHeadDim>(gdk, k_row_stride, sdk, valid_n, etid, kMmaThreads);
    store_staged_rows<kHeadDimV>(gdv, v_row_stride, sdv, valid_n, etid, kMmaThreads);
    return;
  }
  // Straight from registers: the pairs' addresses from the accumulator partition of dK / dV
  // (per-pair products of the row and the 64-bit row stride took 35% more instructions at hdim 96).
  Tensor tdKgdK = mma_dk.get_thread_slice(tid).partition_C(
      make_tensor(make_gmem_ptr(gdk), Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_stride(k_row_stride, _1{})));
  Tensor tdVgdV = mma_dv.get_thread_slice(tid).partition_C(
      make_tensor(make_gmem_ptr(gdv), Shape<Int<kBlockN>, Int<kHeadDimV>>{}, make_stride(v_row_stride, _1{})));
  for_each_acc_pair<kBlockN, kHeadDim>(tdKrdK, mma_dk, tid, p.scale, [&](int i, int r, int, float x, float y) {
    if (r < valid_n) *reinterpret_cast<uint32_t*>(&tdKgdK(i)) = pack2<Element>(x, y);
  });
  for_each_acc_pair<kBlockN, kHeadDimV>(tdVrdV, mma_dv, tid, 1.f, [&](int i, int r, int, float x, float y) {
    if (r < valid_n) *reinterpret_cast<uint32_t*>(&tdVgdV(i)) = pack2<Element>(x, y);
  });
}

}  // namespace fa3::sm90_bwd

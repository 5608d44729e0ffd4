// fa3_jax Hopper forward kernel: owns the shared-memory layout, the pipelines, the
// producer / consumer warpgroup split and the persistent tile loop; composes FwdMainloop and
// FwdEpilogue.
//
// 384 threads: warpgroup 0 produces (one thread issues every TMA, the rest of the warpgroup
// only gives its registers back), warpgroups 1 and 2 consume 64 query rows each.
#pragma once

#include <cutlass/arch/reg_reconfig.h>

#include "flash_fwd_epilogue_sm90.h"
#include "flash_fwd_mainloop_sm90.h"

namespace fa3::sm90 {

template <class Traits>
__global__ void __launch_bounds__(Traits::kNumThreads, 1)
    flash_fwd_kernel_sm90(CUTE_GRID_CONSTANT typename Traits::Params const p) {
  using Mainloop = FwdMainloop<Traits>;
  using Epilogue = FwdEpilogue<Traits>;
  using SharedStorage = typename Traits::SharedStorage;
  using PipelineK = typename Traits::PipelineK;
  using PipelineV = typename Traits::PipelineV;
  using PipelineState = typename Traits::PipelineState;

  extern __shared__ char smem_raw[];
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw);

  int const warp_idx = cutlass::canonical_warp_idx_sync();
  int const warp_group = cutlass::canonical_warp_group_idx();

  if (threadIdx.x == 0) {
    cute::prefetch_tma_descriptor(p.tma_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_v.get_tma_descriptor());
    ss.q_full.init(1);
    ss.q_empty.init(Traits::kNumMmaThreads);
    for (int i = 0; i < 2; ++i) {
      ss.tile_full[i].init(1);
      ss.tile_empty[i].init(Traits::kNumMmaThreads);
    }
  }

  typename PipelineK::Params pipe_params;
  pipe_params.role = warp_group == 0 ? PipelineK::ThreadCategory::Producer
                                     : PipelineK::ThreadCategory::Consumer;
  pipe_params.is_leader = threadIdx.x == 0;
  pipe_params.num_consumers = Traits::kNumMmaThreads;
  pipe_params.transaction_bytes = Traits::kBytesK;
  PipelineK pipe_k(ss.pipe_k, pipe_params, Shape<_1, _1, _1>{});
  pipe_params.transaction_bytes = Traits::kBytesV;
  PipelineV pipe_v(ss.pipe_v, pipe_params, Shape<_1, _1, _1>{});
  __syncthreads();  // barrier initialisation visible to every warp

  TileSchedulerParams const& sched = p.sched;
  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (warp_idx == 0 && threadIdx.x == 0) {
      PipelineState write = cutlass::make_producer_start_state<PipelineK>();
      int q_tile_count = 0, slot = 0;
      uint32_t phase = 0;
      for (int tile = blockIdx.x;; tile = next_tile(p.tile_counter, tile)) {
        // Publish the tile (num_tiles or more means "done") through a 2-deep ring.
        ss.tile_empty[slot].wait(phase ^ 1);
        ss.tile_ids[slot] = tile;
        ss.tile_full[slot].arrive();
        if (++slot == 2) slot = 0, phase ^= 1;
        if (tile >= sched.num_tiles) break;
        TileCoord const t = decode_tile(sched, tile);
        int n_min, n_max;
        p.mask.n_block_range(t.m_block, n_min, n_max);
        if (n_max <= n_min) continue;
        Mainloop::load(p, ss, pipe_k, pipe_v, write, q_tile_count, t, n_min, n_max);
        ++q_tile_count;
      }
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
    int const mma_tidx = threadIdx.x - 128;
    // Warpgroup 0 issues first: warpgroup 1 opens its barrier once up front.
    if (mma_tidx >= 128) named_barrier_arrive(Traits::kNumMmaThreads, FwdNamedBarrier::WarpSchedulerWG0);

    typename Traits::TiledMmaPV mma_pv;
    Tensor tOrO = partition_fragment_C(mma_pv, select<0, 1>(typename Traits::TileShapePV{}));
    PipelineState read;
    int q_tile_count = 0, slot = 0;
    uint32_t phase = 0;
    while (true) {
      ss.tile_full[slot].wait(phase);
      int const tile = ss.tile_ids[slot];
      ss.tile_empty[slot].arrive();
      if (++slot == 2) slot = 0, phase ^= 1;
      if (tile >= sched.num_tiles) break;
      TileCoord const t = decode_tile(sched, tile);
      int n_min, n_max;
      p.mask.n_block_range(t.m_block, n_min, n_max);
      if (n_max <= n_min) {
        Epilogue::store_empty(p, t, mma_tidx);
        continue;
      }
      cute::array<float, 2> lse;
      Mainloop::mma(p, ss, pipe_k, pipe_v, read, q_tile_count, t, n_min, n_max, mma_tidx, tOrO,
                    lse);
      Epilogue::store(p, tOrO, lse, t, mma_tidx);
      ++q_tile_count;
    }
    // Absorb warpgroup 1's last arrive so that no named barrier is left half-arrived.
    if (mma_tidx < 128) named_barrier_sync(Traits::kNumMmaThreads, FwdNamedBarrier::WarpSchedulerWG0);
  }
}

}  // namespace fa3::sm90

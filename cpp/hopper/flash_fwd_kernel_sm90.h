// fa3_jax Hopper forward kernel: owns the shared-memory layout, the pipelines, the
// producer / consumer warpgroup split and the persistent tile loop; composes FwdMainloop and
// FwdEpilogue.
//
// 384 or 512 threads: warpgroup 0 produces (one thread issues every TMA, or with kProducerWarp
// warp 0 runs the producer, lanes issuing a paged block's boxes, and with Params::v_warp warp 2
// loads V, with Params::k_warp warp 3 half of K's boxes; one thread of warp 1 runs the tile
// scheduler; FP8 with kVtInKernel warps 2-3 transpose V tiles; the rest only give their
// registers back), warpgroups 1 .. block_m / 64 consume 64
// query rows each.
#pragma once

#include <cutlass/arch/reg_reconfig.h>

#include "flash_fwd_epilogue_sm90.h"
#include "flash_fwd_mainloop_sm90.h"

namespace fa3::sm90 {

template <class Traits>
__global__ void __launch_bounds__(Traits::kNumThreads, Traits::kCtasPerSm)
    flash_fwd_kernel_sm90(CUTE_GRID_CONSTANT typename Traits::Params const p) {
  using Mainloop = FwdMainloop<Traits>;
  using Epilogue = FwdEpilogue<Traits>;
  using SharedStorage = typename Traits::SharedStorage;
  using PipelineK = typename Traits::PipelineK;
  using PipelineV = typename Traits::PipelineV;
  using PipelineState = typename Traits::PipelineState;

  extern __shared__ char smem_raw[];
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw);

  int const warp_group = cutlass::canonical_warp_group_idx();
  // Split-KV on a paged cache read in 16-row boxes: warp 2 loads V, warp 0 Q and K (with
  // k_warp, warp 0 Q and the lower half of K's boxes, warp 3 the upper half).
  bool const v_warp = Traits::kSplit && p.v_warp;
  bool const k_warp = Traits::kPagedKWarp && p.v_warp && p.k_warp;

  if (threadIdx.x == 0) {
    cute::prefetch_tma_descriptor(p.tma_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_v.get_tma_descriptor());
    if constexpr (Traits::kTmaStoreO) cute::prefetch_tma_descriptor(p.tma_o.get_tma_descriptor());
    for (int i = 0; i < Traits::kQStages; ++i) {
      ss.q_full[i].init(1);
      ss.q_empty[i].init(Traits::kNumMmaThreads);
    }
    ss.o_free.init(Traits::kNumMmaWarpGroups);
    for (int i = 0; i < 2; ++i) {
      ss.tile_full[i].init(1);
      // consumers + the TMA thread (+ the V warp's leader, + the K warp's)
      ss.tile_empty[i].init(Traits::kNumMmaThreads + 1 + int(v_warp) + int(k_warp));
    }
    ss.tile_want.init(1);
    if constexpr (Traits::kVtInKernel) {
      for (int i = 0; i < Traits::kStages; ++i) {
        ss.v_load_full[i].init(1);
        ss.v_load_empty[i].init(1);
        ss.v_done[i].init(1);
      }
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
  pipe_params.is_leader = threadIdx.x == (v_warp ? 64 : 0);
  PipelineV pipe_v(ss.pipe_v, pipe_params, Shape<_1, _1, _1>{});
  __syncthreads();  // barrier initialisation visible to every warp

  TileSchedulerParams const& sched = p.sched;
  // Ring entry seq's coordinates (ss.tile_coords), read from shared memory each time they are
  // needed: volatile, so that the epilogue's read is a load and not a register held across the
  // mainloop.
  // FP8 decodes the tile id itself, as before the ring existed: with the ring its hdim 128
  // kernel lost 3.6-6.2% at 4k-16k (bench_attention --fp8, 2 runs each in one call, 2026-11-23,
  // benchmarks/measured/h200_2026-11-23s12_fp8_ab.txt), where tile starts are rare.
  auto tile_coord = [&](uint32_t seq, int tile) {
    if constexpr (Traits::kFp8) {
      return decode_tile(sched, tile);
    } else {
      int const volatile* c = reinterpret_cast<int const volatile*>(&ss.tile_coords[seq & 3]);
      return TileCoord{c[0], c[1], c[2], c[3]};
    }
  };
  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (threadIdx.x == 32) {
      // Scheduler thread (warp 1): claims tiles and publishes them (num_tiles or more means
      // "done") through a 2-deep ring to the TMA thread and the consumers. Kept apart from the
      // TMA thread, whose 24-40 registers it would otherwise push into spills. With
      // sched.claim_on_demand a tile is claimed only when the TMA thread asks for it (tile_want:
      // it has issued every load of the tile before), not as soon as a ring slot is free, which
      // claims two tiles ahead of the consumers (tile_scheduler.h, "Claiming").
      // It also decodes each tile's coordinates (three integer divisions): done by the consumers
      // and the TMA thread at every tile start, and again by the consumers for the epilogue, the
      // divisions' dependent chains sat between each tile's last P V and the next tile's first S
      // (tile_size.h, "Tile boundaries").
      for (uint32_t seq = 0, tile = blockIdx.x;; ++seq) {  // ring slot seq % 2, phase (seq / 2) % 2
        if (seq > 0) {
          if (sched.claim_on_demand) ss.tile_want.wait((seq - 1) & 1);
          tile = next_tile(p.tile_counter, int(tile));
        }
        // (FP8 decodes in its readers instead: tile_coord.) Unused past num_tiles.
        TileCoord const t = Traits::kFp8 ? TileCoord{} : decode_tile(sched, int(tile));
        ss.tile_empty[seq & 1].wait(((seq >> 1) & 1) ^ 1);
        ss.tile_ids[seq & 1] = int(tile);
        if constexpr (!Traits::kFp8) ss.tile_coords[seq & 3] = t;
        ss.tile_full[seq & 1].arrive();
        if (int(tile) >= sched.num_tiles) break;
      }
    } else if (Traits::kProducerWarp ? threadIdx.x < 32 || (v_warp && threadIdx.x / 32 == 2) ||
                                           (k_warp && threadIdx.x / 32 == 3)
                                     : threadIdx.x == 0) {
      // (Without kPagedKWarp, main's two-way choice: the hdim 256 producer's spills depend on it.)
      int const role = !v_warp                                         ? Mainloop::kLoadAll
                       : threadIdx.x < 32                              ? Mainloop::kLoadQK
                       : !Traits::kPagedKWarp || threadIdx.x / 32 == 2 ? Mainloop::kLoadV
                                                                       : Mainloop::kLoadKHi;
      // The TMA thread (thread 0), or with kProducerWarp warp 0, thread 0 its leader (and with
      // v_warp warp 2, thread 64 its leader, for V; with k_warp warp 3, upper K boxes).
      PipelineState write = cutlass::make_producer_start_state<PipelineK>();
      int q_tile_count = 0;
      for (uint32_t seq = 0;; ++seq) {
        // Done with tile seq - 1: the next one, please. One arrive, the leader's: the barrier
        // counts one, and with kProducerWarp every lane runs this loop. (The merged tree's split
        // kernel, with all 32 lanes arriving, failed every launch on an H200 ("unspecified launch
        // failure"); with this line the GPU suite passes.)
        if (seq > 0 && threadIdx.x == 0 && sched.claim_on_demand) ss.tile_want.arrive();
        ss.tile_full[seq & 1].wait((seq >> 1) & 1);
        int const tile = ss.tile_ids[seq & 1];
        if constexpr (Traits::kProducerWarp) __syncwarp();  // every lane has read the slot
        if (threadIdx.x % 32 == 0) ss.tile_empty[seq & 1].arrive();
        if (tile >= sched.num_tiles) {
          if constexpr (Traits::kVtInKernel) Mainloop::finish_v(ss, write);
          break;
        }
        TileCoord t = tile_coord(seq, tile);
        typename Traits::Mask mask;
        int offset_q, offset_k;
        if (!p.locate(t, mask, offset_q, offset_k)) continue;
        int n_min, n_max;
        mask.n_block_range(t.m_block, n_min, n_max);
        split_n_range(sched, t, n_min, n_max);
        if (n_max <= n_min) continue;
        Mainloop::load(p, ss, pipe_k, pipe_v, write, q_tile_count, t, offset_q, offset_k, n_min,
                       n_max, role);
        ++q_tile_count;
      }
    } else if (threadIdx.x >= 64) {
      if constexpr (Traits::kVtInKernel) Mainloop::transpose_v(ss, threadIdx.x - 64);  // warps 2-3
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
    int const mma_tidx = threadIdx.x - 128;
    // Pingpong: warpgroup 0 issues first, so the last warpgroup (which signals it from then on)
    // opens its barrier once up front.
    if (Traits::kPingpong && mma_tidx / 128 == Traits::kNumMmaWarpGroups - 1)
      named_barrier_arrive(2 * 128, FwdNamedBarrier::WarpSchedulerWG0);

    typename Traits::TiledMmaPV mma_pv;
    Tensor tOrO = partition_fragment_C(mma_pv, select<0, 1>(typename Traits::TileShapePV{}));
    PipelineState read;
    int q_tile_count = 0;
    // The tile whose O waits in tOrO for its epilogue (Traits::kDeferEpilogue), by its ring
    // entry and tile id (FP8 decodes from the id): tile_coords[seq & 3] stays valid while the
    // next tile runs, as entry seq + 4 is written only after every reader has taken entry
    // seq + 2, and every path stores the pending tile before it takes another entry.
    bool pending = false;
    uint32_t pending_seq = 0;
    int pending_tile = 0;
    cute::array<float, 2> pending_lse;
    auto store_pending = [&] {
      if (!pending) return;
      pending = false;
      TileCoord tp = tile_coord(pending_seq, pending_tile);
      typename Traits::Mask pm;
      int oq, ok;
      p.locate(tp, pm, oq, ok);
      Epilogue::store(p, ss, tOrO, pending_lse, tp, Traits::kLocated ? pm : p.mask, oq,
                      mma_tidx);
    };
    for (uint32_t seq = 0;; ++seq) {
      ss.tile_full[seq & 1].wait((seq >> 1) & 1);
      int const tile = ss.tile_ids[seq & 1];
      ss.tile_empty[seq & 1].arrive();
      if (tile >= sched.num_tiles) break;
      TileCoord t = tile_coord(seq, tile);
      typename Traits::Mask seq_mask;
      int offset_q, offset_k;
      if (!p.locate(t, seq_mask, offset_q, offset_k)) {
        if constexpr (Traits::kDeferEpilogue) store_pending();  // its ring entry stays valid
        continue;
      }
      // Dense: the band straight from the kernel parameters, as before varlen existed; a register
      // copy of it held across the mainloop cost the dense kernel 2-4% (H200, hdim 64, 1k-2k).
      typename Traits::Mask const& mask = Traits::kLocated ? seq_mask : p.mask;
      int n_min, n_max;
      mask.n_block_range(t.m_block, n_min, n_max);
      split_n_range(sched, t, n_min, n_max);
      if (n_max <= n_min) {
        if constexpr (Traits::kDeferEpilogue) store_pending();  // its ring entry stays valid
        Epilogue::store_empty(p, t, mask, offset_q, mma_tidx);
        continue;
      }
      cute::array<float, 2> lse;
      if constexpr (Traits::kDeferEpilogue) {
        Mainloop::mma(p, ss, pipe_k, pipe_v, read, q_tile_count, t, mask, n_min, n_max,
                      mma_tidx, tOrO, lse, store_pending);
        ++q_tile_count;
        pending = true;
        pending_seq = seq;
        pending_tile = int(tile);
        pending_lse = lse;
        continue;
      }
      Mainloop::mma(p, ss, pipe_k, pipe_v, read, q_tile_count, t, mask, n_min, n_max,
                    mma_tidx, tOrO, lse, [] {});
      // Read and located again rather than kept: at head dim 256 the consumers' 240 registers
      // hold the O accumulator, and tile coordinates live across the mainloop spilled there.
      t = tile_coord(seq, tile);
      p.locate(t, seq_mask, offset_q, offset_k);
      Epilogue::store(p, ss, tOrO, lse, t, mask, offset_q, mma_tidx);
      ++q_tile_count;
    }
    if constexpr (Traits::kDeferEpilogue) store_pending();
    // The last TMA store of O must have read shared memory before the CTA exits.
    if constexpr (Traits::kTmaStoreO) {
      if (mma_tidx % 128 == 0) tma_store_wait<0>();
    }
    // Absorb the last warpgroup's last arrive so that no named barrier is left half-arrived.
    if (Traits::kPingpong && mma_tidx < 128)
      named_barrier_sync(2 * 128, FwdNamedBarrier::WarpSchedulerWG0);
  }
}

}  // namespace fa3::sm90

// fa3_jax Hopper: named-barrier ids of the forward and backward kernels, in one place.
//
// Ids are relative to cutlass::arch::NamedBarrier, which adds its reserved count (8), so they
// never collide with __syncthreads (id 0) or CUTLASS's own barriers; the hardware has 16, so each
// kernel may use ids 0..7.
#pragma once

#include <cutlass/arch/barrier.h>

namespace fa3::sm90 {

enum class FwdNamedBarrier : uint32_t {
  // Pingpong between the consumer warpgroups (two or three): warpgroup w waits on
  // WarpSchedulerWG0 + w before issuing its WGMMAs and then signals the next one (w + 1, the
  // last signals warpgroup 0), so that one warpgroup's softmax overlaps the others' tensor-core
  // work. Each barrier joins two warpgroups (256 threads): the signalling and the waiting one.
  WarpSchedulerWG0 = 0,
  WarpSchedulerWG1 = 1,
  WarpSchedulerWG2 = 2,
  // The epilogue's O tile in shared memory, per consumer warpgroup (128 threads): free to
  // overwrite (its previous TMA store has read it), then written and fenced for the TMA store.
  EpilogueWG0 = 3,
  EpilogueWG1 = 4,
  EpilogueWG2 = 5,
  // Every consumer warpgroup is past its last P V WGMMA of the tile, so O may overwrite the V
  // ring (kOAliasesV).
  EpilogueAll = 6,
  // FP8 with the V transpose in the kernel: the two transposing producer warps (64 threads) have
  // all written (and fenced) their part of a V tile.
  TransposeV = 7,
};
static_assert(static_cast<uint32_t>(FwdNamedBarrier::TransposeV) < 8, "8 named barriers per kernel");

// Barrier ids of consumer warpgroup wg (0, 1, 2).
CUTLASS_DEVICE FwdNamedBarrier fwd_scheduler_barrier(int wg) {
  return static_cast<FwdNamedBarrier>(static_cast<uint32_t>(FwdNamedBarrier::WarpSchedulerWG0) + wg);
}
CUTLASS_DEVICE FwdNamedBarrier fwd_epilogue_barrier(int wg) {
  return static_cast<FwdNamedBarrier>(static_cast<uint32_t>(FwdNamedBarrier::EpilogueWG0) + wg);
}

enum class BwdNamedBarrier : uint32_t {
  PdSWritten = 0,  // both consumer warpgroups wrote P^T and dS^T to shared memory
  PdSFree = 1,     // single-buffered P/dS: both consumers finished reading the previous step's
  // dQ through shared memory, per consumer warpgroup (consumer warpgroup + dQ writer warp):
  dQFullWG0 = 2,   // the warpgroup stored its dQ tile (WG1: +1)
  dQEmptyWG0 = 4,  // the writer's bulk add has read it; the buffer may be overwritten (WG1: +1)
  // dQ through float4 atomics in deterministic mode, per consumer warpgroup (128 threads):
  dQOrderWG0 = 6,  // the warpgroup's turn to add dQ (WG1: +1)
  // dQ half through the Q stage (kDqInStages, bulk path only, so the atomic path's ids are free):
  dQStageFullWG0 = 6,  // the warpgroup stored half of its dQ tile in its Q half (WG1: +1)
};
static_assert(static_cast<uint32_t>(BwdNamedBarrier::dQOrderWG0) + 1 < 8, "8 named barriers per kernel");

CUTLASS_DEVICE BwdNamedBarrier bwd_dq_full(int wg) {
  return static_cast<BwdNamedBarrier>(static_cast<uint32_t>(BwdNamedBarrier::dQFullWG0) + wg);
}
CUTLASS_DEVICE BwdNamedBarrier bwd_dq_empty(int wg) {
  return static_cast<BwdNamedBarrier>(static_cast<uint32_t>(BwdNamedBarrier::dQEmptyWG0) + wg);
}
CUTLASS_DEVICE BwdNamedBarrier bwd_dq_stage_full(int wg) {
  return static_cast<BwdNamedBarrier>(static_cast<uint32_t>(BwdNamedBarrier::dQStageFullWG0) + wg);
}
CUTLASS_DEVICE BwdNamedBarrier bwd_dq_order(int wg) {
  return static_cast<BwdNamedBarrier>(static_cast<uint32_t>(BwdNamedBarrier::dQOrderWG0) + wg);
}

CUTLASS_DEVICE void named_barrier_sync(uint32_t num_threads, FwdNamedBarrier id) {
  cutlass::arch::NamedBarrier::sync(num_threads, static_cast<uint32_t>(id));
}
CUTLASS_DEVICE void named_barrier_arrive(uint32_t num_threads, FwdNamedBarrier id) {
  cutlass::arch::NamedBarrier::arrive(num_threads, static_cast<uint32_t>(id));
}
CUTLASS_DEVICE void named_barrier_sync(uint32_t num_threads, BwdNamedBarrier id) {
  cutlass::arch::NamedBarrier::sync(num_threads, static_cast<uint32_t>(id));
}
CUTLASS_DEVICE void named_barrier_arrive(uint32_t num_threads, BwdNamedBarrier id) {
  cutlass::arch::NamedBarrier::arrive(num_threads, static_cast<uint32_t>(id));
}

}  // namespace fa3::sm90

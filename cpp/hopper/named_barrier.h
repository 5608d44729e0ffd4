// fa3_jax Hopper: named-barrier ids used by the forward kernel, in one place.
//
// Ids are relative to cutlass::arch::NamedBarrier, which adds its reserved count (8), so they
// never collide with __syncthreads (id 0) or CUTLASS's own barriers.
#pragma once

#include <cutlass/arch/barrier.h>

namespace fa3::sm90 {

enum class FwdNamedBarrier : uint32_t {
  // Pingpong between the two consumer warpgroups: warpgroup w waits on WarpSchedulerWG0 + w
  // before issuing its WGMMAs and then signals the other one, so that one warpgroup's softmax
  // overlaps the other's tensor-core work.
  WarpSchedulerWG0 = 0,
  WarpSchedulerWG1 = 1,
};

CUTLASS_DEVICE void named_barrier_sync(uint32_t num_threads, FwdNamedBarrier id) {
  cutlass::arch::NamedBarrier::sync(num_threads, static_cast<uint32_t>(id));
}

CUTLASS_DEVICE void named_barrier_arrive(uint32_t num_threads, FwdNamedBarrier id) {
  cutlass::arch::NamedBarrier::arrive(num_threads, static_cast<uint32_t>(id));
}

}  // namespace fa3::sm90

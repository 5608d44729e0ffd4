// fa3_jax Hopper: segment ids (flash.h: key j is visible to query i only if
// q_segment_ids[b][i] == kv_segment_ids[b][j] != 0, on top of the band), shared by the forward
// and backward.
//
// The ids live on the device and the host never reads them, so two small kernels run ahead of
// the attention kernel on the same stream, on the attention kernel's own tiles (block_m query
// rows, block_n keys), and write into the call's workspace:
//  - segment_block_stats: per (batch row, block) of either side, the smallest and largest
//    nonzero id and the block's "uniform" id: the id every row of the block has when that is one
//    and the same nonzero id, else 0; and the block's runs when it holds at most two (a document
//    boundary inside the block, the usual case for packed documents: SegmentRuns), so that the
//    attention kernels mask such blocks by comparing row indices, with no id load per element;
//  - segment_ranges: per (batch row, block) of the tile side (query blocks in the forward, key
//    blocks in the backward), two ranges of the other side's blocks:
//     * the hull [first, last) of the blocks whose nonzero-id interval meets this block's.
//       Blocks outside it hold no visible pair, so the attention kernel does not visit them (it
//       also intersects the hull with the band's range). For sorted ids (packed documents) the
//       hull is exact; for interleaved ids it is conservative, which costs time, not exactness;
//     * the uniform range [ufirst, ulast): blocks uniform with this block's own uniform id,
//       when those form one contiguous run (as in packed documents), else empty. Only block
//       pairs inside it skip the element-wise id compare (SegmentBandMask in mask.h), so the
//       kernels decide "mask or not" from registers, without a load per block.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace fa3::sm90 {

// Per block: x = smallest nonzero id, y = largest (x > y: no nonzero id), z = uniform id (0:
// mixed, or some row has id 0).
using SegmentStat = int4;

// Per block: its rows' ids when they form at most two runs: x = the first row's id, y = the last
// row's, z = the first row of the second run relative to the block (the block's row count when
// there is one run), w = 1; w = 0 when there are more runs (the kernels then load the ids).
// Rows past the sequence's end are not in the block: the kernels mask them by position.
using SegmentRuns = int4;

// The id of block-relative row `r` from its block's runs (runs.w != 0).
__device__ __forceinline__ int segment_run_id(SegmentRuns const& runs, int r) {
  return r < runs.z ? runs.x : runs.y;
}

// Per block of the tile side: the other side's blocks, x = first, y = last (the hull), z =
// ufirst, w = ulast (the uniform range); both half-open.
using SegmentRanges = int4;

// What a tile needs: the caller's ids and the prepare kernels' output for its batch row.
struct SegmentParams {
  const int32_t* q_ids = nullptr;  // [batch, seqlen_q]
  const int32_t* k_ids = nullptr;  // [batch, seqlen_k]
  const SegmentRanges* ranges = nullptr;  // [batch, num blocks of the tile side]
  const SegmentRuns* q_runs = nullptr;    // [batch, num_q_blocks]
  const SegmentRuns* k_runs = nullptr;    // [batch, num_k_blocks]
  int num_q_blocks = 0, num_k_blocks = 0;
};

struct SegmentPrepParams {
  const int32_t* q_ids = nullptr;
  const int32_t* k_ids = nullptr;
  SegmentStat* q_stats = nullptr;
  SegmentStat* k_stats = nullptr;
  SegmentRuns* q_runs = nullptr;
  SegmentRuns* k_runs = nullptr;
  SegmentRanges* ranges = nullptr;
  int batch = 0, seqlen_q = 0, seqlen_k = 0;
  int block_m = 0, block_n = 0;  // the attention kernel's tile
  bool by_keys = false;          // ranges per key block (backward), else per query block
};

inline constexpr int kSegmentPrepThreads = 128;

// grid (max(num_q_blocks, num_k_blocks), batch): CTA x reduces query block x and key block x.
// Static: every .cu that includes this header gets its own copy (no duplicate symbols at link).
static __global__ void __launch_bounds__(kSegmentPrepThreads)
    segment_block_stats(SegmentPrepParams const p) {
  __shared__ int s_red[5][kSegmentPrepThreads / 32];
  int const b = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int side = 0; side < 2; ++side) {
    int const len = side == 0 ? p.seqlen_q : p.seqlen_k;
    int const block = side == 0 ? p.block_m : p.block_n;
    int const nblocks = (len + block - 1) / block;
    if (int(blockIdx.x) >= nblocks) continue;  // uniform across the CTA
    int32_t const* ids = (side == 0 ? p.q_ids : p.k_ids) + int64_t(b) * len;
    int const r0 = blockIdx.x * block, r1 = min(r0 + block, len);
    // Run boundaries: rows whose id differs from the row before (within the block).
    int lo = INT_MAX, hi = INT_MIN, zero = 0, changes = 0, first_change = INT_MAX;
    for (int r = r0 + threadIdx.x; r < r1; r += kSegmentPrepThreads) {
      int const id = ids[r];
      if (id == 0) {
        zero = 1;
      } else {
        lo = min(lo, id);
        hi = max(hi, id);
      }
      if (r > r0 && id != ids[r - 1]) {
        ++changes;
        first_change = min(first_change, r - r0);
      }
    }
    lo = __reduce_min_sync(0xffffffffu, lo);
    hi = __reduce_max_sync(0xffffffffu, hi);
    zero = __reduce_or_sync(0xffffffffu, unsigned(zero));
    changes = __reduce_add_sync(0xffffffffu, changes);
    first_change = __reduce_min_sync(0xffffffffu, first_change);
    if (lane == 0) {
      s_red[0][warp] = lo;
      s_red[1][warp] = hi;
      s_red[2][warp] = zero;
      s_red[3][warp] = changes;
      s_red[4][warp] = first_change;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < kSegmentPrepThreads / 32; ++w) {
        lo = min(lo, s_red[0][w]);
        hi = max(hi, s_red[1][w]);
        zero |= s_red[2][w];
        changes += s_red[3][w];
        first_change = min(first_change, s_red[4][w]);
      }
      int64_t const at = int64_t(b) * nblocks + blockIdx.x;
      (side == 0 ? p.q_stats : p.k_stats)[at] = make_int4(lo, hi, !zero && lo == hi ? lo : 0, 0);
      (side == 0 ? p.q_runs : p.k_runs)[at] =
          changes <= 1 ? make_int4(ids[r0], ids[r1 - 1], changes ? first_change : r1 - r0, 1)
                       : make_int4(0, 0, 0, 0);
    }
    __syncthreads();  // s_red is reused by the other side
  }
}

// grid (ceil(row blocks / warps per CTA), batch): one warp per block of the tile side, its lanes
// striding over the other side's blocks.
static __global__ void __launch_bounds__(kSegmentPrepThreads)
    segment_ranges(SegmentPrepParams const p) {
  int const b = blockIdx.y, lane = threadIdx.x % 32;
  int const nq = (p.seqlen_q + p.block_m - 1) / p.block_m;
  int const nk = (p.seqlen_k + p.block_n - 1) / p.block_n;
  int const nrows = p.by_keys ? nk : nq, ncols = p.by_keys ? nq : nk;
  int const row = blockIdx.x * (kSegmentPrepThreads / 32) + threadIdx.x / 32;
  if (row >= nrows) return;
  SegmentStat const* rows = (p.by_keys ? p.k_stats : p.q_stats) + int64_t(b) * nrows;
  SegmentStat const* cols = (p.by_keys ? p.q_stats : p.k_stats) + int64_t(b) * ncols;
  int4 const r = rows[row];
  int first = INT_MAX, last = -1, ufirst = INT_MAX, ulast = -1, uniform = 0;
  if (r.x <= r.y) {
    for (int c = lane; c < ncols; c += 32) {
      int4 const s = cols[c];
      if (s.x <= r.y && s.y >= r.x) {  // the nonzero-id intervals meet (empty ones never do)
        first = min(first, c);
        last = max(last, c);
      }
      if (r.z != 0 && s.z == r.z) {  // both blocks hold this one id only
        ufirst = min(ufirst, c);
        ulast = max(ulast, c);
        ++uniform;
      }
    }
  }
  first = __reduce_min_sync(0xffffffffu, first);
  last = __reduce_max_sync(0xffffffffu, last);
  ufirst = __reduce_min_sync(0xffffffffu, ufirst);
  ulast = __reduce_max_sync(0xffffffffu, ulast);
  uniform = __reduce_add_sync(0xffffffffu, uniform);
  // A run with gaps (interleaved ids) becomes empty: every block there is masked element-wise.
  bool const run = ulast >= 0 && uniform == ulast - ufirst + 1;
  if (lane == 0)
    p.ranges[int64_t(b) * nrows + row] = make_int4(last < 0 ? 0 : first, last + 1,
                                                   run ? ufirst : 0, run ? ulast + 1 : 0);
}

// Bytes of the stats, runs and ranges in a workspace (each part 256-byte aligned).
inline size_t segment_workspace_bytes(int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                                      int block_m, int block_n) {
  auto align = [](size_t n) { return (n + 255) / 256 * 256; };
  int64_t const nq = (seqlen_q + block_m - 1) / block_m, nk = (seqlen_k + block_n - 1) / block_n;
  return 2 * align(size_t(batch * nq) * sizeof(SegmentStat)) +  // stats and runs
         2 * align(size_t(batch * nk) * sizeof(SegmentStat)) +
         align(size_t(batch * (nq > nk ? nq : nk)) * sizeof(SegmentRanges));
}

// Host side: carves the stats, runs and ranges out of `workspace` (segment_workspace_bytes of it),
// launches both prepare kernels on `stream` and fills `out` for the attention kernel; false if
// a launch failed.
static inline bool launch_segment_prepare(SegmentPrepParams p, void* workspace,
                                          cudaStream_t stream, SegmentParams& out) {
  auto align = [](size_t n) { return (n + 255) / 256 * 256; };
  int const nq = (p.seqlen_q + p.block_m - 1) / p.block_m;
  int const nk = (p.seqlen_k + p.block_n - 1) / p.block_n;
  char* ws = static_cast<char*>(workspace);
  p.q_stats = reinterpret_cast<SegmentStat*>(ws);
  ws += align(size_t(p.batch) * nq * sizeof(SegmentStat));
  p.k_stats = reinterpret_cast<SegmentStat*>(ws);
  ws += align(size_t(p.batch) * nk * sizeof(SegmentStat));
  p.q_runs = reinterpret_cast<SegmentRuns*>(ws);
  ws += align(size_t(p.batch) * nq * sizeof(SegmentRuns));
  p.k_runs = reinterpret_cast<SegmentRuns*>(ws);
  ws += align(size_t(p.batch) * nk * sizeof(SegmentRuns));
  p.ranges = reinterpret_cast<SegmentRanges*>(ws);
  out = {p.q_ids, p.k_ids, p.ranges, p.q_runs, p.k_runs, nq, nk};
  if (p.batch == 0 || nq == 0 || nk == 0) return true;
  constexpr int kWarps = kSegmentPrepThreads / 32;
  segment_block_stats<<<dim3(unsigned(nq > nk ? nq : nk), unsigned(p.batch)),
                        kSegmentPrepThreads, 0, stream>>>(p);
  int const nrows = p.by_keys ? nk : nq;
  segment_ranges<<<dim3(unsigned((nrows + kWarps - 1) / kWarps), unsigned(p.batch)),
                   kSegmentPrepThreads, 0, stream>>>(p);
  return cudaPeekAtLastError() == cudaSuccess;
}

}  // namespace fa3::sm90

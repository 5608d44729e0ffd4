// fa3_jax Hopper FP8 forward: V transposed into the layout the e4m3 P @ V WGMMA reads.
// Head dims 64 and 256 only: at 128 the attention kernel transposes V itself, in shared memory
// (tile_size.h, fwd_fp8_transpose_v_in_kernel; FwdMainloop::transpose_v writes this same layout).
//
// The e4m3 WGMMA takes both operands K-major, and for P @ V the K dimension is the keys, so the
// forward's TMA reads vt [batch, heads_kv, head_dim_v, sk16] (sk16 = seqlen_k rounded up to 16,
// zeros past seqlen_k), which this kernel writes into the forward's workspace from the usual v
// [batch, seqlen_k, heads_kv, head_dim_v] before the attention kernel runs. Within each aligned
// group of 16 keys, vt position i holds key kVtKeyOrder[i]: the order in which the attention
// kernel's threads hold the probabilities P (utils.h, convert_p_to_e4m3), so that P needs no
// shuffle between lanes.
//
// One thread per (batch, kv head, group of 16 keys, 4 columns): 16 four-byte loads (one per key
// of the group: its 4 columns), a 4 x 4 byte transpose per 4 keys (__byte_perm), 4 sixteen-byte
// stores (one per column). A warp takes 8 column quads x 4 consecutive groups, so each load
// instruction reads 32 contiguous bytes of a key row per 8 lanes and each store writes 64
// contiguous bytes of a vt row per 4 lanes: whole 32-byte sectors both ways. 32 MB of V (hdim
// 128, 16k tokens) take 18.5 us, against 41.5 us with one byte per load and thread (ncu, H200,
// 2026-11-22, benchmarks/measured/h200_2026-11-22s6f_fp8speed.txt). The kernel replaced the
// same transpose as XLA ops in the lowering (a 7-d uint8 transpose), which took 0.20 ms for 32 MB
// of V (H200, 2026-11-22). Whole call (transpose and attention), hdim 128, 16k tokens, TFLOP/s:
// 317 -> 504 at seqlen 1k, 752 -> 793 at 16k; hdim 256: 343 -> 565, 975 -> 1045
// (benchmarks/measured/h200_2026-11-22_fp8_bench*.txt; one byte per load and thread then).
// The attention kernel then runs as this kernel's programmatic dependent (launch_fwd_plan):
// H200, hdim 128, 3 runs (h200_2026-11-22s9q_fp8_ab.txt), TFLOP/s at 1k / 2k / 4k: full 587 /
// 704 / 791 -> 602 / 720 / 802, causal 390 / 542 / 689 -> 405 / 567 / 696; 8k-16k unchanged.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fa3::sm90 {

// Position i of a group of 16 holds key 2 * (i / 4) + i % 2 + 8 * ((i % 4) / 2) (flash.h, "FP8").
__host__ __device__ constexpr int vt_key_in_group(int i) {
  return 2 * (i / 4) + i % 2 + 8 * ((i % 4) / 2);
}

inline constexpr int kVtThreads = 256;

struct VtParams {
  uint8_t const* v;  // [batch, seqlen_k, heads_kv, head_dim_v] e4m3 bytes
  uint8_t* vt;       // [batch, heads_kv, head_dim_v, sk16]
  int seqlen_k, sk16, heads_kv, head_dim_v;
  int64_t num_threads;  // batch * heads_kv * warps_per_head * 32
  int warps_per_head;   // (head_dim_v / 32) column-quad octets x ceil(sk16 / 64) group quads
};

// Static: every .cu that includes this header gets its own copy (no duplicate symbols at link).
static __global__ void __launch_bounds__(kVtThreads) fp8_transpose_v(VtParams const p) {
  // The attention kernel that reads vt is launched as this grid's programmatic dependent
  // (flash_fwd_launch_template_sm90.h, launch_fwd_plan): its CTAs may start once every CTA here has started, and
  // wait for this grid's completion only before their first V load (FwdMainloop::load).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
  int64_t const idx = int64_t(blockIdx.x) * kVtThreads + threadIdx.x;
  if (idx >= p.num_threads) return;
  int const lane = int(idx % 32);
  int64_t const warp = idx / 32;
  int64_t const bh = warp / p.warps_per_head;  // batch * heads_kv + h
  int const r = int(warp - bh * p.warps_per_head);
  int const octets = p.head_dim_v / 32;
  int const g = 4 * (r / octets) + lane / 8;         // group of 16 keys
  int const d0 = 4 * (8 * (r % octets) + lane % 8);  // first of the thread's 4 columns
  if (g >= p.sk16 / 16) return;
  int64_t const b = bh / p.heads_kv;
  int const h = int(bh - b * p.heads_kv);
  int64_t const key_stride = int64_t(p.heads_kv) * p.head_dim_v;
  uint8_t const* src = p.v + (b * p.seqlen_k * p.heads_kv + h) * p.head_dim_v + d0;
  uint32_t cols[4][4];  // [column c][word w]: bytes = column c of keys 4w .. 4w + 3 (vt order)
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    uint32_t x[4];  // the 4 columns of the keys at vt positions 4w + j
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      int const key = 16 * g + vt_key_in_group(4 * w + j);
      x[j] = key < p.seqlen_k ? *reinterpret_cast<uint32_t const*>(src + key * key_stride) : 0u;
    }
    // 4 x 4 byte transpose: lo = (x0.c, x1.c, ...) pairs, then the column words.
    uint32_t const p01 = __byte_perm(x[0], x[1], 0x5140), q01 = __byte_perm(x[0], x[1], 0x7362);
    uint32_t const p23 = __byte_perm(x[2], x[3], 0x5140), q23 = __byte_perm(x[2], x[3], 0x7362);
    cols[0][w] = __byte_perm(p01, p23, 0x5410);
    cols[1][w] = __byte_perm(p01, p23, 0x7632);
    cols[2][w] = __byte_perm(q01, q23, 0x5410);
    cols[3][w] = __byte_perm(q01, q23, 0x7632);
  }
#pragma unroll
  for (int c = 0; c < 4; ++c)
    *reinterpret_cast<uint4*>(p.vt + (bh * p.head_dim_v + d0 + c) * p.sk16 + 16 * g) =
        make_uint4(cols[c][0], cols[c][1], cols[c][2], cols[c][3]);
}

// Host side: launches fp8_transpose_v on `stream`; false if the launch failed. head_dim_v must be
// a multiple of 32 (the FP8 head dims are 64, 128, 256) and v 4-byte aligned.
static inline bool launch_fp8_transpose_v(VtParams p, int batch, cudaStream_t stream) {
  p.warps_per_head = p.head_dim_v / 32 * ((p.sk16 / 16 + 3) / 4);
  p.num_threads = int64_t(batch) * p.heads_kv * p.warps_per_head * 32;
  if (p.num_threads == 0) return true;
  unsigned const blocks = unsigned((p.num_threads + kVtThreads - 1) / kVtThreads);
  fp8_transpose_v<<<blocks, kVtThreads, 0, stream>>>(p);
  return cudaPeekAtLastError() == cudaSuccess;
}

// Bytes of vt in the forward's workspace.
inline size_t vt_bytes(int64_t batch, int64_t seqlen_k, int64_t heads_kv, int64_t head_dim_v) {
  return size_t(batch * heads_kv * head_dim_v * ((seqlen_k + 15) / 16 * 16));
}

}  // namespace fa3::sm90

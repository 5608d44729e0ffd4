// fa3_jax Hopper FP8 forward: V transposed into the layout the e4m3 P @ V WGMMA reads.
//
// The e4m3 WGMMA takes both operands K-major, and for P @ V the K dimension is the keys, so the
// forward's TMA reads vt [batch, heads_kv, head_dim_v, sk16] (sk16 = seqlen_k rounded up to 16,
// zeros past seqlen_k), which this kernel writes into the forward's workspace from the usual v
// [batch, seqlen_k, heads_kv, head_dim_v] before the attention kernel runs. Within each aligned
// group of 16 keys, vt position i holds key kVtKeyOrder[i]: the order in which the attention
// kernel's threads hold the probabilities P (utils.h, convert_p_to_e4m3), so that P needs no
// shuffle between lanes.
//
// One thread per (batch, kv head, group of 16 keys, column d): 16 byte loads, one 16-byte store.
// A warp covers 32 consecutive columns of one group, so each of its loads reads 32 contiguous
// bytes of one key row. It replaced the same transpose as XLA ops in the lowering (a 7-d uint8
// transpose), which took 0.20 ms for 32 MB of V (H200, 2026-11-22). Whole call (transpose and
// attention), hdim 128, 16k tokens, TFLOP/s: 317 -> 504 at seqlen 1k, 752 -> 793 at 16k; hdim
// 256: 343 -> 565, 975 -> 1045 (benchmarks/measured/h200_2026-11-22_fp8_bench*.txt).
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
  int64_t num_threads;  // batch * heads_kv * (sk16 / 16) * head_dim_v
};

// Static: every .cu that includes this header gets its own copy (no duplicate symbols at link).
static __global__ void __launch_bounds__(kVtThreads) fp8_transpose_v(VtParams const p) {
  int64_t const idx = int64_t(blockIdx.x) * kVtThreads + threadIdx.x;
  if (idx >= p.num_threads) return;
  int const groups = p.sk16 / 16;
  int const d = int(idx % p.head_dim_v);
  int64_t const rest = idx / p.head_dim_v;
  int const g = int(rest % groups);
  int64_t const bh = rest / groups;  // batch * heads_kv + h
  int64_t const b = bh / p.heads_kv;
  int const h = int(bh - b * p.heads_kv);
  int64_t const key_stride = int64_t(p.heads_kv) * p.head_dim_v;
  uint8_t const* src = p.v + (b * p.seqlen_k * p.heads_kv + h) * p.head_dim_v + d;
  uint32_t words[4];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    uint32_t word = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      int const key = 16 * g + vt_key_in_group(4 * w + j);
      uint32_t const byte = key < p.seqlen_k ? src[key * key_stride] : 0u;
      word |= byte << (8 * j);
    }
    words[w] = word;
  }
  *reinterpret_cast<uint4*>(p.vt + (bh * p.head_dim_v + d) * p.sk16 + 16 * g) =
      make_uint4(words[0], words[1], words[2], words[3]);
}

// Host side: launches fp8_transpose_v on `stream`; false if the launch failed.
static inline bool launch_fp8_transpose_v(VtParams p, int batch, cudaStream_t stream) {
  p.num_threads = int64_t(batch) * p.heads_kv * (p.sk16 / 16) * p.head_dim_v;
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

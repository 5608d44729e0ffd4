// fa3_jax Hopper FP8 quantization (cpp/flash.h, "FP8 quantization"): 16-bit or float32 x to
// e4m3 with the random-sign Hadamard transform and block descales, one pass over x.
//
// One CTA per tile: up to kMaxTileRows rows of one (batch, head); each row's head_dim entries
// are spread over kLanesPerRow lanes of a warp, E = head_dim / kLanesPerRow consecutive entries
// per lane. The CTA loads its whole tile into registers as raw input bits (head_dim bytes per
// thread for 16-bit inputs), then transforms each row in registers twice: once for the tile's
// amax, once to quantize with the descale. The input is read from memory once; the second
// transform costs arithmetic, which this memory-bound pass has to spare. The butterfly stages
// h < E run inside a lane, those with h >= E between the lanes of a row (shuffles); they run in
// increasing h, the order of fp8.hadamard_transform, so the floats are bitwise the XLA path's.
//
// Per-block descales (block_rows > 0): the tile is the block, one launch. Per-(batch, kv head)
// descales: tiles of kMaxTileRows rows; a first launch takes each tile's amax into the group's
// slot of the workspace (atomicMax on the bits: amax >= 0, so the float order is the integer
// order, nan above everything), a second one reads the group's amax and quantizes (x read twice,
// as a per-tensor amax needs).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "flash.h"

namespace fa3 {
namespace sm90 {
namespace {

constexpr int kThreads = 256;
constexpr int kLanesPerRow = 8;  // 3 shuffle stages per row; 4 rows per warp
constexpr int kRowSlots = kThreads / kLanesPerRow;
constexpr int kMaxTileRows = 128;  // the largest FP8 forward tile (tile_size.h)
constexpr int kRowsPerThread = kMaxTileRows / kRowSlots;

enum class Pass : int {
  kBlock,       // amax of the tile, its descale, quantize (block_rows > 0)
  kGroupAmax,   // amax of the tile into the group's workspace slot (per-tensor, first launch)
  kGroupQuant,  // quantize with the group's descale (per-tensor, second launch)
};

struct Args {
  const void* x;
  const float* signs;       // [batch, head_dim] or null
  uint8_t* x8;
  float* descale;           // [batch, heads, tiles] or [batch, heads_kv]
  uint32_t* group_amax;     // [batch, heads_kv] amax bits (per-tensor form), zeroed first
  int64_t seqlen;
  int heads, group, tile_rows, tiles;  // tiles per (batch, head)
  float hadamard_scale;
};

template <class T>
struct Input;
template <>
struct Input<float> {
  static __device__ float get(const uint32_t* w, int j) { return __uint_as_float(w[j]); }
};
template <>
struct Input<__nv_bfloat16> {
  static __device__ float get(const uint32_t* w, int j) {
    return __uint_as_float((w[j / 2] >> (16 * (j % 2))) << 16);
  }
};
template <>
struct Input<__half> {
  static __device__ float get(const uint32_t* w, int j) {
    return __half2float(__ushort_as_half(uint16_t(w[j / 2] >> (16 * (j % 2)))));
  }
};

// The sign bit of entry j within its raw 32-bit word (16-bit inputs hold two entries a word).
template <class T>
__device__ __forceinline__ uint32_t sign_bit(int j) {
  return sizeof(T) == 4 ? 0x80000000u : (j % 2 ? 0x80000000u : 0x8000u);
}

// y = the lane's E entries of the transformed row (flash.h), from raw words whose sign bits the
// caller already flipped where signs < 0 (negating a float, bfloat16 or float16 exactly).
// Every lane of the warp must call it (shuffles).
template <class T, int E, bool kHadamard>
__device__ __forceinline__ void transform(const uint32_t* w, float cross_sign[3], float scale,
                                          float (&y)[E]) {
#pragma unroll
  for (int j = 0; j < E; ++j) y[j] = Input<T>::get(w, j);
  if constexpr (kHadamard) {
#pragma unroll
    for (int h = 1; h < E; h *= 2)
#pragma unroll
      for (int j = 0; j < E; ++j)
        if (!(j & h)) {
          const float a = y[j], b = y[j + h];
          y[j] = a + b;
          y[j + h] = a - b;
        }
    // h = m * E: entries i and i + h live in lanes lane and lane ^ m, at the same j. The lower
    // lane computes other + y (= a + b), the upper other - y (= a - b), both as one exact
    // fma(+-1, y, other).
#pragma unroll
    for (int s = 0; s < 3; ++s) {
#pragma unroll
      for (int j = 0; j < E; ++j)
        y[j] = fmaf(cross_sign[s], y[j], __shfl_xor_sync(0xffffffffu, y[j], 1 << s));
    }
#pragma unroll
    for (int j = 0; j < E; ++j) y[j] *= scale;
  }
}

template <class T, int kHeadDim, bool kHadamard, Pass kPass>
__global__ void __launch_bounds__(kThreads) fp8_quantize_kernel(const Args a) {
  static_assert(kLanesPerRow == 8, "transform() runs three shuffle stages");
  constexpr int E = kHeadDim / kLanesPerRow;
  constexpr int kWords = E * int(sizeof(T)) / 4;  // raw 32-bit words per lane per row
  static_assert(kWords % 4 == 0, "a lane's row part is loaded in 16-byte vectors");
  // Up to head_dim 128 the transformed rows stay in registers (E * kRowsPerThread <= 64 floats)
  // between the amax and the quantization; at 256 they are transformed again from the raw bits
  // (128 more registers would leave too few for the rest).
  constexpr bool kKeep = kPass == Pass::kBlock && kHeadDim <= 128;

  const int64_t tile = blockIdx.x;
  const int n = int(tile % a.tiles);
  const int64_t bh = tile / a.tiles;
  const int h = int(bh % a.heads);
  const int64_t b = bh / a.heads;
  const int slot = threadIdx.x / kLanesPerRow, lane = threadIdx.x % kLanesPerRow;
  const int64_t row0 = int64_t(n) * a.tile_rows;
  const int rows = int(min(int64_t(a.tile_rows), a.seqlen - row0));
  const int passes = (rows + kRowSlots - 1) / kRowSlots;  // the same for the whole CTA
  const int64_t row_elems = int64_t(a.heads) * kHeadDim;
  const int64_t first = ((b * a.seqlen + row0) * a.heads + h) * kHeadDim + lane * E;

  uint32_t raw[kRowsPerThread][kWords];
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int row = slot + r * kRowSlots;
    const uint4* src =
        reinterpret_cast<const uint4*>(static_cast<const T*>(a.x) + first + row * row_elems);
#pragma unroll
    for (int v = 0; v < kWords; v += 4) {
      // Rows past the tile's end read as zeros: no effect on the amax.
      const uint4 u = row < rows ? src[v / 4] : make_uint4(0u, 0u, 0u, 0u);
      raw[r][v] = u.x, raw[r][v + 1] = u.y, raw[r][v + 2] = u.z, raw[r][v + 3] = u.w;
    }
  }
  float cross_sign[3];
#pragma unroll
  for (int s = 0; s < 3; ++s) cross_sign[s] = lane & (1 << s) ? -1.f : 1.f;
  if constexpr (kHadamard) {  // y_i *= signs_i, on the raw bits once for both transforms
    const float* sg = a.signs + b * kHeadDim + lane * E;
#pragma unroll
    for (int v = 0; v < kWords; ++v) {
      uint32_t flip = 0;
#pragma unroll
      for (int j = v * E / kWords; j < (v + 1) * E / kWords; ++j)
        flip |= sg[j] < 0.f ? sign_bit<T>(j) : 0u;
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r) raw[r][v] ^= flip;
    }
  }

  __shared__ uint32_t warp_amax[kThreads / 32];
  __shared__ float tile_descale;
  const int64_t group_slot = b * (a.heads / a.group) + h / a.group;
  float kept[kKeep ? kRowsPerThread : 1][kKeep ? E : 1];
  if constexpr (kPass != Pass::kGroupQuant) {
    uint32_t amax = 0;  // bits of max |y| (flash.h: nan wins)
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      if (r < passes) {
        float y[E];
        transform<T, E, kHadamard>(raw[r], cross_sign, a.hadamard_scale, y);
#pragma unroll
        for (int j = 0; j < E; ++j) {
          amax = max(amax, __float_as_uint(y[j]) & 0x7fffffffu);
          if constexpr (kKeep) kept[r][j] = y[j];
        }
      }
    }
    amax = __reduce_max_sync(0xffffffffu, amax);
    if (threadIdx.x % 32 == 0) warp_amax[threadIdx.x / 32] = amax;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < kThreads / 32; ++w) amax = max(amax, warp_amax[w]);
      if constexpr (kPass == Pass::kGroupAmax) {
        atomicMax(a.group_amax + group_slot, amax);
      } else {
        tile_descale = fp8_descale(__uint_as_float(amax));
        a.descale[tile] = tile_descale;  // [batch, heads, tiles]: the tile's linear index
      }
    }
    if constexpr (kPass == Pass::kGroupAmax) return;
    __syncthreads();
  }
  float descale;
  if constexpr (kPass == Pass::kBlock) {
    descale = tile_descale;
  } else {
    descale = fp8_descale(__uint_as_float(a.group_amax[group_slot]));
    if (n == 0 && h % a.group == 0 && threadIdx.x == 0) a.descale[group_slot] = descale;
  }
  const float inv = 1.f / descale;

#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    if (r < passes) {
      float y[E];
      if constexpr (kKeep) {
#pragma unroll
        for (int j = 0; j < E; ++j) y[j] = kept[r][j];
      } else {
        transform<T, E, kHadamard>(raw[r], cross_sign, a.hadamard_scale, y);
      }
      // cvt.rn.satfinite clamps to +-448 and keeps nan: the clip before fp8.py's cast.
      uint32_t out[E / 4];
#pragma unroll
      for (int j = 0; j < E; j += 4) {
        const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(y[j] * inv, y[j + 1] * inv),
                                                     __NV_SATFINITE, __NV_E4M3);
        const uint32_t hi = __nv_cvt_float2_to_fp8x2(
            make_float2(y[j + 2] * inv, y[j + 3] * inv), __NV_SATFINITE, __NV_E4M3);
        out[j / 4] = lo | (hi << 16);
      }
      const int row = slot + r * kRowSlots;
      if (row < rows) {
        uint8_t* dst = a.x8 + first + row * row_elems;
        if constexpr (E == 8) {
          *reinterpret_cast<uint2*>(dst) = make_uint2(out[0], out[1]);
        } else {
#pragma unroll
          for (int i = 0; i < E / 4; i += 4)
            *reinterpret_cast<uint4*>(dst + 4 * i) =
                make_uint4(out[i], out[i + 1], out[i + 2], out[i + 3]);
        }
      }
    }
  }
}

template <class T, int kHeadDim, bool kHadamard>
bool launch(int64_t tiles_total, const Args& a, Pass pass, cudaStream_t stream) {
  const unsigned grid = unsigned(tiles_total);
  switch (pass) {
    case Pass::kBlock:
      fp8_quantize_kernel<T, kHeadDim, kHadamard, Pass::kBlock><<<grid, kThreads, 0, stream>>>(a);
      break;
    case Pass::kGroupAmax:
      fp8_quantize_kernel<T, kHeadDim, kHadamard, Pass::kGroupAmax>
          <<<grid, kThreads, 0, stream>>>(a);
      break;
    case Pass::kGroupQuant:
      fp8_quantize_kernel<T, kHeadDim, kHadamard, Pass::kGroupQuant>
          <<<grid, kThreads, 0, stream>>>(a);
      break;
  }
  return cudaPeekAtLastError() == cudaSuccess;
}

template <class T, int kHeadDim>
bool launch_dim(const Args& a, int64_t tiles_total, Pass pass, cudaStream_t stream) {
  return a.signs ? launch<T, kHeadDim, true>(tiles_total, a, pass, stream)
                 : launch<T, kHeadDim, false>(tiles_total, a, pass, stream);
}

template <class T>
bool launch_type(const Args& a, int head_dim, int64_t tiles_total, Pass pass,
                 cudaStream_t stream) {
  switch (head_dim) {
    case 64: return launch_dim<T, 64>(a, tiles_total, pass, stream);
    case 128: return launch_dim<T, 128>(a, tiles_total, pass, stream);
    case 256: return launch_dim<T, 256>(a, tiles_total, pass, stream);
    default: return false;
  }
}

bool launch_pass(const Fp8QuantizeParams& p, const Args& a, Pass pass, cudaStream_t stream) {
  const int64_t tiles_total = p.batch * p.heads * a.tiles;
  if (tiles_total == 0) return true;
  const int d = int(p.head_dim);
  switch (p.dtype) {
    case DType::kFloat32: return launch_type<float>(a, d, tiles_total, pass, stream);
    case DType::kFloat16: return launch_type<__half>(a, d, tiles_total, pass, stream);
    case DType::kBFloat16: return launch_type<__nv_bfloat16>(a, d, tiles_total, pass, stream);
    default: return false;
  }
}

}  // namespace
}  // namespace sm90

bool sm90_supports_fp8_quantize(const Fp8QuantizeParams& p) {
  const bool dim = p.head_dim == 64 || p.head_dim == 128 || p.head_dim == 256;
  const int64_t tile_rows = p.block_rows ? p.block_rows : sm90::kMaxTileRows;
  const int64_t tiles = (p.seqlen + tile_rows - 1) / tile_rows;
  return dim && p.dtype != DType::kFloat8E4M3 && p.block_rows <= sm90::kMaxTileRows &&
         p.batch * p.heads * tiles < (int64_t(1) << 31) && p.heads < (int64_t(1) << 30);
}

size_t sm90_fp8_quantize_workspace_bytes(const Fp8QuantizeParams& p) {
  return p.block_rows ? 0 : size_t(p.batch * p.heads_kv) * sizeof(uint32_t);
}

const char* run_fp8_quantize_sm90(const Fp8QuantizeParams& p, void* workspace,
                                  cudaStream_t_ stream) {
  if (!sm90_supports_fp8_quantize(p)) return "the FP8 quantization kernel cannot take this call";
  sm90::Args a;
  a.x = p.x;
  a.signs = p.signs;
  a.x8 = p.x8;
  a.descale = p.descale;
  a.group_amax = static_cast<uint32_t*>(workspace);
  a.seqlen = p.seqlen;
  a.heads = int(p.heads);
  a.group = int(p.heads / p.heads_kv);
  a.tile_rows = int(p.block_rows ? p.block_rows : sm90::kMaxTileRows);
  a.tiles = int((p.seqlen + a.tile_rows - 1) / a.tile_rows);
  a.hadamard_scale = fp8_hadamard_scale(p.head_dim);
  if (p.block_rows)
    return sm90::launch_pass(p, a, sm90::Pass::kBlock, stream)
               ? nullptr
               : "fp8_quantize_kernel launch failed";
  // Per tensor: at seqlen 0 one empty tile per head still writes the groups' descales (1).
  a.tiles = a.tiles > 0 ? a.tiles : 1;
  if (cudaMemsetAsync(workspace, 0, sm90_fp8_quantize_workspace_bytes(p), stream) != cudaSuccess)
    return "cudaMemsetAsync of the FP8 quantization's group maxima failed";
  if (!sm90::launch_pass(p, a, sm90::Pass::kGroupAmax, stream) ||
      !sm90::launch_pass(p, a, sm90::Pass::kGroupQuant, stream))
    return "fp8_quantize_kernel launch failed";
  return nullptr;
}

}  // namespace fa3

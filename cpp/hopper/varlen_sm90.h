// fa3_jax Hopper: variable-length (cu_seqlens) sequences, shared by the forward and backward.
//
// The metadata policy is flash.h's: every cu_seqlens entry is clamped to [0, seqlen] and raised
// to the running maximum of the entries before it. The raw entries live on the device and the
// host never reads them (no sync), so one small kernel, varlen_prepare, runs ahead of the
// attention kernels on the same stream and
//  - writes the clamped cu_seqlens_q/k into the call's workspace (the kernels read only those),
//  - fills the rows outside every sequence, which no attention tile covers: after clamping the
//    sequences of a batch row are contiguous, so those rows are a head [0, cu[0]) and a tail
//    [cu[num_seqs], seqlen); outputs there are zero (out, dk, dv) and lse is -inf.
// The attention kernels then tile (block within a sequence, head, (batch row, sequence)).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace fa3::sm90 {

// What a tile needs to find its sequence. cu_q == nullptr: the dense layout (one sequence per
// batch row, no offsets).
struct VarlenParams {
  const int* cu_q = nullptr;  // [batch, num_seqs + 1], clamped (varlen_prepare's output)
  const int* cu_k = nullptr;
  int num_seqs = 1;
  // The band relative to each sequence's own bottom-right diagonal (flash.h), pre-clamped to
  // +-(seqlen_q + seqlen_k), which keeps its meaning for every sequence.
  int diag_lo = 0, diag_hi = 0;
};

struct SeqSpan {
  int batch;             // batch row
  int offset_q, len_q;   // query rows [offset_q, offset_q + len_q) of the batch row
  int offset_k, len_k;
};

// seq: the flat index batch_row * num_seqs + s of a varlen sequence.
__device__ __forceinline__ SeqSpan varlen_span(VarlenParams const& v, int seq) {
  SeqSpan r;
  r.batch = seq / v.num_seqs;
  // Row b of cu_seqlens starts at b * (num_seqs + 1) = seq - s + b.
  int const at = seq + r.batch;
  r.offset_q = __ldg(v.cu_q + at);
  r.len_q = __ldg(v.cu_q + at + 1) - r.offset_q;
  r.offset_k = __ldg(v.cu_k + at);
  r.len_k = __ldg(v.cu_k + at + 1) - r.offset_k;
  return r;
}

// Band edges of one sequence of lengths (len_q, len_k) in its own coordinates, clamped to
// [-len_q, len_k] like the dense band (64-bit: the pre-clamped edges plus the shift can pass
// 2^31).
__device__ __forceinline__ int varlen_diag(int diag, int len_q, int len_k) {
  int64_t const d = int64_t(diag) + len_k - len_q;
  return int(d < -len_q ? -len_q : d > len_k ? len_k : d);
}

// A row tensor [batch, seqlen, row_bytes] whose rows outside every sequence are zeroed.
struct VarlenFill {
  void* ptr = nullptr;     // nullptr: unused slot
  int64_t row_bytes = 0;   // a multiple of 16
  bool keys = false;       // rows follow cu_seqlens_k (else cu_seqlens_q)
};

struct VarlenPrepParams {
  const int32_t* raw_q = nullptr;  // the caller's cu_seqlens, [batch, num_seqs + 1]
  const int32_t* raw_k = nullptr;
  int* cu_q = nullptr;             // clamped copies (workspace)
  int* cu_k = nullptr;
  int batch = 0, num_seqs = 0, seqlen_q = 0, seqlen_k = 0;
  VarlenFill fill[3];
  float* lse = nullptr;  // [batch, lse_heads, seqlen_q]: -inf outside every sequence; or null
  int lse_heads = 0;
};

inline constexpr int kVarlenPrepThreads = 256;
inline constexpr int kVarlenPrepRows = 64;  // rows of the fills per CTA

__device__ __forceinline__ int varlen_clamp(int32_t x, int total) { return min(max(x, 0), total); }

// grid (ceil(max(seqlen_q, seqlen_k) / kVarlenPrepRows), batch). Static: every .cu that
// includes this header gets its own copy (no duplicate kernel symbols at link).
static __global__ void __launch_bounds__(kVarlenPrepThreads) varlen_prepare(VarlenPrepParams const p) {
  int const b = blockIdx.y, n1 = p.num_seqs + 1;
  int const warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int32_t const* rq = p.raw_q + int64_t(b) * n1;
  int32_t const* rk = p.raw_k + int64_t(b) * n1;

  // Clamped copies (CTA x == 0): warp 0 scans q, warp 1 scans k, 32 entries a step, each step a
  // shuffle max-scan seeded with the previous step's last value.
  if (blockIdx.x == 0 && warp < 2) {
    int32_t const* raw = warp == 0 ? rq : rk;
    int* dst = (warp == 0 ? p.cu_q : p.cu_k) + int64_t(b) * n1;
    int const total = warp == 0 ? p.seqlen_q : p.seqlen_k;
    int carry = 0;
    for (int base = 0; base < n1; base += 32) {
      int const idx = base + lane;
      int x = idx < n1 ? varlen_clamp(raw[idx], total) : 0;
      for (int off = 1; off < 32; off *= 2) {
        int const y = __shfl_up_sync(0xffffffffu, x, off);
        if (lane >= off) x = max(x, y);
      }
      x = max(x, carry);
      if (idx < n1) dst[idx] = x;
      carry = __shfl_sync(0xffffffffu, x, 31);
    }
  }

  // The covered rows [first, last): first is entry 0 clamped, last the maximum of all entries
  // clamped (the running maximum's final value). Every CTA reduces them itself.
  __shared__ int s_last[2][kVarlenPrepThreads / 32];
  int mq = 0, mk = 0;
  for (int i = threadIdx.x; i < n1; i += kVarlenPrepThreads) {
    mq = max(mq, varlen_clamp(rq[i], p.seqlen_q));
    mk = max(mk, varlen_clamp(rk[i], p.seqlen_k));
  }
  mq = __reduce_max_sync(0xffffffffu, mq);
  mk = __reduce_max_sync(0xffffffffu, mk);
  if (lane == 0) {
    s_last[0][warp] = mq;
    s_last[1][warp] = mk;
  }
  __syncthreads();
  int last_q = 0, last_k = 0;
  for (int w = 0; w < kVarlenPrepThreads / 32; ++w) {
    last_q = max(last_q, s_last[0][w]);
    last_k = max(last_k, s_last[1][w]);
  }
  int const first_q = varlen_clamp(rq[0], p.seqlen_q), first_k = varlen_clamp(rk[0], p.seqlen_k);

  int const r0 = blockIdx.x * kVarlenPrepRows;
  for (int f = 0; f < 3; ++f) {
    VarlenFill const& g = p.fill[f];
    if (!g.ptr) continue;
    int const total = g.keys ? p.seqlen_k : p.seqlen_q;
    int const first = g.keys ? first_k : first_q, last = g.keys ? last_k : last_q;
    int const r1 = min(r0 + kVarlenPrepRows, total);
    if (r1 <= r0 || (r0 >= first && r1 <= last)) continue;  // no uncovered row here
    int const vecs = int(g.row_bytes / 16);
    uint4* base = reinterpret_cast<uint4*>(static_cast<char*>(g.ptr) +
                                           (int64_t(b) * total + r0) * g.row_bytes);
    for (int idx = threadIdx.x; idx < (r1 - r0) * vecs; idx += kVarlenPrepThreads) {
      int const r = r0 + idx / vecs;
      if (r < first || r >= last) base[idx] = make_uint4(0, 0, 0, 0);
    }
  }
  if (p.lse) {
    int const r1 = min(r0 + kVarlenPrepRows, p.seqlen_q);
    if (r1 > r0 && !(r0 >= first_q && r1 <= last_q)) {
      for (int idx = threadIdx.x; idx < (r1 - r0) * p.lse_heads; idx += kVarlenPrepThreads) {
        int const h = idx / (r1 - r0), r = r0 + idx % (r1 - r0);
        if (r < first_q || r >= last_q)
          p.lse[(int64_t(b) * p.lse_heads + h) * p.seqlen_q + r] = -INFINITY;
      }
    }
  }
}

// Host side: launches varlen_prepare on `stream`; false if the launch failed.
static inline bool launch_varlen_prepare(VarlenPrepParams const& p, cudaStream_t stream) {
  if (p.batch == 0) return true;
  int const rows = max(max(p.seqlen_q, p.seqlen_k), 1);
  dim3 const grid(unsigned((rows + kVarlenPrepRows - 1) / kVarlenPrepRows), unsigned(p.batch));
  varlen_prepare<<<grid, kVarlenPrepThreads, 0, stream>>>(p);
  return cudaPeekAtLastError() == cudaSuccess;
}

// Bytes of the clamped cu_seqlens_q and cu_seqlens_k in a workspace.
inline size_t varlen_workspace_bytes(int64_t batch, int64_t num_seqs) {
  return size_t(2 * batch * (num_seqs + 1)) * sizeof(int);
}

}  // namespace fa3::sm90

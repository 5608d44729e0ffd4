// fa3_jax Hopper: variable-length (cu_seqlens) sequences, shared by the forward and backward.
//
// The metadata policy is flash.h's: every cu_seqlens entry is clamped to [0, seqlen] and raised
// to the running maximum of the entries before it. The raw entries live on the device and the
// host never reads them (no sync), so one small kernel, varlen_prepare, runs ahead of the
// attention kernels on the same stream and
//  - writes the clamped cu_seqlens_q/k into the call's workspace (the kernels read only those),
//  - fills the rows outside every sequence, which no attention tile covers: after clamping the
//    sequences of a batch row are contiguous, so those rows are a head [0, cu[0]) and a tail
//    [cu[num_seqs], seqlen); outputs there are zero (out, dk, dv) and lse is -inf;
//  - numbers the blocks of every sequence of a batch row one after the other (varlen_block).
// The attention kernels then tile (block, head, batch row) over those numbered blocks, so their
// grids follow the tokens (at most ceil(seqlen / rows) + num_seqs blocks per batch row), not
// num_seqs x the longest sequence: with many short sequences and a max_seqlen far above them
// the empty tiles of such a grid took most of the time. Measured on H200 before this numbering
// (bf16, hdim 128, 16 heads, 230 sequences of 33..511 tokens, 64k tokens; 2026-11-22,
// benchmarks/measured/h200_2026-11-22s8_varlen_maxseq.txt), forward / forward + backward ms:
// max_seqlen 511: 0.648 / 2.478; 8192: 1.626 / 4.618; 65536: 8.582 / 21.993.
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
  // The numbered blocks of the side this kernel tiles (varlen_block: the forward's query
  // blocks, the backward main kernel's key blocks, the pre/postprocess's query row groups):
  // block_seq[b * block_stride + v] = (sequence, block within it) of block v of batch row b, or
  // (-1, 0) past the row's last block.
  const int2* block_seq = nullptr;
  int block_stride = 0;
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

// Blocks of `rows` rows, numbered over the sequences of a batch row one after the other
// (sequence s has ceil(len_s / rows) blocks). varlen_prepare writes the table block_seq; a tile
// reads its entry with one load (a binary search over the block counts' prefix sums, 8 dependent
// loads for 230 sequences, cost 7% of the forward and 5% of forward + backward on short
// sequences: 230 of 33..511 tokens, H200, h200_2026-11-22s8_varlen_maxseq.txt).
// False when v is past the row's last block (the grid's bound is not exact).
__device__ __forceinline__ bool varlen_block(VarlenParams const& v, int b, int block, int& s_in_row,
                                             int& block_in_seq) {
  int2 const e = __ldg(v.block_seq + int64_t(b) * v.block_stride + block);
  s_in_row = e.x;
  block_in_seq = e.y;
  return e.x >= 0;
}

// Host side: a bound on the numbered blocks of `rows` rows of one batch row holding num_seqs
// sequences in seqlen rows, none longer than span (max_seqlen, a promise: with a longer one the
// blocks past the bound are not covered, as flash.h states).
inline constexpr int kVarlenMinBlockRows = 64;  // the smallest block any numbering uses
inline int64_t varlen_block_bound(int64_t seqlen, int64_t num_seqs, int64_t span, int rows) {
  int64_t const by_tokens = (seqlen + num_seqs * (rows - 1)) / rows;  // sum of ceil(len / rows)
  int64_t const by_span = num_seqs * ((span + rows - 1) / rows);
  return by_tokens < by_span ? by_tokens : by_span;
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
  // Numbered blocks (varlen_block) of block_rows_q query rows / block_rows_k keys: the block
  // counts' prefix sums per sequence (scratch, [batch, num_seqs + 1]) and the tables
  // ([batch, stride]; stride: varlen_block_bound, at most varlen_workspace_bytes' room). Null: not
  // numbered.
  int* blocks_q = nullptr;
  int* blocks_k = nullptr;
  int2* block_seq_q = nullptr;
  int2* block_seq_k = nullptr;
  int block_rows_q = 0, block_rows_k = 0;
  int block_stride_q = 0, block_stride_k = 0;
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
  // shuffle max-scan seeded with the previous step's last value; and the numbered blocks: the
  // block count of sequence idx - 1 (entries idx - 1 and idx), summed by a shuffle scan.
  if (blockIdx.x == 0) {
    if (warp < 2) {
      int32_t const* raw = warp == 0 ? rq : rk;
      int* dst = (warp == 0 ? p.cu_q : p.cu_k) + int64_t(b) * n1;
      int* blocks = warp == 0 ? p.blocks_q : p.blocks_k;
      if (blocks) blocks += int64_t(b) * n1;
      int const rows = max(warp == 0 ? p.block_rows_q : p.block_rows_k, 1);
      int const total = warp == 0 ? p.seqlen_q : p.seqlen_k;
      int carry = 0, block_carry = 0;
      for (int base = 0; base < n1; base += 32) {
        int const idx = base + lane;
        int x = idx < n1 ? varlen_clamp(raw[idx], total) : 0;
        for (int off = 1; off < 32; off *= 2) {
          int const y = __shfl_up_sync(0xffffffffu, x, off);
          if (lane >= off) x = max(x, y);
        }
        x = max(x, carry);
        if (idx < n1) dst[idx] = x;
        int const up = __shfl_up_sync(0xffffffffu, x, 1);
        int const prev = lane == 0 ? carry : up;
        int nb = idx >= 1 && idx < n1 ? (x - prev + rows - 1) / rows : 0;
        for (int off = 1; off < 32; off *= 2) {
          int const y = __shfl_up_sync(0xffffffffu, nb, off);
          if (lane >= off) nb += y;
        }
        nb += block_carry;
        if (blocks && idx < n1) blocks[idx] = nb;
        carry = __shfl_sync(0xffffffffu, x, 31);
        block_carry = __shfl_sync(0xffffffffu, nb, 31);
      }
    }
    // The tables, from the prefix sums (visible to the CTA after the barrier): warp w writes the
    // entries of sequences w, w + 8, ..., one lane per block; the CTA then marks the entries
    // between the last block and the stride.
    __syncthreads();
    for (int side = 0; side < 2; ++side) {
      int2* table = side == 0 ? p.block_seq_q : p.block_seq_k;
      int const* blocks = side == 0 ? p.blocks_q : p.blocks_k;
      if (!table || !blocks) continue;
      int const stride = side == 0 ? p.block_stride_q : p.block_stride_k;
      table += int64_t(b) * stride;
      blocks += int64_t(b) * n1;
      for (int s = warp; s < p.num_seqs; s += kVarlenPrepThreads / 32) {
        int const first = blocks[s], last = min(blocks[s + 1], stride);
        for (int i = first + lane; i < last; i += 32) table[i] = make_int2(s, i - first);
      }
      for (int i = blocks[p.num_seqs] + int(threadIdx.x); i < stride; i += kVarlenPrepThreads)
        table[i] = make_int2(-1, 0);
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

// The varlen workspace, in order: the clamped cu_seqlens_q and cu_seqlens_k, the numbered query
// and key blocks' prefix sums ([batch, num_seqs + 1] ints each), then (8-byte aligned) the query
// and key tables, each with room for blocks of at least kVarlenMinBlockRows rows. The one place
// that lays it out: varlen_workspace_bytes sizes it, varlen_workspace points into it.
struct VarlenLayout {
  int64_t per_array;  // ints of each of the four [batch, num_seqs + 1] arrays
  int64_t tables;     // int offset of the query table
  int64_t table_q;    // int2 entries of the query table (the key table follows it)
  int64_t table_k;
};
inline VarlenLayout varlen_layout(int64_t batch, int64_t num_seqs, int64_t seqlen_q, int64_t seqlen_k) {
  int64_t const n = batch * (num_seqs + 1);
  return {n, (4 * n + 1) / 2 * 2,
          batch * varlen_block_bound(seqlen_q, num_seqs, seqlen_q, kVarlenMinBlockRows),
          batch * varlen_block_bound(seqlen_k, num_seqs, seqlen_k, kVarlenMinBlockRows)};
}
inline size_t varlen_workspace_bytes(int64_t batch, int64_t num_seqs, int64_t seqlen_q,
                                     int64_t seqlen_k) {
  VarlenLayout const l = varlen_layout(batch, num_seqs, seqlen_q, seqlen_k);
  return size_t(l.tables) * sizeof(int) + size_t(l.table_q + l.table_k) * sizeof(int2);
}
// Points prep's arrays into the workspace at `at` (prep.batch, num_seqs and seqlen_q/k set) and
// sizes the tables for blocks of rows_q query rows and rows_k keys of sequences no longer than
// span_q / span_k; rows 0: that side's blocks are not numbered (no prefix sums, no table). False
// for rows below kVarlenMinBlockRows (the workspace has no room).
inline bool varlen_workspace(VarlenPrepParams& prep, void* at, int rows_q, int64_t span_q,
                             int rows_k, int64_t span_k) {
  if ((rows_q != 0 && rows_q < kVarlenMinBlockRows) || (rows_k != 0 && rows_k < kVarlenMinBlockRows))
    return false;
  VarlenLayout const l = varlen_layout(prep.batch, prep.num_seqs, prep.seqlen_q, prep.seqlen_k);
  int* cu = static_cast<int*>(at);
  int2* const tables = reinterpret_cast<int2*>(cu + l.tables);
  prep.cu_q = cu;
  prep.cu_k = cu + l.per_array;
  prep.blocks_q = rows_q ? cu + 2 * l.per_array : nullptr;
  prep.blocks_k = rows_k ? cu + 3 * l.per_array : nullptr;
  prep.block_rows_q = rows_q;
  prep.block_rows_k = rows_k;
  prep.block_seq_q = rows_q ? tables : nullptr;
  prep.block_seq_k = rows_k ? tables + l.table_q : nullptr;
  prep.block_stride_q =
      rows_q ? int(varlen_block_bound(prep.seqlen_q, prep.num_seqs, span_q, rows_q)) : 0;
  prep.block_stride_k =
      rows_k ? int(varlen_block_bound(prep.seqlen_k, prep.num_seqs, span_k, rows_k)) : 0;
  return true;
}

}  // namespace fa3::sm90

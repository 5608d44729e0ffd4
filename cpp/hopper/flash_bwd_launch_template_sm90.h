// fa3_jax Hopper backward: the three launches (preprocess, main, postprocess) for one
// (head dim, head dim v, dtype, softcap) instantiation. Included only by flash_bwd_hdim*_sm90.cu.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>

#include "cuda_device.h"
#include "flash_bwd_kernel_sm90.h"
#include "flash_bwd_launch_sm90.h"
#include "flash_bwd_postprocess_sm90.h"
#include "flash_bwd_preprocess_sm90.h"

namespace fa3::sm90_bwd {

inline int bwd_clamp_diag(int64_t d, int64_t seqlen_q, int64_t seqlen_k) {
  return int(std::min<int64_t>(std::max<int64_t>(d, -(seqlen_q + 1)), seqlen_k + 1));
}

template <int kHeadDim, int kHeadDimV, DType kDType, bool kSoftcap>
const char* run_bwd_sm90_hdim(const BwdParams& p, void* workspace, cudaStream_t_ stream_) {
  // flash.h forward-declares CUstream_st inside namespace fa3, a different type from the
  // runtime's ::CUstream_st; both name the same driver stream object.
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_);
  using Element = typename sm90::ElementOf<kDType>::type;
  using Tr = BwdTraitsSm90<kHeadDim, kHeadDimV, Element, kSoftcap>;
  const BwdWorkspaceLayout w = bwd_workspace_layout(p);
  char* ws = static_cast<char*>(workspace);
  float* dq_accum = reinterpret_cast<float*>(ws + w.dq_accum);
  float* lse_log2 = reinterpret_cast<float*>(ws + w.lse_log2);
  float* dpsum = reinterpret_cast<float*>(ws + w.dpsum);
  int* semaphores = reinterpret_cast<int*>(ws + w.semaphores);

  // Varlen: clamp cu_seqlens into the workspace, zero dq/dk/dv rows outside every sequence (no
  // CTA below covers them) and number the blocks of the sequences of each batch row
  // (sm90::varlen_block): the key blocks of the main kernel, the kBwdSeqlenQPad-row query blocks
  // of the pre/postprocess; grids then cover (numbered block, head, batch row).
  sm90::VarlenParams varlen;
  const int2* block_seq_k = nullptr;  // varlen: the main kernel's numbered key blocks
  int k_blocks = 0;
  const bool is_varlen = p.cu_seqlens_q != nullptr;
  const int seqs = is_varlen ? int(p.num_seqs) : 1;
  const int64_t span_q = is_varlen ? std::min(p.max_seqlen_q, p.seqlen_q) : p.seqlen_q;
  const int64_t span_k = is_varlen ? std::min(p.max_seqlen_k, p.seqlen_k) : p.seqlen_k;
  if (is_varlen) {
    sm90::VarlenPrepParams prep;
    prep.raw_q = p.cu_seqlens_q;
    prep.raw_k = p.cu_seqlens_k;
    prep.batch = int(p.batch);
    prep.num_seqs = seqs;
    prep.seqlen_q = int(p.seqlen_q);
    prep.seqlen_k = int(p.seqlen_k);
    if (!sm90::varlen_workspace(prep, ws + w.cu_seqlens, kBwdSeqlenQPad, span_q, Tr::kBlockN, span_k))
      return "sm90 varlen backward: key blocks below the numbering's smallest block";
    prep.fill[0] = {p.dq, int64_t(p.heads_q) * kHeadDim * int64_t(sizeof(Element)), false};
    prep.fill[1] = {p.dk, int64_t(p.heads_kv) * kHeadDim * int64_t(sizeof(Element)), true};
    prep.fill[2] = {p.dv, int64_t(p.heads_kv) * kHeadDimV * int64_t(sizeof(Element)), true};
    if (!sm90::launch_varlen_prepare(prep, stream)) return "sm90 varlen prepare kernel launch failed";
    const int64_t far = p.seqlen_q + p.seqlen_k;  // keeps the band's meaning per sequence
    varlen = {prep.cu_q, prep.cu_k, seqs, prep.block_seq_q, prep.block_stride_q,
              int(std::clamp<int64_t>(p.diag_lo, -far, far)),
              int(std::clamp<int64_t>(p.diag_hi, -far, far))};
    block_seq_k = prep.block_seq_k;
    k_blocks = prep.block_stride_k;
  }
  // Varlen: the numbered kBwdSeqlenQPad-row query blocks of a batch row (pre/postprocess grids).
  const int q_pad_blocks = varlen.block_stride;

  BwdPreParams pre{};
  pre.out = p.out_in;
  pre.dout = p.dout;
  pre.lse = p.lse_in;
  pre.dlse = p.dlse;
  pre.lse_log2 = lse_log2;
  pre.dpsum = dpsum;
  pre.dq_accum = dq_accum;
  pre.semaphores = semaphores;
  pre.seqlen_q = int(p.seqlen_q);
  pre.seqlen_q_pad = int(w.seqlen_q_pad);
  pre.heads_q = int(p.heads_q);
  pre.sem_per_head = int(w.sem_per_head);
  pre.varlen = varlen;
  static_assert(kBwdSeqlenQPad % kPreRowsPerBlock == 0, "the preprocess covers seqlen_q_pad in whole blocks");
  // Varlen: each sequence's rows up to a whole kBwdSeqlenQPad (the main kernel reads whole blocks).
  dim3 pre_grid(unsigned(is_varlen ? q_pad_blocks * (kBwdSeqlenQPad / kPreRowsPerBlock)
                                   : w.seqlen_q_pad / kPreRowsPerBlock),
                unsigned(p.heads_q), unsigned(p.batch));
  flash_bwd_preprocess_sm90<Element, kHeadDim, kHeadDimV><<<pre_grid, kPreThreads, 0, stream>>>(pre);
  if (cuda::launch_failed()) return "sm90 backward preprocess kernel launch failed";

  BwdMainParams m{};
  m.q = p.q;
  m.k = p.k;
  m.v = p.v;
  m.dout = p.dout;
  m.dk = p.dk;
  m.dv = p.dv;
  m.dq_accum = dq_accum;
  m.lse_log2 = lse_log2;
  m.dpsum = dpsum;
  m.semaphores = semaphores;
  m.batch = int(p.batch);
  m.seqlen_q = int(p.seqlen_q);
  m.seqlen_k = int(p.seqlen_k);
  m.seqlen_q_pad = int(w.seqlen_q_pad);
  m.heads_q = int(p.heads_q);
  m.heads_kv = int(p.heads_kv);
  m.group = int(p.heads_q / p.heads_kv);
  m.sem_per_head = int(w.sem_per_head);
  m.diag_lo = bwd_clamp_diag(p.diag_lo, p.seqlen_q, p.seqlen_k);
  m.diag_hi = bwd_clamp_diag(p.diag_hi, p.seqlen_q, p.seqlen_k);
  m.scale = p.softmax_scale;
  m.scale_log2 = p.softmax_scale * 1.4426950408889634f;
  m.softcap_log2 = p.softcap * 1.4426950408889634f;
  m.scale_div_softcap = kSoftcap ? p.softmax_scale / p.softcap : 0.f;
  m.deterministic = p.deterministic;
  // Key-block-major CTA order (flash_bwd_kernel_sm90's start) where a key block's work falls with
  // its index (a band with no lower edge whose upper edge cuts keys: causal), the CTAs are coarse
  // (GQA: a CTA covers its whole group) and few (heads_kv x batch <= 64 pairs): launch order then
  // leaves the heavy first key blocks of the last pairs running alone at the end. Many pairs in
  // key-block-major order instead run the first key blocks of every pair at once, whose dQ
  // accumulators and Q/dO no longer share L2. Measured (H200, hdim 128, causal, 16k tokens,
  // hidden 2048; bwd TFLOP/s / cuDNN at 1k 2k 4k 16k, launch order -> key-block-major; file
  // h200_2026-11-22s9b_bwd_key_block_major.txt):
  //   MHA (pairs 256..16)     1.046 1.053 1.057 1.080 -> 0.772 0.724 0.992 1.093 (launch order)
  //   GQA 2 (pairs 128..8)    1.181 1.109 1.062 1.106 -> 0.886 1.100 1.138 1.080
  //   GQA 4 (pairs 64..4)     1.090 1.004 0.954 1.080 -> 1.096 1.096 1.101 1.094
  //   GQA 8 (pairs 32..2)     0.856 0.781 0.770 1.032 -> 0.997 0.914 0.966 1.012
  // Not varlen, whose grid numbers the blocks of several sequences.
  m.key_block_major = !is_varlen && m.group > 1 && bwd_causal_few_pairs(p);
  m.group_split = w.group_split;
  m.dkv_partial = reinterpret_cast<float*>(ws + w.dkv_partial);
  m.varlen = varlen;
  m.varlen.block_seq = block_seq_k;
  m.varlen.block_stride = k_blocks;
  // Segment ids: the segment-id variant of the main kernel, after the stats and hulls on its tiles.
  if (p.q_segment_ids) {
    sm90::SegmentPrepParams sp;
    sp.q_ids = p.q_segment_ids;
    sp.k_ids = p.kv_segment_ids;
    sp.batch = int(p.batch);
    sp.seqlen_q = int(p.seqlen_q);
    sp.seqlen_k = int(p.seqlen_k);
    sp.block_m = Tr::kBlockM;
    sp.block_n = Tr::kBlockN;
    sp.by_keys = true;
    if (!sm90::launch_segment_prepare(sp, ws + w.segments, stream, m.seg))
      return "sm90 segment-id prepare kernel launch failed";
  }
  auto launch_main = [&](auto traits) {
    using T = decltype(traits);
    auto kernel = flash_bwd_kernel_sm90<T>;
    static cuda::PerDevice<cudaError_t> smem_limit_set;  // one per instantiation
    if (cuda::set_smem_limit_once(smem_limit_set, kernel, T::kSmemBytes) != cudaSuccess)
      return "cannot raise the shared-memory limit of the sm90 backward main kernel";
    static_assert(T::kBlockN == Tr::kBlockN, "varlen's key blocks are numbered in Tr::kBlockN rows");
    const int64_t n_blocks = is_varlen ? k_blocks : (span_k + T::kBlockN - 1) / T::kBlockN;
    dim3 grid(unsigned(n_blocks), unsigned(p.heads_kv * w.group_split), unsigned(p.batch));
    kernel<<<grid, T::kNumThreads, T::kSmemBytes, stream>>>(make_bwd_kernel_args<T>(m, int(p.batch)));
    return cuda::launch_failed() ? "sm90 backward main kernel launch failed" : nullptr;
  };
  using TrSegments = BwdTraitsSm90<kHeadDim, kHeadDimV, Element, kSoftcap, true>;
  if (const char* err = p.q_segment_ids ? launch_main(TrSegments{}) : launch_main(Tr{})) return err;

  BwdPostParams post{};
  post.dq_accum = dq_accum;
  post.dq = p.dq;
  post.scale = p.softmax_scale;
  post.batch = int(p.batch);
  post.seqlen_q = int(p.seqlen_q);
  post.seqlen_q_pad = int(w.seqlen_q_pad);
  post.heads_q = int(p.heads_q);
  post.varlen = varlen;
  static_assert(Tr::kBlockM / Tr::kDqRowSplit == kDqBlockRows,
                "the postprocess un-permutes the main kernel's dQ fragment order, one 64-row block at a time");
  static_assert(kBwdSeqlenQPad % kDqBlockRows == 0, "the postprocess splits numbered blocks in whole parts");
  dim3 post_grid(unsigned(is_varlen ? q_pad_blocks * (kBwdSeqlenQPad / kDqBlockRows)
                                    : (span_q + kDqBlockRows - 1) / kDqBlockRows),
                 unsigned(p.heads_q), unsigned(p.batch));
  flash_bwd_postprocess_sm90<Element, kHeadDim, Tr::kDqAtomN, Tr::kDqColSplit>
      <<<post_grid, kPostThreads, 0, stream>>>(post);
  if (cuda::launch_failed()) return "sm90 backward postprocess kernel launch failed";
  if (w.group_split > 1) {
    BwdDkvReduceParams red{m.dkv_partial, p.dk, p.dv, int64_t(p.batch) * p.seqlen_k * p.heads_kv, w.group_split};
    const int64_t pairs = red.rows * ((kHeadDim + kHeadDimV) / 2);
    const unsigned blocks = unsigned(std::min<int64_t>((pairs + kPostThreads - 1) / kPostThreads, 132 * 16));
    if (blocks > 0) {
      flash_bwd_dkv_reduce<Element, kHeadDim, kHeadDimV><<<blocks, kPostThreads, 0, stream>>>(red);
      if (cuda::launch_failed()) return "sm90 backward dK/dV reduce kernel launch failed";
    }
  }
  return nullptr;
}

}  // namespace fa3::sm90_bwd

// One line per instantiation file: both dtypes, with and without softcap.
#define FA3_BWD_INSTANTIATE(D, DV)                                                                       \
  template const char* fa3::sm90_bwd::run_bwd_sm90_hdim<D, DV, fa3::DType::kFloat16, false>(           \
      const fa3::BwdParams&, void*, fa3::cudaStream_t_);                                                 \
  template const char* fa3::sm90_bwd::run_bwd_sm90_hdim<D, DV, fa3::DType::kFloat16, true>(            \
      const fa3::BwdParams&, void*, fa3::cudaStream_t_);                                                 \
  template const char* fa3::sm90_bwd::run_bwd_sm90_hdim<D, DV, fa3::DType::kBFloat16, false>(          \
      const fa3::BwdParams&, void*, fa3::cudaStream_t_);                                                 \
  template const char* fa3::sm90_bwd::run_bwd_sm90_hdim<D, DV, fa3::DType::kBFloat16, true>(           \
      const fa3::BwdParams&, void*, fa3::cudaStream_t_);

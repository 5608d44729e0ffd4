// fa3_jax Hopper backward: host-side pieces shared by the dispatcher (flash_bwd_sm90.cu) and the
// per-head-dim instantiation files (flash_bwd_hdim*_sm90.cu). No CuTe here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "flash.h"
#include "flash_bwd_tile_size_sm90.h"
#include "segments_sm90.h"
#include "varlen_sm90.h"

namespace fa3::sm90_bwd {

// Workspace: float dq_accum [b, hq, sq_pad, d] (each 64-row block in the main kernel's fragment order,
// see flash_bwd_postprocess_sm90.h); float lse_log2 and dpsum [b, hq, sq_pad];
// int semaphores [b, hq, sq_pad / 64] (one per 64-row query block, the smallest block_m).
// Varlen (num_seqs > 0): planes of sq + kBwdSeqlenQPad num_seqs rows (varlen_q_block_row pads each
// sequence to whole blocks), then the clamped cu_seqlens_q/k and the numbered blocks (sm90::varlen_workspace).
// Segment ids (q_segment_ids non-null): then the block stats and hulls (segments_sm90.h), sized
// for 64-row blocks on both sides, the smallest tiles of any backward instantiation (the size
// Python asks for does not know softcap, which picks the tiles).
struct BwdWorkspaceLayout {
  int64_t seqlen_q_pad = 0, sem_per_head = 0;
  int group_split = 1;  // bwd_group_split
  size_t dq_accum = 0, lse_log2 = 0, dpsum = 0, semaphores = 0, cu_seqlens = 0, segments = 0,
         dkv_partial = 0, total = 0;  // byte offsets, size
};

// The calls whose coarse backward CTAs schedule badly: a causal band (no lower edge, the upper edge
// cutting keys) with at most 64 (kv head, batch) pairs on the dense layout (the caller excludes
// varlen). Key blocks' work then falls with their index and the few pairs leave the heavy first
// key blocks running alone at the end. Both remedies key on it: the key-block-major CTA order
// (launch template, GQA) and the group split (bwd_group_split, large groups).
inline bool bwd_causal_few_pairs(const BwdParams& p) {
  return p.diag_lo <= -p.seqlen_q && p.diag_hi < p.seqlen_k && int64_t(p.heads_kv) * p.batch <= 64;
}

// GQA: the query heads of a group split over this many CTAs per (key block, kv head), each
// covering group / split heads and writing float32 dK/dV partials ([split, batch, seqlen_k,
// heads_kv, head_dim + head_dim_v]) that flash_bwd_dkv_reduce sums in a fixed order (so
// deterministic mode stays bit-identical). 1: one CTA per group, dK/dV written directly.
// Rule (hdim 128, the only head dim compiled with it: BwdTraitsSm90::kGroupSplit): causal bands
// (no lower edge, the upper edge cutting keys) on the dense layout with
// group >= 8 and at most 64 (kv head, batch) pairs take 4 query heads per CTA. A CTA covers its
// key block for every head it owns, so large groups make few, coarse CTAs, and with causal masks
// the heavy first key blocks set the makespan even in key-block-major order; the partials cost
// 2 x 4 bytes per dK/dV element more traffic. Measured (H200, hdim 128, 16 query heads, 16k
// tokens; bwd / cuDNN at 1k 2k 4k 8k 16k, h200_2026-11-22s10g_bwd_group_split.txt):
//   GQA 8 causal, 8 heads a CTA (split 1)  1.003 0.929 0.950 1.022 0.993
//                 4 heads (split 2)        1.015 1.040 1.059 1.072 1.052   <- taken
//                 2 heads (split 4)        0.780 0.984 1.049 1.075 1.091
//   GQA 8 full,   split 1 / 2              1.189 1.122 1.088 1.110 1.076 / 1.102 1.075 1.059 1.060 1.069
//   GQA 4 causal, split 1 / 2              1.109 1.092 1.089 1.085 1.046 / 0.782 0.983 1.049 1.069 1.047
// so full masks and groups of 4 keep one CTA per group. FA3_JAX_BWD_GROUP_SPLIT (a divisor of
// the group) overrides the rule for dense calls, for tests and experiments; it must be the same
// when Python sizes the workspace and when the call runs (a mismatch is a clear workspace error).
inline int bwd_group_split(const BwdParams& p) {
  // Only the kernels with BwdTraitsSm90::kGroupSplit (hdim 128, no segment ids) can split.
  if (p.num_seqs > 0 || p.q_segment_ids || p.heads_kv <= 0 || p.head_dim != 128 || p.head_dim_v != 128) {
    return 1;
  }
  const int64_t group = p.heads_q / p.heads_kv;
  if (const char* env = std::getenv("FA3_JAX_BWD_GROUP_SPLIT")) {
    const int s = std::atoi(env);
    return s > 1 && group % s == 0 ? s : 1;
  }
  constexpr int64_t kHeadsPerCta = 4;
  if (bwd_causal_few_pairs(p) && group >= 8 && group % kHeadsPerCta == 0) {
    return int(group / kHeadsPerCta);
  }
  return 1;
}

inline size_t bwd_align256(size_t x) { return (x + 255) / 256 * 256; }

inline BwdWorkspaceLayout bwd_workspace_layout(const BwdParams& p) {
  BwdWorkspaceLayout w;
  const int64_t plane_rows = p.seqlen_q + (p.num_seqs > 0 ? kBwdSeqlenQPad * p.num_seqs : 0);
  w.seqlen_q_pad = (plane_rows + kBwdSeqlenQPad - 1) / kBwdSeqlenQPad * kBwdSeqlenQPad;
  w.sem_per_head = w.seqlen_q_pad / 64;
  const size_t rows = size_t(p.batch) * p.heads_q * w.seqlen_q_pad;
  w.dq_accum = 0;
  w.lse_log2 = bwd_align256(w.dq_accum + rows * p.head_dim * sizeof(float));
  w.dpsum = bwd_align256(w.lse_log2 + rows * sizeof(float));
  w.semaphores = bwd_align256(w.dpsum + rows * sizeof(float));
  w.cu_seqlens = bwd_align256(w.semaphores + size_t(p.batch) * p.heads_q * w.sem_per_head * sizeof(int));
  const size_t cu_bytes = p.num_seqs > 0 ? sm90::varlen_workspace_bytes(p.batch, p.num_seqs, p.seqlen_q, p.seqlen_k) : 0;
  w.segments = bwd_align256(w.cu_seqlens + cu_bytes);
  const size_t seg_bytes = p.q_segment_ids
                               ? sm90::segment_workspace_bytes(p.batch, p.seqlen_q, p.seqlen_k, 64, 64)
                               : 0;
  w.group_split = bwd_group_split(p);
  w.dkv_partial = bwd_align256(w.segments + seg_bytes);
  const size_t partial_bytes = w.group_split > 1 ? size_t(w.group_split) * p.batch * p.seqlen_k * p.heads_kv *
                                                       (p.head_dim + p.head_dim_v) * sizeof(float)
                                                 : 0;
  w.total = bwd_align256(w.dkv_partial + partial_bytes);
  return w;
}

// Defined (and explicitly instantiated) in flash_bwd_hdim<D>_sm90.cu.
template <int kHeadDim, int kHeadDimV, DType kDType, bool kSoftcap>
const char* run_bwd_sm90_hdim(const BwdParams& p, void* workspace, cudaStream_t_ stream);

}  // namespace fa3::sm90_bwd

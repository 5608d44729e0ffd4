// fa3_jax Hopper forward: the flash.h entry points (sm90_supports_fwd, sm90_fwd_workspace_bytes,
// run_fwd_sm90) and the dispatch on dtype and head dim. The launches and kernels live in
// flash_fwd_launch_template_sm90.h, instantiated per head dim in flash_fwd_hdim*_sm90.cu;
// head_dims.h selects the head dims to build (all dtypes), and the supports query reports
// exactly what was built.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>

#include "../flash.h"
#include "flash_fwd_launch_sm90.h"
#include "head_dims.h"


namespace fa3 {
namespace {

using namespace sm90_fwd;

template <DType kDType>
const char* dispatch_hdim(const FwdParams& p, void* workspace, cudaStream_t_ stream) {
#if FA3_JAX_BUILD_HDIM(64)
  if (p.head_dim == 64 && p.head_dim_v == 64)
    return run_fwd_sm90_hdim<kDType, 64, 64>(p, workspace, stream);
#endif
#if FA3_JAX_BUILD_HDIM(96)
  if (p.head_dim == 96 && p.head_dim_v == 96)
    return run_fwd_sm90_hdim<kDType, 96, 96>(p, workspace, stream);
#endif
#if FA3_JAX_BUILD_HDIM(128)
  if (p.head_dim == 128 && p.head_dim_v == 128)
    return run_fwd_sm90_hdim<kDType, 128, 128>(p, workspace, stream);
#endif
#if FA3_JAX_BUILD_HDIM(192)
  if (p.head_dim == 192 && p.head_dim_v == 192)
    return run_fwd_sm90_hdim<kDType, 192, 192>(p, workspace, stream);
  if (p.head_dim == 192 && p.head_dim_v == 128)
    return run_fwd_sm90_hdim<kDType, 192, 128>(p, workspace, stream);
#endif
#if FA3_JAX_BUILD_HDIM(256)
  if (p.head_dim == 256 && p.head_dim_v == 256)
    return run_fwd_sm90_hdim<kDType, 256, 256>(p, workspace, stream);
#endif
  return "head dim not compiled into the sm90 forward kernel";
}

// FP8 head dims: the power-of-two ones, which fp8_attention's Hadamard transform also needs.
const char* dispatch_hdim_fp8(const FwdParams& p, void* workspace, cudaStream_t_ stream) {
  constexpr DType E4M3 = DType::kFloat8E4M3;
#if FA3_JAX_BUILD_HDIM(64)
  if (p.head_dim == 64 && p.head_dim_v == 64)
    return run_fwd_sm90_hdim<E4M3, 64, 64>(p, workspace, stream);
#endif
#if FA3_JAX_BUILD_HDIM(128)
  if (p.head_dim == 128 && p.head_dim_v == 128)
    return run_fwd_sm90_hdim<E4M3, 128, 128>(p, workspace, stream);
#endif
#if FA3_JAX_BUILD_HDIM(256)
  if (p.head_dim == 256 && p.head_dim_v == 256)
    return run_fwd_sm90_hdim<E4M3, 256, 256>(p, workspace, stream);
#endif
  return "head dim not compiled into the sm90 FP8 forward kernel";
}

// The head dim pairs this build compiled (head_dims.h).
bool hdim_compiled(int64_t d, int64_t dv) {
#if FA3_JAX_BUILD_HDIM(64)
  if (d == 64 && dv == 64) return true;
#endif
#if FA3_JAX_BUILD_HDIM(96)
  if (d == 96 && dv == 96) return true;
#endif
#if FA3_JAX_BUILD_HDIM(128)
  if (d == 128 && dv == 128) return true;
#endif
#if FA3_JAX_BUILD_HDIM(192)
  if (d == 192 && (dv == 192 || dv == 128)) return true;
#endif
#if FA3_JAX_BUILD_HDIM(256)
  if (d == 256 && dv == 256) return true;
#endif
  return false;
}

}  // namespace

bool sm90_supports_fwd(const FwdParams& p) {
  if (p.dtype == DType::kFloat8E4M3) {
    // Dense only, head dims 64 / 128 / 256, per-block descales only on this kernel's tiles.
    if (p.head_dim != p.head_dim_v || (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256))
      return false;
    if (p.cu_seqlens_q || p.q_segment_ids || !p.descale_q || !p.descale_k || !p.descale_v)
      return false;
    if (p.descale_block_q > 0 || p.descale_block_k > 0) {
      sm90::FwdTileSize const ts = sm90::fwd_tile_size(int(p.head_dim), int(p.head_dim_v), true);
      if (p.descale_block_q != ts.block_m || p.descale_block_k != ts.block_n) return false;
    }
  } else if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) {
    return false;
  }
  if (!hdim_compiled(p.head_dim, p.head_dim_v)) return false;
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) return false;
  // Tile coordinates and TMA box coordinates are 32-bit.
  int64_t const kMax = int64_t(1) << 30;
  // Segment ids: 16-bit only (FP8 returned above); the prepare grids' y is the batch.
  if (p.q_segment_ids && (p.cu_seqlens_q || p.batch > 65535)) return false;
  // seqused_k: the dense 16-bit layout only (flash.h). Paged: with seqused_k, pages of a
  // multiple of 16 rows, page and pool counts within the TMA's 32-bit coordinates.
  if (p.seqused_k && (p.cu_seqlens_q || p.q_segment_ids || p.dtype == DType::kFloat8E4M3))
    return false;
  // Rows packed by the caller: whole groups of one KV head's query heads, KV cache calls only.
  if (p.packed_group != 1 &&
      (!p.seqused_k || p.packed_group < 1 || p.heads_q != p.heads_kv ||
       p.seqlen_q % p.packed_group != 0))
    return false;
  if (p.page_table) {
    // Pages of whole key blocks, or of whole kFwdPageRows-row boxes (tile_size.h).
    if (!p.seqused_k || p.page_size < 1 || p.page_size % sm90::kFwdPageRows != 0 ||
        p.num_pages >= (int64_t(1) << 30) || p.seqlen_k % p.page_size != 0 ||
        p.num_pages * (p.page_size / sm90::kFwdPageRows) >= (int64_t(1) << 30))
      return false;
  }
  if (p.cu_seqlens_q) {
    // Tiles (numbered query block, head, batch row) are numbered in int (the bound for the
    // smallest block_m); the prepare grid's y is the batch.
    if (p.num_seqs < 1 || p.num_seqs >= kMax || p.batch > 65535 ||
        int64_t(sm90::varlen_block_bound(p.seqlen_q, p.num_seqs,
                                         std::min(p.max_seqlen_q, p.seqlen_q), 64)) *
                p.heads_q * p.batch >= kMax)
      return false;
  }
  return p.seqlen_q < kMax && p.seqlen_k < kMax && p.batch * p.heads_q < kMax;
}

// The dynamic tile scheduler's counter (reset by run_fwd_sm90 on the stream) and either the
// clamped cu_seqlens (varlen: num_seqs > 0), the segment stats and hulls (q_segment_ids non-null;
// only whether it is null matters here) or, where the shapes call for split-KV, the partial
// results. The band is not among the shapes Python passes (cpp/module.cc), so the size covers
// both the packed and the unpacked GQA plan.
size_t sm90_fwd_workspace_bytes(const FwdParams& p) {
  if (p.batch <= 0 || p.seqlen_q <= 0 || p.heads_q <= 0 || p.heads_kv <= 0) return kCounterBytes;
  int const num_sms = num_sms_here();
  size_t bytes = workspace_bytes(p, plan_fwd(p, false, num_sms));
  if (packable_gqa_shape(p))
    bytes = std::max(bytes, workspace_bytes(p, plan_fwd(p, true, num_sms)));
  return bytes;
}

const char* run_fwd_sm90(const FwdParams& p, void* workspace, cudaStream_t_ stream) {
  if (!sm90_supports_fwd(p)) return "unsupported dtype or head dim for the sm90 forward";
  // Without a workspace the kernel falls back to the static round-robin schedule (dense,
  // unsplit only: split-KV reports an error).
  if (p.cu_seqlens_q && !workspace) return "the sm90 varlen forward needs its workspace";
  if (p.q_segment_ids && !workspace) return "the sm90 segment-id forward needs its workspace";
  if (p.dtype == DType::kFloat8E4M3) return dispatch_hdim_fp8(p, workspace, stream);
  if (p.dtype == DType::kFloat16) return dispatch_hdim<DType::kFloat16>(p, workspace, stream);
  return dispatch_hdim<DType::kBFloat16>(p, workspace, stream);
}

}  // namespace fa3

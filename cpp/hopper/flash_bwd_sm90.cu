// fa3_jax Hopper backward: the public entry points of flash.h (support check, workspace size,
// dispatch on head dim / dtype / softcap). The kernels live in flash_bwd_hdim*_sm90.cu.
#include <cuda_runtime.h>

#include "flash.h"
#include "flash_bwd_launch_sm90.h"

namespace fa3 {
namespace {

using sm90_bwd::run_bwd_sm90_hdim;

// #if, not expressions: with FA3_JAX_SELECTED_HDIMS an unselected FA3_BWD_HDIM<N> is an
// undefined identifier (it reads as 0 only in the preprocessor).
bool bwd_hdim_compiled(int64_t d, int64_t dv) {
#if FA3_BWD_HDIM64
  if (d == 64 && dv == 64) return true;
#endif
#if FA3_BWD_HDIM96
  if (d == 96 && dv == 96) return true;
#endif
#if FA3_BWD_HDIM128
  if (d == 128 && dv == 128) return true;
#endif
#if FA3_BWD_HDIM192
  if (d == 192 && (dv == 192 || dv == 128)) return true;
#endif
#if FA3_BWD_HDIM256
  if (d == 256 && dv == 256) return true;
#endif
  return false;
}

template <int D, int DV>
const char* run_dtype(const BwdParams& p, void* ws, cudaStream_t_ stream) {
  const bool softcap = p.softcap > 0.f;
  if (p.dtype == DType::kFloat16) {
    return softcap ? run_bwd_sm90_hdim<D, DV, DType::kFloat16, true>(p, ws, stream)
                   : run_bwd_sm90_hdim<D, DV, DType::kFloat16, false>(p, ws, stream);
  }
  return softcap ? run_bwd_sm90_hdim<D, DV, DType::kBFloat16, true>(p, ws, stream)
                 : run_bwd_sm90_hdim<D, DV, DType::kBFloat16, false>(p, ws, stream);
}

}  // namespace

bool sm90_supports_bwd(const BwdParams& p) {
  // Segment ids: dense layout only (never with cu_seqlens); the prepare grids' y is the batch.
  if (p.q_segment_ids && p.cu_seqlens_q) return false;
  // Varlen grids put the batch row on z (the prepare kernel on y) and number the blocks of its
  // sequences on x (int).
  if (p.cu_seqlens_q && (p.num_seqs < 1 || p.num_seqs >= (int64_t(1) << 30) ||
                         p.seqlen_q + p.num_seqs * 128 >= (int64_t(1) << 30) ||
                         p.seqlen_k + p.num_seqs * 128 >= (int64_t(1) << 30)))
    return false;
  return (p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16) && p.heads_kv > 0 &&
         p.heads_q % p.heads_kv == 0 && bwd_hdim_compiled(p.head_dim, p.head_dim_v) &&
         p.seqlen_q < (int64_t(1) << 30) && p.seqlen_k < (int64_t(1) << 30) && p.heads_kv <= 65535 &&
         p.batch <= 65535;
}

size_t sm90_bwd_workspace_bytes(const BwdParams& p) { return sm90_bwd::bwd_workspace_layout(p).total; }

const char* run_bwd_sm90(const BwdParams& p, void* workspace, cudaStream_t_ stream_) {
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_);  // fa3::CUstream_st vs ::CUstream_st
  if (!sm90_supports_bwd(p)) return "unsupported dtype, head dim or head counts for the sm90 backward";
  const size_t elem = 2;
  if (p.batch == 0 || p.heads_q == 0) return nullptr;
  if (p.cu_seqlens_q && !workspace) return "the sm90 varlen backward needs its workspace";
  if (p.q_segment_ids && !workspace) return "the sm90 segment-id backward needs its workspace";
  if (p.seqlen_q == 0 || p.seqlen_k == 0) {
    // No (query, key) pairs: every gradient is zero.
    const size_t nq = size_t(p.batch) * p.seqlen_q * p.heads_q * p.head_dim * elem;
    const size_t nk = size_t(p.batch) * p.seqlen_k * p.heads_kv * p.head_dim * elem;
    const size_t nv = size_t(p.batch) * p.seqlen_k * p.heads_kv * p.head_dim_v * elem;
    if ((nq && cudaMemsetAsync(p.dq, 0, nq, stream) != cudaSuccess) ||
        (nk && cudaMemsetAsync(p.dk, 0, nk, stream) != cudaSuccess) ||
        (nv && cudaMemsetAsync(p.dv, 0, nv, stream) != cudaSuccess)) {
      return "cudaMemsetAsync of the sm90 backward gradients failed";
    }
    return nullptr;
  }
  switch (p.head_dim) {
#if FA3_BWD_HDIM64
    case 64: return run_dtype<64, 64>(p, workspace, stream_);
#endif
#if FA3_BWD_HDIM96
    case 96: return run_dtype<96, 96>(p, workspace, stream_);
#endif
#if FA3_BWD_HDIM128
    case 128: return run_dtype<128, 128>(p, workspace, stream_);
#endif
#if FA3_BWD_HDIM192
    case 192: return p.head_dim_v == 128 ? run_dtype<192, 128>(p, workspace, stream_)
                                         : run_dtype<192, 192>(p, workspace, stream_);
#endif
#if FA3_BWD_HDIM256
    case 256: return run_dtype<256, 256>(p, workspace, stream_);
#endif
    default: break;
  }
  return "head dim not compiled into the sm90 backward kernel";
}

}  // namespace fa3

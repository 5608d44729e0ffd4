// fa3_jax Hopper forward: the flash.h entry points (sm90_supports_fwd, sm90_fwd_workspace_bytes,
// run_fwd_sm90) and the one list of compiled instantiations.
//
// Instantiations: {fp16, bf16} x head dims {64, 96, 128, 192, 256} plus (192, dv 128).
// head_dims.h selects the head dims to build (both dtypes); the supports query then reports
// exactly what was built.
#ifndef CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED  // WGMMA N = 80, 112 (see flash_fwd_traits_sm90.h)
#endif

#include <cuda_runtime.h>

#include <algorithm>

#include "../cuda_device.h"
#include "../flash.h"
#include "flash_fwd_kernel_sm90.h"
#include "head_dims.h"
#include "tile_size.h"

#define FA3_JAX_FWD_HDIM(N) FA3_JAX_BUILD_HDIM(N)

namespace fa3 {
namespace {

using namespace cute;

// Workspace: the tile counter (16 bytes), then with cu_seqlens their clamped copies.
constexpr size_t kCounterBytes = 16;

template <class Element, int kHeadDim, int kHeadDimV>
const char* launch_fwd(const FwdParams& p, void* workspace, cudaStream_t stream) {
  constexpr sm90::FwdTileSize ts = sm90::fwd_tile_size(kHeadDim, kHeadDimV);
  using Traits = sm90::FwdTraits<kHeadDim, kHeadDimV, ts.block_m, ts.block_n, ts.stages,
                                 ts.producer_regs, ts.consumer_regs, Element>;
  using ShapeQKV = typename Traits::ShapeQKV;
  using StrideQKV = typename Traits::StrideQKV;

  int const b = int(p.batch), sq = int(p.seqlen_q), sk = int(p.seqlen_k);
  int const hq = int(p.heads_q), hkv = int(p.heads_kv);
  if (b == 0 || sq == 0 || hq == 0) return nullptr;
  // TMA boxes need non-empty tensors; with seqlen_k == 0 every tile is empty and none loads.
  int const sk_tma = std::max(sk, 1);

  typename Traits::Params kp;
  kp.shape_q = ShapeQKV(sq, kHeadDim, hq, b);
  kp.shape_k = ShapeQKV(sk_tma, kHeadDim, hkv, b);
  kp.shape_v = ShapeQKV(sk_tma, kHeadDimV, hkv, b);
  StrideQKV const stride_q(int64_t(hq) * kHeadDim, _1{}, int64_t(kHeadDim),
                           int64_t(sq) * hq * kHeadDim);
  StrideQKV const stride_k(int64_t(hkv) * kHeadDim, _1{}, int64_t(kHeadDim),
                           int64_t(sk) * hkv * kHeadDim);
  StrideQKV const stride_v(int64_t(hkv) * kHeadDimV, _1{}, int64_t(kHeadDimV),
                           int64_t(sk) * hkv * kHeadDimV);
  auto gmem = [](const void* ptr) { return make_gmem_ptr(static_cast<Element const*>(ptr)); };
  kp.tma_q = make_tma_copy(SM90_TMA_LOAD{}, make_tensor(gmem(p.q), kp.shape_q, stride_q),
                           typename Traits::SmemLayoutQ{},
                           select<0, 2>(typename Traits::TileShapeQK{}), _1{});
  kp.tma_k = make_tma_copy(SM90_TMA_LOAD{}, make_tensor(gmem(p.k), kp.shape_k, stride_k),
                           take<0, 2>(typename Traits::SmemLayoutK{}),
                           select<1, 2>(typename Traits::TileShapeQK{}), _1{});
  kp.tma_v = make_tma_copy(SM90_TMA_LOAD{}, make_tensor(gmem(p.v), kp.shape_v, stride_v),
                           take<0, 2>(typename Traits::SmemLayoutV{}),
                           select<2, 1>(typename Traits::TileShapePV{}), _1{});

  // Clamping the band to [-seqlen_q, seqlen_k] keeps its meaning and all index math in int.
  int64_t const lo = std::clamp<int64_t>(p.diag_lo, -int64_t(sq), int64_t(sk));
  int64_t const hi = std::clamp<int64_t>(p.diag_hi, -int64_t(sq), int64_t(sk));
  kp.mask = {sq, sk, int(lo), int(hi)};

  // Varlen: tiles are (m_block, head, (batch row, sequence)); the grid covers the longest
  // sequence the caller promises (max_seqlen_q), and each tile finds its sequence on the device.
  bool const varlen = p.cu_seqlens_q != nullptr;
  int const seqs = varlen ? int(p.num_seqs) : 1;
  int const span_q = varlen ? int(std::min<int64_t>(p.max_seqlen_q, sq)) : sq;
  int const span_k = varlen ? int(std::min<int64_t>(p.max_seqlen_k, sk)) : sk;
  bool longest_first = hi < sk;
  if (varlen) {
    int* cu = reinterpret_cast<int*>(static_cast<char*>(workspace) + kCounterBytes);
    sm90::VarlenPrepParams prep;
    prep.raw_q = p.cu_seqlens_q;
    prep.raw_k = p.cu_seqlens_k;
    prep.cu_q = cu;
    prep.cu_k = cu + b * (seqs + 1);
    prep.batch = b;
    prep.num_seqs = seqs;
    prep.seqlen_q = sq;
    prep.seqlen_k = sk;
    prep.fill[0] = {p.out, int64_t(hq) * kHeadDimV * int64_t(sizeof(Element)), false};
    prep.lse = p.lse;
    prep.lse_heads = hq;
    if (!sm90::launch_varlen_prepare(prep, stream)) return "sm90 varlen prepare kernel launch failed";
    // Pre-clamped to +-(sq + sk) (< 2^31 by sm90_supports_fwd): the per-sequence band keeps its
    // meaning (sm90::varlen_diag).
    int64_t const far = int64_t(sq) + sk;
    kp.varlen = {prep.cu_q, prep.cu_k, seqs, int(std::clamp<int64_t>(p.diag_lo, -far, far)),
                 int(std::clamp<int64_t>(p.diag_hi, -far, far))};
    longest_first = p.diag_hi < span_k;
  }

  cuda::DeviceFacts const& dev = cuda::device_facts(cuda::current_device());
  int const qheads_per_kvhead = hq / hkv;
  int const num_m_blocks = (span_q + ts.block_m - 1) / ts.block_m;
  int const num_hb = hq * b * seqs;
  // K/V bytes one (head, sequence) pair pulls through L2 (shared by the query heads of a group).
  int64_t const kv_bytes = std::max<int64_t>(
      1, int64_t(span_k) * (kHeadDim + kHeadDimV) * sizeof(Element) / qheads_per_kvhead);
  int const group = int(std::clamp<int64_t>(int64_t(dev.l2_bytes) / 2 / kv_bytes, 1, num_hb));
  kp.sched = {num_m_blocks, hq, num_hb, group, num_m_blocks * num_hb, longest_first};
  kp.qheads_per_kvhead = qheads_per_kvhead;
  int const grid = std::min(kp.sched.num_tiles, std::max(dev.num_sms, 1));
  // With at most one tile per CTA there is nothing to balance: no counter and no memset (short
  // calls then cost one launch).
  int* tile_counter = static_cast<int*>(workspace);
  kp.tile_counter = kp.sched.num_tiles > grid ? tile_counter : nullptr;
  if (kp.tile_counter && cudaMemsetAsync(kp.tile_counter, 0, sizeof(int), stream) != cudaSuccess)
    return "cannot reset the sm90 forward tile counter";

  constexpr float kLog2e = 1.4426950408889634f;
  kp.has_softcap = p.softcap > 0.f;
  kp.softcap_pre = kp.has_softcap ? p.softmax_scale / p.softcap : 0.f;
  kp.scale_log2 = (kp.has_softcap ? p.softcap : p.softmax_scale) * kLog2e;
  kp.out = static_cast<Element*>(p.out);
  kp.out_row_stride = int64_t(hq) * kHeadDimV;
  kp.out_batch_stride = int64_t(sq) * hq * kHeadDimV;
  kp.lse = p.lse;

  auto kernel = sm90::flash_fwd_kernel_sm90<Traits>;
  constexpr int kSmemBytes = sizeof(typename Traits::SharedStorage);
  static cuda::PerDevice<cudaError_t> smem_limit_set;
  if (cuda::set_smem_limit_once(smem_limit_set, kernel, kSmemBytes) != cudaSuccess)
    return "cannot raise the shared-memory limit of the sm90 forward kernel";
  kernel<<<grid, Traits::kNumThreads, kSmemBytes, reinterpret_cast<cudaStream_t>(stream)>>>(kp);
  if (cuda::launch_failed()) return "sm90 forward kernel launch failed";
  return nullptr;
}

template <class Element>
const char* dispatch_hdim(const FwdParams& p, void* workspace, cudaStream_t stream) {
#if FA3_JAX_FWD_HDIM(64)
  if (p.head_dim == 64 && p.head_dim_v == 64)
    return launch_fwd<Element, 64, 64>(p, workspace, stream);
#endif
#if FA3_JAX_FWD_HDIM(96)
  if (p.head_dim == 96 && p.head_dim_v == 96)
    return launch_fwd<Element, 96, 96>(p, workspace, stream);
#endif
#if FA3_JAX_FWD_HDIM(128)
  if (p.head_dim == 128 && p.head_dim_v == 128)
    return launch_fwd<Element, 128, 128>(p, workspace, stream);
#endif
#if FA3_JAX_FWD_HDIM(192)
  if (p.head_dim == 192 && p.head_dim_v == 192)
    return launch_fwd<Element, 192, 192>(p, workspace, stream);
  if (p.head_dim == 192 && p.head_dim_v == 128)
    return launch_fwd<Element, 192, 128>(p, workspace, stream);
#endif
#if FA3_JAX_FWD_HDIM(256)
  if (p.head_dim == 256 && p.head_dim_v == 256)
    return launch_fwd<Element, 256, 256>(p, workspace, stream);
#endif
  return "head dim not compiled into the sm90 forward kernel";
}

// #if, not expressions: with FA3_JAX_SELECTED_HDIMS an unselected FA3_JAX_FWD_HDIM(N) is an
// undefined identifier (it reads as 0 only in the preprocessor).
bool hdim_compiled(int64_t d, int64_t dv) {
#if FA3_JAX_FWD_HDIM(64)
  if (d == 64 && dv == 64) return true;
#endif
#if FA3_JAX_FWD_HDIM(96)
  if (d == 96 && dv == 96) return true;
#endif
#if FA3_JAX_FWD_HDIM(128)
  if (d == 128 && dv == 128) return true;
#endif
#if FA3_JAX_FWD_HDIM(192)
  if (d == 192 && (dv == 192 || dv == 128)) return true;
#endif
#if FA3_JAX_FWD_HDIM(256)
  if (d == 256 && dv == 256) return true;
#endif
  return false;
}

}  // namespace

bool sm90_supports_fwd(const FwdParams& p) {
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return false;
  if (!hdim_compiled(p.head_dim, p.head_dim_v)) return false;
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) return false;
  // Tile coordinates and TMA box coordinates are 32-bit.
  int64_t const kMax = int64_t(1) << 30;
  if (p.q_segment_ids) return false;  // segment ids: CPU backend only
  if (p.cu_seqlens_q) {
    // Tiles (m_block, head, sequence) are numbered in int; the prepare grid's y is the batch.
    int64_t const m_blocks = (std::min(p.max_seqlen_q, p.seqlen_q) + 127) / 128;
    if (p.num_seqs < 1 || p.batch > 65535 ||
        m_blocks * p.heads_q * p.batch * p.num_seqs >= kMax)
      return false;
  }
  return p.seqlen_q < kMax && p.seqlen_k < kMax && p.batch * p.heads_q < kMax;
}

// The dynamic tile scheduler's counter (reset by run_fwd_sm90 on the stream), then with
// cu_seqlens (num_seqs > 0) their clamped copies (varlen_sm90.h).
size_t sm90_fwd_workspace_bytes(const FwdParams& p) {
  return kCounterBytes + (p.num_seqs > 0 ? sm90::varlen_workspace_bytes(p.batch, p.num_seqs) : 0);
}

const char* run_fwd_sm90(const FwdParams& p, void* workspace, cudaStream_t_ stream) {
  if (!sm90_supports_fwd(p)) return "unsupported dtype or head dim for the sm90 forward";
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  // Without a workspace the kernel falls back to the static round-robin schedule (dense only).
  if (p.cu_seqlens_q && !workspace) return "the sm90 varlen forward needs its workspace";
  if (p.dtype == DType::kFloat16) return dispatch_hdim<cutlass::half_t>(p, workspace, s);
  return dispatch_hdim<cutlass::bfloat16_t>(p, workspace, s);
}

}  // namespace fa3

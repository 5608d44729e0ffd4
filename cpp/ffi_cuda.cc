// XLA FFI handlers of the Hopper backend: validate, fill params, and call the sm90 kernels on
// XLA's stream, on XLA's device. Host-only; never includes CuTe.
//
// Multi-GPU: one process drives every local GPU, each from its own XLA thread. Each call makes the
// device XLA names (the DeviceOrdinal context) current for its duration; what the kernels need per
// device (compute capability, SM count, shared-memory limits) is cached per device in
// cuda_device.h, so no call queries device properties or sets attributes after the first.
//
// Workspace: the last result of each custom call is a uint8 buffer XLA allocates (sized in Python
// from sm90_*_workspace_bytes, which the nanobind module exposes), so XLA owns every byte, counts
// it in memory_analysis(), and nothing here allocates.
//
// Command buffers (CUDA graphs): a call issues only stream-ordered work (memsets and kernel
// launches) whose arguments are XLA buffers and the call's attributes; no host-side state changes
// between replays. The handlers declare kCmdBufferCompatible.
#include <cuda_runtime.h>

#include <atomic>
#include <string>

#include "cuda_device.h"
#include "ffi_common.h"
#include "ffi_handlers.h"

namespace fa3 {
namespace {

namespace ffi = xla::ffi;
using ffi_util::fill_bwd;
using ffi_util::fill_fwd;
using ffi_util::fill_fwd_outputs;
using ffi_util::invalid;

// Handler executions, and those that ran while XLA was capturing the stream into a command buffer
// (a CUDA graph, replayed later without calling the handler): see fa3_cuda_call_stats.
std::atomic<int64_t> g_calls{0}, g_captured{0};

void count_call(cudaStream_t stream) {
  g_calls.fetch_add(1, std::memory_order_relaxed);
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &st) == cudaSuccess && st == cudaStreamCaptureStatusActive)
    g_captured.fetch_add(1, std::memory_order_relaxed);
}

std::string device_name(int device) { return "CUDA device " + std::to_string(device); }

// Makes `device` current on this thread for one handler call, then restores the previous one.
class ScopedDevice {
 public:
  explicit ScopedDevice(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (previous_ != device) {
      status_ = cudaSetDevice(device);
      switched_ = status_ == cudaSuccess && previous_ >= 0;
    }
  }
  ~ScopedDevice() {
    if (switched_) cudaSetDevice(previous_);
  }
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;
  cudaError_t status() const { return status_; }

 private:
  int previous_ = -1;
  bool switched_ = false;
  cudaError_t status_ = cudaSuccess;
};

ffi::Error cuda_error(const std::string& what, int device, cudaError_t e) {
  return ffi::Error(ffi::ErrorCode::kInternal, "fa3_jax: " + what + " on " + device_name(device) +
                                                   ": " + cudaGetErrorName(e) + " (" +
                                                   cudaGetErrorString(e) + ")");
}

// Everything a call does before touching its buffers: the device is current and is a Hopper GPU.
ffi::Error enter_device(const ScopedDevice& scope, int device) {
  if (scope.status() != cudaSuccess)
    return cuda_error("cannot make the device current", device, scope.status());
  const cuda::DeviceFacts& f = cuda::device_facts(device);
  if (f.status != cudaSuccess) return cuda_error("cannot query the device", device, f.status);
  if (f.major != 9)
    return ffi::Error(ffi::ErrorCode::kUnimplemented,
                      "fa3_jax: the CUDA kernels need a Hopper GPU (sm_90); " +
                          device_name(device) + " is sm_" + std::to_string(f.major * 10 + f.minor));
  cudaGetLastError();  // an error some earlier runtime call left on this thread is not ours
  return ffi::Error::Success();
}

// A launcher's failure names the kernel; the CUDA error it left in place names the cause.
ffi::Error launch_result(const char* err, int device) {
  cudaError_t const e = cudaGetLastError();
  if (!err && e == cudaSuccess) return ffi::Error::Success();
  std::string what = err ? err : "an sm90 kernel launch failed";
  if (e == cudaSuccess)
    return ffi::Error(ffi::ErrorCode::kInternal, "fa3_jax: " + what + " on " + device_name(device));
  return cuda_error(what, device, e);
}

ffi::Error check_workspace(const ffi::AnyBuffer& ws, size_t need) {
  if (ws.element_type() != ffi::DataType::U8 || ws.size_bytes() < need)
    return invalid("the workspace result must be a uint8 buffer of at least " +
                   std::to_string(need) + " bytes, got " + std::to_string(ws.size_bytes()) +
                   " bytes (the Python lowering sizes it with sm90_*_workspace_bytes)");
  return ffi::Error::Success();
}

std::string hdim_str(const FwdParams& p) {
  return "head_dim=" + std::to_string(p.head_dim) + ", head_dim_v=" + std::to_string(p.head_dim_v);
}

// The forward after its params are filled: outputs, support check, workspace, launch.
ffi::Error launch_fwd(cudaStream_t stream, int32_t device, FwdParams& p,
                      ffi::Result<ffi::AnyBuffer>& out, ffi::Result<ffi::AnyBuffer>& lse,
                      ffi::Result<ffi::AnyBuffer>& workspace) {
  if (auto e = fill_fwd_outputs(p, &*out, &*lse); e.failure()) return e;
  p.out = out->untyped_data();
  p.lse = static_cast<float*>(lse->untyped_data());
  if (!sm90_supports_fwd(p))
    return invalid("this build has no Hopper forward kernel for " + hdim_str(p) +
                   " with this dtype (fp16/bf16 only)" +
                   (p.cu_seqlens_q ? std::string(", or this varlen call has too many tiles "
                                                 "(batch * num_seqs * heads * max_seqlen_q / 128 "
                                                 ">= 2^30) or batch > 65535")
                                   : std::string()) +
                   (p.q_segment_ids ? std::string(", or this segment-id call has batch > 65535")
                                    : std::string()));
  if (auto e = check_workspace(*workspace, sm90_fwd_workspace_bytes(p)); e.failure()) return e;
  return launch_result(run_fwd_sm90(p, workspace->untyped_data(), stream), device);
}

ffi::Error fwd_cuda(cudaStream_t stream, int32_t device, ffi::AnyBuffer q, ffi::AnyBuffer k,
                    ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer> out,
                    ffi::Result<ffi::AnyBuffer> lse, ffi::Result<ffi::AnyBuffer> workspace,
                    float softmax_scale, float softcap, int64_t diag_lo, int64_t diag_hi) {
  ScopedDevice scope(device);
  if (auto e = enter_device(scope, device); e.failure()) return e;
  count_call(stream);
  FwdParams p;
  if (auto e = fill_fwd(q, k, v, softmax_scale, softcap, diag_lo, diag_hi, &p); e.failure())
    return e;
  return launch_fwd(stream, device, p, out, lse, workspace);
}

// Varlen: cu_seqlens stay on the device (the kernels clamp them, flash.h); only their shape is
// checked here.
ffi::Error fwd_varlen_cuda(cudaStream_t stream, int32_t device, ffi::AnyBuffer q,
                           ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer cu_q,
                           ffi::AnyBuffer cu_k, ffi::Result<ffi::AnyBuffer> out,
                           ffi::Result<ffi::AnyBuffer> lse, ffi::Result<ffi::AnyBuffer> workspace,
                           float softmax_scale, float softcap, int64_t diag_lo, int64_t diag_hi,
                           int64_t max_seqlen_q, int64_t max_seqlen_k) {
  ScopedDevice scope(device);
  if (auto e = enter_device(scope, device); e.failure()) return e;
  count_call(stream);
  FwdParams p;
  if (auto e = fill_fwd(q, k, v, softmax_scale, softcap, diag_lo, diag_hi, &p); e.failure())
    return e;
  if (auto e = ffi_util::fill_varlen(cu_q, cu_k, max_seqlen_q, max_seqlen_k, &p); e.failure())
    return e;
  return launch_fwd(stream, device, p, out, lse, workspace);
}

// KV cache: seqused_k stays on the device (the kernel clamps it, flash.h); only its shape is
// checked here.
ffi::Error fwd_kvcache_cuda(cudaStream_t stream, int32_t device, ffi::AnyBuffer q,
                            ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer seqused_k,
                            ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                            ffi::Result<ffi::AnyBuffer> workspace, float softmax_scale,
                            float softcap, int64_t diag_lo, int64_t diag_hi, int64_t num_splits,
                            int64_t packed_group) {
  ScopedDevice scope(device);
  if (auto e = enter_device(scope, device); e.failure()) return e;
  count_call(stream);
  FwdParams p;
  if (auto e = fill_fwd(q, k, v, softmax_scale, softcap, diag_lo, diag_hi, &p); e.failure())
    return e;
  if (auto e = ffi_util::fill_seqused(seqused_k, num_splits, &p); e.failure()) return e;
  if (auto e = ffi_util::fill_packed_group(packed_group, &p); e.failure()) return e;
  return launch_fwd(stream, device, p, out, lse, workspace);
}

// Paged KV cache: the page table stays on the device too (out-of-range pages read as zeros).
ffi::Error fwd_kvcache_paged_cuda(cudaStream_t stream, int32_t device, ffi::AnyBuffer q,
                                  ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer seqused_k,
                                  ffi::AnyBuffer page_table, ffi::Result<ffi::AnyBuffer> out,
                                  ffi::Result<ffi::AnyBuffer> lse,
                                  ffi::Result<ffi::AnyBuffer> workspace, float softmax_scale,
                                  float softcap, int64_t diag_lo, int64_t diag_hi,
                                  int64_t num_splits, int64_t packed_group) {
  ScopedDevice scope(device);
  if (auto e = enter_device(scope, device); e.failure()) return e;
  count_call(stream);
  FwdParams p;
  if (auto e = fill_fwd(q, k, v, softmax_scale, softcap, diag_lo, diag_hi, &p, false, true);
      e.failure())
    return e;
  if (auto e = ffi_util::fill_paged(page_table, &p); e.failure()) return e;
  if (auto e = ffi_util::fill_seqused(seqused_k, num_splits, &p); e.failure()) return e;
  if (auto e = ffi_util::fill_packed_group(packed_group, &p); e.failure()) return e;
  return launch_fwd(stream, device, p, out, lse, workspace);
}

// Segment ids: the ids stay on the device (their values are the mask, not shapes); only their
// shapes are checked here. max_seqlen_* are bound for symmetry with the CPU target and unused.
ffi::Error fwd_segments_cuda(cudaStream_t stream, int32_t device, ffi::AnyBuffer q,
                             ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer q_ids,
                             ffi::AnyBuffer kv_ids, ffi::Result<ffi::AnyBuffer> out,
                             ffi::Result<ffi::AnyBuffer> lse,
                             ffi::Result<ffi::AnyBuffer> workspace, float softmax_scale,
                             float softcap, int64_t diag_lo, int64_t diag_hi, int64_t,
                             int64_t) {
  ScopedDevice scope(device);
  if (auto e = enter_device(scope, device); e.failure()) return e;
  count_call(stream);
  FwdParams p;
  if (auto e = fill_fwd(q, k, v, softmax_scale, softcap, diag_lo, diag_hi, &p); e.failure())
    return e;
  if (auto e = ffi_util::fill_segments(q_ids, kv_ids, &p); e.failure()) return e;
  return launch_fwd(stream, device, p, out, lse, workspace);
}

// FP8 forward: float8_e4m3fn q, k, v with float32 descales (flash.h, "FP8"); out bfloat16. The
// kernel transposes v into its workspace first (cpp/hopper/fp8_vt_sm90.h).
ffi::Error fwd_fp8_cuda(cudaStream_t stream, int32_t device, ffi::AnyBuffer q, ffi::AnyBuffer k,
                        ffi::AnyBuffer v, ffi::AnyBuffer descale_q, ffi::AnyBuffer descale_k,
                        ffi::AnyBuffer descale_v, ffi::Result<ffi::AnyBuffer> out,
                        ffi::Result<ffi::AnyBuffer> lse, ffi::Result<ffi::AnyBuffer> workspace,
                        float softmax_scale, float softcap, int64_t diag_lo, int64_t diag_hi,
                        int64_t descale_block_q, int64_t descale_block_k) {
  ScopedDevice scope(device);
  if (auto e = enter_device(scope, device); e.failure()) return e;
  count_call(stream);
  FwdParams p;
  if (auto e = fill_fwd(q, k, v, softmax_scale, softcap, diag_lo, diag_hi, &p, /*fp8=*/true);
      e.failure())
    return e;
  if (auto e = fill_fwd_outputs(p, &*out, &*lse); e.failure()) return e;
  if (auto e = ffi_util::fill_fp8_descales(descale_q, descale_k, descale_v, descale_block_q,
                                           descale_block_k, *out, &p);
      e.failure())
    return e;
  p.out = out->untyped_data();
  p.lse = static_cast<float*>(lse->untyped_data());
  if (!sm90_supports_fwd(p))
    return invalid("this build has no Hopper FP8 forward kernel for " + hdim_str(p) +
                   " (FP8 takes head_dim == head_dim_v in {64, 128, 256}, built ones only), or "
                   "the per-block descales are not on the kernel's tiles (descale_block_q, "
                   "descale_block_k = " + std::to_string(p.descale_block_q) + ", " +
                   std::to_string(p.descale_block_k) + "; fa3_jax.fp8.scale_blocks gives them)");
  if (auto e = check_workspace(*workspace, sm90_fwd_workspace_bytes(p)); e.failure()) return e;
  return launch_result(run_fwd_sm90(p, workspace->untyped_data(), stream), device);
}

// FP8 quantization of one tensor (flash.h): x8 and its descales; the workspace holds the group
// maxima of the per-tensor form.
ffi::Error fp8_quantize_cuda(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                             ffi::AnyBuffer signs, ffi::Result<ffi::AnyBuffer> x8,
                             ffi::Result<ffi::AnyBuffer> descale,
                             ffi::Result<ffi::AnyBuffer> workspace, int64_t block_rows,
                             int64_t heads_kv, bool hadamard) {
  ScopedDevice scope(device);
  if (auto e = enter_device(scope, device); e.failure()) return e;
  count_call(stream);
  Fp8QuantizeParams p;
  if (auto e = ffi_util::fill_fp8_quantize(x, signs, *x8, *descale, block_rows, heads_kv,
                                           hadamard, &p);
      e.failure())
    return e;
  if (!sm90_supports_fp8_quantize(p))
    return invalid("the Hopper FP8 quantization takes head_dim 64, 128 or 256 and blocks of at "
                   "most 128 rows, got head_dim=" + std::to_string(p.head_dim) +
                   ", block_rows=" + std::to_string(p.block_rows));
  if (auto e = check_workspace(*workspace, sm90_fp8_quantize_workspace_bytes(p)); e.failure())
    return e;
  return launch_result(run_fp8_quantize_sm90(p, workspace->untyped_data(), stream), device);
}

// The backward after its params are filled: support check, workspace, launch.
ffi::Error launch_bwd(cudaStream_t stream, int32_t device, const BwdParams& p,
                      ffi::Result<ffi::AnyBuffer>& workspace) {
  if (!sm90_supports_bwd(p))
    return invalid("this build has no Hopper backward kernel for " + hdim_str(p) +
                   " with this dtype (fp16/bf16 only)" +
                   (p.cu_seqlens_q ? std::string(", or this varlen call has batch * num_seqs > 65535")
                                   : std::string()));
  if (auto e = check_workspace(*workspace, sm90_bwd_workspace_bytes(p)); e.failure()) return e;
  return launch_result(run_bwd_sm90(p, workspace->untyped_data(), stream), device);
}

ffi::Error bwd_cuda(cudaStream_t stream, int32_t device, ffi::AnyBuffer q, ffi::AnyBuffer k,
                    ffi::AnyBuffer v, ffi::AnyBuffer out, ffi::AnyBuffer lse, ffi::AnyBuffer dout,
                    ffi::AnyBuffer dlse, ffi::Result<ffi::AnyBuffer> dq,
                    ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                    ffi::Result<ffi::AnyBuffer> workspace, float softmax_scale, float softcap,
                    int64_t diag_lo, int64_t diag_hi, bool deterministic) {
  ScopedDevice scope(device);
  if (auto e = enter_device(scope, device); e.failure()) return e;
  count_call(stream);
  BwdParams p;
  if (auto e = fill_bwd(q, k, v, out, lse, dout, dlse, *dq, *dk, *dv, softmax_scale, softcap,
                        diag_lo, diag_hi, deterministic, &p);
      e.failure())
    return e;
  return launch_bwd(stream, device, p, workspace);
}

ffi::Error bwd_varlen_cuda(cudaStream_t stream, int32_t device, ffi::AnyBuffer q,
                           ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer out,
                           ffi::AnyBuffer lse, ffi::AnyBuffer dout, ffi::AnyBuffer dlse,
                           ffi::AnyBuffer cu_q, ffi::AnyBuffer cu_k,
                           ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                           ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> workspace,
                           float softmax_scale, float softcap, int64_t diag_lo, int64_t diag_hi,
                           bool deterministic, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  ScopedDevice scope(device);
  if (auto e = enter_device(scope, device); e.failure()) return e;
  count_call(stream);
  BwdParams p;
  if (auto e = fill_bwd(q, k, v, out, lse, dout, dlse, *dq, *dk, *dv, softmax_scale, softcap,
                        diag_lo, diag_hi, deterministic, &p);
      e.failure())
    return e;
  if (auto e = ffi_util::fill_varlen(cu_q, cu_k, max_seqlen_q, max_seqlen_k, &p); e.failure())
    return e;
  return launch_bwd(stream, device, p, workspace);
}

ffi::Error bwd_segments_cuda(cudaStream_t stream, int32_t device, ffi::AnyBuffer q,
                             ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer out,
                             ffi::AnyBuffer lse, ffi::AnyBuffer dout, ffi::AnyBuffer dlse,
                             ffi::AnyBuffer q_ids, ffi::AnyBuffer kv_ids,
                             ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                             ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> workspace,
                             float softmax_scale, float softcap, int64_t diag_lo, int64_t diag_hi,
                             bool deterministic, int64_t, int64_t) {
  ScopedDevice scope(device);
  if (auto e = enter_device(scope, device); e.failure()) return e;
  count_call(stream);
  BwdParams p;
  if (auto e = fill_bwd(q, k, v, out, lse, dout, dlse, *dq, *dk, *dv, softmax_scale, softcap,
                        diag_lo, diag_hi, deterministic, &p);
      e.failure())
    return e;
  if (auto e = ffi_util::fill_segments(q_ids, kv_ids, &p); e.failure()) return e;
  return launch_bwd(stream, device, p, workspace);
}

}  // namespace
}  // namespace fa3

void fa3_cuda_call_stats(int64_t* calls, int64_t* captured) {
  *calls = fa3::g_calls.load();
  *captured = fa3::g_captured.load();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    fa3_fwd_cuda, fa3::fwd_cuda,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()  // XLA's stream for this op
        .Ctx<xla::ffi::DeviceOrdinal>()                 // the device that stream belongs to
        .Arg<xla::ffi::AnyBuffer>()                     // q
        .Arg<xla::ffi::AnyBuffer>()                     // k
        .Arg<xla::ffi::AnyBuffer>()                     // v
        .Ret<xla::ffi::AnyBuffer>()                     // out
        .Ret<xla::ffi::AnyBuffer>()                     // lse
        .Ret<xla::ffi::AnyBuffer>()                     // workspace (uint8, XLA-allocated)
            FA3_JAX_MASK_ATTRS,
    {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    fa3_fwd_kvcache_cuda, fa3::fwd_kvcache_cuda,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::DeviceOrdinal>()
        .Arg<xla::ffi::AnyBuffer>()  // q
        .Arg<xla::ffi::AnyBuffer>()  // k (the cache)
        .Arg<xla::ffi::AnyBuffer>()  // v
        .Arg<xla::ffi::AnyBuffer>()  // seqused_k int32 [batch]
        .Ret<xla::ffi::AnyBuffer>()  // out
        .Ret<xla::ffi::AnyBuffer>()  // lse
        .Ret<xla::ffi::AnyBuffer>()  // workspace (uint8, XLA-allocated)
            FA3_JAX_MASK_ATTRS
        .Attr<int64_t>("num_splits")     // split-KV ranges (0: heuristic)
        .Attr<int64_t>("packed_group"),  // GQA rows packed by the caller (1: none; flash.h)
    {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    fa3_fwd_kvcache_paged_cuda, fa3::fwd_kvcache_paged_cuda,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::DeviceOrdinal>()
        .Arg<xla::ffi::AnyBuffer>()  // q
        .Arg<xla::ffi::AnyBuffer>()  // k pool [num_pages, page_size, heads_kv, head_dim]
        .Arg<xla::ffi::AnyBuffer>()  // v pool
        .Arg<xla::ffi::AnyBuffer>()  // seqused_k int32 [batch]
        .Arg<xla::ffi::AnyBuffer>()  // page_table int32 [batch, max_pages_per_seq]
        .Ret<xla::ffi::AnyBuffer>()  // out
        .Ret<xla::ffi::AnyBuffer>()  // lse
        .Ret<xla::ffi::AnyBuffer>()  // workspace (uint8, XLA-allocated)
            FA3_JAX_MASK_ATTRS
        .Attr<int64_t>("num_splits")
        .Attr<int64_t>("packed_group"),
    {xla::ffi::Traits::kCmdBufferCompatible});

// The packed targets (varlen: cu_seqlens int32 [batch, num_seqs + 1]; segment ids: int32
// [batch, seqlen_q] / [batch, seqlen_k]) share one binding each way, as in ffi_cpu.cc. Segment
// calls ignore max_seqlen_* (the CPU target's binding).
#define FA3_JAX_CUDA_PACKED_FWD(NAME, HANDLER)                                              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                            \
      NAME, HANDLER,                                                                        \
      xla::ffi::Ffi::Bind()                                                                 \
          .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()                                    \
          .Ctx<xla::ffi::DeviceOrdinal>()                                                   \
          .Arg<xla::ffi::AnyBuffer>() /* q */                                               \
          .Arg<xla::ffi::AnyBuffer>() /* k */                                               \
          .Arg<xla::ffi::AnyBuffer>() /* v */                                               \
          .Arg<xla::ffi::AnyBuffer>() /* cu_seqlens_q or q_segment_ids */                   \
          .Arg<xla::ffi::AnyBuffer>() /* cu_seqlens_k or kv_segment_ids */                  \
          .Ret<xla::ffi::AnyBuffer>() /* out */                                             \
          .Ret<xla::ffi::AnyBuffer>() /* lse */                                             \
          .Ret<xla::ffi::AnyBuffer>() /* workspace (uint8; flash_fwd_sm90.cu's layout) */   \
              FA3_JAX_MASK_ATTRS                                                            \
          .Attr<int64_t>("max_seqlen_q") /* bound on every query sequence (grid size) */    \
          .Attr<int64_t>("max_seqlen_k"), /* bound on every key sequence */                 \
      {xla::ffi::Traits::kCmdBufferCompatible})

#define FA3_JAX_CUDA_PACKED_BWD(NAME, HANDLER)                                              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                            \
      NAME, HANDLER,                                                                        \
      xla::ffi::Ffi::Bind()                                                                 \
          .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()                                    \
          .Ctx<xla::ffi::DeviceOrdinal>()                                                   \
          .Arg<xla::ffi::AnyBuffer>() /* q */                                               \
          .Arg<xla::ffi::AnyBuffer>() /* k */                                               \
          .Arg<xla::ffi::AnyBuffer>() /* v */                                               \
          .Arg<xla::ffi::AnyBuffer>() /* out */                                             \
          .Arg<xla::ffi::AnyBuffer>() /* lse */                                             \
          .Arg<xla::ffi::AnyBuffer>() /* dout */                                            \
          .Arg<xla::ffi::AnyBuffer>() /* dlse */                                            \
          .Arg<xla::ffi::AnyBuffer>() /* cu_seqlens_q or q_segment_ids */                   \
          .Arg<xla::ffi::AnyBuffer>() /* cu_seqlens_k or kv_segment_ids */                  \
          .Ret<xla::ffi::AnyBuffer>() /* dq */                                              \
          .Ret<xla::ffi::AnyBuffer>() /* dk */                                              \
          .Ret<xla::ffi::AnyBuffer>() /* dv */                                              \
          .Ret<xla::ffi::AnyBuffer>() /* workspace (uint8; flash_bwd_launch_sm90.h) */      \
              FA3_JAX_MASK_ATTRS                                                            \
          .Attr<bool>("deterministic")                                                      \
          .Attr<int64_t>("max_seqlen_q")                                                    \
          .Attr<int64_t>("max_seqlen_k"),                                                   \
      {xla::ffi::Traits::kCmdBufferCompatible})

FA3_JAX_CUDA_PACKED_FWD(fa3_fwd_varlen_cuda, fa3::fwd_varlen_cuda);
FA3_JAX_CUDA_PACKED_FWD(fa3_fwd_segments_cuda, fa3::fwd_segments_cuda);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    fa3_fwd_fp8_cuda, fa3::fwd_fp8_cuda,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::DeviceOrdinal>()
        .Arg<xla::ffi::AnyBuffer>()  // q float8_e4m3fn [batch, seqlen_q, heads_q, head_dim]
        .Arg<xla::ffi::AnyBuffer>()  // k float8_e4m3fn [batch, seqlen_k, heads_kv, head_dim]
        .Arg<xla::ffi::AnyBuffer>()  // v float8_e4m3fn [batch, seqlen_k, heads_kv, head_dim_v]
        .Arg<xla::ffi::AnyBuffer>()  // descale_q float32 (flash.h: per tensor or per block)
        .Arg<xla::ffi::AnyBuffer>()  // descale_k float32
        .Arg<xla::ffi::AnyBuffer>()  // descale_v float32
        .Ret<xla::ffi::AnyBuffer>()  // out bfloat16
        .Ret<xla::ffi::AnyBuffer>()  // lse
        .Ret<xla::ffi::AnyBuffer>()  // workspace (uint8; tile counter, then V transposed)
            FA3_JAX_MASK_ATTRS
        .Attr<int64_t>("descale_block_q")   // query rows per descale block, 0: per tensor
        .Attr<int64_t>("descale_block_k"),  // keys per descale block, 0: per tensor
    {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    fa3_fp8_quantize_cuda, fa3::fp8_quantize_cuda,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::DeviceOrdinal>()
        .Arg<xla::ffi::AnyBuffer>()    // x [batch, seqlen, heads, head_dim] float32/16/bf16
        .Arg<xla::ffi::AnyBuffer>()    // signs float32 [batch, head_dim] (read with hadamard)
        .Ret<xla::ffi::AnyBuffer>()    // x8 float8_e4m3fn, like x
        .Ret<xla::ffi::AnyBuffer>()    // descale float32 (flash.h, "FP8")
        .Ret<xla::ffi::AnyBuffer>()    // workspace (uint8; group maxima when block_rows is 0)
        .Attr<int64_t>("block_rows")   // rows per descale block; 0: per (batch, kv head)
        .Attr<int64_t>("heads_kv")     // descale groups of heads / heads_kv heads (block_rows 0)
        .Attr<bool>("hadamard"),       // the random-sign Hadamard transform first
    {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    fa3_bwd_cuda, fa3::bwd_cuda,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::DeviceOrdinal>()
        .Arg<xla::ffi::AnyBuffer>()  // q
        .Arg<xla::ffi::AnyBuffer>()  // k
        .Arg<xla::ffi::AnyBuffer>()  // v
        .Arg<xla::ffi::AnyBuffer>()  // out
        .Arg<xla::ffi::AnyBuffer>()  // lse
        .Arg<xla::ffi::AnyBuffer>()  // dout
        .Arg<xla::ffi::AnyBuffer>()  // dlse
        .Ret<xla::ffi::AnyBuffer>()  // dq
        .Ret<xla::ffi::AnyBuffer>()  // dk
        .Ret<xla::ffi::AnyBuffer>()  // dv
        .Ret<xla::ffi::AnyBuffer>()  // workspace (uint8, XLA-allocated)
            FA3_JAX_MASK_ATTRS
        .Attr<bool>("deterministic"),
    {xla::ffi::Traits::kCmdBufferCompatible});

FA3_JAX_CUDA_PACKED_BWD(fa3_bwd_varlen_cuda, fa3::bwd_varlen_cuda);
FA3_JAX_CUDA_PACKED_BWD(fa3_bwd_segments_cuda, fa3::bwd_segments_cuda);

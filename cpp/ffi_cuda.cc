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
using ffi_util::fill_packing;
using ffi_util::Packing;
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

// Every handler: the device made current and checked, the call counted, then `body`.
template <class Body>
ffi::Error on_device(cudaStream_t stream, int32_t device, Body&& body) {
  ScopedDevice scope(device);
  if (auto e = enter_device(scope, device); e.failure()) return e;
  count_call(stream);
  return body();
}

// A 16-bit forward: the dense params, then `extra` (the operands of a packed or KV-cache call),
// then launch_fwd. `paged`: k and v are page pools.
template <class Extra>
ffi::Error fwd_call(cudaStream_t stream, int32_t device, ffi::AnyBuffer q, ffi::AnyBuffer k,
                    ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer>& out,
                    ffi::Result<ffi::AnyBuffer>& lse, ffi::Result<ffi::AnyBuffer>& workspace,
                    float softmax_scale, float softcap, int64_t diag_lo, int64_t diag_hi,
                    bool paged, Extra&& extra) {
  return on_device(stream, device, [&] {
    FwdParams p;
    if (auto e = fill_fwd(q, k, v, softmax_scale, softcap, diag_lo, diag_hi, &p, false, paged);
        e.failure())
      return e;
    if (auto e = extra(p); e.failure()) return e;
    return launch_fwd(stream, device, p, out, lse, workspace);
  });
}

ffi::Error no_extra(FwdParams&) { return ffi::Error::Success(); }

ffi::Error fwd_cuda(cudaStream_t stream, int32_t device, ffi::AnyBuffer q, ffi::AnyBuffer k,
                    ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer> out,
                    ffi::Result<ffi::AnyBuffer> lse, ffi::Result<ffi::AnyBuffer> workspace,
                    float softmax_scale, float softcap, int64_t diag_lo, int64_t diag_hi) {
  return fwd_call(stream, device, q, k, v, out, lse, workspace, softmax_scale, softcap, diag_lo,
                  diag_hi, false, no_extra);
}

// Packed (ffi_util::fill_packing): cu_seqlens or segment ids stay on the device (the kernels
// clamp cu_seqlens, flash.h; the ids' values are the mask); only their shapes are checked here.
template <Packing kPacking>
ffi::Error fwd_packed_cuda(cudaStream_t stream, int32_t device, ffi::AnyBuffer q,
                           ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer meta_q,
                           ffi::AnyBuffer meta_k, ffi::Result<ffi::AnyBuffer> out,
                           ffi::Result<ffi::AnyBuffer> lse, ffi::Result<ffi::AnyBuffer> workspace,
                           float softmax_scale, float softcap, int64_t diag_lo, int64_t diag_hi,
                           int64_t max_seqlen_q, int64_t max_seqlen_k) {
  return fwd_call(stream, device, q, k, v, out, lse, workspace, softmax_scale, softcap, diag_lo,
                  diag_hi, false, [&](FwdParams& p) {
                    return fill_packing<kPacking>(meta_q, meta_k, max_seqlen_q, max_seqlen_k, &p);
                  });
}

// KV cache: seqused_k stays on the device (the kernel clamps it, flash.h); only its shape is
// checked here.
ffi::Error fwd_kvcache_cuda(cudaStream_t stream, int32_t device, ffi::AnyBuffer q,
                            ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer seqused_k,
                            ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                            ffi::Result<ffi::AnyBuffer> workspace, float softmax_scale,
                            float softcap, int64_t diag_lo, int64_t diag_hi, int64_t num_splits,
                            int64_t packed_group) {
  return fwd_call(stream, device, q, k, v, out, lse, workspace, softmax_scale, softcap, diag_lo,
                  diag_hi, false, [&](FwdParams& p) {
                    if (auto e = ffi_util::fill_seqused(seqused_k, num_splits, &p); e.failure())
                      return e;
                    return ffi_util::fill_packed_group(packed_group, &p);
                  });
}

// Paged KV cache: the page table stays on the device too (out-of-range pages read as zeros).
ffi::Error fwd_kvcache_paged_cuda(cudaStream_t stream, int32_t device, ffi::AnyBuffer q,
                                  ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer seqused_k,
                                  ffi::AnyBuffer page_table, ffi::Result<ffi::AnyBuffer> out,
                                  ffi::Result<ffi::AnyBuffer> lse,
                                  ffi::Result<ffi::AnyBuffer> workspace, float softmax_scale,
                                  float softcap, int64_t diag_lo, int64_t diag_hi,
                                  int64_t num_splits, int64_t packed_group) {
  return fwd_call(stream, device, q, k, v, out, lse, workspace, softmax_scale, softcap, diag_lo,
                  diag_hi, true, [&](FwdParams& p) {
                    if (auto e = ffi_util::fill_paged(page_table, &p); e.failure()) return e;
                    if (auto e = ffi_util::fill_seqused(seqused_k, num_splits, &p); e.failure())
                      return e;
                    return ffi_util::fill_packed_group(packed_group, &p);
                  });
}

// FP8 forward: float8_e4m3fn q, k, v with float32 descales (flash.h, "FP8"); out bfloat16. The
// kernel transposes v into its workspace first (cpp/hopper/fp8_vt_sm90.h).
ffi::Error fwd_fp8_cuda(cudaStream_t stream, int32_t device, ffi::AnyBuffer q, ffi::AnyBuffer k,
                        ffi::AnyBuffer v, ffi::AnyBuffer descale_q, ffi::AnyBuffer descale_k,
                        ffi::AnyBuffer descale_v, ffi::Result<ffi::AnyBuffer> out,
                        ffi::Result<ffi::AnyBuffer> lse, ffi::Result<ffi::AnyBuffer> workspace,
                        float softmax_scale, float softcap, int64_t diag_lo, int64_t diag_hi,
                        int64_t descale_block_q, int64_t descale_block_k) {
  return on_device(stream, device, [&] {
    FwdParams p;
    if (auto e = ffi_util::fill_fwd_fp8(q, k, v, descale_q, descale_k, descale_v, &*out, &*lse,
                                        softmax_scale, softcap, diag_lo, diag_hi, descale_block_q,
                                        descale_block_k, &p);
        e.failure())
      return e;
    if (!sm90_supports_fwd(p))
      return invalid("this build has no Hopper FP8 forward kernel for " + hdim_str(p) +
                     " (FP8 takes head_dim == head_dim_v in {64, 128, 256}, built ones only), or "
                     "the per-block descales are not on the kernel's tiles (descale_block_q, "
                     "descale_block_k = " + std::to_string(p.descale_block_q) + ", " +
                     std::to_string(p.descale_block_k) + "; fa3_jax.fp8.scale_blocks gives them)");
    if (auto e = check_workspace(*workspace, sm90_fwd_workspace_bytes(p)); e.failure()) return e;
    return launch_result(run_fwd_sm90(p, workspace->untyped_data(), stream), device);
  });
}

// FP8 quantization of one tensor (flash.h): x8 and its descales; the workspace holds the group
// maxima of the per-tensor form.
ffi::Error fp8_quantize_cuda(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                             ffi::AnyBuffer signs, ffi::Result<ffi::AnyBuffer> x8,
                             ffi::Result<ffi::AnyBuffer> descale,
                             ffi::Result<ffi::AnyBuffer> workspace, int64_t block_rows,
                             int64_t heads_kv, bool hadamard) {
  return on_device(stream, device, [&] {
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
  });
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

// A backward: the dense params, then `extra` (a packed call's metadata), then launch_bwd.
template <class Extra>
ffi::Error bwd_call(cudaStream_t stream, int32_t device, ffi::AnyBuffer q, ffi::AnyBuffer k,
                    ffi::AnyBuffer v, ffi::AnyBuffer out, ffi::AnyBuffer lse,
                    ffi::AnyBuffer dout, ffi::AnyBuffer dlse, ffi::Result<ffi::AnyBuffer>& dq,
                    ffi::Result<ffi::AnyBuffer>& dk, ffi::Result<ffi::AnyBuffer>& dv,
                    ffi::Result<ffi::AnyBuffer>& workspace, float softmax_scale, float softcap,
                    int64_t diag_lo, int64_t diag_hi, bool deterministic, Extra&& extra) {
  return on_device(stream, device, [&] {
    BwdParams p;
    if (auto e = fill_bwd(q, k, v, out, lse, dout, dlse, *dq, *dk, *dv, softmax_scale, softcap,
                          diag_lo, diag_hi, deterministic, &p);
        e.failure())
      return e;
    if (auto e = extra(p); e.failure()) return e;
    return launch_bwd(stream, device, p, workspace);
  });
}

ffi::Error bwd_cuda(cudaStream_t stream, int32_t device, ffi::AnyBuffer q, ffi::AnyBuffer k,
                    ffi::AnyBuffer v, ffi::AnyBuffer out, ffi::AnyBuffer lse, ffi::AnyBuffer dout,
                    ffi::AnyBuffer dlse, ffi::Result<ffi::AnyBuffer> dq,
                    ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                    ffi::Result<ffi::AnyBuffer> workspace, float softmax_scale, float softcap,
                    int64_t diag_lo, int64_t diag_hi, bool deterministic) {
  return bwd_call(stream, device, q, k, v, out, lse, dout, dlse, dq, dk, dv, workspace,
                  softmax_scale, softcap, diag_lo, diag_hi, deterministic, no_extra);
}

template <Packing kPacking>
ffi::Error bwd_packed_cuda(cudaStream_t stream, int32_t device, ffi::AnyBuffer q,
                           ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer out,
                           ffi::AnyBuffer lse, ffi::AnyBuffer dout, ffi::AnyBuffer dlse,
                           ffi::AnyBuffer meta_q, ffi::AnyBuffer meta_k,
                           ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                           ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> workspace,
                           float softmax_scale, float softcap, int64_t diag_lo, int64_t diag_hi,
                           bool deterministic, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  return bwd_call(stream, device, q, k, v, out, lse, dout, dlse, dq, dk, dv, workspace,
                  softmax_scale, softcap, diag_lo, diag_hi, deterministic, [&](FwdParams& p) {
                    return fill_packing<kPacking>(meta_q, meta_k, max_seqlen_q, max_seqlen_k, &p);
                  });
}

}  // namespace
}  // namespace fa3

void fa3_cuda_call_stats(int64_t* calls, int64_t* captured) {
  *calls = fa3::g_calls.load();
  *captured = fa3::g_captured.load();
}

// Bindings: ffi_common.h, shared with the CPU handlers, with XLA's stream for the op and the
// device it belongs to first and the workspace result (uint8, XLA-allocated) last.
#define FA3_JAX_CUDA_CTX \
  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>().Ctx<xla::ffi::DeviceOrdinal>()
#define FA3_JAX_CUDA_WS .Ret<xla::ffi::AnyBuffer>()
#define FA3_JAX_CUDA_HANDLER(NAME, HANDLER, BIND)                               \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, HANDLER, BIND(FA3_JAX_CUDA_CTX, FA3_JAX_CUDA_WS), \
                                {xla::ffi::Traits::kCmdBufferCompatible})

FA3_JAX_CUDA_HANDLER(fa3_fwd_cuda, fa3::fwd_cuda, FA3_JAX_BIND_FWD);
FA3_JAX_CUDA_HANDLER(fa3_fwd_kvcache_cuda, fa3::fwd_kvcache_cuda, FA3_JAX_BIND_FWD_KVCACHE);
FA3_JAX_CUDA_HANDLER(fa3_fwd_kvcache_paged_cuda, fa3::fwd_kvcache_paged_cuda,
                     FA3_JAX_BIND_FWD_KVCACHE_PAGED);
FA3_JAX_CUDA_HANDLER(fa3_fwd_varlen_cuda, fa3::fwd_packed_cuda<fa3::Packing::kVarlen>,
                     FA3_JAX_BIND_FWD_PACKED);
FA3_JAX_CUDA_HANDLER(fa3_fwd_segments_cuda, fa3::fwd_packed_cuda<fa3::Packing::kSegments>,
                     FA3_JAX_BIND_FWD_PACKED);
FA3_JAX_CUDA_HANDLER(fa3_fwd_fp8_cuda, fa3::fwd_fp8_cuda, FA3_JAX_BIND_FWD_FP8);
FA3_JAX_CUDA_HANDLER(fa3_fp8_quantize_cuda, fa3::fp8_quantize_cuda, FA3_JAX_BIND_FP8_QUANTIZE);
FA3_JAX_CUDA_HANDLER(fa3_bwd_cuda, fa3::bwd_cuda, FA3_JAX_BIND_BWD);
FA3_JAX_CUDA_HANDLER(fa3_bwd_varlen_cuda, fa3::bwd_packed_cuda<fa3::Packing::kVarlen>,
                     FA3_JAX_BIND_BWD_PACKED);
FA3_JAX_CUDA_HANDLER(fa3_bwd_segments_cuda, fa3::bwd_packed_cuda<fa3::Packing::kSegments>,
                     FA3_JAX_BIND_BWD_PACKED);

// XLA FFI handlers of the Hopper backend: validate, fill params, allocate workspace from XLA's
// scratch allocator, and call the sm90 kernels on XLA's stream. Host-only; never includes CuTe.
#include <cuda_runtime.h>

#include <string>

#include "ffi_common.h"
#include "ffi_handlers.h"

namespace fa3 {
namespace {

namespace ffi = xla::ffi;
using ffi_util::fill_bwd;
using ffi_util::fill_fwd;
using ffi_util::fill_fwd_outputs;
using ffi_util::invalid;

ffi::Error check_device_supported() {
  int dev = 0;
  cudaDeviceProp prop;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaGetDeviceProperties(&prop, dev) != cudaSuccess)
    return ffi::Error(ffi::ErrorCode::kInternal, "fa3_jax: cannot query the CUDA device");
  if (prop.major != 9)
    return ffi::Error(ffi::ErrorCode::kUnimplemented,
                      "fa3_jax: the CUDA kernels need a Hopper GPU (sm_90); this device is sm_" +
                          std::to_string(prop.major * 10 + prop.minor));
  return ffi::Error::Success();
}

ffi::Error launch_result(const char* err) {
  if (err) return ffi::Error(ffi::ErrorCode::kInternal, std::string("fa3_jax: ") + err);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("fa3_jax: CUDA launch failed: ") + cudaGetErrorString(e));
  return ffi::Error::Success();
}

// Device workspace for one call. XLA's scratch allocator is tried first; where it has none to give
// (seen with jax 0.11.2 on an H200: Allocate fails for every size), the memory comes from CUDA's
// stream-ordered allocator and goes back on the same stream after the kernels.
class Workspace {
 public:
  Workspace(ffi::ScratchAllocator& scratch, size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes == 0) return;
    if (auto got = scratch.Allocate(bytes, 256)) {
      ptr_ = *got;
    } else if (cudaMallocAsync(&ptr_, bytes, stream) == cudaSuccess) {
      owned_ = true;
    } else {
      cudaGetLastError();  // clear it: the failure is reported through ok()
      ptr_ = nullptr;
      failed_ = true;
    }
  }
  ~Workspace() {
    if (owned_) cudaFreeAsync(ptr_, stream_);
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  bool ok() const { return !failed_; }
  void* get() const { return ptr_; }

 private:
  cudaStream_t stream_;
  void* ptr_ = nullptr;
  bool owned_ = false, failed_ = false;
};

ffi::Error no_workspace(size_t bytes) {
  return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                    "fa3_jax: could not allocate " + std::to_string(bytes) + " bytes of workspace");
}

ffi::Error fwd_cuda(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer q,
                    ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer> out,
                    ffi::Result<ffi::AnyBuffer> lse, float softmax_scale, float softcap,
                    int64_t diag_lo, int64_t diag_hi) {
  if (auto e = check_device_supported(); e.failure()) return e;
  FwdParams p;
  if (auto e = fill_fwd(q, k, v, softmax_scale, softcap, diag_lo, diag_hi, &p); e.failure())
    return e;
  if (auto e = fill_fwd_outputs(p, &*out, &*lse); e.failure()) return e;
  p.out = out->untyped_data();
  p.lse = static_cast<float*>(lse->untyped_data());
  if (!sm90_supports_fwd(p))
    return invalid("this build has no Hopper forward kernel for head_dim=" +
                   std::to_string(p.head_dim) + ", head_dim_v=" + std::to_string(p.head_dim_v) +
                   " with this dtype (fp16/bf16 only)");
  const size_t bytes = sm90_fwd_workspace_bytes(p);
  Workspace ws(scratch, bytes, stream);
  if (!ws.ok()) return no_workspace(bytes);
  return launch_result(run_fwd_sm90(p, ws.get(), stream));
}

ffi::Error bwd_cuda(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer q,
                    ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer out, ffi::AnyBuffer lse,
                    ffi::AnyBuffer dout, ffi::AnyBuffer dlse, ffi::Result<ffi::AnyBuffer> dq,
                    ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                    float softmax_scale, float softcap, int64_t diag_lo, int64_t diag_hi,
                    bool deterministic) {
  if (auto e = check_device_supported(); e.failure()) return e;
  BwdParams p;
  if (auto e = fill_bwd(q, k, v, out, lse, dout, dlse, *dq, *dk, *dv, softmax_scale, softcap,
                        diag_lo, diag_hi, deterministic, &p);
      e.failure())
    return e;
  if (!sm90_supports_bwd(p))
    return invalid("this build has no Hopper backward kernel for head_dim=" +
                   std::to_string(p.head_dim) + ", head_dim_v=" + std::to_string(p.head_dim_v) +
                   " with this dtype (fp16/bf16 only)");
  const size_t bytes = sm90_bwd_workspace_bytes(p);
  Workspace ws(scratch, bytes, stream);
  if (!ws.ok()) return no_workspace(bytes);
  return launch_result(run_bwd_sm90(p, ws.get(), stream));
}

}  // namespace
}  // namespace fa3

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    fa3_fwd_cuda, fa3::fwd_cuda,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()  // XLA's stream for this op
        .Ctx<xla::ffi::ScratchAllocator>()              // device workspace
        .Arg<xla::ffi::AnyBuffer>()                     // q
        .Arg<xla::ffi::AnyBuffer>()                     // k
        .Arg<xla::ffi::AnyBuffer>()                     // v
        .Ret<xla::ffi::AnyBuffer>()                     // out
        .Ret<xla::ffi::AnyBuffer>()                     // lse
            FA3_JAX_MASK_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    fa3_bwd_cuda, fa3::bwd_cuda,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::ScratchAllocator>()
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
            FA3_JAX_MASK_ATTRS
        .Attr<bool>("deterministic"));

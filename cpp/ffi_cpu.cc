// XLA FFI handlers of the CPU backend. They run the same C++ kernels a user's CPU jit calls.
#include <cstdlib>

#include "ffi_common.h"
#include "ffi_handlers.h"

namespace fa3 {
namespace {

namespace ffi = xla::ffi;
using ffi_util::fill_bwd;
using ffi_util::fill_fwd;
using ffi_util::fill_fwd_outputs;

// FA3_JAX_CPU_THREADS caps the worker threads (default: all hardware threads).
int cpu_threads() {
  const char* env = std::getenv("FA3_JAX_CPU_THREADS");
  return env ? std::atoi(env) : 0;
}

ffi::Error fwd_cpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                   float softmax_scale, float softcap, int64_t diag_lo, int64_t diag_hi) {
  FwdParams p;
  if (auto e = fill_fwd(q, k, v, softmax_scale, softcap, diag_lo, diag_hi, &p); e.failure())
    return e;
  if (auto e = fill_fwd_outputs(p, &*out, &*lse); e.failure()) return e;
  p.out = out->untyped_data();
  p.lse = static_cast<float*>(lse->untyped_data());
  run_fwd_cpu(p, cpu_threads());
  return ffi::Error::Success();
}

ffi::Error bwd_cpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer out,
                   ffi::AnyBuffer lse, ffi::AnyBuffer dout, ffi::AnyBuffer dlse,
                   ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                   ffi::Result<ffi::AnyBuffer> dv, float softmax_scale, float softcap,
                   int64_t diag_lo, int64_t diag_hi, bool deterministic) {
  BwdParams p;
  if (auto e = fill_bwd(q, k, v, out, lse, dout, dlse, *dq, *dk, *dv, softmax_scale, softcap,
                        diag_lo, diag_hi, deterministic, &p);
      e.failure())
    return e;
  // The CPU backward is deterministic whatever the flag says.
  run_bwd_cpu(p, cpu_threads());
  return ffi::Error::Success();
}

}  // namespace
}  // namespace fa3

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    fa3_fwd_cpu, fa3::fwd_cpu,
    xla::ffi::Ffi::Bind()
        .Arg<xla::ffi::AnyBuffer>()  // q [batch, seqlen_q, heads_q, head_dim]
        .Arg<xla::ffi::AnyBuffer>()  // k [batch, seqlen_k, heads_kv, head_dim]
        .Arg<xla::ffi::AnyBuffer>()  // v [batch, seqlen_k, heads_kv, head_dim_v]
        .Ret<xla::ffi::AnyBuffer>()  // out [batch, seqlen_q, heads_q, head_dim_v]
        .Ret<xla::ffi::AnyBuffer>()  // lse [batch, heads_q, seqlen_q] float32
            FA3_JAX_MASK_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    fa3_bwd_cpu, fa3::bwd_cpu,
    xla::ffi::Ffi::Bind()
        .Arg<xla::ffi::AnyBuffer>()  // q
        .Arg<xla::ffi::AnyBuffer>()  // k
        .Arg<xla::ffi::AnyBuffer>()  // v
        .Arg<xla::ffi::AnyBuffer>()  // out (forward's)
        .Arg<xla::ffi::AnyBuffer>()  // lse (forward's)
        .Arg<xla::ffi::AnyBuffer>()  // dout
        .Arg<xla::ffi::AnyBuffer>()  // dlse, cotangent of lse (zeros when unused)
        .Ret<xla::ffi::AnyBuffer>()  // dq
        .Ret<xla::ffi::AnyBuffer>()  // dk
        .Ret<xla::ffi::AnyBuffer>()  // dv
            FA3_JAX_MASK_ATTRS
        .Attr<bool>("deterministic"));  // bit-identical gradients run to run

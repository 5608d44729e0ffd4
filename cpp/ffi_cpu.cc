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

// The last step of every CPU forward handler: point p at the checked outputs and run.
ffi::Error run_fwd_into(FwdParams& p, ffi::Result<ffi::AnyBuffer>& out,
                        ffi::Result<ffi::AnyBuffer>& lse) {
  p.out = out->untyped_data();
  p.lse = static_cast<float*>(lse->untyped_data());
  run_fwd_cpu(p, cpu_threads());
  return ffi::Error::Success();
}

ffi::Error fwd_cpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                   float softmax_scale, float softcap, int64_t diag_lo, int64_t diag_hi) {
  FwdParams p;
  if (auto e = fill_fwd(q, k, v, softmax_scale, softcap, diag_lo, diag_hi, &p); e.failure())
    return e;
  if (auto e = fill_fwd_outputs(p, &*out, &*lse); e.failure()) return e;
  return run_fwd_into(p, out, lse);
}

// KV-cache calls bind packed_group for symmetry with the CUDA target (flash.h); the CPU backend
// takes unpacked rows only (python/fa3_jax/_primitives.py packs for Hopper alone).
ffi::Error check_unpacked_cpu(int64_t packed_group) {
  if (packed_group != 1)
    return ffi_util::invalid("the CPU backend takes unpacked query rows (packed_group 1), got " +
                             std::to_string(packed_group));
  return ffi::Error::Success();
}

// KV cache: the dense forward over the first seqused_k[b] keys of each batch row (flash.h).
// num_splits is bound for symmetry with the CUDA target; the CPU backend does not split.
ffi::Error fwd_kvcache_cpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                           ffi::AnyBuffer seqused_k, ffi::Result<ffi::AnyBuffer> out,
                           ffi::Result<ffi::AnyBuffer> lse, float softmax_scale, float softcap,
                           int64_t diag_lo, int64_t diag_hi, int64_t num_splits,
                           int64_t packed_group) {
  if (auto e = check_unpacked_cpu(packed_group); e.failure()) return e;
  FwdParams p;
  if (auto e = fill_fwd(q, k, v, softmax_scale, softcap, diag_lo, diag_hi, &p); e.failure())
    return e;
  if (auto e = fill_fwd_outputs(p, &*out, &*lse); e.failure()) return e;
  if (auto e = ffi_util::fill_seqused(seqused_k, num_splits, &p); e.failure()) return e;
  return run_fwd_into(p, out, lse);
}

// The same over a paged cache (flash.h, "Paged"): k and v are the page pool.
ffi::Error fwd_kvcache_paged_cpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                                 ffi::AnyBuffer seqused_k, ffi::AnyBuffer page_table,
                                 ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                                 float softmax_scale, float softcap, int64_t diag_lo,
                                 int64_t diag_hi, int64_t num_splits, int64_t packed_group) {
  if (auto e = check_unpacked_cpu(packed_group); e.failure()) return e;
  FwdParams p;
  if (auto e = fill_fwd(q, k, v, softmax_scale, softcap, diag_lo, diag_hi, &p, false, true);
      e.failure())
    return e;
  if (auto e = ffi_util::fill_paged(page_table, &p); e.failure()) return e;
  if (auto e = fill_fwd_outputs(p, &*out, &*lse); e.failure()) return e;
  if (auto e = ffi_util::fill_seqused(seqused_k, num_splits, &p); e.failure()) return e;
  return run_fwd_into(p, out, lse);
}

// FP8 forward: float8_e4m3fn q, k, v with float32 descales (flash.h); out bfloat16.
ffi::Error fwd_fp8_cpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                       ffi::AnyBuffer descale_q, ffi::AnyBuffer descale_k,
                       ffi::AnyBuffer descale_v, ffi::Result<ffi::AnyBuffer> out,
                       ffi::Result<ffi::AnyBuffer> lse, float softmax_scale, float softcap,
                       int64_t diag_lo, int64_t diag_hi, int64_t descale_block_q,
                       int64_t descale_block_k) {
  FwdParams p;
  if (auto e = ffi_util::fill_fwd_fp8(q, k, v, descale_q, descale_k, descale_v, &*out, &*lse,
                                      softmax_scale, softcap, diag_lo, diag_hi, descale_block_q,
                                      descale_block_k, &p);
      e.failure())
    return e;
  return run_fwd_into(p, out, lse);
}

// FP8 quantization of one tensor (flash.h): x8 and its descales.
ffi::Error fp8_quantize_cpu(ffi::AnyBuffer x, ffi::AnyBuffer signs, ffi::Result<ffi::AnyBuffer> x8,
                            ffi::Result<ffi::AnyBuffer> descale, int64_t block_rows,
                            int64_t heads_kv, bool hadamard) {
  Fp8QuantizeParams p;
  if (auto e = ffi_util::fill_fp8_quantize(x, signs, *x8, *descale, block_rows, heads_kv,
                                           hadamard, &p);
      e.failure())
    return e;
  run_fp8_quantize_cpu(p, cpu_threads());
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

// Packed sequences (ffi_util::fill_packing): the dense handlers plus two int32 metadata
// operands, in host memory as every CPU buffer is.
using ffi_util::fill_packing;
using ffi_util::Packing;

template <Packing kPacking>
ffi::Error fwd_packed_cpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                          ffi::AnyBuffer meta_q, ffi::AnyBuffer meta_k,
                          ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                          float softmax_scale, float softcap, int64_t diag_lo, int64_t diag_hi,
                          int64_t max_seqlen_q, int64_t max_seqlen_k) {
  FwdParams p;
  if (auto e = fill_fwd(q, k, v, softmax_scale, softcap, diag_lo, diag_hi, &p); e.failure())
    return e;
  if (auto e = fill_fwd_outputs(p, &*out, &*lse); e.failure()) return e;
  if (auto e = fill_packing<kPacking>(meta_q, meta_k, max_seqlen_q, max_seqlen_k, &p);
      e.failure())
    return e;
  return run_fwd_into(p, out, lse);
}

template <Packing kPacking>
ffi::Error bwd_packed_cpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer out,
                          ffi::AnyBuffer lse, ffi::AnyBuffer dout, ffi::AnyBuffer dlse,
                          ffi::AnyBuffer meta_q, ffi::AnyBuffer meta_k,
                          ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                          ffi::Result<ffi::AnyBuffer> dv, float softmax_scale, float softcap,
                          int64_t diag_lo, int64_t diag_hi, bool deterministic,
                          int64_t max_seqlen_q, int64_t max_seqlen_k) {
  BwdParams p;
  if (auto e = fill_bwd(q, k, v, out, lse, dout, dlse, *dq, *dk, *dv, softmax_scale, softcap,
                        diag_lo, diag_hi, deterministic, &p);
      e.failure())
    return e;
  if (auto e = fill_packing<kPacking>(meta_q, meta_k, max_seqlen_q, max_seqlen_k, &p);
      e.failure())
    return e;
  run_bwd_cpu(p, cpu_threads());
  return ffi::Error::Success();
}

}  // namespace
}  // namespace fa3

// Bindings: ffi_common.h, shared with the CUDA handlers (no context, no workspace here).
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa3_fwd_cpu, fa3::fwd_cpu, FA3_JAX_BIND_FWD(, ));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa3_fwd_kvcache_cpu, fa3::fwd_kvcache_cpu,
                              FA3_JAX_BIND_FWD_KVCACHE(, ));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa3_fwd_kvcache_paged_cpu, fa3::fwd_kvcache_paged_cpu,
                              FA3_JAX_BIND_FWD_KVCACHE_PAGED(, ));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa3_fwd_varlen_cpu, fa3::fwd_packed_cpu<fa3::Packing::kVarlen>,
                              FA3_JAX_BIND_FWD_PACKED(, ));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa3_fwd_segments_cpu, fa3::fwd_packed_cpu<fa3::Packing::kSegments>,
                              FA3_JAX_BIND_FWD_PACKED(, ));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa3_fwd_fp8_cpu, fa3::fwd_fp8_cpu, FA3_JAX_BIND_FWD_FP8(, ));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa3_fp8_quantize_cpu, fa3::fp8_quantize_cpu,
                              FA3_JAX_BIND_FP8_QUANTIZE(, ));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa3_bwd_cpu, fa3::bwd_cpu, FA3_JAX_BIND_BWD(, ));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa3_bwd_varlen_cpu, fa3::bwd_packed_cpu<fa3::Packing::kVarlen>,
                              FA3_JAX_BIND_BWD_PACKED(, ));
XLA_FFI_DEFINE_HANDLER_SYMBOL(fa3_bwd_segments_cpu, fa3::bwd_packed_cpu<fa3::Packing::kSegments>,
                              FA3_JAX_BIND_BWD_PACKED(, ));

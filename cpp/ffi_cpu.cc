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

// KV cache: the dense forward over the first seqused_k[b] keys of each batch row (flash.h).
// num_splits is bound for symmetry with the CUDA target; the CPU backend does not split.
ffi::Error fwd_kvcache_cpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                           ffi::AnyBuffer seqused_k, ffi::Result<ffi::AnyBuffer> out,
                           ffi::Result<ffi::AnyBuffer> lse, float softmax_scale, float softcap,
                           int64_t diag_lo, int64_t diag_hi, int64_t num_splits) {
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
                                 int64_t diag_hi, int64_t num_splits) {
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
  if (auto e = fill_fwd(q, k, v, softmax_scale, softcap, diag_lo, diag_hi, &p, /*fp8=*/true);
      e.failure())
    return e;
  if (auto e = fill_fwd_outputs(p, &*out, &*lse); e.failure()) return e;
  if (auto e = ffi_util::fill_fp8_descales(descale_q, descale_k, descale_v, descale_block_q,
                                           descale_block_k, *out, &p);
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

// Packed sequences: the dense handlers plus two int32 metadata operands, either cu_seqlens
// (varlen) or segment ids (flash.h). The metadata lives in host memory, as every CPU buffer does.
enum class Packing { kVarlen, kSegments };

template <Packing kPacking>
ffi::Error fill_packing(ffi::AnyBuffer meta_q, ffi::AnyBuffer meta_k, int64_t max_seqlen_q,
                        int64_t max_seqlen_k, FwdParams* p) {
  if constexpr (kPacking == Packing::kVarlen)
    return ffi_util::fill_varlen(meta_q, meta_k, max_seqlen_q, max_seqlen_k, p);
  else
    return ffi_util::fill_segments(meta_q, meta_k, p);
}

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
    fa3_fwd_kvcache_cpu, fa3::fwd_kvcache_cpu,
    xla::ffi::Ffi::Bind()
        .Arg<xla::ffi::AnyBuffer>()  // q [batch, seqlen_q, heads_q, head_dim]
        .Arg<xla::ffi::AnyBuffer>()  // k [batch, seqlen_k, heads_kv, head_dim] (the cache)
        .Arg<xla::ffi::AnyBuffer>()  // v [batch, seqlen_k, heads_kv, head_dim_v]
        .Arg<xla::ffi::AnyBuffer>()  // seqused_k int32 [batch]: keys used per batch row
        .Ret<xla::ffi::AnyBuffer>()  // out [batch, seqlen_q, heads_q, head_dim_v]
        .Ret<xla::ffi::AnyBuffer>()  // lse [batch, heads_q, seqlen_q] float32
            FA3_JAX_MASK_ATTRS
        .Attr<int64_t>("num_splits"));  // split-KV ranges (0: heuristic; CPU: unused)

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    fa3_fwd_kvcache_paged_cpu, fa3::fwd_kvcache_paged_cpu,
    xla::ffi::Ffi::Bind()
        .Arg<xla::ffi::AnyBuffer>()  // q [batch, seqlen_q, heads_q, head_dim]
        .Arg<xla::ffi::AnyBuffer>()  // k pool [num_pages, page_size, heads_kv, head_dim]
        .Arg<xla::ffi::AnyBuffer>()  // v pool [num_pages, page_size, heads_kv, head_dim_v]
        .Arg<xla::ffi::AnyBuffer>()  // seqused_k int32 [batch]
        .Arg<xla::ffi::AnyBuffer>()  // page_table int32 [batch, max_pages_per_seq]
        .Ret<xla::ffi::AnyBuffer>()  // out
        .Ret<xla::ffi::AnyBuffer>()  // lse
            FA3_JAX_MASK_ATTRS
        .Attr<int64_t>("num_splits"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    fa3_fwd_fp8_cpu, fa3::fwd_fp8_cpu,
    xla::ffi::Ffi::Bind()
        .Arg<xla::ffi::AnyBuffer>()  // q float8_e4m3fn [batch, seqlen_q, heads_q, head_dim]
        .Arg<xla::ffi::AnyBuffer>()  // k float8_e4m3fn [batch, seqlen_k, heads_kv, head_dim]
        .Arg<xla::ffi::AnyBuffer>()  // v float8_e4m3fn [batch, seqlen_k, heads_kv, head_dim_v]
        .Arg<xla::ffi::AnyBuffer>()  // descale_q float32 (flash.h: per tensor or per block)
        .Arg<xla::ffi::AnyBuffer>()  // descale_k float32
        .Arg<xla::ffi::AnyBuffer>()  // descale_v float32
        .Ret<xla::ffi::AnyBuffer>()  // out bfloat16 [batch, seqlen_q, heads_q, head_dim_v]
        .Ret<xla::ffi::AnyBuffer>()  // lse [batch, heads_q, seqlen_q] float32
            FA3_JAX_MASK_ATTRS
        .Attr<int64_t>("descale_block_q")    // query rows per descale_q block; 0: per tensor
        .Attr<int64_t>("descale_block_k"));  // keys per descale_k/v block; 0: per tensor

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    fa3_fp8_quantize_cpu, fa3::fp8_quantize_cpu,
    xla::ffi::Ffi::Bind()
        .Arg<xla::ffi::AnyBuffer>()    // x [batch, seqlen, heads, head_dim] float32/16/bf16
        .Arg<xla::ffi::AnyBuffer>()    // signs float32 [batch, head_dim] (read with hadamard)
        .Ret<xla::ffi::AnyBuffer>()    // x8 float8_e4m3fn, like x
        .Ret<xla::ffi::AnyBuffer>()    // descale float32 (flash.h, "FP8")
        .Attr<int64_t>("block_rows")   // rows per descale block; 0: per (batch, kv head)
        .Attr<int64_t>("heads_kv")     // descale groups of heads / heads_kv heads (block_rows 0)
        .Attr<bool>("hadamard"));      // the random-sign Hadamard transform first

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

// Packed-sequence targets: the dense bindings with two int32 metadata operands after the dense
// inputs, and (varlen) the max_seqlen attributes.
//   fa3_{fwd,bwd}_varlen_cpu: cu_seqlens_q, cu_seqlens_k [batch, num_seqs + 1]
//   fa3_{fwd,bwd}_segments_cpu: q_segment_ids [batch, seqlen_q], kv_segment_ids [batch, seqlen_k]
#define FA3_JAX_PACKED_FWD(NAME, PACKING, MAX_SEQLEN_ATTRS)                                \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                           \
      NAME, fa3::fwd_packed_cpu<PACKING>,                                                  \
      xla::ffi::Ffi::Bind()                                                                \
          .Arg<xla::ffi::AnyBuffer>() /* q */                                              \
          .Arg<xla::ffi::AnyBuffer>() /* k */                                              \
          .Arg<xla::ffi::AnyBuffer>() /* v */                                              \
          .Arg<xla::ffi::AnyBuffer>() /* cu_seqlens_q or q_segment_ids */                  \
          .Arg<xla::ffi::AnyBuffer>() /* cu_seqlens_k or kv_segment_ids */                 \
          .Ret<xla::ffi::AnyBuffer>() /* out */                                            \
          .Ret<xla::ffi::AnyBuffer>() /* lse */                                            \
              FA3_JAX_MASK_ATTRS MAX_SEQLEN_ATTRS)

#define FA3_JAX_PACKED_BWD(NAME, PACKING, MAX_SEQLEN_ATTRS)                                \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                           \
      NAME, fa3::bwd_packed_cpu<PACKING>,                                                  \
      xla::ffi::Ffi::Bind()                                                                \
          .Arg<xla::ffi::AnyBuffer>() /* q */                                              \
          .Arg<xla::ffi::AnyBuffer>() /* k */                                              \
          .Arg<xla::ffi::AnyBuffer>() /* v */                                              \
          .Arg<xla::ffi::AnyBuffer>() /* out (forward's) */                                \
          .Arg<xla::ffi::AnyBuffer>() /* lse (forward's) */                                \
          .Arg<xla::ffi::AnyBuffer>() /* dout */                                           \
          .Arg<xla::ffi::AnyBuffer>() /* dlse */                                           \
          .Arg<xla::ffi::AnyBuffer>() /* cu_seqlens_q or q_segment_ids */                  \
          .Arg<xla::ffi::AnyBuffer>() /* cu_seqlens_k or kv_segment_ids */                 \
          .Ret<xla::ffi::AnyBuffer>() /* dq */                                             \
          .Ret<xla::ffi::AnyBuffer>() /* dk */                                             \
          .Ret<xla::ffi::AnyBuffer>() /* dv */                                             \
              FA3_JAX_MASK_ATTRS.Attr<bool>("deterministic") MAX_SEQLEN_ATTRS)

// Sequence-length bounds (varlen only; segment-id calls bind them as unused zeros).
#define FA3_JAX_MAX_SEQLEN_ATTRS .Attr<int64_t>("max_seqlen_q").Attr<int64_t>("max_seqlen_k")

FA3_JAX_PACKED_FWD(fa3_fwd_varlen_cpu, fa3::Packing::kVarlen, FA3_JAX_MAX_SEQLEN_ATTRS);
FA3_JAX_PACKED_BWD(fa3_bwd_varlen_cpu, fa3::Packing::kVarlen, FA3_JAX_MAX_SEQLEN_ATTRS);
FA3_JAX_PACKED_FWD(fa3_fwd_segments_cpu, fa3::Packing::kSegments, FA3_JAX_MAX_SEQLEN_ATTRS);
FA3_JAX_PACKED_BWD(fa3_bwd_segments_cpu, fa3::Packing::kSegments, FA3_JAX_MAX_SEQLEN_ATTRS);

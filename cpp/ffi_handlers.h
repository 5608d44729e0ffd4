// The FFI handler symbols the nanobind module exposes (defined in ffi_cpu.cc / ffi_cuda.cc).
#pragma once

#include <cstdint>

#include "xla/ffi/api/c_api.h"

extern "C" {
XLA_FFI_Error* fa3_fwd_cpu(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* fa3_bwd_cpu(XLA_FFI_CallFrame* call_frame);
// Packed sequences (cpp/flash.h).
XLA_FFI_Error* fa3_fwd_varlen_cpu(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* fa3_bwd_varlen_cpu(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* fa3_fwd_segments_cpu(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* fa3_bwd_segments_cpu(XLA_FFI_CallFrame* call_frame);
// FP8 forward and quantization (cpp/flash.h).
// KV cache forward (cpp/flash.h, "Used key lengths").
XLA_FFI_Error* fa3_fwd_kvcache_cpu(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* fa3_fwd_kvcache_paged_cpu(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* fa3_fwd_fp8_cpu(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* fa3_fp8_quantize_cpu(XLA_FFI_CallFrame* call_frame);
#ifdef FA3_JAX_WITH_CUDA
XLA_FFI_Error* fa3_fwd_cuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* fa3_bwd_cuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* fa3_fwd_varlen_cuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* fa3_bwd_varlen_cuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* fa3_fwd_segments_cuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* fa3_bwd_segments_cuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* fa3_fwd_kvcache_cuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* fa3_fwd_kvcache_paged_cuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* fa3_fwd_fp8_cuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* fa3_fp8_quantize_cuda(XLA_FFI_CallFrame* call_frame);
// Process totals of CUDA handler executions and of those made during stream capture.
void fa3_cuda_call_stats(int64_t* calls, int64_t* captured);
#endif
}

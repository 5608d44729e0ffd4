// Buffer validation and params filling shared by the CPU and CUDA FFI handlers.
// Host-only: includes XLA's FFI API and flash.h, never CuTe. Every failure is an ffi::Error with a
// message naming the buffer and the shapes seen; handlers never abort.
#pragma once

#include <string>
#include <utility>

#include "flash.h"
#include "xla/ffi/api/ffi.h"

namespace fa3::ffi_util {

namespace ffi = xla::ffi;

inline std::string dims_str(ffi::AnyBuffer::Dimensions d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

inline ffi::Error invalid(const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "fa3_jax: " + msg);
}

inline bool to_dtype(ffi::DataType t, DType* out) {
  switch (t) {
    case ffi::DataType::F32: *out = DType::kFloat32; return true;
    case ffi::DataType::F16: *out = DType::kFloat16; return true;
    case ffi::DataType::BF16: *out = DType::kBFloat16; return true;
    default: return false;
  }
}

// Checks that `b` has rank 4 and the given dims (-1: any) and returns its dims.
inline ffi::Error check_rank4(const char* name, const ffi::AnyBuffer& b) {
  if (b.dimensions().size() != 4)
    return invalid(std::string(name) + " must have rank 4, got shape " + dims_str(b.dimensions()));
  return ffi::Error::Success();
}

inline ffi::Error check_shape(const char* name, ffi::AnyBuffer::Dimensions got,
                              std::initializer_list<int64_t> want) {
  bool ok = got.size() == want.size();
  size_t i = 0;
  for (int64_t w : want) {
    if (!ok) break;
    ok = got[i++] == w;
  }
  if (ok) return ffi::Error::Success();
  std::string ws = "[";
  i = 0;
  for (int64_t w : want) ws += (i++ ? ", " : "") + std::to_string(w);
  return invalid(std::string(name) + " has shape " + dims_str(got) + ", expected " + ws + "]");
}

// Fills the shape/dtype/pointer part of FwdParams from q, k, v and the scalar attributes. `fp8`:
// q, k, v must be float8_e4m3fn (the FP8 target, which adds the descales: fill_fp8_descales);
// otherwise float32, float16 or bfloat16. `paged`: k and v are a pool [num_pages, page_size,
// heads_kv, dim] (their first dim is not the batch); seqlen_k is then page_size until
// fill_paged sets it from the page table.
inline ffi::Error fill_fwd(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                           float softmax_scale, float softcap, int64_t diag_lo, int64_t diag_hi,
                           FwdParams* p, bool fp8 = false, bool paged = false) {
  if (auto e = check_rank4("q", q); e.failure()) return e;
  if (auto e = check_rank4("k", k); e.failure()) return e;
  if (auto e = check_rank4("v", v); e.failure()) return e;
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (fp8) {
    if (q.element_type() != ffi::DataType::F8E4M3FN)
      return invalid("the FP8 forward takes float8_e4m3fn q, k and v");
    p->dtype = DType::kFloat8E4M3;
  } else if (!to_dtype(q.element_type(), &p->dtype)) {
    return invalid("q must be float32, float16 or bfloat16");
  }
  if (k.element_type() != q.element_type() || v.element_type() != q.element_type())
    return invalid("q, k and v must share one dtype");
  p->batch = qd[0];
  p->seqlen_q = qd[1];
  p->heads_q = qd[2];
  p->head_dim = qd[3];
  p->seqlen_k = kd[1];
  p->heads_kv = kd[2];
  p->head_dim_v = vd[3];
  const int64_t kv_rows = paged ? kd[0] : p->batch;  // paged: num_pages
  if (auto e = check_shape("k", kd, {kv_rows, p->seqlen_k, p->heads_kv, p->head_dim}); e.failure())
    return e;
  if (auto e = check_shape("v", vd, {kv_rows, p->seqlen_k, p->heads_kv, p->head_dim_v});
      e.failure())
    return e;
  if (paged) p->num_pages = kv_rows;
  if (p->heads_kv <= 0 || p->heads_q % p->heads_kv != 0)
    return invalid("heads_q (" + std::to_string(p->heads_q) + ") must be a multiple of heads_kv (" +
                   std::to_string(p->heads_kv) + ")");
  if (!(softcap >= 0.f)) return invalid("softcap must be >= 0");
  p->softmax_scale = softmax_scale;
  p->softcap = softcap;
  p->diag_lo = diag_lo;
  p->diag_hi = diag_hi;
  p->q = q.untyped_data();
  p->k = k.untyped_data();
  p->v = v.untyped_data();
  return ffi::Error::Success();
}

inline ffi::Error fill_fwd_outputs(const FwdParams& p, ffi::AnyBuffer* out, ffi::AnyBuffer* lse) {
  if (auto e = check_shape("out", out->dimensions(),
                           {p.batch, p.seqlen_q, p.heads_q, p.head_dim_v});
      e.failure())
    return e;
  if (auto e = check_shape("lse", lse->dimensions(), {p.batch, p.heads_q, p.seqlen_q}); e.failure())
    return e;
  if (lse->element_type() != ffi::DataType::F32) return invalid("lse must be float32");
  return ffi::Error::Success();
}

// FP8 descales (float32; flash.h gives both forms): block_q == block_k == 0 for [batch, heads_kv]
// each, both > 0 for per-block scales. Also checks that out is bfloat16.
inline ffi::Error fill_fp8_descales(ffi::AnyBuffer descale_q, ffi::AnyBuffer descale_k,
                                    ffi::AnyBuffer descale_v, int64_t block_q, int64_t block_k,
                                    const ffi::AnyBuffer& out, FwdParams* p) {
  if (out.element_type() != ffi::DataType::BF16)
    return invalid("the FP8 forward writes a bfloat16 out");
  for (const ffi::AnyBuffer* d : {&descale_q, &descale_k, &descale_v})
    if (d->element_type() != ffi::DataType::F32)
      return invalid("descale_q, descale_k and descale_v must be float32");
  if (block_q < 0 || block_k < 0 || (block_q == 0) != (block_k == 0))
    return invalid("descale_block_q and descale_block_k must both be 0 (per-tensor descales) or "
                   "both > 0 (per-block), got " + std::to_string(block_q) + " and " +
                   std::to_string(block_k));
  if (block_q == 0) {
    for (auto [name, d] : {std::pair{"descale_q", &descale_q}, std::pair{"descale_k", &descale_k},
                           std::pair{"descale_v", &descale_v}})
      if (auto e = check_shape(name, d->dimensions(), {p->batch, p->heads_kv}); e.failure())
        return e;
  } else {
    const int64_t nq = (p->seqlen_q + block_q - 1) / block_q;
    const int64_t nk = (p->seqlen_k + block_k - 1) / block_k;
    if (auto e = check_shape("descale_q", descale_q.dimensions(), {p->batch, p->heads_q, nq});
        e.failure())
      return e;
    if (auto e = check_shape("descale_k", descale_k.dimensions(), {p->batch, p->heads_kv, nk});
        e.failure())
      return e;
    if (auto e = check_shape("descale_v", descale_v.dimensions(), {p->batch, p->heads_kv, nk});
        e.failure())
      return e;
  }
  p->descale_q = static_cast<const float*>(descale_q.untyped_data());
  p->descale_k = static_cast<const float*>(descale_k.untyped_data());
  p->descale_v = static_cast<const float*>(descale_v.untyped_data());
  p->descale_block_q = block_q;
  p->descale_block_k = block_k;
  return ffi::Error::Success();
}

// Every param of an FP8 forward call: q, k, v (float8_e4m3fn), the checked outputs (out
// bfloat16) and the descales.
inline ffi::Error fill_fwd_fp8(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                               ffi::AnyBuffer descale_q, ffi::AnyBuffer descale_k,
                               ffi::AnyBuffer descale_v, ffi::AnyBuffer* out, ffi::AnyBuffer* lse,
                               float softmax_scale, float softcap, int64_t diag_lo,
                               int64_t diag_hi, int64_t block_q, int64_t block_k, FwdParams* p) {
  if (auto e = fill_fwd(q, k, v, softmax_scale, softcap, diag_lo, diag_hi, p, /*fp8=*/true);
      e.failure())
    return e;
  if (auto e = fill_fwd_outputs(*p, out, lse); e.failure()) return e;
  if (auto e = fill_fp8_descales(descale_q, descale_k, descale_v, block_q, block_k, *out, p);
      e.failure())
    return e;
  p->out = out->untyped_data();
  p->lse = static_cast<float*>(lse->untyped_data());
  return ffi::Error::Success();
}

// FP8 quantization (flash.h): x [batch, seqlen, heads, head_dim] float32/float16/bfloat16;
// signs float32 [batch, head_dim], read only when `hadamard` (head_dim a power of two); x8
// float8_e4m3fn like x; descale float32 [batch, heads, ceil(seqlen / block_rows)], or
// [batch, heads_kv] when block_rows is 0.
inline ffi::Error fill_fp8_quantize(ffi::AnyBuffer x, ffi::AnyBuffer signs, ffi::AnyBuffer x8,
                                    ffi::AnyBuffer descale, int64_t block_rows, int64_t heads_kv,
                                    bool hadamard, Fp8QuantizeParams* p) {
  if (auto e = check_rank4("x", x); e.failure()) return e;
  if (!to_dtype(x.element_type(), &p->dtype))
    return invalid("the FP8 quantization takes float32, float16 or bfloat16 x");
  auto xd = x.dimensions();
  p->batch = xd[0];
  p->seqlen = xd[1];
  p->heads = xd[2];
  p->head_dim = xd[3];
  if (heads_kv <= 0 || p->heads % heads_kv != 0)
    return invalid("heads_kv (" + std::to_string(heads_kv) + ") must divide the heads of x (" +
                   std::to_string(p->heads) + ")");
  if (block_rows < 0) return invalid("block_rows must be >= 0 (0: per (batch, kv head))");
  p->heads_kv = heads_kv;
  p->block_rows = block_rows;
  if (x8.element_type() != ffi::DataType::F8E4M3FN) return invalid("x8 must be float8_e4m3fn");
  if (auto e = check_shape("x8", x8.dimensions(), {p->batch, p->seqlen, p->heads, p->head_dim});
      e.failure())
    return e;
  if (descale.element_type() != ffi::DataType::F32) return invalid("descale must be float32");
  if (auto e = block_rows ? check_shape("descale", descale.dimensions(),
                                        {p->batch, p->heads,
                                         (p->seqlen + block_rows - 1) / block_rows})
                          : check_shape("descale", descale.dimensions(), {p->batch, heads_kv});
      e.failure())
    return e;
  if (hadamard) {
    if (p->head_dim < 1 || (p->head_dim & (p->head_dim - 1)))
      return invalid("the Hadamard transform needs a power-of-two head_dim, got " +
                     std::to_string(p->head_dim));
    if (signs.element_type() != ffi::DataType::F32) return invalid("signs must be float32");
    if (auto e = check_shape("signs", signs.dimensions(), {p->batch, p->head_dim}); e.failure())
      return e;
    p->signs = static_cast<const float*>(signs.untyped_data());
  }
  p->x = x.untyped_data();
  p->x8 = static_cast<uint8_t*>(x8.untyped_data());
  p->descale = static_cast<float*>(descale.untyped_data());
  return ffi::Error::Success();
}

// Backward: inputs q, k, v, out, lse, dout, dlse; outputs dq, dk, dv.
inline ffi::Error fill_bwd(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                           ffi::AnyBuffer out, ffi::AnyBuffer lse, ffi::AnyBuffer dout,
                           ffi::AnyBuffer dlse, ffi::AnyBuffer dq, ffi::AnyBuffer dk,
                           ffi::AnyBuffer dv, float softmax_scale, float softcap, int64_t diag_lo,
                           int64_t diag_hi, bool deterministic, BwdParams* p) {
  if (auto e = fill_fwd(q, k, v, softmax_scale, softcap, diag_lo, diag_hi, p); e.failure())
    return e;
  if (auto e = fill_fwd_outputs(*p, &out, &lse); e.failure()) return e;
  if (auto e = check_shape("dout", dout.dimensions(),
                           {p->batch, p->seqlen_q, p->heads_q, p->head_dim_v});
      e.failure())
    return e;
  if (auto e = check_shape("dlse", dlse.dimensions(), {p->batch, p->heads_q, p->seqlen_q});
      e.failure())
    return e;
  if (out.element_type() != q.element_type() || dout.element_type() != q.element_type())
    return invalid("out and dout must have q's dtype");
  if (dlse.element_type() != ffi::DataType::F32) return invalid("dlse must be float32");
  if (auto e = check_shape("dq", dq.dimensions(), {p->batch, p->seqlen_q, p->heads_q, p->head_dim});
      e.failure())
    return e;
  if (auto e = check_shape("dk", dk.dimensions(), {p->batch, p->seqlen_k, p->heads_kv, p->head_dim});
      e.failure())
    return e;
  if (auto e = check_shape("dv", dv.dimensions(),
                           {p->batch, p->seqlen_k, p->heads_kv, p->head_dim_v});
      e.failure())
    return e;
  p->out_in = out.untyped_data();
  p->lse_in = static_cast<const float*>(lse.untyped_data());
  p->dout = dout.untyped_data();
  p->dlse = static_cast<const float*>(dlse.untyped_data());
  p->dq = dq.untyped_data();
  p->dk = dk.untyped_data();
  p->dv = dv.untyped_data();
  p->deterministic = deterministic;
  return ffi::Error::Success();
}

// Varlen metadata: cu_seqlens_q/k int32 [batch, num_seqs + 1], max_seqlen_* >= 1. Their values
// are not checked here (they live on the device for the CUDA backend); the kernels make any
// values safe (flash.h).
inline ffi::Error fill_varlen(ffi::AnyBuffer cu_q, ffi::AnyBuffer cu_k, int64_t max_seqlen_q,
                              int64_t max_seqlen_k, FwdParams* p) {
  if (cu_q.element_type() != ffi::DataType::S32 || cu_k.element_type() != ffi::DataType::S32)
    return invalid("cu_seqlens_q and cu_seqlens_k must be int32");
  auto qd = cu_q.dimensions();
  if (qd.size() != 2 || qd[0] != p->batch || qd[1] < 2)
    return invalid("cu_seqlens_q has shape " + dims_str(qd) + ", expected [" +
                   std::to_string(p->batch) + ", num_seqs + 1] with num_seqs >= 1");
  if (auto e = check_shape("cu_seqlens_k", cu_k.dimensions(), {p->batch, qd[1]}); e.failure())
    return e;
  if (max_seqlen_q < 1 || max_seqlen_k < 1) return invalid("max_seqlen_q/k must be >= 1");
  p->cu_seqlens_q = static_cast<const int32_t*>(cu_q.untyped_data());
  p->cu_seqlens_k = static_cast<const int32_t*>(cu_k.untyped_data());
  p->num_seqs = qd[1] - 1;
  p->max_seqlen_q = max_seqlen_q;
  p->max_seqlen_k = max_seqlen_k;
  return ffi::Error::Success();
}

// KV cache (flash.h, "Used key lengths"): seqused_k int32 [batch], its values not checked here
// (the kernels clamp them); num_splits >= 0 (0: the kernel's heuristic).
inline ffi::Error fill_seqused(ffi::AnyBuffer seqused_k, int64_t num_splits, FwdParams* p) {
  if (seqused_k.element_type() != ffi::DataType::S32) return invalid("seqused_k must be int32");
  if (auto e = check_shape("seqused_k", seqused_k.dimensions(), {p->batch}); e.failure()) return e;
  if (num_splits < 0)
    return invalid("num_splits must be >= 0 (0: the heuristic), got " + std::to_string(num_splits));
  p->seqused_k = static_cast<const int32_t*>(seqused_k.untyped_data());
  p->num_splits = num_splits;
  return ffi::Error::Success();
}

// GQA rows packed by the caller (flash.h; Hopper KV cache only), after fill_fwd and
// fill_seqused: q's rows are (position, head of a group) pairs, packed_group of them per position.
inline ffi::Error fill_packed_group(int64_t packed_group, FwdParams* p) {
  if (packed_group < 1 ||
      (packed_group > 1 && (p->seqlen_q % packed_group != 0 || p->heads_q != p->heads_kv)))
    return invalid("packed_group must be 1, or > 1 dividing seqlen_q (" +
                   std::to_string(p->seqlen_q) + ") with heads_q == heads_kv (" +
                   std::to_string(p->heads_q) + ", " + std::to_string(p->heads_kv) + "), got " +
                   std::to_string(packed_group));
  p->packed_group = packed_group;
  return ffi::Error::Success();
}

// Paged K/V (flash.h, "Paged"), after fill_fwd(..., paged = true): page_table int32
// [batch, max_pages_per_seq >= 1]; its values are not checked here (the kernels treat an index
// outside [0, num_pages) as a page of zeros).
inline ffi::Error fill_paged(ffi::AnyBuffer page_table, FwdParams* p) {
  if (page_table.element_type() != ffi::DataType::S32) return invalid("page_table must be int32");
  auto d = page_table.dimensions();
  if (d.size() != 2 || d[0] != p->batch || d[1] < 1)
    return invalid("page_table has shape " + dims_str(d) + ", expected [" +
                   std::to_string(p->batch) + ", max_pages_per_seq] with max_pages_per_seq >= 1");
  if (p->num_pages < 1 || p->seqlen_k < 1)
    return invalid("a paged cache needs num_pages >= 1 and page_size >= 1");
  p->page_size = p->seqlen_k;
  p->seqlen_k = d[1] * p->page_size;
  p->page_table = static_cast<const int32_t*>(page_table.untyped_data());
  return ffi::Error::Success();
}

// Segment ids: int32 [batch, seqlen_q] and [batch, seqlen_k].
inline ffi::Error fill_segments(ffi::AnyBuffer q_ids, ffi::AnyBuffer kv_ids, FwdParams* p) {
  if (q_ids.element_type() != ffi::DataType::S32 || kv_ids.element_type() != ffi::DataType::S32)
    return invalid("q_segment_ids and kv_segment_ids must be int32");
  if (auto e = check_shape("q_segment_ids", q_ids.dimensions(), {p->batch, p->seqlen_q});
      e.failure())
    return e;
  if (auto e = check_shape("kv_segment_ids", kv_ids.dimensions(), {p->batch, p->seqlen_k});
      e.failure())
    return e;
  p->q_segment_ids = static_cast<const int32_t*>(q_ids.untyped_data());
  p->kv_segment_ids = static_cast<const int32_t*>(kv_ids.untyped_data());
  return ffi::Error::Success();
}

// Packed sequences (flash.h): two int32 metadata operands after the dense inputs, either
// cu_seqlens (varlen) or segment ids. One handler per direction and platform serves both.
enum class Packing { kVarlen, kSegments };

template <Packing kPacking>
ffi::Error fill_packing(ffi::AnyBuffer meta_q, ffi::AnyBuffer meta_k, int64_t max_seqlen_q,
                        int64_t max_seqlen_k, FwdParams* p) {
  if constexpr (kPacking == Packing::kVarlen)
    return fill_varlen(meta_q, meta_k, max_seqlen_q, max_seqlen_k, p);
  else
    return fill_segments(meta_q, meta_k, p);  // segment calls ignore max_seqlen_*
}

}  // namespace fa3::ffi_util

// The attribute list shared by both directions and both platforms, in binding order:
//   softmax_scale  f32   multiplies q.k before softcap and softmax
//   softcap        f32   0 disables; else s = softcap * tanh(s / softcap)
//   diag_lo        i64   key j visible to query i iff diag_lo <= j - i ...
//   diag_hi        i64   ... <= diag_hi (see flash.h)
#define FA3_JAX_MASK_ATTRS                  \
  .Attr<float>("softmax_scale")             \
      .Attr<float>("softcap")               \
      .Attr<int64_t>("diag_lo")             \
      .Attr<int64_t>("diag_hi")

// The bindings, one per target and shared by both platforms, in the order the Python lowering
// (_primitives.py) passes operands and attributes. CTX: what the platform's handler takes before
// the operands (the CUDA stream and device; nothing on the CPU); WS: what it returns after the
// outputs (the CUDA workspace, a uint8 buffer XLA allocates; nothing on the CPU). Either may be
// an empty macro argument.
//
// Dense forward: q, k, v -> out, lse.
#define FA3_JAX_BIND_FWD(CTX, WS)                                                   \
  xla::ffi::Ffi::Bind() CTX                                                         \
      .Arg<xla::ffi::AnyBuffer>() /* q [batch, seqlen_q, heads_q, head_dim] */      \
      .Arg<xla::ffi::AnyBuffer>() /* k [batch, seqlen_k, heads_kv, head_dim] */     \
      .Arg<xla::ffi::AnyBuffer>() /* v [batch, seqlen_k, heads_kv, head_dim_v] */   \
      .Ret<xla::ffi::AnyBuffer>() /* out [batch, seqlen_q, heads_q, head_dim_v] */  \
      .Ret<xla::ffi::AnyBuffer>() /* lse [batch, heads_q, seqlen_q] float32 */ WS   \
          FA3_JAX_MASK_ATTRS

// KV cache, contiguous: the dense forward plus per-row key lengths; num_splits 0 is the
// heuristic (the CPU computes without splitting); packed_group > 1: q's rows are GQA-packed by
// the caller (flash.h; Hopper only, the CPU takes 1).
#define FA3_JAX_BIND_FWD_KVCACHE(CTX, WS)                                           \
  xla::ffi::Ffi::Bind() CTX                                                         \
      .Arg<xla::ffi::AnyBuffer>() /* q */                                           \
      .Arg<xla::ffi::AnyBuffer>() /* k, the cache [batch, seqlen_k, heads_kv, d] */ \
      .Arg<xla::ffi::AnyBuffer>() /* v */                                           \
      .Arg<xla::ffi::AnyBuffer>() /* seqused_k int32 [batch]: keys used per row */  \
      .Ret<xla::ffi::AnyBuffer>() /* out */                                         \
      .Ret<xla::ffi::AnyBuffer>() /* lse */ WS                                      \
          FA3_JAX_MASK_ATTRS.Attr<int64_t>("num_splits").Attr<int64_t>("packed_group")

// KV cache, paged: k and v are page pools, rows reach them through the page table.
#define FA3_JAX_BIND_FWD_KVCACHE_PAGED(CTX, WS)                                         \
  xla::ffi::Ffi::Bind() CTX                                                             \
      .Arg<xla::ffi::AnyBuffer>() /* q */                                               \
      .Arg<xla::ffi::AnyBuffer>() /* k pool [num_pages, page_size, heads_kv, d] */      \
      .Arg<xla::ffi::AnyBuffer>() /* v pool [num_pages, page_size, heads_kv, d_v] */    \
      .Arg<xla::ffi::AnyBuffer>() /* seqused_k int32 [batch] */                         \
      .Arg<xla::ffi::AnyBuffer>() /* page_table int32 [batch, max_pages_per_seq] */     \
      .Ret<xla::ffi::AnyBuffer>() /* out */                                             \
      .Ret<xla::ffi::AnyBuffer>() /* lse */ WS                                          \
          FA3_JAX_MASK_ATTRS.Attr<int64_t>("num_splits").Attr<int64_t>("packed_group")

// Packed forward (varlen or segment ids, fill_packing): the dense operands, then the metadata.
// max_seqlen_*: bounds on every sequence (varlen grid sizes; segment calls bind zeros).
#define FA3_JAX_BIND_FWD_PACKED(CTX, WS)                                            \
  xla::ffi::Ffi::Bind() CTX                                                         \
      .Arg<xla::ffi::AnyBuffer>() /* q */                                           \
      .Arg<xla::ffi::AnyBuffer>() /* k */                                           \
      .Arg<xla::ffi::AnyBuffer>() /* v */                                           \
      .Arg<xla::ffi::AnyBuffer>() /* cu_seqlens_q or q_segment_ids */               \
      .Arg<xla::ffi::AnyBuffer>() /* cu_seqlens_k or kv_segment_ids */              \
      .Ret<xla::ffi::AnyBuffer>() /* out */                                         \
      .Ret<xla::ffi::AnyBuffer>() /* lse */ WS                                      \
          FA3_JAX_MASK_ATTRS.Attr<int64_t>("max_seqlen_q").Attr<int64_t>("max_seqlen_k")

// FP8 forward: float8_e4m3fn q, k, v with float32 descales (flash.h, "FP8"); out bfloat16.
#define FA3_JAX_BIND_FWD_FP8(CTX, WS)                                                   \
  xla::ffi::Ffi::Bind() CTX                                                             \
      .Arg<xla::ffi::AnyBuffer>() /* q float8_e4m3fn */                                 \
      .Arg<xla::ffi::AnyBuffer>() /* k float8_e4m3fn */                                 \
      .Arg<xla::ffi::AnyBuffer>() /* v float8_e4m3fn */                                 \
      .Arg<xla::ffi::AnyBuffer>() /* descale_q float32 (per tensor or per block) */     \
      .Arg<xla::ffi::AnyBuffer>() /* descale_k float32 */                               \
      .Arg<xla::ffi::AnyBuffer>() /* descale_v float32 */                               \
      .Ret<xla::ffi::AnyBuffer>() /* out bfloat16 */                                    \
      .Ret<xla::ffi::AnyBuffer>() /* lse */ WS                                          \
          FA3_JAX_MASK_ATTRS                                                            \
      .Attr<int64_t>("descale_block_q") /* query rows per descale block, 0: per tensor */ \
      .Attr<int64_t>("descale_block_k") /* keys per descale block, 0: per tensor */

// FP8 quantization of one tensor (flash.h): x -> x8 and its descales.
#define FA3_JAX_BIND_FP8_QUANTIZE(CTX, WS)                                                \
  xla::ffi::Ffi::Bind() CTX                                                               \
      .Arg<xla::ffi::AnyBuffer>() /* x [batch, seqlen, heads, head_dim] f32/f16/bf16 */   \
      .Arg<xla::ffi::AnyBuffer>() /* signs float32 [batch, head_dim] (with hadamard) */   \
      .Ret<xla::ffi::AnyBuffer>() /* x8 float8_e4m3fn, like x */                          \
      .Ret<xla::ffi::AnyBuffer>() /* descale float32 */ WS                                \
      .Attr<int64_t>("block_rows") /* rows per descale block; 0: per (batch, kv head) */  \
      .Attr<int64_t>("heads_kv")   /* descale groups of heads / heads_kv (block_rows 0) */ \
      .Attr<bool>("hadamard")      /* the random-sign Hadamard transform first */

// Dense backward: q, k, v, the forward's out and lse, dout, dlse (zeros when unused) -> dq, dk,
// dv; deterministic: bit-identical gradients run to run.
#define FA3_JAX_BIND_BWD_OPERANDS(CTX)                                              \
  xla::ffi::Ffi::Bind() CTX                                                         \
      .Arg<xla::ffi::AnyBuffer>() /* q */                                           \
      .Arg<xla::ffi::AnyBuffer>() /* k */                                           \
      .Arg<xla::ffi::AnyBuffer>() /* v */                                           \
      .Arg<xla::ffi::AnyBuffer>() /* out (forward's) */                             \
      .Arg<xla::ffi::AnyBuffer>() /* lse (forward's) */                             \
      .Arg<xla::ffi::AnyBuffer>() /* dout */                                        \
      .Arg<xla::ffi::AnyBuffer>() /* dlse, cotangent of lse */
#define FA3_JAX_BIND_BWD_RESULTS(WS)                                                \
  .Ret<xla::ffi::AnyBuffer>() /* dq */                                              \
      .Ret<xla::ffi::AnyBuffer>() /* dk */                                          \
      .Ret<xla::ffi::AnyBuffer>() /* dv */ WS FA3_JAX_MASK_ATTRS.Attr<bool>("deterministic")
#define FA3_JAX_BIND_BWD(CTX, WS) FA3_JAX_BIND_BWD_OPERANDS(CTX) FA3_JAX_BIND_BWD_RESULTS(WS)

// Packed backward: the dense operands, the metadata, the dense results and attributes, then
// the max_seqlen bounds.
#define FA3_JAX_BIND_BWD_PACKED(CTX, WS)                                            \
  FA3_JAX_BIND_BWD_OPERANDS(CTX)                                                    \
      .Arg<xla::ffi::AnyBuffer>() /* cu_seqlens_q or q_segment_ids */               \
      .Arg<xla::ffi::AnyBuffer>() /* cu_seqlens_k or kv_segment_ids */              \
      FA3_JAX_BIND_BWD_RESULTS(WS)                                                  \
      .Attr<int64_t>("max_seqlen_q")                                                \
      .Attr<int64_t>("max_seqlen_k")

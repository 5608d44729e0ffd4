// The one Python extension: registrations() maps each FFI target name to its handler capsule per
// platform; Python registers them in one loop (python/fa3_jax/_ffi.py).
#include <nanobind/nanobind.h>

#include <utility>

#include "ffi_handlers.h"
#include "flash.h"
#include "hopper/tile_size.h"  // plain constexpr C++: every build knows the forward's tiles

namespace nb = nanobind;

namespace {

template <typename Fn>
nb::capsule capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

#ifdef FA3_JAX_WITH_CUDA
// The shape part of the params, as the CUDA handlers will fill it: what the workspace size of a
// call depends on.
fa3::BwdParams shape_params(int64_t batch, int64_t seqlen_q, int64_t seqlen_k, int64_t heads_q,
                            int64_t heads_kv, int64_t head_dim, int64_t head_dim_v,
                            bool deterministic) {
  fa3::BwdParams p;
  p.batch = batch;
  p.seqlen_q = seqlen_q;
  p.seqlen_k = seqlen_k;
  p.heads_q = heads_q;
  p.heads_kv = heads_kv;
  p.head_dim = head_dim;
  p.head_dim_v = head_dim_v;
  p.dtype = fa3::DType::kBFloat16;  // the workspace does not depend on the 16-bit dtype
  p.deterministic = deterministic;
  return p;
}
#endif

}  // namespace

NB_MODULE(_fa3_jax_ext, m) {
  m.def("registrations", [] {
    nb::dict fwd, bwd, all;
    fwd["cpu"] = capsule(fa3_fwd_cpu);
    bwd["cpu"] = capsule(fa3_bwd_cpu);
#ifdef FA3_JAX_WITH_CUDA
    fwd["CUDA"] = capsule(fa3_fwd_cuda);
    bwd["CUDA"] = capsule(fa3_bwd_cuda);
#endif
    all["fa3_fwd"] = fwd;
    all["fa3_bwd"] = bwd;
    // Packed sequences, the KV cache and FP8: CPU and CUDA (KV cache, FP8: forward only).
    // {name, CPU handler, CUDA handler or null}.
    struct Packed {
      const char* name;
      void* cpu;
      void* cuda;
    };
#ifdef FA3_JAX_WITH_CUDA
    void* const fwd_varlen_cuda = reinterpret_cast<void*>(fa3_fwd_varlen_cuda);
    void* const bwd_varlen_cuda = reinterpret_cast<void*>(fa3_bwd_varlen_cuda);
    void* const fwd_kvcache_cuda = reinterpret_cast<void*>(fa3_fwd_kvcache_cuda);
    void* const fwd_kvcache_paged_cuda = reinterpret_cast<void*>(fa3_fwd_kvcache_paged_cuda);
    void* const fwd_fp8_cuda = reinterpret_cast<void*>(fa3_fwd_fp8_cuda);
    void* const fwd_segments_cuda = reinterpret_cast<void*>(fa3_fwd_segments_cuda);
    void* const bwd_segments_cuda = reinterpret_cast<void*>(fa3_bwd_segments_cuda);
    void* const fp8_quantize_cuda = reinterpret_cast<void*>(fa3_fp8_quantize_cuda);
#else
    void* const fwd_varlen_cuda = nullptr;
    void* const bwd_varlen_cuda = nullptr;
    void* const fwd_kvcache_cuda = nullptr;
    void* const fwd_kvcache_paged_cuda = nullptr;
    void* const fwd_fp8_cuda = nullptr;
    void* const fwd_segments_cuda = nullptr;
    void* const bwd_segments_cuda = nullptr;
    void* const fp8_quantize_cuda = nullptr;
#endif
    const Packed packed[] = {
        {"fa3_fwd_varlen", reinterpret_cast<void*>(fa3_fwd_varlen_cpu), fwd_varlen_cuda},
        {"fa3_bwd_varlen", reinterpret_cast<void*>(fa3_bwd_varlen_cpu), bwd_varlen_cuda},
        {"fa3_fwd_segments", reinterpret_cast<void*>(fa3_fwd_segments_cpu), fwd_segments_cuda},
        {"fa3_bwd_segments", reinterpret_cast<void*>(fa3_bwd_segments_cpu), bwd_segments_cuda},
        {"fa3_fwd_kvcache", reinterpret_cast<void*>(fa3_fwd_kvcache_cpu), fwd_kvcache_cuda},
        {"fa3_fwd_kvcache_paged", reinterpret_cast<void*>(fa3_fwd_kvcache_paged_cpu),
         fwd_kvcache_paged_cuda},
        {"fa3_fwd_fp8", reinterpret_cast<void*>(fa3_fwd_fp8_cpu), fwd_fp8_cuda},
        {"fa3_fp8_quantize", reinterpret_cast<void*>(fa3_fp8_quantize_cpu), fp8_quantize_cuda}};
    for (const Packed& e : packed) {
      nb::dict by_platform;
      by_platform["cpu"] = nb::capsule(e.cpu);
      if (e.cuda) by_platform["CUDA"] = nb::capsule(e.cuda);
      all[e.name] = by_platform;
    }
    return all;
  });
  // (block_m, block_n) of the Hopper forward for these head dims (fp8: of the FP8 forward, whose
  // tiles are the FP8 scale blocks of python/fa3_jax/fp8.py: one scale per tile).
  m.def(
      "fwd_tile_size",
      [](int head_dim, int head_dim_v, bool fp8) {
        const auto t = fa3::sm90::fwd_tile_size(head_dim, head_dim_v, fp8);
        return nb::make_tuple(t.block_m, t.block_n);
      },
      nb::arg("head_dim"), nb::arg("head_dim_v"), nb::arg("fp8") = false);
  // Rows per page piece of the Hopper forward's paged KV cache: page sizes it reads in place are
  // multiples of it (cpp/hopper/tile_size.h, kFwdPageRows).
  m.attr("fwd_page_rows") = fa3::sm90::kFwdPageRows;
#ifdef FA3_JAX_WITH_CUDA
  // Bytes of the uint8 workspace result the CUDA custom calls take (XLA allocates it).
  // num_seqs: sequences per batch row of a varlen call (0: dense). segments: a segment-id call
  // (the size depends on whether ids are given, not on their values). seqused: a KV-cache call
  // (fa3_fwd_kvcache) with num_splits (0: heuristic).
  m.def(
      "sm90_fwd_workspace_bytes",
      [](int64_t b, int64_t sq, int64_t sk, int64_t hq, int64_t hkv, int64_t d, int64_t dv,
         int64_t num_seqs, bool fp8, bool segments, bool seqused, int64_t num_splits,
         int64_t page_size) {
        fa3::BwdParams p = shape_params(b, sq, sk, hq, hkv, d, dv, false);
        p.num_seqs = num_seqs;
        static const int32_t kUsed = 0;
        if (seqused) p.seqused_k = &kUsed;
        p.num_splits = num_splits;
        // A paged KV cache read in place (page_size > 0): its page size picks the tile
        // (tile_size.h, fwd_use_decode_tile), hence the split count and the partials' size.
        static const int32_t kPageTable = 0;
        if (page_size > 0) {
          p.page_table = &kPageTable;
          p.page_size = page_size;
        }
        if (fp8) p.dtype = fa3::DType::kFloat8E4M3;  // never split: the counter only
        static const int32_t kGiven = 0;
        if (segments) p.q_segment_ids = p.kv_segment_ids = &kGiven;
        return fa3::sm90_fwd_workspace_bytes(p);
      },
      nb::arg("b"), nb::arg("sq"), nb::arg("sk"), nb::arg("hq"), nb::arg("hkv"), nb::arg("d"),
      nb::arg("dv"), nb::arg("num_seqs") = 0, nb::arg("fp8") = false,
      nb::arg("segments") = false, nb::arg("seqused") = false, nb::arg("num_splits") = 0,
      nb::arg("page_size") = 0);
  m.def(
      "sm90_bwd_workspace_bytes",
      [](int64_t b, int64_t sq, int64_t sk, int64_t hq, int64_t hkv, int64_t d, int64_t dv,
         bool deterministic, int64_t num_seqs, bool segments, int64_t diag_lo, int64_t diag_hi) {
        fa3::BwdParams p = shape_params(b, sq, sk, hq, hkv, d, dv, deterministic);
        p.num_seqs = num_seqs;
        p.diag_lo = diag_lo;  // the band picks the GQA group split (bwd_group_split)
        p.diag_hi = diag_hi;
        static const int32_t kGiven = 0;
        if (segments) p.q_segment_ids = p.kv_segment_ids = &kGiven;
        return fa3::sm90_bwd_workspace_bytes(p);
      },
      nb::arg("b"), nb::arg("sq"), nb::arg("sk"), nb::arg("hq"), nb::arg("hkv"), nb::arg("d"),
      nb::arg("dv"), nb::arg("deterministic"), nb::arg("num_seqs") = 0,
      nb::arg("segments") = false, nb::arg("diag_lo") = -fa3::kUnbounded,
      nb::arg("diag_hi") = fa3::kUnbounded);
  // Bytes of the uint8 workspace result of the CUDA fa3_fp8_quantize call (group maxima when
  // block_rows is 0).
  m.def(
      "sm90_fp8_quantize_workspace_bytes",
      [](int64_t batch, int64_t heads_kv, int64_t block_rows) {
        fa3::Fp8QuantizeParams p;
        p.batch = batch;
        p.heads_kv = heads_kv;
        p.block_rows = block_rows;
        return fa3::sm90_fp8_quantize_workspace_bytes(p);
      },
      nb::arg("batch"), nb::arg("heads_kv"), nb::arg("block_rows"));
  m.def("cuda_call_stats", [] {
    int64_t calls = 0, captured = 0;
    fa3_cuda_call_stats(&calls, &captured);
    return nb::make_tuple(calls, captured);
  });
  m.attr("cuda_built") = true;
  m.attr("cuda_head_dims") = FA3_JAX_CUDA_HEAD_DIMS;
#else
  m.attr("cuda_built") = false;
  m.attr("cuda_head_dims") = "";
#endif
}

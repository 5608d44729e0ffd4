// fa3_jax: the one interface between the FFI layer (cpp/ffi_*.cc) and the kernels.
//
// The FFI layer validates buffers, fills these plain structs and calls the run_* functions
// declared here. Kernel code (CPU in cpp/cpu/, Hopper in cpp/hopper/) includes nothing from XLA;
// the FFI layer includes nothing from CuTe.
//
// Layouts (all contiguous, row-major, last dimension innermost):
//   q    [batch, seqlen_q, heads_q,  head_dim]
//   k    [batch, seqlen_k, heads_kv, head_dim]
//   v    [batch, seqlen_k, heads_kv, head_dim_v]
//   out  [batch, seqlen_q, heads_q,  head_dim_v]   (dtype of q)
//   lse  [batch, heads_q,  seqlen_q]               (float32, natural log; -inf for empty rows)
// Query head h reads key/value head h / (heads_q / heads_kv) (kv-head-major GQA grouping).
//
// Masking is one band on the diagonal offset: key j is visible to query i iff
//   diag_lo <= j - i <= diag_hi.
// Python turns causal / window_size (bottom-right aligned) and jax.nn's top-left conventions into
// this band; kUnbounded (or anything beyond +-seqlen) means "no bound on that side".
// Scores: s = softmax_scale * (q . k); if softcap > 0, s = softcap * tanh(s / softcap).
// A query row with no visible key gets out = 0, lse = -inf, and zero gradients.
//
// Packed sequences (optional; FwdParams below; the CPU backend and the Hopper kernels take both
// forms, Hopper 16-bit only). Two forms, never both in one call:
//  - cu_seqlens (varlen): the seqlen axis of each batch row holds num_seqs sequences back to back;
//    sequence s of batch row b is query rows [cu_seqlens_q[b][s], cu_seqlens_q[b][s+1]) and key
//    rows [cu_seqlens_k[b][s], cu_seqlens_k[b][s+1]). The band is then per sequence and bottom-right
//    aligned: with i, j positions inside the sequence and lq, lk its lengths, key j is visible to
//    query i iff diag_lo <= (j - i) - (lk - lq) <= diag_hi. Bad metadata never reads or writes out
//    of bounds: each entry is clamped to [0, seqlen] and raised to the running maximum of the
//    entries before it, so sequences are disjoint and a negative length is empty. Rows outside
//    every sequence get out = 0, lse = -inf and zero gradients (dq, dk, dv).
//  - segment ids: on top of the band, key j is visible to query i only if
//    q_segment_ids[b][i] == kv_segment_ids[b][j] != 0 (id 0 is padding). The band stays on
//    positions in the batch row. The Hopper workspace size depends on whether ids are given (not
//    on their values); the kernels read the ids on the device (cpp/hopper/segments_sm90.h).
//
// Used key lengths (optional; FwdParams::seqused_k; forward only, dense layout, 16-bit or
// float32; never with cu_seqlens or segment ids): batch row b attends to its first
// len_b = seqused_k[b] keys only (clamped to [0, seqlen_k]; keys past it are never loaded), and
// the band is bottom-right aligned to that length as for a varlen sequence: key j < len_b is
// visible to query i iff diag_lo <= (j - i) - (len_b - seqlen_q) <= diag_hi. A row that sees no
// key (len_b 0, or a causal row above the diagonal) gets out = 0, lse = -inf. This is the
// contiguous KV cache of python/fa3_jax/kvcache.py (seqlen_k is the cache's capacity).
// Paged (optional, with seqused_k; FwdParams::page_table): k and v are a pool of pages
// [num_pages, page_size, heads_kv, head_dim(_v)] and seqlen_k = max_pages_per_seq * page_size;
// key position j of batch row b lives in page page_table[b][j / page_size], row j % page_size.
// A page index outside [0, num_pages) reads as zeros (keys and values 0: such positions still
// take part in the softmax when inside len_b). The Hopper kernel needs page_size to be a
// multiple of 16 (cpp/hopper/tile_size.h: one TMA load per key block from pages of whole
// blocks, else boxes of 64 or 16 rows, one per page piece).
// GQA rows packed by the caller (optional, FwdParams::packed_group > 1; with seqused_k only;
// Hopper only): q holds heads_q == heads_kv heads of seqlen_q = positions * packed_group rows,
// row s * packed_group + j being query position s of the caller's query head
// h * packed_group + j (out and lse likewise); the band is on positions s, so one tile reads K/V
// once for a whole group (python/fa3_jax/_primitives.py transposes q, out and lse around it).
// num_splits (any dense 16-bit forward on Hopper) asks for that many key ranges per tile (split-KV,
// cpp/hopper/tile_size.h); 0 lets the kernel choose; the CPU backend ignores it.
//
// FP8 (dtype kFloat8E4M3; forward only; dense layout only): q, k, v hold float8_e4m3fn values and
// the true value of an element is its stored value times its descale (float32, never null). out
// is bfloat16; lse as above. Two descale forms:
//  - per tensor (descale_block_q == descale_block_k == 0): descale_q, descale_k, descale_v are
//    [batch, heads_kv]; query head h uses entry h / (heads_q / heads_kv), as the K/V heads do.
//  - per block (both > 0): descale_q [batch, heads_q, ceil(seqlen_q / descale_block_q)], one
//    scale per block of descale_block_q query rows of one head; descale_k and descale_v
//    [batch, heads_kv, ceil(seqlen_k / descale_block_k)], one per block of descale_block_k keys.
//    The blocks are the forward kernel's tiles (python/fa3_jax/fp8.py asks the extension for
//    them, which reads cpp/hopper/tile_size.h), so a kernel applies one scalar per tile: the
//    score tile S_ij = (Q8_i K8_j^T) * descale_q_i * descale_k_j * softmax_scale, and the output
//    O = sum_j P_ij (V8_j * descale_v_j), where the descale_v_j ratio between consecutive tiles
//    folds into the online softmax's O rescale. A kernel that cannot take the caller's blocks
//    must reject the call; the CPU backend takes any block sizes (it scales each loaded row).
//    A query block is rows of one head: a kernel that packs GQA heads into a tile needs the
//    per-tensor form or its own layout.
// The Hopper FP8 kernel (run_fwd_sm90) first transposes v into its workspace (the e4m3 WGMMA
// reads both operands K-major, and keys are P @ V's K; cpp/hopper/fp8_vt_sm90.h). It folds the q
// and k descales into the softmax scale, so they must be > 0 there (a negative scale would turn
// the running max into a running min); dense calls only, head_dim == head_dim_v in {64, 128,
// 256}, per-block descales only on its own tiles (tile_size.h).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#ifdef FA3_JAX_WITH_CUDA
struct CUstream_st;  // the runtime's stream type (cudaStream_t), without the CUDA headers
#endif

namespace fa3 {

inline constexpr int64_t kUnbounded = int64_t(1) << 40;

// kFloat8E4M3 is float8_e4m3fn (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no
// infinities, 0x7f/0xff are nan, largest finite 448): q, k, v only, see FP8 above.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat8E4M3 = 3 };

struct FwdParams {
  int64_t batch = 0, seqlen_q = 0, seqlen_k = 0;
  int64_t heads_q = 0, heads_kv = 0, head_dim = 0, head_dim_v = 0;
  float softmax_scale = 1.f;
  float softcap = 0.f;  // 0 disables
  int64_t diag_lo = -kUnbounded, diag_hi = kUnbounded;
  DType dtype = DType::kFloat32;  // q, k, v, out share it (FP8: out is bfloat16)

  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;

  // Varlen (see the header comment); null for the dense layout. int32 [batch, num_seqs + 1].
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  int64_t num_seqs = 0;  // >= 1 with cu_seqlens; the Hopper workspace size depends on it
  // Upper bounds on any sequence's length; the CPU backend reads the lengths themselves and does
  // not need them. The Hopper grids number the blocks of the sequences and stay within both
  // ceil(seqlen / block) + num_seqs and num_seqs x ceil(max_seqlen / block) blocks a batch row
  // (hopper/varlen_sm90.h), so they trust the bounds: with a longer sequence nothing is read or
  // written out of bounds, but some rows' outputs are left unwritten.
  int64_t max_seqlen_q = 0, max_seqlen_k = 0;
  // Used key lengths (see the header comment); null for all seqlen_k keys. int32 [batch].
  const int32_t* seqused_k = nullptr;
  // Split-KV ranges per tile (see the header comment): 0 = the kernel's heuristic.
  int64_t num_splits = 0;
  // GQA rows packed by the caller (see the header comment): query rows per position; 1 = none.
  int64_t packed_group = 1;
  // Paged K/V (see the header comment); null for the contiguous layout. int32
  // [batch, seqlen_k / page_size]; k and v then hold num_pages pages of page_size rows.
  const int32_t* page_table = nullptr;
  int64_t page_size = 0, num_pages = 0;
  // Segment ids (see the header comment); null when unused. int32 [batch, seqlen_q] and
  // [batch, seqlen_k].
  const int32_t* q_segment_ids = nullptr;
  const int32_t* kv_segment_ids = nullptr;

  // FP8 descales (see the header comment); null unless dtype is kFloat8E4M3.
  const float* descale_q = nullptr;
  const float* descale_k = nullptr;
  const float* descale_v = nullptr;
  // Rows per scale block of q and of k/v; 0 for the per-tensor form.
  int64_t descale_block_q = 0, descale_block_k = 0;
};

struct BwdParams : FwdParams {
  const void* dout = nullptr;     // [batch, seqlen_q, heads_q, head_dim_v]
  const float* lse_in = nullptr;  // forward's lse (FwdParams::lse unused in backward)
  const void* out_in = nullptr;   // forward's out
  // Cotangent of the forward's lse [batch, heads_q, seqlen_q] float32, or null for zero. It enters
  // only through D: D_i = rowsum(dout_i * out_i) - dlse_i (d lse_i / d s_ij = P_ij).
  const float* dlse = nullptr;
  void* dq = nullptr;             // like q
  void* dk = nullptr;             // like k
  void* dv = nullptr;             // like v
  bool deterministic = false;
};

// ---- FP8 quantization (python/fa3_jax/fp8.py; float32/16-bit x to e4m3 plus descales) ----------
// x [batch, seqlen, heads, head_dim] (dtype kFloat32, kFloat16 or kBFloat16) -> x8 float8_e4m3fn
// of the same shape and float32 descales in the FP8 layouts above: block_rows > 0 gives descale
// [batch, heads, ceil(seqlen / block_rows)], one per block of block_rows rows of one head;
// block_rows == 0 gives [batch, heads_kv], one per GQA group of heads / heads_kv consecutive heads.
// Each row is first y = float(x), then, with signs (float32 [batch, head_dim] of +-1, one vector
// per batch row), y = y M with M = diag(signs) H / sqrt(head_dim) along head_dim (power of two):
// y_i negated where signs_i < 0, then the butterfly stages h = 1, 2, 4, ..., head_dim / 2 in that order, each
// (a, b) -> (a + b, a - b) for the entries i and i + h of every run of 2h entries, then y_i *=
// fp8_hadamard_scale(head_dim). That is fp8.hadamard_transform's order of float32 operations, so
// both give the same bits. Then per block (or group): amax = max |y| (nan wins), descale =
// fp8_descale(amax), x8 = e4m3(clamp(y * (1 / descale), -448, 448)) rounded to nearest even,
// 1 / descale an IEEE division. That is what XLA compiles fp8.quantize_blocks' amax / 448 and
// y / descale into (its algebraic simplifier turns a division by a constant, or by a broadcast,
// into a multiplication by the reciprocal), so the bytes and descales equal the XLA path's.
struct Fp8QuantizeParams {
  int64_t batch = 0, seqlen = 0, heads = 0, heads_kv = 0, head_dim = 0;
  int64_t block_rows = 0;         // 0: one descale per (batch, kv head)
  DType dtype = DType::kFloat32;  // of x
  const void* x = nullptr;
  const float* signs = nullptr;   // null: no Hadamard transform
  uint8_t* x8 = nullptr;
  float* descale = nullptr;
};

// The Hadamard transform's final factor: 1 / sqrt(head_dim) rounded once from double to float,
// as numpy's float32(1.0 / math.sqrt(d)) in fp8.hadamard_transform.
inline float fp8_hadamard_scale(int64_t head_dim) {
  return float(1.0 / std::sqrt(double(head_dim)));
}

// e4m3fn's largest finite value, and the descale of a block whose largest magnitude is amax: the
// stored value times the descale is the true value; 1 for an all-zero block (or a nan amax).
inline constexpr float kFp8Max = 448.f;
#ifdef __CUDACC__
__host__ __device__
#endif
inline float fp8_descale(float amax) {
  return amax > 0.f ? amax * (1.f / kFp8Max) : 1.f;
}

// ---- CPU backend (cpp/cpu/) -------------------------------------------------------------------
// Multi-threaded over (batch, head) work items; float32 accumulation; no seqlen_q x seqlen_k buffer.
// num_threads <= 0 means std::thread::hardware_concurrency().
void run_fwd_cpu(const FwdParams& p, int num_threads);
void run_bwd_cpu(const BwdParams& p, int num_threads);
void run_fp8_quantize_cpu(const Fp8QuantizeParams& p, int num_threads);

// ---- Hopper backend (cpp/hopper/), built only with FA3_JAX_CUDA --------------------------------
// Each returns nullptr on success or a static, human-readable reason (unsupported head dim or
// dtype in this build, launch failure). Workspace is device memory the caller allocates (may be
// 0 bytes); the kernel may not assume it is zeroed.
#ifdef FA3_JAX_WITH_CUDA
using cudaStream_t_ = ::CUstream_st*;
bool sm90_supports_fwd(const FwdParams& p);  // head dims and dtype compiled into this build
size_t sm90_fwd_workspace_bytes(const FwdParams& p);
const char* run_fwd_sm90(const FwdParams& p, void* workspace, cudaStream_t_ stream);
bool sm90_supports_bwd(const BwdParams& p);
size_t sm90_bwd_workspace_bytes(const BwdParams& p);
const char* run_bwd_sm90(const BwdParams& p, void* workspace, cudaStream_t_ stream);
// FP8 quantization: head_dim 64, 128 or 256, block_rows <= 128 (cpp/hopper/flash_fp8_quantize_sm90.cu).
bool sm90_supports_fp8_quantize(const Fp8QuantizeParams& p);
size_t sm90_fp8_quantize_workspace_bytes(const Fp8QuantizeParams& p);
const char* run_fp8_quantize_sm90(const Fp8QuantizeParams& p, void* workspace,
                                  cudaStream_t_ stream);
#endif

}  // namespace fa3

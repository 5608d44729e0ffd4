// fa3_jax CPU backend: FlashAttention-2 style forward and backward on float32 tiles.
//
// Forward: per (batch, query head, block of kBq query rows) an online softmax over kBk-key tiles
// of the visible band. Backward, deterministic in two passes: pass A per (batch, query head,
// query block) computes D_i = rowsum(dout * out) and dQ; pass B per (batch, kv head, key block)
// recomputes P and dS for every query head of the group and accumulates dK, dV in float32 tiles
// of its own. Nothing of size seqlen_q x seqlen_k is ever allocated; every work item sums in a fixed
// order, so results are bitwise identical for any thread count.
//
// Work is cut per sequence: a dense batch row is one sequence; with cu_seqlens (varlen) each
// packed sequence is one, its blocks start at its own first row and no block crosses into the next
// sequence, so nothing outside a sequence is ever loaded. Segment ids add a per-row / per-key id
// compare in the score mask, and a key tile whose id range cannot meet the query block's is
// skipped.
//
// FP8 (float8_e4m3fn q, k, v with descales, forward only): each row is dequantized as it is
// loaded (stored value times the descale of its row's block or head), then everything runs in
// float32 as for the other dtypes; out is bfloat16.
//
// Scores live in the log2 domain (s * log2(e)) so the softmax uses exp2; lse is converted back.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "../flash.h"
#include "dtype_convert.h"
#include "parallel_items.h"

namespace fa3 {
namespace {

constexpr int kBq = 64;  // query rows per tile
constexpr int kBk = 64;  // keys per tile
// Columns per register block of the tile GEMM: 32 floats are 8 SSE accumulators. One row at a
// time on purpose: with several rows GCC vectorizes across k instead (shuffles, ~5x slower).
constexpr int kNR = 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = std::numeric_limits<float>::infinity();

// ---- element types ------------------------------------------------------------------------

struct F32 {
  using T = float;
  static float load(float x) { return x; }
  static float store(float x) { return x; }
};
struct F16 {
  using T = uint16_t;
  static float load(uint16_t x) { return fp16_to_float(x); }
  static uint16_t store(float x) { return float_to_fp16(x); }
};
struct BF16 {
  using T = uint16_t;
  static float load(uint16_t x) { return bf16_to_float(x); }
  static uint16_t store(float x) { return float_to_bf16(x); }
};
struct E4M3 {  // an input type only
  using T = uint8_t;
  static float load(uint8_t x) { return e4m3_to_float(x); }
};

// The element type of out for inputs of type E (FP8 writes bfloat16, as the Hopper kernel will).
template <class E> struct OutOf { using type = E; };
template <> struct OutOf<E4M3> { using type = BF16; };

// `scale` is the FP8 descale of the row (1 for the other dtypes).
template <class E>
void load_row(const typename E::T* __restrict src, int n, float* __restrict dst,
              float scale = 1.f) {
  for (int i = 0; i < n; ++i) dst[i] = E::load(src[i]) * scale;
}

// Writes a source row as a column of a transposed tile (dst[i * stride]).
template <class E>
void load_col(const typename E::T* __restrict src, int n, float* __restrict dst, int stride,
              float scale = 1.f) {
  for (int i = 0; i < n; ++i) dst[int64_t(i) * stride] = E::load(src[i]) * scale;
}

template <class E>
void store_row(const float* __restrict src, float scale, int n, typename E::T* __restrict dst) {
  for (int i = 0; i < n; ++i) dst[i] = E::store(src[i] * scale);
}

// ---- vectorizable math ----------------------------------------------------------------------
// libm's exp/tanh are opaque calls that stop auto-vectorization, hence these branch-free versions.
// Selects are written on plain values (std::min/max return references, which GCC does not
// if-convert) or through integer masks: GCC will not if-convert a ?: whose arms hold float
// arithmetic, since under the default -ftrapping-math that arithmetic could trap.

inline float max_v(float a, float b) { return a > b ? a : b; }
inline float select_v(bool c, float a, float b) {
  return bits_float(select_bits(c, float_bits(a), float_bits(b)));
}

// 2^x, relative error ~1e-7; x = -inf (and anything below -126.5) gives 0, nan stays nan.
inline float exp2_approx(float x) {
  // Masked selects: with plain ?: GCC clones the polynomial for the clamped constants and the
  // resulting branches block vectorization. The clamp also maps nan to -127 (a safe int below).
  const float xc = select_v(x > -127.f, select_v(x < 127.f, x, 127.f), -127.f);
  const float r = (xc + 12582912.f) - 12582912.f;  // round to nearest integer (1.5 * 2^23 trick)
  const float f = xc - r;                          // in [-0.5, 0.5]
  // Taylor series of e^(f ln 2) to degree 7: truncation error below 1e-8 on [-0.5, 0.5].
  float p = 1.5252733804059838e-05f;
  p = p * f + 1.5403530393381606e-04f;
  p = p * f + 1.3333558146428441e-03f;
  p = p * f + 9.6181291076284772e-03f;
  p = p * f + 5.5504108664821576e-02f;
  p = p * f + 2.4022650695910071e-01f;
  p = p * f + 6.9314718055994531e-01f;
  p = p * f + 1.f;
  // n = -127 builds the bit pattern 0, i.e. flushes to zero instead of making a subnormal.
  const int32_t n = int32_t(r);
  return select_v(x == x, p * bits_float(uint32_t(n + 127) << 23), x);
}

inline float tanh_approx(float x) {
  const float ax = std::fabs(x);
  // 1 - 2 / (e^2|x| + 1) loses digits to cancellation near 0, so small |x| uses the odd Taylor
  // series, whose first omitted term is below 1e-8 relative for |x| < 0.4.
  const float x2 = x * x;
  float t = 3.5921280365724810e-03f;
  t = t * x2 - 8.8632355299021966e-03f;
  t = t * x2 + 2.1869488536155203e-02f;
  t = t * x2 - 5.3968253968253968e-02f;
  t = t * x2 + 1.3333333333333333e-01f;
  t = t * x2 - 3.3333333333333333e-01f;
  const float small = x + x * x2 * t;
  const float big = 1.f - 2.f / (exp2_approx(2.f * kLog2e * ax) + 1.f);
  return select_v(ax < 0.4f, small, std::copysign(big, x));
}

// Row reductions over kBk values, kept in 16 independent lanes so that they vectorize without
// reassociation (and so the summation order is fixed).
inline float row_max(const float* __restrict s) {
  float lane[16];
  for (int u = 0; u < 16; ++u) lane[u] = -kInf;
  for (int c = 0; c < kBk; c += 16)
    for (int u = 0; u < 16; ++u) lane[u] = max_v(lane[u], s[c + u]);
  float m = -kInf;
  for (int u = 0; u < 16; ++u) m = max_v(m, lane[u]);
  return m;
}

// s = 2^(s - shift) in place; returns the row sum.
inline float exp2_row(float* __restrict s, float shift) {
  float lane[16] = {};
  for (int c = 0; c < kBk; c += 16)
    for (int u = 0; u < 16; ++u) {
      s[c + u] = exp2_approx(s[c + u] - shift);
      lane[u] += s[c + u];
    }
  float sum = 0.f;
  for (int u = 0; u < 16; ++u) sum += lane[u];
  return sum;
}

// ---- tile GEMM ------------------------------------------------------------------------------
// C[m][0:N] (=|+=) sum_k A(m, k) * B[k][0:N] for m < M, with A(m, k) = A[m * am + k * ak]:
// the strides let P^T and dS^T be read in place. N must be a multiple of kNR (tiles are padded).
// Each kNR-wide piece of a C row stays in registers for the whole k loop.
template <bool kAccumulate>
void gemm(int M, int K, int N, const float* A, int am, int ak, const float* __restrict B, int ldb,
          float* __restrict C, int ldc) {
  for (int m = 0; m < M; ++m) {
    float* __restrict c_row = C + int64_t(m) * ldc;
    for (int n0 = 0; n0 < N; n0 += kNR) {
      float acc[kNR];
      for (int c = 0; c < kNR; ++c) acc[c] = kAccumulate ? c_row[n0 + c] : 0.f;
      const float* a = A + int64_t(m) * am;
      const float* b = B + n0;
      for (int k = 0; k < K; ++k, a += ak, b += ldb) {
        const float a_mk = *a;
        for (int c = 0; c < kNR; ++c) acc[c] += a_mk * b[c];
      }
      for (int c = 0; c < kNR; ++c) c_row[n0 + c] = acc[c];
    }
  }
}

// ---- problem geometry -----------------------------------------------------------------------

// One sequence: query rows [q0, q0 + nq) and key rows [k0, k0 + nk) of the flattened
// [batch * seqlen] row axis, where its lse entries start, and its band (positions i, j counted
// from the sequence's first row), clamped so that i + lo and j - hi cannot overflow.
struct Seq {
  int64_t q0, nq, k0, nk;
  int64_t lse0;  // lse index of (head 0, row 0); head h adds h * seqlen_q
  int64_t lo, hi;
};

// Rows [start, start + count) of sequence seq: a work unit (times the heads).
struct Block {
  int64_t seq, start;
};

// Rows of the flattened row axis that belong to no sequence (varlen only): zero outputs.
struct Gap {
  int64_t row0, n, lse0;
};

// j - i always lies in [-(nq - 1), nk - 1], so clamping to +-(nq + nk) keeps the band's meaning.
inline int64_t clamp_diag(int64_t x, int64_t nq, int64_t nk) {
  return std::min(std::max(x, -(nq + nk)), nq + nk);
}

// cu_seqlens made safe (see flash.h): clamped to [0, total], then non-decreasing.
inline std::vector<int64_t> safe_cu_seqlens(const int32_t* cu, int64_t n, int64_t total) {
  std::vector<int64_t> out(size_t(n + 1));
  int64_t run = 0;
  for (int64_t s = 0; s <= n; ++s) {
    run = std::max(run, std::min<int64_t>(std::max<int64_t>(cu[s], 0), total));
    out[size_t(s)] = run;
  }
  return out;
}

template <int kRows>
std::vector<Block> blocks_of(const std::vector<Seq>& seqs, int64_t Seq::*len) {
  std::vector<Block> blocks;
  for (size_t s = 0; s < seqs.size(); ++s)
    for (int64_t r = 0; r < seqs[s].*len; r += kRows) blocks.push_back({int64_t(s), r});
  return blocks;
}

// The ids of one block's rows (copied to dst) span [lo, hi] over the nonzero ones.
struct IdRange {
  int32_t lo = std::numeric_limits<int32_t>::max(), hi = std::numeric_limits<int32_t>::min();
  bool empty() const { return lo > hi; }
  bool meets(const IdRange& o) const { return !empty() && !o.empty() && lo <= o.hi && o.lo <= hi; }
};

inline IdRange load_ids(const int32_t* ids, int n, int32_t* dst) {
  IdRange r;
  for (int i = 0; i < n; ++i) {
    dst[i] = ids[i];
    if (ids[i] != 0) {
      r.lo = std::min(r.lo, ids[i]);
      r.hi = std::max(r.hi, ids[i]);
    }
  }
  return r;
}

struct Geometry {
  int64_t batch, sq, sk, hq, hkv, group;
  int d, dv, dp, dvp;  // head dims and their kNR-padded row strides
  float scale, softcap;
  bool segments;       // segment ids in use
  // FP8 descales (null otherwise) and their blocks (0: per tensor); flash.h gives the layouts.
  const float *descale_q, *descale_k, *descale_v;
  int64_t block_q, block_k, nblk_q, nblk_k;
  std::vector<Seq> seqs;
  std::vector<Block> q_blocks, k_blocks;  // of kBq query rows, of kBk keys
  std::vector<Gap> q_gaps, k_gaps;

  explicit Geometry(const FwdParams& p)
      : batch(p.batch), sq(p.seqlen_q), sk(p.seqlen_k), hq(p.heads_q), hkv(p.heads_kv),
        group(p.heads_q / p.heads_kv), d(int(p.head_dim)), dv(int(p.head_dim_v)),
        dp(int((p.head_dim + kNR - 1) / kNR * kNR)),
        dvp(int((p.head_dim_v + kNR - 1) / kNR * kNR)), scale(p.softmax_scale),
        softcap(p.softcap), segments(p.q_segment_ids != nullptr), descale_q(p.descale_q),
        descale_k(p.descale_k), descale_v(p.descale_v), block_q(p.descale_block_q),
        block_k(p.descale_block_k),
        nblk_q(block_q > 0 ? (p.seqlen_q + block_q - 1) / block_q : 1),
        nblk_k(block_k > 0 ? (p.seqlen_k + block_k - 1) / block_k : 1),
        page_table(p.page_table), page_size(p.page_size), num_pages(p.num_pages) {
    for (int64_t b = 0; b < batch; ++b) {
      if (p.seqused_k) {
        // The first nk keys, the band bottom-right aligned to them (flash.h).
        const int64_t nk = std::min<int64_t>(std::max<int64_t>(p.seqused_k[b], 0), sk);
        seqs.push_back({b * sq, sq, b * sk, nk, b * hq * sq,
                        clamp_diag(p.diag_lo + (nk - sq), sq, nk),
                        clamp_diag(p.diag_hi + (nk - sq), sq, nk)});
        continue;
      }
      if (!p.cu_seqlens_q) {
        seqs.push_back({b * sq, sq, b * sk, sk, b * hq * sq, clamp_diag(p.diag_lo, sq, sk),
                        clamp_diag(p.diag_hi, sq, sk)});
        continue;
      }
      const int64_t n = p.num_seqs;
      const auto cq = safe_cu_seqlens(p.cu_seqlens_q + b * (n + 1), n, sq);
      const auto ck = safe_cu_seqlens(p.cu_seqlens_k + b * (n + 1), n, sk);
      for (int64_t s = 0; s < n; ++s) {
        const int64_t nq = cq[s + 1] - cq[s], nk = ck[s + 1] - ck[s];
        if (nq == 0 && nk == 0) continue;
        // Bottom-right alignment per sequence: the band is relative to the diagonal nk - nq.
        seqs.push_back({b * sq + cq[s], nq, b * sk + ck[s], nk, b * hq * sq + cq[s],
                        clamp_diag(p.diag_lo + (nk - nq), nq, nk),
                        clamp_diag(p.diag_hi + (nk - nq), nq, nk)});
      }
      // Sequences are contiguous, so the uncovered rows are a head and a tail.
      q_gaps.push_back({b * sq, cq[0], b * hq * sq});
      q_gaps.push_back({b * sq + cq[n], sq - cq[n], b * hq * sq + cq[n]});
      k_gaps.push_back({b * sk, ck[0], 0});
      k_gaps.push_back({b * sk + ck[n], sk - ck[n], 0});
    }
    q_blocks = blocks_of<kBq>(seqs, &Seq::nq);
    k_blocks = blocks_of<kBk>(seqs, &Seq::nk);
  }

  // FP8: the descale of query row `row` (of the flattened [batch * seqlen_q] axis) of head h,
  // and of key row `row` of kv head hk in k (d = descale_k) or v (descale_v); 1 without FP8.
  float q_descale(int64_t row, int64_t h) const {
    if (!descale_q) return 1.f;
    const int64_t b = row / sq, pos = row - b * sq;
    return block_q > 0 ? descale_q[(b * hq + h) * nblk_q + pos / block_q]
                       : descale_q[b * hkv + h / group];
  }
  float kv_descale(const float* d, int64_t row, int64_t hk) const {
    if (!d) return 1.f;
    const int64_t b = row / sk, pos = row - b * sk;
    return block_k > 0 ? d[(b * hkv + hk) * nblk_k + pos / block_k] : d[b * hkv + hk];
  }

  // The row of k/v that holds key row `key` of the flattened [batch * seqlen_k] axis: itself,
  // or with a page table (flash.h, "Paged") its slot in the pool; -1 for a page index outside
  // [0, num_pages) (the key and value then read as zeros).
  const int32_t* page_table;
  int64_t page_size, num_pages;
  int64_t kv_row(int64_t key) const {
    if (!page_table) return key;
    const int64_t b = key / sk, pos = key - b * sk, pages = sk / page_size;
    const int64_t page = page_table[b * pages + pos / page_size];
    return page >= 0 && page < num_pages ? page * page_size + pos % page_size : -1;
  }

  // Keys of sequence q that are visible to at least one query row in [i0, i1): [first, second).
  static std::pair<int64_t, int64_t> key_range(const Seq& s, int64_t i0, int64_t i1) {
    return {std::max<int64_t>(0, i0 + s.lo), std::min(s.nk, i1 - 1 + s.hi + 1)};
  }
  // Query rows that see at least one key in [j0, j1).
  static std::pair<int64_t, int64_t> query_range(const Seq& s, int64_t j0, int64_t j1) {
    return {std::max<int64_t>(0, j0 - s.hi), std::min(s.nq, j1 - 1 - s.lo + 1)};
  }

  // Raw dot products of query row i against the tile's keys j0 + [0, kBk) become log2-domain
  // scores, -inf where masked or past the nk loaded keys. With segment ids (kid non-null: the
  // tile's key ids), keys whose id differs from qid, and every key when qid is 0, are masked too.
  // With softcap, dtanh receives 1 - tanh^2 (the softcap's derivative, used by the backward).
  void score_row(const Seq& seq, float* __restrict s, float* __restrict dtanh, int64_t i,
                 int64_t j0, int nk, int32_t qid, const int32_t* __restrict kid) const {
    const int c_lo = int(std::min<int64_t>(std::max<int64_t>(i + seq.lo - j0, 0), nk));
    int c_hi = int(std::min<int64_t>(std::max<int64_t>(i + seq.hi + 1 - j0, 0), nk));
    if (kid && qid == 0) c_hi = 0;  // a padding row sees nothing
    if (softcap > 0.f) {
      const float pre = scale / softcap, post = softcap * kLog2e;
      for (int c = 0; c < kBk; ++c) {
        const float t = tanh_approx(s[c] * pre);
        dtanh[c] = 1.f - t * t;
        s[c] = select_v((c >= c_lo) & (c < c_hi), t * post, -kInf);
      }
    } else {
      const float mul = scale * kLog2e;
      for (int c = 0; c < kBk; ++c) s[c] = select_v((c >= c_lo) & (c < c_hi), s[c] * mul, -kInf);
    }
    if (kid)
      for (int c = 0; c < kBk; ++c) s[c] = select_v(kid[c] == qid, s[c], -kInf);
  }
};

// Per-thread tile buffers. Vectors start zeroed and padding columns are never written, so the
// padded GEMM columns only ever see finite values.
struct Tiles {
  std::vector<float> q, dout, kt, kr, vt, v, s, dtanh, dp, acc, acc2, m, l, lse2, di;
  std::vector<int32_t> qseg, kseg;  // segment ids of the query block and the key tile
  explicit Tiles(const Geometry& g)
      : q(kBq * g.dp), dout(kBq * g.dvp), kt(int64_t(g.d) * kBk), kr(kBk * g.dp),
        vt(int64_t(g.dv) * kBk), v(kBk * g.dvp), s(kBq * kBk), dtanh(kBq * kBk),
        dp(kBq * kBk), acc(std::max(kBq, kBk) * std::max(g.dp, g.dvp)), acc2(kBk * g.dvp),
        m(kBq), l(kBq), lse2(kBq), di(kBq), qseg(kBq), kseg(kBk) {}
};

// A work item of the query-block passes (forward, backward pass A): query head h (kv head hk)
// and rows [i0, i0 + mq) of one sequence.
struct QItem {
  int64_t h, hk, i0;
  const Seq* seq;
  int mq;
};

inline QItem q_item(const Geometry& g, int64_t item) {
  const int64_t nblocks = int64_t(g.q_blocks.size());
  const Block blk = g.q_blocks[size_t(item % nblocks)];
  const Seq& sq = g.seqs[size_t(blk.seq)];
  const int64_t h = item / nblocks;
  return {h, h / g.group, blk.start, &sq, int(std::min<int64_t>(kBq, sq.nq - blk.start))};
}

// ---- forward --------------------------------------------------------------------------------

template <class E>
void fwd_item(const FwdParams& p, const Geometry& g, int64_t item, Tiles& w) {
  using T = typename E::T;
  using EO = typename OutOf<E>::type;
  const QItem qi = q_item(g, item);
  const int64_t h = qi.h, hk = qi.hk, i0 = qi.i0;
  const Seq& sq = *qi.seq;
  const int mq = qi.mq;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  auto* out = static_cast<typename EO::T*>(p.out);

  for (int r = 0; r < mq; ++r) {
    const int64_t row = sq.q0 + i0 + r;
    load_row<E>(q + (row * g.hq + h) * g.d, g.d, &w.q[r * g.dp], g.q_descale(row, h));
  }
  std::fill(w.m.begin(), w.m.end(), -kInf);
  std::fill(w.l.begin(), w.l.end(), 0.f);
  std::fill(w.acc.begin(), w.acc.begin() + mq * g.dvp, 0.f);
  IdRange qids;
  if (g.segments) qids = load_ids(p.q_segment_ids + sq.q0 + i0, mq, w.qseg.data());
  const int32_t* kid = g.segments ? w.kseg.data() : nullptr;

  const auto keys = g.key_range(sq, i0, i0 + mq);
  for (int64_t j0 = keys.first; j0 < keys.second; j0 += kBk) {
    const int nk = int(std::min<int64_t>(kBk, keys.second - j0));
    if (g.segments && !qids.meets(load_ids(p.kv_segment_ids + sq.k0 + j0, nk, w.kseg.data())))
      continue;  // no id in common: every score of the tile is masked
    for (int c = 0; c < nk; ++c) {
      const int64_t key = sq.k0 + j0 + c, slot = g.kv_row(key), row = slot * g.hkv + hk;
      if (slot < 0) {  // a page outside the pool: zeros
        for (int i = 0; i < g.d; ++i) w.kt[int64_t(i) * kBk + c] = 0.f;
        std::fill(&w.v[c * g.dvp], &w.v[c * g.dvp] + g.dv, 0.f);
        continue;
      }
      load_col<E>(k + row * g.d, g.d, &w.kt[c], kBk, g.kv_descale(g.descale_k, key, hk));
      load_row<E>(v + row * g.dv, g.dv, &w.v[c * g.dvp], g.kv_descale(g.descale_v, key, hk));
    }
    gemm<false>(mq, g.d, kBk, w.q.data(), g.dp, 1, w.kt.data(), kBk, w.s.data(), kBk);
    for (int r = 0; r < mq; ++r) {
      float* s = &w.s[r * kBk];
      g.score_row(sq, s, w.dtanh.data(), i0 + r, j0, nk, w.qseg[r], kid);
      const float m_new = std::max(w.m[r], row_max(s));
      // A row with nothing visible yet keeps m = -inf; shifting by 0 then gives p = 0, not nan.
      const float shift = m_new == -kInf ? 0.f : m_new;
      const float alpha = exp2_approx(w.m[r] - shift);
      w.l[r] = w.l[r] * alpha + exp2_row(s, shift);
      w.m[r] = m_new;
      float* acc = &w.acc[r * g.dvp];
      for (int c = 0; c < g.dvp; ++c) acc[c] *= alpha;
    }
    gemm<true>(mq, nk, g.dvp, w.s.data(), kBk, 1, w.v.data(), g.dvp, w.acc.data(), g.dvp);
  }

  for (int r = 0; r < mq; ++r) {
    const int64_t i = i0 + r;
    const bool empty = w.l[r] == 0.f;  // (a nan l is not empty: nan inputs give nan outputs)
    store_row<EO>(&w.acc[r * g.dvp], empty ? 0.f : 1.f / w.l[r], g.dv,
                  out + ((sq.q0 + i) * g.hq + h) * g.dv);
    p.lse[sq.lse0 + h * g.sq + i] = empty ? -kInf : w.m[r] * kLn2 + std::log(w.l[r]);
  }
}

// Rows of no sequence (varlen): out = 0, lse = -inf; zero gradients for q and k rows alike.
template <class E>
void zero_rows(const std::vector<Gap>& gaps, int64_t heads, int dim, int64_t lse_stride,
               void* x, float* lse) {
  using T = typename E::T;
  T* t = static_cast<T*>(x);
  for (const Gap& gap : gaps)
    for (int64_t r = 0; r < gap.n; ++r)
      for (int64_t h = 0; h < heads; ++h) {
        std::fill_n(t + ((gap.row0 + r) * heads + h) * dim, dim, E::store(0.f));
        if (lse) lse[gap.lse0 + h * lse_stride + r] = -kInf;
      }
}

// ---- backward -------------------------------------------------------------------------------

// Loads query rows [i0, i0 + mq) of head h with what the backward needs per row: q, dout and the
// log2-domain lse (+inf for empty rows, so that every p of such a row comes out 0).
template <class E>
void load_bwd_queries(const BwdParams& p, const Geometry& g, const Seq& sq, int64_t h,
                      int64_t i0, int mq, Tiles& w) {
  using T = typename E::T;
  const T* q = static_cast<const T*>(p.q);
  const T* dout = static_cast<const T*>(p.dout);
  for (int r = 0; r < mq; ++r) {
    const int64_t row = (sq.q0 + i0 + r) * g.hq + h;
    load_row<E>(q + row * g.d, g.d, &w.q[r * g.dp]);
    load_row<E>(dout + row * g.dv, g.dv, &w.dout[r * g.dvp]);
    const float lse = p.lse_in[sq.lse0 + h * g.sq + i0 + r];
    w.lse2[r] = lse == -kInf ? kInf : lse * kLog2e;
  }
}

// With w.q, w.dout, w.lse2, w.di (and w.qseg, w.kseg) holding mq query rows and w.kt, w.vt the
// key tile at j0: leaves P in w.s and dS (already times softmax_scale) in w.dp.
inline void probs_and_dscores(const Geometry& g, const Seq& sq, int64_t i0, int mq, int64_t j0,
                              int nk, Tiles& w) {
  gemm<false>(mq, g.d, kBk, w.q.data(), g.dp, 1, w.kt.data(), kBk, w.s.data(), kBk);
  gemm<false>(mq, g.dv, kBk, w.dout.data(), g.dvp, 1, w.vt.data(), kBk, w.dp.data(), kBk);
  const int32_t* kid = g.segments ? w.kseg.data() : nullptr;
  for (int r = 0; r < mq; ++r) {
    float* __restrict s = &w.s[r * kBk];
    float* __restrict dp = &w.dp[r * kBk];
    float* __restrict dt = &w.dtanh[r * kBk];
    g.score_row(sq, s, dt, i0 + r, j0, nk, w.qseg[r], kid);
    const float lse2 = w.lse2[r], di = w.di[r];
    for (int c = 0; c < kBk; ++c) s[c] = exp2_approx(s[c] - lse2);
    if (g.softcap > 0.f) {
      for (int c = 0; c < kBk; ++c) dp[c] = s[c] * (dp[c] - di) * dt[c] * g.scale;
    } else {
      for (int c = 0; c < kBk; ++c) dp[c] = s[c] * (dp[c] - di) * g.scale;
    }
  }
}

// Loads keys [j0, j0 + nk) of kv head hk transposed (kt, vt) and, if want_rows, row-major (kr).
template <class E>
void load_bwd_keys(const BwdParams& p, const Geometry& g, const Seq& sq, int64_t hk, int64_t j0,
                   int nk, bool want_rows, Tiles& w) {
  using T = typename E::T;
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  for (int c = 0; c < nk; ++c) {
    const int64_t row = (sq.k0 + j0 + c) * g.hkv + hk;
    load_col<E>(k + row * g.d, g.d, &w.kt[c], kBk);
    load_col<E>(v + row * g.dv, g.dv, &w.vt[c], kBk);
    if (want_rows) load_row<E>(k + row * g.d, g.d, &w.kr[c * g.dp]);
  }
}

// Pass A: D_i for the block's rows (stored to di_all, indexed like lse, for pass B) and dQ.
template <class E>
void bwd_dq_item(const BwdParams& p, const Geometry& g, int64_t item, float* di_all, Tiles& w) {
  using T = typename E::T;
  const QItem qi = q_item(g, item);
  const int64_t h = qi.h, hk = qi.hk, i0 = qi.i0;
  const Seq& sq = *qi.seq;
  const int mq = qi.mq;
  const T* out = static_cast<const T*>(p.out_in);

  load_bwd_queries<E>(p, g, sq, h, i0, mq, w);
  float* o = w.acc2.data();  // acc2 is unused in pass A: it holds one row of out at a time
  for (int r = 0; r < mq; ++r) {
    load_row<E>(out + ((sq.q0 + i0 + r) * g.hq + h) * g.dv, g.dv, o);
    float sum = 0.f;
    for (int c = 0; c < g.dv; ++c) sum += o[c] * w.dout[r * g.dvp + c];
    // The lse cotangent enters only through D (d lse_i / d s_ij = P_ij).
    const int64_t row = sq.lse0 + h * g.sq + i0 + r;
    if (p.dlse) sum -= p.dlse[row];
    w.di[r] = sum;
    di_all[row] = sum;
  }
  std::fill(w.acc.begin(), w.acc.begin() + mq * g.dp, 0.f);
  IdRange qids;
  if (g.segments) qids = load_ids(p.q_segment_ids + sq.q0 + i0, mq, w.qseg.data());

  const auto keys = g.key_range(sq, i0, i0 + mq);
  for (int64_t j0 = keys.first; j0 < keys.second; j0 += kBk) {
    const int nk = int(std::min<int64_t>(kBk, keys.second - j0));
    if (g.segments && !qids.meets(load_ids(p.kv_segment_ids + sq.k0 + j0, nk, w.kseg.data())))
      continue;
    load_bwd_keys<E>(p, g, sq, hk, j0, nk, true, w);
    probs_and_dscores(g, sq, i0, mq, j0, nk, w);
    gemm<true>(mq, nk, g.dp, w.dp.data(), kBk, 1, w.kr.data(), g.dp, w.acc.data(), g.dp);
  }
  T* dq = static_cast<T*>(p.dq);
  for (int r = 0; r < mq; ++r)
    store_row<E>(&w.acc[r * g.dp], 1.f, g.d, dq + ((sq.q0 + i0 + r) * g.hq + h) * g.d);
}

// Pass B: dK and dV of one key block, summed over the query heads of its group.
template <class E>
void bwd_dkdv_item(const BwdParams& p, const Geometry& g, int64_t item, const float* di_all,
                   Tiles& w) {
  using T = typename E::T;
  const int64_t nblocks = int64_t(g.k_blocks.size());
  const Block blk = g.k_blocks[size_t(item % nblocks)];
  const int64_t hk = item / nblocks;
  const Seq& sq = g.seqs[size_t(blk.seq)];
  const int64_t j0 = blk.start;
  const int nk = int(std::min<int64_t>(kBk, sq.nk - j0));
  float* dk_acc = w.acc.data();
  float* dv_acc = w.acc2.data();
  std::fill(dk_acc, dk_acc + nk * g.dp, 0.f);
  std::fill(dv_acc, dv_acc + nk * g.dvp, 0.f);
  IdRange kids;
  if (g.segments) kids = load_ids(p.kv_segment_ids + sq.k0 + j0, nk, w.kseg.data());

  const auto queries = g.query_range(sq, j0, j0 + nk);
  if (queries.first < queries.second) load_bwd_keys<E>(p, g, sq, hk, j0, nk, false, w);
  for (int64_t h = hk * g.group; h < (hk + 1) * g.group; ++h) {
    for (int64_t i0 = queries.first; i0 < queries.second; i0 += kBq) {
      const int mq = int(std::min<int64_t>(kBq, queries.second - i0));
      if (g.segments && !kids.meets(load_ids(p.q_segment_ids + sq.q0 + i0, mq, w.qseg.data())))
        continue;
      load_bwd_queries<E>(p, g, sq, h, i0, mq, w);
      std::copy_n(&di_all[sq.lse0 + h * g.sq + i0], mq, w.di.begin());
      probs_and_dscores(g, sq, i0, mq, j0, nk, w);
      // dV += P^T dout and dK += dS^T q: A is read transposed through its strides.
      gemm<true>(nk, mq, g.dvp, w.s.data(), 1, kBk, w.dout.data(), g.dvp, dv_acc, g.dvp);
      gemm<true>(nk, mq, g.dp, w.dp.data(), 1, kBk, w.q.data(), g.dp, dk_acc, g.dp);
    }
  }
  T* dk = static_cast<T*>(p.dk);
  T* dv = static_cast<T*>(p.dv);
  for (int c = 0; c < nk; ++c) {
    const int64_t row = (sq.k0 + j0 + c) * g.hkv + hk;
    store_row<E>(&dk_acc[c * g.dp], 1.f, g.d, dk + row * g.d);
    store_row<E>(&dv_acc[c * g.dvp], 1.f, g.dv, dv + row * g.dv);
  }
}

template <class E>
void fwd(const FwdParams& p, int num_threads) {
  const Geometry g(p);
  const auto tiles = [&] { return Tiles(g); };
  zero_rows<typename OutOf<E>::type>(g.q_gaps, g.hq, g.dv, g.sq, p.out, p.lse);
  parallel_items(int64_t(g.q_blocks.size()) * g.hq, num_threads, tiles,
                 [&](int64_t item, Tiles& w) { fwd_item<E>(p, g, item, w); });
}

template <class E>
void bwd(const BwdParams& p, int num_threads) {
  const Geometry g(p);
  const auto tiles = [&] { return Tiles(g); };
  zero_rows<E>(g.q_gaps, g.hq, g.d, 0, p.dq, nullptr);
  zero_rows<E>(g.k_gaps, g.hkv, g.d, 0, p.dk, nullptr);
  zero_rows<E>(g.k_gaps, g.hkv, g.dv, 0, p.dv, nullptr);
  std::vector<float> di_all(size_t(g.batch * g.hq * g.sq));
  // Pass B reads every D_i of its query heads, so pass A must have finished all of them.
  parallel_items(int64_t(g.q_blocks.size()) * g.hq, num_threads, tiles,
                 [&](int64_t item, Tiles& w) { bwd_dq_item<E>(p, g, item, di_all.data(), w); });
  parallel_items(int64_t(g.k_blocks.size()) * g.hkv, num_threads, tiles,
                 [&](int64_t item, Tiles& w) { bwd_dkdv_item<E>(p, g, item, di_all.data(), w); });
}

}  // namespace

void run_fwd_cpu(const FwdParams& p, int num_threads) {
  switch (p.dtype) {
    case DType::kFloat32: return fwd<F32>(p, num_threads);
    case DType::kFloat16: return fwd<F16>(p, num_threads);
    case DType::kBFloat16: return fwd<BF16>(p, num_threads);
    case DType::kFloat8E4M3: return fwd<E4M3>(p, num_threads);
  }
}

void run_bwd_cpu(const BwdParams& p, int num_threads) {
  switch (p.dtype) {
    case DType::kFloat32: return bwd<F32>(p, num_threads);
    case DType::kFloat16: return bwd<F16>(p, num_threads);
    case DType::kBFloat16: return bwd<BF16>(p, num_threads);
    case DType::kFloat8E4M3: return;  // FP8 is forward only (flash.h): no FFI target sends it
  }
}

}  // namespace fa3

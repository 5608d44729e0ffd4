// fa3_jax Hopper backward: standalone correctness / determinism / timing driver for run_bwd_sm90.
//
// Correctness: random normal inputs, forward out/lse from a naive float32 GPU reference (rounded
// to the input dtype like a real forward), backward dq/dk/dv from a naive float32 reference, errors
// as ||x - ref|| / ||ref||; outputs and workspace poisoned with NaN first.
// Determinism: deterministic=true, dq/dk/dv bit-identical over 5 runs.
// Timing: FlashAttention-3 paper shapes (hidden 2048, 16k tokens), cudaEvents, median of 10.
// Usage: test_bwd_sm90 [all | check | det | time | small [HDIM]]   (default all)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "flash.h"

#define CK(x)                                                                                  \
  do {                                                                                         \
    cudaError_t e_ = (x);                                                                      \
    if (e_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, \
                   __LINE__, #x);                                                              \
      std::exit(2);                                                                            \
    }                                                                                          \
  } while (0)

using fa3::BwdParams;
using fa3::DType;
constexpr int64_t kInf = fa3::kUnbounded;

// ---- device helpers -----------------------------------------------------------------------------

__device__ __forceinline__ float to_f(uint16_t x, bool bf16) {
  return bf16 ? __bfloat162float(__ushort_as_bfloat16(x)) : __half2float(__ushort_as_half(x));
}
__device__ __forceinline__ uint16_t from_f(float x, bool bf16) {
  return bf16 ? __bfloat16_as_ushort(__float2bfloat16(x)) : __half_as_ushort(__float2half(x));
}

__device__ __forceinline__ uint32_t hash32(uint64_t x) {
  x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
  return uint32_t(x);
}

__global__ void init_normal(uint16_t* x, int64_t n, uint64_t seed, bool bf16) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float u1 = (hash32(seed * 0x9E3779B97F4A7C15ULL + 2 * i) + 1.f) * 2.3283064e-10f;
    const float u2 = hash32(seed * 0x9E3779B97F4A7C15ULL + 2 * i + 1) * 2.3283064e-10f;
    x[i] = from_f(sqrtf(-2.f * logf(u1)) * cospif(2.f * u2), bf16);
  }
}

__global__ void fill_f32(float* x, int64_t n, float v) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) x[i] = v;
}

struct RefArgs {
  const uint16_t *q, *k, *v, *out, *dout;
  const float* lse;
  int B, Sq, Sk, Hq, Hkv, D, Dv;
  int64_t diag_lo, diag_hi;
  float scale, softcap;
  bool bf16;
};

__device__ __forceinline__ bool visible(const RefArgs& a, int i, int j) {
  const int64_t d = int64_t(j) - i;
  return d >= a.diag_lo && d <= a.diag_hi;
}

// score (after scale and softcap) and d score / d (q.k*scale)
__device__ __forceinline__ float ref_score(const RefArgs& a, float qk, float* dtanh) {
  float s = qk * a.scale;
  if (a.softcap > 0.f) {
    const float t = tanhf(s / a.softcap);
    s = a.softcap * t;
    if (dtanh) *dtanh = 1.f - t * t;
  } else if (dtanh) {
    *dtanh = 1.f;
  }
  return s;
}

// One block per (b, h, i): out (rounded to the dtype) and lse.
__global__ void ref_fwd(RefArgs a, uint16_t* out, float* lse) {
  extern __shared__ float sm[];  // Sk scores
  __shared__ float red[32];
  const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (a.Hq / a.Hkv);
  const uint16_t* q = a.q + ((int64_t(b) * a.Sq + i) * a.Hq + h) * a.D;
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < a.Sk; j += blockDim.x) {
    float s = -INFINITY;
    if (visible(a, i, j)) {
      const uint16_t* k = a.k + ((int64_t(b) * a.Sk + j) * a.Hkv + hk) * a.D;
      float acc = 0.f;
      for (int d = 0; d < a.D; ++d) acc += to_f(q[d], a.bf16) * to_f(k[d], a.bf16);
      s = ref_score(a, acc, nullptr);
    }
    sm[j] = s;
    mx = fmaxf(mx, s);
  }
  for (int o = 16; o; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(~0u, mx, o));
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = mx;
  __syncthreads();
  mx = -INFINITY;
  for (int w = 0; w < blockDim.x / 32; ++w) mx = fmaxf(mx, red[w]);
  __syncthreads();
  float sum = 0.f;
  for (int j = threadIdx.x; j < a.Sk; j += blockDim.x) {
    const float p = mx == -INFINITY ? 0.f : expf(sm[j] - mx);
    sm[j] = p;
    sum += p;
  }
  for (int o = 16; o; o /= 2) sum += __shfl_xor_sync(~0u, sum, o);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = sum;
  __syncthreads();
  sum = 0.f;
  for (int w = 0; w < blockDim.x / 32; ++w) sum += red[w];
  uint16_t* o = out + ((int64_t(b) * a.Sq + i) * a.Hq + h) * a.Dv;
  for (int d = threadIdx.x; d < a.Dv; d += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < a.Sk; ++j) {
      if (sm[j] != 0.f) acc += sm[j] * to_f(a.v[((int64_t(b) * a.Sk + j) * a.Hkv + hk) * a.Dv + d], a.bf16);
    }
    o[d] = from_f(sum > 0.f ? acc / sum : 0.f, a.bf16);
  }
  if (threadIdx.x == 0) lse[(int64_t(b) * a.Hq + h) * a.Sq + i] = sum > 0.f ? mx + logf(sum) : -INFINITY;
}

// One block per (b, h, i): P and dS rows into [b, h, i, j] buffers, and dq (float).
__global__ void ref_bwd_rows(RefArgs a, float* P, float* dS, float* dq) {
  extern __shared__ float sm[];  // Sk dS values
  __shared__ float red[32];
  const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (a.Hq / a.Hkv);
  const int64_t qrow = (int64_t(b) * a.Sq + i) * a.Hq + h;
  const uint16_t* q = a.q + qrow * a.D;
  const uint16_t* go = a.dout + qrow * a.Dv;
  const uint16_t* o = a.out + qrow * a.Dv;
  float dsum = 0.f;
  for (int d = threadIdx.x; d < a.Dv; d += blockDim.x) dsum += to_f(go[d], a.bf16) * to_f(o[d], a.bf16);
  for (int off = 16; off; off /= 2) dsum += __shfl_xor_sync(~0u, dsum, off);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = dsum;
  __syncthreads();
  dsum = 0.f;
  for (int w = 0; w < blockDim.x / 32; ++w) dsum += red[w];
  const float l = a.lse[(int64_t(b) * a.Hq + h) * a.Sq + i];
  const int64_t prow = ((int64_t(b) * a.Hq + h) * a.Sq + i) * a.Sk;
  for (int j = threadIdx.x; j < a.Sk; j += blockDim.x) {
    float p = 0.f, ds = 0.f;
    if (visible(a, i, j) && l != -INFINITY) {
      const uint16_t* k = a.k + ((int64_t(b) * a.Sk + j) * a.Hkv + hk) * a.D;
      const uint16_t* v = a.v + ((int64_t(b) * a.Sk + j) * a.Hkv + hk) * a.Dv;
      float acc = 0.f, dp = 0.f;
      for (int d = 0; d < a.D; ++d) acc += to_f(q[d], a.bf16) * to_f(k[d], a.bf16);
      for (int d = 0; d < a.Dv; ++d) dp += to_f(go[d], a.bf16) * to_f(v[d], a.bf16);
      float dt;
      const float s = ref_score(a, acc, &dt);
      p = expf(s - l);
      ds = p * (dp - dsum) * dt;
    }
    P[prow + j] = p;
    dS[prow + j] = ds;
    sm[j] = ds;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < a.D; d += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < a.Sk; ++j) {
      if (sm[j] != 0.f) acc += sm[j] * to_f(a.k[((int64_t(b) * a.Sk + j) * a.Hkv + hk) * a.D + d], a.bf16);
    }
    dq[qrow * a.D + d] = acc * a.scale;
  }
}

// One block per (b, hk, j): dk, dv summed over the query heads of the group.
__global__ void ref_bwd_cols(RefArgs a, const float* P, const float* dS, float* dk, float* dv) {
  const int j = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int G = a.Hq / a.Hkv;
  const int64_t krow = (int64_t(b) * a.Sk + j) * a.Hkv + hk;
  for (int d = threadIdx.x; d < a.D; d += blockDim.x) {
    float acc = 0.f;
    for (int h = hk * G; h < (hk + 1) * G; ++h)
      for (int i = 0; i < a.Sq; ++i) {
        const float ds = dS[((int64_t(b) * a.Hq + h) * a.Sq + i) * a.Sk + j];
        if (ds != 0.f) acc += ds * to_f(a.q[((int64_t(b) * a.Sq + i) * a.Hq + h) * a.D + d], a.bf16);
      }
    dk[krow * a.D + d] = acc * a.scale;
  }
  for (int d = threadIdx.x; d < a.Dv; d += blockDim.x) {
    float acc = 0.f;
    for (int h = hk * G; h < (hk + 1) * G; ++h)
      for (int i = 0; i < a.Sq; ++i) {
        const float p = P[((int64_t(b) * a.Hq + h) * a.Sq + i) * a.Sk + j];
        if (p != 0.f) acc += p * to_f(a.dout[((int64_t(b) * a.Sq + i) * a.Hq + h) * a.Dv + d], a.bf16);
      }
    dv[krow * a.Dv + d] = acc;
  }
}

// ---- host side ----------------------------------------------------------------------------------

struct Case {
  int B, Sq, Sk, Hq, Hkv, D, Dv;
  bool bf16;
  int64_t diag_lo, diag_hi;
  float softcap;
  const char* mask;
};

static float h2f(uint16_t x, bool bf16) {
  uint32_t u;
  if (bf16) {
    u = uint32_t(x) << 16;
  } else {
    const uint32_t s = (x >> 15) & 1, e = (x >> 10) & 31, m = x & 1023;
    if (e == 0) {
      float f = std::ldexp(float(m), -24);
      return s ? -f : f;
    }
    u = (s << 31) | (e == 31 ? (255u << 23) | (m << 13) : ((e + 112) << 23) | (m << 13));
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Err {
  double rel;
  double max_abs;
  int64_t bad;  // non-finite entries
};

static Err compare(const uint16_t* dev_x, const float* dev_ref, int64_t n, bool bf16) {
  std::vector<uint16_t> x(n);
  std::vector<float> r(n);
  CK(cudaMemcpy(x.data(), dev_x, n * 2, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(r.data(), dev_ref, n * 4, cudaMemcpyDeviceToHost));
  double num = 0, den = 0, mx = 0;
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = h2f(x[i], bf16);
    if (!std::isfinite(v)) { ++bad; continue; }
    const double d = double(v) - r[i];
    num += d * d;
    den += double(r[i]) * r[i];
    mx = std::max(mx, std::fabs(d));
  }
  return {den > 0 ? std::sqrt(num / den) : std::sqrt(num), mx, bad};
}

struct Buffers {
  uint16_t *q = nullptr, *k = nullptr, *v = nullptr, *out = nullptr, *dout = nullptr;
  uint16_t *dq = nullptr, *dk = nullptr, *dv = nullptr;
  float* lse = nullptr;
  void* ws = nullptr;
  size_t ws_bytes = 0;
  int64_t nq, nk, nv, no;
  void alloc(const Case& c) {
    nq = int64_t(c.B) * c.Sq * c.Hq * c.D;
    nk = int64_t(c.B) * c.Sk * c.Hkv * c.D;
    nv = int64_t(c.B) * c.Sk * c.Hkv * c.Dv;
    no = int64_t(c.B) * c.Sq * c.Hq * c.Dv;
    CK(cudaMalloc(&q, nq * 2)); CK(cudaMalloc(&k, nk * 2)); CK(cudaMalloc(&v, nv * 2));
    CK(cudaMalloc(&out, no * 2)); CK(cudaMalloc(&dout, no * 2));
    CK(cudaMalloc(&dq, nq * 2)); CK(cudaMalloc(&dk, nk * 2)); CK(cudaMalloc(&dv, nv * 2));
    CK(cudaMalloc(&lse, int64_t(c.B) * c.Hq * c.Sq * 4 + 4));
  }
  void release() {
    for (void* p : {(void*)q, (void*)k, (void*)v, (void*)out, (void*)dout, (void*)dq, (void*)dk, (void*)dv,
                    (void*)lse, ws}) if (p) CK(cudaFree(p));
  }
};

static BwdParams make_params(const Case& c, const Buffers& bf, bool det) {
  BwdParams p;
  p.batch = c.B; p.seqlen_q = c.Sq; p.seqlen_k = c.Sk; p.heads_q = c.Hq; p.heads_kv = c.Hkv;
  p.head_dim = c.D; p.head_dim_v = c.Dv;
  p.softmax_scale = 1.f / std::sqrt(float(c.D));
  p.softcap = c.softcap;
  p.diag_lo = c.diag_lo; p.diag_hi = c.diag_hi;
  p.dtype = c.bf16 ? DType::kBFloat16 : DType::kFloat16;
  p.q = bf.q; p.k = bf.k; p.v = bf.v;
  p.dout = bf.dout; p.out_in = bf.out; p.lse_in = bf.lse;
  p.dq = bf.dq; p.dk = bf.dk; p.dv = bf.dv;
  p.deterministic = det;
  return p;
}

static void run_bwd(const BwdParams& p, Buffers& bf, bool poison) {
  const size_t need = fa3::sm90_bwd_workspace_bytes(p);
  if (need > bf.ws_bytes) {
    if (bf.ws) CK(cudaFree(bf.ws));
    CK(cudaMalloc(&bf.ws, need));
    bf.ws_bytes = need;
  }
  if (poison) {
    CK(cudaMemset(bf.dq, 0xFF, bf.nq * 2)); CK(cudaMemset(bf.dk, 0xFF, bf.nk * 2));
    CK(cudaMemset(bf.dv, 0xFF, bf.nv * 2));
    if (need) CK(cudaMemset(bf.ws, 0xFF, need));
  }
  const char* err = fa3::run_bwd_sm90(p, bf.ws, nullptr);
  if (err) { std::fprintf(stderr, "run_bwd_sm90: %s\n", err); std::exit(3); }
  CK(cudaGetLastError());
}

static void init_inputs(const Case& c, Buffers& bf, uint64_t seed) {
  init_normal<<<1024, 256>>>(bf.q, bf.nq, seed + 1, c.bf16);
  init_normal<<<1024, 256>>>(bf.k, bf.nk, seed + 2, c.bf16);
  init_normal<<<1024, 256>>>(bf.v, bf.nv, seed + 3, c.bf16);
  init_normal<<<1024, 256>>>(bf.dout, bf.no, seed + 4, c.bf16);
  CK(cudaGetLastError());
}

static RefArgs ref_args(const Case& c, const Buffers& bf) {
  RefArgs a;
  a.q = bf.q; a.k = bf.k; a.v = bf.v; a.out = bf.out; a.dout = bf.dout; a.lse = bf.lse;
  a.B = c.B; a.Sq = c.Sq; a.Sk = c.Sk; a.Hq = c.Hq; a.Hkv = c.Hkv; a.D = c.D; a.Dv = c.Dv;
  a.diag_lo = c.diag_lo; a.diag_hi = c.diag_hi;
  a.scale = 1.f / std::sqrt(float(c.D));
  a.softcap = c.softcap;
  a.bf16 = c.bf16;
  return a;
}

// Returns true when the case passes.
static bool check_case(const Case& c, uint64_t seed, bool det_runs) {
  Buffers bf;
  bf.alloc(c);
  init_inputs(c, bf, seed);
  RefArgs a = ref_args(c, bf);
  ref_fwd<<<dim3(c.Sq, c.Hq, c.B), 128, c.Sk * 4>>>(a, bf.out, bf.lse);
  CK(cudaGetLastError());
  float *P, *dS, *rdq, *rdk, *rdv;
  const int64_t np = int64_t(c.B) * c.Hq * c.Sq * c.Sk;
  CK(cudaMalloc(&P, np * 4)); CK(cudaMalloc(&dS, np * 4));
  CK(cudaMalloc(&rdq, bf.nq * 4)); CK(cudaMalloc(&rdk, bf.nk * 4)); CK(cudaMalloc(&rdv, bf.nv * 4));
  ref_bwd_rows<<<dim3(c.Sq, c.Hq, c.B), 128, c.Sk * 4>>>(a, P, dS, rdq);
  ref_bwd_cols<<<dim3(c.Sk, c.Hkv, c.B), 128>>>(a, P, dS, rdk, rdv);
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());

  BwdParams p = make_params(c, bf, det_runs);
  run_bwd(p, bf, true);
  CK(cudaDeviceSynchronize());
  const Err eq = compare(bf.dq, rdq, bf.nq, c.bf16);
  const Err ek = compare(bf.dk, rdk, bf.nk, c.bf16);
  const Err ev = compare(bf.dv, rdv, bf.nv, c.bf16);
  // 16-bit P and dS operands: bf16 has 8 mantissa bits, fp16 11.
  const double tol = c.bf16 ? 2e-2 : 5e-3;
  bool ok = eq.bad == 0 && ek.bad == 0 && ev.bad == 0 && eq.rel < tol && ek.rel < tol && ev.rel < tol;
  bool det_ok = true;
  if (det_runs) {
    std::vector<uint16_t> q0(bf.nq), k0(bf.nk), v0(bf.nv), x;
    CK(cudaMemcpy(q0.data(), bf.dq, bf.nq * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(k0.data(), bf.dk, bf.nk * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(v0.data(), bf.dv, bf.nv * 2, cudaMemcpyDeviceToHost));
    for (int r = 0; r < 4; ++r) {
      run_bwd(p, bf, true);
      CK(cudaDeviceSynchronize());
      x.resize(bf.nq);
      CK(cudaMemcpy(x.data(), bf.dq, bf.nq * 2, cudaMemcpyDeviceToHost));
      det_ok &= std::memcmp(x.data(), q0.data(), bf.nq * 2) == 0;
      x.resize(bf.nk);
      CK(cudaMemcpy(x.data(), bf.dk, bf.nk * 2, cudaMemcpyDeviceToHost));
      det_ok &= std::memcmp(x.data(), k0.data(), bf.nk * 2) == 0;
      x.resize(bf.nv);
      CK(cudaMemcpy(x.data(), bf.dv, bf.nv * 2, cudaMemcpyDeviceToHost));
      det_ok &= std::memcmp(x.data(), v0.data(), bf.nv * 2) == 0;
    }
  }
  ok &= det_ok;
  std::printf("%-4s d=%3d/%3d %-5s B=%d Sq=%4d Sk=%4d H=%d/%d cap=%2.0f %s | dq %.1e dk %.1e dv %.1e | max %.1e nan %lld%s\n",
              ok ? "PASS" : "FAIL", c.D, c.Dv, c.bf16 ? "bf16" : "fp16", c.B, c.Sq, c.Sk, c.Hq, c.Hkv, c.softcap,
              c.mask, eq.rel, ek.rel, ev.rel, std::max({eq.max_abs, ek.max_abs, ev.max_abs}),
              (long long)(eq.bad + ek.bad + ev.bad), det_runs ? (det_ok ? " det=bitwise-same x5" : " det=DIFFERENT") : "");
  CK(cudaFree(P)); CK(cudaFree(dS)); CK(cudaFree(rdq)); CK(cudaFree(rdk)); CK(cudaFree(rdv));
  bf.release();
  return ok;
}

static Case mk(int B, int Sq, int Sk, int Hq, int Hkv, int D, int Dv, bool bf16, const char* mask, float cap = 0.f) {
  Case c{B, Sq, Sk, Hq, Hkv, D, Dv, bf16, -kInf, kInf, cap, mask};
  const int64_t off = int64_t(Sk) - Sq;  // bottom-right alignment
  if (!std::strcmp(mask, "causal")) { c.diag_hi = off; }
  if (!std::strcmp(mask, "window")) { c.diag_lo = off - 64; c.diag_hi = off + 16; }
  if (!std::strcmp(mask, "causal-tl")) { c.diag_hi = 0; }
  return c;
}

static std::vector<std::pair<int, int>> compiled_hdims() {
  std::vector<std::pair<int, int>> out;
  for (auto dd : std::vector<std::pair<int, int>>{{64, 64}, {96, 96}, {128, 128}, {192, 192}, {192, 128}, {256, 256}}) {
    BwdParams p;
    p.head_dim = dd.first; p.head_dim_v = dd.second; p.heads_q = p.heads_kv = 1; p.dtype = DType::kBFloat16;
    if (fa3::sm90_supports_bwd(p)) out.push_back(dd);
  }
  return out;
}

// small: one causal GQA case with a determinism check, sized for compute-sanitizer; head dim
// small_hdim (0: the first compiled one).
static int run_checks(bool small, int small_hdim = 0) {
  int fails = 0, n = 0;
  uint64_t seed = 1234;
  if (small) {
    std::pair<int, int> dd = compiled_hdims()[0];
    for (auto c : compiled_hdims()) {
      if (c.first == small_hdim) { dd = c; break; }
    }
    fails += !check_case(mk(1, 113, 203, 4, 2, dd.first, dd.second, true, "causal"), seed, true);
    return fails;
  }
  for (auto dd : compiled_hdims()) {
    const int D = dd.first, Dv = dd.second;
    std::vector<Case> cases = {
        mk(2, 113, 113, 4, 4, D, Dv, true, "full"),
        mk(2, 113, 113, 4, 4, D, Dv, false, "full"),
        mk(1, 1000, 1000, 4, 2, D, Dv, true, "causal"),
        mk(1, 1000, 1000, 4, 2, D, Dv, false, "causal"),
        mk(2, 113, 203, 6, 2, D, Dv, true, "window", 30.f),
        mk(2, 203, 113, 6, 2, D, Dv, false, "window", 30.f),
        mk(1, 1, 1000, 4, 1, D, Dv, true, "full"),
        mk(1, 1000, 7, 2, 1, D, Dv, false, "causal"),   // rows with no visible key
        mk(3, 7, 5, 2, 2, D, Dv, true, "full"),  // (Sk = 1 makes the exact dq, dk zero: a rounding-noise ratio)
        mk(1, 300, 1000, 4, 4, D, Dv, true, "causal-tl", 50.f),
    };
    for (const Case& c : cases) { fails += !check_case(c, seed++, false); ++n; }
  }
  std::printf("correctness: %d / %d passed\n", n - fails, n);
  return fails;
}

static int run_det() {
  int fails = 0;
  for (auto dd : compiled_hdims()) {
    fails += !check_case(mk(2, 1000, 1000, 4, 2, dd.first, dd.second, true, "causal"), 77, true);
    fails += !check_case(mk(1, 777, 1000, 4, 4, dd.first, dd.second, false, "window"), 78, true);
  }
  std::printf("determinism: %s\n", fails ? "FAILED" : "all bitwise identical");
  return fails;
}

static void run_timing() {
  std::printf("\ntiming (bf16, hidden 2048, 16k tokens; TFLOP/s = 2.5*4*B*H*S*S*D [/2 causal] / median time)\n");
  std::printf("%5s %8s |", "hdim", "mask");
  const int seqs[] = {512, 1024, 2048, 4096, 8192, 16384};
  for (int s : seqs) std::printf(" %7d", s);
  std::printf("\n");
  for (int D : {64, 128, 256}) {
    BwdParams probe;
    probe.head_dim = probe.head_dim_v = D; probe.heads_q = probe.heads_kv = 1; probe.dtype = DType::kBFloat16;
    if (!fa3::sm90_supports_bwd(probe)) continue;
    for (int variant = 0; variant < (D == 128 ? 3 : 2); ++variant) {
      const bool causal = variant == 1, det = variant == 2;
      std::printf("%5d %8s |", D, causal ? "causal" : det ? "full-det" : "full");
      for (int S : seqs) {
        const int B = 16384 / S, H = 2048 / D;
        Case c = mk(B, S, S, H, H, D, D, true, causal ? "causal" : "full");
        Buffers bf;
        bf.alloc(c);
        init_inputs(c, bf, 99);
        init_normal<<<1024, 256>>>(bf.out, bf.no, 5, true);
        // Realistic magnitudes: P = exp(s - lse) stays O(1/S) for random scores.
        fill_f32<<<1024, 256>>>(bf.lse, int64_t(B) * H * S, std::log(float(S)) + 0.5f);
        CK(cudaGetLastError());
        BwdParams p = make_params(c, bf, det);
        for (int w = 0; w < 3; ++w) run_bwd(p, bf, false);
        cudaEvent_t e0, e1;
        CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
        std::vector<float> ms;
        for (int r = 0; r < 10; ++r) {
          CK(cudaEventRecord(e0));
          run_bwd(p, bf, false);
          CK(cudaEventRecord(e1));
          CK(cudaEventSynchronize(e1));
          float t;
          CK(cudaEventElapsedTime(&t, e0, e1));
          ms.push_back(t);
        }
        std::sort(ms.begin(), ms.end());
        const double med = 0.5 * (ms[4] + ms[5]);
        const double flops = 2.5 * 4.0 * B * H * double(S) * S * D * (causal ? 0.5 : 1.0);
        std::printf(" %7.1f", flops / (med * 1e-3) / 1e12);
        std::fflush(stdout);
        CK(cudaEventDestroy(e0)); CK(cudaEventDestroy(e1));
        bf.release();
      }
      std::printf("\n");
    }
  }
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "all";
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (sm_%d%d, %d SMs)\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount);
  int fails = 0;
  if (mode == "small") return run_checks(true, argc > 2 ? std::atoi(argv[2]) : 0) ? 1 : 0;
  if (mode == "all" || mode == "check") fails += run_checks(false);
  if (mode == "all" || mode == "det") fails += run_det();
  if (mode == "all" || mode == "time") run_timing();
  std::printf("%s\n", fails ? "SOME CHECKS FAILED" : "ALL CHECKS PASSED");
  return fails ? 1 : 0;
}

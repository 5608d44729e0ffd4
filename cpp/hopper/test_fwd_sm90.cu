// fa3_jax Hopper forward: standalone correctness and timing driver for run_fwd_sm90.
//
//   test_fwd_sm90 [--check] [--time] [--small] [--hdim N]
// --check: every compiled head dim x {fp16, bf16} x a list of awkward shapes and masks, against
//          a naive float32 reference kernel on the same (16-bit) inputs; outputs are poisoned
//          with NaN first, so an unwritten element fails.
// --time:  FA3-paper shapes (hidden 2048, 16k tokens), bf16, median of 30 runs after warm-up.
// --check-fp8 / --time-fp8: the same for the FP8 (e4m3) kernel at its head dims, per-tensor
//          descales of 1 (the check's reference reads the same e4m3 inputs; out is bfloat16),
//          timed with the V transpose it runs first, as benchmarks/bench_fp8.py's fp8 column;
//          --per-block: per-tile descales of 1 instead (fp8_attention's default form).
// --hdim N, --seqlen S, --mask full|causal: time (or check) only those (e.g. under ncu).
// --small: one small causal case (for compute-sanitizer).
// --seq S, --mask full|causal: time only that sequence length / mask (e.g. one kernel for ncu).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../flash.h"
#include "tile_size.h"

#define CHECK_CUDA(x)                                                                  \
  do {                                                                                 \
    cudaError_t e_ = (x);                                                              \
    if (e_ != cudaSuccess) {                                                           \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(2);                                                                    \
    }                                                                                  \
  } while (0)

namespace {

using fa3::DType;
using fa3::FwdParams;
constexpr int64_t kInf = fa3::kUnbounded;

__device__ float to_float(__half x) { return __half2float(x); }
__device__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ float to_float(__nv_fp8_e4m3 x) { return float(x); }
template <class T> __device__ T from_float(float x);
template <> __device__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __nv_fp8_e4m3 from_float<__nv_fp8_e4m3>(float x) { return __nv_fp8_e4m3(x); }

__device__ uint32_t hash32(uint64_t x) {
  x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
  return uint32_t(x);
}

// Standard normal samples (Box-Muller on a counter hash): never zeros, fresh per seed.
template <class T>
__global__ void fill_normal(T* x, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float u1 = (hash32(seed * 0x9E3779B97F4A7C15ULL + 2 * i) + 1.f) * 2.3283064e-10f;
    float u2 = hash32(seed * 0x9E3779B97F4A7C15ULL + 2 * i + 1) * 2.3283064e-10f;
    x[i] = from_float<T>(sqrtf(-2.f * logf(u1)) * cospif(2.f * u2));
  }
}

// One warp per (batch, head, query row); float32 throughout, expf, two-pass free online form.
template <class T>
__global__ void reference_fwd(FwdParams p, float* out, float* lse) {
  int64_t const row = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  int const lane = threadIdx.x % 32;
  if (row >= p.batch * p.heads_q * p.seqlen_q) return;
  int64_t const i = row % p.seqlen_q, h = (row / p.seqlen_q) % p.heads_q, b = row / (p.seqlen_q * p.heads_q);
  int64_t const hk = h / (p.heads_q / p.heads_kv);
  T const* q = static_cast<T const*>(p.q) + ((b * p.seqlen_q + i) * p.heads_q + h) * p.head_dim;
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  float m = -INFINITY, l = 0.f;
  for (int64_t j = 0; j < p.seqlen_k; ++j) {
    if (j - i < p.diag_lo || j - i > p.diag_hi) continue;
    T const* k = static_cast<T const*>(p.k) + ((b * p.seqlen_k + j) * p.heads_kv + hk) * p.head_dim;
    T const* v = static_cast<T const*>(p.v) + ((b * p.seqlen_k + j) * p.heads_kv + hk) * p.head_dim_v;
    float s = 0.f;
    for (int d = lane; d < p.head_dim; d += 32) s += to_float(q[d]) * to_float(k[d]);
    for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffff, s, o);
    s *= p.softmax_scale;
    if (p.softcap > 0.f) s = p.softcap * tanhf(s / p.softcap);
    float const m_new = fmaxf(m, s);
    float const c = expf(m - m_new), e = expf(s - m_new);
    l = l * c + e;
    for (int t = 0; t < p.head_dim_v / 32; ++t) acc[t] = acc[t] * c + e * to_float(v[lane + 32 * t]);
    m = m_new;
  }
  float* o = out + row * p.head_dim_v;  // row order (b, h, i) here; compared with care below
  for (int t = 0; t < p.head_dim_v / 32; ++t) o[lane + 32 * t] = l > 0.f ? acc[t] / l : 0.f;
  if (lane == 0) lse[row] = l > 0.f ? m + logf(l) : -INFINITY;
}

// Compares kernel out [b, s, h, dv] (16-bit, T: bfloat16 for FP8) and lse [b, h, s] with the reference
// (out [b, h, s, dv], lse [b, h, s]); accumulates squared errors and max errors on the device.
template <class T>
__global__ void compare(FwdParams p, float const* ref_out, float const* ref_lse, double* acc) {
  // acc: [0] sum (o - r)^2, [1] sum r^2, [2] max |o - r|, [3] max lse err, [4] bad count
  int64_t const n = p.batch * p.heads_q * p.seqlen_q * p.head_dim_v;
  double se = 0, sr = 0, mx = 0, ml = 0, bad = 0;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    int64_t const d = idx % p.head_dim_v, row = idx / p.head_dim_v;
    int64_t const i = row % p.seqlen_q, h = (row / p.seqlen_q) % p.heads_q, b = row / (p.seqlen_q * p.heads_q);
    float const o = to_float(static_cast<T const*>(p.out)[((b * p.seqlen_q + i) * p.heads_q + h) * p.head_dim_v + d]);
    float const r = ref_out[idx];
    if (!(o == o)) { bad += 1; continue; }
    se += double(o - r) * (o - r);
    sr += double(r) * r;
    mx = fmax(mx, fabs(double(o - r)));
    if (d == 0) {
      float const lo = p.lse[row], lr = ref_lse[row];
      if (isinf(lr) || isinf(lo)) { if (!(lo == lr)) bad += 1; }
      else if (!(lo == lo)) bad += 1;
      else ml = fmax(ml, fabs(double(lo - lr)));
    }
  }
  atomicAdd(&acc[0], se); atomicAdd(&acc[1], sr); atomicAdd(&acc[4], bad);
  // max via CAS on the bit pattern (non-negative doubles order like their bits)
  atomicMax(reinterpret_cast<unsigned long long*>(&acc[2]), __double_as_longlong(mx));
  atomicMax(reinterpret_cast<unsigned long long*>(&acc[3]), __double_as_longlong(ml));
}

struct Case {
  int64_t b, sq, sk, hq, hkv;
  int64_t lo, hi;
  float softcap;
  char const* name;
};

int g_fail = 0, g_pass = 0;

// A workspace of sm90_fwd_workspace_bytes(p) for one call (split-KV sizes it by shape).
struct Workspace {
  void* ptr = nullptr;
  explicit Workspace(FwdParams const& p) {
    CHECK_CUDA(cudaMalloc(&ptr, std::max<size_t>(16, fa3::sm90_fwd_workspace_bytes(p))));
  }
  ~Workspace() { cudaFree(ptr); }
};

// FP8 descales of 1, per tensor ([batch, heads_kv]) or, with g_per_block (--per-block), per
// tile (the kernel's blocks, tile_size.h); none for 16-bit calls.
bool g_per_block = false;
struct Descales {
  float* ones = nullptr;
  Descales(FwdParams& p) {
    if (p.dtype != DType::kFloat8E4M3) return;
    fa3::sm90::FwdTileSize const ts = fa3::sm90::fwd_tile_size(int(p.head_dim), int(p.head_dim_v), true);
    int64_t const nq = (p.seqlen_q + ts.block_m - 1) / ts.block_m, nk = (p.seqlen_k + ts.block_n - 1) / ts.block_n;
    int64_t const n = std::max<int64_t>(g_per_block ? p.batch * std::max(p.heads_q * nq, p.heads_kv * nk)
                                                    : p.batch * p.heads_kv, 1);
    std::vector<float> h(n, 1.f);
    CHECK_CUDA(cudaMalloc(&ones, n * 4));
    CHECK_CUDA(cudaMemcpy(ones, h.data(), n * 4, cudaMemcpyHostToDevice));
    p.descale_q = p.descale_k = p.descale_v = ones;
    if (g_per_block) { p.descale_block_q = ts.block_m; p.descale_block_k = ts.block_n; }
  }
  ~Descales() { cudaFree(ones); }
};

// T: the inputs' element type; TO: out's (bfloat16 for FP8).
template <class T, class TO = T>
void run_case(DType dt, int64_t d, int64_t dv, Case const& c, uint64_t seed, bool verbose) {
  FwdParams p;
  p.batch = c.b; p.seqlen_q = c.sq; p.seqlen_k = c.sk; p.heads_q = c.hq; p.heads_kv = c.hkv;
  p.head_dim = d; p.head_dim_v = dv; p.softmax_scale = 1.f / std::sqrt(float(d));
  p.softcap = c.softcap; p.diag_lo = c.lo; p.diag_hi = c.hi; p.dtype = dt;
  int64_t const nq = c.b * c.sq * c.hq * d, nk = c.b * c.sk * c.hkv * d, nv = c.b * c.sk * c.hkv * dv;
  int64_t const no = c.b * c.sq * c.hq * dv, nl = c.b * c.hq * c.sq;
  T *q, *k, *v; TO* o; float *lse, *ro, *rl; double* acc;
  CHECK_CUDA(cudaMalloc(&q, std::max<int64_t>(nq, 1) * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&k, std::max<int64_t>(nk, 1) * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&v, std::max<int64_t>(nv, 1) * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&o, std::max<int64_t>(no, 1) * sizeof(TO)));
  CHECK_CUDA(cudaMalloc(&lse, std::max<int64_t>(nl, 1) * 4));
  CHECK_CUDA(cudaMalloc(&ro, std::max<int64_t>(no, 1) * 4));
  CHECK_CUDA(cudaMalloc(&rl, std::max<int64_t>(nl, 1) * 4));
  CHECK_CUDA(cudaMalloc(&acc, 5 * sizeof(double)));
  if (nq) fill_normal<<<256, 256>>>(q, nq, seed * 3 + 0);
  if (nk) fill_normal<<<256, 256>>>(k, nk, seed * 3 + 1);
  if (nv) fill_normal<<<256, 256>>>(v, nv, seed * 3 + 2);
  CHECK_CUDA(cudaMemset(o, 0xFF, no * sizeof(TO)));  // NaN poison
  CHECK_CUDA(cudaMemset(lse, 0xFF, nl * 4));
  CHECK_CUDA(cudaMemset(acc, 0, 5 * sizeof(double)));
  p.q = q; p.k = k; p.v = v; p.out = o; p.lse = lse;
  Descales descales(p);
  Workspace ws(p);
  char const* err = fa3::run_fwd_sm90(p, ws.ptr, nullptr);
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  if (err) { std::printf("FAIL %s: %s\n", c.name, err); ++g_fail; return; }
  reference_fwd<T><<<(nl + 7) / 8, 256>>>(p, ro, rl);
  compare<TO><<<264, 256>>>(p, ro, rl, acc);
  CHECK_CUDA(cudaGetLastError());
  double h[5];
  CHECK_CUDA(cudaMemcpy(h, acc, sizeof(h), cudaMemcpyDeviceToHost));
  double const rel = h[1] > 0 ? std::sqrt(h[0] / h[1]) : std::sqrt(h[0]);
  // 16-bit P and output rounding: bf16 keeps 8 bits, fp16 11; FP8 rounds P to e4m3 (4 bits).
  double const tol = dt == DType::kFloat8E4M3 ? 5e-2 : dt == DType::kBFloat16 ? 1.5e-2 : 4e-3;
  bool const ok = h[4] == 0 && rel <= tol && h[3] <= 2e-3;
  (ok ? g_pass : g_fail)++;
  if (!ok || verbose)
    std::printf("%s %-4s d=%3ld dv=%3ld %-26s b=%ld sq=%ld sk=%ld hq=%ld hkv=%ld: rel_l2=%.2e max_abs=%.2e lse_err=%.2e bad=%.0f\n",
                ok ? "ok  " : "FAIL",
                dt == DType::kFloat8E4M3 ? "e4m3" : dt == DType::kBFloat16 ? "bf16" : "fp16", long(d), long(dv), c.name,
                long(c.b), long(c.sq), long(c.sk), long(c.hq), long(c.hkv), rel, h[2], h[3], h[4]);
  cudaFree(q); cudaFree(k); cudaFree(v); cudaFree(o); cudaFree(lse); cudaFree(ro); cudaFree(rl); cudaFree(acc);
}

std::vector<Case> cases() {
  // Bottom-right causal: hi = sk - sq; window (left, right) bottom-right: [sk-sq-left, sk-sq+right].
  return {
      {2, 113, 203, 4, 4, -kInf, kInf, 0.f, "full 113x203"},
      {1, 1, 1, 2, 2, -kInf, kInf, 0.f, "full 1x1"},
      {2, 1, 7, 4, 2, -kInf, 6, 0.f, "causal-br 1x7 gqa"},
      {1, 7, 1, 2, 1, -kInf, -6, 0.f, "causal-br 7x1 (empty rows)"},
      {1, 7, 0, 2, 2, -kInf, kInf, 0.f, "seqlen_k=0"},
      {1, 1000, 1000, 4, 1, -kInf, 0, 0.f, "causal 1000 mqa"},
      {1, 4097, 4097, 2, 2, -kInf, kInf, 0.f, "full 4097"},
      {1, 4097, 4097, 2, 1, -kInf, 0, 0.f, "causal 4097 mqa"},
      {1, 1000, 4097, 4, 2, 4097 - 1000 - 256, 4097 - 1000 + 64, 0.f, "window 1000x4097 gqa"},
      {2, 113, 113, 2, 2, -kInf, 0, 30.f, "causal softcap30"},
      {1, 4097, 1000, 2, 2, -kInf, 0, 0.f, "causal-tl 4097x1000"},
      {1, 1000, 113, 2, 2, -100, 5, 5.f, "band softcap5"},
      // More tiles than SMs: CTAs run several tiles, so buffers reused across tiles are tested.
      {8, 1000, 1000, 8, 2, -kInf, 0, 0.f, "causal 8x1000 gqa"},
      {4, 2048, 2048, 8, 8, -kInf, kInf, 0.f, "full 4x2048"},
      // Long enough for the large tile (tile_size.h, fwd_use_large_tile) where a head dim has one.
      {2, 1100, 1100, 4, 2, -kInf, kInf, 30.f, "full softcap30 gqa 1100"},
      {1, 8193, 8193, 2, 1, -kInf, 0, 0.f, "causal 8193 mqa"},
      {1, 8200, 9001, 2, 2, -kInf, 9001 - 8200, 0.f, "causal-br 8200x9001"},
      // Decode shapes: split-KV and (seqlen_q 1, all keys visible) GQA packing.
      {2, 1, 4097, 32, 8, -kInf, kInf, 0.f, "decode gqa 1x4097"},
      {1, 1, 3001, 8, 8, 3001 - 1 - 100, 3001 - 1, 0.f, "decode window100"},
      {1, 7, 20000, 8, 1, -kInf, 20000 - 7, 0.f, "spec mqa causal-br 7x20000"},
  };
}

struct HD { int64_t d, dv; };
std::vector<HD> head_dims(int only, DType dt = DType::kFloat16) {
  std::vector<HD> all = {{64, 64}, {96, 96}, {128, 128}, {192, 192}, {192, 128}, {256, 256}}, r;
  float const one = 1.f;  // the supports query only asks whether FP8 descales are given
  for (auto x : all) {
    FwdParams p; p.dtype = dt; p.head_dim = x.d; p.head_dim_v = x.dv; p.heads_q = p.heads_kv = 1;
    p.descale_q = p.descale_k = p.descale_v = &one;
    if (fa3::sm90_supports_fwd(p) && (only == 0 || only == x.d)) r.push_back(x);
  }
  return r;
}

void check(int only) {
  uint64_t seed = 1;
  for (HD hd : head_dims(only))
    for (DType dt : {DType::kFloat16, DType::kBFloat16})
      for (Case const& c : cases()) {
        if (dt == DType::kFloat16) run_case<__half>(dt, hd.d, hd.dv, c, seed++, true);
        else run_case<__nv_bfloat16>(dt, hd.d, hd.dv, c, seed++, true);
      }
  std::printf("CHECK SUMMARY: %d passed, %d failed\n", g_pass, g_fail);
}

void check_fp8(int only) {
  uint64_t seed = 1000;
  for (HD hd : head_dims(only, DType::kFloat8E4M3))
    for (Case const& c : cases())
      run_case<__nv_fp8_e4m3, __nv_bfloat16>(DType::kFloat8E4M3, hd.d, hd.dv, c, seed++, true);
  std::printf("CHECK FP8 SUMMARY: %d passed, %d failed\n", g_pass, g_fail);
}

// T: the input element type (bfloat16 or e4m3); out is bfloat16 either way.
template <class T>
void time_paper(int only, DType dt, int64_t only_seqlen, int only_mask) {
  bool const fp8 = dt == DType::kFloat8E4M3;
  std::printf("\nTIMING %s forward, hidden 2048, 16k tokens: TFLOP/s (median of 30)\n",
              !fp8 ? "bf16" : g_per_block ? "FP8 (e4m3, per-block descales, V transpose included)"
                                          : "FP8 (e4m3, per-tensor descales, V transpose included)");
  std::printf("%-5s %-7s %8s %8s %8s %8s %8s %8s\n", "hdim", "mask", "512", "1k", "2k", "4k", "8k", "16k");
  for (HD hd : head_dims(only, dt)) {
    if (hd.d != hd.dv || (hd.d != 64 && hd.d != 128 && hd.d != 256 && only == 0)) continue;
    for (bool causal : {false, true}) {
      if (only_mask >= 0 && only_mask != int(causal)) continue;
      std::printf("%-5ld %-7s", long(hd.d), causal ? "causal" : "full");
      for (int64_t s : {512, 1024, 2048, 4096, 8192, 16384}) {
        if (only_seqlen && s != only_seqlen) { std::printf(" %8s", "-"); continue; }
        FwdParams p;
        p.batch = 16384 / s; p.seqlen_q = p.seqlen_k = s; p.heads_q = p.heads_kv = 2048 / hd.d;
        p.head_dim = hd.d; p.head_dim_v = hd.dv; p.softmax_scale = 1.f / std::sqrt(float(hd.d));
        p.diag_hi = causal ? 0 : kInf; p.dtype = dt;
        int64_t const n = p.batch * s * p.heads_q * hd.d;
        T *q, *k, *v; __nv_bfloat16* o; float* lse;
        CHECK_CUDA(cudaMalloc(&q, n * sizeof(T))); CHECK_CUDA(cudaMalloc(&k, n * sizeof(T)));
        CHECK_CUDA(cudaMalloc(&v, n * sizeof(T))); CHECK_CUDA(cudaMalloc(&o, n * 2));
        CHECK_CUDA(cudaMalloc(&lse, p.batch * p.heads_q * s * 4));
        fill_normal<<<1024, 256>>>(q, n, 11); fill_normal<<<1024, 256>>>(k, n, 12); fill_normal<<<1024, 256>>>(v, n, 13);
        p.q = q; p.k = k; p.v = v; p.out = o; p.lse = lse;
        Descales descales(p);
        Workspace ws(p);
        for (int w = 0; w < 5; ++w) fa3::run_fwd_sm90(p, ws.ptr, nullptr);
        CHECK_CUDA(cudaDeviceSynchronize());
        std::vector<float> ms;
        cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
        for (int r = 0; r < 30; ++r) {
          cudaEventRecord(e0);
          char const* err = fa3::run_fwd_sm90(p, ws.ptr, nullptr);
          cudaEventRecord(e1);
          CHECK_CUDA(cudaEventSynchronize(e1));
          if (err) { std::printf(" %s\n", err); std::exit(1); }
          float t; cudaEventElapsedTime(&t, e0, e1); ms.push_back(t);
        }
        CHECK_CUDA(cudaGetLastError());
        std::sort(ms.begin(), ms.end());
        double const flops = 4.0 * p.batch * p.heads_q * double(s) * s * hd.d * (causal ? 0.5 : 1.0);
        std::printf(" %8.1f", flops / (ms[ms.size() / 2] * 1e-3) / 1e12);
        std::fflush(stdout);
        cudaFree(q); cudaFree(k); cudaFree(v); cudaFree(o); cudaFree(lse);
        cudaEventDestroy(e0); cudaEventDestroy(e1);
      }
      std::printf("\n");
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool do_check = false, do_time = false, small = false, check8 = false, time8 = false;
  int only = 0, only_mask = -1;
  int64_t only_seqlen = 0;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--check")) do_check = true;
    else if (!std::strcmp(argv[i], "--time")) do_time = true;
    else if (!std::strcmp(argv[i], "--small")) small = true;
    else if (!std::strcmp(argv[i], "--check-fp8")) check8 = true;
    else if (!std::strcmp(argv[i], "--time-fp8")) time8 = true;
    else if (!std::strcmp(argv[i], "--per-block")) g_per_block = true;
    else if (!std::strcmp(argv[i], "--hdim") && i + 1 < argc) only = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--seqlen") && i + 1 < argc) only_seqlen = std::atoll(argv[++i]);
    else if (!std::strcmp(argv[i], "--mask") && i + 1 < argc) only_mask = !std::strcmp(argv[++i], "causal");
  }
  if (small) {
    HD hd = head_dims(only).front();
    run_case<__half>(DType::kFloat16, hd.d, hd.dv, {1, 113, 203, 2, 1, -kInf, 90, 0.f, "small causal-br"}, 7, true);
  }
  if (do_check) check(only);
  if (check8) check_fp8(only);
  if (do_time) time_paper<__nv_bfloat16>(only, DType::kBFloat16, only_seqlen, only_mask);
  if (time8) time_paper<__nv_fp8_e4m3>(only, DType::kFloat8E4M3, only_seqlen, only_mask);
  return g_fail ? 1 : 0;
}

// Standalone test of the CPU kernels (not built by the package):
//   g++ -O2 -std=c++17 -pthread cpp/cpu/test_flash_cpu.cc cpp/cpu/flash_cpu.cc -o test_flash_cpu
//   ./test_flash_cpu            correctness against a double-precision reference
//   ./test_flash_cpu --bench    timings
// Exit status 0 iff every check passed.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../flash.h"
#include "dtype_convert.h"

namespace {

using fa3::DType;
constexpr int64_t kU = fa3::kUnbounded;
const double kInfD = std::numeric_limits<double>::infinity();

int g_failures = 0;
int g_checks = 0;

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::printf("  FAIL: %s\n", what.c_str());
  }
}

// ---- dtype conversions ----------------------------------------------------------------------

// Decodes binary16 from its fields with ldexp: independent of the code under test.
double fp16_reference(uint16_t h) {
  const int e = (h >> 10) & 31, m = h & 1023;
  const double sign = (h & 0x8000) ? -1.0 : 1.0;
  if (e == 31) return m ? std::numeric_limits<double>::quiet_NaN() : sign * kInfD;
  if (e == 0) return sign * std::ldexp(double(m), -24);
  return sign * std::ldexp(double(1024 + m), e - 25);
}

// Correct round-to-nearest-even of a finite float to binary16, as a double value.
double fp16_round_reference(float f) {
  const double a = std::fabs(double(f));
  if (a >= 65520.0) return std::copysign(kInfD, f);
  int e;
  std::frexp(a, &e);                              // a = frac * 2^e, frac in [0.5, 1)
  const int ulp_exp = std::max(e - 11, -24);      // 11 significant bits, subnormal spacing 2^-24
  const double n = std::nearbyint(std::ldexp(a, -ulp_exp));  // default mode: ties to even
  return std::copysign(std::ldexp(n, ulp_exp), f);
}

// Correct round-to-nearest-even of a finite float to bfloat16, as a double value.
double bf16_round_reference(float f) {
  const uint32_t lo_bits = fa3::float_bits(f) & 0xffff0000u;
  const double lo = fa3::bits_float(lo_bits);
  // Past the largest bf16 the next step up is 2^128 (which then stands for inf).
  const double hi = (lo_bits & 0x7fffffffu) == 0x7f7f0000u ? std::copysign(0x1p128, f)
                                                            : fa3::bits_float(lo_bits + 0x10000u);
  const double x = f, dlo = std::fabs(x - lo), dhi = std::fabs(hi - x);
  const double r = dlo != dhi ? (dlo < dhi ? lo : hi) : ((lo_bits >> 16) & 1u) ? hi : lo;
  return std::fabs(r) == 0x1p128 ? std::copysign(kInfD, f) : r;
}

void test_conversions() {
  int bad_decode = 0, bad_trip = 0, bad_round16 = 0, bad_roundbf = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = fa3::fp16_to_float(uint16_t(h));
    const double ref = fp16_reference(uint16_t(h));
    if (std::isnan(ref) ? !std::isnan(f) : double(f) != ref) ++bad_decode;
    const uint16_t back = fa3::float_to_fp16(f);
    // nans must come back as quiet nans of the same sign; everything else exactly
    if (std::isnan(ref) ? ((back & 0x7e00) != 0x7e00 || (back & 0x8000) != (h & 0x8000))
                        : back != h)
      ++bad_trip;
    const uint16_t bback = fa3::float_to_bf16(fa3::bf16_to_float(uint16_t(h)));
    if ((h & 0x7fff) > 0x7f80 ? ((bback & 0x7fc0) != 0x7fc0 || (bback & 0x8000) != (h & 0x8000))
                              : bback != h)
      ++bad_trip;
  }
  auto check16 = [&](float f) {
    if (std::isnan(f)) return;
    if (double(fa3::fp16_to_float(fa3::float_to_fp16(f))) != fp16_round_reference(f)) ++bad_round16;
  };
  auto checkbf = [&](float f) {
    if (std::isnan(f)) return;
    if (double(fa3::bf16_to_float(fa3::float_to_bf16(f))) != bf16_round_reference(f)) ++bad_roundbf;
  };
  // A stride through every float pattern, then the exact ties between neighbouring representable
  // values and one float ulp either side of them, where rounding mistakes live.
  for (uint64_t x = 0; x < (uint64_t(1) << 32); x += 997) {
    check16(fa3::bits_float(uint32_t(x)));
    checkbf(fa3::bits_float(uint32_t(x)));
  }
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    const double a = fp16_reference(uint16_t(h)), b = fp16_reference(uint16_t(h + 1));
    const float mid = float((a + b) / 2);  // exact: 12 significant bits
    for (float f : {mid, std::nextafter(mid, 0.f), std::nextafter(mid, 1e30f)}) {
      check16(f);
      check16(-f);
    }
  }
  for (uint32_t h = 0; h < 0x7f80; ++h) {
    const float mid = fa3::bits_float((h << 16) | 0x8000u);
    for (float f : {mid, std::nextafter(mid, 0.f), std::nextafter(mid, 1e30f)}) {
      checkbf(f);
      checkbf(-f);
    }
  }
  for (float f : {65504.f, 65519.99f, 65520.f, 1e30f, std::numeric_limits<float>::infinity(),
                  5.96e-8f, 2.98e-8f, 2.99e-8f, 1e-45f, 6.1035e-5f})
    check16(f);
  const float qnan = std::numeric_limits<float>::quiet_NaN();
  const bool nan_ok = std::isnan(fa3::fp16_to_float(fa3::float_to_fp16(qnan))) &&
                      std::isnan(fa3::bf16_to_float(fa3::float_to_bf16(-qnan))) &&
                      std::isnan(fa3::bf16_to_float(fa3::float_to_bf16(fa3::bits_float(0x7f800001u))));
  std::printf("conversions: decode %d, round-trip %d, fp16 rounding %d, bf16 rounding %d errors; nan %s\n",
              bad_decode, bad_trip, bad_round16, bad_roundbf, nan_ok ? "ok" : "BAD");
  check(bad_decode == 0 && bad_trip == 0 && bad_round16 == 0 && bad_roundbf == 0 && nan_ok,
        "dtype conversions");
}

// ---- tensors --------------------------------------------------------------------------------

// A tensor in the kernel's storage dtype, plus the exact float value of every element.
struct Tensor {
  DType dt = DType::kFloat32;
  std::vector<float> val;
  std::vector<uint16_t> half;  // storage for fp16 / bf16

  Tensor(DType d, size_t n) : dt(d), val(n), half(d == DType::kFloat32 ? 0 : n) {}
  void* data() { return dt == DType::kFloat32 ? static_cast<void*>(val.data()) : half.data(); }
  // Rounds val to the storage dtype (for inputs) ...
  void encode() {
    for (size_t i = 0; i < half.size(); ++i) {
      half[i] = dt == DType::kFloat16 ? fa3::float_to_fp16(val[i]) : fa3::float_to_bf16(val[i]);
      val[i] = dt == DType::kFloat16 ? fa3::fp16_to_float(half[i]) : fa3::bf16_to_float(half[i]);
    }
  }
  // ... or reads val back from storage (for outputs).
  void decode() {
    for (size_t i = 0; i < half.size(); ++i)
      val[i] = dt == DType::kFloat16 ? fa3::fp16_to_float(half[i]) : fa3::bf16_to_float(half[i]);
  }
  bool same_bits(const Tensor& o) const { return val == o.val && half == o.half; }
};

Tensor random_tensor(DType dt, size_t n, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.f, 1.f);
  Tensor t(dt, n);
  for (auto& x : t.val) x = normal(rng);
  t.encode();
  return t;
}

// ---- reference ------------------------------------------------------------------------------

struct Case {
  std::string name;
  int64_t b, sq, sk, hq, hkv, d, dv;
  int64_t lo = -kU, hi = kU;
  float scale = 0.f;  // 0: 1 / sqrt(d)
  float softcap = 0.f;
  DType dt = DType::kFloat32;
  int threads = 2;
};

struct Grads {
  std::vector<double> out, lse, dq, dk, dv;
};

// Plain double-precision attention forward and backward, one query row at a time.
Grads reference(const Case& c, float scale, const Tensor& q, const Tensor& k, const Tensor& v,
                const Tensor& dout) {
  Grads r;
  r.out.assign(c.b * c.sq * c.hq * c.dv, 0.0);
  r.lse.assign(c.b * c.hq * c.sq, -kInfD);
  r.dq.assign(c.b * c.sq * c.hq * c.d, 0.0);
  r.dk.assign(c.b * c.sk * c.hkv * c.d, 0.0);
  r.dv.assign(c.b * c.sk * c.hkv * c.dv, 0.0);
  std::vector<double> s(c.sk), raw(c.sk), dp(c.sk);
  for (int64_t b = 0; b < c.b; ++b)
    for (int64_t h = 0; h < c.hq; ++h) {
      const int64_t hk = h / (c.hq / c.hkv);
      for (int64_t i = 0; i < c.sq; ++i) {
        const float* qi = &q.val[((b * c.sq + i) * c.hq + h) * c.d];
        const float* doi = &dout.val[((b * c.sq + i) * c.hq + h) * c.dv];
        double m = -kInfD;
        for (int64_t j = 0; j < c.sk; ++j) {
          if (j - i < c.lo || j - i > c.hi) {
            s[j] = -kInfD;
            continue;
          }
          const float* kj = &k.val[((b * c.sk + j) * c.hkv + hk) * c.d];
          double dot = 0;
          for (int64_t e = 0; e < c.d; ++e) dot += double(qi[e]) * kj[e];
          raw[j] = double(scale) * dot;
          s[j] = c.softcap > 0 ? c.softcap * std::tanh(raw[j] / c.softcap) : raw[j];
          m = std::max(m, s[j]);
        }
        if (m == -kInfD) continue;  // empty row: zeros and lse = -inf
        double sum = 0;
        for (int64_t j = 0; j < c.sk; ++j) sum += s[j] == -kInfD ? 0.0 : std::exp(s[j] - m);
        r.lse[(b * c.hq + h) * c.sq + i] = m + std::log(sum);
        double* oi = &r.out[((b * c.sq + i) * c.hq + h) * c.dv];
        double di = 0;
        for (int64_t j = 0; j < c.sk; ++j) {
          if (s[j] == -kInfD) continue;
          s[j] = std::exp(s[j] - m) / sum;  // now P_ij
          const float* vj = &v.val[((b * c.sk + j) * c.hkv + hk) * c.dv];
          double dpj = 0;
          for (int64_t e = 0; e < c.dv; ++e) {
            oi[e] += s[j] * vj[e];
            dpj += double(doi[e]) * vj[e];
          }
          dp[j] = dpj;
          di += s[j] * dpj;
        }
        double* dqi = &r.dq[((b * c.sq + i) * c.hq + h) * c.d];
        for (int64_t j = 0; j < c.sk; ++j) {
          if (s[j] == -kInfD) continue;
          double ds = s[j] * (dp[j] - di) * scale;
          if (c.softcap > 0) {
            const double t = std::tanh(raw[j] / c.softcap);
            ds *= 1 - t * t;
          }
          const int64_t kv_row = (b * c.sk + j) * c.hkv + hk;
          const float* kj = &k.val[kv_row * c.d];
          for (int64_t e = 0; e < c.d; ++e) {
            dqi[e] += ds * kj[e];
            r.dk[kv_row * c.d + e] += ds * qi[e];
          }
          for (int64_t e = 0; e < c.dv; ++e) r.dv[kv_row * c.dv + e] += s[j] * doi[e];
        }
      }
    }
  return r;
}

// max |x - ref| / max |ref| over finite reference entries; nan in x counts as infinite error.
double norm_error(const std::vector<float>& x, const std::vector<double>& ref) {
  double err = 0, scale = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    if (std::isnan(x[i])) return kInfD;
    if (std::isinf(ref[i])) {
      if (double(x[i]) != ref[i]) return kInfD;
      continue;
    }
    err = std::max(err, std::fabs(double(x[i]) - ref[i]));
    scale = std::max(scale, std::fabs(ref[i]));
  }
  return scale > 0 ? err / scale : err;
}

// Entries whose reference is exactly 0 because nothing is visible must be exactly 0 as well.
bool exact_zeros(const std::vector<float>& x, const std::vector<bool>& row_empty, int64_t row_len) {
  for (size_t i = 0; i < x.size(); ++i)
    if (row_empty[i / row_len] && x[i] != 0.f) return false;
  return true;
}

struct Outputs {
  Tensor out, dq, dk, dv;
  std::vector<float> lse;
};

Outputs run_kernels(const Case& c, float scale, Tensor& q, Tensor& k, Tensor& v, Tensor& dout,
                    int threads) {
  // Outputs start as nan so that any element the kernels fail to write shows up.
  const float nan = std::numeric_limits<float>::quiet_NaN();
  Outputs o{Tensor(c.dt, q.val.size() / c.d * c.dv), Tensor(c.dt, q.val.size()),
            Tensor(c.dt, k.val.size()), Tensor(c.dt, v.val.size()),
            std::vector<float>(c.b * c.hq * c.sq, nan)};
  for (Tensor* t : {&o.out, &o.dq, &o.dk, &o.dv}) {
    std::fill(t->val.begin(), t->val.end(), nan);
    std::fill(t->half.begin(), t->half.end(), uint16_t(0x7fff));  // nan in fp16 and bf16
  }
  fa3::BwdParams p;
  p.batch = c.b, p.seqlen_q = c.sq, p.seqlen_k = c.sk, p.heads_q = c.hq, p.heads_kv = c.hkv;
  p.head_dim = c.d, p.head_dim_v = c.dv, p.softmax_scale = scale, p.softcap = c.softcap;
  p.diag_lo = c.lo, p.diag_hi = c.hi, p.dtype = c.dt;
  p.q = q.data(), p.k = k.data(), p.v = v.data(), p.out = o.out.data(), p.lse = o.lse.data();
  fa3::run_fwd_cpu(p, threads);
  p.dout = dout.data(), p.lse_in = o.lse.data(), p.out_in = o.out.data();
  p.dq = o.dq.data(), p.dk = o.dk.data(), p.dv = o.dv.data();
  fa3::run_bwd_cpu(p, threads);
  for (Tensor* t : {&o.out, &o.dq, &o.dk, &o.dv}) t->decode();
  return o;
}

void run_case(const Case& c, std::mt19937_64& rng) {
  const float scale = c.scale > 0 ? c.scale : float(1 / std::sqrt(double(c.d)));
  Tensor q = random_tensor(c.dt, c.b * c.sq * c.hq * c.d, rng);
  Tensor k = random_tensor(c.dt, c.b * c.sk * c.hkv * c.d, rng);
  Tensor v = random_tensor(c.dt, c.b * c.sk * c.hkv * c.dv, rng);
  Tensor dout = random_tensor(c.dt, c.b * c.sq * c.hq * c.dv, rng);
  const Outputs o = run_kernels(c, scale, q, k, v, dout, c.threads);
  const Grads r = reference(c, scale, q, k, v, dout);

  // Expected error: float32 accumulation for fp32; for fp16 / bf16 the rounding of the outputs
  // (half an ulp, 2^-11 and 2^-8 relative) plus the rounded out that enters D_i in backward.
  const double u = c.dt == DType::kFloat32 ? 0 : c.dt == DType::kFloat16 ? 0x1p-11 : 0x1p-8;
  const double tol_out = c.dt == DType::kFloat32 ? 1e-5 : 1.5 * u;
  const double tol_grad = c.dt == DType::kFloat32 ? 1e-5 : 2 * u;
  const double e_out = norm_error(o.out.val, r.out), e_lse = norm_error(o.lse, r.lse);
  const double e_dq = norm_error(o.dq.val, r.dq), e_dk = norm_error(o.dk.val, r.dk);
  const double e_dv = norm_error(o.dv.val, r.dv);

  // Rows that see no key (and keys that no query sees) must give exact zeros.
  std::vector<bool> q_empty(c.b * c.sq * c.hq), k_empty(c.b * c.sk * c.hkv, true);
  int64_t n_empty = 0;
  for (int64_t b = 0; b < c.b; ++b)
    for (int64_t h = 0; h < c.hq; ++h)
      for (int64_t i = 0; i < c.sq; ++i) {
        const bool empty = r.lse[(b * c.hq + h) * c.sq + i] == -kInfD;
        q_empty[(b * c.sq + i) * c.hq + h] = empty;
        n_empty += empty;
        for (int64_t j = std::max<int64_t>(0, i + std::max(c.lo, -c.sq - c.sk));
             j < c.sk && j - i <= c.hi; ++j)
          k_empty[(b * c.sk + j) * c.hkv + h / (c.hq / c.hkv)] = false;
      }
  const bool zeros_ok = exact_zeros(o.out.val, q_empty, c.dv) &&
                        exact_zeros(o.dq.val, q_empty, c.d) &&
                        exact_zeros(o.dk.val, k_empty, c.d) &&
                        exact_zeros(o.dv.val, k_empty, c.dv);

  // Same bits with other thread counts (work items never depend on the thread).
  bool same = true;
  for (int t : {1, 3}) {
    if (t == c.threads) continue;
    const Outputs o2 = run_kernels(c, scale, q, k, v, dout, t);
    same = same && o2.out.same_bits(o.out) && o2.dq.same_bits(o.dq) && o2.dk.same_bits(o.dk) &&
           o2.dv.same_bits(o.dv) && o2.lse == o.lse;
  }

  const bool ok = e_out <= tol_out && e_lse <= 1e-5 && e_dq <= tol_grad && e_dk <= tol_grad &&
                  e_dv <= tol_grad && zeros_ok && same;
  const char* dts[] = {"f32", "f16", "bf16"};
  std::printf("%-4s %-22s %-4s B%lld Sq%-4lld Sk%-4lld H%lld/%lld D%lld/%lld empty=%-3lld  "
              "out %.1e lse %.1e dq %.1e dk %.1e dv %.1e%s%s\n",
              ok ? "ok" : "FAIL", c.name.c_str(), dts[int(c.dt)], (long long)c.b,
              (long long)c.sq, (long long)c.sk, (long long)c.hq, (long long)c.hkv,
              (long long)c.d, (long long)c.dv, (long long)n_empty, e_out, e_lse, e_dq, e_dk,
              e_dv, zeros_ok ? "" : "  NONZERO-EMPTY", same ? "" : "  NONDETERMINISTIC");
  check(ok, c.name);
}

std::vector<Case> cases() {
  std::vector<Case> cs;
  const std::pair<int64_t, int64_t> lengths[] = {{1, 1},      {7, 7},    {113, 203},
                                                 {1000, 1000}, {64, 129}, {129, 64}};
  for (auto [sq, sk] : lengths) {
    const int64_t b = sq >= 1000 ? 1 : 2;
    cs.push_back({"full MHA", b, sq, sk, 2, 2, 64, 64});
    Case causal{"causal GQA", b, sq, sk, 4, 2, 64, 64};
    causal.hi = sk - sq;
    cs.push_back(causal);
    if (sq < 1000) {
      Case win{"window MQA", b, sq, sk, 4, 1, 64, 64};
      win.lo = sk - sq - 17, win.hi = sk - sq + 5;
      cs.push_back(win);
      Case cap{"softcap30 causal", b, sq, sk, 2, 2, 64, 64};
      cap.hi = sk - sq, cap.softcap = 30.f, cap.scale = 1.f;
      cs.push_back(cap);
    }
  }
  const std::pair<int64_t, int64_t> dims[] = {{64, 64}, {96, 96}, {128, 128}, {192, 128}, {256, 256}};
  const std::pair<int64_t, int64_t> heads[] = {{4, 4}, {4, 2}, {4, 1}};
  for (auto [d, dv] : dims)
    for (auto [hq, hkv] : heads) {
      Case c{"head dims", 1, 113, 203, hq, hkv, d, dv};
      c.hi = 203 - 113 + 3;
      c.threads = 0;  // hardware_concurrency
      cs.push_back(c);
    }
  Case odd{"odd head dims", 2, 77, 90, 3, 1, 33, 17};
  odd.lo = -40, odd.hi = 2, odd.threads = 3;
  cs.push_back(odd);
  Case capwin{"softcap30 window", 1, 129, 64, 4, 2, 128, 128};
  capwin.lo = 64 - 129 - 17, capwin.hi = 64 - 129 + 5, capwin.softcap = 30.f, capwin.scale = 0.5f;
  cs.push_back(capwin);
  // Bands that leave rows without any key, at the start and at the end of the sequence.
  Case early{"empty early rows", 2, 64, 16, 4, 2, 64, 64};
  early.hi = -20;
  cs.push_back(early);
  Case late{"empty late rows", 1, 64, 16, 2, 1, 128, 128};
  late.lo = -30;
  cs.push_back(late);
  Case none{"nothing visible", 1, 20, 30, 2, 2, 64, 64};
  none.lo = none.hi = 1000;
  cs.push_back(none);
  // Empty sequences: every output row is an empty row (or there are no rows at all).
  cs.push_back({"no keys", 2, 5, 0, 2, 1, 64, 64});
  cs.push_back({"no queries", 2, 0, 9, 2, 1, 64, 64});
  Case huge{"int64 extreme band", 1, 50, 70, 2, 2, 64, 64};
  huge.lo = std::numeric_limits<int64_t>::min(), huge.hi = std::numeric_limits<int64_t>::max();
  cs.push_back(huge);

  // Half precision: same masks, errors bounded by the rounding of the outputs.
  for (DType dt : {DType::kFloat16, DType::kBFloat16}) {
    Case c1{"causal GQA", 2, 113, 203, 4, 2, 128, 128, -kU, 203 - 113};
    c1.dt = dt;
    Case c2{"softcap30 window", 1, 129, 64, 4, 1, 64, 64, 64 - 129 - 17, 64 - 129 + 5, 1.f, 30.f};
    c2.dt = dt;
    Case c3{"head dims", 1, 64, 129, 2, 2, 192, 128};
    c3.dt = dt;
    Case c4{"empty early rows", 1, 64, 16, 2, 2, 256, 256, -kU, -20};
    c4.dt = dt;
    Case c5{"full MHA", 1, 1000, 1000, 1, 1, 64, 64};
    c5.dt = dt;
    cs.insert(cs.end(), {c1, c2, c3, c4, c5});
  }
  return cs;
}

// ---- timing ---------------------------------------------------------------------------------

void bench(int64_t b, int64_t s, int64_t h, int64_t d, DType dt, bool causal, bool backward) {
  std::mt19937_64 rng(7);
  const size_t n = b * s * h * d;
  Tensor q = random_tensor(dt, n, rng), k = random_tensor(dt, n, rng);
  Tensor v = random_tensor(dt, n, rng), dout = random_tensor(dt, n, rng);
  Tensor out(dt, n), dq(dt, n), dk(dt, n), dv(dt, n);
  std::vector<float> lse(b * h * s);
  fa3::BwdParams p;
  p.batch = b, p.seqlen_q = p.seqlen_k = s, p.heads_q = p.heads_kv = h;
  p.head_dim = p.head_dim_v = d, p.softmax_scale = float(1 / std::sqrt(double(d)));
  p.diag_hi = causal ? 0 : kU, p.dtype = dt;
  p.q = q.data(), p.k = k.data(), p.v = v.data(), p.out = out.data(), p.lse = lse.data();
  p.dout = dout.data(), p.lse_in = lse.data(), p.out_in = out.data();
  p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data();
  // Best of two runs: wall seconds and process CPU seconds (all threads), the latter because
  // this machine may be shared and then wall time understates what the kernels would do alone.
  auto time = [](auto&& f) {
    std::pair<double, double> best{1e30, 1e30};
    for (int rep = 0; rep < 2; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      const std::clock_t c0 = std::clock();
      f();
      const double cpu = double(std::clock() - c0) / CLOCKS_PER_SEC;
      const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (wall < best.first) best = {wall, cpu};
    }
    return best;
  };
  const auto tf = time([&] { fa3::run_fwd_cpu(p, 0); });
  const double flops = 4.0 * b * h * s * s * d * (causal ? 0.5 : 1.0);
  std::printf("B=%lld S=%lld H=%lld D=%lld %s %-6s fwd %.3f s wall, %.3f s cpu (%.1f GFLOP/s)",
              (long long)b, (long long)s, (long long)h, (long long)d,
              dt == DType::kFloat32 ? "f32 " : "bf16", causal ? "causal" : "full", tf.first,
              tf.second, flops / tf.first * 1e-9);
  if (backward) {
    const auto tb = time([&] { fa3::run_bwd_cpu(p, 0); });
    std::printf(" | bwd %.3f s wall, %.3f s cpu", tb.first, tb.second);
  }
  std::printf("\n");
}

}  // namespace

// A nan in the input must reach the outputs it feeds (not be dropped like a masked score),
// while rows that never see it stay finite.
void test_nan_propagation() {
  Case c{"nan input", 1, 70, 70, 1, 1, 64, 64};
  c.hi = 0;  // causal: key 69 is seen by query row 69 only
  std::mt19937_64 rng(5);
  Tensor q = random_tensor(c.dt, c.sq * c.d, rng), k = random_tensor(c.dt, c.sk * c.d, rng);
  Tensor v = random_tensor(c.dt, c.sk * c.dv, rng), dout = random_tensor(c.dt, c.sq * c.dv, rng);
  k.val[69 * c.d + 3] = std::numeric_limits<float>::quiet_NaN();
  const Outputs o = run_kernels(c, 0.125f, q, k, v, dout, 2);
  bool ok = std::isnan(o.out.val[69 * c.dv]) && std::isnan(o.lse[69]);
  for (int64_t i = 0; i < 69 * c.dv; ++i) ok = ok && std::isfinite(o.out.val[i]);
  std::printf("nan propagation: %s\n", ok ? "ok" : "FAIL");
  check(ok, c.name);
}

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--bench") == 0) {
    std::printf("hardware threads: %u\n", std::thread::hardware_concurrency());
    bench(4, 1024, 8, 64, DType::kFloat32, false, false);
    bench(2, 2048, 8, 128, DType::kBFloat16, false, true);
    bench(2, 2048, 8, 128, DType::kBFloat16, true, true);
    return 0;
  }
  const auto t0 = std::chrono::steady_clock::now();
  test_conversions();
  test_nan_propagation();
  std::mt19937_64 rng(1234);
  for (const Case& c : cases()) run_case(c, rng);
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("SUMMARY: %d of %d checks passed (%.1f s)\n", g_checks - g_failures, g_checks, secs);
  return g_failures == 0 ? 0 : 1;
}

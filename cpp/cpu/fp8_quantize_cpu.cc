// fa3_jax CPU backend: FP8 quantization (cpp/flash.h, "FP8 quantization").
//
// One work item per descale: a block of rows of one head (block_rows > 0) or every row of one
// GQA group (block_rows == 0). Each item runs two passes over its rows: the first transforms them
// and takes the amax, the second transforms them again and writes e4m3 with the item's descale,
// so no item needs more than one row of scratch. The float32 operations and their order are
// those of fp8.hadamard_transform and fp8.quantize_blocks / quantize_per_head (flash.h), so the
// results are bitwise those of the XLA path.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../flash.h"
#include "dtype_convert.h"
#include "parallel_items.h"

namespace fa3 {
namespace {

inline float load(float x) { return x; }
inline float load_f16(uint16_t x) { return fp16_to_float(x); }
inline float load_bf16(uint16_t x) { return bf16_to_float(x); }

// The rows of one descale: heads [h0, h1) of batch row b, sequence rows [s0, s1).
struct Item {
  int64_t b, h0, h1, s0, s1;
  float* descale;
};

template <class T, float (*kLoad)(T)>
class Quantizer {
 public:
  explicit Quantizer(const Fp8QuantizeParams& p)
      : p_(p), d_(p.head_dim), scale_(fp8_hadamard_scale(p.head_dim)) {}

  void run(const Item& it, std::vector<float>& y) const {
    uint32_t amax = 0;  // the bits of max |y|: nonnegative floats (nan above inf) order as ints
    for_rows(it, y, [&](int64_t) {
      for (int64_t i = 0; i < d_; ++i) amax = std::max(amax, float_bits(y[i]) & 0x7fffffffu);
    });
    const float descale = fp8_descale(bits_float(amax));
    *it.descale = descale;
    const float inv = 1.f / descale;
    for_rows(it, y, [&](int64_t offset) {
      uint8_t* dst = p_.x8 + offset;
      for (int64_t i = 0; i < d_; ++i) {
        float q = y[i] * inv;
        q = q > kFp8Max ? kFp8Max : (q < -kFp8Max ? -kFp8Max : q);  // nan stays nan
        dst[i] = float_to_e4m3(q);
      }
    });
  }

 private:
  // Calls body(element offset of the row) with y holding the transformed row, for every row.
  template <class Body>
  void for_rows(const Item& it, std::vector<float>& y, const Body& body) const {
    const T* x = static_cast<const T*>(p_.x);
    for (int64_t s = it.s0; s < it.s1; ++s)
      for (int64_t h = it.h0; h < it.h1; ++h) {
        const int64_t offset = ((it.b * p_.seqlen + s) * p_.heads + h) * d_;
        transform(x + offset, p_.signs ? p_.signs + it.b * d_ : nullptr, y.data());
        body(offset);
      }
  }

  void transform(const T* src, const float* signs, float* y) const {
    for (int64_t i = 0; i < d_; ++i) y[i] = kLoad(src[i]);
    if (!signs) return;
    for (int64_t i = 0; i < d_; ++i) y[i] = signs[i] < 0.f ? -y[i] : y[i];
    for (int64_t h = 1; h < d_; h *= 2)
      for (int64_t start = 0; start < d_; start += 2 * h)
        for (int64_t i = start; i < start + h; ++i) {
          const float a = y[i], b = y[i + h];
          y[i] = a + b;
          y[i + h] = a - b;
        }
    for (int64_t i = 0; i < d_; ++i) y[i] *= scale_;
  }

  const Fp8QuantizeParams& p_;
  const int64_t d_;
  const float scale_;
};

template <class T, float (*kLoad)(T)>
void quantize(const Fp8QuantizeParams& p, int num_threads) {
  const Quantizer<T, kLoad> quantizer(p);
  const int64_t group = p.heads / p.heads_kv;
  const int64_t blocks = p.block_rows ? (p.seqlen + p.block_rows - 1) / p.block_rows : 1;
  const int64_t per_batch = p.block_rows ? p.heads * blocks : p.heads_kv;
  auto item = [&](int64_t i) {
    const int64_t b = i / per_batch, r = i % per_batch;
    if (!p.block_rows)  // descale [batch, heads_kv]: a group's heads, every row
      return Item{b, r * group, (r + 1) * group, 0, p.seqlen, p.descale + i};
    const int64_t h = r / blocks, n = r % blocks;  // descale [batch, heads, blocks]
    return Item{b, h, h + 1, n * p.block_rows, std::min(p.seqlen, (n + 1) * p.block_rows),
                p.descale + i};
  };
  parallel_items(p.batch * per_batch, num_threads,
                 [&] { return std::vector<float>(size_t(p.head_dim)); },
                 [&](int64_t i, std::vector<float>& y) { quantizer.run(item(i), y); });
}

}  // namespace

void run_fp8_quantize_cpu(const Fp8QuantizeParams& p, int num_threads) {
  switch (p.dtype) {
    case DType::kFloat32: return quantize<float, load>(p, num_threads);
    case DType::kFloat16: return quantize<uint16_t, load_f16>(p, num_threads);
    case DType::kBFloat16: return quantize<uint16_t, load_bf16>(p, num_threads);
    case DType::kFloat8E4M3: return;  // the FFI layer takes float32/16-bit inputs only
  }
}

}  // namespace fa3

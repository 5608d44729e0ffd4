// fa3_jax CPU backend: float <-> IEEE binary16 / bfloat16 / float8_e4m3fn conversions.
//
// Round-to-nearest-even, exact for subnormals, inf and nan (nan stays a quiet nan of the same
// sign). Every function is branch-free integer/float arithmetic, so loops over arrays of them
// auto-vectorize without -march flags, and none relies on subnormal float arithmetic, so the
// results do not change when the caller runs with flush-to-zero / denormals-are-zero set.
#pragma once

#include <cstdint>
#include <cstring>

namespace fa3 {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// c ? a : b through a mask. A plain ?: next to float arithmetic would be compiled as a branch
// (the arithmetic may trap, so GCC does not speculate it), which stops vectorization.
inline uint32_t select_bits(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - uint32_t(c);
  return (a & m) | (b & ~m);
}

inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t shifted = uint32_t(h & 0x7fffu) << 13;  // exponent and mantissa in float position
  // Normal numbers only need the exponent rebiased from 15 to 127.
  const uint32_t normal = shifted + (112u << 23);
  // Subnormals (m * 2^-24): 2^-14 * (1 + m/1024) - 2^-14 is exact and stays a normal float.
  const float sub = bits_float(shifted | (113u << 23)) - bits_float(113u << 23);
  const uint32_t inf_nan = shifted | 0x7f800000u;  // keeps the nan payload
  uint32_t mag = select_bits(shifted >= (0x7c00u << 13), inf_nan, normal);
  mag = select_bits(shifted < (0x0400u << 13), float_bits(sub), mag);
  return bits_float(sign | mag);
}

inline uint16_t float_to_fp16(float f) {
  const uint32_t x = float_bits(f) & 0x7fffffffu;
  const uint32_t sign = (float_bits(f) >> 16) & 0x8000u;
  // Below 2^-14 the result is subnormal: adding 0.5 puts the value where one float ulp is
  // 2^-24, one half subnormal step, so the float adder does the round-to-nearest-even for us.
  const uint32_t sub = float_bits(bits_float(x) + 0.5f) - 0x3f000000u;
  // Normal: rebias the exponent (-112 << 23 mod 2^32), add just under half an ulp plus the kept
  // lowest bit (ties to even); a mantissa carry correctly bumps the exponent.
  const uint32_t normal = (x + 0xc8000fffu + ((x >> 13) & 1u)) >> 13;
  const uint32_t nan = 0x7e00u | ((x >> 13) & 0x3ffu);
  uint32_t h = select_bits(x < 0x38800000u, sub, normal);
  h = select_bits(x >= 0x477ff000u, 0x7c00u, h);  // 65520 and up round to inf (the tie goes to even)
  h = select_bits(x > 0x7f800000u, nan, h);
  return uint16_t(sign | h);
}

// float8_e4m3fn: bias 7, no infinities, 0x7f / 0xff are nan, subnormals m * 2^-9.
inline float e4m3_to_float(uint8_t x) {
  const uint32_t sign = uint32_t(x & 0x80u) << 24;
  const uint32_t em = x & 0x7fu;  // exponent and mantissa
  // Normal: the mantissa moves to float position and the exponent is rebiased from 7 to 127.
  const uint32_t normal = (em << 20) + (120u << 23);
  const float sub = float(em) * (1.f / 512.f);  // exact; em < 8 when this is selected
  uint32_t mag = select_bits(em < 8u, float_bits(sub), normal);
  mag = select_bits(em == 0x7fu, 0x7fc00000u, mag);
  return bits_float(sign | mag);
}

// float -> float8_e4m3fn, round to nearest even, saturating: magnitudes from 448 up (inf
// included) give 448, the largest finite e4m3fn value (as CUDA's cvt.rn.satfinite); nan gives
// 0x7f with f's sign.
inline uint8_t float_to_e4m3(float f) {
  const uint32_t x = float_bits(f) & 0x7fffffffu;
  const uint32_t sign = (float_bits(f) >> 24) & 0x80u;
  // Below 2^-6 the result is subnormal (m * 2^-9): at 2^14 one float ulp is 2^-9, so adding
  // 2^14 makes the float adder round to the nearest step, ties to even (m = 8 is 2^-6, whose
  // encoding 0x08 is the right one).
  const uint32_t sub = float_bits(bits_float(x) + 16384.f) - float_bits(16384.f);
  // Normal: keep 3 mantissa bits with ties to even (a carry bumps the exponent), then rebias the
  // exponent from 127 to 7.
  const uint32_t normal = ((x + 0x7ffffu + ((x >> 20) & 1u)) >> 20) - (120u << 3);
  uint32_t r = select_bits(x < 0x3c800000u, sub, normal);  // 2^-6
  r = select_bits(x >= 0x43e00000u, 0x7eu, r);             // 448
  r = select_bits(x > 0x7f800000u, 0x7fu, r);
  return uint8_t(sign | r);
}

inline float bf16_to_float(uint16_t b) { return bits_float(uint32_t(b) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t x = float_bits(f);
  // Ties to even; overflow past the largest bf16 carries into the exponent and yields inf.
  const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  const uint32_t nan = (x >> 16) | 0x0040u;  // a nan whose payload sits in the low bits must not round to inf
  return uint16_t(select_bits((x & 0x7fffffffu) > 0x7f800000u, nan, rounded));
}

}  // namespace fa3

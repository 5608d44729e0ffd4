// Which head dims this build compiles Hopper kernels for (forward and backward alike).
//   -DFA3_JAX_ONLY_HDIM=128                       one head dim (fast dev builds of one .cu file)
//   -DFA3_JAX_SELECTED_HDIMS -DFA3_JAX_HDIM_64=1  a list (what CMake's FA3_JAX_HEAD_DIMS passes)
//   neither                                       all of 64, 96, 128, 192 (with dv 192 and 128), 256
// Use as `#if FA3_JAX_BUILD_HDIM(128)`; an undefined FA3_JAX_HDIM_<N> reads as 0 in #if.
#pragma once

#if defined(FA3_JAX_ONLY_HDIM)
#define FA3_JAX_BUILD_HDIM(N) (FA3_JAX_ONLY_HDIM == (N))
#elif defined(FA3_JAX_SELECTED_HDIMS)
// Unlisted head dims read as 0 in C++ expressions too (not only in #if), e.g. in the supports
// queries; CMake defines only the listed ones.
#ifndef FA3_JAX_HDIM_64
#define FA3_JAX_HDIM_64 0
#endif
#ifndef FA3_JAX_HDIM_96
#define FA3_JAX_HDIM_96 0
#endif
#ifndef FA3_JAX_HDIM_128
#define FA3_JAX_HDIM_128 0
#endif
#ifndef FA3_JAX_HDIM_192
#define FA3_JAX_HDIM_192 0
#endif
#ifndef FA3_JAX_HDIM_256
#define FA3_JAX_HDIM_256 0
#endif
#define FA3_JAX_BUILD_HDIM(N) FA3_JAX_HDIM_##N
#else
#define FA3_JAX_BUILD_HDIM(N) 1
#endif

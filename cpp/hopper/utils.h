// fa3_jax Hopper: small device helpers shared by the kernels (WGMMA issue, accumulator layout
// views, quad reductions, fast math).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/float8.h>
#include <cutlass/numeric_conversion.h>

#include "../flash.h"

namespace fa3::sm90 {

using namespace cute;

// The CUTLASS element type of a flash.h dtype (the launchers' dispatch on FwdParams / BwdParams).
template <DType kDType> struct ElementOf;
template <> struct ElementOf<DType::kFloat16> { using type = cutlass::half_t; };
template <> struct ElementOf<DType::kBFloat16> { using type = cutlass::bfloat16_t; };
template <> struct ElementOf<DType::kFloat8E4M3> { using type = cutlass::float_e4m3_t; };

// Issues one warpgroup GEMM tCrC (+)= tCrA * tCrB over all k blocks, then waits until at most
// kWait WGMMA batches of this warpgroup are still in flight (kWait < 0: do not wait, the caller
// waits later so that softmax work overlaps the tensor cores).
template <bool kZeroInit, int kWait, class TiledMma, class TA, class TB, class TC>
CUTLASS_DEVICE void wgmma_gemm(TiledMma& tiled_mma, TA const& tCrA, TB const& tCrB, TC& tCrC) {
  // A in registers (RS) when its iterator is not a shared-memory descriptor.
  constexpr bool kIsRS =
      !cute::is_base_of<GMMA::DescriptorIterator, typename TA::engine_type::iterator>::value;
  if constexpr (kIsRS) warpgroup_fence_operand(const_cast<TA&>(tCrA));
  warpgroup_fence_operand(tCrC);
  warpgroup_arrive();
  if constexpr (kZeroInit) tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTLASS_PRAGMA_UNROLL
  for (int k = 0; k < size<2>(tCrA); ++k) {
    cute::gemm(tiled_mma, tCrA(_, _, k), tCrB(_, _, k), tCrC);
    tiled_mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  if constexpr (kWait >= 0) warpgroup_wait<kWait>();
  warpgroup_fence_operand(tCrC);
  if constexpr (kIsRS) warpgroup_fence_operand(const_cast<TA&>(tCrA));
}

// SM90 accumulator layout ((2, 2, V), MMA_M, MMA_N) viewed as (rows, cols):
// ((2 row halves, MMA_M), (2 adjacent cols, V col groups, MMA_N)).
template <class Layout>
CUTLASS_DEVICE auto acc_rowcol(Layout const& l) {
  static_assert(decltype(rank(l))::value == 3 && decltype(rank<0>(l))::value == 3);
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)),
                     make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// Where a consumer thread's accumulator elements sit in the tile. For the SM90 64xN
// accumulator, thread t of warpgroup wg holds rows wg*64 + (t%128)/32*16 + (t%32)/4 (+8 for the
// second row of acc_rowcol) and columns (t%4)*2 + (ni%2) + 8*(ni/2). Computed from the thread
// index instead of an identity tensor so that no per-element coordinates stay live in registers.
struct AccCoord {
  int row0;  // tile row of acc_rowcol row 0; row mi is row0 + 8 * mi
  int col0;  // tile column of acc_rowcol column 0; column ni is col0 + (ni % 2) + 8 * (ni / 2)
  CUTLASS_DEVICE explicit AccCoord(int mma_tidx)
      : row0((mma_tidx / 32) * 16 + (mma_tidx % 32) / 4), col0((mma_tidx % 4) * 2) {}
  static constexpr CUTLASS_DEVICE int row_offset(int mi) { return 8 * mi; }
  static constexpr CUTLASS_DEVICE int col_offset(int ni) { return (ni % 2) + 8 * (ni / 2); }
};

// The same registers seen as the A operand of a 16-bit RS WGMMA: ((2, 2, 2), MMA_M, MMA_K),
// each k block of 16 columns being two consecutive 8-column groups of the accumulator.
template <class Layout>
CUTLASS_DEVICE auto acc_as_a_operand(Layout const& l) {
  static_assert(decltype(size<0, 2>(l))::value % 2 == 0);
  auto v = logical_divide(get<0, 2>(l), Tile<_2>{});  // ((2, V / 2))
  return make_layout(make_layout(get<0, 0>(l), get<0, 1>(l), get<0, 0>(v)), get<1>(l),
                     coalesce(make_layout(get<0, 1>(v), get<2>(l))));
}

// dst[i] = To(src[i]) over register fragments with the same number of elements.
template <class TSrc, class TDst>
CUTLASS_DEVICE void convert_fragment(TSrc const& src, TDst& dst) {
  using From = typename TSrc::value_type;
  using To = typename TDst::value_type;
  constexpr int N = decltype(size(src))::value;
  static_assert(N == decltype(size(dst))::value);
  cutlass::NumericArrayConverter<To, From, N> op;
  *reinterpret_cast<cutlass::Array<To, N>*>(dst.data()) =
      op(*reinterpret_cast<cutlass::Array<From, N> const*>(src.data()));
}

// FP8 P operand: fills the e4m3 A fragment of the P @ V WGMMA, ((4, 2, 2), 1, k blocks) compact,
// from the float scores acc_s (one 64 x kBlockN accumulator) without moving data between lanes.
// The e4m3 A operand gives lane (row r, quad index q) of each 32-key block the keys 4q..4q+3
// and 16+4q..16+4q+3 (4 bytes per register: rows r and r + 8, each for both halves), while the
// accumulator holds keys 2q, 2q+1 of every group of 8. The P @ V sum runs over keys in any
// order, so the operand's slot 4q+i of each aligned 16 is given key 2q + i%2 + 8*(i/2) (the
// lane's own) and V's keys are stored in that order too (vt, fp8_vt_sm90.h): then each
// register is 4 of the lane's own scores, converted with cvt e4m3x2.
template <class TensorS, class TensorP>
CUTLASS_DEVICE void convert_p_to_e4m3(TensorS const& acc_s, TensorP& frag_p) {
  Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));  // (2 rows, cols)
  constexpr int kKBlocks = decltype(size<2>(frag_p))::value;
  static_assert(decltype(size<0>(s))::value == 2 && decltype(size<1>(s))::value == 8 * kKBlocks,
                "per 32 keys a lane holds 8 scores of each of its 2 rows");
  static_assert(decltype(size(frag_p))::value == 16 * kKBlocks);
  using E4M3x4 = cutlass::Array<cutlass::float_e4m3_t, 4>;
  cutlass::NumericArrayConverter<cutlass::float_e4m3_t, float, 4> to_e4m3;
  E4M3x4* words = reinterpret_cast<E4M3x4*>(frag_p.data());
  CUTLASS_PRAGMA_UNROLL
  for (int kb = 0; kb < kKBlocks; ++kb) {
    CUTLASS_PRAGMA_UNROLL
    for (int half = 0; half < 2; ++half) {
      CUTLASS_PRAGMA_UNROLL
      for (int row = 0; row < 2; ++row) {
        // Column groups 4kb + 2half and the next: acc_rowcol column 2g + (0, 1) of group g.
        int const c = 2 * (4 * kb + 2 * half);
        cutlass::Array<float, 4> const f = {s(row, c), s(row, c + 1), s(row, c + 2),
                                            s(row, c + 3)};
        words[4 * kb + 2 * half + row] = to_e4m3(f);
      }
    }
  }
}

// The 4 lanes of a quad hold the columns of the same accumulator rows.
CUTLASS_DEVICE float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
}
CUTLASS_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 2);
  return x + __shfl_xor_sync(0xffffffff, x, 1);
}

CUTLASS_DEVICE float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
CUTLASS_DEVICE float fast_tanh(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace fa3::sm90

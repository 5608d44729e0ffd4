// fa3_jax Hopper: every forward tile-size choice, with its reason, in one constexpr function.
//
// Constraints shared by all choices: two consumer warpgroups (block_m = 128, 64 query rows
// each), shared memory Q + stages * (K + V) <= 227 KB,
// block_n a multiple of 16 (it is the K dimension of the P @ V WGMMA).
#pragma once

namespace fa3::sm90 {

struct FwdTileSize {
  int block_m;  // query rows per tile (64 per consumer warpgroup)
  int block_n;  // keys per mainloop step
  int stages;   // depth of the K and V shared-memory rings
  // setmaxnreg split of the 384 threads' 64512 registers (168 each at launch):
  // 128 * producer + 256 * consumer must equal 64512, i.e. (24, 240), (40, 232) or (56, 224).
  // 232 consumer registers suffice up to head dim 192 and leave the TMA / scheduler threads 40
  // (at 24 they spill); head dim 256 needs all 240 for its 128-register O accumulator.
  int producer_regs = 40;
  int consumer_regs = 232;
};

constexpr FwdTileSize fwd_tile_size(int head_dim, int head_dim_v) {
  // hdim 64: operands are small, so the S accumulator (64 x 128 per warpgroup) dominates the
  // registers; 3 stages (Q 16 KB + 3 * 32 KB) hide load latency of the short K/V tiles.
  if (head_dim <= 64) return {128, 128, 3};
  // hdim 96: same shape as 64; 2 stages of 24 KB K/V tiles leave room to spare.
  if (head_dim <= 96) return {128, 128, 2};
  // hdim 128: 128 x 128 (FA3's causal choice): S and O accumulators take 64 + 64 registers,
  // smem = Q 32 KB + 2 * (32 + 32) KB = 160 KB. Measured on H200 (bf16, 2026-11-21): 128 x 176
  // (FA3's non-causal choice) gains ~3% at 8k-16k tokens but loses 7-15% at 512, and the
  // (24, 240) register split is no faster than (40, 232), which has no producer spills.
  if (head_dim <= 128) return {128, 128, 2};
  // hdim 192: O accumulator is 96 registers (dv 192); block_n 112 keeps S at 56 and smem at
  // Q 48 KB + 2 * (42 + 42) KB = 216 KB. With dv 128 the V tile shrinks, so block_n 128 fits
  // (48 + 2 * (48 + 32) = 208 KB).
  if (head_dim <= 192) return {128, head_dim_v <= 128 ? 128 : 112, 2};
  // hdim 256: O accumulator is 128 registers per thread; block_n 80 (FA3's choice) fits the
  // register budget and smem = Q 64 KB + 2 * (40 + 40) KB = 224 KB. Consumers need all 240
  // registers (232 spills), which leaves the producer 24: ptxas reports 60 bytes of spill
  // stores (56 before varlen's per-tile sequence offsets), in the producer thread and in the
  // consumers' setup before the mainloop, off the tensor-core path.
  return {128, 80, 2, 24, 240};
}

}  // namespace fa3::sm90

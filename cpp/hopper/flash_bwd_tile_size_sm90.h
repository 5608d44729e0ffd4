// fa3_jax Hopper backward: every tile-size and head-dim build choice in one place.
#pragma once

#include "head_dims.h"

namespace fa3::sm90_bwd {

// Which head dims this build compiles backward kernels for (see head_dims.h; 192 covers both
// head_dim_v 192 and 128).
#define FA3_BWD_HDIM64 FA3_JAX_BUILD_HDIM(64)
#define FA3_BWD_HDIM96 FA3_JAX_BUILD_HDIM(96)
#define FA3_BWD_HDIM128 FA3_JAX_BUILD_HDIM(128)
#define FA3_BWD_HDIM192 FA3_JAX_BUILD_HDIM(192)
#define FA3_BWD_HDIM256 FA3_JAX_BUILD_HDIM(256)

struct BwdTileSize {
  int block_m;  // query rows per main-loop step (one 64-row WGMMA M tile for the dQ product)
  int block_n;  // key rows owned by one CTA (dK, dV stay in registers for the whole CTA)
};

// Two consumer warpgroups (240 registers each after setmaxnreg) in every configuration. Registers
// bound the tiles: each thread holds its share of dK and dV for the whole CTA, plus S^T and dP^T
// for one step.
//  * hdim 64 without softcap: 128 x 128. Each warpgroup owns 64 keys: S^T/dP^T 64 + 64 regs,
//    dK + dV 32 + 32 (softcap's tanh derivative, 32 more, would spill: 64 x 128 there).
//    128 query rows per step halve the steps (pipeline waits, named barriers, dQ hand-offs) per
//    unit of work compared with 64, where a step's WGMMAs are only 64 x 64 x 64 per warpgroup.
//    The warpgroups split the dQ product along its rows (queries): each computes one 64-row block
//    with the whole head dim. Measured against 64 x 128 (H200, bf16, 16k tokens, hidden 2048,
//    scripts/dev_bwd.sh timing, with the mask pass of flash_bwd_kernel_sm90.h that keeps it from
//    spilling): full 243 301 343 369 383 389 -> 274 357 418 458 466 470 TFLOP/s at 512..16k,
//    causal 153 221 283 329 361 385 -> 163 244 334 405 452 462.
//  * hdim 96/128: 64 x 128. Each warpgroup owns 64 keys: S^T/dP^T 32 + 32 regs, dK + dV
//    2 * hdim/2 regs (128 at hdim 128); 128 keys per CTA halves the passes over Q/dO compared
//    with 64, and lets P^T/dS^T feed dK/dV from registers. 128 query rows would need 64 + 64 more
//    registers than the budget has.
//    No consumer spills at any head dim,
//    with or without softcap (the 24-register producer warpgroup of hdim 64 without softcap
//    spills 8 bytes since the varlen sequence lookup), since lse/dpsum are kept shuffled and dV
//    is issued after dS (hdim 128 had
//    spilled 96 bytes, 200 with softcap; removing that alone measured +7..15% at hdim 128 full,
//    H200, bf16, 16k tokens, 512..16k).
//  * hdim 192/256: 64 x 64. A 128-key block would need 2 * 192 (or 256) dK+dV registers per
//    thread; with 64 keys the warpgroups split dK/dV along the head dim instead (128 regs at 256)
//    and shared memory (Q, dO double-buffered, K, V, P, dS: 208 KB at 256) still fits 227 KB,
//    with 16 KB left for the dQ writer's slots (kDqRounds, kDqInStages in flash_bwd_kernel_sm90.h).
//    Query blocks stay at 64 there (one WGMMA M tile for dQ, split along the head dim).
constexpr BwdTileSize bwd_tile_size_sm90(int head_dim, int head_dim_v, bool softcap) {
  return (head_dim <= 64 && head_dim_v <= 64 && !softcap) ? BwdTileSize{128, 128}
         : (head_dim <= 128 && head_dim_v <= 128) ? BwdTileSize{64, 128}
                                                  : BwdTileSize{64, 64};
}

// Query-row granule of the workspace planes (dq_accum, lse_log2, dpsum): the largest block_m.
// Dense planes pad seqlen_q to it, so their size does not depend on tiles; varlen sequences start
// at multiples of it (varlen_q_block_row), so no query block of one sequence reaches the next's.
inline constexpr int kBwdSeqlenQPad = 128;

}  // namespace fa3::sm90_bwd

// fa3_jax Hopper: every forward tile-size choice, with its reason, in one constexpr function.
//
// Constraints shared by all choices: 64 query rows per consumer warpgroup (block_m = 128: two
// consumer warpgroups; 192: three; 64: one, the split kernel's decode tile), shared memory
// Q + stages * (K + V) <= 227 KB, block_n a multiple of 16 (it is the K dimension of the P @ V
// WGMMA).
#pragma once

#include <cstdint>

namespace fa3::sm90 {

struct FwdTileSize {
  int block_m;  // query rows per tile (64 per consumer warpgroup)
  int block_n;  // keys per mainloop step
  int stages;   // depth of the K and V shared-memory rings
  // setmaxnreg split of the 65536 registers over the CTA's threads (one producer warpgroup plus
  // block_m / 64 consumer warpgroups), which get 65536 / threads rounded down to 8 at launch:
  // 128 * producer + 2 * block_m * consumer must equal that total (flash_fwd_traits_sm90.h
  // checks it). Two consumer warpgroups (384 threads, 168 each, 64512 in all): (24, 240),
  // (40, 232) or (56, 224). 232 consumer registers suffice up
  // to head dim 192 and leave the TMA / scheduler threads 40 (at 24 they spill); head dim 256
  // needs all 240 for its 128-register O accumulator. Three (512 threads, 128 each): (32, 160).
  int producer_regs = 40;
  int consumer_regs = 232;
};

// FP8 (e4m3) forward (fp8 = true): the tiles are also the FP8 scale blocks (flash.h, "FP8";
// python/fa3_jax/fp8.py reads them from here; the fused quantization kernel takes blocks of up
// to 128 rows). block_n must be a multiple of 32, the K of one e4m3 WGMMA in the P @ V GEMM (and
// 16-key groups are permuted in V, fp8_vt_sm90.h).
// Measured on H200 (the cpp/hopper/test_fwd_sm90.cu driver, --time-fp8: per-tensor descales, V
// transpose included, 16k tokens, hidden 2048, TFLOP/s at 1k / 4k / 16k, 2026-11-22;
// benchmarks/measured/h200_2026-11-22s6f_fp8speed.txt):
//  - hdim 64 and 128: 128 x 128. At hdim 128 the exponentials (MUFU, 64 per thread and block)
//    take as long as the block's WGMMAs (ncu: XU 47%, tensor 45% of cycles, issue slots 42%),
//    so wider blocks only amortize the per-block overhead and lose at short sequences (run 2,
//    with a since-withdrawn variant of softmax.h's skipped rescale): full 599 / 795 / 823
//    (128), 546 / 781 / 832 (192), 539 / 767 / 826 (224, FA3's FP8 choice); causal 390 / 641 /
//    775, 361 / 655 / 783, 342 / 629 / 787. Moving 1 of every 8 exponentials to the FMA pipe (a
//    degree-3 polynomial) did not pay either: 610 / 798 / 810 at 128, 553 / 785 / 837 at 192,
//    548 / 779 / 827 at 224; nor did 3 stages (run 4: 573 / 770 / 814 against 588 / 767 / 819).
//    Smem (hdim 128): Q 16 KB + 2 * (16 + 16) KB + O 32 KB.
//    Three consumer warpgroups (192 x 128, setmaxnreg 32 / 160; session 14,
//    h200_2026-11-23s14e_fp8_three_warpgroups.txt): a third softmax stream per scheduler, but
//    160 registers spill the P fragment around the loop's P @ V WGMMAs (ptxas 168 bytes): full
//    1k / 2k / 4k / 16k 631 / 737 / 801 / 863 -> 604 / 697 / 738 / 774, causal -6 to -8%.
//    Row sums from the P @ V WGMMA (session 15, h200_2026-11-23s15a_fp8_row_sum_in_pv.txt, 2
//    rounds): 8 rows of e4m3 ones below V^T in the vt ring, P @ V as 64x136x32 WGMMAs whose
//    extra columns accumulate each row's sum, and no FADDs in the softmax step (SASS: 154 ->
//    26). Slower, full 1k / 2k / 4k / 16k 629 / 737 / 805 / 869 -> 621 / 698 / 746 / 791, causal
//    0 to -8%, and less accurate: normalizing by the sum of the e4m3-rounded probabilities drops
//    those below e4m3's smallest subnormal from the denominator too (accuracy table, default
//    1.24e-2 against <= 9.1e-3; windowed rows' LSE off by up to 0.015).
//  - hdim 256: 128 x 128 (FA3's FP8 choice), run 4: full 690 / 1027 / 1104 against 710 / 1014 /
//    1049 with block_n 96, causal 434 / 785 / 985 against 433 / 747 / 927 (96 is ahead only at
//    512 tokens, 500 against 475). S takes 64 registers next to the 128-register O accumulator
//    (P 16); ptxas reports 196 bytes of spill stores (184 at 96), the producer's and the
//    consumers' setup. Smem: Q 32 KB + 2 * (32 + 32) KB + O 64 KB = 224 KB.
// FP8 V transposed inside the attention kernel (flash_fwd_mainloop_sm90.h, transpose_v): the V
// TMA loads row-major V tiles into a staging ring and producer warps 2-3 write the keys-contiguous
// tile the e4m3 P @ V WGMMA reads (LDSM.T, byte permutes, STSM), instead of the fp8_vt_sm90.h
// kernel writing vt through global memory before the attention kernel starts (ncu: 18.3 us for
// the 32 MB of V at hdim 128, 16k tokens, against 211 us of attention kernel at full 1k). Smem
// (hdim 128): + 2 x 16 KB, 144 KB in all. Measured on H200 (test_fwd_sm90 --time-fp8, per-tensor
// descales, 16k tokens, hidden 2048, 9 main / 7 in-kernel runs over 4 device calls, 2026-11-22,
// benchmarks/measured/h200_2026-11-22s10q_fp8_vt_in_kernel.txt), TFLOP/s at 512 / 1k / 2k / 4k /
// 8k / 16k: full 445 / 603 / 728 / 770 / 767 / 770 -> 483 / 619 / 725 / 792 / 820 / 816, causal
// 273 / 418 / 594 / 720 / 770 / 750 -> 292 / 430 / 574 / 702 / 794 / 821 (causal 2k-4k -2.5 to
// -3.4%); ncu full 1k / 4k, whole call 229 / 710 -> 219 / 684 us. Bench beside cuDNN FP8
// (same file): hdim 128 full 0.77-0.86 -> 0.82-0.85, causal 0.85-0.92 -> 0.87-0.95.
// Merged into session-11 main and A/B'd against main's wheel in one call (bench_attention's fp8
// cell, CUPTI sum, 2 runs each, h200_2026-11-22s11q_fp8_vt_merge_ab.txt): 1k-16k full +5.2 /
// +1.0 / +3.6 / +8.2 / +12.9%, causal +12.1 / +2.9 / +1.5 / +5.3 / +13.1%; charging main's sum
// with the whole 18 us transpose as if overlapped (the bound PDL allows): -5.1 to +12.2%, 8k-16k
// still +2.6 to +12.2%. fp8 / cuDNN FP8, hdim 128 rows 1k-16k, geomean 0.813 -> 0.869.
// Not taken: the unit addresses from CuTe tensor indexing (-25 to -30%: ~100 instructions per
// unit on the schedulers the consumer warps share), 3 stages, each tile's first K and V before
// its Q (both within spread). Head dims 64 (not measured) and 256 keep the transpose kernel:
// 256's producer has 24 registers and its shared memory is full (224 KB).
constexpr bool fwd_fp8_transpose_v_in_kernel(int head_dim) { return head_dim == 128; }

constexpr FwdTileSize fwd_tile_size_fp8(int head_dim) {
  if (head_dim <= 64) return {128, 128, 3};
  if (head_dim <= 128) return {128, 128, 2};
  return {128, 128, 2, 24, 240};
}

constexpr FwdTileSize fwd_tile_size(int head_dim, int head_dim_v, bool fp8 = false) {
  if (fp8) return fwd_tile_size_fp8(head_dim);
  // hdim 64: operands are small, so the S accumulator (64 x 128 per warpgroup) dominates the
  // registers; 3 stages (Q 16 KB + 3 * 32 KB) hide load latency of the short K/V tiles. Long
  // dense calls run the large tile instead (192 x 128, below).
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
  // consumers' setup before the mainloop, off the tensor-core path. Dense calls of at most
  // kShortTileMaxSeqlenK256 keys run 128 x 64 instead (fwd_tile_size_large, below).
  return {128, 80, 2, 24, 240};
}

// The large tile: a second dense 16-bit instantiation, chosen per call (fwd_use_large_tile) for
// long dense calls (not varlen, segment ids, split-KV, KV caches or GQA-packed decode, which keep
// the default tile; the split rule counts default tiles). block_n 0: none for this head dim.
// At hdim 256 and 192 / 192 the second tile is the narrower one, for short dense calls (below;
// the name is the hdim 64 / 128 case's).
//  - hdim 128: 128 x 176 (FA3's non-causal choice, wider), smem Q 32 KB + 2 * (44 + 44) KB =
//    208 KB, so O goes through the V ring (kOAliasesV). Measured on H200 (bf16, 16k tokens,
//    hidden 2048, --time, one run each, clocks not pinned), 128 x 128 -> 128 x 176 TFLOP/s at
//    512 / 1k / 2k / 4k / 8k / 16k: full 453 / 541 / 599 / 638 / 594 / 608 -> 392 / 505 / 582 /
//    584 / 625 / 629 (the 2026-11-21 runs: +3% at 8k-16k, -7..15% at 512): only where every
//    query row sees every key, from 8k keys on. Bench beside cuDNN
//    (h200_2026-11-22s6t_fwdtile.txt): full 8k 0.969 -> 1.008, 16k 0.985 -> 1.025.
//  - hdim 64: 192 x 128 (FA3's causal choice, taller): three consumer warpgroups of 64 rows
//    (512 threads; setmaxnreg (32, 160): S 64, P 32 and O 32 registers each), so every K/V
//    block in shared memory feeds 192 query rows instead of 128; smem Q 24 KB + 3 * (16 + 16)
//    KB. ptxas: 20 bytes of spill stores, in the consumers' per-tile setup before the first
//    WGMMA. Measured on H200 (bf16, 16k tokens, hidden 2048, test_fwd_sm90 --time, clocks not
//    pinned, 2026-11-22; benchmarks/measured/h200_2026-11-22s7f_fwd64.txt), 128 x 128 -> 192 x
//    128 TFLOP/s at 512 / 1k / 2k / 4k / 8k / 16k, every call on the 192-row tile (first build):
//      full   326 / 388 / 428 / 445 / 429 / 443 -> 315 / 394 / 474 / 488 / 483 / 495 (run 1),
//             325 / 388 / 431 / 433 / 432 / 440 -> 329 / 396 / 475 / 464 / 488 / 496 (run 2);
//      causal 184 / 265 / 343 / 404 / 427 / 439 -> 161 / 230 / 332 / 408 / 470 / 467 (run 1),
//             183 / 267 / 349 / 402 / 423 / 434 -> 163 / 228 / 345 / 404 / 452 / 461 (run 2).
//    With the rule below (second build, two runs, base -> this):
//      full   332 / 394 / 432 / 445 / 443 / 447 -> 329 / 394 / 473 / 477 / 502 / 499,
//             329 / 389 / 430 / 438 / 439 / 449 -> 330 / 399 / 478 / 486 / 491 / 499;
//      causal 188 / 271 / 345 / 408 / 441 / 440 -> 182 / 268 / 340 / 397 / 461 / 473,
//             187 / 267 / 345 / 406 / 426 / 443 -> 183 / 270 / 341 / 396 / 466 / 465
//    (512-4k causal run the default tile in both: the 1-3% there is run-to-run spread).
//    Short causal calls lost: a 192-row block straddles more diagonal key blocks (1k causal
//    visits 6144 row-blocks against 4608) and the last block is partly empty. Since
//    2026-11-22 (session 9) each consumer warpgroup of the 192-row tile passes over the key
//    blocks its own 64 rows do not see (flash_fwd_mainloop_sm90.h, kWarpGroupBand: the
//    diagonal's last block for the tile's upper rows, every block for rows past seqlen_q), so
//    causal visits what the 128-row tile visits (1k: 4608). Measured on H200 (test_fwd_sm90
//    --time, bf16, 16k tokens, hidden 2048, clocks not pinned, one device call, two runs each,
//    benchmarks/measured/h200_2026-11-22s9f_fwd64_band.txt), main (causal on the 128-row tile
//    up to 4k) -> the 192-row tile with the pass-over on every causal call, TFLOP/s at 512 / 1k /
//    2k / 4k / 8k / 16k:
//      causal 184 / 258 / 321 / 365 / 479 / 481, 181 / 256 / 338 / 391 / 475 / 477 ->
//             184 / 262 / 362 / 430 / 482 / 483, 184 / 264 / 371 / 428 / 469 / 480;
//      full   335 / 405 / 485 / 512 / 502 / 502, 330 / 399 / 479 / 468 / 500 / 502 ->
//             332 / 427 / 491 / 493 / 499 / 503, 332 / 427 / 490 / 518 / 510 / 506 (1k: the
//             last 192-row block of each sequence has two warpgroups past seqlen_q, which now
//             skip its blocks instead of computing them).
//    So: where every query row sees every key from kLargeTileMinSeqlen64Full keys and rows on;
//    with a band (causal, windows) where each row's keys start at key 0 (no left edge: the
//    pass-over trims only the upper edge) and the query rows are at least
//    kLargeTileMinSeqlen64Band (1024 then; 512 was a wash, 184 / 181 -> 184 / 184). Bench beside
//    cuDNN (h200_2026-11-22s9f_bench_fwd64.txt against main's h200_2026-11-22s8z_bench_fwd.txt),
//    fa3_jax / cuDNN at 1k / 2k / 4k: causal 0.854 / 0.902 / 0.931 -> 0.879 / 0.996 / 1.034,
//    full 0.933 / 1.043 / 1.063 -> 0.992 / 1.059 / 1.082; 512 and 8k-16k within 1%.
//    Full from 512 (session 11): with the pass-over the 512-row calls gain too (the third block
//    of 192 rows has 128 of them, its last warpgroup skips its key blocks). Measured on H200
//    (test_fwd_sm90 --time --mask full, each mask in its own process, one device call, three
//    interleaved runs, 2026-11-22, h200_2026-11-22s11f_sched.txt), full 512: 329.7 / 323.2 /
//    330.1 (128 rows) -> 347.8 / 346.0 / 351.6 (192 rows), +6%. Causal 512 stays on 128 rows
//    (192 rows, two runs in one process after full: 178 / 184 against 191 / 190). Again after
//    session 12's tile boundary changes (h200_2026-11-23s12g_hdim256_short.txt, three
//    interleaved runs, causal only): 512 on 192 rows 221.2 against 235.0 on 128 rows. Since
//    session 15 the 192-row tile stores O by TMA under the next tile's first S WGMMA and runs
//    without pingpong (fwd_defer_epilogue, fwd_schedule), and causal 512 moved to it (bench,
//    3 interleaved rounds, h200_2026-11-23s15d_hdim64_causal512.txt): 239.8 / 238.2 / 239.2 on
//    128 rows -> 245.4 / 244.9 / 246.1 on 192 rows, +2.7%.
//    Not taken either (session 14, h200_2026-11-23s14b_hdim64_two_ctas.txt, 3 rounds): every
//    hdim 64 dense call on a 64 x 128 tile with one consumer warpgroup and two CTAs per SM (the
//    decode tile's form, 2 stages, 84 KB), TFLOP/s at 512 / 1k / 2k / 4k: causal 238.9 / 313.4 /
//    415.1 / 475.7 -> 236.4 / 315.5 / 388.3 / 442.2, full 381.1 / 447.0 / 503.6 / 527.9 ->
//    357.9 / 419.0 / 460.9 / 486.4 (with 3 stages, 117 KB, only one CTA fits an SM: -30 to -40%).
//    Nor 4 K/V stages on the 192-row tile (session 15, 200 KB; 3 rounds,
//    h200_2026-11-23s15g_hdim64_four_stages.txt): full within 0.6%, causal 512 -1.4%, 1k +0.8%.
//  - hdim 256: 128 x 64 where seqlen_k <= kShortTileMaxSeqlenK256 (any band). 512 keys are 6.4
//    blocks of 80, so the default tile computes 7 (560 keys, 8.6% wasted; causal 512: 1440 key
//    columns over the 4 row blocks against 1280 at 64, 11%), and 8 blocks of 64 hold them
//    exactly; smem Q 64 KB + 2 * (32 + 32) KB = 192 KB, O still through the V ring (64 KB);
//    ptxas: 32 bytes of spill stores against 56. Longer calls keep 80: each block's fixed cost
//    (barriers, row reductions, the O rescale of 128 registers) over fewer keys loses more than
//    the last block wastes. Measured on H200 (test_fwd_sm90 --time, bf16, 16k tokens, hidden
//    2048, one mask per process, three interleaved runs in one device call, 2026-11-23,
//    benchmarks/measured/h200_2026-11-23s12g_hdim256_short.txt), block_n 80 -> 64 on every call,
//    TFLOP/s at 512 / 1k / 2k / 4k / 8k / 16k (means):
//      causal 311.5 / 454.2 / 582.2 / 682.8 / 727.6 / 720.7 -> 323.5 / 457.5 / 577.3 / 667.8 /
//             683.6 / 677.6;
//      full   482.9 / 619.5 / 697.1 / 733.3 / 713.0 / 703.3 -> 497.3 / 606.7 / 682.2 / 688.0 /
//             666.4 / 675.4.
//    Bench beside cuDNN with this rule (same file, call 2; main's wheel in the same call),
//    fa3_jax / cuDNN at 512: full 0.932 -> 0.956, causal 0.937 -> 0.971; 1k unchanged.
//  - hdim 192 / 192: 128 x 64 where seqlen_k <= kShortTileMaxSeqlenK192 (any band), with O
//    through shared memory and a TMA store (fwd_store_o_with_tma; the default 128 x 112 tile has
//    no room for O: 216 KB). 512 keys are 4.6 blocks of 112 (1k: 9.1), so the default tile
//    computes 9% more keys than the call has; smem Q 48 KB + 2 * (24 + 24) KB + O 48 KB = 192
//    KB; ptxas 0 spill bytes. Measured on H200 (bench_attention.py --impls fa3_jax --heads 16
//    --hdims 192, bf16, 16k tokens, one mask per process, 2 interleaved rounds in one call,
//    2026-11-23, h200_2026-11-23s17_hdim192_short_tile.txt), 128 x 112 -> 128 x 64 with the
//    register epilogue -> 128 x 64 with the TMA store, every call on the tile, TFLOP/s (means) at
//    512 / 1k / 2k / 4k / 16k:
//      full   446.8 / 564.9 / 656.1 / 714.6 / 764.9 -> 443.2 / 544.6 / 605.4 / 643.5 / 674.0
//             -> 500.5 / 577.9 / 621.9 / 648.8 / 669.3
//      causal 284.3 / 425.0 / 574.0 / 669.8 / 762.7 -> 296.0 / 426.8 / 536.1 / 608.8 / 680.3
//             -> 352.9 / 471.2 / 567.2 / 624.5 / 678.1
//    so up to 1k keys: +12% / +2.3% full, +24% / +11% causal; from 2k the 112-key blocks win.
//    cuDNN in the same session (h200_2026-11-23s17_bench_hdim96_192.txt): 525.7 / 615.8 full,
//    352.4 / 472.5 causal at 512 / 1k. Not for 192 / 128 (its 128 x 128 tile wastes no keys).
inline constexpr int kLargeTileMinSeqlenK128 = 8192;
inline constexpr int kLargeTileMinSeqlen64Full = 512;
inline constexpr int kLargeTileMinSeqlen64Band = 512;
inline constexpr int kShortTileMaxSeqlenK256 = 512;
inline constexpr int kShortTileMaxSeqlenK192 = 1024;
constexpr FwdTileSize fwd_tile_size_large(int head_dim, int head_dim_v, bool fp8 = false) {
  if (!fp8 && head_dim == 128 && head_dim_v == 128) return {128, 176, 2};
  if (!fp8 && head_dim == 64 && head_dim_v == 64) return {192, 128, 3, 32, 160};
  if (!fp8 && head_dim == 256 && head_dim_v == 256) return {128, 64, 2, 24, 240};
  if (!fp8 && head_dim == 192 && head_dim_v == 192) return {128, 64, 2};
  return {128, 0, 0};
}
// full_band: every query row sees keys [0, seqlen_k) (no causal or window edge); from_key0: each
// query row's keys start at key 0 (no left window edge; causal is such a band).
constexpr bool fwd_use_large_tile(int head_dim, int head_dim_v, bool fp8, bool full_band,
                                  bool from_key0, long long seqlen_q, long long seqlen_k) {
  if (fwd_tile_size_large(head_dim, head_dim_v, fp8).block_n == 0) return false;
  if (head_dim == 64)
    return full_band ? seqlen_q >= kLargeTileMinSeqlen64Full &&
                           seqlen_k >= kLargeTileMinSeqlen64Full
                     : from_key0 && seqlen_q >= kLargeTileMinSeqlen64Band;
  if (head_dim == 256) return seqlen_k <= kShortTileMaxSeqlenK256;
  if (head_dim == 192) return seqlen_k <= kShortTileMaxSeqlenK192;
  return full_band && seqlen_k >= kLargeTileMinSeqlenK128;
}

// hdim 64's 192-row tile (fwd_tile_size_large): its epilogue (fwd_store_o_with_tma,
// fwd_defer_epilogue) and schedule (fwd_schedule) differ from the 128-row tile's.
constexpr bool fwd_is_large_tile_64(int head_dim, int head_dim_v, int block_m) {
  return head_dim == 64 && head_dim_v == 64 && block_m == 192;
}

// The forward epilogue: O through shared memory and one TMA store per consumer warpgroup, which
// overlaps the next tile's mainloop (flash_fwd_epilogue_sm90.h, store_tma), or straight from the
// registers with 4-byte stores. Dense tiles only (varlen tiles end at their sequence, split-KV
// tiles write float32 partials) and only where shared memory has room for the block_m x dv tile
// (flash_fwd_traits_sm90.h). Measured on H200 (bf16, 16k tokens, hidden 2048, scripts/dev_fwd.sh
// --time, 2026-11-22), TFLOP/s registers -> TMA store at 512 / 1k / 2k / 4k+:
//  - hdim 128: full 426 / 521 / 584 -> 449 / 538 / 594, causal 234 / 334 / 430 -> 259 / 364 /
//    434, 4k-16k within 2% either way: on.
//  - hdim 64: full 339 / 397 / 435 -> 331 / 390 / 429, causal 273 -> 265 at 1k: off (its 64-column
//    rows are cheap to store from registers, and the extra barriers cost more). The 192-row large
//    tile (2026-11-22, h200_2026-11-22s7f_fwd64.txt, two runs), TFLOP/s at 2k / 4k / 8k / 16k:
//    full 473 / 477 / 502 / 499 and 478 / 486 / 491 / 499 -> 474 / 475 / 495 / 499 and 476 /
//    475 / 494 / 498, causal 8k / 16k 461 / 473 and 466 / 465 -> 478 / 468 and 482 / 470: a wash
//    (ptxas: 64 spill bytes against 20), so off there too. Again after session 12's tile
//    boundary changes (both tiles; h200_2026-11-23s12f_tile_boundary.txt, call 8, three
//    interleaved runs), TFLOP/s at 512 / 1k / 2k: causal 229.5 / 306.5 / 408.0 -> 223.6 / 311.4
//    / 411.5 (512: the 128-row tile), full 380.9 / 444.7 / 503.1 -> 386.3 / 446.8 / 502.5: off.
//    Nor per-warp staging rows (session 14, h200_2026-11-23s14d_hdim64_staged_epilogue.txt, 3
//    rounds; ncu had 2.7% of causal 512's stall samples on the register epilogue's LSE address
//    waiting for the 4-byte O stores, h200_2026-11-23s14c_ncu_short_rows.txt): each warp's pairs
//    into 16 swizzled rows of shared memory, out as 16-byte stores of whole row chunks, with no
//    barrier beyond the warp: causal 512 (128-row tile) 236.8 -> 237.0 TFLOP/s, the 192-row tile
//    -1 to -12% up to 4k (ptxas 136 spill bytes against 20).
//    These are without fwd_defer_epilogue; with it the 192-row tile gains (last bullet).
//  - FP8 (bfloat16 out), fp8_epilogue_ab, TFLOP/s at 1k / 4k / 16k: hdim 128 full 506 / 717 /
//    800 -> 541 / 734 / 805, causal 328 / 595 / 714 -> 358 / 617 / 721; hdim 256 full 566 / 899
//    / 1053 -> 663 / 1017 / 1167, causal 368 / 674 / 871 -> 439 / 791 / 974: on at both, though
//    ptxas then reports 212 spill bytes at FP8 hdim 256 (68 before; block_n 96 then).
//  - hdim 96 not measured: off.
//  - hdim 256 (16-bit): shared memory is full (224 KB), so O goes through the V ring
//    (flash_fwd_traits_sm90.h, kOAliasesV); with fwd_schedule's no-pingpong + rescale-first,
//    TFLOP/s at 512 / 1k / 2k / 4k: full 391 / 546 / 638 / 702 -> 436 / 582 / 672 / 720, causal
//    219 / 318 / 433 / 500 -> 233 / 330 / 438 / 505: on. ptxas then reports 120 bytes of spill
//    stores (48 before).
//  - hdim 192 / 192: its short 128 x 64 tile (fwd_tile_size_large, numbers there): on; the
//    default 128 x 112 tile has room for neither a separate O (216 KB) nor O in a V slot
//    (flash_fwd_traits_sm90.h drops the TMA store there). 192 / 128 not measured: off.
//  - hdim 64's 192-row tile, with its epilogue deferred (fwd_defer_epilogue, below): on since
//    session 15 (numbers there). Its 128-row tile keeps the register epilogue.
constexpr bool fwd_store_o_with_tma(int head_dim, int head_dim_v, int block_m) {
  return (head_dim == 128 && head_dim_v == 128) || (head_dim == 256 && head_dim_v == 256) ||
         (head_dim == 192 && head_dim_v == 192) ||  // its 128 x 64 tile only: the only one with room
         fwd_is_large_tile_64(head_dim, head_dim_v, block_m);
}
// Each dense tile's epilogue deferred: the consumer warpgroup issues the next tile's first
// S WGMMA, then stores the previous tile's O (still in its accumulator) under it, then clears O
// (flash_fwd_kernel_sm90.h, store_pending; FwdMainloop::mma, prev_epilogue). Not where O lives
// in the V ring (Traits::kOAliasesV: hdim 128's 128 x 176 tile, hdim 256). ncu of hdim 128 full
// 1k (h200_2026-11-23s14c_ncu_short_rows.txt): per-tile consumer code held 15.5% of the stall
// samples, among them the wait for each tile's first S WGMMA and the tile hand-off. Measured on
// H200 (bench_attention.py --impls fa3_jax, 16k tokens, hidden 2048, one mask per process, 3
// interleaved rounds in one call, 2026-11-23, h200_2026-11-23s14f_defer_epilogue.txt), means,
// TFLOP/s at 512 / 1k / 2k / 4k / 16k:
//   hdim 128 full   511.2 / 593.9 / 652.6 / 681.9 / 717.5 -> 515.7 / 599.2 / 655.2 / 681.5 / 717.5
//                   (16k: the 128 x 176 tile, unchanged)
//   hdim 128 causal 339.5 / 458.4 / 564.7 / 637.7 / 699.0 -> 343.4 / 461.3 / 566.1 / 636.3 / 696.4
//   hdim 64 causal  241.4 / 316.6 / 417.1 / 479.2 / 549.0 -> 233.2 / 315.1 / 415.5 / 476.6 / 548.7
//   hdim 64 full    383.8 / 449.7 / 507.8 / 530.9 / 564.4 -> 373.0 / 443.5 / 504.4 / 528.9 / 563.8
// so hdim 128 only: its TMA-store epilogue is cheap to issue under a 128-column S WGMMA, while
// hdim 64's register stores outlast its short S WGMMA and delay the first softmax.
// FP8 (bench_attention.py --fp8, "fp8" column: per-tensor descales, 2 interleaved rounds,
// same file, call 7), TFLOP/s at 1k / 2k / 4k / 16k, means:
//   hdim 256 full   750.5 / 949.8 / 1087.5 / 1234.8 -> 804.1 / 1001.1 / 1144.8 / 1299.1
//   hdim 256 causal 521.0 / 753.9 / 963.2 / 1236.5 -> 550.5 / 779.9 / 984.6 / 1259.3
//   hdim 128 full   631.1 / 737.6 / 798.9 / 861.0 -> 618.6 / 696.5 / 749.6 / 795.7
//   hdim 128 causal 467.2 / 610.8 / 727.8 / 860.2 -> 462.5 / 594.9 / 690.1 / 799.9
// so FP8 hdim 256 (its 64 KB O tile's store, waiting for the previous one to have left shared
// memory, now runs under the S WGMMA; ptxas 216 spill bytes against 184) and not FP8 hdim 128.
// Where O lives in the V ring (same file, call 9, 3 rounds): 16-bit hdim 256 at 512 / 1k / 2k /
// 4k / 8k / 16k full 505.8 / 626.9 / 706.8 / 751.2 / 778.8 / 791.0 -> 484.5 / 612.4 / 695.8 /
// 744.5 / 775.8 / 790.1, causal -0.3 to -6.6% (the ring is free for the next tile's first V load
// only after the deferred store), hdim 128's 128 x 176 tile at 8k 706.1 -> 703.4: not taken.
// hdim 64 with O through shared memory and a TMA store as well (fwd_store_o_with_tma; session
// 15, h200_2026-11-23s15b_hdim64_tma_defer.txt, 3 interleaved rounds, bench_attention.py
// --impls fa3_jax, means), TFLOP/s at 512 / 1k / 2k / 4k / 16k:
//   full   382.5 / 448.2 / 505.5 / 528.7 / 561.1 -> 389.3 / 453.6 / 509.8 / 531.5 / 562.7
//   causal 239.6 / 315.2 / 416.4 / 476.5 / 545.6 -> 233.8 / 324.8 / 424.0 / 481.9 / 548.1
// Every row but causal 512 runs the 192-row tile (fwd_use_large_tile) and gains (+0.3 to +3.0%;
// ptxas 44 spill bytes against 20, in the same per-tile setup); causal 512, on the 128-row
// tile, loses 2.4%. So the 192-row tile only: its three warpgroups' STSM of 64 x 64 each and
// one TMA store apiece run under a 192-row tile's S WGMMAs.
constexpr bool fwd_defer_epilogue(int head_dim, int head_dim_v, bool fp8, int block_m) {
  if (fp8) return head_dim == 256;
  return (head_dim == 128 && head_dim_v == 128) ||
         fwd_is_large_tile_64(head_dim, head_dim_v, block_m);
}

// Two Q buffers (flash_fwd_traits_sm90.h, kQStages): with one, the producer can load tile j's Q
// only once both consumer warpgroups' last S WGMMA of tile j - 1 has retired, and the consumers
// reach tile j after little more than the last block's softmax, P V and the epilogue, less than
// Q's load latency. With two, Q is loaded while tile j - 1 still runs. 16-bit only, where it fits
// beside the O tile: hdim 128's 128 x 128 tile (Q 2 x 32 KB + 2 * (32 + 32) KB + O 32 KB = 224
// KB; not its 128 x 176 tile, nor hdim 192 / 256) and hdim 64's tiles (since session 12, below).
// Measured on H200 (test_fwd_sm90 --time, bf16, 16k tokens, hidden 2048, clocks not pinned, two
// runs each, 2026-11-22, benchmarks/measured/h200_2026-11-22s8f_fwdshort.txt; both with the last
// P V's finalize overlap, flash_fwd_mainloop_sm90.h), one -> two Q buffers, TFLOP/s at 512 / 1k /
// 2k / 4k:
//   hdim 128 full   461 / 555 / 614 / 648, 458 / 551 / 611 / 597 -> 464 / 561 / 615 / 594,
//                   477 / 567 / 623 / 657 (8k / 16k: the 128 x 176 tile, unchanged);
//   hdim 128 causal 254 / 354 / 433 / 510, 252 / 346 / 424 / 477 -> 266 / 357 / 439 / 518,
//                   263 / 368 / 448 / 524 (8k / 16k within 1%);
//   ncu, hdim 128 full 1k: 245.4 -> 242.4 us. Bench (bench_attention.py, fa3_jax / cuDNN, main's
//   h200_2026-11-22s8_base_bench_fwd.txt -> run 2 there) at 512 / 1k / 2k / 4k: full 0.897 / 0.923
//   / 0.945 / 0.963 -> 0.916 / 0.938 / 0.969 / 0.990, causal 0.914 / 0.970 / 1.004 / 1.000 ->
//   0.938 / 0.988 / 1.009 / 1.008.
// FP8 hdim 128 (Q 2 x 16 KB; session 9, h200_2026-11-22s9q_fp8_ab.txt, 3 runs, with the V
// transpose overlap) was no better: full 602 / 720 / 802 -> 585 / 709 / 799 at 1k / 2k / 4k.
// Nor with each tile's first K loaded before its Q as well (session 17,
// h200_2026-11-23s17_fp8_two_q_ab.txt, FP8 kernel alone, 2 rounds, means at 1k / 2k / 4k / 16k):
// full 629.6 / 736.9 / 800.0 / 868.6 -> 626.6 / 724.8 / 803.0 / 872.3, causal 469.4 / 610.8 /
// 728.9 / 861.8 -> 470.6 / 607.6 / 723.1 / 870.6.
// hdim 64 (128 x 128, 3 stages; 192 x 128) was a wash in session 8: full 328 / 399, 324 / 395 ->
// 320 / 397, 318 / 394 at 512 / 1k, causal 180 / 256 / 336, 177 / 253 / 335 -> 181 / 264 / 334,
// 180 / 254 / 338 at 512 / 1k / 2k, 2k+ full within 2%. Since the tile boundary lost its
// divisions and K goes before Q (below, "Tile boundaries"), Q is what the consumers wait for
// at each tile start, and two buffers pay (Q 2 x 16 KB + 3 * 32 KB at 128 rows, 2 x 24 + 3 * 32
// KB at 192; ptxas: 16 bytes of spill stores on the 192-row tile, 8 before): numbers below.
//
// Tile boundaries (session 12, ncu of test_fwd_sm90 at hdim 64 causal 1k, 2026-11-23,
// benchmarks/measured/h200_2026-11-23s12f_tile_boundary.txt): SMs 96% active but issue slots
// 45% busy, and the consumer warps spent 42% of their stall samples in per-tile code against 47%
// in the key-block loop: decode_tile's three integer divisions (I2F / MUFU.RCP / F2I chains) at
// the tile start and again before the epilogue (7.7% of the samples), the wait for Q (2.9%) and
// then for K (1.9%), which the producer issued only after Q, once the previous tile's last S
// WGMMA had retired. Now the scheduler thread decodes each tile into shared memory
// (flash_fwd_kernel_sm90.h, tile_coords), the producer loads a tile's first K before it waits
// for the Q buffer (flash_fwd_mainloop_sm90.h, kKBeforeQ), and hdim 64 has two Q buffers.
// Measured on H200 (test_fwd_sm90 --time, bf16, 16k tokens, hidden 2048, one mask per process,
// three interleaved runs in each of two device calls, means; same file), main -> divisions
// and K order -> + two Q buffers at hdim 64, TFLOP/s at 512 / 1k / 2k:
//   hdim 64 causal  199.4 / 289.6 / 393.0 -> 215.0 / 298.3 / 400.5 -> 227.0 / 304.0 / 404.4
//                   200.9 / 291.4 / 395.0 ->                        -> 230.1 / 307.5 / 407.8
//   hdim 64 full    350.8 / 418.6 / 484.4 -> 362.0 / 434.9 / 495.0 -> 376.2 / 439.8 / 497.9
//                   358.7 / 427.9 / 492.4 ->                        -> 381.4 / 445.3 / 502.3
//   hdim 128 causal 310.7 / 437.5 / 552.7 -> 317.5 / 444.5 / 554.6, 312.7 / 441.6 / 553.8 ->
//                   325.0 / 452.3 / 559.5
//   hdim 128 full   485.7 / 578.1 / 639.4 -> 496.8 / 582.5 / 638.5, 492.6 / 583.9 / 640.0 ->
//                   507.1 / 590.9 / 640.9
// (4k-16k within run-to-run spread). hdim 256 (no Q buffer change; third call, two runs): causal
// 300.2 / 437.8 / 565.1 -> 304.9 / 449.5 / 575.0, full 471.2 / 604.3 / 682.9 -> 480.4 / 616.9 /
// 691.4 (4k full 727 -> 698, 8k-16k +1-6%: this row's usual spread), FP8 (--time-fp8) causal
// 327.9 / 529.0 / 774.4 -> 343.5 / 555.0 / 792.6, full 533.6 / 760.5 / 946.3 -> 554.3 / 781.5
// / 968.8. Bench beside cuDNN (with mask.h's one-compare causal blocks too; main's wheel in the
// same call, h200_2026-11-23s12f_bench_fwd.txt), fa3_jax / cuDNN at 512 / 1k / 2k: hdim 64 causal
// 0.783 / 0.873 / 1.012 -> 0.916 / 0.938 / 1.056, full 0.937 / 0.981 / 1.061 -> 0.985 / 1.025 /
// 1.087; hdim 128 causal 0.941 / 1.017 / 1.075 -> 0.990 / 1.054 / 1.087, full 0.943 / 0.966 /
// 0.987 -> 0.955 / 0.972 / 0.982; hdim 256 causal 0.892 / 0.988 / 1.058 -> 0.937 / 1.018 / 1.090,
// full 0.919 / 0.977 / 1.000 -> 0.937 / 1.007 / 1.019. Not taken (second call): asking the
// scheduler for the next tile two key blocks before the producer's last load of the current one
// (on-demand claims), 226.8 / 307.3 / 405.8 causal, or at each tile's start, 226.2 / 303.1 /
// 401.1, against 230.1 / 307.5 / 407.8; full within 1%.
// What it costs (bench_attention, fa3_jax only, main before these changes and after in one call,
// two rounds each, h200_2026-11-23s12_fp8_ab.txt): the 16-bit hdim 128 kernel at 2k / 4k / 8k /
// 16k, full 647.9 / 681.3 / 708.7 / 720.5 -> 644.0 / 670.4 / 708.1 / 717.1, causal 551.9 / 629.7
// / 676.0 / 700.1 -> 558.1 / 629.3 / 668.3 / 689.2 (bisected in session 13: the one-compare
// mask, below at fwd_loop_mask_both_edges); the FP8 hdim 128 kernel full 4k / 16k 805 / 863 ->
// 773 / 810, so the FP8 kernels keep the former decode and two-edge mask
// (flash_fwd_kernel_sm90.h, tile_coord).
constexpr bool fwd_double_buffer_q(int head_dim, int head_dim_v, bool fp8) {
  return !fp8 && (head_dim == 128 || head_dim == 64) && head_dim_v == head_dim;
}

// Which masked key blocks compare each element once (mask.h, BandMask::apply: the band's lower
// edge cannot cross the block) and which compare both edges, in the 16-bit dense kernel, which
// serves full and causal calls alike. At hdim 128 the one-compare choice inside the key-block
// loop cost even full calls, which never run it (the loop's SASS, bf16 128 x 128: 833
// instructions before session 12, 981 with the choice, 838 without), so there only the first
// key block (before the loop: causal's diagonal) takes it and blocks inside the loop compare
// both edges. Measured on H200 (bench_attention.py --impls fa3_jax, hdim 128, 16k tokens, one
// mask per process, 2 interleaved rounds in one call, 2026-11-23, helper b13,
// benchmarks/measured/h200_2026-11-23s13b_tile_bisect.txt, call 3), TFLOP/s at 512 / 1k / 2k / 4k
// / 8k / 16k, main before session 12 -> main -> this:
//   full   490 / 581 / 642 / 675 / 702 / 713 -> 501 / 585 / 640 / 667 / 702 / 711
//          -> 503 / 587 / 647 / 675 / 703 / 713
//   causal 317 / 439 / 550 / 626 / 670 / 696 -> 332 / 450 / 555 / 624 / 663 / 686
//          -> 331 / 452 / 558 / 630 / 672 / 696
// (the two-edge form everywhere: full 504 / 586 / 644 / 672 / 702 / 712, causal 329 / 447 / 554
// / 626 / 668 / 692). The tile ring and K before Q (above) were neutral from 4k in the same
// bisect (calls 1-2). Other head dims keep the one-compare choice everywhere: the rule at every
// head dim (same day, 3 rounds, h200_2026-11-23s13m_loop_mask_all_hdims.txt) left hdim 64 within
// spread and cost hdim 256 causal 1k / 2k / 4k 461.5 / 589.4 / 692.3 -> 456.3 / 584.8 / 689.3.
// Varlen keeps it too (not measured).
constexpr bool fwd_loop_mask_both_edges(int head_dim, int head_dim_v) {
  return head_dim == 128 && head_dim_v == 128;
}

// Consumer schedule of the 16-bit mainloop (flash_fwd_mainloop_sm90.h):
//  - pingpong: the two consumer warpgroups take turns issuing WGMMAs (named barriers), so one's
//    softmax runs under the other's matrix work;
//  - rescale_o_first: each step rescales O by the previous block's factor right after issuing
//    the S WGMMA and before issuing P V, so the rescale runs under the S WGMMA; otherwise it runs
//    after P V has retired, with no WGMMA of this warpgroup in flight.
// FA3 turns pingpong off and rescales first above head dim 128 (16-bit): there the O accumulator
// is large and the two warpgroups' long WGMMAs keep the tensor cores busy without turns.
// Measured on H200 (bf16, 16k tokens, hidden 2048, scripts/dev_fwd.sh --time, 2026-11-22; one
// run each, clocks not pinned), hdim 256 TFLOP/s at 512 / 1k / 2k / 4k / 8k / 16k:
//   pingpong, rescale after P V: full 388 / 539 / 639 / 693 / 667 / 690, causal 214 / 307 / 411 /
//     493 / 539 / 550;
//   no pingpong, rescale first:  full 391 / 546 / 638 / 702 / 661 / 677, causal 219 / 318 / 433 /
//     500 / 556 / 561;
//   the same with O through shared memory (fwd_store_o_with_tma): full 436 / 582 / 672 / 720 /
//     692 / 693, causal 233 / 330 / 438 / 505 / 550 / 561.
// Head dims 64 and 128 (session 15, h200_2026-11-23s15c_schedule_hdim64_128.txt; bench_attention.py
// --impls fa3_jax, bf16, 16k tokens, hidden 2048, one mask per process, 2 interleaved rounds,
// means), pingpong -> no pingpong, rescale after P V -> no pingpong, rescale first, TFLOP/s at
// 512 / 1k / 2k / 4k / 16k:
//   hdim 128 full   507.6 / 590.4 / 647.0 / 675.9 / 713.5 -> 514.7 / 599.1 / 655.5 / 682.9 /
//                   727.8 -> 512.5 / 601.5 / 661.0 / 689.2 / 730.8 (16k: the 128 x 176 tile)
//   hdim 128 causal 336.8 / 453.9 / 557.7 / 630.3 / 692.0 -> 333.6 / 450.9 / 563.8 / 642.3 /
//                   704.6 -> 333.6 / 450.6 / 565.4 / 644.8 / 711.6
//   hdim 64 full    386.0 / 451.1 / 506.9 / 530.2 / 560.9 (512, 1k: one round) -> 375.2 / 435.0
//                   / 486.2 / 508.2 / 549.4 -> 382.9 / 452.8 / 515.0 / 541.5 / 576.8
//   hdim 64 causal  236.1 / 320.1 / 418.8 / 478.8 / 547.5 -> 231.9 / 324.2 / 413.6 / 462.7 /
//                   518.7 -> 223.5 / 331.2 / 429.8 / 490.8 / 561.9
// Every hdim 64 row but causal 512 runs the 192-row tile (three warpgroups): rescale-first
// without turns is within 1% at full 512 / 1k and +1.6 to +3.5% elsewhere; causal 512, on the
// 128-row tile, loses 5.3% and keeps pingpong. hdim 128 (every tile): +1.0 to +2.4% on full
// rows and on causal from 2k, -1% at causal 512 / 1k.
// Head dims 192 / 128 (MLA's shape; same session, h200_2026-11-23s15h_schedule_hdim192.txt:
// flash_attention, 16 heads, 16k tokens, CUPTI, the script in that file, 2 interleaved rounds,
// means), pingpong -> no pingpong, rescale first, TFLOP/s at 512 / 1k / 2k / 4k / 16k:
//   full   505.5 / 607.9 / 673.8 / 710.2 / 743.4 -> 501.5 / 614.1 / 688.2 / 730.3 / 771.2
//   causal 337.2 / 477.2 / 597.9 / 676.0 / 746.0 -> 333.4 / 474.9 / 604.3 / 692.1 / 768.8
// as at hdim 128: taken. Head dims 96 / 96 and 192 / 192 (same session,
// h200_2026-11-23s15i_schedule_hdim96_192.txt, the same script, 2 rounds, means):
//   96 full     392.2 / 470.0 / 529.3 / 566.5 / 597.8 -> 393.9 / 477.2 / 540.3 / 579.4 / 611.3
//   96 causal   258.5 / 361.9 / 454.8 / 527.4 / 599.4 -> 254.9 / 360.0 / 458.5 / 535.0 / 612.0
//   192 full    447.5 / 557.3 / 652.0 / 713.9 / 766.4 -> 438.1 / 551.2 / 650.1 / 715.0 / 765.1
//   192 causal  282.6 / 423.6 / 570.3 / 666.3 / 763.1 -> 275.2 / 419.9 / 566.8 / 667.2 / 762.8
// so hdim 96 as hdim 128; 192 / 192 (block_n 112, a 96-register O) keeps pingpong.
struct FwdSchedule {
  bool pingpong;
  bool rescale_o_first;
};
// FP8: hdim 128 and 256 without pingpong; hdim 64 keeps it (not measured without). Measured on
// H200 (test_fwd_sm90 --time-fp8, per-tensor descales, V transpose included, 16k tokens, hidden
// 2048, TFLOP/s at 512 / 1k / 2k / 4k / 8k / 16k, 2026-11-22,
// benchmarks/measured/h200_2026-11-22s8q_fp8_schedule.txt):
//  - hdim 256, mean of 2 runs each (alternating, one device call):
//    pingpong:    full 504 / 739 / 943 / 1093 / 1147 / 1128, causal 287 / 466 / 680 / 862 / 1046 /
//      1114;
//    no pingpong: full 509 / 744 / 947 / 1085 / 1146 / 1128, causal 290 / 466 / 694 / 906 / 1079 /
//      1145: causal +2-5% from 2k, full within 1%. Rescaling first as well (as 16-bit hdim 256):
//      causal +0.6-4% from 2k but full -1.5 to -4% from 4k.
//  - hdim 128, mean of 4 pingpong / 3 no-pingpong runs in 3 device calls:
//    pingpong:    full 445 / 588 / 703 / 781 / 824 / 829, causal 254 / 389 / 538 / 662 / 748 / 804;
//    no pingpong: full 434 / 583 / 701 / 790 / 832 / 844, causal 252 / 387 / 536 / 668 / 760 / 829:
//      +1-3% from 4k, -0.2 to -1.0% at 1k-2k, -2.5% at 512 full. Rescaling first as well lost
//      3-8% at 1k-4k. Also measured and not taken (one run each against pingpong): the pingpong
//      arrive moved after the S WGMMA's wait (-3 to +2%, ncu the same); 1 of 4 exponentials as a
//      degree-2 polynomial on the FMA pipe (-2 to -6%); exponentials as ex2.approx.f16x2 with
//      f16x2 row sums (-7 to -22%; sm_90 runs it as two MUFU.EX2.F16 per pair, 16 exp2 per clock
//      and SM like MUFU.EX2). ncu (full 4k): tensor 42%, XU 44%, issue slots 44%, 5.4 cycles per
//      issued instruction; stall samples on the MUFU.EX2 20% (2/3 "wait"), FMNMX 9%, the S-WGMMA
//      wait 4%, the K-barrier wait 3.5%: each consumer warp runs its block's ~450 softmax
//      instructions at low IPC, one warp per scheduler, so the other warpgroup's WGMMAs cover
//      only part of it.
//    Two S accumulators (session 9, benchmarks/measured/h200_2026-11-22s9q_fp8_ab.txt): block n -
//    1's S WGMMA issued before block n's softmax, so no softmax waits for its S. At block_n 128
//    ptxas serializes every WGMMA (C7512, S 2 x 64 + O 64 + P 16 registers); at block_n 96,
//    full 369 / 499 / 591 / 662 / 704 / 731 against 442 / 596 / 716 / 802 / 811 / 833, causal
//    -11 to -16%: not taken (575 instructions per 128 keys against 540, lower IPC).
constexpr FwdSchedule fwd_schedule_fp8(int head_dim) {
  return {head_dim <= 64, false};
}
constexpr FwdSchedule fwd_schedule(int head_dim, int head_dim_v, bool fp8, int block_m) {
  if (fp8) return fwd_schedule_fp8(head_dim);
  if (head_dim == 128 || head_dim == 96 || fwd_is_large_tile_64(head_dim, head_dim_v, block_m) ||
      (head_dim == 192 && head_dim_v == 128))
    return {false, true};
  if (head_dim <= 192) return {true, false};
  return {false, true};
}

// Split-KV (Flash-Decoding): how many key ranges each tile is cut into, from the tile count, the
// key blocks per tile and the SM count; deterministic, so the workspace size Python asks for
// (sm90_fwd_workspace_bytes) matches the launch.
//  - A grid that fills at least 80% of one wave of CTAs (one CTA per SM) is not split: splitting
//    adds the combine pass and its float32 traffic and gains at most the 20% idle tail. Long
//    sequences therefore run exactly the unsplit path.
//  - Otherwise the splits raise the CTA count towards whole waves. Wave efficiency of s splits
//    is tiles * s / (waves * SMs) (tiles of one shape take about equal time); the smallest s
//    within 95% of the best efficiency wins (fewer splits: fewer partial results to merge, and
//    one full wave beats two). Measured on H200 (bf16, hdim 128, GQA 32/8 packed, forced split
//    counts, 2026-11-22), K/V TB/s: 8x4k s=2 3.64 (s=4 3.29, s=8 2.99); 8x16k s=2 4.35
//    (s=4 4.21, s=16 3.88); 1x128k s=16 4.27, s=15 4.20 (the 90% rule's pick), s=33 3.91
//    (two exact waves), s=64 3.47. The KV cache (h200_2026-11-22s7k_kvcache_decode.txt): 8x4k
//    s=2 3.48 (s=1 2.48, s=3 2.77, s=4 3.24); 1x128k s=16 4.14 (s=12 3.69, s=20 2.80, s=24
//    3.21, s=32 3.79).
//  - Each split keeps at least kMinBlocksPerSplit key blocks, so the pipeline fill and the
//    partial epilogue stay small next to its loads; at most kMaxSplits ranges per tile.
//  - The split kernel keeps the dense tile's 2 K/V stages: 3 stages at hdim 128 (224 KB) read
//    slower on every contiguous row (H200, 2026-11-22, K/V TB/s, cache column: 8 x 4k 3.42 ->
//    3.31, 8 x 16k 4.21 -> 4.03, 1 x 128k 4.11 -> 3.96; h200_2026-11-22s7k_kvcache_decode.txt).
//    Session 13 (h200_2026-11-23s13d_decode_ab.txt, fa3_jax column, rounds in one call): 3
//    stages again 8 x 4k / 8 x 16k / 1 x 128k 3.61 / 4.27 / 4.26 -> 3.48 / 4.09 / 4.08; 128 x 64
//    with 2 stages 3.54 / 3.96 / 3.92, with 4 stages 3.59 / 4.01 / 3.97 (so neither more nor
//    fewer bytes in flight than 2 x 64 KB a CTA pays); the warpgroup whose rows are all past
//    seqlen_q (decode's 4 GQA-packed rows) passing over its blocks without WGMMAs, 8 x 4k +1%,
//    8 x 64k -1%, not taken. At 8 x 4k the split kernel takes 35.5 us against cuDNN's 31.8
//    (+1.9 / 2.2 us of combine / reduction kernel), at 8 x 16k 125.2 against 121.7. ncu at 8 x 4k
//    (h200_2026-11-23s13_ncu_decode_8x4k.txt): cuDNN's decode kernel runs 16 x 128 tiles in 256
//    CTAs of 128 threads (4 splits), two per SM (86 KB of shared memory, 183 registers), DRAM
//    3.77 TB/s; ours 128 CTAs of 384 threads, one per SM (166 KB), 3.49 TB/s. Tried (branch d64,
//    h200_2026-11-23s13e_decode_64row_split.txt): a 64 x 64 split tile with one consumer
//    warpgroup and two CTAs per SM (setmaxnreg 40 / 216, 80 KB), splits sized for 2 x 132
//    slots: 8 x 4k 3.60 -> 3.70 TB/s (0.997 of cuDNN), pages of 16 +2-5% on every row, but
//    1 x 128k 4.25 -> 4.18 and seqlen_q 4 / 16 -1%. So it is the decode tile below, taken only
//    where it won: short splits and pages of 16-row boxes.
inline constexpr int kMinBlocksPerSplit = 4;

// The decode tile: a second split-KV instantiation (hdim 128), 64 x 64 with one consumer
// warpgroup (setmaxnreg 40 / 216 over 256 threads) and 80 KB of shared memory, so that two CTAs
// share an SM, as cuDNN's decode kernel does (above). block_n 0: none for this head dim. Taken
// (fwd_use_decode_tile) by split-KV calls whose splits of the default tile would hold at most
// kDecodeTileMaxKeysPerSplit keys each, or whose paged cache arrives in 16-row boxes; its split
// count then fills fwd_ctas_per_sm(64) CTAs per SM. Measured on H200 (bench_decode, 2 rounds,
// h200_2026-11-23s13e_decode_64row_split.txt), K/V TB/s, default tile -> decode tile: 8 x 4k
// 3.60 -> 3.70 (cache 3.57 -> 3.69), pages of 16 at 8 x 4k / 8 x 16k / 8 x 64k / 1 x 128k / 64 x
// 8k / seqlen_q 4 / 16: 3.36 / 4.06 / 4.36 / 4.07 / 4.32 / 3.92 / 3.76 -> 3.53 / 4.17 / 4.37 /
// 4.10 / 4.36 / 4.02 / 3.85; the longer contiguous splits lost (1 x 128k 4.25 -> 4.18, seqlen_q
// 4 / 16 4.14 / 3.96 -> 4.10 / 3.91) and keep the default tile. With this rule, every head dim
// (session 14, h200_2026-11-23s14a_decode_tile.txt; the lowering's workspace query takes the
// page size, module.cc): bench_decode fa3_jax / cuDNN 8 x 4k 3.71 / 3.70 (1.002; 0.972 before),
// pages of 16 at the rows above 3.51 / 4.16 / 4.37 / 4.10 / 4.36 / 4.02 / 3.85, 8 x 4k paged 16
// at 0.954 of the contiguous cache (0.936 before); the other 199 kernels' SASS is unchanged.
constexpr FwdTileSize fwd_tile_size_decode(int head_dim, int head_dim_v) {
  if (head_dim == 128 && head_dim_v == 128) return {64, 64, 2, 40, 216};
  return {64, 0, 0};
}
constexpr int fwd_ctas_per_sm(int block_m) { return block_m == 64 ? 2 : 1; }
inline constexpr int kDecodeTileMaxKeysPerSplit = 2048;

// Paged KV caches (flash.h, "Paged"): pages of a multiple of block_n rows arrive as one TMA load
// per key block; smaller pages as boxes of kFwdPageRows rows, one per page piece, so page_size
// must be a multiple of it (python/fa3_jax/kvcache.py gathers other page sizes into a
// contiguous view first). 16: the smallest box whose shared-memory offset keeps the 128-byte
// swizzle pattern (8 rows of 128 bytes) aligned for every head dim; block_n is a multiple of it.
// Pages of a multiple of kFwdPageRowsLarge rows (still smaller than a block) arrive in boxes of
// that many rows where block_n is a multiple of it: a quarter of the TMA loads. Lane r of the
// producer warp issues box r (flash_fwd_traits_sm90.h, kProducerWarp). Measured on H200
// (bench_decode.py, hdim 128, 32/8 heads, 8 x 16k, K/V TB/s at seqlen_q 4 / 16, 2026-11-22,
// h200_2026-11-22s7k_kvcache_decode.txt): one thread issuing 16-row boxes, pages of 16 1.96 /
// 1.94 and 64 2.04 / 1.99 (contiguous 4.09 / 3.94); a box per lane, pages of 16 3.25 / 3.20;
// a 64-row box per lane, pages of 64 3.92 / 3.77. At seqlen_q 1 (8 x 4k .. 64 x 8k): pages of
// 16 2.99-3.60, of 64 3.36-4.34, 0.79-0.85x and 0.95-0.98x the contiguous cache.
// Measured and not taken (2026-11-22, h200_2026-11-22s9d_decode.txt): pages smaller than a block
// copied with cp.async by the producer warp's 32 lanes (16-byte chunks into the swizzled slot,
// the full barrier completed by cp.async.mbarrier.arrive, FA3's non-TMA technique but with one
// warp): pages of 16 and 64 both at 0.98-1.03 TB/s against the boxes' 2.81-3.34 and 3.34-4.29 in
// the same call (ncu, 8 x 16k: DRAM 21% busy, 530 us against 129 contiguous; the 40-register
// producer spilled). One warp's copies keep far fewer bytes in flight than the TMA unit does.
// The producer's time from a slot's release to its TMA issue adds to every block's round trip
// (2 K/V stages), so paged calls are limited by it, not by the TMA unit or DRAM (session 10,
// h200_2026-11-22s10d_decode.txt; ncu, 8 x 16k, pages of 16: 187 us, DRAM 60% busy, against 129
// us and 87% contiguous). Two measured consequences, both taken (K/V TB/s, H200, rows 8 x 4k /
// 8 x 16k / 1 x 128k / 64 x 8k at seqlen_q 1 / 8 x 16k at 16, one device call):
//  - FwdMainloop::load looks the page (or box) of block n - 1 up before waiting for block n's
//    slot, and V takes K's: pages of 16 2.72 / 3.04 / 3.08 / 3.22 / 2.89 -> 2.95 / 3.27 / 3.33
//    / 3.50 / 3.10, of 64 3.38 / 3.98 / 3.97 / 4.20 / 3.69 -> 3.46 / 4.18 / 4.16 / 4.30 / 3.86,
//    of 256 3.49 / 4.09 / 4.06 / 4.28 / 3.76 -> 3.52 / 4.23 / 4.22 / 4.36 / 3.88 (before: the
//    same build looking up after the wait; session 9's kernel in the same call: 2.98 / 3.31 /
//    3.31 / 3.55 / 3.15, 3.40 / 4.05 / 3.96 / 4.28 / 3.81, 3.51 / 4.19 / 4.11 / 4.38 / 3.88;
//    the contiguous cache 3.52 / 4.25 / 4.13 / 4.40 / 3.98).
//  - fwd_paged_v_warp (below).
// Not taken: the leader issuing every box (the indices shuffled to it), pages of 16 2.47 / 2.76
// / 2.80 / 2.91 / 2.56 against 2.89 / 3.23 / 3.29 / 3.49 / 3.07 for a box per lane.
inline constexpr int kFwdPageRows = 16;
inline constexpr int kFwdPageRowsLarge = 64;
// Split-KV calls whose blocks arrive as boxes of box_rows rows: whether warp 2 of the producer
// warpgroup loads V while warp 0 loads Q and K (Params::v_warp), rather than warp 0 all three.
// A block is 8 boxes of 16 rows, 16 TMA instructions (two 64-column halves each) per tensor
// that one warp issues one lane after the other; with a warp per ring each ring's boxes go out
// as soon as its slot frees. Measured (as above, after the look-ahead): pages of 16 2.95 / 3.27
// / 3.33 / 3.50 / 3.10 -> 3.24 / 3.84 / 3.85 / 4.11 / 3.58 (0.90-0.93x the contiguous cache);
// pages of 64 (4 instructions a tensor) 3.46 / 4.18 / 4.16 / 4.30 / 3.86 -> 3.34 / 4.15 / 4.15
// / 4.32 / 3.84 and of 256 (whole-block loads) 3.52 / 4.23 / 4.22 / 4.36 / 3.88 -> 3.47 / 4.21
// / 4.20 / 4.36 / 3.87, so those keep one warp; the contiguous cache unchanged within 1%.
constexpr bool fwd_paged_v_warp(int box_rows) { return box_rows == kFwdPageRows; }
// Whether a split-KV call runs the decode tile (above): keys_per_split, those of one split of the
// default tile; small_boxes, a paged cache read in kFwdPageRows-row boxes.
constexpr bool fwd_use_decode_tile(int head_dim, int head_dim_v, int64_t keys_per_split,
                                   bool small_boxes) {
  return fwd_tile_size_decode(head_dim, head_dim_v).block_n > 0 &&
         (small_boxes || keys_per_split <= kDecodeTileMaxKeysPerSplit);
}
// With fwd_paged_v_warp: whether warp 3 of the producer warpgroup issues the upper half of K's
// boxes (Params::k_warp) while warp 0 issues the lower half (and Q), so K's 16 TMA instructions
// a block go out from two warps, 8 each. Measured on H200 (h200_2026-11-22s11d_decode.txt,
// bench_decode.py, pages of 16, K/V TB/s, 8 x 4k / 8 x 16k / 1 x 128k / 64 x 8k at seqlen_q 1 /
// 8 x 16k at 16, two rounds each in one call): one warp for K 3.23 / 3.90 / 3.90 / 4.18 / 3.63
// and 3.25 / 3.90 / 3.91 / 4.18 / 3.65; K over warps 0 and 3 3.35 / 4.07 / 4.06 / 4.29 / 3.78
// and 3.33 / 4.07 / 4.06 / 4.28 / 3.78 (0.94-0.98x the contiguous cache, 0.92-0.95x before);
// ncu, 8 x 16k: 134 us and DRAM 84% busy (contiguous 128 us, 87%). Not taken: V over warps 2
// and 3 instead (K on warp 0 alone), 3.26 / 3.93 / 3.91 / 4.20 / 3.66 and 3.26 / 3.92 / 3.92 /
// 4.21 / 3.66 (K[n] is needed first, for S, so its issue delay likely matters more). Only with
// a 40-register producer: at head dim 256 (24 registers) the extra role raised the split
// kernel's spills from 76 / 108 to 216 / 336 bytes (stores / loads, ptxas), so it is compiled
// out there (Traits::kPagedKWarp).
constexpr bool fwd_paged_k_warp(int producer_regs) { return producer_regs >= 40; }
inline constexpr int kMaxSplits = 128;

constexpr int fwd_num_splits(int num_tiles, int num_n_blocks, int num_sms) {
  if (num_sms <= 0 || num_tiles <= 0 || num_tiles * 5 >= num_sms * 4) return 1;
  int max_splits = num_n_blocks / kMinBlocksPerSplit;
  if (max_splits > kMaxSplits) max_splits = kMaxSplits;
  if (max_splits <= 1) return 1;
  auto efficiency = [&](int s) {
    int const ctas = num_tiles * s;
    int const waves = (ctas + num_sms - 1) / num_sms;
    return float(ctas) / float(waves * num_sms);
  };
  float best = 0.f;
  for (int s = 1; s <= max_splits; ++s) best = efficiency(s) > best ? efficiency(s) : best;
  for (int s = 1; s <= max_splits; ++s)
    if (efficiency(s) >= 0.95f * best) return s;
  return 1;
}

}  // namespace fa3::sm90

// fa3_jax Hopper: static persistent tile scheduler for the forward kernel.
//
// The grid is one CTA per SM. CTA c starts with tile c; then, with a counter in the workspace,
// each CTA takes the next unclaimed tile (grid + atomicAdd), which balances the uneven causal
// tiles far better than a fixed round-robin (max / mean CTA load at 16k tokens, causal, hdim 256:
// 1.82 round-robin, 1.01 dynamic); without a workspace it falls back to c + k * grid. Tiles are
// (m_block, head, batch). The (head, batch) pairs are cut into sections whose K/V fit in about
// half of L2 (an eighth for full attention at hdim 64, 128 and 256: fwd_l2_section_divisor);
// inside a section m_block varies slowest, so the CTAs running at one time share K/V in L2. With
// a band mask (causal) the query blocks with the most keys come first in each section
// (longest-processing-time order), so the short ones fill the tail.
// The sections are as equal as possible (sizes q and q + 1, the smaller ones first): a short last
// section (e.g. 32 pairs cut 6+6+6+6+6+2) puts its long causal tiles at the very end of the grid,
// where they run alone. ncu, H200, hdim 256 causal 4k, 16k tokens (32 pairs, sections of 6): SM
// active cycles 75% of elapsed (full: 95%); a simulation of the dynamic schedule (cost = key
// blocks + 1 per tile) gives 0.87 of ideal with the old cut, 0.97 balanced, across hdim 64-256 at
// 512-16k tokens of the bench (mean over 222 shapes: 0.966 -> 0.979). bench_attention.py, causal
// fa3_jax / cuDNN with this and the other 2026-11-22 (s6) forward changes: hdim 128 1k-4k
// 0.896 / 0.947 / 0.951 -> 0.964 / 0.986 / 0.988 (hdim 128's kernel is otherwise unchanged
// there), hdim 256 2k-8k 0.895 / 0.897 / 0.888 -> 0.920 / 0.956 / 0.957
// (benchmarks/measured/h200_2026-11-22s6t_fwdtile.txt).
//
// Claiming (flash_fwd_kernel_sm90.h): one scheduler thread per CTA claims tiles for its TMA
// thread and consumers through a 2-deep ring. Claimed as soon as a ring slot frees, a CTA holds
// two tiles beyond the one its consumers run; with causal tiles of very unequal length that
// broke the longest-first order at the end of the grid (ncu, H200, hdim 256 causal 8k, 2 x 8
// heads: SM active cycles avg 1.18M, min 0.87M, max 1.45M of 1.45M elapsed, 81%; full: 94%).
// Claimed only when the TMA thread has issued every load of the previous tile instead, on
// demand, the tail balances; but the claim's latency then shows on short tiles. Measured on H200
// (test_fwd_sm90 --time, bf16, 16k tokens, hidden 2048, two runs each, 2026-11-22,
// h200_2026-11-22s7f_claim.txt), eager -> on demand for every call, TFLOP/s at 512 / 1k / 2k /
// 4k / 8k / 16k:
//   hdim 256 causal 231 / 328 / 412 / 505 / 558 / 556 -> 254 / 375 / 490 / 609 / 657 / 668,
//                   231 / 333 / 415 / 518 / 547 / 543 -> 247 / 365 / 476 / 597 / 654 / 707;
//   hdim 256 full   681 / 689 -> 643 / 655 at 8k, the rest within 3%;
//   hdim 64 causal  184 / 263 / 345 / 399 / 464 / 467 -> 175 / 256 / 335 / 403 / 478 / 485,
//                   186 / 266 / 339 / 400 / 468 / 472 -> 179 / 260 / 346 / 401 / 470 / 487;
//   hdim 64 full    332 / 400 at 512 / 1k -> 317 / 378 (run 1), 335 / 400 -> 331 / 400 (run 2).
// What the eager claim can cost is about two of the longest tiles per CTA against the CTA's share
// of the work; with causal tiles (mean about half the longest) that is about 4 * CTAs / tiles:
// 50% with the bench's hdim 256 grids (1024 tiles on 132 SMs, 7.8 per CTA), 10-20% at hdim 64
// (21-31 per CTA), where the claim latency costs as much as it saves. So: on demand with a band
// (longest_first) and at most kClaimOnDemandMaxTilesPerCta tiles per CTA, eager otherwise and for
// split-KV / KV-cache calls (decode shapes: splits of one tile are equal, and those grids were
// not measured). The bench's hdim 128 causal grids (2048 tiles, 15.5 per CTA), eager -> on
// demand (test_fwd_sm90 --time, bf16, two runs, 2026-11-22, h200_2026-11-22s8f_fwdshort.txt,
// run 2), TFLOP/s at 512 / 1k / 2k / 4k / 8k / 16k: 258 / 357 / 437 / 514 / 552 / 563 -> 289 /
// 413 / 523 / 598 / 643 / 617, 255 / 347 / 448 / 510 / 556 / 562 -> 295 / 426 / 538 / 609 / 629
// / 608: hence 16 (hdim 64's 31 per CTA stays eager).
// Session 11 (test_fwd_sm90 --time --mask causal, each mask in its own process, three interleaved
// runs in one device call, 2026-11-22, h200_2026-11-22s11f_sched.txt), hdim 64 causal, eager ->
// on demand, TFLOP/s at 512 / 1k / 2k / 4k / 8k / 16k (512: 128-row tiles, 31 per CTA; 1k on:
// the 192-row tile, 21-23 per CTA):
//   199.2 / 288.3 / 385.4 / 447.1 / 461.0 / 475.6 -> 191.7 / 283.4 / 385.0 / 460.6 / 515.2 / 487.8,
//   198.2 / 286.1 / 384.3 / 441.8 / 495.0 / 473.5 -> 192.1 / 285.7 / 388.9 / 455.9 / 510.4 / 502.1,
//   195.4 / 283.4 / 381.3 / 446.3 / 498.1 / 474.7 -> 194.6 / 287.0 / 389.0 / 454.1 / 496.3 / 494.0:
// 2-4% from 2k at 21-23 per CTA, -2.5% at 512 with 31: hence 24.
// (Measuring note: in one test_fwd_sm90 process the causal row right after the full row of the
// same head dim ran up to 15% slower at hdim 256, 10% at hdim 64 at 512-1k, than in a process
// of its own: nvidia-smi showed the software power cap active. A/B runs of this driver compare
// only runs of the same order.)
//
// Split-KV (Flash-Decoding): with num_splits > 1 every (m_block, head, batch) tile becomes
// num_splits tiles, adjacent in tile order, each covering one contiguous range of the key blocks
// (split_n_range); their partial results meet in the combine kernel (flash_fwd_combine_sm90.h).
// num_splits comes from fwd_num_splits (tile_size.h).
#pragma once

#include <cutlass/cutlass.h>

namespace fa3::sm90 {

struct TileSchedulerParams {
  int num_m_blocks;
  int heads;
  int num_hb;      // heads * batch
  int group;       // (head, batch) pairs of each of the first small_sections L2 sections;
  int small_sections;  // the sections after them have group + 1 pairs
  int num_tiles;   // num_m_blocks * num_hb * num_splits
  bool longest_first;
  int num_splits;  // 1: each tile covers all its key blocks and writes out / lse itself
  bool claim_on_demand;  // "Claiming" above
};
inline constexpr int kClaimOnDemandMaxTilesPerCta = 24;

// L2 sections (above): each section's (head, batch) pairs pull at most l2_bytes / divisor of K/V
// through L2. 2 (half of L2) by default. Dense 16-bit calls without a band's upper edge (not
// longest_first: full attention) at hdim 64, 128 and 256 take 8: at hdim 128 the Q reads and O
// writes streaming through L2 beside half of L2 of K/V evicted K/V before its last m_block read
// it. Measured on H200
// (test_fwd_sm90 --time, bf16, hdim 128, 16k tokens, hidden 2048, clocks not pinned, one device
// call, two runs each, 2026-11-22, benchmarks/measured/h200_2026-11-22s10f_l2_sections.txt),
// mean TFLOP/s at 512 / 1k / 2k / 4k / 8k / 16k, divisor 2 -> 4 -> 8 -> 16:
//   full   472 / 559 / 618 / 607 / 617 / 632 -> 480 / 572 / 627 / 626 / 656 / 636 ->
//          483 / 572 / 633 / 641 / 673 / 634 -> 483 / 575 / 632 / 623 / 654 / 636
//          (8k / 16k: the 128 x 176 large tile);
//   causal 266 / 378 / 480 / 556 / 604 / 635 -> 270 / 379 / 472 / 572 / 606 / 620 ->
//          269 / 372 / 455 / 554 / 596 / 618 -> 265 / 369 / 457 / 539 / 594 / 632
//          (longest-first order works within a section: smaller ones balance worse).
//   ncu, full 1k: L2 hit rate 54% -> 73%, DRAM 1.80 -> 1.10 TB/s, 244.1 -> 237.9 us (2 -> 8).
//   Bench beside cuDNN (h200_2026-11-22s10f_bench_fwd128.txt), full fa3_jax / cuDNN 0.924 /
//   0.946 / 0.965 / 0.983 / 1.010 / 1.029 (main) -> 0.939 / 0.959 / 0.992 / 1.005 / 1.027 / 1.038.
// Session 11 (as in "Claiming" above: one mask per process, three interleaved runs,
// h200_2026-11-22s11f_sched.txt), divisor 2 -> 8, full:
//   hdim 256 447.8 / 587.1 / 666.0 / 695.3 / 688.3 / 676.8 -> 465.2 / 599.8 / 682.8 / 731.8 /
//            682.3 / 679.3, 449.5 / 587.1 / 661.2 / 655.7 / 683.0 / 686.2 -> 455.0 / 590.4 /
//            675.6 / 704.8 / 673.1 / 682.2, 449.2 / 586.7 / 667.0 / 699.7 / 694.4 / 677.6 ->
//            463.7 / 600.4 / 681.8 / 682.4 / 707.9 / 685.2 (+2-3% at 512-2k);
//            ncu, full 1k: L2 hit rate 57% -> 69%, DRAM reads 365 -> 231 MB, 230.3 -> 225.0 us;
//   hdim 64 (192-row tile at 512, tile_size.h) 347.8 / 418.9 / 479.3 / 480.5 / 495.7 / 504.8 ->
//            354.7 / 424.6 / 486.2 / 508.4 / 505.9 / 509.2, 346.0 / 419.7 / 487.0 / 476.3 /
//            497.1 / 501.0 -> 345.3 / 420.4 / 487.9 / 518.4 / 514.6 / 504.3, 351.6 / 423.6 /
//            489.9 / 487.6 / 498.8 / 498.3 -> 347.2 / 417.4 / 483.5 / 517.4 / 508.0 / 507.6
//            (within noise to 2k, +1-3% at 8k-16k); ncu, full 1k: L2 hit rate 59% -> 67%, DRAM
//            reads 264 -> 201 MB, 321.4 -> 320.8 us.
//   Causal at both (two runs, both masks in one process, div 2 / 4 / 8 / 16): smaller sections
//   lost 3-11% at 2k-16k, as at hdim 128.
// Other head dims, FP8, varlen / segment / split-KV calls are not measured: 2.
constexpr int fwd_l2_section_divisor(int head_dim, bool fp8, bool located, bool longest_first) {
  bool const measured = head_dim == 64 || head_dim == 128 || head_dim == 256;
  return measured && !fp8 && !located && !longest_first ? 8 : 2;
}

struct TileCoord {
  int m_block, head, batch;
  int split;  // 0 when num_splits == 1
};

CUTLASS_HOST_DEVICE TileCoord decode_tile(TileSchedulerParams const& p, int tile) {
  int split = 0;
  if (p.num_splits > 1) {  // the splits of one tile are neighbours: they share Q and run together
    int const whole = tile / p.num_splits;
    split = tile - whole * p.num_splits;
    tile = whole;
  }
  int const small_tiles = p.small_sections * p.group * p.num_m_blocks;
  int const big = tile >= small_tiles;
  int const g = p.group + big;
  int const rest = tile - (big ? small_tiles : 0);
  int const section = rest / (g * p.num_m_blocks);
  int const r = rest - section * (g * p.num_m_blocks);
  int const hb_first = (big ? p.small_sections * p.group : 0) + section * g;
  int const m_idx = r / g;
  int const hb = hb_first + (r - m_idx * g);
  TileCoord t;
  t.m_block = p.longest_first ? p.num_m_blocks - 1 - m_idx : m_idx;
  t.batch = hb / p.heads;
  t.head = hb - t.batch * p.heads;
  t.split = split;
  return t;
}

// Cuts num_hb pairs into ceil(num_hb / max_group) sections as equal as possible.
inline void set_sections(TileSchedulerParams& p, int max_group) {
  int const sections = (p.num_hb + max_group - 1) / max_group;
  p.group = p.num_hb / sections;
  p.small_sections = sections - (p.num_hb - p.group * sections);
}

// Narrows a tile's key blocks [n_min, n_max) to those of its split: num_splits near-equal
// contiguous ranges; a split past the end gets an empty range (n_max <= n_min).
CUTLASS_HOST_DEVICE void split_n_range(TileSchedulerParams const& p, TileCoord t, int& n_min,
                                       int& n_max) {
  if (p.num_splits <= 1) return;
  int const per_split = (n_max - n_min + p.num_splits - 1) / p.num_splits;
  n_min += t.split * per_split;
  n_max = min(n_max, n_min + per_split);
}

// Called by the producer thread only; the consumers learn the tile through shared memory.
CUTLASS_DEVICE int next_tile(int* tile_counter, int tile) {
  return tile_counter ? atomicAdd(tile_counter, 1) + int(gridDim.x) : tile + int(gridDim.x);
}

}  // namespace fa3::sm90

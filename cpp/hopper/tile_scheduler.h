// fa3_jax Hopper: static persistent tile scheduler for the forward kernel.
//
// The grid is one CTA per SM. CTA c starts with tile c; then, with a counter in the workspace,
// each CTA takes the next unclaimed tile (grid + atomicAdd), which balances the uneven causal
// tiles far better than a fixed round-robin (max / mean CTA load at 16k tokens, causal, hdim 256:
// 1.82 round-robin, 1.01 dynamic); without a workspace it falls back to c + k * grid. Tiles are
// (m_block, head, batch). The (head, batch) pairs are cut into sections whose K/V fit in about
// half of L2; inside a section m_block varies slowest, so the CTAs running at one time share K/V
// in L2. With a band mask (causal) the query blocks with the most keys come first in each
// section (longest-processing-time order), so the short ones fill the tail.
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
};

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

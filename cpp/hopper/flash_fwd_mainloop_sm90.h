// fa3_jax Hopper forward mainloop: the producer's TMA loads and the consumers' WGMMAs with the
// online softmax, for one (m_block, head, batch) tile.
//
// Producer (one thread of warp 0; split-KV: warp 0): Q once per tile on its own barrier, then K
// and V through two rings of kStages slots, in exactly the order the consumers need them:
// K[n_max-1], then (K[n-1], V[n]) pairs, then V[n_min]. Split-KV on a paged cache read in
// 16-row boxes (Params::v_warp): warp 0 loads Q and K, warp 2 V; with Params::k_warp warp 0
// issues the lower half of K's boxes and warp 3 the upper half. FP8 at head dim 128
// (Traits::kVtInKernel): V goes into a staging ring instead, and producer warps 2-3 transpose
// each tile into the V ring the consumers read (transpose_v).
// Consumers (two or three warpgroups, 64 query rows each): intra-warpgroup overlap as in FA3 — the
// S = Q K[n]^T WGMMA of the next block and O += P V[n+1] of the current one are issued
// together, and the softmax of the next block runs while P V is still on the tensor cores.
// Pingpong: the warpgroups take turns issuing WGMMAs (named barriers), so one's softmax
// runs under the other's matrix work. Pingpong and where O is rescaled are per head dim and
// tile height (tile_size.h, fwd_schedule).
#pragma once

#include "flash_fwd_traits_sm90.h"
#include "named_barrier.h"
#include "softmax.h"
#include "utils.h"

namespace fa3::sm90 {

template <class Traits>
struct FwdMainloop {
  using Element = typename Traits::Element;
  using Params = typename Traits::Params;
  using SharedStorage = typename Traits::SharedStorage;
  using PipelineK = typename Traits::PipelineK;
  using PipelineV = typename Traits::PipelineV;
  using PipelineState = typename Traits::PipelineState;
  using ShapeQKV = typename Traits::ShapeQKV;
  static constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;

  // What a producer warp loads (role): Q, K and V; with Params::v_warp, warp 0 Q and K and
  // warp 2 V.
  // With Params::k_warp, warp 0 Q and the lower half of K's boxes, warp 3 the upper half
  // (kLoadKHi).
  static constexpr int kLoadAll = 0, kLoadQK = 1, kLoadV = 2, kLoadKHi = 3;

  // Called by the producer: thread 0, or warp 0 (Traits::kProducerWarp; with Params::v_warp
  // also warp 2). q_tile_count: non-empty tiles this CTA loaded before.
  // offset_q / offset_k: first row of the tile's sequence in its batch row (0 when dense). Rows
  // past the sequence's end load the next sequence's rows or TMA's zero fill; the mask and the
  // epilogue's row bounds keep them out of every result.
  static CUTLASS_DEVICE void load(Params const& p, SharedStorage& ss, PipelineK& pipe_k,
                                  PipelineV& pipe_v, PipelineState& write, int q_tile_count,
                                  TileCoord t, int offset_q, int offset_k, int n_min, int n_max,
                                  int role = kLoadAll) {
    int const q_buf = Traits::q_buffer(q_tile_count);
    Tensor sQ = make_tensor(make_smem_ptr(Traits::smem_q(ss, q_buf)),
                            typename Traits::SmemLayoutQ{});  // (M, D)
    Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutK{});  // (N, D, PIPE)
    // (N, Dv, PIPE); FP8: (Dv, N, PIPE)
    Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Traits::SmemLayoutVLoad{});

    int const h_kv = t.head / p.qheads_per_kvhead;
    Tensor mQ = domain_offset(make_coord(offset_q, _0{}),
                              p.tma_q.get_tma_tensor(p.shape_q)(_, _, t.head, t.batch));  // (Sq, D)
    Tensor mK = domain_offset(make_coord(offset_k, _0{}),
                              p.tma_k.get_tma_tensor(p.shape_k)(_, _, h_kv, t.batch));  // (Sk, D)
    // (Sk, Dv); FP8 without kVtInKernel: vt (Dv, Sk), dense only (offset_k 0)
    Tensor mV = domain_offset(make_coord(Traits::kLoadVt ? 0 : offset_k, _0{}),
                              p.tma_v.get_tma_tensor(p.shape_v)(_, _, h_kv, t.batch));
    Tensor gQ = local_tile(mQ, select<0, 2>(typename Traits::TileShapeQK{}),
                           make_coord(t.m_block, _0{}));  // (M, D)
    Tensor gK = local_tile(mK, select<1, 2>(typename Traits::TileShapeQK{}),
                           make_coord(_, _0{}));  // (N, D, n_blocks)
    Tensor gV = [&] {  // (N, Dv, n_blocks); vt: (Dv, N, n_blocks)
      if constexpr (Traits::kLoadVt)
        return local_tile(mV, typename Traits::TileShapeVLoad{}, make_coord(_0{}, _));
      else
        return local_tile(mV, typename Traits::TileShapeVLoad{}, make_coord(_, _0{}));
    }();

    auto [tQgQ, tQsQ] = tma_partition(p.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ),
                                      group_modes<0, 2>(gQ));
    auto tK = tma_partition(p.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK),
                            group_modes<0, 2>(gK));
    auto tV = tma_partition(p.tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(sV),
                            group_modes<0, 2>(gV));
    Tensor tKgK = get<0>(tK);  // (TMA, n_blocks)
    Tensor tKsK = get<1>(tK);  // (TMA, PIPE)
    Tensor tVgV = get<0>(tV);  // (TMA, n_blocks)
    Tensor tVsV = get<1>(tV);  // (TMA, PIPE)

    // kProducerWarp: every lane of warp 0 runs this function; lane 0 (the leader) issues every
    // load but the page boxes and arrives on the barriers, the other lanes only keep the same
    // pipeline state. Otherwise thread 0 alone runs it.
    bool const leader = !Traits::kProducerWarp || cutlass::canonical_lane_idx() == 0;

    // Paged K/V (kSplit only; flash.h, "Paged"). Pages of whole key blocks: block n is block
    // n % page_blocks of the page the table names. Smaller pages: the pool is seen as boxes of
    // `box_rows` rows (kPageRowsLarge where page_size is a multiple of it, else kPageRows; the
    // host's tma_*_page descriptors are the same view), box page * (page_size / box_rows) + i
    // holding rows [i * box_rows, (i + 1) * box_rows) of page `page`; a key block is kBlockN /
    // box_rows boxes, lane r of the producer warp naming box r. A page index outside the pool
    // becomes num_pages, which names pages or boxes wholly outside the tensor: the TMA unit
    // fills them with zeros (flash.h: such pages read as zeros); so do boxes past the row's last
    // page (the last block of a capacity that is no multiple of kBlockN).
    int const lane = cutlass::canonical_lane_idx();
    bool const paged = Traits::kSplit && p.page_table != nullptr;
    int const num_pages = get<3>(p.shape_k);
    bool const large_boxes = p.page_size % Traits::kPageRowsLarge == 0;
    int const box_rows = large_boxes ? Traits::kPageRowsLarge : Traits::kPageRows;
    int const box_shift = large_boxes ? cute::log_2(unsigned(Traits::kPageRowsLarge))
                                      : cute::log_2(unsigned(Traits::kPageRows));
    int const boxes_per_page = paged && p.page_blocks == 0 ? p.page_size >> box_shift : 0;
    auto page_at = [&](int index) {
      if (index >= p.page_table_stride) return num_pages;
      int const page = __ldg(p.page_table + int64_t(t.batch) * p.page_table_stride + index);
      return page >= 0 && page < num_pages ? page : num_pages;
    };
    // Where key block n comes from, this lane's part: the page (whole-block pages), the box of
    // lane r (smaller pages; lanes past the block's boxes: 0, unused), 0 (contiguous).
    // This warp's boxes of a block: [box_lo, box_hi) (k_warp splits K's boxes between warps 0
    // and 3 at the half, rounded up; box indices past a block's end are unused).
    int const half_boxes = (kBlockN / Traits::kPageRows + 1) / 2;
    bool const k_warp = Traits::kPagedKWarp && p.k_warp;
    int const box_lo = k_warp && role == kLoadKHi ? half_boxes : 0;
    int const box_hi = k_warp && role == kLoadQK ? half_boxes : 32;
    auto where = [&](int n) {
      if constexpr (!Traits::kSplit) return 0;
      if (!paged) return 0;
      if (p.page_blocks > 0) return page_at(n / p.page_blocks);
      int const r = lane + box_lo;
      if (r * box_rows >= kBlockN || r >= box_hi) return 0;
      int const key = n * kBlockN + r * box_rows;
      int const index = key / p.page_size;
      return page_at(index) * boxes_per_page + ((key - index * p.page_size) >> box_shift);
    };
    // Key block n as kBlockN / rows boxes of `rows` rows (tma_page: its descriptor over the
    // pool's boxes), lane r issuing box r (the index `box` it holds) after the leader's
    // expect_tx.
    auto load_boxes = [&](auto rows, auto const& tma_page, auto dim, auto const& sX, int slot,
                          int box, uint64_t* bar) {
      constexpr int kRows = decltype(rows)::value;
      using Box = Shape<Int<kRows>, decltype(size<1>(sX))>;  // (kRows, D)
      constexpr int kBoxes = kBlockN / kRows;
      static_assert(kBoxes <= 32, "one box per lane of the producer warp");
      Tensor s_boxes = local_tile(sX(_, _, slot), Box{}, make_coord(_, _0{}));  // (kRows, D, kBoxes)
      constexpr int kDim = decltype(dim)::value;
      Tensor pool = tma_page.get_tma_tensor(
          ShapeQKV(kRows, kDim, get<2>(p.shape_k), num_pages * boxes_per_page));
      auto issue = [&](int r, int b) {
        Tensor g = local_tile(pool(_, _, h_kv, b), Box{}, make_coord(_, _0{}));  // (kRows, D, 1)
        auto [tg, ts] = tma_partition(tma_page, _0{}, Layout<_1>{}, group_modes<0, 2>(s_boxes),
                                      group_modes<0, 2>(g));
        copy(tma_page.with(*bar, 0), tg(_, 0), ts(_, r));
      };
      __syncwarp();  // the leader's expect_tx first (another warp's boxes may complete first:
                     // the barrier's phase also waits for the leader's arrive)
      if (lane + box_lo < kBoxes && lane + box_lo < box_hi) issue(lane + box_lo, box);
    };
    // One key block of K or V (tma, tile: its (N, D) block shape; sX: its whole ring; slot;
    // src: where(n)) on barrier bar: contiguous, one TMA load of the block; pages of whole
    // blocks, one TMA load from the block's page; smaller pages, boxes (load_boxes).
    auto load_block = [&](auto const& tma, auto const& tma_page, auto const& tma_page_large,
                          auto dim, auto const& shape, auto const& tile, auto const& sX,
                          auto const& tXgX, auto const& tXsX, int slot, int n, int src,
                          uint64_t* bar) {
      if constexpr (Traits::kSplit) {
        if (paged && p.page_blocks == 0) {
          if (large_boxes)
            load_boxes(Int<Traits::kPageRowsLarge>{}, tma_page_large, dim, sX, slot, src, bar);
          else
            load_boxes(Int<Traits::kPageRows>{}, tma_page, dim, sX, slot, src, bar);
          return;
        }
        if (paged) {
          if (leader) {
            Tensor g = local_tile(tma.get_tma_tensor(shape)(_, _, h_kv, src), tile,
                                  make_coord(_, _0{}));  // (N, D, page_blocks)
            auto tp = tma_partition(tma, _0{}, Layout<_1>{}, group_modes<0, 2>(sX),
                                    group_modes<0, 2>(g));
            copy(tma.with(*bar, 0), get<0>(tp)(_, n % p.page_blocks), tXsX(_, slot));
          }
          return;
        }
      }
      if (leader) copy(tma.with(*bar, 0), tXgX(_, n), tXsX(_, slot));
    };
    // src: where(n), looked up before the slot wait (below).
    auto load_k = [&](int n, int src) {
      pipe_k.producer_acquire(write);
      load_block(p.tma_k, p.tma_k_page, p.tma_k_page_large, Int<Traits::kHeadDim>{},
                 p.shape_k, select<1, 2>(typename Traits::TileShapeQK{}), sK, tKgK, tKsK,
                 write.index(), n, src, pipe_k.producer_get_barrier(write));
    };
    // V of block n into slot `st` of the V ring; with kVtInKernel (FP8, dense: thread 0 only)
    // of the staging ring, which transpose_v reads.
    auto load_v = [&](PipelineState const& st, int n, int src) {
      if constexpr (Traits::kVtInKernel) {
        ss.v_load_empty[st.index()].wait(st.phase());
        ss.v_load_full[st.index()].arrive_and_expect_tx(Traits::kBytesV);
        copy(p.tma_v.with(reinterpret_cast<uint64_t&>(ss.v_load_full[st.index()]), 0),
             tVgV(_, n), tVsV(_, st.index()));
        return;
      }
      pipe_v.producer_acquire(st);
      load_block(p.tma_v, p.tma_v_page, p.tma_v_page_large, Int<Traits::kHeadDimV>{},
                 p.shape_v, typename Traits::TileShapeVLoad{}, sV, tVgV, tVsV, st.index(), n,
                 src, pipe_v.producer_get_barrier(st));
    };
    // V of block n goes to the slot K of block n used, one step behind `write`; deriving that
    // state instead of keeping a second one saves registers (the producer has only 24).
    auto load_v_prev = [&](int n, int src) {
      bool const wrap = write.index() == 0;
      PipelineState const st(wrap ? Traits::kStages - 1 : write.index() - 1,
                             wrap ? write.phase() ^ 1 : write.phase(), 0);
      load_v(st, n, src);
    };
    // Block n - 1's source (where: a page-table load when paged) is looked up before block n's
    // slot wait, so that the load's latency passes while the producer waits, not after it:
    // the producer's time from a slot's release to its TMA issue adds to every block's
    // round trip (tile_size.h, kFwdPageRows).

    // The single-tensor roles: each block n_max - 1 .. n_min in turn, its source looked up one
    // block ahead, one ring slot each (this warp's own ring state).
    auto each_block = [&](auto&& load_one) {
      int src_next = where(n_max - 1);
      for (int n = n_max - 1; n >= n_min; --n) {
        int const src = src_next;
        if (n - 1 >= n_min) src_next = where(n - 1);
        load_one(n, src);
        ++write;
      }
    };
    // role kLoadV (Params::v_warp, warp 2): V alone, in block order (the same slot sequence as
    // K's, which warp 0 loads with Q: kLoadQK).
    if (role == kLoadV) {
      each_block([&](int n, int src) { load_v(write, n, src); });
      return;
    }
    // role kLoadKHi (Params::k_warp, warp 3): the upper half of K's boxes, in block order.
    if (Traits::kPagedKWarp && role == kLoadKHi) {
      each_block(load_k);
      return;
    }

    // The Q this buffer held (kQStages tiles ago) must be dead (its last S WGMMA retired)
    // before it is overwritten.
    auto load_q = [&] {
      if (q_tile_count >= Traits::kQStages)
        ss.q_empty[q_buf].wait(Traits::q_phase(q_tile_count) ^ 1);
      if (leader) {
        ss.q_full[q_buf].arrive_and_expect_tx(Traits::kBytesQ);
        copy(p.tma_q.with(reinterpret_cast<uint64_t&>(ss.q_full[q_buf]), 0), tQgQ, tQsQ);
      }
    };
    // 16-bit dense, varlen and segment tiles: the tile's first K goes out before the wait for
    // its Q buffer (FA3's order). Its ring slot is free long before the previous tile's last S
    // WGMMA retires, which that wait is for, so K is in shared memory when Q lands rather than
    // a load latency after it (tile_size.h, "Tile boundaries"). FP8 keeps Q first (its K-first
    // variant was within spread: tile_size.h, fwd_fp8_transpose_v_in_kernel) and split-KV (one
    // tile per CTA in decode) its own order.
    constexpr bool kKBeforeQ = !Traits::kSplit && !Traits::kFp8;
    if (!kKBeforeQ || role == kLoadQK) load_q();

    if (role == kLoadQK) {
      each_block(load_k);
      return;
    }

    // Both rings advance once per block; V runs one block behind K, matching the consumers,
    // and takes K's source of the same block.
    int src_v = where(n_max - 1);
    load_k(n_max - 1, src_v);
    if constexpr (kKBeforeQ) load_q();
    int src_next = n_max - 2 >= n_min ? where(n_max - 2) : 0;
    ++write;
    // FP8: vt comes from the transpose kernel this one may overlap (programmatic dependent
    // launch, flash_fwd_launch_template_sm90.h): its writes are complete and visible past this
    // wait. Q and K (and the first S) need not wait. A no-op without a programmatic launch, and
    // on every tile but the CTA's first (the transpose has finished by then); waiting only on
    // the first tile cost the hdim 256 producer (24 registers) 36 more bytes of spill stores
    // (220 against 184).
    if constexpr (Traits::kLoadVt) asm volatile("griddepcontrol.wait;" ::: "memory");
    // kOAliasesV: the previous tile's O is in the V ring until its TMA stores have read it.
    if constexpr (Traits::kOAliasesV) {
      if (q_tile_count > 0) ss.o_free.wait((q_tile_count - 1) & 1);
    }
    for (int n = n_max - 2; n >= n_min; --n) {
      int const src_k = src_next;
      if (n - 1 >= n_min) src_next = where(n - 1);
      load_k(n, src_k);
      load_v_prev(n + 1, src_v);
      src_v = src_k;
      ++write;
    }
    load_v_prev(n_min, src_v);
  }

  // kVtInKernel, the TMA thread once no tile is left: the staging slot after the last V tile is
  // marked done (its v_done barrier's first phase completes) and arrived on without a load,
  // which ends transpose_v. `write`: the producer's state after its last tile, whose next V slot
  // is write's (V runs one block behind K). Per slot: the transposers may still be slots behind
  // when the producer finishes, and must stop at this slot only. The mark is a barrier phase
  // rather than a flag in shared memory: the flag's read and its write were ordered only by a
  // named barrier and one thread's mbarrier arrive, which compute-sanitizer's racecheck reported
  // as a hazard (session 12, small_case_fp8.py).
  static CUTLASS_DEVICE void finish_v(SharedStorage& ss, PipelineState const& write) {
    ss.v_load_empty[write.index()].wait(write.phase());
    ss.v_done[write.index()].arrive();
    ss.v_load_full[write.index()].arrive();
  }

  // kVtInKernel: producer warps 2-3 (tidx 0..63) move each row-major V tile of the staging ring
  // (ss.v, (N, Dv)) into the (Dv, N) ring the P @ V WGMMA reads (smem_vt, pipe_v), keys contiguous
  // and each aligned group of 16 in fp8_vt_sm90.h's order (vt_key_in_group: positions 4a .. 4a + 3
  // hold keys 2a, 2a + 1, 2a + 8, 2a + 9), as the vt kernel writes it.
  // One unit is 16 keys x 32 columns: one LDSM.T.x4 (the 8 x 8 16-bit matrices keys 0-7 / 8-15 x
  // columns 0-15 / 16-31: lane t gets keys 2a, 2a + 1 (a = t % 4) of the column pair 2b, 2b + 1
  // (b = t / 4) per matrix), two byte permutes per column pair (column 2b: keys 2a, 2a + 1, 2a + 8,
  // 2a + 9, the 4 bytes at positions 4a of vt row 2b), one STSM.x4 (row b of a matrix: 4 bytes
  // from each of lanes 4b .. 4b + 3). Lanes with b >= 4 swap their two column words so that the
  // rows of one STSM matrix are columns 0, 2, 4, 6, 9, 11, 13, 15 (or the other eight): distinct
  // 16-byte bank groups in vt's 128-byte swizzle. The LDSM rows (8 consecutive keys) are too.
  static CUTLASS_DEVICE void transpose_v(SharedStorage& ss, int tidx) {
    // Addresses straight from the 128-byte swizzle (Swizzle<3, 4, 3> on 8 x 128-byte atoms
    // stacked by rows: byte (r, c) of a stage at 128 r + 16 ((c / 16) ^ (r % 8)) + c % 16), so that
    // each LDSM / STSM costs at most one LOP3: the first version indexed the CuTe tensors per
    // unit, ~100 instructions per unit on the schedulers the consumer warps share, and ran hdim
    // 128 full 4k at 0.68x. The check (test_fwd_sm90 --check-fp8) fails if the layout differs.
    static_assert(kBlockN == 128 && Traits::kHeadDimV == 128,
                  "128-byte rows in both rings (the addressing below)");
    constexpr int kGroups = kBlockN / 16, kStageBytes = kBlockN * Traits::kHeadDimV;
    constexpr int kWarps = 2, kColBlocks = Traits::kHeadDimV / 32 / kWarps;  // per warp
    int const lane = tidx % 32, warp = tidx / 32;
    int const m = lane / 8, i = lane % 8;
    int const ld_key = 8 * (m % 2) + i;                                   // this lane's LDSM row
    int const st_col = 16 * (m / 2) + 2 * i + ((m % 2) ^ int(i >= 4));  // its STSM row (vt row)
    // Column block cb (this warp's kColBlocks), key group g, stage s: LDSM at (ld_base ^ 32 cb) +
    // s * stage + 2048 g (chunk (2 cb + m / 2) ^ i), STSM at (st_base + s * stage + 4096 cb) ^ 16 g
    // (chunk g ^ row % 8).
    uint32_t const ld_base = cute::cast_smem_ptr_to_uint(ss.v.data()) + 128 * ld_key +
                             16 * ((m / 2) ^ i);
    uint32_t const st_base = cute::cast_smem_ptr_to_uint(Traits::smem_vt(ss)) + 128 * st_col +
                             16 * (st_col % 8) + 4096 * kColBlocks * warp;
    uint32_t const sel0 = lane / 4 < 4 ? 0x6420u : 0x7531u, sel1 = sel0 ^ 0x1111u;
    PipelineState read;  // staging ring as consumer; the vt ring's empty barrier one phase off
    for (;;) {
      int const slot = read.index();
      ss.v_load_full[slot].wait(read.phase());
      if (ss.v_done[slot].test_wait(0)) break;  // finish_v's mark, set before v_load_full's arrive
      ss.pipe_v.empty_barrier_[slot].wait(read.phase() ^ 1);
      CUTLASS_PRAGMA_UNROLL
      for (int cb = 0; cb < kColBlocks; ++cb) {
        uint32_t const ld = (ld_base ^ (32u * (kColBlocks * warp + cb))) + slot * kStageBytes;
        uint32_t const st = st_base + slot * kStageBytes + 4096 * cb;
        CUTLASS_PRAGMA_UNROLL
        for (int g0 = 0; g0 < kGroups; g0 += 4) {
          uint32_t r[4][4];
          CUTLASS_PRAGMA_UNROLL
          for (int j = 0; j < 4; ++j)
            asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                         : "=r"(r[j][0]), "=r"(r[j][1]), "=r"(r[j][2]), "=r"(r[j][3])
                         : "r"(ld + 2048 * (g0 + j)));
          CUTLASS_PRAGMA_UNROLL
          for (int j = 0; j < 4; ++j)
            asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n"
                         :: "r"(st ^ (16u * (g0 + j))), "r"(__byte_perm(r[j][0], r[j][1], sel0)),
                            "r"(__byte_perm(r[j][0], r[j][1], sel1)),
                            "r"(__byte_perm(r[j][2], r[j][3], sel0)),
                            "r"(__byte_perm(r[j][2], r[j][3], sel1))
                         : "memory");
        }
      }
      cutlass::arch::fence_view_async_shared();  // the STSMs visible to the WGMMAs (async proxy)
      named_barrier_sync(kWarps * 32, FwdNamedBarrier::TransposeV);
      if (tidx == 0) {
        ss.v_load_empty[slot].arrive();
        ss.pipe_v.full_barrier_[slot].arrive();
      }
      ++read;
    }
  }

  // Consumer side for one tile. tOrO: output accumulator (cleared here); lse: per-row LSE out;
  // mask: the tile's band (Params::locate).
  // Traits::kDeferEpilogue: prev_epilogue() stores the previous tile's O (still in tOrO) once
  // this tile's first S WGMMA is issued, so the store runs under it; then O is cleared.
  template <class TensorO, class Mask, class PrevEpilogue>
  static CUTLASS_DEVICE void mma(Params const& p, SharedStorage& ss, PipelineK& pipe_k,
                                 PipelineV& pipe_v, PipelineState& read, int q_tile_count,
                                 TileCoord t, Mask const& mask, int n_min, int n_max, int mma_tidx,
                                 TensorO& tOrO, cute::array<float, 2>& lse,
                                 PrevEpilogue&& prev_epilogue) {
    int const q_buf = Traits::q_buffer(q_tile_count);
    Tensor sQ = make_tensor(make_smem_ptr(Traits::smem_q(ss, q_buf)),
                            typename Traits::SmemLayoutQ{});  // (M, D)
    Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutK{});   // (N, D, PIPE)
    Tensor sVt = make_tensor(make_smem_ptr(Traits::smem_vt(ss)),
                             typename Traits::SmemLayoutVt{});  // (Dv, N, PIPE)

    typename Traits::TiledMmaQK mma_qk;
    typename Traits::TiledMmaPV mma_pv;
    auto thr_qk = mma_qk.get_slice(mma_tidx);
    auto thr_pv = mma_pv.get_slice(mma_tidx);
    Tensor tSrQ = thr_qk.partition_fragment_A(sQ);   // (MMA, MMA_M, MMA_K)
    Tensor tSrK = thr_qk.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K, PIPE)
    Tensor tOrV = thr_pv.partition_fragment_B(sVt);  // (MMA, MMA_N, MMA_K, PIPE)
    Tensor tSrS = partition_fragment_C(mma_qk, select<0, 1>(typename Traits::TileShapeQK{}));
    // P as the A operand of P @ V: 16-bit, the accumulator's registers seen with another layout;
    // FP8, a compact e4m3 fragment ((4, 2, 2), 1, k blocks of 32) that convert_p_to_e4m3 fills.
    Tensor tOrP = [&] {
      if constexpr (Traits::kFp8)
        return make_tensor<Element>(
            Layout<Shape<Shape<_4, _2, _2>, _1, Int<kBlockN / 32>>>{});
      else
        return make_tensor<Element>(acc_as_a_operand(tSrS.layout()));
    }();
    auto convert_p = [&] {
      if constexpr (Traits::kFp8)
        convert_p_to_e4m3(tSrS, tOrP);
      else
        convert_fragment(tSrS, tOrP);
    };
    AccCoord const coord(mma_tidx);

    // FP8 descales (flash.h, "FP8"): the tile's q (and per-tensor k) descale folds into the
    // softmax scale; a per-block k descale scales the block's scores inside the softmax step
    // (its max once, then the exponent's FMA; with a softcap, each score before the tanh); v
    // descales scale O: O is kept in units of the pending block's v descale, the ratio between
    // consecutive blocks folds into the O rescale, the last block's into the final 1 / row sum.
    // The per-block descales of block n - 1 are loaded while block n computes, so that no
    // step waits on a load.
    float qk_descale = 1.f;
    float const* descale_k_row = nullptr;  // per-block k descales of this (batch, kv head)
    float const* descale_v_row = nullptr;  // per-block v descales; per tensor: the one value
    if constexpr (Traits::kFp8) {
      int const hkv = get<2>(p.shape_k);
      int64_t const bh_kv = int64_t(t.batch) * hkv + t.head / p.qheads_per_kvhead;
      if (p.descale_nk > 0) {
        qk_descale =
            p.descale_q[(int64_t(t.batch) * (hkv * p.qheads_per_kvhead) + t.head) * p.descale_nq +
                        t.m_block];
        descale_k_row = p.descale_k + bh_kv * p.descale_nk;
        descale_v_row = p.descale_v + bh_kv * p.descale_nk;
      } else {
        qk_descale = p.descale_q[bh_kv] * p.descale_k[bh_kv];
        descale_v_row = p.descale_v + bh_kv;
      }
    }
    bool const per_block = Traits::kFp8 && p.descale_nk > 0;
    float const softcap_pre = Traits::kFp8 ? p.softcap_pre * qk_descale : p.softcap_pre;

    int const wg = mma_tidx / 128;
    // Pingpong turns go round the warpgroups: 0, 1 (, 2), 0, ...
    auto scheduler_sync = [&] {
      if constexpr (Traits::kPingpong) named_barrier_sync(2 * 128, fwd_scheduler_barrier(wg));
    };
    auto scheduler_arrive = [&] {
      if constexpr (Traits::kPingpong)
        named_barrier_arrive(2 * 128, fwd_scheduler_barrier(
                                          wg + 1 == Traits::kNumMmaWarpGroups ? 0 : wg + 1));
    };
    // Block n's k and v descales (1 unless per block), and the next block's, already loading.
    float dk_blk = 1.f, dv_blk = 1.f, dk_next = 1.f, dv_next = 1.f;
    auto load_descales = [&](int n) {  // n >= n_min - 1; below n_min nothing is needed
      if (per_block && n >= n_min) {
        dk_next = descale_k_row[n];
        dv_next = descale_v_row[n];
      }
    };
    auto advance_descales = [&] {
      dk_blk = dk_next;
      dv_blk = dv_next;
    };
    // in_loop: a block of the key-block loop (not the first, peeled block); with
    // kLoopMaskBothEdges it compares both band edges (tile_size.h, fwd_loop_mask_both_edges).
    auto score_mod = [&](int n, auto in_loop) {
      if (per_block && p.has_softcap) {
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(tSrS); ++i) tSrS(i) *= dk_blk;
      }
      if (p.has_softcap) {
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(tSrS); ++i) tSrS(i) = fast_tanh(tSrS(i) * softcap_pre);
      }
      if (mask.needs_mask(t.m_block, n)) {
        if constexpr (Traits::kLoopMaskBothEdges && decltype(in_loop)::value)
          mask.template apply_edges<true>(tSrS, coord, t.m_block, n);
        else
          mask.apply(tSrS, coord, t.m_block, n);
      }
    };

    // FP8: rescales skipped where no row max grew, 4 reduction chains per row (softmax.h, step).
    constexpr int kChains = Traits::kFp8 ? 4 : 1;
    OnlineSoftmax<2> softmax(Traits::kFp8 && !p.has_softcap ? p.scale_log2 * qk_descale
                                                            : p.scale_log2);
    auto take_o = [&] {  // O free for this tile
      if constexpr (Traits::kDeferEpilogue) prev_epilogue();
      clear(tOrO);
    };
    if constexpr (!Traits::kDeferEpilogue) take_o();
    ss.q_full[q_buf].wait(Traits::q_phase(q_tile_count));

    int n = n_max - 1;
    // kWarpGroupBand (three consumer warpgroups, dense: the 192-row tile): with a band's upper
    // edge, the tile's last key block may hold no key that this warpgroup's 64 rows see (at
    // 192 x 128, rows up to 128 above the tile's last; rows past seqlen_q see none). Such a
    // block is passed over: its pingpong turn taken without a WGMMA (the turns keep their
    // order), its K and V slots waited for and released. A warpgroup that sees no block at all
    // writes out 0 and lse -inf for its rows, as an empty tile does. Measured reason:
    // tile_size.h, the large tile.
    constexpr bool kWarpGroupBand = Traits::kNumMmaWarpGroups > 2 && !Traits::kLocated;
    if constexpr (kWarpGroupBand) {
      int wg_n_min, wg_n_max;
      int const row0 = t.m_block * kBlockM + wg * 64;
      mask.n_block_range_rows(row0, row0 + 64, wg_n_min, wg_n_max);
      // Warp-uniform as the compiler sees it (wg is, but derives from threadIdx), and with it the
      // pipeline state after this loop. Without the broadcast (earlier forms of this pass-over,
      // run 2 of benchmarks/measured/h200_2026-11-22s9f_fwd64_band.txt): ptxas 56-68 spill
      // bytes against 8 here (12 on main), and the 192-row tile 4-6% slower on every call, full
      // 16k 506 -> 483 TFLOP/s on the H200.
      wg_n_max = __shfl_sync(0xffffffff, wg_n_max, 0);
      for (; n >= n_min && n >= wg_n_max; --n) {
        scheduler_sync();
        scheduler_arrive();
        pipe_k.consumer_wait(read);
        pipe_k.consumer_release(read);
        pipe_v.consumer_wait(read);
        pipe_v.consumer_release(read);
        ++read;
      }
      if (n < n_min) {  // no key for these rows
        ss.q_empty[q_buf].arrive();
        if constexpr (Traits::kDeferEpilogue) take_o();
        lse[0] = lse[1] = -INFINITY;
        return;
      }
    }
    load_descales(n);
    advance_descales();
    load_descales(n - 1);
    // The score scale the softmax step applies: block n's k descale, unless the softcap did.
    auto block_scale = [&] { return per_block && !p.has_softcap ? dk_blk : 1.f; };
    scheduler_sync();
    pipe_k.consumer_wait(read);
    wgmma_gemm<true, -1>(mma_qk, tSrQ, tSrK(_, _, _, read.index()), tSrS);
    scheduler_arrive();
    if constexpr (Traits::kDeferEpilogue) take_o();  // under the S WGMMA
    warpgroup_wait<0>();
    pipe_k.consumer_release(read);
    score_mod(n, cute::false_type{});
    softmax.template step<true, Traits::kFp8, kChains>(tSrS, block_scale());
    convert_p();
    float v_descale = dv_blk;  // units of O (FP8 per block)
    PipelineState read_v = read;
    ++read;
    // kRescaleOFirst: the factor O still owes (block n + 1's), applied before the next P V.
    cute::array<float, 2> o_scale_due = {1.f, 1.f};

    for (--n; n >= n_min; --n) {
      advance_descales();
      load_descales(n - 1);
      scheduler_sync();
      pipe_k.consumer_wait(read);
      wgmma_gemm<true, -1>(mma_qk, tSrQ, tSrK(_, _, _, read.index()), tSrS);
      if constexpr (Traits::kRescaleOFirst) rescale_rows(tOrO, o_scale_due);  // under the S WGMMA
      pipe_v.consumer_wait(read_v);
      wgmma_gemm<false, -1>(mma_pv, tOrP, tOrV(_, _, _, read_v.index()), tOrO);
      scheduler_arrive();
      warpgroup_wait<1>();  // S done; P V may still run
      pipe_k.consumer_release(read);
      ++read;
      score_mod(n, cute::true_type{});
      cute::array<float, 2> o_scale =
          softmax.template step<false, Traits::kFp8, kChains>(tSrS, block_scale());
      if (per_block) {  // O from units of block n + 1's v descale to block n's
        float const ratio = __fdividef(v_descale, dv_blk);
        v_descale = dv_blk;
        o_scale[0] *= ratio;
        o_scale[1] *= ratio;
      }
      warpgroup_wait<0>();  // P V done: tOrP and the V slot are free
      pipe_v.consumer_release(read_v);
      ++read_v;
      if constexpr (Traits::kRescaleOFirst)
        o_scale_due = o_scale;  // FP8: exactly 1 where no row max grew
      else if (softmax.rescaled || per_block)
        rescale_rows(tOrO, o_scale);
      convert_p();
    }
    // Every S WGMMA of this tile has retired: the producer may load another tile's Q into this
    // Q buffer.
    ss.q_empty[q_buf].arrive();

    if constexpr (Traits::kRescaleOFirst) rescale_rows(tOrO, o_scale_due);
    pipe_v.consumer_wait(read_v);
    wgmma_gemm<false, -1>(mma_pv, tOrP, tOrV(_, _, _, read_v.index()), tOrO);
    cute::array<float, 2> inv = softmax.finalize(lse);  // under the last P V WGMMA
    warpgroup_wait<0>();
    pipe_v.consumer_release(read_v);
    if constexpr (Traits::kFp8) {
      float const dv = per_block ? v_descale : *descale_v_row;
      inv[0] *= dv;
      inv[1] *= dv;
    }
    rescale_rows(tOrO, inv);
  }
};

}  // namespace fa3::sm90

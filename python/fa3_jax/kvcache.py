"""Layer 4: ``flash_attention_with_kvcache``, attention against a KV cache for decoding.

The cache is either contiguous (``k_cache [batch, seqlen_cache, heads_kv, head_dim]``) or paged
(``k_cache [num_pages, page_size, heads_kv, head_dim]`` plus an int32 ``page_table [batch,
max_pages_per_seq]``). New tokens are written with one scatter that XLA runs in place when the
caller donates the cache under ``jax.jit``; attention then runs on the KV-cache primitive
(``fa3_fwd_kvcache``): the dense forward over the cache with ``seqused_k[b] = cache_seqlens[b] +
seqlen_new``, the keys used by batch row b (cpp/flash.h, "Used key lengths"), so keys past a
row's length are never loaded and no mask is materialised. On Hopper it is the split-KV kernel
(Flash-Decoding), with the query heads of a GQA group packed into one tile under any band
(seqlen_q > 1 too, while seqlen_q * group <= 128: the kernel masks packed rows by position);
``num_splits`` picks the split count.

Paged caches whose page_size is a multiple of 16 (``_ffi.fwd_page_rows``) are read in place
(``fa3_fwd_kvcache_paged``; the CPU backend reads the same pages): the Hopper kernel looks each
key block's page up in the page table and loads it with one TMA load, or, for pages smaller than
a block, one box per page piece (64 rows where page_size is a multiple of 64, else 16). Other page sizes take an interim path: the pages of each
row are gathered into a contiguous ``[batch, max_pages_per_seq * page_size, ...]`` view before
the kernel (one extra read and write of the gathered pages).
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from fa3_jax import _ffi
from fa3_jax._primitives import kvcache_fwd_p
from fa3_jax.attention import (_check_float, _shape_dtype, as_int32_array, bottom_right_band,
                               check_qkv)


def _check_num_splits(num_splits):
    if isinstance(num_splits, jax.core.Tracer):
        raise TypeError("fa3_jax: num_splits must be a static Python int, got a traced value")
    if not isinstance(num_splits, numbers.Integral) or isinstance(num_splits, bool) \
            or num_splits < 0:
        raise ValueError(f"fa3_jax: num_splits must be an int >= 0 (0: the kernel's heuristic), "
                         f"got {num_splits!r}")
    return int(num_splits)


def _check_rank4(name, x, layout):
    shape, _ = _shape_dtype(name, x)
    if len(shape) != 4:
        raise ValueError(f"fa3_jax: {name} must have rank 4 {layout}, got shape {shape}")
    return shape


def _check_paged(k_cache, v_cache, page_table, batch):
    """Checks the paged layout; returns (page_table, num_pages, page_size, max_pages_per_seq)."""
    layout = "[num_pages, page_size, heads_kv, head_dim] (paged: page_table is given)"
    ks = _check_rank4("k_cache", k_cache, layout)
    vs = _check_rank4("v_cache", v_cache, layout)
    if ks[:3] != vs[:3]:
        raise ValueError(f"fa3_jax: k_cache and v_cache must agree on [num_pages, page_size, "
                         f"heads_kv], got k_cache {ks} and v_cache {vs}")
    num_pages, page_size = ks[0], ks[1]
    if num_pages < 1 or page_size < 1:
        raise ValueError(f"fa3_jax: a paged cache needs num_pages >= 1 and page_size >= 1, got "
                         f"k_cache {ks}")
    page_table = as_int32_array("page_table", page_table, "[batch, max_pages_per_seq]")
    if page_table.ndim != 2 or page_table.shape[0] != batch or page_table.shape[1] < 1:
        raise ValueError(f"fa3_jax: page_table must have shape [batch, max_pages_per_seq] with "
                         f"batch = {batch} (from q) and max_pages_per_seq >= 1, got "
                         f"{tuple(page_table.shape)}")
    return page_table, num_pages, page_size, page_table.shape[1]


def _check_new(k_new, v_new, batch, heads_kv, head_dim, head_dim_v, dtype, capacity):
    """Checks k_new/v_new against the cache; returns seqlen_new (0 when there is nothing new)."""
    if k_new is None and v_new is None:
        return 0
    if k_new is None or v_new is None:
        missing = "k_new" if k_new is None else "v_new"
        raise ValueError(f"fa3_jax: k_new and v_new go together; {missing} is None")
    ks = _check_rank4("k_new", k_new, "[batch, seqlen_new, heads_kv, head_dim]")
    vs = _check_rank4("v_new", v_new, "[batch, seqlen_new, heads_kv, head_dim_v]")
    for name, shape, want in (("k_new", ks, head_dim), ("v_new", vs, head_dim_v)):
        if shape[0] != batch or shape[2] != heads_kv or shape[3] != want:
            raise ValueError(f"fa3_jax: {name} must have shape [batch, seqlen_new, heads_kv, "
                             f"{'head_dim' if name == 'k_new' else 'head_dim_v'}] = "
                             f"[{batch}, seqlen_new, {heads_kv}, {want}] (from q and the cache), "
                             f"got {shape}")
    if ks[1] != vs[1]:
        raise ValueError(f"fa3_jax: k_new and v_new must have the same seqlen_new, got k_new "
                         f"{ks} and v_new {vs}")
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if jnp.dtype(x.dtype) != dtype:
            raise TypeError(f"fa3_jax: {name} must have the cache's dtype {dtype}, got {x.dtype}")
    seqlen_new = ks[1]
    if seqlen_new < 1:
        raise ValueError("fa3_jax: k_new and v_new have seqlen_new = 0; pass k_new=None and "
                         "v_new=None to attend without appending")
    if seqlen_new > capacity:
        raise ValueError(f"fa3_jax: seqlen_new ({seqlen_new}, from k_new {ks}) is larger than "
                         f"the cache's capacity of {capacity} tokens per sequence")
    return seqlen_new


def _append_contiguous(cache, new, start):
    """cache [b, s, h, d] with new [b, n, h, d] written at rows start[b] .. start[b] + n (start
    already clamped to [0, s - n]): one batched scatter, in place when cache is donated."""
    return jax.vmap(lambda c, x, s: jax.lax.dynamic_update_slice(c, x, (s, 0, 0)))(
        cache, new, start)


def _page_slots(page_table, num_pages, page_size, pos):
    """(page, offset) of token positions pos [b, n]; an out-of-range page index becomes
    num_pages, which a mode="drop" scatter skips."""
    page = jnp.take_along_axis(page_table, pos // page_size, axis=1)
    page = jnp.where((page >= 0) & (page < num_pages), page, num_pages)
    return page, pos % page_size


def _gather_pages(cache, page_table):
    """The contiguous view [b, max_pages_per_seq * page_size, h, d] of a paged cache. Pages with
    an index outside [0, num_pages) read as zeros (no other sequence's data, nothing out of
    bounds)."""
    num_pages, page_size = cache.shape[:2]
    valid = (page_table >= 0) & (page_table < num_pages)
    view = cache[jnp.where(valid, page_table, 0)]  # [b, pages, page_size, h, d]
    view = jnp.where(valid[:, :, None, None, None], view, jnp.zeros((), cache.dtype))
    b, pages = page_table.shape
    return view.reshape((b, pages * page_size) + cache.shape[2:])


def flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, *, k_new=None, v_new=None,
                                 page_table=None, softmax_scale=None, causal=True,
                                 window_size=(-1, -1), softcap=0.0, num_splits=0,
                                 return_lse=False):
    """Attention of new queries against a KV cache, optionally appending new keys/values first.

    Args:
      q: [batch, seqlen_q, heads_q, head_dim]: the queries of the newest seqlen_q tokens.
      k_cache, v_cache: contiguous [batch, seqlen_cache, heads_kv, head_dim(_v)], or paged
        [num_pages, page_size, heads_kv, head_dim(_v)] when page_table is given. heads_q must be
        a multiple of heads_kv (GQA/MQA). Same dtype as q (float32/float16/bfloat16).
      cache_seqlens: int32 [batch], the valid tokens in each row's cache before this call.
      k_new, v_new: None, or [batch, seqlen_new, heads_kv, head_dim(_v)] in the cache's dtype,
        written into the cache at positions cache_seqlens[b] .. cache_seqlens[b] + seqlen_new
        (paged: position p of row b lives in page page_table[b, p // page_size], slot
        p % page_size). One scatter: in place when the caller donates the cache to a jit.
      page_table: None (contiguous cache) or int32 [batch, max_pages_per_seq].
      softmax_scale, softcap: as in flash_attention.
      causal, window_size: as in flash_attention, bottom-right aligned to each row's total length
        L_b = cache_seqlens[b] + seqlen_new: query i sees cache position j when
        i + L_b - seqlen_q - left <= j <= i + L_b - seqlen_q + right (causal: right = 0).
        causal defaults to True, as in FlashAttention's flash_attn_with_kvcache.
      num_splits: static int >= 0, how many ranges the keys of each query tile are split into
        on Hopper (split-KV, merged through their LSE): 0 picks the count by the heuristic in
        cpp/hopper/tile_size.h (fwd_num_splits, from the cache's capacity, not its lengths);
        n > 0 forces n (at most 128 are used). The CPU backend does not split.
      return_lse: also return lse [batch, heads_q, seqlen_q] float32.

    Returns:
      Without k_new: out [batch, seqlen_q, heads_q, head_dim_v] in q's dtype (and lse, as
      flash_attention). With k_new/v_new: (out, k_cache, v_cache) with the new tokens written,
      or (out, lse, k_cache, v_cache) with return_lse. Attention covers cache positions
      [0, L_b) of row b; a query row that sees no key (an empty cache, or L_b < seqlen_q under
      causal) gets out = 0 and lse = -inf, never NaN.

    Bad metadata never reads or writes out of bounds. With capacity = seqlen_cache (contiguous)
    or max_pages_per_seq * page_size (paged), each cache_seqlens entry is clamped to
    [0, capacity - seqlen_new] before use: a negative entry is an empty cache, and an entry too
    large for the new tokens to fit makes them overwrite the last seqlen_new slots (the row then
    attends to all capacity positions). A page_table entry outside [0, num_pages) reads as zeros
    (keys and values of 0: such positions still take part in the softmax when inside L_b) and
    writes to it are dropped; two rows naming the same page share it (writes to the same slot:
    one of them wins). Static mistakes (ranks, dtypes, head counts and dims, page_table shape,
    k_new without v_new, seqlen_new larger than the capacity) raise ValueError/TypeError
    naming the argument.

    Works under jit (cache_seqlens and page_table are traced: one compilation serves every
    length), vmap (over a leading axis of every array) and multi-device jit: batch and head
    sharding stay local for a contiguous cache; a paged pool (shared by the rows) may be sharded
    on heads, and each of its replicas then receives every row's new tokens. Runs where
    flash_attention runs: the CPU backend and the Hopper forward (16-bit). Paged caches are read
    in place when page_size is a multiple of 16, else gathered into a contiguous view first.
    Cache positions past L_b may be loaded with the last key block that L_b ends in (and
    weighted by zero): they must hold finite values, as a zero-initialised cache does.
    """
    b, sq, hq, d = _check_rank4("q", q, "[batch, seqlen_q, heads_q, head_dim]")
    paged = page_table is not None
    if paged:
        page_table, num_pages, page_size, max_pages = _check_paged(k_cache, v_cache, page_table, b)
        capacity = max_pages * page_size
        # The rest is checked on the per-row view the kernel will see.
        k_rows, v_rows = (jax.ShapeDtypeStruct((b, capacity) + tuple(x.shape[2:]), x.dtype)
                          for x in (k_cache, v_cache))
        names = ("q", "k_cache (paged, per row)", "v_cache (paged, per row)")
    else:
        _check_rank4("k_cache", k_cache, "[batch, seqlen_cache, heads_kv, head_dim]")
        _check_rank4("v_cache", v_cache, "[batch, seqlen_cache, heads_kv, head_dim_v]")
        capacity = k_cache.shape[1]
        k_rows, v_rows, names = k_cache, v_cache, ("q", "k_cache", "v_cache")
    _, _, _, _, hkv, _, dv = check_qkv(q, k_rows, v_rows, names)
    lengths = as_int32_array("cache_seqlens", cache_seqlens, "[batch]")
    if lengths.shape != (b,):
        raise ValueError(f"fa3_jax: cache_seqlens must have shape [batch] = ({b},) (batch from "
                         f"q), got {tuple(lengths.shape)}")
    seqlen_new = _check_new(k_new, v_new, b, hkv, d, dv, jnp.dtype(q.dtype), capacity)
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else _check_float(
        "softmax_scale", softmax_scale, positive=True)
    softcap = _check_float("softcap", softcap, min_value=0.0)
    # The band relative to each row's own bottom-right diagonal (L_b - seqlen_q), as in varlen.
    diag_lo, diag_hi = bottom_right_band(0, 0, causal, window_size)
    num_splits = _check_num_splits(num_splits)

    if seqlen_new:
        start = jnp.clip(lengths, 0, capacity - seqlen_new)
        used = start + seqlen_new
        if paged:
            pos = start[:, None] + jnp.arange(seqlen_new, dtype=jnp.int32)[None, :]
            page, slot = _page_slots(page_table, num_pages, page_size, pos)
            k_cache = k_cache.at[page, slot].set(k_new, mode="drop")
            v_cache = v_cache.at[page, slot].set(v_new, mode="drop")
        else:
            k_cache = _append_contiguous(k_cache, k_new, start)
            v_cache = _append_contiguous(v_cache, v_new, start)
    else:
        # The kernels clamp the used key lengths to [0, capacity] themselves (cpp/flash.h, "Used
        # key lengths"): the lengths go in as they are, with no clip kernel before the call.
        used = lengths
    # All seqlen_q queries of row b against its keys [0, used[b]): the kernel reads
    # the pages itself where page_size is a multiple of its page boxes, else a gathered view.
    if paged and page_size % _ffi.fwd_page_rows() == 0:
        kv = (k_cache, v_cache, used, page_table)
    elif paged:
        kv = (_gather_pages(k_cache, page_table), _gather_pages(v_cache, page_table), used)
    else:
        kv = (k_cache, v_cache, used)
    out, lse = kvcache_fwd_p.bind(q, *kv, softmax_scale=float(scale), softcap=float(softcap),
                                  diag_lo=int(diag_lo), diag_hi=int(diag_hi),
                                  num_splits=num_splits)
    head = (out, lse) if return_lse else (out,)
    if seqlen_new:
        return head + (k_cache, v_cache)
    return head if return_lse else out

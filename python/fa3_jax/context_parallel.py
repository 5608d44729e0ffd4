"""Context parallelism: attention over a sequence axis sharded across devices.

When q/k/v reach the kernels under a multi-device ``jit`` with their sequence axis sharded on a
mesh axis, the partitioner (``_primitives``, layer 3) calls one of the per-shard schedules below
instead of gathering the sequence. Each schedule is written in terms of the existing kernel calls
only: a step that pairs a local query chunk at global offset ``a`` with a key/value chunk at global
offset ``b`` is the ordinary kernel call with the band ``diag_lo <= j - i <= diag_hi`` shifted by
``b - a``.

Strategies (``flash_attention(..., context_parallel=...)``):
  "ring" (default): K/V shards travel around the mesh axis by ``ppermute`` (collective-permute,
    K and V in one buffer); at each of the n steps every device runs the kernel on its local Q
    against the visiting K/V and merges the partial (out, lse) through the log-sum-exp (float32
    accumulator). Step 0 (the device's own K/V, the diagonal) runs under the first transfer; each
    later step's transfer is issued before its kernels (the last step sends nothing), so that
    XLA overlaps them. A step is the fewest kernel calls that reproduce its mask exactly
    (``plan_calls``): one call per step in the load-balanced causal layout. The backward is a
    ring too: the global out and lse (saved by the forward) feed every step, so per-step
    dQ/dK/dV are exact terms of the full gradient (P_ij = exp(s_ij - lse_i) and
    D_i = rowsum(dO_i * O_i) - dlse_i are per-row global quantities, computed by the kernel from
    the out/lse it is given); dK/dV of a shard accumulate as it travels (the running sum of the
    previous device arrives while this step's kernels run) and reach home after n - 1 hops, the
    own step split in two halves that run under the first K/V transfer and under that last hop.
    On 2 H200s (32k tokens, causal, bf16) 91% of the communication runs under the kernels.
    Memory per device is O(seqlen / n).
  "all_gather": K/V are all-gathered once, each device runs its local Q against the whole K/V
    (one kernel call per local chunk); the backward reduce-scatters dK/dV. Fewer, larger calls:
    for short sequences where the ring's per-step overhead dominates.
  "gather": the pre-context-parallel behaviour: q/k/v are gathered and every device computes the
    whole sequence.

Skipping: which chunk pairs are fully masked, fully visible or cut by the band depends on the
device index, which is a traced value in the SPMD program. For each step the schedule lists every
device's kernel calls statically; when all devices agree the calls are static (or left out
entirely when every device's blocks are masked), otherwise a ``lax.switch`` picks among the few
distinct call lists (load-balanced causal ring step: one device's two query chunks against one
key chunk, or one query chunk against two). Running equal-shaped per-pair calls at
device-dependent offsets instead (dynamic slices, no conditional) measured no faster: the
conditional's host round trip is hidden behind the kernels, and summing two calls' dK/dV made
the hop home float32.

Load balancing (``load_balance=n``): with a causal mask and contiguous chunks, device n-1 has n
times the work of device 0. The load-balanced layout splits the sequence into 2n chunks and gives
device i chunks i and 2n-1-i (each device holds one early and one late chunk, so every device has
the same causal work: two chunk pairs per ring step, three on the diagonal step).
``load_balance_reorder(x, n)`` puts tokens (ids, positions, labels) into that layout once, before
the model; ``load_balance_restore`` brings them back. Attention told ``load_balance=n`` treats the
sequence axis as being in that order and gives the kernels the true positions. Everything else in
a transformer is per-token (or a sum over tokens, like the loss), so the model runs unchanged on the
reordered sequence; rotary embeddings need the reordered positions.

Why custom_partitioning and not shard_map at the attention layer: under plain ``jax.jit`` with
NamedSharding inputs (the usual training setup) the attention function sees no sharding while it
is traced, so a shard_map there would need the mesh and axis passed in by hand. The partitioner
knows the shardings after propagation: ``partition`` sees the sequence axis's mesh axis, returns a
per-shard function whose collectives name that axis (as TransformerEngine-JAX does), and the same
``flash_attention`` call runs on one device, batch/head-sharded or sequence-sharded. Inside a
user's shard_map the call sees only the local shard and computes it alone (no ring).

Limits: a sharding of the sequence that the shards (times 2 chunks when load-balanced) do not
divide, or a load-balanced layout made for another shard count, falls back to gathering. Under
jit, ``load_balance_reorder`` of a sequence-sharded array is a gather whose result XLA may leave
replicated: reorder on the host, or constrain the result's sharding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# A band edge beyond any sequence length; matches fa3::kUnbounded in cpp/flash.h.
UNBOUNDED = 1 << 40

STRATEGIES = ("ring", "all_gather", "gather")


def check_strategy(strategy):
    if strategy not in STRATEGIES:
        raise ValueError(f"fa3_jax: context_parallel must be one of {STRATEGIES}, got "
                         f"{strategy!r}")
    return strategy


# ---------------------------------------------------------------------------------------------
# The load-balanced layout
# ---------------------------------------------------------------------------------------------

def load_balance_chunks(n: int) -> list[int]:
    """Natural-order chunk indices in layout order: device i holds chunks i and 2n-1-i."""
    return [c for i in range(n) for c in (i, 2 * n - 1 - i)]


def _check_layout_args(x, n, axis):
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"fa3_jax: the number of shards n must be an int >= 1, got {n!r}")
    axis = axis % x.ndim
    if x.shape[axis] % (2 * n):
        raise ValueError(f"fa3_jax: the load-balanced layout splits axis {axis} (length "
                         f"{x.shape[axis]}) into 2n = {2 * n} equal chunks; pad it to a multiple "
                         f"of {2 * n}")
    return int(n), axis


def _token_order(length, n, inverse=False):
    """Gather indices along the sequence: layout position p holds natural token order[p] (or,
    inverse, natural token t sits at layout position order[t]). Built from iota, not a numpy
    constant, so that it may run inside a custom_partitioning body."""
    chunk = length // (2 * n)
    pos = lax.iota(jnp.int32, length)
    c, r = pos // chunk, pos % chunk
    if inverse:  # natural chunk c sits at slot 2c (c < n) or 2(2n-1-c)+1
        slot = jnp.where(c < n, 2 * c, 2 * (2 * n - 1 - c) + 1)
        return slot * chunk + r
    device, late = c // 2, c % 2  # layout slot c: device c // 2, its early or late chunk
    return jnp.where(late == 0, device, 2 * n - 1 - device) * chunk + r


# A gather with static indices, not 2n slices and a concatenate: under jit on a sharded axis the
# SPMD partitioner turns the gather into one collective (the concatenate into hundreds of
# permutes and a compile time of tens of seconds on 8 devices).

def load_balance_reorder(x, n: int, axis: int = 1):
    """Natural token order -> the load-balanced layout for n sequence shards.

    Splits ``axis`` into 2n equal chunks and orders them 0, 2n-1, 1, 2n-2, ...: sharded n-way,
    device i holds chunks i and 2n-1-i. Apply it to token ids, positions and labels before the
    model (on the host or inside jit) and pass ``load_balance=n`` to the attention."""
    n, axis = _check_layout_args(x, n, axis)
    return jnp.take(x, _token_order(x.shape[axis], n), axis=axis)


def load_balance_restore(x, n: int, axis: int = 1):
    """Inverse of ``load_balance_reorder``: the load-balanced layout -> natural token order."""
    n, axis = _check_layout_args(x, n, axis)
    return jnp.take(x, _token_order(x.shape[axis], n, inverse=True), axis=axis)


# ---------------------------------------------------------------------------------------------
# How a call splits the sequence
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SeqShards:
    """How one partitioned call splits the sequence: over mesh ``axis`` (a name or a tuple of
    names), ``n`` shards, each holding one contiguous chunk or, load-balanced, two."""
    axis: str | tuple[str, ...]
    n: int
    load_balanced: bool
    strategy: str

    @property
    def chunks(self) -> int:
        """Chunks per device."""
        return 2 if self.load_balanced else 1

    def chunk_ids(self, device: int) -> tuple[int, ...]:
        """Global chunk indices (in natural order) that ``device`` holds, in local order."""
        if self.load_balanced:
            return (device, 2 * self.n - 1 - device)
        return (device,)


def block_band(diag_lo, diag_hi, q_off, k_off, len_q, len_k):
    """The band of a (len_q x len_k) block at global offsets (q_off, k_off), in local indices.

    None when the block is fully masked; an edge that the block never reaches becomes unbounded,
    so equivalent calls compare equal."""
    shift = k_off - q_off
    lo, hi = diag_lo - shift, diag_hi - shift
    if hi < -(len_q - 1) or lo > len_k - 1 or lo > hi:
        return None
    lo = -UNBOUNDED if lo <= -(len_q - 1) else lo
    hi = UNBOUNDED if hi >= len_k - 1 else hi
    return lo, hi


# ---------------------------------------------------------------------------------------------
# The kernel calls of one step: a device's local queries against the K/V shard in hand
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Call:
    """One kernel call: local query rows [q0, q1) against rows [k0, k1) of the K/V shard in hand,
    with the band lo <= j - i <= hi in the call's own indices."""
    q0: int
    q1: int
    k0: int
    k1: int
    lo: int
    hi: int


def _trimmed(call: Call):
    """``call`` with its keys cut to those its band reaches (None when it reaches none)."""
    rows, cols = call.q1 - call.q0, call.k1 - call.k0
    if block_band(call.lo, call.hi, 0, 0, rows, cols) is None:
        return None
    first = 0 if call.lo == -UNBOUNDED else max(0, call.lo)
    last = cols - 1 if call.hi == UNBOUNDED else min(cols - 1, rows - 1 + call.hi)
    band = block_band(call.lo, call.hi, 0, first, rows, last + 1 - first)
    return Call(call.q0, call.q1, call.k0 + first, call.k0 + last + 1, *band)


def _fit_band(bands, rows, cols, cq, ck):
    """One band over query chunks ``rows`` x key chunks ``cols`` (ranges) that gives every chunk
    pair of the rectangle its band (None: masked), or None. The candidate edges, moved to the
    rectangle's origin, are the pairs' own edges and the edges at which a pair is just fully
    visible or just masked (a normalised band has forgotten those)."""
    pairs = [(i, j) for i in rows for j in cols]
    los, his = {-UNBOUNDED}, {UNBOUNDED}
    for i, j in pairs:
        shift = (j - cols[0]) * ck - (i - rows[0]) * cq
        los.update((shift - (cq - 1), shift + ck))
        his.update((shift + ck - 1, shift - cq))
        if bands[i][j] is not None:
            lo, hi = bands[i][j]
            los.add(lo if lo == -UNBOUNDED else lo + shift)
            his.add(hi if hi == UNBOUNDED else hi + shift)
    for lo in sorted(los):
        for hi in sorted(his):
            if all(block_band(lo, hi, (i - rows[0]) * cq, (j - cols[0]) * ck, cq, ck)
                   == bands[i][j] for i, j in pairs):
                return block_band(lo, hi, 0, 0, len(rows) * cq, len(cols) * ck)
    return None


def plan_calls(bands, cq, ck):
    """Chunk-pair bands ([local query chunk][key chunk] of size cq x ck, None where masked) ->
    the fewest kernel calls that compute exactly those pairs: a tuple of Calls, None when every
    pair is masked.

    One call over the bounding rectangle of the visible pairs where one band reproduces them all:
    every step of the load-balanced causal layout (its diagonal step is the local causal mask, a
    ring step one unmasked block), any unmasked attention. Otherwise one call per query chunk, or
    per pair. Fewer, larger calls: less launch and tail overhead, and no merge inside a step."""
    live = [(i, j) for i, row in enumerate(bands) for j, band in enumerate(row) if band]

    def rect(pairs):
        rows = range(min(i for i, _ in pairs), max(i for i, _ in pairs) + 1)
        cols = range(min(j for _, j in pairs), max(j for _, j in pairs) + 1)
        band = _fit_band(bands, rows, cols, cq, ck)
        return band and _trimmed(Call(rows[0] * cq, (rows[-1] + 1) * cq, cols[0] * ck,
                                      (cols[-1] + 1) * ck, *band))

    if not live:
        return None
    whole = rect(live)
    if whole:
        return (whole,)
    calls = []
    for i in sorted({i for i, _ in live}):
        row = [(i, j) for a, j in live if a == i]
        one = rect(row)
        calls += [one] if one else [rect([p]) for p in row]
    return tuple(calls)


def split_calls(calls, m):
    """Calls (or None) -> (their parts on query rows < m, their parts on rows >= m), each None
    when empty. A call across row m is cut in two, each part's band moved to its own origin and
    its keys trimmed to those it reaches."""
    before, after = [], []
    for c in calls or ():
        if c.q1 <= m:
            before.append(c)
        elif c.q0 >= m:
            after.append(c)
        else:
            top = _trimmed(Call(c.q0, m, c.k0, c.k1, c.lo, c.hi))
            band = block_band(c.lo, c.hi, m - c.q0, 0, c.q1 - m, c.k1 - c.k0)
            bottom = band and _trimmed(Call(m, c.q1, c.k0, c.k1, *band))
            before += [top] if top else []
            after += [bottom] if bottom else []
    return tuple(before) or None, tuple(after) or None


def _overlapping(calls, key_side):
    """Whether two calls share query rows (key_side: key rows); their results then combine
    inside the step, in float32."""
    spans = sorted((c.k0, c.k1) if key_side else (c.q0, c.q1) for c in calls or ())
    return any(a[1] > b[0] for a, b in zip(spans, spans[1:]))


def _assemble(length, pieces, axes, combine, fill, dtypes):
    """Pieces [(start, stop, arrays)] along the sequence (array t's sequence axis: axes[t]) ->
    arrays covering [0, length): ``fill(n)`` where no piece is, ``combine`` of the slices where
    several pieces are, cast to ``dtypes``."""
    if len(pieces) == 1 and pieces[0][:2] == (0, length):
        return tuple(x.astype(d) for x, d in zip(pieces[0][2], dtypes))
    cuts = sorted({0, length, *(p[0] for p in pieces), *(p[1] for p in pieces)})
    segments = []
    for a, b in zip(cuts, cuts[1:]):
        here = [tuple(lax.slice_in_dim(x, a - start, b - start, axis=ax)
                      for x, ax in zip(arrays, axes))
                for start, stop, arrays in pieces if start <= a and b <= stop]
        seg = fill(b - a) if not here else here[0] if len(here) == 1 else combine(here)
        segments.append(tuple(x.astype(d) for x, d in zip(seg, dtypes)))
    return tuple(jnp.concatenate(parts, axis=ax) for parts, ax in zip(zip(*segments), axes))


def _id_slices(ids, c):
    """The (query ids, key ids) of call ``c``'s rows and keys, or () without segment ids."""
    return () if ids is None else (ids[0][:, c.q0:c.q1], ids[1][:, c.k0:c.k1])


def _forward_step(calls, q, kv, kernel, dtypes, ids=None):
    """Partial (out, lse) of all local query rows from one step's calls: rows no call covers get
    out 0 and lse -inf, rows several calls cover are merged. ``ids``: None, or the segment ids
    (of the local query rows, of the K/V in hand), sliced for each call like q and k."""
    k, v = kv
    b, _, h, _ = q.shape
    pieces = [(c.q0, c.q1, tuple(kernel(q[:, c.q0:c.q1], k[:, c.k0:c.k1], v[:, c.k0:c.k1], c.lo,
                                        c.hi, *_id_slices(ids, c)))) for c in calls]

    def fill(n):
        return (jnp.zeros((b, n, h, v.shape[3]), dtypes[0]),
                jnp.full((b, h, n), -jnp.inf, jnp.float32))

    def combine(parts):
        acc = parts[0]
        for part in parts[1:]:
            acc = merge(acc, part)
        return acc

    return _assemble(q.shape[1], pieces, (1, 2), combine, fill, dtypes)


def _backward_step(calls, q, kv, rows, kernel, dtypes, ids=None):
    """(dq of all local query rows, dk, dv of the K/V in hand) from one step's calls; ``rows`` =
    (out, lse, dout, dlse) of the local query rows. Rows no call covers get zeros, rows several
    calls cover are summed. ``ids`` as in ``_forward_step``."""
    k, v = kv
    out, lse, dout, dlse = rows
    grads = [(c, kernel(q[:, c.q0:c.q1], k[:, c.k0:c.k1], v[:, c.k0:c.k1], out[:, c.q0:c.q1],
                        lse[:, :, c.q0:c.q1], dout[:, c.q0:c.q1], dlse[:, :, c.q0:c.q1],
                        c.lo, c.hi, *_id_slices(ids, c))) for c in calls]

    def side(x, index, key_side):
        pieces = [((c.k0, c.k1) if key_side else (c.q0, c.q1)) + ((g[index],),) for c, g in grads]
        return _assemble(x.shape[1], pieces, (1,),
                         lambda parts: (sum(p[0].astype(jnp.float32) for p in parts),),
                         lambda n: (jnp.zeros(x.shape[:1] + (n,) + x.shape[2:], dtypes[index]),),
                         dtypes[index:index + 1])[0]

    return side(q, 0, False), side(k, 1, True), side(v, 2, True)


# ---------------------------------------------------------------------------------------------
# The per-shard schedules
# ---------------------------------------------------------------------------------------------

def _select(cases, step_index, device, call, empty):
    """``call(entry)`` for this step's and this device's entry of ``cases`` ([step][device], None
    where there is nothing to compute).

    Static when all entries agree (None: nothing to run); else a lax.switch over the distinct
    cases, indexed by the (traced) step and device."""
    distinct = list(dict.fromkeys(c for row in cases for c in row))
    if len(distinct) == 1:
        return None if distinct[0] is None else call(distinct[0])
    table = jnp.asarray([[distinct.index(c) for c in row] for row in cases], jnp.int32)
    branches = [(lambda b=b: empty() if b is None else call(b)) for b in distinct]
    return lax.switch(table[step_index, device], branches)


def _split(x, parts, axis):
    return jnp.split(x, parts, axis=axis) if parts > 1 else [x]


def _lse_weight(w):
    """[b, h, s] -> [b, s, h, 1], to scale an out-shaped [b, s, h, d] array."""
    return jnp.swapaxes(w, 1, 2)[..., None]


def merge(acc, part):
    """Merges partial results (out, lse) over disjoint key sets into a float32 out.

    NaN-free where both rows saw no key (lse -inf on both sides gives out 0, lse -inf)."""
    acc_out, acc_lse = acc
    out, lse = part
    m = jnp.maximum(acc_lse, lse)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e_acc, e_new = jnp.exp(acc_lse - m), jnp.exp(lse - m)
    total = e_acc + e_new
    safe = jnp.where(total > 0, total, 1.0)
    new_lse = jnp.where(total > 0, m + jnp.log(safe), -jnp.inf)
    new_out = (acc_out.astype(jnp.float32) * _lse_weight(e_acc / safe)
               + out.astype(jnp.float32) * _lse_weight(e_new / safe))
    return new_out, new_lse


def _merge_opt(acc, part):
    """``merge`` where either side may be None (nothing computed yet / in this step)."""
    return part if acc is None else acc if part is None else merge(acc, part)


def _add_opt(acc, part):
    """Elementwise float32 sum of two tuples of arrays, either of which may be None."""
    if acc is None or part is None:
        return part if acc is None else acc
    return tuple(a.astype(jnp.float32) + p.astype(jnp.float32) for a, p in zip(acc, part))


def _ring_send(x, shards: SeqShards):
    """Device r sends the arrays ``x`` (a pytree) to r + 1 (mod n): at step t device r holds the
    K/V shard of device r - t.

    Arrays of one dtype (K and V, dK and dV) travel as one buffer: XLA's scheduler overlaps one
    collective-permute at a time with compute, and runs a second independent one synchronously
    on the compute stream (seen in a 2-GPU profile: half of every transfer exposed); copying
    them into one buffer and out again costs less (32k tokens on 2 H200s: 16.3 -> 15.4 ms a
    training step; XLA_FLAGS=--xla_gpu_experimental_parallel_collective_overlap_limit=2 on two
    buffers gave the same)."""
    perm = [(i, (i + 1) % shards.n) for i in range(shards.n)]
    leaves, tree = jax.tree_util.tree_flatten(x)
    if len(leaves) < 2 or len({a.dtype for a in leaves}) > 1:
        return lax.ppermute(x, shards.axis, perm)
    flat = lax.ppermute(jnp.concatenate([a.reshape(-1) for a in leaves]), shards.axis, perm)
    ends = np.cumsum([a.size for a in leaves])
    return jax.tree_util.tree_unflatten(tree, [flat[e - a.size:e].reshape(a.shape)
                                               for a, e in zip(leaves, ends)])


def _ids_in_hand(q_ids, kv_ids, shards: SeqShards):
    """Segment ids -> ``ids(t)``: (the local query ids, the key ids of the K/V shard in hand at
    ring step t, that of device r - t), or a function returning None without ids.

    The key ids are all-gathered once (int32 [batch, seqlen_k]: 4 bytes a token, next to K and V's
    2 * heads_kv * head_dim elements) and each step slices its shard's, rather than sending them
    around the ring with K/V: a collective-permute of a second dtype would run beside the K|V
    buffer's, not under the kernels (see ``_ring_send``)."""
    if q_ids is None:
        return lambda t: None
    length = kv_ids.shape[1]
    every = lax.all_gather(kv_ids, shards.axis, axis=1, tiled=True)
    device = lax.axis_index(shards.axis)

    def ids(t):
        if isinstance(t, int) and t == 0:
            return q_ids, kv_ids
        source = (device - t) % shards.n
        return q_ids, lax.dynamic_slice_in_dim(every, source * length, length, axis=1)

    return ids


def _step_plans(shards: SeqShards, t, cq, ck, diag_lo, diag_hi):
    """[device] kernel calls of ring step t: the local Q chunks against the K/V of device r - t."""
    n, c = shards.n, shards.chunks
    return [plan_calls([[block_band(diag_lo, diag_hi, shards.chunk_ids(r)[i] * cq,
                                    shards.chunk_ids((r - t) % n)[j] * ck, cq, ck)
                         for j in range(c)] for i in range(c)], cq, ck) for r in range(n)]


def _ring_steps(shards: SeqShards, step, to_loop, carry, kv_t):
    """Ring steps 1..n-1: ``carry = step(carry, kv, steps, index)`` on the K/V of device r - t
    (``steps[index]`` = t), the transfer of the next step's K/V issued before each step's kernels.
    ``kv_t``: the K/V of device r - 1, its transfer issued by the caller before step 0.

    Steps 2..n-2 are a fori_loop, on the carry made loop-typed by ``to_loop``: the loop rather
    than unrolled steps keeps the carried accumulators materialised once per step (unrolled, XLA
    fuses the merges into one loop and keeps every step's partial result alive: O(seqlen)
    memory). The first ring step is peeled (its carry may still be in the kernels' dtype) and so
    is the last (it sends no K/V that nobody would use)."""
    n = shards.n
    if n > 2:
        kv_next = _ring_send(kv_t, shards)
        carry = step(carry, kv_t, [1], 0)
        kv_t = kv_next
    if n > 3:
        def body(t, state):
            kv_t, carry = state
            kv_next = _ring_send(kv_t, shards)
            return kv_next, step(carry, kv_t, range(2, n - 1), t - 2)

        kv_t, carry = lax.fori_loop(2, n - 1, body, (kv_t, to_loop(carry)))
    return step(carry, kv_t, [n - 1], 0)


def ring_forward(q, k, v, *, shards: SeqShards, seqlen_q, seqlen_k, diag_lo, diag_hi, kernel,
                 q_ids=None, kv_ids=None):
    """Per-shard ring forward. q/k/v are this device's shards; ``kernel(q, k, v, lo, hi)`` is one
    static kernel call returning (out, lse). Returns (out, lse) of the local query rows. With
    segment ids (this device's shards of them), the kernel is ``kernel(q, k, v, lo, hi, q_ids,
    kv_ids)`` and is given the ids of its rows and keys.

    Step 0 (the device's own K/V) runs while the first transfer is in flight; each step's partial
    result is merged into the accumulator (float32 once two steps are in it)."""
    n, c = shards.n, shards.chunks
    cq, ck = seqlen_q // (n * c), seqlen_k // (n * c)
    device = lax.axis_index(shards.axis)
    plans = [_step_plans(shards, t, cq, ck, diag_lo, diag_hi) for t in range(n)]
    ids_at = _ids_in_hand(q_ids, kv_ids, shards)
    b, rows, hq, _ = q.shape

    def empty(dtypes):
        return (jnp.zeros((b, rows, hq, v.shape[3]), dtypes[0]),
                jnp.full((b, hq, rows), -jnp.inf, jnp.float32))

    def step(acc, kv, steps, index):
        cases = [plans[t] for t in steps]
        merged = any(_overlapping(p, False) for row in cases for p in row)
        dtypes = (jnp.float32 if merged else q.dtype, jnp.float32)
        ids = ids_at(steps[0] if len(steps) == 1 else steps[0] + index)
        part = _select(cases, index, device,
                       lambda calls: _forward_step(calls, q, kv, kernel, dtypes, ids),
                       lambda: empty(dtypes))
        return _merge_opt(acc, part)

    def to_loop(acc):
        return empty((jnp.float32,)) if acc is None else (acc[0].astype(jnp.float32), acc[1])

    kv = (k, v)
    kv_t = _ring_send(kv, shards)
    acc = _ring_steps(shards, step, to_loop, step(None, kv, [0], 0), kv_t)
    out, lse = acc or empty((q.dtype,))
    return out.astype(q.dtype), lse


def ring_backward(q, k, v, out, lse, dout, dlse, *, shards: SeqShards, seqlen_q, seqlen_k,
                  diag_lo, diag_hi, kernel, q_ids=None, kv_ids=None):
    """Per-shard ring backward. ``kernel(q, k, v, out, lse, dout, dlse, lo, hi)`` returns
    (dq, dk, dv); out/lse are the global forward results of the local rows. Segment ids as in
    ``ring_forward`` (the kernel then takes them after ``hi``).

    The dK/dV of a shard accumulate as it travels: device r + 1 starts the sum with its kernels'
    own output (so the first hop carries the kernels' dtype, exactly), each next device adds its
    terms (float32) to the sum it receives while its kernels run, and the last sends it home:
    n - 1 hops. The device's own (diagonal) step is split by query rows: the first half runs while
    the first K/V transfer is in flight, the second half while the dK/dV sum travels home, so
    that no transfer waits alone."""
    n, c = shards.n, shards.chunks
    cq, ck = seqlen_q // (n * c), seqlen_k // (n * c)
    device = lax.axis_index(shards.axis)
    plans = [_step_plans(shards, t, cq, ck, diag_lo, diag_hi) for t in range(n)]
    early, late = zip(*(split_calls(p, (c * cq) // 2) for p in plans[0]))
    ids_at = _ids_in_hand(q_ids, kv_ids, shards)
    f32 = jnp.float32

    def run(cases, index, kv, q=q, ids=ids_at(0)):
        merged = any(_overlapping(p, side) for row in cases for p in row for side in (0, 1))
        dtypes = (f32, f32, f32) if merged else (q.dtype, k.dtype, v.dtype)
        return _select(cases, index, device,
                       lambda calls: _backward_step(calls, q, kv, (out, lse, dout, dlse), kernel,
                                                    dtypes, ids),
                       lambda: tuple(jnp.zeros(x.shape, t) for x, t in zip((q, k, v), dtypes)))

    def step(state, kv, steps, index):
        """state: (dq so far, the dK/dV sum that arrives at this step, None at step 1)."""
        dq, travelling = state
        received = None if travelling is None else _ring_send(travelling, shards)
        grads = run([plans[t] for t in steps], index, kv,
                    ids=ids_at(steps[0] if len(steps) == 1 else steps[0] + index))
        return (_add_opt(dq, grads and grads[:1]), _add_opt(received, grads and grads[1:]))

    def to_loop(state):
        return tuple(tuple(jnp.zeros(x.shape, f32) for x in like) if part is None
                     else tuple(p.astype(f32) for p in part)
                     for part, like in zip(state, ((q,), (k, v))))

    kv = (k, v)
    kv_t = _ring_send(kv, shards)
    own_first = run([list(early)], 0, kv)
    if own_first is not None:
        # The ring's first step waits for the first half of the own step (the barrier), so that
        # XLA runs that half under the first K/V transfer rather than after the ring step.
        own_first, kv_t = lax.optimization_barrier((own_first, kv_t))
    dq, dkv = _ring_steps(shards, step, to_loop, (own_first and own_first[:1], None), kv_t)
    late_q, home = q, None
    if dkv is not None:
        # The second half of the own step waits for the sum (the barrier makes its q depend on
        # it), so that the sum's hop home runs under it rather than after it.
        dkv, late_q = lax.optimization_barrier((dkv, q))
        home = _ring_send(dkv, shards)
    own_last = run([list(late)], 0, kv, late_q)
    dq = _add_opt(dq, own_last and own_last[:1])
    dkv = _add_opt(_add_opt(home, own_first and own_first[1:]), own_last and own_last[1:])
    dq = dq[0] if dq else jnp.zeros(q.shape, q.dtype)
    dk, dv = dkv or (jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, v.dtype))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _gather_natural(x, shards: SeqShards):
    """All-gathers the sequence axis (1) and returns it in natural token order."""
    full = lax.all_gather(x, shards.axis, axis=1, tiled=True)
    return load_balance_restore(full, shards.n) if shards.load_balanced else full


def _q_cases(shards: SeqShards, slot, seqlen_q, seqlen_k, diag_lo, diag_hi):
    """[1][device] band of local query chunk ``slot`` against the whole (natural-order) K/V."""
    cq = seqlen_q // (shards.n * shards.chunks)
    return [[block_band(diag_lo, diag_hi, shards.chunk_ids(r)[slot] * cq, 0, cq, seqlen_k)
             for r in range(shards.n)]]


def _gathered_ids(q_ids, kv_ids, shards: SeqShards):
    """[local query chunk] -> () or (its segment ids, the whole sequence's key ids)."""
    if q_ids is None:
        return [()] * shards.chunks
    every = _gather_natural(kv_ids, shards)
    return [(part, every) for part in _split(q_ids, shards.chunks, 1)]


def all_gather_forward(q, k, v, *, shards: SeqShards, seqlen_q, seqlen_k, diag_lo, diag_hi,
                       kernel, q_ids=None, kv_ids=None):
    """Per-shard forward with K/V all-gathered once: one kernel call per local query chunk.
    Segment ids as in ``ring_forward``."""
    k_full, v_full = _gather_natural(k, shards), _gather_natural(v, shards)
    ids = _gathered_ids(q_ids, kv_ids, shards)
    device = lax.axis_index(shards.axis)
    b, _, hq, _ = q.shape
    q_parts = _split(q, shards.chunks, 1)
    cq = q_parts[0].shape[1]

    def empty():
        return (jnp.zeros((b, cq, hq, v.shape[3]), q.dtype),
                jnp.full((b, hq, cq), -jnp.inf, jnp.float32))

    outs, lses = [], []
    for i, qi in enumerate(q_parts):
        cases = _q_cases(shards, i, seqlen_q, seqlen_k, diag_lo, diag_hi)
        out, lse = _select(cases, 0, device,
                           lambda band, qi=qi, i=i: kernel(qi, k_full, v_full, *band, *ids[i]),
                           empty) or empty()
        outs.append(out)
        lses.append(lse)
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=2)


def all_gather_backward(q, k, v, out, lse, dout, dlse, *, shards: SeqShards, seqlen_q, seqlen_k,
                        diag_lo, diag_hi, kernel, q_ids=None, kv_ids=None):
    """Per-shard backward of ``all_gather_forward``: dK/dV of the whole sequence are summed over
    the local chunks and reduce-scattered (in float32) back to their shards."""
    k_full, v_full = _gather_natural(k, shards), _gather_natural(v, shards)
    ids = _gathered_ids(q_ids, kv_ids, shards)
    device = lax.axis_index(shards.axis)
    c = shards.chunks
    q_p, out_p, dout_p = (_split(x, c, 1) for x in (q, out, dout))
    lse_p, dlse_p = (_split(x, c, 2) for x in (lse, dlse))
    dq = []
    dk = jnp.zeros(k_full.shape, jnp.float32)
    dv = jnp.zeros(v_full.shape, jnp.float32)
    for i in range(c):
        def call(band, i=i):
            return kernel(q_p[i], k_full, v_full, out_p[i], lse_p[i], dout_p[i], dlse_p[i], *band,
                          *ids[i])

        def empty(i=i):
            return (jnp.zeros(q_p[i].shape, q.dtype), jnp.zeros(k_full.shape, k.dtype),
                    jnp.zeros(v_full.shape, v.dtype))

        cases = _q_cases(shards, i, seqlen_q, seqlen_k, diag_lo, diag_hi)
        grads = _select(cases, 0, device, call, empty) or empty(i)
        dq.append(grads[0])
        dk, dv = dk + grads[1].astype(jnp.float32), dv + grads[2].astype(jnp.float32)
    if shards.load_balanced:
        dk, dv = load_balance_reorder(dk, shards.n), load_balance_reorder(dv, shards.n)
    dk = lax.psum_scatter(dk, shards.axis, scatter_dimension=1, tiled=True)
    dv = lax.psum_scatter(dv, shards.axis, scatter_dimension=1, tiled=True)
    return jnp.concatenate(dq, axis=1), dk.astype(k.dtype), dv.astype(v.dtype)


def forward(q, k, v, *, shards: SeqShards, **kw):
    fn = ring_forward if shards.strategy == "ring" else all_gather_forward
    return fn(q, k, v, shards=shards, **kw)


def backward(q, k, v, out, lse, dout, dlse, *, shards: SeqShards, **kw):
    fn = ring_backward if shards.strategy == "ring" else all_gather_backward
    return fn(q, k, v, out, lse, dout, dlse, shards=shards, **kw)

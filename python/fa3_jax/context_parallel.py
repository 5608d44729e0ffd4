"""Context parallelism: attention over a sequence axis sharded across devices.

When q/k/v reach the kernels under a multi-device ``jit`` with their sequence axis sharded on a
mesh axis, the partitioner (``_primitives``, layer 3) calls one of the per-shard schedules below
instead of gathering the sequence. Each schedule is written in terms of the existing kernel calls
only: a step that pairs a local query chunk at global offset ``a`` with a key/value chunk at global
offset ``b`` is the ordinary kernel call with the band ``diag_lo <= j - i <= diag_hi`` shifted by
``b - a``.

Strategies (``flash_attention(..., context_parallel=...)``):
  "ring" (default): K/V chunks travel around the mesh axis by ``ppermute`` (collective-permute);
    at each of the n steps every device runs the kernel on its local Q against the visiting K/V
    and merges the partial (out, lse) through the log-sum-exp (float32 accumulator). Step 0 (the
    device's own chunk, the diagonal) is peeled, steps 1..n-1 are a fori_loop; each step's
    transfer is issued before its kernels, so XLA may overlap them. The backward is a ring too:
    the global out and lse (saved by the forward) feed every step, so per-step dQ/dK/dV are exact
    terms of the full gradient (P_ij = exp(s_ij - lse_i) and D_i = rowsum(dO_i * O_i) - dlse_i
    are per-row global quantities, computed by the kernel from the out/lse it is given); dK/dV
    accumulate in float32 and travel with their K/V chunk (the running sum of the previous device
    arrives while this step's kernels run), one extra hop bringing them home. Memory per device
    is O(seqlen / n).
  "all_gather": K/V are all-gathered once, each device runs its local Q against the whole K/V
    (one kernel call per local chunk); the backward reduce-scatters dK/dV. Fewer, larger calls:
    for short sequences where the ring's per-step overhead dominates.
  "gather": the pre-context-parallel behaviour: q/k/v are gathered and every device computes the
    whole sequence.

Skipping: which chunk pairs are fully masked, fully visible or cut by the band depends on the
device index, which is a traced value in the SPMD program. For each step and chunk pair the
schedule lists the band of every device statically; when all devices agree the call is static (or
left out entirely when every device's block is masked), otherwise it is a ``lax.switch`` over the
few distinct cases (e.g. causal: full / skipped), each branch one static kernel call.

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
# The per-shard schedules
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


def _select(cases, step_index, device, call, empty):
    """``call(band)`` for this step's and this device's entry of ``cases`` ([step][device], a
    band or None for a skipped block).

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
    """Merges partial results (out, lse) over disjoint key sets; the accumulator's out is float32.

    NaN-free where both rows saw no key (lse -inf on both sides gives out 0, lse -inf)."""
    acc_out, acc_lse = acc
    out, lse = part
    m = jnp.maximum(acc_lse, lse)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e_acc, e_new = jnp.exp(acc_lse - m), jnp.exp(lse - m)
    total = e_acc + e_new
    safe = jnp.where(total > 0, total, 1.0)
    new_lse = jnp.where(total > 0, m + jnp.log(safe), -jnp.inf)
    new_out = (acc_out * _lse_weight(e_acc / safe)
               + out.astype(jnp.float32) * _lse_weight(e_new / safe))
    return new_out, new_lse


def _ring_send(x, shards: SeqShards):
    """Device r sends to r + 1 (mod n): at step t device r holds the K/V chunk of device r - t."""
    return lax.ppermute(x, shards.axis, [(i, (i + 1) % shards.n) for i in range(shards.n)])


def _ring(shards: SeqShards, first, step, init, kv):
    """Runs ``first(carry, kv)`` (step 0, the device's own K/V) and then ``step(carry, kv, t)``
    for t = 1..n-1 in a fori_loop, K/V travelling one hop per step.

    Each step's transfer is issued before its kernels so that they overlap. The loop (rather than
    unrolled steps) keeps the carried accumulators materialised once per step: unrolled, XLA fuses
    the n merges into one loop and keeps every step's partial result alive (O(seqlen) memory);
    here memory is O(seqlen / n): the local Q, two K/V chunks in flight and the accumulators."""
    kv_next = _ring_send(kv, shards)
    carry = first(init, kv)

    def body(t, state):
        kv, carry = state
        kv_next = _ring_send(kv, shards)  # the last step's send is unused; it overlaps anyway
        return kv_next, step(carry, kv, t)

    return lax.fori_loop(1, shards.n, body, (kv_next, carry))[1]


def _pair_cases(shards: SeqShards, steps, i, j, len_q, len_k, diag_lo, diag_hi):
    """[step][device] band of local query chunk i against visiting K/V chunk j."""
    n = shards.n
    return [[block_band(diag_lo, diag_hi, shards.chunk_ids(r)[i] * len_q,
                        shards.chunk_ids((r - t) % n)[j] * len_k, len_q, len_k)
             for r in range(n)] for t in steps]


def ring_forward(q, k, v, *, shards: SeqShards, seqlen_q, seqlen_k, diag_lo, diag_hi, kernel):
    """Per-shard ring forward. q/k/v are this device's shards; ``kernel(q, k, v, lo, hi)`` is one
    static kernel call returning (out, lse). Returns (out, lse) of the local query rows."""
    n, c = shards.n, shards.chunks
    cq, ck = seqlen_q // (n * c), seqlen_k // (n * c)
    device = lax.axis_index(shards.axis)
    b, _, hq, _ = q.shape
    q_parts = _split(q, c, 1)

    def empty():
        return (jnp.zeros((b, cq, hq, v.shape[3]), q.dtype),
                jnp.full((b, hq, cq), -jnp.inf, jnp.float32))

    def run(acc, kv, steps, step_index):
        k_parts, v_parts = _split(kv[0], c, 1), _split(kv[1], c, 1)
        acc = list(acc)
        for i in range(c):
            for j in range(c):
                cases = _pair_cases(shards, steps, i, j, cq, ck, diag_lo, diag_hi)
                part = _select(cases, step_index, device,
                               lambda band, i=i, j=j: kernel(q_parts[i], k_parts[j], v_parts[j],
                                                             *band), empty)
                if part is not None:
                    acc[i] = merge(acc[i], part)
        return tuple(acc)

    init = tuple((jnp.zeros((b, cq, hq, v.shape[3]), jnp.float32),
                  jnp.full((b, hq, cq), -jnp.inf, jnp.float32)) for _ in range(c))
    acc = _ring(shards, lambda acc, kv: run(acc, kv, [0], 0),
                lambda acc, kv, t: run(acc, kv, range(1, n), t - 1), init, (k, v))
    return (jnp.concatenate([o for o, _ in acc], axis=1).astype(q.dtype),
            jnp.concatenate([l for _, l in acc], axis=2))


def ring_backward(q, k, v, out, lse, dout, dlse, *, shards: SeqShards, seqlen_q, seqlen_k,
                  diag_lo, diag_hi, kernel):
    """Per-shard ring backward. ``kernel(q, k, v, out, lse, dout, dlse, lo, hi)`` returns
    (dq, dk, dv); out/lse are the global forward results of the local rows.

    dK/dV of a chunk accumulate (float32) as it travels: at step t a device adds its terms to the
    running sum it receives from the previous device, whose transfer overlaps this step's
    kernels; after the last step one more hop takes them home."""
    n, c = shards.n, shards.chunks
    cq, ck = seqlen_q // (n * c), seqlen_k // (n * c)
    device = lax.axis_index(shards.axis)
    q_p, out_p, dout_p = (_split(x, c, 1) for x in (q, out, dout))
    lse_p, dlse_p = (_split(x, c, 2) for x in (lse, dlse))

    def run(dq, kv, steps, step_index):
        """This step's dq (added to the carried one) and dk/dv terms of the visiting chunk."""
        k_parts, v_parts = _split(kv[0], c, 1), _split(kv[1], c, 1)
        dq = list(dq)
        dk = [jnp.zeros(p.shape, jnp.float32) for p in k_parts]
        dv = [jnp.zeros(p.shape, jnp.float32) for p in v_parts]
        for i in range(c):
            for j in range(c):
                def call(band, i=i, j=j):
                    return kernel(q_p[i], k_parts[j], v_parts[j], out_p[i], lse_p[i], dout_p[i],
                                  dlse_p[i], *band)

                def empty(i=i, j=j):
                    return (jnp.zeros(q_p[i].shape, q.dtype),
                            jnp.zeros(k_parts[j].shape, k.dtype),
                            jnp.zeros(v_parts[j].shape, v.dtype))

                cases = _pair_cases(shards, steps, i, j, cq, ck, diag_lo, diag_hi)
                grads = _select(cases, step_index, device, call, empty)
                if grads is not None:
                    dq[i] = dq[i] + grads[0].astype(jnp.float32)
                    dk[j] = dk[j] + grads[1].astype(jnp.float32)
                    dv[j] = dv[j] + grads[2].astype(jnp.float32)
        return tuple(dq), (jnp.concatenate(dk, axis=1), jnp.concatenate(dv, axis=1))

    def first(carry, kv):
        dq, _ = carry
        return run(dq, kv, [0], 0)

    def step(carry, kv, t):
        dq, dkv = carry
        received = _ring_send(dkv, shards)
        dq, local = run(dq, kv, range(1, n), t - 1)
        return dq, (received[0] + local[0], received[1] + local[1])

    init = (tuple(jnp.zeros(p.shape, jnp.float32) for p in q_p),
            (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)))
    dq, dkv = _ring(shards, first, step, init, (k, v))
    dk, dv = _ring_send(dkv, shards)
    return (jnp.concatenate(dq, axis=1).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype))


def _gather_natural(x, shards: SeqShards):
    """All-gathers the sequence axis (1) and returns it in natural token order."""
    full = lax.all_gather(x, shards.axis, axis=1, tiled=True)
    return load_balance_restore(full, shards.n) if shards.load_balanced else full


def _q_cases(shards: SeqShards, slot, seqlen_q, seqlen_k, diag_lo, diag_hi):
    """[1][device] band of local query chunk ``slot`` against the whole (natural-order) K/V."""
    cq = seqlen_q // (shards.n * shards.chunks)
    return [[block_band(diag_lo, diag_hi, shards.chunk_ids(r)[slot] * cq, 0, cq, seqlen_k)
             for r in range(shards.n)]]


def all_gather_forward(q, k, v, *, shards: SeqShards, seqlen_q, seqlen_k, diag_lo, diag_hi,
                       kernel):
    """Per-shard forward with K/V all-gathered once: one kernel call per local query chunk."""
    k_full, v_full = _gather_natural(k, shards), _gather_natural(v, shards)
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
                           lambda band, qi=qi: kernel(qi, k_full, v_full, *band), empty) or empty()
        outs.append(out)
        lses.append(lse)
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=2)


def all_gather_backward(q, k, v, out, lse, dout, dlse, *, shards: SeqShards, seqlen_q, seqlen_k,
                        diag_lo, diag_hi, kernel):
    """Per-shard backward of ``all_gather_forward``: dK/dV of the whole sequence are summed over
    the local chunks and reduce-scattered (in float32) back to their shards."""
    k_full, v_full = _gather_natural(k, shards), _gather_natural(v, shards)
    device = lax.axis_index(shards.axis)
    c = shards.chunks
    q_p, out_p, dout_p = (_split(x, c, 1) for x in (q, out, dout))
    lse_p, dlse_p = (_split(x, c, 2) for x in (lse, dlse))
    dq = []
    dk = jnp.zeros(k_full.shape, jnp.float32)
    dv = jnp.zeros(v_full.shape, jnp.float32)
    for i in range(c):
        def call(band, i=i):
            return kernel(q_p[i], k_full, v_full, out_p[i], lse_p[i], dout_p[i], dlse_p[i], *band)

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

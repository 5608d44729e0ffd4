"""Layer 2: the forward and backward primitives.

Each primitive has an abstract evaluation, a batching rule (a vmapped axis folds into the batch
axis: one kernel launch, no loop) and a lowering. The lowering goes through a
``custom_partitioning`` function (layer 3, below) so that under a multi-device ``jit`` the kernel
runs per shard on batch- and head-sharded operands; on one device it lowers straight to the FFI
call.

Static parameters, shared by both primitives:
  softmax_scale: float; softcap: float (0 disables);
  diag_lo, diag_hi: int, the visible band ``diag_lo <= j - i <= diag_hi`` (see cpp/flash.h);
  deterministic (backward only): bool;
  context_parallel: "ring", "all_gather" or "gather", how a sharded sequence axis runs;
  load_balance: int, 0 for natural token order, n for the load-balanced layout of n shards
    (context_parallel.load_balance_reorder).
The lowering adds one more, ``cuda``: the CUDA custom calls take one extra result, a uint8
workspace that XLA allocates (so XLA owns every byte the kernels use); the CPU calls do not.

Packed sequences (end of this file): ``packed_fwd_p`` / ``packed_bwd_p`` take two more int32
operands after the dense ones, ``meta_q`` and ``meta_k``: cu_seqlens ``[batch, num_seqs + 1]``
(``packing="varlen"``, band per sequence, bottom-right aligned; see cpp/flash.h) or segment ids
``[batch, seqlen]`` (``packing="segments"``). Static ``max_seqlen_q``/``max_seqlen_k`` bound the
varlen sequence lengths; ``context_parallel``/``load_balance`` as above. Batch and head axes stay
sharded; a sharded sequence with segment ids runs context-parallel (the ids follow their
sequence), varlen's packed token axes are gathered. On CUDA
both run on the Hopper kernels (16-bit; segment ids never split the keys or pack GQA heads).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import dispatch as _dispatch
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir
from jax.sharding import NamedSharding, PartitionSpec as P

from fa3_jax import _ffi, context_parallel
from fa3_jax.context_parallel import UNBOUNDED  # noqa: F401 (re-exported to the upper layers)


# ---------------------------------------------------------------------------------------------
# FFI calls (what runs on one device or one shard)
# ---------------------------------------------------------------------------------------------

def _mask_attrs(softmax_scale, softcap, diag_lo, diag_hi):
    return dict(softmax_scale=np.float32(softmax_scale), softcap=np.float32(softcap),
                diag_lo=np.int64(diag_lo), diag_hi=np.int64(diag_hi))


def _workspace_type(direction, q, k, v, deterministic=False, num_seqs=0, segments=False,
                    diag_lo=None, diag_hi=None):
    nbytes = _ffi.workspace_bytes(direction, q.shape, k.shape, v.shape, deterministic, num_seqs,
                                  segments=segments, diag_lo=diag_lo, diag_hi=diag_hi)
    return jax.ShapeDtypeStruct((nbytes,), jnp.uint8)


# GQA row packing for short queries on the Hopper forward: the query heads of one KV group
# become rows of one tile, so K/V stream once per group. seqlen_q 1 packs inside the kernel
# without a copy (cpp/hopper/flash_fwd_launch_sm90.h: pack_gqa). For 1 < seqlen_q the rows (position s,
# head j of the group) are not one stride apart, so q and out are transposed here, around the
# call, worth it only while the group's seqlen_q * group rows fit in one 128-row tile (block_m,
# cpp/hopper/tile_size.h): the transposes then move a few KB next to the K/V megabytes. The
# dense call packs only where every packed row sees the same keys (no mask at all); the KV-cache
# call packs under any band, since its kernel masks packed rows by position (packed_group,
# cpp/flash.h).
_PACKED_ROWS_MAX = 128


def _packs_gqa_rows(q_shape, k_shape, diag_lo=None, diag_hi=None, any_band=False):
    _, sq, hq, _ = q_shape
    sk, hkv = k_shape[1], k_shape[2]
    if not (1 < sq and hq > hkv and sq * (hq // hkv) <= _PACKED_ROWS_MAX):
        return False
    if any_band:
        return True
    if not (isinstance(diag_lo, (int, np.integer)) and isinstance(diag_hi, (int, np.integer))):
        return False  # band chosen per device (context parallelism): keep the plain call
    return diag_lo <= -(sq - 1) and diag_hi >= sk - 1


def _pack_gqa_rows(q, heads_kv):
    """q [b, sq, hq, d] -> [b, sq * group, heads_kv, d]: row s * group + j of KV head h is query
    position s of query head h * group + j."""
    b, sq, hq, d = q.shape
    g = hq // heads_kv
    return q.reshape(b, sq, heads_kv, g, d).transpose(0, 1, 3, 2, 4).reshape(b, sq * g, heads_kv, d)


def _unpack_gqa_rows(out, lse, heads_q):
    """out [b, sq * group, heads_kv, dv] and lse [b, heads_kv, sq * group] of packed rows back to
    [b, sq, heads_q, dv] and [b, heads_q, sq]."""
    b, rows, hkv, dv = out.shape
    g = heads_q // hkv
    sq = rows // g
    out = out.reshape(b, sq, g, hkv, dv).transpose(0, 1, 3, 2, 4).reshape(b, sq, heads_q, dv)
    lse = lse.reshape(b, hkv, sq, g).transpose(0, 1, 3, 2).reshape(b, heads_q, sq)
    return out, lse


def _fwd_ffi_packed_rows(q, k, v, softmax_scale, softcap, cuda):
    """The forward with the query heads of each KV group packed into the rows
    (_pack_gqa_rows). Returns out and lse unpacked."""
    out, lse = _fwd_ffi(_pack_gqa_rows(q, k.shape[2]), k, v, softmax_scale, softcap, -UNBOUNDED,
                        UNBOUNDED, cuda)
    return _unpack_gqa_rows(out, lse, q.shape[2])


def _fwd_ffi(q, k, v, softmax_scale, softcap, diag_lo, diag_hi, cuda):
    if cuda and _packs_gqa_rows(q.shape, k.shape, diag_lo, diag_hi):
        return _fwd_ffi_packed_rows(q, k, v, softmax_scale, softcap, cuda)
    b, sq, hq, _ = q.shape
    out_types = (jax.ShapeDtypeStruct((b, sq, hq, v.shape[3]), q.dtype),
                 jax.ShapeDtypeStruct((b, hq, sq), jnp.float32))
    if cuda:
        out_types += (_workspace_type("fwd", q, k, v),)
    call = jax.ffi.ffi_call("fa3_fwd", out_types)
    return tuple(call(q, k, v, **_mask_attrs(softmax_scale, softcap, diag_lo, diag_hi)))[:2]


def _bwd_ffi(q, k, v, out, lse, dout, dlse, softmax_scale, softcap, diag_lo, diag_hi,
             deterministic, cuda):
    out_types = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype))
    if cuda:
        out_types += (_workspace_type("bwd", q, k, v, deterministic, diag_lo=diag_lo,
                                      diag_hi=diag_hi),)
    call = jax.ffi.ffi_call("fa3_bwd", out_types)
    attrs = _mask_attrs(softmax_scale, softcap, diag_lo, diag_hi)
    return tuple(call(q, k, v, out, lse, dout, dlse, deterministic=bool(deterministic),
                      **attrs))[:3]


# ---------------------------------------------------------------------------------------------
# Layer 3: partitioning. Batch and head axes may stay sharded; a sharded sequence axis runs
# context-parallel (context_parallel.py: ring or all-gather schedules over the mesh axis that
# shards q's sequence); a sharded head_dim axis is gathered (``need_replication`` in the Shardy
# rule). Heads are split kv-head-major: query head h belongs to kv head h // (heads_q //
# heads_kv), so a shard holding kv heads [a, b) holds query heads [a*g, b*g) and GQA stays local.
# ---------------------------------------------------------------------------------------------

def _axis_size(mesh, entry) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names)


def _spec_entry(sharding, dim):
    if not isinstance(sharding, NamedSharding):
        return None
    spec = tuple(sharding.spec)
    return spec[dim] if dim < len(spec) else None


def _batch_head_axes(mesh, q_shape, k_shape):
    """The mesh axes that shard batch and heads of q, kept only where every operand splits evenly."""
    batch, heads_kv = q_shape.shape[0], k_shape.shape[2]
    b_ax = _spec_entry(q_shape.sharding, 0)
    h_ax = _spec_entry(q_shape.sharding, 2)
    if b_ax is not None and batch % _axis_size(mesh, b_ax):
        b_ax = None
    # A head split must keep whole GQA groups together: it has to divide heads_kv.
    if h_ax is not None and heads_kv % _axis_size(mesh, h_ax):
        h_ax = None
    if b_ax is not None and h_ax is not None:
        used = set(b_ax if isinstance(b_ax, tuple) else (b_ax,))
        if used & set(h_ax if isinstance(h_ax, tuple) else (h_ax,)):
            h_ax = None
    return b_ax, h_ax


def _seq_shards(mesh, q_shape, k_shape, strategy, load_balance):
    """How q's sharded sequence axis runs context-parallel, or None to gather it: for the
    "gather" strategy, a load-balanced layout made for another shard count, or lengths that the
    shards (times 2 chunks when load-balanced) do not divide."""
    entry = _spec_entry(q_shape.sharding, 1)
    n = _axis_size(mesh, entry)
    if entry is None or n == 1 or strategy == "gather":
        return None
    if load_balance and load_balance != n:
        return None
    chunks = 2 if load_balance else 1
    if q_shape.shape[1] % (n * chunks) or k_shape.shape[1] % (n * chunks):
        return None
    return context_parallel.SeqShards(entry, n, bool(load_balance), strategy)


def _shardings(mesh, arg_shapes, strategy, load_balance):
    """(tensor sharding [batch, seq, heads, dim], lse sharding [batch, heads, seq], SeqShards)."""
    b_ax, h_ax = _batch_head_axes(mesh, arg_shapes[0], arg_shapes[1])
    shards = _seq_shards(mesh, arg_shapes[0], arg_shapes[1], strategy, load_balance)
    s_ax = None if shards is None else shards.axis
    return (NamedSharding(mesh, P(b_ax, s_ax, h_ax, None)),
            NamedSharding(mesh, P(b_ax, h_ax, s_ax)), shards)


def _heads_factor(value_types):
    """Einsum factors for the query-head and kv-head axes, their sizes, and the factors that
    must stay unsharded."""
    shapes = [mlir.ir.RankedTensorType(t).shape for t in value_types[:2]]
    heads_q, heads_kv = shapes[0][2], shapes[1][2]
    if heads_q == heads_kv:
        return "h", "h", {}, ()
    if heads_kv == 1:
        # MQA: Shardy rejects a size-1 factor inside a compound one; keep heads whole.
        return "h", "g", {}, ("h", "g")
    return "(h r)", "h", {"r": heads_q // heads_kv}, ("r",)


def _seq_factors(value_types, strategy):
    """Einsum factors for the query and key sequence axes (one shared factor when the lengths
    agree, so that propagation shards q and k/v alike) and those that must stay unsharded."""
    shapes = [mlir.ir.RankedTensorType(t).shape for t in value_types[:2]]
    s, t = ("s", "s") if shapes[0][1] == shapes[1][1] else ("s", "t")
    return s, t, ((s, t) if strategy == "gather" else ())


def _in_rule_order(rule, factors):
    """Shardy wants the need_replication factors in their order of appearance in the rule."""
    order = []
    for tok in rule.replace("(", " ").replace(")", " ").replace(",", " ").split():
        if tok != "->" and tok not in order:
            order.append(tok)
    return tuple(sorted(set(factors), key=order.index))


def _fwd_rule(softmax_scale, softcap, diag_lo, diag_hi, strategy, load_balance, cuda, mesh,
              value_types, result_types):
    hq, hk, sizes, keep_whole = _heads_factor(value_types)
    s, t, gathered = _seq_factors(value_types, strategy)
    rule = f"b {s} {hq} d, b {t} {hk} d, b {t} {hk} e -> b {s} {hq} e, b {hq} {s}"
    repl = _in_rule_order(rule, ("d", "e") + gathered + keep_whole)
    return rule, dict(need_replication_factors=repl, **sizes)


def _bwd_rule(softmax_scale, softcap, diag_lo, diag_hi, deterministic, strategy, load_balance,
              cuda, mesh, value_types, result_types):
    hq, hk, sizes, keep_whole = _heads_factor(value_types)
    s, t, gathered = _seq_factors(value_types, strategy)
    rule = (f"b {s} {hq} d, b {t} {hk} d, b {t} {hk} e, b {s} {hq} e, b {hq} {s}, b {s} {hq} e, "
            f"b {hq} {s} -> b {s} {hq} d, b {t} {hk} d, b {t} {hk} e")
    repl = _in_rule_order(rule, ("d", "e") + gathered + keep_whole)
    return rule, dict(need_replication_factors=repl, **sizes)


def _in_natural_order(load_balance, call, tensors, lses=(), ids=()):
    """``call(*tensors, *lses, *ids)`` where the arrays are in the load-balanced layout of
    ``load_balance`` shards (0: natural order): they are put in natural order around the call
    (tensors [b, s, h, d] and ids [b, s]: sequence axis 1; lse-shaped [b, h, s]: axis 2) and its
    results go back to the layout."""
    if not load_balance:
        return call(*tensors, *lses, *ids)
    restore, reorder = context_parallel.load_balance_restore, context_parallel.load_balance_reorder
    results = call(*(restore(x, load_balance) for x in tensors),
                   *(restore(x, load_balance, axis=2) for x in lses),
                   *(restore(x, load_balance) for x in ids))
    return tuple(reorder(r, load_balance, axis=2 if r.ndim == 3 else 1) for r in results)


def _fwd_local(q, k, v, softmax_scale, softcap, diag_lo, diag_hi, strategy, load_balance, cuda):
    """The whole sequence in one call (one device, or a batch/head shard). A load-balanced
    sequence is put back in natural order around the kernel."""
    del strategy
    return _in_natural_order(
        load_balance, lambda q, k, v: _fwd_ffi(q, k, v, softmax_scale, softcap, diag_lo, diag_hi,
                                               cuda), (q, k, v))


def _bwd_local(q, k, v, out, lse, dout, dlse, softmax_scale, softcap, diag_lo, diag_hi,
               deterministic, strategy, load_balance, cuda):
    del strategy
    return _in_natural_order(
        load_balance, lambda q, k, v, out, dout, lse, dlse: _bwd_ffi(
            q, k, v, out, lse, dout, dlse, softmax_scale, softcap, diag_lo, diag_hi,
            deterministic, cuda), (q, k, v, out, dout), (lse, dlse))


def _fwd_partition(softmax_scale, softcap, diag_lo, diag_hi, strategy, load_balance, cuda, mesh,
                   arg_shapes, result_shape):
    t, lse, shards = _shardings(mesh, arg_shapes, strategy, load_balance)
    if shards is None:
        def lower_fn(q, k, v):
            return _fwd_local(q, k, v, softmax_scale, softcap, diag_lo, diag_hi, strategy,
                              load_balance, cuda)
    else:
        def kernel(q, k, v, lo, hi):
            return _fwd_ffi(q, k, v, softmax_scale, softcap, lo, hi, cuda)

        def lower_fn(q, k, v):
            return context_parallel.forward(
                q, k, v, shards=shards, seqlen_q=arg_shapes[0].shape[1],
                seqlen_k=arg_shapes[1].shape[1], diag_lo=diag_lo, diag_hi=diag_hi, kernel=kernel)

    return mesh, lower_fn, (t, lse), (t, t, t)


def _fwd_infer(softmax_scale, softcap, diag_lo, diag_hi, strategy, load_balance, cuda, mesh,
               arg_shapes, result_shape):
    t, lse, _ = _shardings(mesh, arg_shapes, strategy, load_balance)
    return (t, lse)


def _bwd_partition(softmax_scale, softcap, diag_lo, diag_hi, deterministic, strategy,
                   load_balance, cuda, mesh, arg_shapes, result_shape):
    t, lse, shards = _shardings(mesh, arg_shapes, strategy, load_balance)
    args = (t, t, t, t, lse, t, lse)
    if shards is None:
        def lower_fn(*args):
            return _bwd_local(*args, softmax_scale, softcap, diag_lo, diag_hi, deterministic,
                              strategy, load_balance, cuda)
    else:
        def kernel(q, k, v, out, lse_, dout, dlse, lo, hi):
            return _bwd_ffi(q, k, v, out, lse_, dout, dlse, softmax_scale, softcap, lo, hi,
                            deterministic, cuda)

        def lower_fn(*args):
            return context_parallel.backward(
                *args, shards=shards, seqlen_q=arg_shapes[0].shape[1],
                seqlen_k=arg_shapes[1].shape[1], diag_lo=diag_lo, diag_hi=diag_hi, kernel=kernel)

    return mesh, lower_fn, (t, t, t), args


def _bwd_infer(softmax_scale, softcap, diag_lo, diag_hi, deterministic, strategy, load_balance,
               cuda, mesh, arg_shapes, result_shape):
    t, _, _ = _shardings(mesh, arg_shapes, strategy, load_balance)
    return (t, t, t)


_fwd_partitioned = custom_partitioning(_fwd_local, static_argnums=tuple(range(3, 10)))
_fwd_partitioned.def_partition(partition=_fwd_partition, infer_sharding_from_operands=_fwd_infer,
                               sharding_rule=_fwd_rule)
_bwd_partitioned = custom_partitioning(_bwd_local, static_argnums=tuple(range(7, 15)))
_bwd_partitioned.def_partition(partition=_bwd_partition, infer_sharding_from_operands=_bwd_infer,
                               sharding_rule=_bwd_rule)


# ---------------------------------------------------------------------------------------------
# The primitives
# ---------------------------------------------------------------------------------------------

fwd_p = jex_core.Primitive("fa3_fwd")
fwd_p.multiple_results = True
bwd_p = jex_core.Primitive("fa3_bwd")
bwd_p.multiple_results = True


def _fwd_abstract(q, k, v, **params):
    b, sq, hq, _ = q.shape
    return (jax.core.ShapedArray((b, sq, hq, v.shape[3]), q.dtype),
            jax.core.ShapedArray((b, hq, sq), jnp.float32))


def _bwd_abstract(q, k, v, out, lse, dout, dlse, **params):
    return (jax.core.ShapedArray(q.shape, q.dtype), jax.core.ShapedArray(k.shape, k.dtype),
            jax.core.ShapedArray(v.shape, v.dtype))


def _fwd_lower_impl(q, k, v, *, softmax_scale, softcap, diag_lo, diag_hi, context_parallel,
                    load_balance, cuda=False):
    return _fwd_partitioned(q, k, v, softmax_scale, softcap, diag_lo, diag_hi, context_parallel,
                            load_balance, cuda)


def _bwd_lower_impl(q, k, v, out, lse, dout, dlse, *, softmax_scale, softcap, diag_lo, diag_hi,
                    deterministic, context_parallel, load_balance, cuda=False):
    return _bwd_partitioned(q, k, v, out, lse, dout, dlse, softmax_scale, softcap, diag_lo,
                            diag_hi, deterministic, context_parallel, load_balance, cuda)


def _fold_batched(args, dims):
    """Moves each vmapped axis to the front and folds it into the batch axis."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    folded = []
    for a, d in zip(args, dims):
        if d is None:  # not mapped
            a = jnp.broadcast_to(a, (size,) + a.shape)
        else:
            a = jnp.moveaxis(a, d, 0)
        folded.append(a.reshape((size * a.shape[1],) + a.shape[2:]))
    return size, folded


def _unfold(size, outs):
    return tuple(o.reshape((size, o.shape[0] // size) + o.shape[1:]) for o in outs)


def _folding_batcher(prim, num_outputs):
    """The batching rule of every primitive here: the vmapped axis folds into the batch axis."""
    def rule(args, dims, **params):
        size, folded = _fold_batched(args, dims)
        return _unfold(size, prim.bind(*folded, **params)), (0,) * num_outputs
    return rule


def _check_cuda_lowering(q, v, what):
    """Platform checks that only the CUDA lowering knows to make (raised at compile time)."""
    why = _ffi.cuda_unsupported(q.dtype, q.shape[3], v.shape[3])
    if why:
        raise ValueError(f"fa3_jax: {what} on a CUDA device: {why}")


def _cuda_fwd_lowering(ctx, q, k, v, **params):
    aq, _, av = ctx.avals_in
    _check_cuda_lowering(aq, av, "attention forward")
    return mlir.lower_fun(_fwd_lower_impl, multiple_results=True)(ctx, q, k, v, cuda=True,
                                                                   **params)


def _cuda_bwd_lowering(ctx, *args, **params):
    aq, _, av = ctx.avals_in[:3]
    _check_cuda_lowering(aq, av, "attention backward")
    return mlir.lower_fun(_bwd_lower_impl, multiple_results=True)(ctx, *args, cuda=True,
                                                                   **params)


def _apply(prim, *args, **params):
    return jax.jit(partial(prim.bind, **params))(*args)


# custom_partitioning needs the device assignment while lowering; jit supplies it only for the
# primitives listed here, and ours hide a custom_partitioning call inside their lowering.
_dispatch.prim_requires_devices_during_lowering.update({fwd_p, bwd_p})

def _register(prim, abstract, num_outputs, cpu_impl, cuda_lowering):
    """Abstract eval, eager impl (a jitted bind), the folding batcher, and the lowerings: the CPU
    one traces ``cpu_impl`` (the custom_partitioning call), the CUDA one is given whole."""
    prim.def_abstract_eval(abstract)
    prim.def_impl(partial(_apply, prim))
    batching.primitive_batchers[prim] = _folding_batcher(prim, num_outputs)
    mlir.register_lowering(prim, mlir.lower_fun(cpu_impl, multiple_results=True), platform="cpu")
    mlir.register_lowering(prim, cuda_lowering, platform="cuda")


_register(fwd_p, _fwd_abstract, 2, _fwd_lower_impl, _cuda_fwd_lowering)
_register(bwd_p, _bwd_abstract, 3, _bwd_lower_impl, _cuda_bwd_lowering)


# ---------------------------------------------------------------------------------------------
# Packed sequences: varlen (cu_seqlens) and segment ids. The dense layout plus two int32 operands
# per call; FFI targets fa3_{fwd,bwd}_{varlen,segments} (cpp/ffi_cpu.cc).
# ---------------------------------------------------------------------------------------------

PACKINGS = ("varlen", "segments")


def _packed_attrs(softmax_scale, softcap, diag_lo, diag_hi, max_seqlen_q, max_seqlen_k):
    return dict(_mask_attrs(softmax_scale, softcap, diag_lo, diag_hi),
                max_seqlen_q=np.int64(max_seqlen_q), max_seqlen_k=np.int64(max_seqlen_k))


def _packed_fwd_local(q, k, v, meta_q, meta_k, packing, softmax_scale, softcap, diag_lo, diag_hi,
                      max_seqlen_q, max_seqlen_k, strategy="gather", load_balance=0, cuda=False):
    """The packed forward on whole sequences (one device, a batch/head shard, or one kernel call
    of a context-parallel step); segment ids in a load-balanced layout are put in natural order
    around the kernel."""
    del strategy
    if load_balance:
        return _in_natural_order(
            load_balance, lambda q, k, v, meta_q, meta_k: _packed_fwd_local(
                q, k, v, meta_q, meta_k, packing, softmax_scale, softcap, diag_lo, diag_hi,
                max_seqlen_q, max_seqlen_k, cuda=cuda), (q, k, v), ids=(meta_q, meta_k))
    b, sq, hq, _ = q.shape
    out_types = (jax.ShapeDtypeStruct((b, sq, hq, v.shape[3]), q.dtype),
                 jax.ShapeDtypeStruct((b, hq, sq), jnp.float32))
    if cuda:  # varlen: the clamped cu_seqlens live there; segments: the ids' block stats
        segments = packing == "segments"
        num_seqs = 0 if segments else meta_q.shape[1] - 1
        out_types += (_workspace_type("fwd", q, k, v, num_seqs=num_seqs, segments=segments),)
    call = jax.ffi.ffi_call(f"fa3_fwd_{packing}", out_types)
    return tuple(call(q, k, v, meta_q, meta_k, **_packed_attrs(
        softmax_scale, softcap, diag_lo, diag_hi, max_seqlen_q, max_seqlen_k)))[:2]


def _packed_bwd_local(q, k, v, out, lse, dout, dlse, meta_q, meta_k, packing, softmax_scale,
                      softcap, diag_lo, diag_hi, deterministic, max_seqlen_q, max_seqlen_k,
                      strategy="gather", load_balance=0, cuda=False):
    del strategy
    if load_balance:
        return _in_natural_order(
            load_balance, lambda q, k, v, out, dout, lse, dlse, meta_q, meta_k: _packed_bwd_local(
                q, k, v, out, lse, dout, dlse, meta_q, meta_k, packing, softmax_scale, softcap,
                diag_lo, diag_hi, deterministic, max_seqlen_q, max_seqlen_k, cuda=cuda),
            (q, k, v, out, dout), (lse, dlse), (meta_q, meta_k))
    out_types = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype))
    if cuda:
        segments = packing == "segments"
        num_seqs = 0 if segments else meta_q.shape[1] - 1
        out_types += (_workspace_type("bwd", q, k, v, deterministic, num_seqs, segments),)
    call = jax.ffi.ffi_call(f"fa3_bwd_{packing}", out_types)
    return tuple(call(q, k, v, out, lse, dout, dlse, meta_q, meta_k,
                      deterministic=bool(deterministic), **_packed_attrs(
                          softmax_scale, softcap, diag_lo, diag_hi, max_seqlen_q, max_seqlen_k)))[:3]


# Static arguments of the packed partitioned calls, after the operands (cuda last).
_PACKED_FWD_STATIC = ("packing", "softmax_scale", "softcap", "diag_lo", "diag_hi", "max_seqlen_q",
                      "max_seqlen_k", "strategy", "load_balance", "cuda")
_PACKED_BWD_STATIC = ("packing", "softmax_scale", "softcap", "diag_lo", "diag_hi",
                      "deterministic", "max_seqlen_q", "max_seqlen_k", "strategy", "load_balance",
                      "cuda")


def _packed_shardings(mesh, arg_shapes, packing, strategy, load_balance):
    """(tensor, lse, metadata shardings, SeqShards or None). Batch and heads as for the dense
    call. Segment ids follow their sequence, which runs context-parallel as the dense call's
    does; varlen's packed token axis (and its cu_seqlens) stays whole."""
    if packing != "segments":
        strategy, load_balance = "gather", 0
    t, lse, shards = _shardings(mesh, arg_shapes, strategy, load_balance)
    return t, lse, NamedSharding(mesh, P(*tuple(t.spec)[:2])), shards


def _packed_rule(static, value_types, n_dense):
    """Shardy rule: the dense rule plus the metadata. Segment ids [b, seqlen] share their
    sequence's factor; cu_seqlens [b, m] / [b, n] and varlen's token axes stay whole."""
    hq, hk, sizes, keep_whole = _heads_factor(value_types)
    if static["packing"] == "segments":
        s, t, whole = _seq_factors(value_types, static["strategy"])
        ms, mt = s, t
    else:
        s, t, ms, mt = "s", "t", "m", "n"
        whole = (s, t, ms, mt)
    dense = f"b {s} {hq} d, b {t} {hk} d, b {t} {hk} e"
    if n_dense == 3:
        rule = f"{dense}, b {ms}, b {mt} -> b {s} {hq} e, b {hq} {s}"
    else:
        rule = (f"{dense}, b {s} {hq} e, b {hq} {s}, b {s} {hq} e, b {hq} {s}, b {ms}, b {mt} "
                f"-> b {s} {hq} d, b {t} {hk} d, b {t} {hk} e")
    repl = _in_rule_order(rule, ("d", "e") + whole + keep_whole)
    return rule, dict(need_replication_factors=repl, **sizes)


def _packed_fwd_partition(*static_and_mesh):
    *static, mesh, arg_shapes, result_shape = static_and_mesh
    st = dict(zip(_PACKED_FWD_STATIC, static))
    t, lse, meta, shards = _packed_shardings(mesh, arg_shapes, st["packing"], st["strategy"],
                                             st["load_balance"])
    if shards is None:
        def lower_fn(q, k, v, meta_q, meta_k):
            return _packed_fwd_local(q, k, v, meta_q, meta_k, *static)
    else:
        def kernel(q, k, v, lo, hi, q_ids, kv_ids):
            return _packed_fwd_local(q, k, v, q_ids, kv_ids, "segments", st["softmax_scale"],
                                     st["softcap"], lo, hi, 0, 0, cuda=st["cuda"])

        def lower_fn(q, k, v, meta_q, meta_k):
            return context_parallel.forward(
                q, k, v, shards=shards, seqlen_q=arg_shapes[0].shape[1],
                seqlen_k=arg_shapes[1].shape[1], diag_lo=st["diag_lo"], diag_hi=st["diag_hi"],
                kernel=kernel, q_ids=meta_q, kv_ids=meta_k)

    return mesh, lower_fn, (t, lse), (t, t, t, meta, meta)


def _packed_bwd_partition(*static_and_mesh):
    *static, mesh, arg_shapes, result_shape = static_and_mesh
    st = dict(zip(_PACKED_BWD_STATIC, static))
    t, lse, meta, shards = _packed_shardings(mesh, arg_shapes, st["packing"], st["strategy"],
                                             st["load_balance"])
    if shards is None:
        def lower_fn(*args):
            return _packed_bwd_local(*args, *static)
    else:
        def kernel(q, k, v, out, lse_, dout, dlse, lo, hi, q_ids, kv_ids):
            return _packed_bwd_local(q, k, v, out, lse_, dout, dlse, q_ids, kv_ids, "segments",
                                     st["softmax_scale"], st["softcap"], lo, hi,
                                     st["deterministic"], 0, 0, cuda=st["cuda"])

        def lower_fn(q, k, v, out, lse_, dout, dlse, meta_q, meta_k):
            return context_parallel.backward(
                q, k, v, out, lse_, dout, dlse, shards=shards, seqlen_q=arg_shapes[0].shape[1],
                seqlen_k=arg_shapes[1].shape[1], diag_lo=st["diag_lo"], diag_hi=st["diag_hi"],
                kernel=kernel, q_ids=meta_q, kv_ids=meta_k)

    return mesh, lower_fn, (t, t, t), (t, t, t, t, lse, t, lse, meta, meta)


def _packed_fwd_infer(*static_and_mesh):
    st = dict(zip(_PACKED_FWD_STATIC, static_and_mesh[:-3]))
    t, lse, _, _ = _packed_shardings(*static_and_mesh[-3:-1], st["packing"], st["strategy"],
                                     st["load_balance"])
    return (t, lse)


def _packed_bwd_infer(*static_and_mesh):
    st = dict(zip(_PACKED_BWD_STATIC, static_and_mesh[:-3]))
    t, _, _, _ = _packed_shardings(*static_and_mesh[-3:-1], st["packing"], st["strategy"],
                                   st["load_balance"])
    return (t, t, t)


_packed_fwd_partitioned = custom_partitioning(
    _packed_fwd_local, static_argnums=tuple(range(5, 5 + len(_PACKED_FWD_STATIC))))
_packed_fwd_partitioned.def_partition(
    partition=_packed_fwd_partition, infer_sharding_from_operands=_packed_fwd_infer,
    sharding_rule=lambda *a: _packed_rule(dict(zip(_PACKED_FWD_STATIC, a[:-3])), a[-2], 3))
_packed_bwd_partitioned = custom_partitioning(
    _packed_bwd_local, static_argnums=tuple(range(9, 9 + len(_PACKED_BWD_STATIC))))
_packed_bwd_partitioned.def_partition(
    partition=_packed_bwd_partition, infer_sharding_from_operands=_packed_bwd_infer,
    sharding_rule=lambda *a: _packed_rule(dict(zip(_PACKED_BWD_STATIC, a[:-3])), a[-2], 7))

packed_fwd_p = jex_core.Primitive("fa3_fwd_packed")
packed_fwd_p.multiple_results = True
packed_bwd_p = jex_core.Primitive("fa3_bwd_packed")
packed_bwd_p.multiple_results = True


def _packed_fwd_lower_impl(q, k, v, meta_q, meta_k, *, packing, softmax_scale, softcap, diag_lo,
                           diag_hi, max_seqlen_q, max_seqlen_k, context_parallel="gather",
                           load_balance=0, cuda=False):
    return _packed_fwd_partitioned(q, k, v, meta_q, meta_k, packing, softmax_scale, softcap,
                                   diag_lo, diag_hi, max_seqlen_q, max_seqlen_k, context_parallel,
                                   load_balance, cuda)


def _packed_bwd_lower_impl(q, k, v, out, lse, dout, dlse, meta_q, meta_k, *, packing,
                           softmax_scale, softcap, diag_lo, diag_hi, deterministic, max_seqlen_q,
                           max_seqlen_k, context_parallel="gather", load_balance=0, cuda=False):
    return _packed_bwd_partitioned(q, k, v, out, lse, dout, dlse, meta_q, meta_k, packing,
                                   softmax_scale, softcap, diag_lo, diag_hi, deterministic,
                                   max_seqlen_q, max_seqlen_k, context_parallel, load_balance,
                                   cuda)


def _packed_cuda_lowering(impl, direction):
    """CUDA lowering of a packed primitive (varlen or segment ids) on the Hopper kernels."""
    def lowering(ctx, *args, packing, **params):
        what = "variable-length" if packing == "varlen" else "segment-id"
        aq, _, av = ctx.avals_in[:3]
        _check_cuda_lowering(aq, av, f"{what} attention {direction}")
        return mlir.lower_fun(impl, multiple_results=True)(ctx, *args, packing=packing,
                                                           cuda=True, **params)
    return lowering


_dispatch.prim_requires_devices_during_lowering.update({packed_fwd_p, packed_bwd_p})

_register(packed_fwd_p, lambda q, k, v, meta_q, meta_k, **_: _fwd_abstract(q, k, v), 2,
          _packed_fwd_lower_impl, _packed_cuda_lowering(_packed_fwd_lower_impl, "forward"))
_register(packed_bwd_p, lambda q, k, v, *rest, **_: _bwd_abstract(q, k, v, *rest[:4]), 3,
          _packed_bwd_lower_impl, _packed_cuda_lowering(_packed_bwd_lower_impl, "backward"))


# ---------------------------------------------------------------------------------------------
# KV cache forward (python/fa3_jax/kvcache.py): q plus the cache k/v and int32 ``seqused_k
# [batch]``, the keys used per batch row (cpp/flash.h, "Used key lengths": the band is
# bottom-right aligned to them). Contiguous: k/v [batch, capacity, heads_kv, dim] (FFI target
# fa3_fwd_kvcache). Paged (``paged=True``): k/v a pool [num_pages, page_size, heads_kv, dim] and
# one more operand, int32 ``page_table [batch, max_pages_per_seq]`` (fa3_fwd_kvcache_paged;
# cpp/flash.h, "Paged"). Static ``num_splits`` (0: the kernel's heuristic) is the split-KV count
# on Hopper. Forward only. Batch and head axes stay sharded, sequence axes are gathered; a
# paged pool (shared by the rows) may be sharded on heads only.
# ---------------------------------------------------------------------------------------------

def _kvcache_fwd_local(q, k, v, seqused_k, page_table, softmax_scale, softcap, diag_lo, diag_hi,
                       num_splits, cuda=False):
    hq = q.shape[2]
    # seqlen_q > 1 (speculative decoding): the group's query heads packed into the rows, masked
    # by position in the kernel (cpp/flash.h, packed_group); seqlen_q 1 packs in the kernel.
    group = hq // k.shape[2] if cuda and _packs_gqa_rows(q.shape, k.shape, any_band=True) else 1
    if group > 1:
        q = _pack_gqa_rows(q, k.shape[2])
    b, sq, hq, _ = q.shape
    out_types = (jax.ShapeDtypeStruct((b, sq, hq, v.shape[3]), q.dtype),
                 jax.ShapeDtypeStruct((b, hq, sq), jnp.float32))
    operands = (q, k, v, seqused_k)
    if page_table is not None:
        operands += (page_table,)
    if cuda:
        # The kernel's plan sees the per-row view [batch, capacity, ...] either way.
        capacity = k.shape[1] * (page_table.shape[1] if page_table is not None else 1)
        view = lambda x: (b, capacity) + tuple(x.shape[2:])  # noqa: E731
        nbytes = _ffi.workspace_bytes("fwd", q.shape, view(k), view(v), seqused=True,
                                      num_splits=num_splits,
                                      page_size=k.shape[1] if page_table is not None else 0)
        out_types += (jax.ShapeDtypeStruct((nbytes,), jnp.uint8),)
    target = "fa3_fwd_kvcache" if page_table is None else "fa3_fwd_kvcache_paged"
    call = jax.ffi.ffi_call(target, out_types)
    out, lse = call(*operands, num_splits=np.int64(num_splits), packed_group=np.int64(group),
                    **_mask_attrs(softmax_scale, softcap, diag_lo, diag_hi))[:2]
    return _unpack_gqa_rows(out, lse, hq * group) if group > 1 else (out, lse)


def _kvcache_contiguous_local(q, k, v, seqused_k, *static):
    return _kvcache_fwd_local(q, k, v, seqused_k, None, *static)


def _kvcache_shardings(mesh, arg_shapes, paged):
    """(q/out, lse, k/v, per-row metadata) shardings."""
    b_ax, h_ax = _batch_head_axes(mesh, arg_shapes[0], arg_shapes[1])
    t = NamedSharding(mesh, P(b_ax, None, h_ax, None))
    kv = NamedSharding(mesh, P(None, None, h_ax, None)) if paged else t
    return t, NamedSharding(mesh, P(b_ax, h_ax, None)), kv, b_ax


def _kvcache_partition(paged):
    def partition(*static_and_mesh):
        *static, mesh, arg_shapes, result_shape = static_and_mesh
        t, lse, kv, b_ax = _kvcache_shardings(mesh, arg_shapes, paged)
        rows = (NamedSharding(mesh, P(b_ax)),)
        if paged:
            rows += (NamedSharding(mesh, P(b_ax, None)),)

        def lower_fn(q, k, v, *meta):
            return _kvcache_fwd_local(q, k, v, meta[0], meta[1] if paged else None, *static)

        return mesh, lower_fn, (t, lse), (t, kv, kv) + rows
    return partition


def _kvcache_infer(paged):
    def infer(*static_and_mesh):
        t, lse, _, _ = _kvcache_shardings(*static_and_mesh[-3:-1], paged)
        return (t, lse)
    return infer


def _kvcache_rule(paged):
    def rule(*static_and_mesh):
        hq, hk, sizes, keep_whole = _heads_factor(static_and_mesh[-2])
        if paged:  # the pool's pages (p) and page rows (t) are not the batch
            text = f"b s {hq} d, p t {hk} d, p t {hk} e, b, b m -> b s {hq} e, b {hq} s"
            whole = ("s", "p", "t", "d", "e", "m")
        else:
            text = f"b s {hq} d, b t {hk} d, b t {hk} e, b -> b s {hq} e, b {hq} s"
            whole = ("s", "t", "d", "e")
        return text, dict(need_replication_factors=_in_rule_order(text, whole + keep_whole),
                          **sizes)
    return rule


_kvcache_contiguous = custom_partitioning(_kvcache_contiguous_local,
                                          static_argnums=tuple(range(4, 10)))
_kvcache_contiguous.def_partition(
    partition=_kvcache_partition(False), infer_sharding_from_operands=_kvcache_infer(False),
    sharding_rule=_kvcache_rule(False))
_kvcache_paged = custom_partitioning(_kvcache_fwd_local, static_argnums=tuple(range(5, 11)))
_kvcache_paged.def_partition(
    partition=_kvcache_partition(True), infer_sharding_from_operands=_kvcache_infer(True),
    sharding_rule=_kvcache_rule(True))

kvcache_fwd_p = jex_core.Primitive("fa3_fwd_kvcache")
kvcache_fwd_p.multiple_results = True


def _kvcache_fwd_lower_impl(q, k, v, seqused_k, *page_table, softmax_scale, softcap, diag_lo,
                            diag_hi, num_splits, cuda=False):
    static = (softmax_scale, softcap, diag_lo, diag_hi, num_splits, cuda)
    if page_table:
        return _kvcache_paged(q, k, v, seqused_k, page_table[0], *static)
    return _kvcache_contiguous(q, k, v, seqused_k, *static)


def _kvcache_cuda_lowering(ctx, *args, **params):
    aq, _, av = ctx.avals_in[:3]
    _check_cuda_lowering(aq, av, "KV-cache attention")
    return mlir.lower_fun(_kvcache_fwd_lower_impl, multiple_results=True)(ctx, *args, cuda=True,
                                                                           **params)


def _kvcache_batcher(args, dims, **params):
    """vmap: the contiguous call folds as every primitive here does. A paged pool is shared by
    the rows: unmapped, it stays as it is; mapped, instance i's pool becomes pages
    [i * num_pages, (i + 1) * num_pages) of one pool and its page indices move with it (an index
    outside its pool stays outside every pool)."""
    if len(args) == 4:
        return _folding_batcher(kvcache_fwd_p, 2)(args, dims, **params)
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)

    def lead(a, d):  # the vmapped axis first (broadcast when unmapped)
        return jnp.moveaxis(a, d, 0) if d is not None else jnp.broadcast_to(a, (size,) + a.shape)

    q, k, v, used, table = args
    dq, dk, dv, du, dt = dims
    q, used, table = (lead(a, d) for a, d in ((q, dq), (used, du), (table, dt)))
    q, used, table = (x.reshape((-1,) + x.shape[2:]) for x in (q, used, table))
    if dk is None and dv is None:
        pool_k, pool_v = k, v
    else:
        k, v = lead(k, dk), lead(v, dv)
        pages = k.shape[1]
        rows = table.shape[0] // size
        inst = (jnp.arange(size * rows, dtype=jnp.int32) // rows)[:, None]
        table = jnp.where((table >= 0) & (table < pages), table + inst * pages, -1)
        pool_k = k.reshape((size * pages,) + k.shape[2:])
        pool_v = v.reshape((size * pages,) + v.shape[2:])
    outs = kvcache_fwd_p.bind(q, pool_k, pool_v, used, table, **params)
    return _unfold(size, outs), (0, 0)


_dispatch.prim_requires_devices_during_lowering.add(kvcache_fwd_p)
_register(kvcache_fwd_p, lambda q, k, v, *meta, **_: _fwd_abstract(q, k, v), 2,
          _kvcache_fwd_lower_impl, _kvcache_cuda_lowering)
batching.primitive_batchers[kvcache_fwd_p] = _kvcache_batcher


# ---------------------------------------------------------------------------------------------
# FP8 forward: float8_e4m3fn q/k/v with float32 descales (cpp/flash.h, "FP8"); out bfloat16, lse
# float32. Operands q, k, v, descale_q, descale_k, descale_v; static parameters the mask's plus
# ``block_q``/``block_k``, the rows per scale block (0 and 0: per-tensor descales [batch,
# heads_kv]; else descale_q [batch, heads_q, ceil(seqlen_q / block_q)] and descale_k/v [batch,
# heads_kv, ceil(seqlen_k / block_k)]). Forward only: differentiating raises. On CUDA per-block
# descales must be on the Hopper FP8 kernel's tiles. Under a multi-device jit, batch and head
# sharding stay local as for the dense call (descales follow their tensor's batch and heads); a
# sharded sequence is gathered (no FP8 context parallelism yet).
# ---------------------------------------------------------------------------------------------

fp8_fwd_p = jex_core.Primitive("fa3_fwd_fp8")
fp8_fwd_p.multiple_results = True

def _fp8_fwd_abstract(q, k, v, descale_q, descale_k, descale_v, **params):
    b, sq, hq, _ = q.shape
    return (jax.core.ShapedArray((b, sq, hq, v.shape[3]), jnp.bfloat16),
            jax.core.ShapedArray((b, hq, sq), jnp.float32))


def _fp8_fwd_local(q, k, v, descale_q, descale_k, descale_v, softmax_scale, softcap, diag_lo,
                   diag_hi, block_q, block_k, cuda=False):
    b, sq, hq, _ = q.shape
    out_types = (jax.ShapeDtypeStruct((b, sq, hq, v.shape[3]), jnp.bfloat16),
                 jax.ShapeDtypeStruct((b, hq, sq), jnp.float32))
    if cuda:  # the tile counter, then V transposed by the kernel (cpp/hopper/fp8_vt_sm90.h)
        nbytes = _ffi.workspace_bytes("fwd", q.shape, k.shape, v.shape, fp8=True)
        out_types += (jax.ShapeDtypeStruct((nbytes,), jnp.uint8),)
    call = jax.ffi.ffi_call("fa3_fwd_fp8", out_types)
    return tuple(call(q, k, v, descale_q, descale_k, descale_v,
                      descale_block_q=np.int64(block_q), descale_block_k=np.int64(block_k),
                      **_mask_attrs(softmax_scale, softcap, diag_lo, diag_hi)))[:2]


def _fp8_shardings(mesh, arg_shapes, per_block):
    """(tensor, lse, descale) shardings: batch and heads as for the dense call, the rest whole.
    Per-tensor descales are [batch, heads_kv]; per-block ones [batch, heads, blocks]."""
    b_ax, h_ax = _batch_head_axes(mesh, arg_shapes[0], arg_shapes[1])
    scale = P(b_ax, h_ax, None) if per_block else P(b_ax, h_ax)
    return (NamedSharding(mesh, P(b_ax, None, h_ax, None)), NamedSharding(mesh, P(b_ax, h_ax, None)),
            NamedSharding(mesh, scale))


def _fp8_fwd_partition(*static_and_mesh):
    *static, mesh, arg_shapes, result_shape = static_and_mesh
    t, lse, scale = _fp8_shardings(mesh, arg_shapes, static[4] > 0)

    def lower_fn(*args):
        return _fp8_fwd_local(*args, *static)

    return mesh, lower_fn, (t, lse), (t, t, t, scale, scale, scale)


def _fp8_fwd_infer(*static_and_mesh):
    t, lse, _ = _fp8_shardings(*static_and_mesh[-3:-1], static_and_mesh[4] > 0)
    return (t, lse)


def _fp8_fwd_rule(*static_and_mesh):
    """Shardy rule: the dense rule with whole sequences, plus the descales' batch and heads."""
    value_types = static_and_mesh[-2]
    hq, hk, sizes, keep_whole = _heads_factor(value_types)
    if static_and_mesh[4] > 0:  # per block: q's blocks m, k/v's blocks n
        scales = f"b {hq} m, b {hk} n, b {hk} n"
    else:  # per tensor: all three [batch, heads_kv]
        scales = f"b {hk}, b {hk}, b {hk}"
    rule = f"b s {hq} d, b t {hk} d, b t {hk} e, {scales} -> b s {hq} e, b {hq} s"
    repl = _in_rule_order(rule, ("s", "t", "d", "e") + (("m", "n") if "m" in scales else ())
                          + keep_whole)
    return rule, dict(need_replication_factors=repl, **sizes)


_fp8_fwd_partitioned = custom_partitioning(_fp8_fwd_local, static_argnums=tuple(range(6, 13)))
_fp8_fwd_partitioned.def_partition(partition=_fp8_fwd_partition,
                                   infer_sharding_from_operands=_fp8_fwd_infer,
                                   sharding_rule=_fp8_fwd_rule)


def _fp8_fwd_lower_impl(q, k, v, descale_q, descale_k, descale_v, *, softmax_scale, softcap,
                        diag_lo, diag_hi, block_q, block_k, cuda=False):
    return _fp8_fwd_partitioned(q, k, v, descale_q, descale_k, descale_v, softmax_scale, softcap,
                                diag_lo, diag_hi, block_q, block_k, cuda)


def _fp8_cuda_lowering(ctx, *args, block_q, block_k, **params):
    aq, _, av = ctx.avals_in[:3]
    why = _ffi.cuda_unsupported_fp8(aq.shape[3], av.shape[3], block_q, block_k)
    if why:
        raise ValueError(f"fa3_jax: FP8 attention on a CUDA device: {why}")
    return mlir.lower_fun(_fp8_fwd_lower_impl, multiple_results=True)(
        ctx, *args, block_q=block_q, block_k=block_k, cuda=True, **params)


def _fp8_no_derivative(primals, tangents, **params):
    raise TypeError(
        "fa3_jax: FP8 attention is forward only for now: it has no gradient. Differentiate a "
        "bfloat16/float16 flash_attention instead, or wrap the FP8 call's inputs in "
        "jax.lax.stop_gradient")


ad.primitive_jvps[fp8_fwd_p] = _fp8_no_derivative
_dispatch.prim_requires_devices_during_lowering.add(fp8_fwd_p)
_register(fp8_fwd_p, _fp8_fwd_abstract, 2, _fp8_fwd_lower_impl, _fp8_cuda_lowering)


# ---------------------------------------------------------------------------------------------
# FP8 quantization of one tensor (cpp/flash.h, "FP8 quantization"): x [batch, seqlen, heads,
# head_dim] float32/float16/bfloat16 and signs float32 [batch, head_dim] (one sign vector per
# batch row, so that a vmapped seed folds into the batch like everything else; read only when
# ``hadamard``) -> x8 float8_e4m3fn like x and float32 descales: [batch, heads, ceil(seqlen /
# block_rows)], or for block_rows 0 [batch, heads // group], one per group of ``group``
# consecutive heads (GQA). Static: block_rows, group, hadamard. Batch and head axes stay sharded
# (a head split must divide heads // group, keeping descale groups whole); seqlen and head_dim are
# gathered. Not differentiable.
# ---------------------------------------------------------------------------------------------

def _fp8_quantize_local(x, signs, block_rows, group, hadamard, cuda):
    b, s, h, _ = x.shape
    heads_kv = h // group
    descale_shape = (b, h, -(-s // block_rows)) if block_rows else (b, heads_kv)
    out_types = (jax.ShapeDtypeStruct(x.shape, jnp.float8_e4m3fn),
                 jax.ShapeDtypeStruct(descale_shape, jnp.float32))
    if cuda:  # the group maxima of the per-tensor form
        nbytes = _ffi.fp8_quantize_workspace_bytes(b, heads_kv, block_rows)
        out_types += (jax.ShapeDtypeStruct((nbytes,), jnp.uint8),)
    call = jax.ffi.ffi_call("fa3_fp8_quantize", out_types)
    return tuple(call(x, signs, block_rows=np.int64(block_rows), heads_kv=np.int64(heads_kv),
                      hadamard=bool(hadamard)))[:2]


def _fp8_quantize_shardings(mesh, x_shape, block_rows, group):
    """(x and x8 sharding, signs sharding, descale sharding): batch and heads as x has them
    where they split evenly (heads: whole descale groups), the rest whole."""
    batch, heads = x_shape.shape[0], x_shape.shape[2]
    b_ax, h_ax = _spec_entry(x_shape.sharding, 0), _spec_entry(x_shape.sharding, 2)
    if b_ax is not None and batch % _axis_size(mesh, b_ax):
        b_ax = None
    if h_ax is not None and (heads // group) % _axis_size(mesh, h_ax):
        h_ax = None
    if b_ax is not None and h_ax is not None:
        used = set(b_ax if isinstance(b_ax, tuple) else (b_ax,))
        if used & set(h_ax if isinstance(h_ax, tuple) else (h_ax,)):
            h_ax = None
    descale = P(b_ax, h_ax, None) if block_rows else P(b_ax, h_ax)
    return (NamedSharding(mesh, P(b_ax, None, h_ax, None)), NamedSharding(mesh, P(b_ax, None)),
            NamedSharding(mesh, descale))


def _fp8_quantize_partition(block_rows, group, hadamard, cuda, mesh, arg_shapes, result_shape):
    x, signs, descale = _fp8_quantize_shardings(mesh, arg_shapes[0], block_rows, group)

    def lower_fn(x_, signs_):
        return _fp8_quantize_local(x_, signs_, block_rows, group, hadamard, cuda)

    return mesh, lower_fn, (x, descale), (x, signs)


def _fp8_quantize_infer(block_rows, group, hadamard, cuda, mesh, arg_shapes, result_shape):
    x, _, descale = _fp8_quantize_shardings(mesh, arg_shapes[0], block_rows, group)
    return (x, descale)


def _fp8_quantize_rule(block_rows, group, hadamard, cuda, mesh, value_types, result_types):
    heads = mlir.ir.RankedTensorType(value_types[0]).shape[2]
    if block_rows:
        rule, sizes, keep = "b s h d, b e -> b s h d, b h n", {}, ("n",)
    elif group == 1:
        rule, sizes, keep = "b s h d, b e -> b s h d, b h", {}, ()
    elif group == heads:  # one group: Shardy rejects a size-1 factor inside a compound one
        rule, sizes, keep = "b s h d, b e -> b s h d, b g", {}, ("h", "g")
    else:
        rule, sizes, keep = "b s (h r) d, b e -> b s (h r) d, b h", {"r": group}, ("r",)
    repl = _in_rule_order(rule, ("s", "d", "e") + keep)
    return rule, dict(need_replication_factors=repl, **sizes)


_fp8_quantize_partitioned = custom_partitioning(_fp8_quantize_local, static_argnums=(2, 3, 4, 5))
_fp8_quantize_partitioned.def_partition(
    partition=_fp8_quantize_partition, infer_sharding_from_operands=_fp8_quantize_infer,
    sharding_rule=_fp8_quantize_rule)

fp8_quantize_p = jex_core.Primitive("fa3_fp8_quantize")
fp8_quantize_p.multiple_results = True


def _fp8_quantize_abstract(x, signs, *, block_rows, group, hadamard):
    b, s, h, _ = x.shape
    descale_shape = (b, h, -(-s // block_rows)) if block_rows else (b, h // group)
    return (jax.core.ShapedArray(x.shape, jnp.float8_e4m3fn),
            jax.core.ShapedArray(descale_shape, jnp.float32))


def _fp8_quantize_lower_impl(x, signs, *, block_rows, group, hadamard, cuda=False):
    return _fp8_quantize_partitioned(x, signs, block_rows, group, hadamard, cuda)


def _fp8_quantize_cuda_lowering(ctx, x, signs, *, block_rows, **params):
    why = _ffi.cuda_unsupported_fp8_quantize(ctx.avals_in[0].shape[3], block_rows)
    if why:
        raise ValueError(f"fa3_jax: FP8 quantization on a CUDA device: {why} "
                         "(fa3_jax.fp8.quantize(..., fused=False) runs the pass as XLA ops)")
    return mlir.lower_fun(_fp8_quantize_lower_impl, multiple_results=True)(
        ctx, x, signs, block_rows=block_rows, cuda=True, **params)


def fp8_quantize(x, signs, *, block_rows, group, hadamard):
    """Binds fp8_quantize_p: (x8, descale) of one tensor (see the section comment)."""
    return fp8_quantize_p.bind(x, signs, block_rows=int(block_rows), group=int(group),
                               hadamard=bool(hadamard))


ad.primitive_jvps[fp8_quantize_p] = _fp8_no_derivative
_dispatch.prim_requires_devices_during_lowering.add(fp8_quantize_p)
_register(fp8_quantize_p, _fp8_quantize_abstract, 2, _fp8_quantize_lower_impl,
          _fp8_quantize_cuda_lowering)

"""Packed variable-length attention: a batch of documents, fa3_jax varlen against its peers.

Workload: --tokens tokens (16k) of documents whose lengths are drawn uniformly from
[--min-len, --max-len] (128..4096, seeded; the last one is cut to fill the batch, at least
--min-len), heads = 2048 / head_dim, bfloat16 N(0, 1) inputs, full and causal masks. Rows:

  fa3_varlen  fa3_jax.flash_attention_varlen on the packed [tokens, heads, d] tensors
  fa3_segments fa3_jax.flash_attention on the packed tokens as one batch row [1, tokens, ...]
              with q/kv_segment_ids (document i has id i + 1)
  fa3_dense   fa3_jax.flash_attention, dense, at the mean document length (batch = tokens / mean):
              the same useful work per token without packing, what varlen should approach
  cudnn       jax.nn.dot_product_attention(implementation="cudnn") on the padded layout
              [docs, max_len, heads, d] with query_seq_lengths / key_value_seq_lengths
  xla         jax.nn.dot_product_attention(implementation="xla") on the packed tokens as one
              sequence with the block-diagonal mask (skipped when it does not fit in memory)

TFLOP/s count useful work only: the sum over documents of bench_attention.flops (causal = half),
for every row (the dense row counts its own shape); backward = 2.5 x forward, timed as in
bench_attention.py (forward + VJP minus forward). Cells as there: 'n/a' fa3_jax raised (no
kernel), 'oom', 'err'.

    python benchmarks/bench_varlen.py                      # 16k tokens, hdim 128, both passes
    python benchmarks/bench_varlen.py --hdim 64 --pass fwd --json out.json --png out.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import fa3_jax
from bench_attention import BWD_FLOPS_FACTOR, _failed, _ok, flops
from fa3_jax.timing import kernel_time_ms
from fa3_jax.varlen import cu_seqlens_from_lengths

ROWS = ("fa3_varlen", "fa3_segments", "fa3_dense", "cudnn", "xla")
MASKS = ("full", "causal")
PASSES = ("fwd", "bwd")


def doc_lengths(tokens, lo, hi, seed):
    rng = np.random.default_rng(seed)
    lens = []
    while sum(lens) < tokens:
        lens.append(int(rng.integers(lo, hi + 1)))
    lens[-1] -= sum(lens) - tokens
    if lens[-1] < lo and len(lens) > 1:  # fold a short tail into its neighbour
        lens[-2] += lens.pop()
    return lens


def time_cells(fn, args, do, row_flops, passes, warmup, reps, where, impl):
    """{pass: cell} for a jitted forward `fn(*args)` and its VJP with cotangent `do`."""
    cells = {}
    try:
        fwd_t = kernel_time_ms(jax.jit(fn), *args, warmup=warmup, reps=reps)
    except Exception as err:  # one failing cell must not end the sweep
        cell = _failed(impl, err, where)
        return {p: cell for p in passes}
    fwd_ms = statistics.median(fwd_t.times_ms)
    if "fwd" in passes:
        cells["fwd"] = _ok(fwd_ms, fwd_t.method, row_flops)
    if "bwd" in passes:
        @jax.jit
        def fwd_bwd(*a):
            out, vjp = jax.vjp(fn, *a)
            return out, vjp(do)
        try:
            both = statistics.median(kernel_time_ms(fwd_bwd, *args, warmup=warmup,
                                                    reps=reps).times_ms)
            cells["bwd"] = (_ok(both - fwd_ms, fwd_t.method, row_flops * BWD_FLOPS_FACTOR)
                            if both > fwd_ms else dict(status="err", error="fwd+bwd <= fwd"))
        except Exception as err:
            cells["bwd"] = _failed(impl, err, where + " bwd")
    return cells


def run(args):
    d = args.hdim
    h = 2048 // d
    lens = doc_lengths(args.tokens, args.min_len, args.max_len, args.seed)
    n, t, lmax = len(lens), sum(lens), max(lens)
    mean = int(round(t / n))
    print(f"{n} documents, {t} tokens, lengths {min(lens)}..{lmax} (mean {mean}), "
          f"heads {h}, head_dim {d}", flush=True)
    key = jax.random.split(jax.random.PRNGKey(args.seed), 4)
    q, k, v, do = (jax.random.normal(kk, (t, h, d), jnp.bfloat16) for kk in key)
    cu = cu_seqlens_from_lengths(lens)
    # Padded layout for cuDNN: document i in row i, zeros after its length.
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    idx = np.minimum(starts[:, None] + np.arange(lmax)[None], t - 1)
    valid = np.arange(lmax)[None] < np.asarray(lens)[:, None]
    pad = lambda x: jnp.where(jnp.asarray(valid)[:, :, None, None], x[jnp.asarray(idx)], 0)
    qp, kp, vp, dop = (pad(x) for x in (q, k, v, do))
    seq_lens = jnp.asarray(lens, jnp.int32)
    doc = np.repeat(np.arange(n), lens)
    seg_ids = jnp.asarray(doc + 1, jnp.int32)[None]
    bd = max(1, t // mean)
    qd, kd, vd, dod = (x[:bd * mean].reshape(bd, mean, h, d) for x in (q, k, v, do))

    results = []
    for mask in args.masks:
        causal = mask == "causal"
        useful = sum(flops(1, h, L, L, d, causal=causal) for L in lens)
        cases = {
            "fa3_varlen": (lambda q, k, v: fa3_jax.flash_attention_varlen(
                q, k, v, cu, cu, max_seqlen_q=lmax, max_seqlen_k=lmax, causal=causal),
                (q, k, v), do, useful),
            "fa3_segments": (lambda q, k, v: fa3_jax.flash_attention(
                q[None], k[None], v[None], causal=causal, q_segment_ids=seg_ids,
                kv_segment_ids=seg_ids)[0], (q, k, v), do, useful),
            "fa3_dense": (partial(fa3_jax.flash_attention, causal=causal), (qd, kd, vd), dod,
                          flops(bd, h, mean, mean, d, causal=causal)),
            "cudnn": (lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=causal, query_seq_lengths=seq_lens,
                key_value_seq_lengths=seq_lens, implementation="cudnn"), (qp, kp, vp), dop,
                useful),
        }
        if "xla" in args.rows:
            same_doc = doc[:, None] == doc[None, :]
            if causal:
                same_doc &= np.arange(t)[:, None] >= np.arange(t)[None, :]
            dense_mask = jnp.asarray(same_doc)[None, None]
            cases["xla"] = (lambda q, k, v: jax.nn.dot_product_attention(
                q[None], k[None], v[None], mask=dense_mask, implementation="xla")[0],
                (q, k, v), do, useful)
        row = dict(mask=mask, docs=n, tokens=t, max_len=lmax, mean_len=mean, head_dim=d,
                   heads=h)
        for impl in args.rows:
            fn, a, cot, fl = cases[impl]
            row[impl] = time_cells(fn, a, cot, fl, args.passes, args.warmup, args.reps,
                                   f"{mask}", impl)
        results.append(row)
        for p in args.passes:
            cells = "  ".join(f"{r:>10}: {_fmt(row[r].get(p))}" for r in args.rows)
            print(f"{mask:>6} {p}  {cells}  varlen/dense {_ratio(row, p, 'fa3_varlen')}  "
                  f"segments/dense {_ratio(row, p, 'fa3_segments')}", flush=True)
    return results


def _fmt(cell):
    if not cell:
        return "-"
    return f"{cell['tflops']:7.1f}" if cell["status"] == "ok" else cell["status"]


def _ratio(row, p, impl):
    a, b = row.get(impl, {}).get(p), row.get("fa3_dense", {}).get(p)
    if a and b and a["status"] == b["status"] == "ok":
        return f"{a['tflops'] / b['tflops']:.3f}"
    return "-"


def plot(results, passes, rows, path):
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")  # files only; benchmark machines have no display
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print(f"matplotlib is not installed; no plot written to {path}", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, len(passes), figsize=(6 * len(passes), 4), squeeze=False)
    for ax, p in zip(axes[0], passes):
        labels = [r["mask"] for r in results]
        x = np.arange(len(labels))
        w = 0.8 / len(rows)
        for i, impl in enumerate(rows):
            vals = [r[impl][p]["tflops"] if r[impl].get(p, {}).get("status") == "ok" else 0
                    for r in results]
            ax.bar(x + i * w, vals, w, label=impl)
        ax.set_xticks(x + 0.4 - w / 2, labels)
        ax.set_ylabel("useful TFLOP/s")
        r0 = results[0]
        ax.set_title(f"{p}: {r0['docs']} docs, {r0['tokens']} tokens, hdim {r0['head_dim']}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--min-len", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--hdim", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--masks", type=lambda s: s.split(","), default=list(MASKS))
    ap.add_argument("--pass", dest="passes", type=lambda s: s.split(","), default=list(PASSES))
    ap.add_argument("--rows", type=lambda s: s.split(","), default=list(ROWS))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json")
    ap.add_argument("--png")
    args = ap.parse_args(argv)
    for name, got, allowed in (("masks", args.masks, MASKS), ("pass", args.passes, PASSES),
                               ("rows", args.rows, ROWS)):
        if bad := set(got) - set(allowed):
            ap.error(f"--{name}: unknown {sorted(bad)}; choose from {allowed}")
    results = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(jax.devices()[0].device_kind), results=results), f,
                      indent=1)
    if args.png:
        plot(results, args.passes, args.rows, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())

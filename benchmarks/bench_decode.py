"""Decode attention: KV-cache read bandwidth of fa3_jax against cuDNN and XLA.

Decoding reads the whole K/V cache for a handful of query rows, so its figure of merit is the
bandwidth at which the K/V bytes stream in, not FLOP/s:

    TB/s = (K bytes + V bytes) / kernel time,  K/V bytes = 2 * batch * seqlen_k * heads_kv * D * 2

(H200 HBM peak about 4.8 TB/s). Rows (batch x seqlen_k x seqlen_q): one-token decode at
8x4k, 8x16k, 8x64k, 1x128k and 64x8k, and speculative decoding (seqlen_q 4 and 16) at 8x16k;
32 query heads over 8 KV heads of head dim 128 (GQA 4), bfloat16, no mask (with seqlen_q 1,
bottom-right causal is the same call), inputs drawn from N(0, 1). Every implementation runs in
the same process:

  fa3_jax  fa3_jax.flash_attention
  cudnn    jax.nn.dot_product_attention(..., implementation="cudnn")
  xla      jax.nn.dot_product_attention(..., implementation="xla")
  kvcache  fa3_jax.flash_attention_with_kvcache on a contiguous cache holding the same K/V
           (capacity seqlen_k, every cache_seqlens entry seqlen_k, causal=False, no append)
  pagedN   the same on a paged cache of N-token pages (N = 16, 64, 256; page table a random
           permutation of the pool), read in place by the kernel (page sizes that are no
           multiple of 16 would be gathered into a contiguous view first, inside the call)

Timing: fa3_jax.timing.kernel_time_ms (CUPTI: the summed GPU time of every kernel a jitted call
launches, split-KV's combine pass included; the median over --reps calls).

    python benchmarks/bench_decode.py --out decode.json --plot decode.png
    python benchmarks/bench_decode.py --rows 8x16384x1,1x131072x1 --impls fa3_jax,cudnn

Cells: TB/s; 'n/a' fa3_jax raised; 'oom' out of memory; 'err' another error (first line on
stderr).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import partial

import jax
import jax.numpy as jnp

import fa3_jax
from bench_attention import _failed
from fa3_jax.timing import kernel_time_ms

PAGE_SIZES = (16, 64, 256)
IMPLS = ("fa3_jax", "cudnn", "xla", "kvcache") + tuple(f"paged{n}" for n in PAGE_SIZES)
LABELS = dict({"fa3_jax": "fa3_jax", "cudnn": "cuDNN", "xla": "XLA", "kvcache": "cache"},
              **{f"paged{n}": f"paged{n}" for n in PAGE_SIZES})
# (batch, seqlen_k, seqlen_q)
ROWS = ((8, 4096, 1), (8, 16384, 1), (8, 65536, 1), (1, 131072, 1), (64, 8192, 1),
        (8, 16384, 4), (8, 16384, 16))


def kv_bytes(batch, seqlen_k, heads_kv, head_dim, itemsize=2):
    """Bytes of K and V one call must read."""
    return 2 * batch * seqlen_k * heads_kv * head_dim * itemsize


def _attention(impl, q, k, v):
    if impl == "fa3_jax":
        return fa3_jax.flash_attention(q, k, v)
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


def _cached(q, k_cache, v_cache, lengths, page_table=None):
    return fa3_jax.flash_attention_with_kvcache(q, k_cache, v_cache, lengths,
                                                page_table=page_table, causal=False)


def _call_and_args(impl, q, k, v, seed):
    """The jitted function and its arguments for one cell."""
    batch, seqlen_k = k.shape[:2]
    lengths = jnp.full((batch,), seqlen_k, jnp.int32)
    if impl == "kvcache":
        return jax.jit(_cached), (q, k, v, lengths)
    if impl.startswith("paged"):
        page = int(impl[len("paged"):])
        if seqlen_k % page:
            raise ValueError(f"seqlen_k {seqlen_k} is not a multiple of the page size {page}")
        pages = batch * (seqlen_k // page)
        perm = jax.random.permutation(jax.random.PRNGKey(seed), pages).astype(jnp.int32)
        # Page perm[i] holds logical page i: row b's page j is logical page b * pages_per_row + j.
        inv = jnp.argsort(perm)
        k_pool = k.reshape((pages, page) + k.shape[2:])[inv]
        v_pool = v.reshape((pages, page) + v.shape[2:])[inv]
        table = perm.reshape(batch, seqlen_k // page)
        return jax.jit(_cached), (q, k_pool, v_pool, lengths, table)
    return jax.jit(partial(_attention, impl)), (q, k, v)


def run(args):
    rows = []
    key = jax.random.PRNGKey(args.seed)
    for batch, seqlen_k, seqlen_q in args.rows:
        key, kq, kk, kv = jax.random.split(key, 4)
        q = jax.random.normal(kq, (batch, seqlen_q, args.heads_q, args.head_dim), jnp.bfloat16)
        k = jax.random.normal(kk, (batch, seqlen_k, args.heads_kv, args.head_dim), jnp.bfloat16)
        v = jax.random.normal(kv, (batch, seqlen_k, args.heads_kv, args.head_dim), jnp.bfloat16)
        nbytes = kv_bytes(batch, seqlen_k, args.heads_kv, args.head_dim)
        results = {}
        for impl in args.impls:
            where = f"{batch}x{seqlen_k}x{seqlen_q}"
            try:
                fn, call_args = _call_and_args(impl, q, k, v, args.seed)
                t = kernel_time_ms(fn, *call_args, warmup=args.warmup, reps=args.reps)
                del call_args
            except Exception as err:  # one failing cell must not end the sweep
                results[impl] = _failed(impl, err, where)
                continue
            ms = statistics.median(t.times_ms)
            results[impl] = dict(status="ok", ms=ms, timing=t.method,
                                 tb_per_s=nbytes / (ms * 1e-3) / 1e12)
        row = dict(batch=batch, seqlen_k=seqlen_k, seqlen_q=seqlen_q, kv_bytes=nbytes,
                   results=results)
        rows.append(row)
        if args.verbose:
            print(format_row(row, args.impls), flush=True)
        del q, k, v
    return rows


def header(impls):
    cols = "".join(f" {LABELS[i]:>8}" for i in IMPLS if i in impls)
    return (f"{'batch':>5} {'seqlen_k':>8} {'sq':>3}{cols} {'fa3/cuDNN':>9} {'cache/cuDNN':>11} "
            f"{'fa3 ms':>8}")


def _tbs(row, impl):
    r = row["results"].get(impl)
    return r["tb_per_s"] if r and r["status"] == "ok" else None


def format_row(row, impls):
    cells = ""
    for impl in IMPLS:
        if impl not in impls:
            continue
        r = row["results"].get(impl)
        # Significant digits below 0.1 TB/s, so CPU smoke runs still show a number.
        cell = ("-" if r is None else r["status"] if r["status"] != "ok"
                else f"{r['tb_per_s']:.2f}" if r["tb_per_s"] >= 0.1 else f"{r['tb_per_s']:.2g}")
        cells += f" {cell:>8}"
    b = _tbs(row, "cudnn")
    ratios = [("-" if a is None or b is None else f"{a / b:.3f}")
              for a in (_tbs(row, "fa3_jax"), _tbs(row, "kvcache"))]
    fa3 = row["results"].get("fa3_jax")
    ms = f"{fa3['ms']:.4f}" if fa3 and fa3["status"] == "ok" else "-"
    return (f"{row['batch']:>5} {row['seqlen_k']:>8} {row['seqlen_q']:>3}{cells} "
            f"{ratios[0]:>9} {ratios[1]:>11} {ms:>8}")


def plot(rows, path, title, impls):
    """Bars of TB/s per row, one colour per implementation."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed; no plot written to {path}", file=sys.stderr)
        return
    labels = [f"{r['batch']}x{r['seqlen_k'] // 1024}k\nsq {r['seqlen_q']}" for r in rows]
    shown = [i for i in IMPLS if i in impls]
    width = 0.8 / len(shown)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    for n, impl in enumerate(shown):
        vals = [_tbs(r, impl) or 0.0 for r in rows]
        ax.bar([i + (n - (len(shown) - 1) / 2) * width for i in range(len(rows))], vals, width,
               label=LABELS[impl])
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("K/V read bandwidth (TB/s)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _row_list(text):
    try:
        return [tuple(int(x) for x in item.split("x")) for item in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected BxSKxSQ,... (e.g. 8x16384x1), got {text!r}") from e


def _impls(text):
    items = text.split(",")
    bad = [x for x in items if x not in IMPLS]
    if bad:
        raise argparse.ArgumentTypeError(f"choose from {','.join(IMPLS)}, got {text!r}")
    return items


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=_row_list, default=list(ROWS), help="BxSKxSQ,...")
    p.add_argument("--heads-q", type=int, default=32)
    p.add_argument("--heads-kv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--impls", type=_impls, default=list(IMPLS))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--plot", default=None, help="PNG plot file (needs matplotlib)")
    p.add_argument("--verbose", action="store_true", help="print each row as it is measured")
    args = p.parse_args(argv)
    if args.heads_q % args.heads_kv:
        raise SystemExit(f"--heads-q {args.heads_q} is not a multiple of --heads-kv {args.heads_kv}")

    device = jnp.zeros(()).devices().pop()
    print(f"device={device.platform}:{device.device_kind} jax={jax.__version__} "
          f"fa3_jax CUDA kernels={fa3_jax.cuda_built()} | heads {args.heads_q}/{args.heads_kv} "
          f"hdim {args.head_dim} bf16 reps={args.reps}", flush=True)
    rows = run(args)
    methods = sorted({r["timing"] for row in rows for r in row["results"].values()
                      if r["status"] == "ok"})
    timing = ",".join(methods) or "none"
    print(f"\nK/V read bandwidth, TB/s (timing: {timing})")
    print(header(args.impls))
    for row in rows:
        print(format_row(row, args.impls))
    title = (f"{device.device_kind}, bf16, heads {args.heads_q}/{args.heads_kv}, "
             f"hdim {args.head_dim} ({timing})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=device.device_kind, platform=device.platform,
                           jax=jax.__version__, timing=timing, heads_q=args.heads_q,
                           heads_kv=args.heads_kv, head_dim=args.head_dim, reps=args.reps,
                           warmup=args.warmup, rows=rows), f, indent=1)
    if args.plot:
        plot(rows, args.plot, title, args.impls)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Attention throughput: fa3_jax against cuDNN and XLA, on the FlashAttention-3 paper's shapes.

Shapes: hidden size 2048 (heads = hidden / head_dim query heads, or --heads N at every head dim;
--group G: heads / G key/value heads, GQA) and 16k tokens (batch = tokens / seqlen), Q, K and V
of one seqlen, bfloat16 inputs drawn from N(0, 1). A head dim D/DV (e.g. 192/128, MLA's shape)
gives V and the output DV columns; its heads follow D. Every implementation is timed in
the same run on the default backend:

  fa3_jax  fa3_jax.flash_attention
  cudnn    jax.nn.dot_product_attention(..., implementation="cudnn")
  xla      jax.nn.dot_product_attention(..., implementation="xla")  (unfused; slow, memory-bound)

Timing: fa3_jax.timing.kernel_time_ms, the median over --reps calls of the summed GPU kernel
time measured with CUPTI (host wall-clock where CUPTI is unavailable, e.g. on CPU; the table
header says which). Forward = a jitted call. Backward = median time of a jitted forward + VJP
(returning the output and the three gradients, so the forward is not pruned) minus the median
forward time, the method of the cuDNN numbers in shared/ANCHORS.md; it slightly flatters every
implementation alike, since the training forward also writes residuals.

FLOPs (flops() below): forward 4·B·H·Sq·Sk·D, half of it for causal (the paper's convention),
the exact count of visible (query, key) pairs for a local window; backward 2.5 × forward.

FP8 section (--fp8; forward, head dims 64/128/256, the same shapes; TFLOP/s with the attention
FLOPs whatever else runs, CUPTI sum of every kernel of the jitted call):

  fp8      fa3_jax.flash_attention on e4m3 q/k/v (the bf16 inputs cast) with per-tensor
           descales 1: the FP8 kernel and the V transpose it runs first
  fp8+q    fa3_jax.fp8_attention on the bf16 inputs (default: block scales + Hadamard): the
           fused quantization pass and the kernel; the pass alone: quant_ms
  fp8+qx   the same with the pass as XLA ops (fused_quantize=False); the pass alone: qxla_ms
  cuDNN8   jax._src.cudnn.fused_attention_stablehlo.dot_product_attention(..., use_fp8=True),
           every scale 1 (shared/ANCHORS.md's method), e4m3 in and out; full and causal only

    python benchmarks/bench_attention.py                       # the full sweep, both passes
    python benchmarks/bench_attention.py --pass fwd --hdims 128 --seqlens 1024,4096
    python benchmarks/bench_attention.py --seqlens 512 --hdims 64 --tokens 1024 \\
        --impls fa3_jax,xla --reps 2                           # a CPU smoke run
    python benchmarks/bench_attention.py --pass fwd --fp8 --impls fa3_jax,cudnn \\
        --hdims 128,256 --seqlens 1024,4096,16384                # bf16 and FP8 forward
    python benchmarks/bench_attention.py --pass fwd --heads 16 --hdims 96,192,192/128

Cells: a number is TFLOP/s; 'n/a' fa3_jax raised (e.g. no kernel for that shape); 'oom' out of
memory; 'err' another error (first line on stderr); 'skip' left out by --skip-xla-above; '-' not
requested.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import fa3_jax
from fa3_jax.timing import kernel_time_ms

IMPLS = ("fa3_jax", "cudnn", "xla")
FP8_CELLS = ("fp8", "fp8+q", "fp8+qx", "cudnn8", "quant", "qxla")  # quant, qxla: times only
E4M3 = jnp.float8_e4m3fn
LABELS = {"fa3_jax": "fa3_jax", "cudnn": "cuDNN", "xla": "XLA"}
MASKS = ("full", "causal", "local")
PASSES = ("fwd", "bwd")
BWD_FLOPS_FACTOR = 2.5  # two matmuls forward, five backward (dQ, dK, dV, dP and the recompute S)


def flops(batch, heads, seqlen_q, seqlen_k, head_dim, *, causal=False, window=(-1, -1),
          head_dim_v=None):
    """Forward-pass FLOPs of attention: 2 matmuls × 2 FLOPs per multiply-add per visible pair.

    Plain causal counts exactly half of the full matrix, the convention of the FlashAttention
    papers and of shared/ANCHORS.md, so numbers compare with theirs. Any window (left, right),
    alone or with causal, counts the visible (query, key) pairs exactly, bottom-right aligned as
    in fa3_jax.flash_attention: query i sees key j when
    i + Sk - Sq - left <= j <= i + Sk - Sq + right (-1: unbounded; causal means right = 0).
    """
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    per_pair = 2 * (head_dim + head_dim_v)  # S = QKᵀ and O = PV, 2 FLOPs per multiply-add
    left, right = window
    if causal and left < 0:
        return batch * heads * seqlen_q * seqlen_k * per_pair // 2
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if left < 0 and right < 0:
        return batch * heads * seqlen_q * seqlen_k * per_pair
    off = seqlen_k - seqlen_q
    i = np.arange(seqlen_q, dtype=np.int64)
    lo = np.maximum(0, i + off - left) if left >= 0 else np.zeros_like(i)
    hi = np.minimum(seqlen_k - 1, i + off + right) if right >= 0 else np.full_like(i, seqlen_k - 1)
    pairs = int(np.maximum(hi - lo + 1, 0).sum())
    return batch * heads * pairs * per_pair


def _attention(impl, q, k, v, *, mask, window):
    causal = mask == "causal"
    if impl == "fa3_jax":
        return fa3_jax.flash_attention(q, k, v, causal=causal,
                                       window_size=window if mask == "local" else (-1, -1))
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation=impl,
        local_window_size=tuple(window) if mask == "local" else None)


def _failed(impl, err, where):
    """A result cell for an exception, its first line echoed to stderr for diagnosis."""
    msg = str(err)
    if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower():
        status = "oom"
    else:
        # fa3_jax refuses shapes it has no kernel for; that is "not available", not a failure.
        status = "n/a" if impl == "fa3_jax" else "err"
    lines = msg.strip().splitlines()
    first = f"{type(err).__name__}: {lines[0] if lines else ''}"
    print(f"  [{impl} {where}] {status}: {first}", file=sys.stderr, flush=True)
    return dict(status=status, error=first)


def _ok(ms, method, n_flops):
    return dict(status="ok", ms=ms, timing=method, tflops=n_flops / (ms * 1e-3) / 1e12)


def measure(impl, q, k, v, do, *, mask, window, row_flops, passes, warmup, reps, where):
    """One implementation on one shape: {pass: result cell}. The backward needs the forward's
    median, so a failed forward fails both; a failed backward leaves the forward standing."""
    attn = partial(_attention, impl, mask=mask, window=window)

    @jax.jit
    def fwd_bwd(q, k, v, do):
        # The output is returned too, so XLA cannot prune the part of the forward that only
        # feeds it and make the subtraction below credit the backward with less than it did.
        out, vjp = jax.vjp(attn, q, k, v)
        return out, vjp(do)

    cells = {}
    try:
        fwd_t = kernel_time_ms(jax.jit(attn), q, k, v, warmup=warmup, reps=reps)
    except Exception as err:  # one failing cell must not end the sweep
        cell = _failed(impl, err, where)
        return {p: cell for p in passes}
    fwd_ms = statistics.median(fwd_t.times_ms)
    if "fwd" in passes:
        cells["fwd"] = _ok(fwd_ms, fwd_t.method, row_flops["fwd"])
    if "bwd" in passes:
        try:
            both_t = kernel_time_ms(fwd_bwd, q, k, v, do, warmup=warmup, reps=reps)
        except Exception as err:
            cells["bwd"] = _failed(impl, err, where + " bwd")
            return cells
        both_ms = statistics.median(both_t.times_ms)
        if both_ms <= fwd_ms:
            # Only timing noise (wall-clock on a busy host) can get here; no number is better
            # than a negative or infinite one.
            msg = f"fwd+bwd {both_ms:.4f} ms is not above fwd {fwd_ms:.4f} ms"
            print(f"  [{impl} {where} bwd] err: {msg}", file=sys.stderr, flush=True)
            cells["bwd"] = dict(status="err", error=msg)
        else:
            method = fwd_t.method if fwd_t.method == both_t.method else "mixed"
            cells["bwd"] = _ok(both_ms - fwd_ms, method, row_flops["bwd"])
    return cells


def _cudnn_fp8(q8, k8, v8, causal):
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # noqa: PLC0415
    params = {name: jnp.ones((1, 1, 1, 1), jnp.float32) for name in cudnn.fp8_params_keys}
    out, _, _ = cudnn.dot_product_attention(
        q8, k8, v8, fp8_params=params, scale=q8.shape[-1] ** -0.5, use_fp8=True,
        mask_type=cudnn.MaskType.CAUSAL if causal else cudnn.MaskType.NO_MASK)
    return out


def measure_fp8(impls, q, k, v, *, mask, window, n_flops, warmup, reps, where):
    """The FP8 section's cells (FP8_CELLS, see the module docstring) for one shape; q, k, v are
    the bfloat16 inputs of the bf16 rows. Cells not asked for by impls are left out."""
    from fa3_jax import fp8  # noqa: PLC0415
    causal = mask == "causal"
    win = window if mask == "local" else (-1, -1)
    q8, k8, v8 = (x.astype(E4M3) for x in (q, k, v))
    ones = jnp.ones(q.shape[:1] + k.shape[2:3], jnp.float32)  # [batch, heads_kv]
    fns = {}
    if "fa3_jax" in impls:
        fns["fp8"] = (partial(fa3_jax.flash_attention, causal=causal, window_size=win,
                              descale_q=ones, descale_k=ones, descale_v=ones), (q8, k8, v8))
        fns["fp8+q"] = (partial(fa3_jax.fp8_attention, causal=causal, window_size=win), (q, k, v))
        fns["fp8+qx"] = (partial(fa3_jax.fp8_attention, causal=causal, window_size=win,
                                 fused_quantize=False), (q, k, v))
        fns["quant"] = (lambda q, k, v: fp8.quantize(q, k, v)[:2], (q, k, v))
        fns["qxla"] = (lambda q, k, v: fp8.quantize(q, k, v, fused=False)[:2], (q, k, v))
    if "cudnn" in impls:
        fns["cudnn8"] = (partial(_cudnn_fp8, causal=causal), (q8, k8, v8))
    cells = {}
    for name, (fn, args) in fns.items():
        if name == "cudnn8" and mask == "local":
            cells[name] = dict(status="skip")
            continue
        try:
            t = kernel_time_ms(jax.jit(fn), *args, warmup=warmup, reps=reps)
        except Exception as err:  # one failing cell must not end the sweep
            cells[name] = _failed("cudnn" if name == "cudnn8" else "fa3_jax", err,
                                  f"{where} {name}")
            continue
        ms = statistics.median(t.times_ms)
        cells[name] = (dict(status="ok", ms=ms, timing=t.method) if name in ("quant", "qxla")
                       else _ok(ms, t.method, n_flops))
    return cells


def run(args):
    """Times every configuration; returns the JSON-ready list of rows."""
    rows = []
    key = jax.random.PRNGKey(args.seed)
    for hdim, hdim_v in args.hdims:
        name = hdim_name(hdim, hdim_v)
        if args.heads:
            heads = args.heads
        elif args.hidden % hdim:
            raise SystemExit(f"--hidden {args.hidden} is not a multiple of head dim {hdim}; "
                             f"--heads N sets the head count at every head dim")
        else:
            heads = args.hidden // hdim
        if heads % args.group:
            raise SystemExit(f"--group {args.group} does not divide the {heads} heads of head dim {name}")
        for seqlen in args.seqlens:
            if args.tokens % seqlen:
                raise SystemExit(f"--tokens {args.tokens} is not a multiple of seqlen {seqlen}")
            batch = args.tokens // seqlen
            key, kq, kk, kv, kd = jax.random.split(key, 5)
            shape = (batch, seqlen, heads, hdim)
            kv_shape = (batch, seqlen, heads // args.group, hdim)  # GQA: --group query heads share one
            q = jax.random.normal(kq, shape, jnp.bfloat16)
            do = jax.random.normal(kd, shape[:3] + (hdim_v,), jnp.bfloat16)
            k = jax.random.normal(kk, kv_shape, jnp.bfloat16)
            v = jax.random.normal(kv, kv_shape[:3] + (hdim_v,), jnp.bfloat16)
            for mask in args.masks:
                causal = mask == "causal"
                window = args.window if mask == "local" else (-1, -1)
                fwd_flops = flops(batch, heads, seqlen, seqlen, hdim, causal=causal, window=window,
                                  head_dim_v=hdim_v)
                row_flops = {"fwd": fwd_flops, "bwd": BWD_FLOPS_FACTOR * fwd_flops}
                results = {p: {} for p in args.passes}
                for impl in args.impls:
                    if impl == "xla" and args.skip_xla_above and seqlen > args.skip_xla_above:
                        for p in args.passes:
                            results[p][impl] = dict(status="skip")
                        continue
                    cells = measure(impl, q, k, v, do, mask=mask, window=window,
                                    row_flops=row_flops, passes=args.passes, warmup=args.warmup,
                                    reps=args.reps, where=f"hdim={name} {mask} seqlen={seqlen}")
                    for p in args.passes:
                        results[p][impl] = cells[p]
                for p in args.passes:
                    row = {"pass": p, "hdim": hdim, "hdim_v": hdim_v, "mask": mask, "seqlen": seqlen,
                           "batch": batch, "heads": heads, "flops": row_flops[p],
                           "results": results[p]}
                    rows.append(row)
                    if args.verbose:
                        print(format_row(row), flush=True)
                if args.fp8:
                    cells = measure_fp8(args.impls, q, k, v, mask=mask, window=window,
                                        n_flops=fwd_flops, warmup=args.warmup, reps=args.reps,
                                        where=f"hdim={name} {mask} seqlen={seqlen}")
                    row = {"pass": "fp8", "hdim": hdim, "hdim_v": hdim_v, "mask": mask,
                           "seqlen": seqlen,
                           "batch": batch, "heads": heads, "flops": fwd_flops, "results": cells}
                    rows.append(row)
                    if args.verbose:
                        print(format_fp8_row(row), flush=True)
            # Free this shape's inputs before the next ones are drawn (16k rows are large).
            del q, k, v, do
    return rows


def _tflops(row, impl):
    r = row["results"].get(impl)
    return r["tflops"] if r and r["status"] == "ok" else None


def _ratio(row, impl="fa3_jax", base="cudnn"):
    a, b = _tflops(row, impl), _tflops(row, base)
    return a / b if a is not None and b is not None else None


def hdim_name(hdim, hdim_v):
    """A head dim as the tables print it: D, or D/DV where V has other columns."""
    return str(hdim) if hdim_v == hdim else f"{hdim}/{hdim_v}"


def _row_hdim(row):
    return hdim_name(row["hdim"], row["hdim_v"])


HEADER = (f"{'hdim':>7} {'mask':>6} {'seqlen':>6} {LABELS['fa3_jax']:>8} {LABELS['cudnn']:>8} "
          f"{LABELS['xla']:>8} {'fa3/cuDNN':>9}")


def _fmt_tflops(t):
    # Significant digits, not decimals, so CPU smoke runs (far below 1 TFLOP/s) still show.
    return f"{t:.1f}" if t >= 10 else f"{t:.3g}"


def format_row(row):
    cells = []
    for impl in IMPLS:
        r = row["results"].get(impl)
        cells.append("-" if r is None else r["status"] if r["status"] != "ok"
                     else _fmt_tflops(r["tflops"]))
    ratio = _ratio(row)
    return (f"{_row_hdim(row):>7} {row['mask']:>6} {row['seqlen']:>6} {cells[0]:>8} {cells[1]:>8} "
            f"{cells[2]:>8} {'-' if ratio is None else f'{ratio:.3f}':>9}")


FP8_HEADER = (f"{'hdim':>7} {'mask':>6} {'seqlen':>6} {'fp8':>7} {'fp8+q':>7} {'fp8+qx':>7} "
              f"{'cuDNN8':>7} {'quant_ms':>8} {'qxla_ms':>8} {'fp8/cuDNN8':>10} "
              f"{'fp8+q/cuDNN8':>12}")


def format_fp8_row(row):
    res = row["results"]

    def cell(name, width):
        r = res.get(name)
        if r is None:
            return f"{'-':>{width}}"
        if r["status"] != "ok":
            return f"{r['status']:>{width}}"
        text = f"{r['ms']:.3f}" if name in ("quant", "qxla") else _fmt_tflops(r["tflops"])
        return f"{text:>{width}}"

    def ratio(name, width):
        x = _ratio(row, name, "cudnn8")
        return f"{'-':>{width}}" if x is None else f"{x:{width}.2f}"

    return (f"{_row_hdim(row):>7} {row['mask']:>6} {row['seqlen']:>6} {cell('fp8', 7)} "
            f"{cell('fp8+q', 7)} {cell('fp8+qx', 7)} {cell('cudnn8', 7)} {cell('quant', 8)} "
            f"{cell('qxla', 8)} {ratio('fp8', 10)} {ratio('fp8+q', 12)}")


def summarize(rows, p):
    """Geometric-mean fa3_jax/cuDNN ratio over rows with seqlen >= 1k, and the win count (the
    FP8 section, p == "fp8": the FP8 kernel against cuDNN's FP8)."""
    impl, base = ("fp8", "cudnn8") if p == "fp8" else ("fa3_jax", "cudnn")
    compared = [(r["seqlen"], _ratio(r, impl, base)) for r in rows
                if r["pass"] == p and _ratio(r, impl, base) is not None]
    long_ratios = [x for s, x in compared if s >= 1024]
    geomean = math.exp(statistics.fmean(map(math.log, long_ratios))) if long_ratios else None
    return dict(geomean_ratio_seqlen_ge_1k=geomean, rows_compared=len(compared),
                rows_fa3_ge_cudnn=sum(x >= 1.0 for _, x in compared))


def print_tables(rows, passes, timing):
    for p in passes:
        print(f"\n{p} TFLOP/s ({'backward = fwd+bwd - fwd, ' if p == 'bwd' else ''}"
              f"timing: {timing})")
        print(HEADER)
        for row in rows:
            if row["pass"] == p:
                print(format_row(row))
        s = summarize(rows, p)
        g = s["geomean_ratio_seqlen_ge_1k"]
        print(f"geometric mean fa3_jax/cuDNN over seqlen >= 1k: "
              f"{'-' if g is None else f'{g:.3f}'}; fa3_jax >= cuDNN in "
              f"{s['rows_fa3_ge_cudnn']} of {s['rows_compared']} rows")
    fp8_rows = [r for r in rows if r["pass"] == "fp8"]
    if fp8_rows:
        print(f"\nfwd FP8 TFLOP/s (quant_ms, qxla_ms: the quantization pass alone, ms; "
              f"timing: {timing})")
        print(FP8_HEADER)
        for row in fp8_rows:
            print(format_fp8_row(row))
        s = summarize(rows, "fp8")
        g = s["geomean_ratio_seqlen_ge_1k"]
        print(f"geometric mean fp8/cuDNN8 over seqlen >= 1k: "
              f"{'-' if g is None else f'{g:.3f}'}; fp8 >= cuDNN8 in "
              f"{s['rows_fa3_ge_cudnn']} of {s['rows_compared']} rows")


def plot(rows, passes, hdims, seqlens, path, title):
    """One subplot per (pass, head dim): TFLOP/s against seqlen, a line per implementation and
    mask (colour = implementation, line style = mask)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only; benchmark machines have no display
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed; no plot written to {path}", file=sys.stderr)
        return
    colors = {"fa3_jax": "tab:red", "cudnn": "tab:green", "xla": "tab:blue"}
    styles = {"full": "-", "causal": "--", "local": ":"}
    fig, axes = plt.subplots(len(passes), len(hdims), squeeze=False, sharex=True,
                             figsize=(4.5 * len(hdims), 3.6 * len(passes)))
    for (pi, p), (hi, (hdim, hdim_v)) in itertools.product(enumerate(passes), enumerate(hdims)):
        ax = axes[pi][hi]
        sel = [r for r in rows if r["pass"] == p and (r["hdim"], r["hdim_v"]) == (hdim, hdim_v)]
        for impl in IMPLS:
            for mask in MASKS:
                pts = [(r["seqlen"], _tflops(r, impl)) for r in sel if r["mask"] == mask]
                pts = [(s, t) for s, t in pts if t is not None]
                if pts:
                    ax.plot(*zip(*pts), styles[mask], color=colors[impl], marker="o",
                            markersize=3, label=f"{LABELS[impl]} {mask}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqlens, [f"{s // 1024}k" if s % 1024 == 0 else str(s) for s in seqlens])
        ax.minorticks_off()
        ax.set_title(f"{p}, head dim {hdim_name(hdim, hdim_v)}")
        ax.set_xlabel("seqlen")
        ax.set_ylabel("TFLOP/s")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _int_list(text):
    return [int(x) for x in text.split(",") if x]


def _hdim_list(text):
    """Head dims D or D/DV (V's columns), comma separated: [(D, DV), ...]."""
    out = []
    for item in (x for x in text.split(",") if x):
        d, sep, dv = item.partition("/")
        try:
            pair = (int(d), int(dv) if sep else int(d))
        except ValueError:
            pair = (0, 0)
        if min(pair) < 1:
            raise argparse.ArgumentTypeError(
                f"expected head dims as D or D/DV, comma separated (e.g. 64,128,192/128), got {text!r}")
        out.append(pair)
    if not out:
        raise argparse.ArgumentTypeError("no head dim given")
    return out


def _choices(allowed):
    def parse(text):
        items = [x for x in text.split(",") if x]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}, got {text!r}")
        return items
    return parse


def _window(text):
    values = _int_list(text)
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected left,right (e.g. 512,0), got {text!r}")
    return tuple(values)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pass", dest="pass_", choices=["fwd", "bwd", "both"], default="both")
    p.add_argument("--hdims", type=_hdim_list, default=[(64, 64), (128, 128), (256, 256)],
                   help="head dims, D or D/DV (V and the output DV wide, e.g. 192/128)")
    p.add_argument("--seqlens", type=_int_list, default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--masks", type=_choices(MASKS), default=["full", "causal"],
                   help="full, causal and/or local (a sliding window, see --window)")
    p.add_argument("--window", type=_window, default=(512, 0),
                   help="(left,right) window of the 'local' mask, as in flash_attention")
    p.add_argument("--impls", type=_choices(IMPLS), default=list(IMPLS))
    p.add_argument("--tokens", type=int, default=16384, help="batch = tokens / seqlen")
    p.add_argument("--hidden", type=int, default=2048, help="heads = hidden / head_dim")
    p.add_argument("--heads", type=int, default=0,
                   help="query heads at every head dim instead of hidden / head_dim (0: off)")
    p.add_argument("--group", type=int, default=1,
                   help="query heads per key/value head (GQA; 1: MHA); FLOPs count the query heads")
    p.add_argument("--reps", type=int, default=10, help="timed calls per cell (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (compiles)")
    p.add_argument("--skip-xla-above", type=int, default=0,
                   help="do not run XLA for seqlens above this (0: run all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--plot", default=None, help="PNG plot file (needs matplotlib)")
    p.add_argument("--verbose", action="store_true", help="print each row as it is measured")
    p.add_argument("--fp8", action="store_true",
                   help="also the FP8 forward section (module docstring), for every shape")
    args = p.parse_args(argv)
    if args.group < 1:
        raise SystemExit(f"--group must be >= 1, got {args.group}")
    if args.heads < 0:
        raise SystemExit(f"--heads must be >= 1 (0: heads = hidden / head_dim), got {args.heads}")
    args.passes = list(PASSES) if args.pass_ == "both" else [args.pass_]

    device = jnp.zeros(()).devices().pop()  # honours jax.default_device, unlike default_backend
    shape_desc = f"heads={args.heads}" if args.heads else f"hidden={args.hidden}"
    print(f"device={device.platform}:{device.device_kind} jax={jax.__version__} "
          f"fa3_jax CUDA kernels={fa3_jax.cuda_built()} {list(fa3_jax.cuda_head_dims())} | "
          f"tokens={args.tokens} {shape_desc} group={args.group} bf16 reps={args.reps}", flush=True)
    rows = run(args)
    methods = sorted({r["timing"] for row in rows for r in row["results"].values()
                      if r["status"] == "ok"})
    timing = ",".join(methods) or "none"
    print_tables(rows, args.passes, timing)

    gqa = f", GQA group {args.group}" if args.group > 1 else ""
    title = f"{device.device_kind}, bf16, {args.tokens} tokens, {shape_desc.replace('=', ' ')}{gqa} ({timing})"
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=device.device_kind, platform=device.platform,
                           jax=jax.__version__, timing=timing, tokens=args.tokens,
                           hidden=None if args.heads else args.hidden, heads=args.heads or None,
                           group=args.group, reps=args.reps, warmup=args.warmup,
                           window=list(args.window), rows=rows,
                           summary={p: summarize(rows, p)
                                    for p in args.passes + (["fp8"] if args.fp8 else [])}),
                      f, indent=1)
    if args.plot:
        plot(rows, args.passes, args.hdims, args.seqlens, args.plot, title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""FP8 forward throughput: the Hopper e4m3 kernel beside cuDNN's FP8 forward and bf16.

Shapes as benchmarks/bench_attention.py (the FlashAttention-3 paper's): hidden 2048 (heads =
2048 / head_dim), 16k tokens (batch = 16384 / seqlen), one seqlen for Q, K and V, inputs N(0, 1).
Columns (TFLOP/s with bench_attention.flops, i.e. the attention FLOPs whatever else runs; the
time is the CUPTI sum of every kernel the jitted call launches, median of --reps):

  fp8       fa3_jax.flash_attention on e4m3 q/k/v with per-tensor descales: the FP8 kernel and
            the V transpose it runs first (cpp/hopper/fp8_vt_sm90.h)
  fp8+q     fa3_jax.fp8_attention on bfloat16 inputs (default: block scales + Hadamard), i.e.
            with the fused quantization kernel (its time alone: column quant_ms, and the
            bandwidth it reaches: quant_GB/s, bytes read and written over quant_ms)
  fp8+qx    the same with the quantization pass as XLA ops (fused_quantize=False; its time
            alone: column qxla_ms)
  cudnn8    jax._src.cudnn.fused_attention_stablehlo.dot_product_attention(..., use_fp8=True),
            every scale 1 (shared/ANCHORS.md's method), e4m3 in and out
  bf16      fa3_jax.flash_attention on bfloat16

    python benchmarks/bench_fp8.py [--hdims 128] [--seqlens 2048,4096,8192,16384]
        [--masks full,causal] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import sys
from functools import partial

import jax
import jax.numpy as jnp

import fa3_jax
from fa3_jax import fp8
from fa3_jax.timing import kernel_time_ms

_spec = importlib.util.spec_from_file_location(
    "bench_attention", pathlib.Path(__file__).resolve().parent / "bench_attention.py")
bench_attention = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_attention)

E4M3 = jnp.float8_e4m3fn
COLUMNS = ("fp8", "fp8+q", "fp8+qx", "cudnn8", "bf16")


def _cudnn_fp8(q8, k8, v8, causal):
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # noqa: PLC0415
    params = {name: jnp.ones((1, 1, 1, 1), jnp.float32) for name in cudnn.fp8_params_keys}
    out, _, _ = cudnn.dot_product_attention(
        q8, k8, v8, fp8_params=params, scale=q8.shape[-1] ** -0.5, use_fp8=True,
        mask_type=cudnn.MaskType.CAUSAL if causal else cudnn.MaskType.NO_MASK)
    return out


def _median_ms(fn, *args, reps):
    try:
        return statistics.median(kernel_time_ms(jax.jit(fn), *args, warmup=3, reps=reps).times_ms)
    except Exception as err:  # one failing cell must not end the sweep
        line = (str(err).strip().splitlines() or [""])[0]
        print(f"  failed: {type(err).__name__}: {line}", file=sys.stderr, flush=True)
        return None


def row(hdim, mask, seqlen, tokens, hidden, reps):
    b, h = tokens // seqlen, hidden // hdim
    causal = mask == "causal"
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(kx, (b, seqlen, h, hdim), jnp.bfloat16) for kx in (kq, kk, kv))
    q8, k8, v8 = (x.astype(E4M3) for x in (q, k, v))
    ones = jnp.ones((b, h), jnp.float32)
    ms = {
        "fp8": _median_ms(partial(fa3_jax.flash_attention, causal=causal, descale_q=ones,
                                  descale_k=ones, descale_v=ones), q8, k8, v8, reps=reps),
        "fp8+q": _median_ms(partial(fa3_jax.fp8_attention, causal=causal), q, k, v, reps=reps),
        "fp8+qx": _median_ms(partial(fa3_jax.fp8_attention, causal=causal, fused_quantize=False),
                             q, k, v, reps=reps),
        "quant": _median_ms(lambda q, k, v: fp8.quantize(q, k, v)[:2], q, k, v, reps=reps),
        "qxla": _median_ms(lambda q, k, v: fp8.quantize(q, k, v, fused=False)[:2], q, k, v,
                           reps=reps),
        "cudnn8": _median_ms(partial(_cudnn_fp8, causal=causal), q8, k8, v8, reps=reps),
        "bf16": _median_ms(partial(fa3_jax.flash_attention, causal=causal), q, k, v, reps=reps),
    }
    n = bench_attention.flops(b, h, seqlen, seqlen, hdim, causal=causal)
    tflops = {c: (n / (ms[c] * 1e-3) / 1e12 if ms.get(c) else None) for c in COLUMNS}
    # The quantization's memory traffic: q, k, v read (bfloat16), e4m3 written, descales.
    elems = 3 * b * seqlen * h * hdim
    bq, bk = fp8.scale_blocks(hdim, hdim)
    quant_bytes = elems * (2 + 1) + 4 * b * h * (-(-seqlen // bq) + 2 * -(-seqlen // bk))
    gbps = quant_bytes / (ms["quant"] * 1e-3) / 1e9 if ms.get("quant") else None
    return dict(hdim=hdim, mask=mask, seqlen=seqlen, batch=b, heads=h, ms=ms, tflops=tflops,
                quant_gbps=gbps)


HEADER = (f"{'hdim':>4} {'mask':>6} {'seqlen':>6} " + " ".join(f"{c:>7}" for c in COLUMNS)
          + f" {'quant_ms':>8} {'qxla_ms':>8} {'quant_GB/s':>10} {'fp8/cudnn8':>10}")


def format_row(r):
    t = r["tflops"]
    cells = " ".join(f"{t[c]:7.0f}" if t[c] else f"{'err':>7}" for c in COLUMNS)
    ratio = (f"{t['fp8'] / t['cudnn8']:10.2f}" if t["fp8"] and t["cudnn8"] else f"{'-':>10}")
    ms = r["ms"]
    extra = " ".join(f"{ms[c]:8.3f}" if ms[c] is not None else f"{'err':>8}"
                     for c in ("quant", "qxla"))
    gbps = f"{r['quant_gbps']:10.0f}" if r["quant_gbps"] else f"{'-':>10}"
    return f"{r['hdim']:4d} {r['mask']:>6} {r['seqlen']:6d} {cells} {extra} {gbps} {ratio}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hdims", default="128")
    ap.add_argument("--seqlens", default="1024,2048,4096,8192,16384")
    ap.add_argument("--masks", default="full,causal")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}; TFLOP/s (CUPTI kernel time, median of "
          f"{args.reps})")
    print(HEADER)
    rows = []
    for hdim in (int(x) for x in args.hdims.split(",")):
        for mask in args.masks.split(","):
            for seqlen in (int(x) for x in args.seqlens.split(",")):
                rows.append(row(hdim, mask, seqlen, args.tokens, args.hidden, args.reps))
                print(format_row(rows[-1]), flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

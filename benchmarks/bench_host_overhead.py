"""Host overhead of one tiny attention call: fa3_jax beside cuDNN, on every GPU.

A jitted call on tiny inputs (default q/k/v [1, 128, 1, 64] bf16) does almost no GPU work, so its
wall time is what the framework and the custom call cost on the host: dispatch, the FFI handler,
kernel launches. Each implementation is warmed up, then called --calls times (300) in two ways:

  latency   each call waits for its result (jax.block_until_ready) before the next starts
  pipelined --calls calls issued back to back, one wait at the end (the per-call cost a training
            loop sees when the host runs ahead)

Columns: median and p90 of the per-call latency (us), pipelined us per call, and fa3_jax / cuDNN.
The same is done for forward + backward (jax.grad). Runs on CPU too (no cuDNN there).

    python benchmarks/bench_host_overhead.py [--shape 1,128,1,64] [--calls 300] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import fa3_jax


def _impls(backend):
    impls = {"fa3_jax": lambda q, k, v: fa3_jax.flash_attention(q, k, v, causal=True)}
    if backend == "gpu":
        impls["cuDNN"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn")
    return impls


def _grad(fn):
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))


def measure(fn, args, calls, warmup=20):
    f = jax.jit(fn)
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    lat = []
    for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        lat.append((time.perf_counter() - t0) * 1e6)
    t0 = time.perf_counter()
    outs = [f(*args) for _ in range(calls)]
    jax.block_until_ready(outs)
    pipelined = (time.perf_counter() - t0) * 1e6 / calls
    return dict(median_us=statistics.median(lat), p90_us=float(np.percentile(lat, 90)),
                pipelined_us=pipelined)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="1,128,1,64", help="q/k/v shape B,S,H,D")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split(","))
    backend = jax.default_backend()
    dtype = jnp.bfloat16 if backend == "gpu" else jnp.float32
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    print(f"backend={backend} devices={[d.device_kind for d in jax.devices()]} jax={jax.__version__}"
          f" | q/k/v {list(shape)} {jnp.dtype(dtype).name}, causal, {args.calls} calls after "
          "warm-up")
    rows = []
    for dev in jax.devices():
        qkv = [jax.device_put(jax.random.normal(k, shape, jnp.float32).astype(dtype), dev)
               for k in keys]
        for pass_name in ("fwd", "fwd+bwd"):
            res = {}
            for name, fn in _impls(backend).items():
                res[name] = measure(fn if pass_name == "fwd" else _grad(fn), qkv, args.calls)
            rows.append(dict(device=str(dev), pass_=pass_name, **{
                f"{n}_{m}": v for n, r in res.items() for m, v in r.items()}))
    impls = list(_impls(backend))
    head = f"{'device':>8} {'pass':>8} " + " ".join(
        f"{n + ' ' + m:>18}" for n in impls for m in ("median", "p90", "pipelined"))
    if "cuDNN" in impls:
        head += f" {'fa3/cuDNN median':>17} {'fa3/cuDNN pipelined':>20}"
    print("wall time per call (us)")
    print(head)
    for r in rows:
        line = f"{r['device']:>8} {r['pass_']:>8} " + " ".join(
            f"{r[f'{n}_{m}']:18.1f}" for n in impls for m in ("median_us", "p90_us",
                                                            "pipelined_us"))
        if "cuDNN" in impls:
            line += (f" {r['fa3_jax_median_us'] / r['cuDNN_median_us']:17.2f}"
                     f" {r['fa3_jax_pipelined_us'] / r['cuDNN_pipelined_us']:20.2f}")
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(backend=backend, shape=shape, calls=args.calls, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

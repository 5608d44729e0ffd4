"""Context parallelism: a causal attention training step on n devices (sequence sharded) vs one.

For each sequence length, times ``jax.value_and_grad`` of a loss through ``flash_attention``
(forward + backward; ``--what block`` adds the q/k/v/out projections and an MLP around it, a
transformer block) on one device with the whole sequence, and on n devices with the sequence
sharded: the ring with the load-balanced layout (the default for causal training), the ring with
contiguous chunks (shows the imbalance), and K/V all-gathered (contiguous or load-balanced). Checks the n-device results against
one device (bf16 on GPUs: max error relative to the largest value) and prints a fixed-width table;
``--json`` writes the numbers.

    python benchmarks/bench_context_parallel.py --devices 2 --seqs 32768 65536 131072
    python benchmarks/bench_context_parallel.py --devices 2 --profile /tmp/cp_trace   # overlap

``--profile`` also prints, per GPU, how much of the communication kernels' time ran while a
compute kernel was running on the same GPU (the K/V transfer hidden under attention).
    python benchmarks/bench_context_parallel.py --cpu-devices 2 --seqs 256 --heads 2 --reps 2

Times are host wall clock per step (median), from the call to ``block_until_ready``: CUPTI
kernel time would add up the kernels of all devices, which is not what a speed-up means here.
"""

from __future__ import annotations

import argparse
import json
import glob
import gzip
import os
import re
import statistics
import sys
import time


# Bench name -> (context_parallel strategy, load-balanced layout).
STRATEGIES = {"ring-balanced": ("ring", True), "ring": ("ring", False),
              "all_gather-balanced": ("all_gather", True), "all_gather": ("all_gather", False)}


def _union(intervals):
    """Sorted, merged [start, end) intervals."""
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _intersection_length(x, y):
    """Total length where two merged interval lists overlap."""
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        total += max(0.0, hi - lo)
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


_COMM = re.compile(r"nccl|sendrecv|all-?gather|reduce-?scatter|all-?reduce|collective", re.I)


def overlap_summary(trace_dir):
    """Per GPU of a ``jax.profiler`` perfetto trace: how long communication kernels (NCCL) ran,
    how long other kernels ran, and how much of the communication ran while a compute kernel was
    running on the same GPU (the transfer hidden under the attention kernels).

    Kernels are the events on the GPU processes' "Stream ..." threads. Returns a list of dicts
    (one per GPU; empty when the trace has no GPU streams, e.g. on CPU)."""
    files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        return []
    with gzip.open(max(files, key=os.path.getmtime)) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    gpu_pids, stream_tids = {}, set()
    for e in events:
        if e.get("ph") != "M":
            continue
        name = e.get("args", {}).get("name", "")
        if e.get("name") == "process_name" and "GPU" in name:
            gpu_pids[e["pid"]] = name
        elif e.get("name") == "thread_name" and name.startswith("Stream"):
            stream_tids.add((e["pid"], e["tid"]))
    per_gpu = {pid: ([], []) for pid in gpu_pids}
    for e in events:
        if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in stream_tids \
                and e["pid"] in per_gpu:
            span = (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)))
            per_gpu[e["pid"]][0 if _COMM.search(e.get("name", "")) else 1].append(span)
    rows = []
    for pid, (comm, compute) in sorted(per_gpu.items(), key=lambda kv: kv[1]):
        comm, compute = _union(comm), _union(compute)
        comm_us = sum(b - a for a, b in comm)
        rows.append(dict(gpu=gpu_pids[pid], comm_ms=comm_us / 1e3,
                         compute_ms=sum(b - a for a, b in compute) / 1e3,
                         hidden_ms=_intersection_length(comm, compute) / 1e3))
    return rows


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", type=int, default=2, help="sequence shards (devices) to compare")
    p.add_argument("--seqs", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--what", choices=["attention", "block"], default="attention")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--profile", default=None,
                   help="write a jax.profiler trace of two steps of each n-device run here")
    p.add_argument("--json", default=None)
    p.add_argument("--xla-flags", default="",
                   help="appended to XLA_FLAGS before jax starts, e.g. to try the scheduler's "
                        "collective overlap: --xla-flags=--xla_gpu_enable_latency_hiding_scheduler"
                        "=true")
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="smoke test: force this many host CPU devices (set before jax starts)")
    return p.parse_args(argv)


def main(argv=None):
    args = _parse(argv)
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
    if args.cpu_devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                                   f"device_count={args.cpu_devices}").strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax  # noqa: PLC0415 (after XLA_FLAGS)
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: PLC0415

    import fa3_jax  # noqa: PLC0415

    backend = jax.default_backend()
    dtype = jnp.dtype(args.dtype or ("bfloat16" if backend == "gpu" else "float32"))
    n = args.devices
    if len(jax.devices()) < n:
        raise SystemExit(f"needs {n} devices, found {len(jax.devices())}")
    kv_heads = args.kv_heads or args.heads
    width = args.heads * args.head_dim
    print(f"backend={backend} device={jax.devices()[0].device_kind} x{n} | what={args.what} "
          f"batch={args.batch} heads={args.heads}/{kv_heads} head_dim={args.head_dim} "
          f"dtype={dtype.name} causal | XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
          flush=True)

    def make_step(load_balance=0, strategy="ring"):
        attend = lambda q, k, v: fa3_jax.flash_attention(  # noqa: E731
            q, k, v, causal=True, load_balance=load_balance, context_parallel=strategy)

        if args.what == "attention":
            def loss(params, x):
                q, k, v = x
                return jnp.sum(attend(q, k, v).astype(jnp.float32) ** 2) / q.size
        else:
            def loss(params, x):
                b, s, _ = x.shape
                h = x @ params["wq"]
                q = h.reshape(b, s, args.heads, args.head_dim)
                kv = (x @ params["wkv"]).reshape(b, s, 2 * kv_heads, args.head_dim)
                k, v = jnp.split(kv, 2, axis=2)
                y = x + attend(q, k, v).reshape(b, s, width) @ params["wo"]
                y = y + jax.nn.gelu(y @ params["w1"]) @ params["w2"]
                return jnp.mean(y.astype(jnp.float32) ** 2)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    def inputs(seq, key):
        keys = jax.random.split(key, 8)
        if args.what == "attention":
            shapes = [(args.batch, seq, args.heads, args.head_dim),
                      (args.batch, seq, kv_heads, args.head_dim),
                      (args.batch, seq, kv_heads, args.head_dim)]
            x = tuple(jax.random.normal(k, s, jnp.float32).astype(dtype)
                      for k, s in zip(keys, shapes))
            return {}, x
        scale = 1.0 / np.sqrt(width)
        params = {name: (jax.random.normal(k, s, jnp.float32) * scale).astype(dtype)
                  for k, (name, s) in zip(keys[1:], [
                      ("wq", (width, width)), ("wkv", (width, 2 * kv_heads * args.head_dim)),
                      ("wo", (width, width)), ("w1", (width, 4 * width)),
                      ("w2", (4 * width, width))])}
        x = jax.random.normal(keys[0], (args.batch, seq, width), jnp.float32).astype(dtype)
        return params, x

    def time_step(step, params, x):
        for _ in range(args.warmup):
            jax.block_until_ready(step(params, x))
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            jax.block_until_ready(step(params, x))
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def rel_err(a, b):
        a = np.asarray(jnp.asarray(a, jnp.float32))
        b = np.asarray(jnp.asarray(b, jnp.float32))
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))

    mesh = Mesh(np.array(jax.devices()[:n]), ("seq",))
    rows = []
    for seq in args.seqs:
        if seq % (2 * n):
            raise SystemExit(f"--seqs: {seq} is not a multiple of 2 x devices = {2 * n}")
        params, x = inputs(seq, jax.random.PRNGKey(seq))
        one = jax.device_put((params, x), jax.devices()[0])
        ref_loss, ref_grads = make_step()(*one)
        ref_ms = time_step(make_step(), *one)
        row = dict(seq=seq, one_device_ms=ref_ms, runs={})
        del one
        for name in args.strategies:
            strategy, lb = STRATEGIES[name]
            lb = n if lb else 0
            tokens = (lambda t: fa3_jax.load_balance_reorder(t, n)) if lb else (lambda t: t)
            back = (lambda t: fa3_jax.load_balance_restore(t, n)) if lb else (lambda t: t)
            seq_sharded = NamedSharding(mesh, P(None, "seq"))
            xs = jax.device_put(jax.tree.map(tokens, x), seq_sharded)
            ps = jax.device_put(params, NamedSharding(mesh, P()))
            step = make_step(lb, strategy)
            loss, (g_params, g_x) = step(ps, xs)
            err = max([rel_err(loss, ref_loss)]
                      + [rel_err(a, b) for a, b in zip(jax.tree.leaves(g_params),
                                                       jax.tree.leaves(ref_grads[0]))]
                      + [rel_err(back(a), b) for a, b in zip(jax.tree.leaves(g_x),
                                                             jax.tree.leaves(ref_grads[1]))])
            ms = time_step(step, ps, xs)
            mem = step.lower(ps, xs).compile().memory_analysis()
            temp = getattr(mem, "temp_size_in_bytes", -1)
            row["runs"][name] = dict(ms=ms, speedup=ref_ms / ms, max_rel_err=err,
                                     temp_bytes_per_device=temp)
            if args.profile:
                path = os.path.join(args.profile, f"seq{seq}_{name}")
                with jax.profiler.trace(path, create_perfetto_trace=True):
                    for _ in range(2):
                        jax.block_until_ready(step(ps, xs))
                overlap = overlap_summary(path)
                row["runs"][name]["overlap"] = overlap
                print(f"  trace: {path}", flush=True)
                for o in overlap:
                    hidden = o["hidden_ms"] / o["comm_ms"] if o["comm_ms"] else 0.0
                    print(f"    {o['gpu']}: communication {o['comm_ms']:.2f} ms, of it under "
                          f"compute {o['hidden_ms']:.2f} ms ({hidden:.0%}); compute "
                          f"{o['compute_ms']:.2f} ms (2 steps)", flush=True)
            del xs, ps
        rows.append(row)
        line = f"seq {seq:>7}: 1 device {ref_ms:9.2f} ms"
        for name, r in row["runs"].items():
            line += f" | {name} {r['ms']:9.2f} ms {r['speedup']:5.2f}x (err {r['max_rel_err']:.1e})"
        print(line, flush=True)

    head = f"{'seq':>7} {'1 dev ms':>10}" + "".join(
        f" {name + ' ms':>18} {'x':>6} {'rel err':>8} {'temp MiB':>9}" for name in args.strategies)
    print("\n" + head)
    for row in rows:
        line = f"{row['seq']:>7} {row['one_device_ms']:>10.2f}"
        for name in args.strategies:
            r = row["runs"][name]
            line += (f" {r['ms']:>18.2f} {r['speedup']:>6.2f} {r['max_rel_err']:>8.1e}"
                     f" {r['temp_bytes_per_device'] / 2**20:>9.1f}")
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), backend=backend,
                           device=jax.devices()[0].device_kind, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

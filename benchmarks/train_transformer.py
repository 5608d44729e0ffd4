"""The main job: a jit-compiled training step of a small Flax transformer with fa3_jax attention.

Trains the same model (same initial parameters, same batches) with each attention implementation
and prints the loss curves side by side and the median step time of each:

  fa3_jax  fa3_jax.flash_attention(q, k, v, causal=True)
  xla      jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  cudnn    jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
           (NVIDIA GPUs only: skipped, saying so, on other backends)

Runs on the CPU backend where there is no GPU; on a Hopper GPU it runs the sm_90a kernels in
bfloat16. The implementations train side by side, a block of `--block` steps of each in turn (the
order alternating every block), so that clock or thermal drift affects them alike. A block's steps
are dispatched back to back and waited on once, as a training loop runs: the step time is a
block's host wall-clock time over its steps (median over the blocks), the compiling first step left
out. Where CUPTI is available (CUDA builds) the last `--sample-steps` steps of each run one at a
time and are split by kernel: the GPU time of the attention kernels
(forward and backward, with their pre/post-processing) against everything else, median over the
sampled steps. On GPUs XLA's per-fusion autotune cache points at a temporary directory, so that
fusions the models share are autotuned once and run the same way in both (on an H200 with
jax 0.11.2 it held one result: most GEMMs pick their algorithm without it); the last line says
how many results it held.

    python benchmarks/train_transformer.py [--steps 30] [--seq 256] [--batch 8] ...
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import fa3_jax
from fa3_jax import timing

import flax.linen as nn

ATTENTION = {
    "fa3_jax": lambda q, k, v: fa3_jax.flash_attention(q, k, v, causal=True),
    "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                        implementation="xla"),
    "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                          implementation="cudnn"),
}
LABELS = {"fa3_jax": "fa3_jax", "xla": "jax.nn XLA", "cudnn": "jax.nn cuDNN"}
SHORT = {"fa3_jax": "fa3_jax", "xla": "XLA", "cudnn": "cuDNN"}


class Block(nn.Module):
    heads: int
    head_dim: int
    kv_heads: int
    attention: str
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        b, s, _ = x.shape
        h = nn.LayerNorm(dtype=self.dtype)(x)
        q = nn.Dense(self.heads * self.head_dim, use_bias=False, dtype=self.dtype)(h)
        kv = nn.Dense(2 * self.kv_heads * self.head_dim, use_bias=False, dtype=self.dtype)(h)
        q = q.reshape(b, s, self.heads, self.head_dim)
        k, v = jnp.split(kv.reshape(b, s, 2 * self.kv_heads, self.head_dim), 2, axis=2)
        a = ATTENTION[self.attention](q, k, v).reshape(b, s, -1)
        x = x + nn.Dense(x.shape[-1], use_bias=False, dtype=self.dtype)(a)
        h = nn.LayerNorm(dtype=self.dtype)(x)
        h = nn.Dense(4 * x.shape[-1], dtype=self.dtype)(h)
        return x + nn.Dense(x.shape[-1], dtype=self.dtype)(nn.gelu(h))


class Transformer(nn.Module):
    vocab: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    attention: str
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, tokens):
        d = self.heads * self.head_dim
        x = nn.Embed(self.vocab, d, dtype=self.dtype)(tokens)
        x = x + self.param("pos", nn.initializers.normal(0.02), (tokens.shape[1], d)).astype(x.dtype)
        for _ in range(self.layers):
            x = Block(self.heads, self.head_dim, self.kv_heads, self.attention, self.dtype)(x)
        x = nn.LayerNorm(dtype=self.dtype)(x)
        return nn.Dense(self.vocab, dtype=jnp.float32)(x)


def make_batches(key, steps, batch, seq, vocab):
    """A learnable synthetic task: each sequence repeats a random motif of length 8..16."""
    out = []
    for i in range(steps):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        period = int(jax.random.randint(k1, (), 8, 17))
        motif = jax.random.randint(k2, (batch, period), 0, vocab)
        reps = -(-(seq + 1) // period)
        out.append(jnp.tile(motif, (1, reps))[:, : seq + 1])
    return out


def make_step(attention, args, params0):
    """(jitted step(params, mom, tokens) -> (params, mom, loss), params, mom) for one attention."""
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = Transformer(args.vocab, args.layers, args.heads, args.kv_heads, args.head_dim,
                        attention, dtype)

    def loss_fn(params, tokens):
        logits = model.apply(params, tokens[:, :-1])
        labels = jax.nn.one_hot(tokens[:, 1:], args.vocab)
        return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1))

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, mom, tokens):
        loss, g = jax.value_and_grad(loss_fn)(params, tokens)
        # Clip to global norm 1 so that both runs stay stable in bfloat16 at larger sizes.
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(g)))
        g = jax.tree.map(lambda x: x * jnp.minimum(1.0, 1.0 / (norm + 1e-6)).astype(x.dtype), g)
        mom = jax.tree.map(lambda m, g: 0.9 * m + g, mom, g)
        params = jax.tree.map(lambda p, m: p - args.lr * m, params, mom)
        return params, mom, loss

    params = jax.tree.map(jnp.array, params0)
    return step, params, jax.tree.map(jnp.zeros_like, params)


def _segments(steps, block, sample_steps):
    """The run's plan: [(kind, step indices)], kind "compile" (step 0), "timed" (blocks of up to
    `block` steps dispatched back to back) or "sampled" (the last `sample_steps`, under CUPTI)."""
    first_sampled = max(2, steps - sample_steps)  # at least one timed step
    plan = [("compile", [0])] if steps else []
    plan += [("timed", list(range(i, min(i + block, first_sampled))))
             for i in range(1, first_sampled, block)]
    plan += [("sampled", [i]) for i in range(first_sampled, steps)]
    return plan


def train(names, args, batches, params0):
    """Trains one model per attention implementation, in turn block by block (the order
    alternating every block), so that clock or thermal drift falls on every implementation alike.

    Step 0 compiles. Then blocks of `--block` steps are dispatched back to back and waited on once
    at the end, as a training loop runs (the host prepares the next step while the GPU runs this
    one): a block's time over its steps is the step time. The last `--sample-steps` steps run one
    at a time under CUPTI for the kernel split. Returns ({name: (losses, step seconds (one per
    timed step, its block's mean), [kernel lists of the sampled steps] or None)}, {failed peer:
    reason}); fa3_jax failing raises."""
    runs, failed = {}, {}
    for name in names:
        runs[name] = dict(state=make_step(name, args, params0), losses=[], times=[], kernels=[])
    for j, (kind, steps) in enumerate(_segments(len(batches), args.block, args.sample_steps)):
        order = [n for n in (names if j % 2 == 0 else names[::-1]) if n in runs]
        for name in order:
            run = runs[name]
            step, params, mom = run["state"]
            losses = []
            t0 = time.perf_counter()
            try:
                for i in steps:
                    if kind == "sampled":
                        (params, mom, loss), kernels = timing.launched_kernels(step, params, mom,
                                                                               batches[i])
                        if kernels is not None:
                            run["kernels"].append(kernels)
                    else:
                        params, mom, loss = step(params, mom, batches[i])
                    losses.append(loss)
                losses = [float(x) for x in losses]  # blocks until the block is done
            except Exception as e:  # noqa: BLE001 -- a peer that can't run this config
                if name == "fa3_jax":
                    raise
                failed[name] = f"failed: {str(e).strip().splitlines()[0][:160]}"
                print(f"{LABELS[name]}: skipped ({failed[name]})", flush=True)
                del runs[name]
                continue
            dt = (time.perf_counter() - t0) / len(steps)
            run["state"] = (step, params, mom)
            run["losses"] += losses
            if kind == "timed":
                run["times"] += [dt] * len(steps)
            if args.verbose:
                print(f"  [{name}] {kind} steps {steps[0]}-{steps[-1]}: loss {losses[-1]:.4f} "
                      f"({dt * 1e3:.1f} ms a step)", flush=True)
    return {n: (r["losses"], r["times"], r["kernels"] or None) for n, r in runs.items()}, failed


# Kernel names of the attention implementations: fa3_jax's own (namespace fa3) and cuDNN's
# fused SDPA engines; every other kernel (GEMMs, norms, fusions, optimizer) counts as "other".
ATTENTION_KERNEL_MARKS = ("fa3", "flash", "sdpa", "fmha", "fprop", "bprop", "cudnn")


def is_attention_kernel(name):
    low = name.lower()
    return any(m in low for m in ATTENTION_KERNEL_MARKS)


def kernel_split(kernels):
    """(attention ms, other ms, kernel count, [(name, ms)] of the attention kernels summed by name)."""
    att, other, by_name = 0.0, 0.0, {}
    for name, ms in kernels:
        if is_attention_kernel(name):
            att += ms
            by_name[name] = by_name.get(name, 0.0) + ms
        else:
            other += ms
    return att, other, len(kernels), sorted(by_name.items(), key=lambda kv: -kv[1])


def median_split(samples):
    """kernel_split over several sampled steps: (attention, other, total ms: each the median over
    the steps; kernel count of the first; [(name, median ms)] of the attention kernels)."""
    splits = [kernel_split(k) for k in samples]
    med = statistics.median
    names = {name for s in splits for name, _ in s[3]}
    by_name = {name: med([dict(s[3]).get(name, 0.0) for s in splits]) for name in names}
    return (med([s[0] for s in splits]), med([s[1] for s in splits]),
            med([s[0] + s[1] for s in splits]), splits[0][2],
            sorted(by_name.items(), key=lambda kv: -kv[1]))


def _impls(text):
    names = [x for x in text.split(",") if x]
    bad = [x for x in names if x not in ATTENTION]
    if bad or "fa3_jax" not in names:
        raise argparse.ArgumentTypeError(f"--impls: a comma list of {', '.join(ATTENTION)} that "
                                         f"includes fa3_jax; got {text!r}")
    return names


def _skip_reason(name, backend, dtype):
    """Why an implementation can't run here, or None."""
    if name == "cudnn" and backend != "gpu":
        return f"cuDNN needs an NVIDIA GPU (backend is {backend})"
    if name == "cudnn" and dtype == "float32":
        return "cuDNN attention takes float16/bfloat16 only (--dtype float32)"
    return None


AUTOTUNE_CACHE_FLAG = "--xla_gpu_per_fusion_autotune_cache_dir"


_autotune_cache_dir = None  # set by _share_autotuning


def _share_autotuning():
    """Points XLA's per-fusion autotune cache at a fresh temporary directory (unless XLA_FLAGS
    names one): a fusion both models share is autotuned once, by the first compilation, and the
    second reuses that choice instead of picking again from noisy timings. Called only when this
    file runs as a script, before the GPU backend starts (the flag takes effect only then; an
    importer's process environment is left alone)."""
    global _autotune_cache_dir
    flags = os.environ.get("XLA_FLAGS", "")
    if AUTOTUNE_CACHE_FLAG not in flags:
        _autotune_cache_dir = tempfile.mkdtemp(prefix="fa3_jax_train_autotune_")
        os.environ["XLA_FLAGS"] = f"{flags} {AUTOTUNE_CACHE_FLAG}={_autotune_cache_dir}".strip()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--impls", type=_impls, default=list(ATTENTION),
                   help="comma list of " + ",".join(ATTENTION) + " (default: all; cudnn is "
                   "skipped off NVIDIA GPUs)")
    p.add_argument("--json", default=None, help="write losses and times here")
    p.add_argument("--block", type=int, default=5,
                   help="steps dispatched back to back per timed block (default 5)")
    p.add_argument("--sample-steps", type=int, default=5,
                   help="run the last N steps of each implementation under CUPTI and print the "
                   "median kernel-time split (CUDA builds; default 5)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.block < 1 or args.sample_steps < 0 or args.steps < 2:
        p.error(f"need --block >= 1, --sample-steps >= 0 and --steps >= 2; got --block "
                f"{args.block}, --sample-steps {args.sample_steps}, --steps {args.steps}")
    backend = jax.default_backend()
    if args.dtype is None:
        args.dtype = "bfloat16" if backend == "gpu" else "float32"
    print(f"backend={backend} device={jax.devices()[0].device_kind} fa3_jax CUDA kernels="
          f"{fa3_jax.cuda_built()} | batch={args.batch} seq={args.seq} layers={args.layers} "
          f"heads={args.heads}/{args.kv_heads} head_dim={args.head_dim} dtype={args.dtype} "
          f"steps={args.steps}", flush=True)
    if backend == "gpu" and "autotune_level=0" in os.environ.get("XLA_FLAGS", ""):
        print("note: XLA_FLAGS turns GEMM autotuning off: the step times are not the models' "
              "(unset it to compare them)", flush=True)

    key = jax.random.PRNGKey(0)
    batches = make_batches(key, args.steps, args.batch, args.seq, args.vocab)
    init_model = Transformer(args.vocab, args.layers, args.heads, args.kv_heads, args.head_dim,
                             "xla", jnp.float32)
    params0 = init_model.init(jax.random.PRNGKey(1), batches[0][:, :-1])

    skipped, todo = {}, []
    for name in args.impls:
        why = _skip_reason(name, backend, args.dtype)
        if why is None:
            todo.append(name)
        else:
            skipped[name] = why
            print(f"{LABELS[name]}: skipped ({why})", flush=True)
    print(f"training with {', '.join(LABELS[n] for n in todo)} attention, one step of each in "
          f"turn ...", flush=True)
    results, failed = train(todo, args, batches, params0)
    skipped.update(failed)

    names = list(results)
    peers = [n for n in names if n != "fa3_jax"]
    lf = results["fa3_jax"][0]
    head = "".join(f" {'loss ' + SHORT[n]:>13}" for n in names)
    diffs = "".join(f" {'|fa3-' + SHORT[n] + '|':>12}" for n in peers)
    print(f"\n{'step':>5}{head}{diffs}")
    for i in sorted(set(range(0, args.steps, max(1, args.steps // 10))) | {args.steps - 1}):
        row = "".join(f" {results[n][0][i]:13.4f}" for n in names)
        row += "".join(f" {abs(lf[i] - results[n][0][i]):12.2e}" for n in peers)
        print(f"{i:5d}{row}")
    ms = {n: statistics.median(results[n][1]) * 1e3 for n in names}
    print("\nmedian step time: " + " | ".join(f"{LABELS[n]} {ms[n]:.2f} ms" for n in names))
    if peers:
        print("fa3_jax speedup (its step time / fa3_jax's): "
              + ", ".join(f"{ms[n] / ms['fa3_jax']:.3f}x over {LABELS[n]}" for n in peers))
        worst = {n: max(abs(a - b) for a, b in zip(lf, results[n][0])) for n in peers}
        print(f"largest loss difference over {args.steps} steps: "
              + ", ".join(f"{worst[n]:.2e} vs {LABELS[n]}" for n in peers)
              + f"; loss {lf[0]:.3f} -> {lf[-1]:.3f}")
    split = {n: median_split(results[n][2]) for n in names if results[n][2]}
    if split:
        counts = sorted({len(results[n][2]) for n in split})
        print(f"\nGPU kernel time per step (CUPTI), ms: median over the last "
              f"{'/'.join(map(str, counts))} steps of each")
        print(f"{'':>14} {'attention':>10} {'other':>10} {'total':>10} {'kernels':>8}")
        for n, (att, other, total, count, _) in split.items():
            print(f"{LABELS[n]:>14} {att:10.3f} {other:10.3f} {total:10.3f} {count:8d}")
        if "fa3_jax" in split:
            for n in peers:
                if n in split and split["fa3_jax"][0] > 0:
                    print(f"attention kernels: fa3_jax {split['fa3_jax'][0]:.3f} ms, "
                          f"{split[n][0] / split['fa3_jax'][0]:.2f}x faster than {LABELS[n]}; "
                          f"all kernels: {split[n][2] / split['fa3_jax'][2]:.2f}x")
        if args.verbose:
            for n, (_, _, _, _, top) in split.items():
                print(f"  {LABELS[n]} attention kernels (median ms a step):")
                for name, t in top:
                    print(f"    {t:8.3f} ms  {name[:150]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), backend=backend, labels=LABELS,
                           losses={n: results[n][0] for n in names}, step_ms=ms,
                           kernel_ms={n: dict(attention=v[0], other=v[1], total=v[2],
                                              kernels=v[3], attention_by_name=v[4],
                                              sampled_steps=[kernel_split(k)[:2]
                                                             for k in results[n][2]])
                                      for n, v in split.items()},
                           skipped=skipped), f, indent=1)
    if _autotune_cache_dir is not None and backend == "gpu":
        print(f"shared autotune cache: {len(os.listdir(_autotune_cache_dir))} fusion results in "
              f"{_autotune_cache_dir}")
    if not np.isfinite(lf).all():
        raise SystemExit("fa3_jax training produced a non-finite loss")
    return 0


if __name__ == "__main__":
    _share_autotuning()
    raise SystemExit(main())

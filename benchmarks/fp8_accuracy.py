"""FP8 accuracy table with the FlashAttention-3 paper's protocol (section 4.3).

q, k, v entries are N(0, 1) + N(0, 100) * Bernoulli(0.001) (variance 100: a rare outlier of
standard deviation 10); the output RMSE is taken against a float64 reference. Rows: bfloat16
flash_attention, and fp8_attention with per-tensor scales, block scales, the Hadamard
transform, and both (the default). Runs on whatever backend fa3_jax runs (the CPU backend
dequantizes and computes in float32, so its FP8 rows measure the quantization of q, k and v;
the Hopper kernel will also round P to e4m3). tests/test_fp8.py checks the table.

    python benchmarks/fp8_accuracy.py [--seqlen 2048] [--heads 4] [--head-dim 128] [--seed 0]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import fa3_jax

ROWS = (  # name, fp8_attention options (None: the bfloat16 kernel)
    ("bf16", None),
    ("FP8 per-tensor", dict(block_quantize=False, incoherent=False)),
    ("FP8 block", dict(block_quantize=True, incoherent=False)),
    ("FP8 Hadamard", dict(block_quantize=False, incoherent=True)),
    ("FP8 both (default)", dict(block_quantize=True, incoherent=True)),
)


def paper_inputs(seed, batch, seqlen, heads, head_dim):
    """q, k, v float32 [batch, seqlen, heads, head_dim]: N(0,1) + N(0,100) * Bernoulli(0.001)."""
    rng = np.random.default_rng(seed)

    def one():
        shape = (batch, seqlen, heads, head_dim)
        outlier = rng.random(shape) < 0.001
        return (rng.standard_normal(shape) + 10.0 * rng.standard_normal(shape) * outlier)

    return tuple(one().astype(np.float32) for _ in range(3))


def reference64(q, k, v):
    """softmax(q kᵀ / sqrt(d)) v in float64 (NumPy), per head."""
    q, k, v = (np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in (q, k, v))  # bhsd
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3)


def measure(seed=0, batch=1, seqlen=2048, heads=4, head_dim=128):
    """{row name: output RMSE against float64}."""
    q, k, v = paper_inputs(seed, batch, seqlen, heads, head_dim)
    ref = reference64(q, k, v)
    results = {}
    for name, opts in ROWS:
        if opts is None:
            bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
            out = jax.jit(fa3_jax.flash_attention)(*bf)
        else:
            out = jax.jit(lambda q, k, v, o=opts: fa3_jax.fp8_attention(q, k, v, **o))(q, k, v)
        out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
        results[name] = float(np.sqrt(np.mean((out - ref) ** 2)))
    return results


def format_table(results, title):
    lines = [title, f"{'':20s} {'RMSE':>9s} {'vs per-tensor':>14s}"]
    base = results["FP8 per-tensor"]
    for name, err in results.items():
        lines.append(f"{name:20s} {err:9.2e} {base / err:13.2f}x")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args()
    for seed in args.seeds:
        res = measure(seed, 1, args.seqlen, args.heads, args.head_dim)
        print(format_table(res, f"batch 1, seqlen {args.seqlen}, {args.heads} heads of "
                                f"{args.head_dim}, seed {seed}, {jax.default_backend()} backend"))


if __name__ == "__main__":
    main()

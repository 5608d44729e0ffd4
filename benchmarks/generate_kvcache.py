"""Greedy generation with a KV cache: fa3_jax beside jax.nn.dot_product_attention.

A tiny random-weight decoder (token and position embeddings, --layers pre-norm blocks of causal
GQA attention and a GELU MLP, logits tied to the embedding) reads a batch of random prompts and
generates --new tokens greedily. The same weights and prompts run through each loop:

  fa3_jax       prefill: fa3_jax.flash_attention(causal=True) over the prompt, K/V stored in the
                cache; decode: one jitted step per token, fa3_jax.flash_attention_with_kvcache
                appending the token's K/V in place (the caches are donated to the step).
                --page-size N: a paged cache (pages of N tokens, shuffled page table).
  jax.nn/xla    prefill: jax.nn.dot_product_attention(is_causal=True); decode: the cache updated
                by dynamic_update_slice (donated), attention limited by key_value_seq_lengths.
  jax.nn/cudnn  the same with implementation="cudnn" (GPU only; skipped where cuDNN refuses).

Printed per loop: prefill ms, decode tokens per second (batch * (new - 1) decode steps / seconds,
timed on a second run after a warm-up run that compiles), and whether its greedy tokens equal
fa3_jax's (else the first step where they differ: in bfloat16 two implementations may round a
near tie differently).

    python benchmarks/generate_kvcache.py                    # CPU: small sizes, seconds
    python benchmarks/generate_kvcache.py --batch 8 --prompt 2048 --new 256 --layers 4 \\
        --d-model 2048 --heads 16 --kv-heads 4 --head-dim 128 --vocab 32000 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import math
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import fa3_jax


def init_params(key, *, vocab, d_model, layers, heads, kv_heads, head_dim, max_len, dtype):
    def dense(key, fan_in, shape):
        return (jax.random.normal(key, shape) / math.sqrt(fan_in)).astype(dtype)

    keys = iter(jax.random.split(key, 2 + 6 * layers))
    params = {"embed": dense(next(keys), 1, (vocab, d_model)),
              "pos": dense(next(keys), 1, (max_len, d_model)) * 0.1, "layers": []}
    for _ in range(layers):
        params["layers"].append({
            "wq": dense(next(keys), d_model, (d_model, heads * head_dim)),
            "wk": dense(next(keys), d_model, (d_model, kv_heads * head_dim)),
            "wv": dense(next(keys), d_model, (d_model, kv_heads * head_dim)),
            "wo": dense(next(keys), heads * head_dim, (heads * head_dim, d_model)),
            "w1": dense(next(keys), d_model, (d_model, 4 * d_model)),
            "w2": dense(next(keys), 4 * d_model, (4 * d_model, d_model))})
    return params


def rms_norm(x):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6)).astype(x.dtype)


def forward(params, tokens, positions, attend, caches, *, heads, kv_heads, head_dim):
    """Logits of the last position [batch, vocab] and the new caches. attend(layer, q, k, v,
    cache) -> (out [b, s, heads, head_dim], cache) is the implementation under test."""
    b, s = tokens.shape
    x = params["embed"][tokens] + params["pos"][positions]
    new_caches = []
    for i, layer in enumerate(params["layers"]):
        h = rms_norm(x)
        q = (h @ layer["wq"]).reshape(b, s, heads, head_dim)
        k = (h @ layer["wk"]).reshape(b, s, kv_heads, head_dim)
        v = (h @ layer["wv"]).reshape(b, s, kv_heads, head_dim)
        out, cache = attend(q, k, v, caches[i])
        new_caches.append(cache)
        x = x + out.reshape(b, s, heads * head_dim) @ layer["wo"]
        x = x + jax.nn.gelu(rms_norm(x) @ layer["w1"]) @ layer["w2"]
    logits = rms_norm(x[:, -1]).astype(jnp.float32) @ params["embed"].T.astype(jnp.float32)
    return logits, tuple(new_caches)


# ---------------------------------------------------------------------------------------------
# The loops. A cache is a (k, v) pair per layer; `lengths` int32 [batch] counts valid tokens.
# ---------------------------------------------------------------------------------------------

class Fa3Loop:
    """fa3_jax: flash_attention prefill, flash_attention_with_kvcache decode (contiguous or
    paged)."""

    def __init__(self, cfg, page_size):
        self.cfg, self.page_size = cfg, page_size
        self.name = "fa3_jax" + (f" paged/{page_size}" if page_size else "")

    def empty_caches(self, batch, capacity, dtype):
        c = self.cfg
        if not self.page_size:
            shape = (batch, capacity, c["kv_heads"], c["head_dim"])
            self.page_table = None
        else:
            pages = capacity // self.page_size
            perm = np.random.default_rng(0).permutation(batch * pages)
            self.page_table = jnp.asarray(perm.reshape(batch, pages), jnp.int32)
            shape = (batch * pages, self.page_size, c["kv_heads"], c["head_dim"])
        return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(c["layers"]))

    def _store_prompt(self, cache, x):
        """The prompt's K or V [b, s, h, d] into positions 0..s of every row."""
        if self.page_table is None:
            return jax.lax.dynamic_update_slice(cache, x, (0, 0, 0, 0))
        b, s = x.shape[:2]
        pages = -(-s // self.page_size)
        x = jnp.pad(x, ((0, 0), (0, pages * self.page_size - s), (0, 0), (0, 0)))
        x = x.reshape((b * pages, self.page_size) + x.shape[2:])
        return cache.at[self.page_table[:, :pages].reshape(-1)].set(x)

    def prefill_attend(self, q, k, v, cache):
        out = fa3_jax.flash_attention(q, k, v, causal=True)
        return out, (self._store_prompt(cache[0], k), self._store_prompt(cache[1], v))

    def decode_attend(self, lengths, q, k, v, cache):
        out, kc, vc = fa3_jax.flash_attention_with_kvcache(
            q, cache[0], cache[1], lengths, k_new=k, v_new=v, page_table=self.page_table,
            causal=True)
        return out, (kc, vc)


class JaxNnLoop:
    """jax.nn.dot_product_attention with a contiguous cache (xla or cudnn)."""

    def __init__(self, cfg, implementation):
        self.cfg, self.impl = cfg, implementation
        self.name = f"jax.nn/{implementation}"

    def empty_caches(self, batch, capacity, dtype):
        c = self.cfg
        shape = (batch, capacity, c["kv_heads"], c["head_dim"])
        return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(c["layers"]))

    def prefill_attend(self, q, k, v, cache):
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.impl)
        store = lambda c, x: jax.lax.dynamic_update_slice(c, x, (0, 0, 0, 0))  # noqa: E731
        return out, (store(cache[0], k), store(cache[1], v))

    def decode_attend(self, lengths, q, k, v, cache):
        # Every row has the same length here (prompts of one length), so one slice offset.
        kc = jax.lax.dynamic_update_slice(cache[0], k, (0, lengths[0], 0, 0))
        vc = jax.lax.dynamic_update_slice(cache[1], v, (0, lengths[0], 0, 0))
        out = jax.nn.dot_product_attention(q, kc, vc, key_value_seq_lengths=lengths + 1,
                                           implementation=self.impl)
        return out, (kc, vc)


def jitted_steps(loop, cfg, prompt_len):
    """The loop's jitted prefill and decode step, caches donated (built once, reused)."""
    shapes = dict(heads=cfg["heads"], kv_heads=cfg["kv_heads"], head_dim=cfg["head_dim"])

    @partial(jax.jit, donate_argnums=(2,))
    def prefill(params, prompts, caches):
        logits, caches = forward(params, prompts, jnp.arange(prompt_len), loop.prefill_attend,
                                 caches, **shapes)
        return jnp.argmax(logits, -1).astype(jnp.int32), caches

    @partial(jax.jit, donate_argnums=(3,))
    def step(params, token, lengths, caches):
        logits, caches = forward(params, token[:, None], lengths[:1],
                                 partial(loop.decode_attend, lengths), caches, **shapes)
        return jnp.argmax(logits, -1).astype(jnp.int32), lengths + 1, caches

    return prefill, step


def generate(loop, steps, params, prompts, new_tokens, capacity):
    """Greedy generation; returns (tokens [batch, new], prefill seconds, decode seconds)."""
    prefill, step = steps
    batch, plen = prompts.shape
    caches = loop.empty_caches(batch, capacity, params["embed"].dtype)
    t0 = time.perf_counter()
    token, caches = jax.block_until_ready(prefill(params, prompts, caches))
    t1 = time.perf_counter()
    lengths = jnp.full((batch,), plen, jnp.int32)
    out = [token]
    for _ in range(new_tokens - 1):
        token, lengths, caches = step(params, token, lengths, caches)
        out.append(token)
    out = np.asarray(jax.block_until_ready(jnp.stack(out, 1)))
    return out, t1 - t0, time.perf_counter() - t1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=61, help="prompt tokens (prefill)")
    p.add_argument("--new", type=int, default=32, help="generated tokens (the first from prefill)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--page-size", type=int, default=16, help="also run fa3_jax with a paged "
                   "cache of this page size (0: contiguous only)")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = next(iter(jnp.zeros(()).devices()))  # honours jax.default_device
    backend = device.platform
    dtype = jnp.dtype(args.dtype or ("float32" if backend == "cpu" else "bfloat16"))
    cfg = dict(layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
               head_dim=args.head_dim)
    capacity = args.prompt + args.new
    if args.page_size:
        capacity = -(-capacity // args.page_size) * args.page_size
    params = init_params(jax.random.PRNGKey(args.seed), vocab=args.vocab, d_model=args.d_model,
                         max_len=capacity, dtype=dtype, **cfg)
    prompts = jax.random.randint(jax.random.PRNGKey(args.seed + 1), (args.batch, args.prompt), 0,
                                 args.vocab, jnp.int32)

    loops = [Fa3Loop(cfg, 0)] + ([Fa3Loop(cfg, args.page_size)] if args.page_size else [])
    loops += [JaxNnLoop(cfg, "xla")] + ([JaxNnLoop(cfg, "cudnn")] if backend == "gpu" else [])
    print(f"backend {backend} ({device.device_kind}), {dtype}, batch {args.batch}, "
          f"prompt {args.prompt}, new {args.new}, {args.layers} layers, d_model {args.d_model}, "
          f"heads {args.heads}/{args.kv_heads} x {args.head_dim}, vocab {args.vocab}")
    print(f"{'loop':<20} {'prefill ms':>11} {'decode tok/s':>13}  same tokens as fa3_jax")
    reference = None
    for loop in loops:
        try:
            steps = jitted_steps(loop, cfg, args.prompt)
            generate(loop, steps, params, prompts, args.new, capacity)  # compiles
            tokens, t_prefill, t_decode = generate(loop, steps, params, prompts, args.new,
                                                   capacity)
        except Exception as e:  # noqa: BLE001 (a peer that cannot run this shape is reported)
            if loop.name.startswith("fa3_jax"):
                raise
            print(f"{loop.name:<20} skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        if reference is None:
            reference, same = tokens, "(reference)"
        else:
            diff = np.nonzero((tokens != reference).any(0))[0]
            same = "yes" if diff.size == 0 else f"no: first difference at token {diff[0]}"
        rate = args.batch * (args.new - 1) / t_decode
        print(f"{loop.name:<20} {t_prefill * 1e3:>11.1f} {rate:>13.1f}  {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The attention benchmark on a tiny CPU configuration, and its FLOP count against brute force."""

import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"
_spec = importlib.util.spec_from_file_location("bench_attention", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _visible_pairs(sq, sk, causal, window):
    """Brute force over every (i, j): flash_attention's bottom-right aligned mask."""
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    d = j - (i + sk - sq)
    ok = np.ones((sq, sk), bool)
    if left >= 0:
        ok &= d >= -left
    if right >= 0:
        ok &= d <= right
    return int(ok.sum())


@pytest.mark.parametrize("sq,sk", [(9, 9), (7, 12), (12, 7)])
def test_flops_match_brute_force(sq, sk):
    b, h, d = 2, 3, 16
    per_pair = 4 * d  # two matmuls, 2 FLOPs per multiply-add
    full = _visible_pairs(sq, sk, False, (-1, -1))
    assert full == sq * sk
    assert bench.flops(b, h, sq, sk, d) == b * h * full * per_pair
    # Plain causal is the papers' half-of-full convention, a little under the exact triangle.
    assert bench.flops(b, h, sq, sk, d, causal=True) == b * h * full * per_pair // 2
    for causal, window in [(False, (3, 2)), (False, (0, 0)), (False, (2, -1)), (False, (-1, 1)),
                           (True, (4, -1)), (True, (3, 5)), (True, (100, -1))]:
        exact = _visible_pairs(sq, sk, causal, window)
        got = bench.flops(b, h, sq, sk, d, causal=causal, window=window)
        assert got == b * h * exact * per_pair, (causal, window)
    assert bench.flops(b, h, sq, sk, d, head_dim_v=2 * d) == b * h * full * 2 * (d + 2 * d)


def test_benchmark_runs_on_cpu(tmp_path, capsys):
    out = tmp_path / "results.json"
    # Three reps, not two: a median of three ignores one call slowed by a busy host, which could
    # otherwise make the wall-clock forward look slower than forward + backward.
    argv = ["--tokens", "256", "--seqlens", "128", "--hdims", "64", "--reps", "3",
            "--warmup", "1", "--impls", "fa3_jax,xla", "--pass", "both", "--out", str(out)]
    # The CPU device even where a GPU is the default: this checks the harness, not a kernel.
    with jax.default_device(jax.devices("cpu")[0]):
        assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "fwd TFLOP/s" in printed and "bwd TFLOP/s" in printed

    data = json.loads(out.read_text())
    assert data["timing"] == "wallclock"
    rows = data["rows"]
    assert sorted((r["pass"], r["mask"]) for r in rows) == [
        ("bwd", "causal"), ("bwd", "full"), ("fwd", "causal"), ("fwd", "full")]
    for r in rows:
        assert (r["hdim"], r["seqlen"], r["batch"], r["heads"]) == (64, 128, 2, 32)
        assert r["flops"] > 0
        assert set(r["results"]) == {"fa3_jax", "xla"}
        for impl, res in r["results"].items():
            assert res["status"] == "ok", (impl, res)
            assert res["ms"] > 0 and res["tflops"] > 0
            assert res["tflops"] == pytest.approx(r["flops"] / (res["ms"] * 1e-3) / 1e12)
    fwd = {r["mask"]: r["flops"] for r in rows if r["pass"] == "fwd"}
    bwd = {r["mask"]: r["flops"] for r in rows if r["pass"] == "bwd"}
    assert fwd["full"] == 4 * 2 * 32 * 128 * 128 * 64 == 2 * fwd["causal"]
    assert bwd["full"] == 2.5 * fwd["full"]


class _FakeCupti:
    """Stands in for _fa3_jax_cupti (no GPU here): each stop() reports two 1.5 ms kernels."""

    def __init__(self, fail_stop_at=None):
        self.stops = 0
        self.fail_stop_at = fail_stop_at

    def start(self):
        pass

    def stop(self):
        self.stops += 1
        if self.stops == self.fail_stop_at:
            raise RuntimeError("CUPTI_ERROR_UNKNOWN")
        return [("k0", 0, 1_500_000), ("k1", 2_000_000, 3_500_000)]


def test_kernel_time_sums_kernels_and_falls_back(monkeypatch):
    from fa3_jax import timing
    x = jax.numpy.ones((4,))
    monkeypatch.setattr(timing, "_cupti", _FakeCupti())
    times, method = timing.kernel_time_ms(lambda a: a + 1, x, warmup=1, reps=3)
    assert method == "cupti" and times == pytest.approx([3.0] * 3)

    # A CUPTI failure mid-way re-times every call on the host clock, never a mix.
    monkeypatch.setattr(timing, "_cupti", _FakeCupti(fail_stop_at=2))
    with pytest.warns(RuntimeWarning, match="CUPTI_ERROR_UNKNOWN"):
        times, method = timing.kernel_time_ms(lambda a: a + 1, x, warmup=0, reps=3)
    assert method == "wallclock" and len(times) == 3 and all(t > 0 for t in times)

    # The timed function's own error is what the caller sees.
    def boom(a):
        raise ValueError("boom")
    with pytest.raises(ValueError, match="boom"):
        timing.kernel_time_ms(boom, x, warmup=0, reps=1)


def test_launched_kernels_with_cupti_and_when_it_fails(monkeypatch):
    from fa3_jax import timing
    x = jax.numpy.ones((4,))
    monkeypatch.setattr(timing, "_cupti", _FakeCupti())
    out, kernels = timing.launched_kernels(lambda a: a + 1, x)
    assert list(out) == [2.0] * 4
    assert [k for k, _ in kernels] == ["k0", "k1"] and [ms for _, ms in kernels] == pytest.approx([1.5, 1.5])
    # A failing stop still returns the (single) call's result, without records.
    monkeypatch.setattr(timing, "_cupti", _FakeCupti(fail_stop_at=1))
    calls = []
    out, kernels = timing.launched_kernels(lambda a: calls.append(1) or a * 3, x)
    assert list(out) == [3.0] * 4 and kernels is None and len(calls) == 1


def test_fp8_section_runs_on_cpu(tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = ["--tokens", "256", "--seqlens", "128", "--hdims", "64", "--reps", "3",
            "--warmup", "1", "--impls", "fa3_jax", "--pass", "fwd", "--masks", "full,causal",
            "--fp8", "--out", str(out)]
    with jax.default_device(jax.devices("cpu")[0]):
        assert bench.main(argv) == 0
    assert "fwd FP8 TFLOP/s" in capsys.readouterr().out

    data = json.loads(out.read_text())
    fp8_rows = [r for r in data["rows"] if r["pass"] == "fp8"]
    assert sorted(r["mask"] for r in fp8_rows) == ["causal", "full"]
    fwd = {r["mask"]: r["flops"] for r in data["rows"] if r["pass"] == "fwd"}
    for r in fp8_rows:
        assert r["flops"] == fwd[r["mask"]]
        # fa3_jax cells only (no cuDNN asked for); the quantization passes are times alone.
        assert set(r["results"]) == {"fp8", "fp8+q", "fp8+qx", "quant", "qxla"}
        for name in ("fp8", "fp8+q", "fp8+qx"):
            res = r["results"][name]
            assert res["status"] == "ok", (name, res)
            assert res["tflops"] == pytest.approx(r["flops"] / (res["ms"] * 1e-3) / 1e12)
        for name in ("quant", "qxla"):
            assert r["results"][name]["status"] == "ok" and r["results"][name]["ms"] > 0
    assert "fp8" in data["summary"]


def test_head_dim_pairs_and_fixed_heads_on_cpu(tmp_path, capsys):
    """--hdims D/DV (V narrower or wider than Q/K, MLA's shape) and --heads N (the same head count
    at every head dim, so head dims that do not divide the hidden size run)."""
    assert bench._hdim_list("64,192/128") == [(64, 64), (192, 128)]
    for bad in ("64,x", "192/", "0", "/128", ""):
        with pytest.raises(Exception, match="head dim"):
            bench._hdim_list(bad)
    out = tmp_path / "results.json"
    argv = ["--tokens", "128", "--seqlens", "64", "--hdims", "48/32,24", "--heads", "3",
            "--reps", "3", "--warmup", "1", "--impls", "fa3_jax", "--pass", "fwd",
            "--masks", "full", "--out", str(out)]
    with jax.default_device(jax.devices("cpu")[0]):
        assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "heads=3" in printed and " 48/32   full     64" in printed

    data = json.loads(out.read_text())
    assert data["heads"] == 3 and data["hidden"] is None
    rows = {(r["hdim"], r["hdim_v"]): r for r in data["rows"]}
    assert set(rows) == {(48, 32), (24, 24)}
    for (d, dv), r in rows.items():
        assert (r["heads"], r["batch"]) == (3, 2)
        assert r["flops"] == 2 * 3 * 64 * 64 * 2 * (d + dv)
        assert r["results"]["fa3_jax"]["status"] == "ok", r["results"]

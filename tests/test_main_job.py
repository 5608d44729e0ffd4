"""The main job (benchmarks/train_transformer.py) on a tiny CPU configuration: every peer is
named, cuDNN is skipped off NVIDIA GPUs with a reason, and the losses track jax.nn's."""

import importlib.util
import json
import pathlib
import sys

import jax
import pytest

pytest.importorskip("flax")
_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "train_transformer.py"


def _module():
    spec = importlib.util.spec_from_file_location("train_transformer", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # Flax's dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_main_job_runs_and_names_peers(tmp_path, capsys):
    tt = _module()
    out = tmp_path / "train.json"
    argv = ["--steps", "3", "--seq", "32", "--batch", "2", "--layers", "1", "--dtype", "float32",
            "--json", str(out)]
    with jax.default_device(jax.devices("cpu")[0]):
        assert tt.main(argv) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert {"fa3_jax", "xla"} <= set(data["losses"]) and set(data["losses"]) == set(data["step_ms"])
    assert "jax.nn XLA" in printed and "jax.nn cuDNN" in printed
    if data["backend"] != "gpu":
        assert "cudnn" in data["skipped"] and "cuDNN: skipped" in printed
    for a, b in zip(data["losses"]["fa3_jax"], data["losses"]["xla"]):
        assert abs(a - b) < 1e-4
    with pytest.raises(SystemExit):
        tt.main(["--impls", "xla"])  # fa3_jax must be among the implementations


def test_kernel_split_separates_attention_from_the_rest():
    tt = _module()
    kernels = [("void fa3::sm90_bwd::bwd_kernel<128>", 1.5), ("nvjet_hsh_192x192_64x3_2x1_v_bz_TNT", 4.0),
               ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7", 0.75),
               ("loop_add_fusion", 0.25), ("void fa3::sm90_bwd::bwd_kernel<128>", 0.5)]
    att, other, count, by_name = tt.kernel_split(kernels)
    assert (att, other, count) == (2.75, 4.25, 5)
    assert by_name[0] == ("void fa3::sm90_bwd::bwd_kernel<128>", 2.0) and len(by_name) == 2


def test_launched_kernels_without_cupti_returns_the_result():
    from fa3_jax import timing
    x = jax.numpy.arange(4.0)
    with jax.default_device(jax.devices("cpu")[0]):
        out, kernels = timing.launched_kernels(jax.jit(lambda a: a * 2), x)
    assert list(out) == [0.0, 2.0, 4.0, 6.0]
    if jax.default_backend() == "cpu":
        assert kernels is None


def test_median_split_takes_the_median_of_each_part_over_sampled_steps():
    tt = _module()
    steps = [[("fa3::fwd", 1.0), ("gemm", 10.0)],
             [("fa3::fwd", 3.0), ("gemm", 20.0), ("fa3::bwd", 2.0)],
             [("fa3::fwd", 2.0), ("gemm", 12.0)]]
    att, other, total, count, by_name = tt.median_split(steps)
    assert (att, other, total, count) == (2.0, 12.0, 14.0, 2)
    assert by_name == [("fa3::fwd", 2.0), ("fa3::bwd", 0.0)]  # absent from 2 of 3 steps


def test_run_plan_compiles_times_blocks_then_samples():
    tt = _module()
    plan = tt._segments(12, 4, 3)
    assert plan == [("compile", [0]), ("timed", [1, 2, 3, 4]), ("timed", [5, 6, 7, 8]),
                    ("sampled", [9]), ("sampled", [10]), ("sampled", [11])]
    assert tt._segments(3, 5, 5) == [("compile", [0]), ("timed", [1]), ("sampled", [2])]
    steps = [i for _, idx in tt._segments(40, 5, 9) for i in idx]
    assert steps == list(range(40))  # every batch once, in order

"""The decode benchmark on a tiny CPU configuration: rows, JSON and the bandwidth formula."""

import importlib.util
import json
import pathlib
import sys

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode.py"
# bench_decode imports its shared helpers from bench_attention, beside it (as a script does).
sys.path.insert(0, str(_PATH.parent))
_spec = importlib.util.spec_from_file_location("bench_decode", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_kv_bytes():
    # K and V, 2 bytes each: 2 * batch * seqlen_k * heads_kv * head_dim * 2
    assert bench.kv_bytes(8, 16384, 8, 128) == 2 * 8 * 16384 * 8 * 128 * 2


def test_tiny_run_writes_json(tmp_path, capsys):
    out = tmp_path / "decode.json"
    rc = bench.main(["--rows", "2x112x1,1x33x4", "--heads-q", "4", "--heads-kv", "2",
                     "--head-dim", "32", "--impls", "fa3_jax,xla,kvcache,paged16", "--reps", "2",
                     "--warmup", "1", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [(r["batch"], r["seqlen_k"], r["seqlen_q"]) for r in data["rows"]] == [(2, 112, 1),
                                                                               (1, 33, 4)]
    for row in data["rows"]:
        assert row["kv_bytes"] == bench.kv_bytes(row["batch"], row["seqlen_k"], 2, 32)
        for impl in ("fa3_jax", "xla", "kvcache"):
            cell = row["results"][impl]
            assert cell["status"] == "ok" and cell["tb_per_s"] > 0
            assert abs(cell["tb_per_s"] - row["kv_bytes"] / (cell["ms"] * 1e-3) / 1e12) < 1e-9
        # 112 keys are 7 pages of 16; 33 are no whole pages: that cell says why it did not run.
        paged = row["results"]["paged16"]
        assert (paged["status"] == "ok") == (row["seqlen_k"] == 112)
        if paged["status"] == "ok":
            assert paged["tb_per_s"] > 0
    assert "K/V read bandwidth" in capsys.readouterr().out

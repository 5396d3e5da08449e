"""The benchmark runs end to end on tiny sizes and writes the documented JSON records (no timing asserted)."""
import json

import pytest

from engine.cli import bench
from engine.cli.bench.layers import layer_flops
from engine.runtime.select import select_backend


def test_bench_layers_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "b.json"
    bench.main(["layers", "--sizes", "8", "--batch", "2", "--channels", "4", "--repeat", "1", "--json", str(out),
                "--plot", str(tmp_path / "b.png"), "--memory"])
    everything = json.loads(out.read_text())
    records = [r for r in everything if "kind" not in r]  # timing records; --memory adds "kind": "memory" ones
    memory = [r for r in everything if r.get("kind") == "memory"]
    assert len(records) + len(memory) == len(everything)
    assert {(r["layer"], r["pass"]) for r in memory} == {(la, p) for la in ("baseline", "flattened")
                                                         for p in ("forward", "backward")} and len(memory) == 4
    for r in memory:
        assert (r["size"], r["batch"], r["channels"], r["k"]) == (8, 2, 4, 5)
        assert r["measured_bytes"] > 0 and r["theory_bytes"] > 0
    # the default --backend all: the CPU, and CuPy where it passes the smoke test (a GPU, or the emulation as cupy)
    backends = {"cpu", "cpu compiled", "cupy"} if select_backend("auto")[0] == "cupy" else {"cpu", "cpu compiled"}
    assert {(r["layer"], r["pass"], r["backend"]) for r in records} == {
        (layer, p, b) for layer in ("baseline", "flattened") for p in ("forward", "backward") for b in backends}
    for r in records:
        assert set(r) == {"layer", "size", "batch", "pass", "backend", "median_ms", "min_ms", "max_ms", "gflops"}
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["size"] == 8 and r["batch"] == 2
    text = capsys.readouterr().out
    assert "kernel_threads" in text and "memory (MiB)" in text and "baseline/flattened forward" in text
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_bench_layers_times_the_baseline_layer_by_winograd_and_by_direct_convolution(tmp_path, capsys):
    out = tmp_path / "b.json"
    bench.main(["layers", "--sizes", "9", "--batch", "2", "--channels", "16", "--repeat", "1", "--backend", "cpu",
                "--json", str(out)])
    records = json.loads(out.read_text())
    compiled = {(r["layer"], r["pass"], r["backend"]) for r in records if r["backend"].startswith("cpu compiled")}
    assert compiled == {(layer, p, "cpu compiled") for layer in ("baseline", "flattened") for p in ("forward", "backward")
                        } | {("baseline", p, "cpu compiled direct") for p in ("forward", "backward")}
    assert all(r["median_ms"] > 0 for r in records)
    assert "baseline compiled; forward direct/chosen" in capsys.readouterr().out


def test_bench_model_runs(capsys):
    bench.main(["model", "--model", "flattened", "--dataset", "mnist", "--batch", "4", "--repeat", "1", "--per-layer"])
    text = capsys.readouterr().out
    assert "train step" in text and "inference" in text and "peak resident memory" in text
    assert "conv2" in text and "fc1" in text  # the per-layer breakdown
    rows = [line.split() for line in text.splitlines() if line.startswith("train step")]
    assert ["cpu", "compiled"] in [r[3:5] for r in rows]  # the compiled training step beside the layer step
    assert "compiled training step, per op" in text and "of the peak" in text  # its profile against the peak


def test_flops_of_the_flattened_layer():
    from engine import Flattened
    # 2 stages, 128 channels, k=5, 80x80, batch 1: V,H full on 80->84, L on 84x84, then V,H valid, L on 80x80
    f = layer_flops(Flattened(128, 128, 5), (1, 128, 80, 80))
    macs = 128 * 5 * (84 * 80 + 84 * 84) + 128 * 128 * 84 * 84 + 128 * 5 * (80 * 84 + 80 * 80) + 128 * 128 * 80 * 80
    assert f == 2 * macs


@pytest.mark.slow
def test_bench_latency_runs(capsys):
    bench.main(["latency", "--batch", "2", "--repeat", "1"])
    text = capsys.readouterr().out
    assert "flattened" in text and "baseline" in text and "engine" in text


def test_bench_backend_cupy_without_cupy_says_why(monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    with pytest.raises(SystemExit, match=r"--backend cupy: CuPy is not installed.*pip install 'cupy-cuda12x\[ctk\]'"):
        bench.main(["layers", "--backend", "cupy", "--sizes", "8", "--batch", "2", "--channels", "4"])
    assert "median_ms" not in capsys.readouterr().out  # refused before timing anything


def test_bench_threads_runs(capsys, threads):
    import re
    bench.main(["threads", "--batch", "2", "--repeat", "1", "--rounds", "1", "--threads", "2"])
    rows = [re.match(r"(.+?) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+) +\(([\d.]+); \[([\d, ]+)\]\)$", line)
            for line in capsys.readouterr().out.splitlines() if line.startswith(("compiled", "inference"))]
    assert len(rows) == 3 and all(rows), rows
    for m in rows:
        one, two, auto, r2, rauto = map(float, m.groups()[1:6])
        assert min(one, two, auto) > 0
        # the ratios are of the unrounded times: each within what the times printed to 0.01 ms allow
        for ratio, t in ((r2, two), (rauto, auto)):
            lo, hi = max(t - 0.005, 0) / (one + 0.005), (t + 0.005) / max(one - 0.005, 1e-9)
            assert lo - 0.005 <= ratio <= hi + 0.005, (ratio, t, one)
        assert {int(t) for t in m.group(8).split(",")} <= {1, 2}  # the threads the default used

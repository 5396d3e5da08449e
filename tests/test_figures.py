"""python -m engine.figures on a fake runs folder, a tiny --flatten-first model file and a tiny benchmark
JSON: every figure and its data file, the numbers against ones computed here from the inputs, the
skips and warnings."""
import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import engine
from engine import Conv2d, Flattened
from engine.cli import bench, figures
from engine.filterbank import reconstruct
from models.paper import build
from models.recipes import recipe

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# train and test accuracy of each fake run, per epoch (the numbers the CSV must average)
ACC = {("baseline", 0): [(0.30, 0.40), (0.50, 0.55)], ("baseline", 1): [(0.34, 0.42), (0.58, 0.61)],
       ("flattened", 0): [(0.25, 0.35), (0.45, 0.52)], ("flattened", 1): [(0.27, 0.39), (0.51, 0.50)]}


def settings(model, seed, **kw):
    """settings.json as train.py writes it (RUN_SETTINGS, RUN_OPTIONS, epochs)."""
    s = dict(model=model, dataset="cifar10", label_mode="fine", batch_size=128, lr=0.03, momentum=0.9,
             dampening=0.0, weight_decay=0.0005 if model == "baseline" else 0.0001, lr_drop_epochs=[16, 23],
             lr_drop_factor=0.1, seed=seed, limit_train=None, limit_test=None, pool=[3, 2], pool_mode="ceil",
             flatten_first=False, stages=2, init="auto", data_dir="/data", cache_dir="/cache", no_download=None,
             eval_batch_size=500, backend=None, threads=None, plot=False, quiet=True, step=None, epochs=2)
    s.update(kw)
    return s


def write_run(folder, settings_, accs):
    folder.mkdir(parents=True)
    (folder / "settings.json").write_text(json.dumps(settings_, indent=2))
    lines = [json.dumps(dict(epoch=e, lr=0.03, train_loss=1.0 / e, train_acc=tr, test_loss=1.1 / e, test_acc=te,
                             seconds=10.0, images_per_s=100.0, eval_seconds=1.0))
             for e, (tr, te) in enumerate(accs, 1)]
    (folder / "log.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    # threads and the recipe's name: no matter; seed 1 one level down; seed 0 as a run from before
    # --augment (no such setting), seed 1 with augment "none": the same experiment
    for (model, seed), accs in ACC.items():
        write_run(root / ("seeds" if seed else ".") / f"{model}-s{seed}",
                  settings(model, seed, threads=seed + 1, recipe="reproduce" if seed else None,
                           **({"augment": "none"} if seed else {})), accs)
    # a finished --flatten-first CIFAR-10 run: one epoch, and its model file
    write_run(root / "ff", settings("flattened", 0, flatten_first=True, epochs=1), [(0.2, 0.3)])
    net = build("flattened", (3, 32, 32), 10, seed=3, flatten_first=True)
    engine.save_model(root / "ff" / "model.npz", net, (3, 32, 32), [str(i) for i in range(10)], {})
    (root / "broken").mkdir()
    (root / "broken" / "settings.json").write_text("{not json")
    write_run(root / "badlog", settings("baseline", 7), [(0.9, 0.9)])
    with open(root / "badlog" / "log.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_acc": NaN, "test_acc": 0.5}\n')
    (root / "nolog").mkdir()
    (root / "nolog" / "settings.json").write_text(json.dumps(settings("flattened", 5)))
    return root


def write_list(path, panels, recipe_name=None):
    """A --fig3-runs file: panels as [(dataset, {model: [folder, ...]})]."""
    data = dict(panels=[dict(dataset=d, models=m) for d, m in panels])
    if recipe_name:
        data["recipe"] = recipe_name
    path.write_text(json.dumps(data, indent=2))
    return path


def timing(layer, size, pas, backend, ms, batch=128):
    return {"layer": layer, "size": size, "batch": batch, "pass": pas, "backend": backend, "median_ms": ms,
            "min_ms": ms, "max_ms": ms, "gflops": 1.0}


def bench_records():
    """Timing records (the old format) of two engine backends and torch, and memory records."""
    recs, ms = [], {}
    for i, (backend, size, pas) in enumerate((b, s, p) for b in ("cpu", "cpu compiled", "torch-nchw")
                                             for s in (16, 32) for p in ("forward", "backward")):
        ms[(backend, size, pas)] = (100.0 + 10 * i, 20.0 + i)
        recs += [timing("baseline", size, pas, backend, 100.0 + 10 * i),
                 timing("flattened", size, pas, backend, 20.0 + i)]
    memory = [dict(kind="memory", layer=layer, size=size, batch=128, channels=128, k=5, measured_bytes=m,
                   theory_bytes=t, **{"pass": pas})
              for layer, size, pas, m, t in (("baseline", 16, "forward", 3 << 20, 3 << 20),
                                             ("baseline", 16, "backward", 5 << 20, 4 << 20),
                                             ("flattened", 16, "forward", 7 << 20, 7 << 20),
                                             ("flattened", 16, "backward", 1 << 19, 1 << 20))]
    return recs, memory, ms


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def run(argv, capsys):
    assert figures.main([str(a) for a in argv]) == 0
    return capsys.readouterr()


def test_every_figure_and_its_numbers(tmp_path, runs, capsys):
    recs, memory, ms = bench_records()
    (tmp_path / "bench.json").write_text(json.dumps(dict(environment={}, records=recs + memory)))  # --json-env form
    out = tmp_path / "new" / "figures"  # created
    # Figure 3 draws the listed seeds of each model; the --flatten-first run is not listed
    chosen = write_list(tmp_path / "list.json", [("cifar10", {
        "baseline": ["baseline-s0", "seeds/baseline-s1", "badlog"], "flattened": ["flattened-s0", "seeds/flattened-s1",
                                                                                  "nolog"]})])
    got = run(["--runs", runs, "--out", out, "--bench", tmp_path / "bench.json", "--fig3-runs", chosen], capsys)
    names = ["fig3-accuracy.png", "fig3-accuracy.csv", "fig4-filters.png", "fig4-filters.npy", "fig5-params.png",
             "fig5-params.csv", "fig6-memory.png", "fig6-memory.csv", "fig7-speedup.png", "fig7-speedup.csv"]
    assert sorted(got.out.split("\n")) == sorted([""] + [f"wrote {out / n}" for n in names])
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for n in names:
        if n.endswith(".png"):
            data = (out / n).read_bytes()
            assert data[:8] == PNG_MAGIC and len(data) > 10000, n
    # one warning per bad folder, each naming its problem; the folder without a log only for Figure 3
    warnings = got.err.strip().split("\n")
    assert len(warnings) == 3, got.err
    assert f"warning: skipped {runs / 'broken'}: settings.json unreadable (" in got.err
    assert f"warning: skipped {runs / 'badlog'} for Figure 3: log.jsonl line 2 lacks" in got.err
    assert f"warning: skipped {runs / 'nolog'} for Figure 3: no log.jsonl" in got.err

    # Figure 3: the two seeds of each model averaged, nothing else
    rows = read_csv(out / "fig3-accuracy.csv")
    assert len(rows) == 2 + 2
    for model in ("baseline", "flattened"):
        for epoch in (1, 2):
            row, = [r for r in rows if (r["model"], int(r["epoch"])) == (model, epoch)]
            assert row["runs"] == f"{model}-s0 {model}-s1" and row["seeds"] == "0 1" and row["n"] == "2"
            for j, what in enumerate(("train_acc", "test_acc")):
                v = np.array([100 * ACC[(model, seed)][epoch - 1][j] for seed in (0, 1)])
                assert float(row[f"{what}_mean_pct"]) == pytest.approx(v.mean(), abs=1e-12)
                assert float(row[f"{what}_std_pct"]) == pytest.approx(abs(v[0] - v[1]) / np.sqrt(2), abs=1e-12)

    # Figure 4: the first layer's filters of the saved network, rebuilt independently and sorted by variance
    filters = np.load(out / "fig4-filters.npy")
    want = reconstruct(build("flattened", (3, 32, 32), 10, seed=3, flatten_first=True).layers[0])
    want = want[np.argsort(-want.reshape(96, -1).var(axis=1))]
    assert filters.shape == (96, 3, 9, 9)
    np.testing.assert_allclose(filters, want, rtol=1e-4, atol=1e-6)
    var = filters.reshape(96, -1).var(axis=1)
    assert np.all(np.diff(var) <= 1e-12)

    # Figure 6: the memory records in MiB
    rows = read_csv(out / "fig6-memory.csv")
    assert len(rows) == 4
    for r in memory:
        row, = [x for x in rows if (x["layer"], x["size"], x["pass"]) == (r["layer"], str(r["size"]), r["pass"])]
        assert float(row["measured_mib"]) == r["measured_bytes"] / 2 ** 20
        assert float(row["theory_mib"]) == r["theory_bytes"] / 2 ** 20

    # Figure 7: baseline ms / flattened ms of the engine's backends (not torch's), per size and pass
    rows = read_csv(out / "fig7-speedup.csv")
    assert {r["backend"] for r in rows} == {"cpu", "cpu compiled"} and len(rows) == 8 + 4
    against_torch = [r for r in rows if r["baseline"] == figures.TORCH_BEST]
    rows = [r for r in rows if r["baseline"] == r["backend"]]  # each executor's own baseline
    assert len(against_torch) == 4 and len(rows) == 8
    for r in against_torch:  # PyTorch's baseline layer against the engine's compiled flattened layer
        base, flat = ms[("torch-nchw", int(r["size"]), r["pass"])][0], ms[("cpu compiled", int(r["size"]), r["pass"])][1]
        assert float(r["speedup"]) == pytest.approx(base / flat, rel=1e-12)
    for r in rows:
        base, flat = ms[(r["backend"], int(r["size"]), r["pass"])]
        assert (float(r["baseline_ms"]), float(r["flattened_ms"])) == (base, flat)
        assert float(r["speedup"]) == pytest.approx(base / flat, rel=1e-12)


def test_figure3_leaves_out_a_run_in_progress_but_keeps_one_stopped_for_good(tmp_path, capsys):
    """A seed short of its planned epochs with checkpoint.npz kept is still running (or to be resumed): it is
    left out with a line saying so. Short without a checkpoint, it was stopped for good and is averaged."""
    root = tmp_path / "runs"
    write_run(root / "s0", settings("flattened", 0), [(0.2, 0.3), (0.4, 0.5)])
    write_run(root / "s1", settings("flattened", 1), [(0.3, 0.4), (0.5, 0.6)])
    write_run(root / "s2", settings("flattened", 2), [(0.9, 0.9)])  # epoch 1 of 2
    (root / "s2" / "checkpoint.npz").write_bytes(b"not read")
    chosen = write_list(tmp_path / "list.json", [("cifar10", {"flattened": ["s0", "s1", "s2"]})])
    got = run(["--runs", root, "--out", tmp_path / "a", "--figures", "3", "--fig3-runs", chosen], capsys)
    assert f"Figure 3 leaves out {root / 's2'}: in progress (epoch 1 of 2, checkpoint.npz present)" in got.out
    rows = read_csv(tmp_path / "a" / "fig3-accuracy.csv")
    assert [(r["epoch"], r["n"], r["seeds"]) for r in rows] == [("1", "2", "0 1"), ("2", "2", "0 1")]
    assert float(rows[0]["test_acc_mean_pct"]) == pytest.approx(35.0)

    alone = tmp_path / "alone"
    write_run(alone / "s3", settings("flattened", 3), [(0.9, 0.9)])
    (alone / "s3" / "checkpoint.npz").write_bytes(b"not read")
    got = run(["--runs", alone, "--out", tmp_path / "c", "--figures", "3", "--fig3-runs",
               write_list(tmp_path / "alone.json", [("cifar10", {"flattened": ["s3"]})])], capsys)
    assert "Figure 3 skipped: no run folder in" in got.out and "and is finished (1 in progress)" in got.out
    assert not (tmp_path / "c" / "fig3-accuracy.csv").exists()

    (root / "s2" / "checkpoint.npz").unlink()
    got = run(["--runs", root, "--out", tmp_path / "b", "--figures", "3", "--fig3-runs", chosen], capsys)
    assert "leaves out" not in got.out
    rows = read_csv(tmp_path / "b" / "fig3-accuracy.csv")
    assert [(r["epoch"], r["n"]) for r in rows] == [("1", "3"), ("2", "2")]
    assert float(rows[0]["test_acc_mean_pct"]) == pytest.approx(100 * (0.3 + 0.4 + 0.9) / 3)


def test_figure5_counts_are_the_built_layers(tmp_path, capsys):
    def weights(layer):
        return sum(v.size for k, v in layer.params.items() if not k.endswith("bias"))

    for c, f, k, stages in ((96, 128, 5, 2), (128, 256, 5, 2), (3, 96, 5, 2), (7, 4, 3, 1), (5, 9, 3, 3)):
        assert figures.flattened_weights(c, f, k, stages) == weights(Flattened(c, f, k, stages=stages))
        assert figures.conv_weights(c, f, k) == weights(Conv2d(c, f, k, padding=k // 2))
    run(["--out", tmp_path, "--figures", "5"], capsys)
    rows = read_csv(tmp_path / "fig5-params.csv")
    assert {r["C"] for r in rows} == {"128", "96"} and len(rows) > 300
    for name, c, f, k, base, flat in figures.TABLE1:  # Table 1's layers lie on the curves, as built
        row, = [r for r in rows if (int(r["C"]), int(r["F"])) == (c, f)]
        assert float(row["F_over_C"]) == f / c
        assert int(row["conv_weights"]) == base == weights(Conv2d(c, f, k, padding=k // 2))
        assert int(row["flattened_weights"]) == flat == weights(Flattened(c, f, k))
        assert float(row["reduction"]) == pytest.approx(base / flat, rel=1e-12)
    ratios = [float(r["F_over_C"]) for r in rows if r["C"] == "128"]
    assert ratios == sorted(ratios) and ratios[0] == 1 / 128 and ratios[-1] == 32


def test_missing_inputs_are_skipped(tmp_path, capsys):
    got = run(["--runs", tmp_path / "no-runs", "--out", tmp_path / "o", "--bench", tmp_path / "no.json"], capsys)
    for n in (3, 4, 6, 7):
        assert f"Figure {n} skipped: " in got.out
    assert f"Figure 3 skipped: no run folder {tmp_path / 'no-runs'}" in got.out
    assert f"Figure 6 skipped: no benchmark file {tmp_path / 'no.json'}" in got.out
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["fig5-params.csv", "fig5-params.png"]


def test_old_benchmark_file_and_no_flatten_first_run(tmp_path, runs, capsys):
    shutil.rmtree(runs / "ff")
    recs, _, _ = bench_records()
    (tmp_path / "old.json").write_text(json.dumps(recs))  # a plain list without memory records
    chosen = write_list(tmp_path / "list.json", [("cifar10", {"baseline": ["baseline-s0", "seeds/baseline-s1"]})])
    got = run(["--runs", runs, "--out", tmp_path / "o", "--bench", tmp_path / "old.json", "--band", "minmax",
               "--fig3-runs", chosen], capsys)
    assert "Figure 4 skipped: needs a finished `train.py --flatten-first` CIFAR-10 run" in got.out
    assert "Figure 6 skipped: " in got.out and "has no memory records" in got.out
    assert {p.name for p in (tmp_path / "o").iterdir()} == {
        "fig3-accuracy.png", "fig3-accuracy.csv", "fig5-params.png", "fig5-params.csv", "fig7-speedup.png",
        "fig7-speedup.csv"}
    # a flatten-first run without its model file (not finished) is named in the reason
    write_run(runs / "ff", settings("flattened", 0, flatten_first=True), [(0.2, 0.3)])
    got = run(["--runs", runs, "--out", tmp_path / "o", "--figures", "4"], capsys)
    assert "1 such run(s) but none has a model.npz" in got.out


def test_only_bad_runs_skip_figure3(tmp_path, capsys):
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "settings.json").write_text(json.dumps(settings("baseline", 0)))
    (tmp_path / "runs" / "x" / "log.jsonl").write_text("")
    chosen = write_list(tmp_path / "list.json", [("cifar10", {"baseline": ["x"]})])
    got = run(["--runs", tmp_path / "runs", "--out", tmp_path / "o", "--figures", "3", "--fig3-runs", chosen], capsys)
    assert got.err == f"warning: skipped {tmp_path / 'runs' / 'x'} for Figure 3: log.jsonl has no epochs\n"
    assert got.out.startswith("Figure 3 skipped: no run folder in")
    assert not (tmp_path / "o" / "fig3-accuracy.csv").exists()


def test_bad_paths_and_missing_matplotlib(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=r"^error: cannot write to --out .*file.*: .*is a file, not a folder$"):
        figures.main(["--out", str(tmp_path / "file"), "--figures", "5"])
    with pytest.raises(SystemExit, match=r"^error: --runs .* is a file"):
        figures.main(["--runs", str(tmp_path / "file"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"^error: --bench .* is a folder"):
        figures.main(["--bench", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        figures.main(["--figures", "2,3"])
    assert "expected figure numbers among 3,4,5,6,7" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("[1, 2")
    got = run(["--out", tmp_path / "o", "--bench", tmp_path / "bad.json", "--figures", "6,7"], capsys)
    assert got.out.count(f"skipped: cannot read {tmp_path / 'bad.json'}") == 2
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(SystemExit, match=r"^error: drawing the figures needs matplotlib: pip install matplotlib"):
        figures.main(["--out", str(tmp_path / "o")])


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        figures.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--runs", "--out", "--bench", "--fig3-runs", "--band", "--filters-run", "--figures"):
        assert flag in text
    for name in ("fig3-accuracy", "fig4-filters", "fig5-params", "fig6-memory", "fig7-speedup"):
        assert name in text


def test_grouping_ignores_what_train_py_calls_options():
    from engine.cli import train
    assert set(figures.NOT_THE_EXPERIMENT) == set(train.RUN_OPTIONS) | {"seed", "epochs", "recipe"}


def test_bench_memory_json_feeds_figure6(tmp_path, capsys):
    """`bench layers --memory --json` at a tiny size writes memory records beside the timing ones, and
    Figure 6 and 7 are drawn from that file."""
    path = tmp_path / "b.json"
    bench.main(["layers", "--backend", "cpu", "--sizes", "6", "--batch", "2", "--channels", "3", "--repeat", "1",
                "--threads", "1", "--memory", "--json", str(path)])
    records = json.loads(path.read_text())
    memory = [r for r in records if r.get("kind") == "memory"]
    assert len(memory) == 4 and len(records) == 4 + 8  # (baseline, flattened) x (forward, backward) x (cpu, compiled)
    capsys.readouterr()
    got = run(["--out", tmp_path / "o", "--bench", path, "--figures", "6,7"], capsys)
    assert f"wrote {tmp_path / 'o' / 'fig6-memory.png'}" in got.out and "skipped" not in got.out
    rows = read_csv(tmp_path / "o" / "fig6-memory.csv")
    assert sorted((r["layer"], r["pass"], float(r["theory_mib"])) for r in rows) == sorted(
        (r["layer"], r["pass"], r["theory_bytes"] / 2 ** 20) for r in memory)
    assert {r["backend"] for r in read_csv(tmp_path / "o" / "fig7-speedup.csv")} == {"cpu", "cpu compiled"}


def test_figure7_reads_the_flattened_layer_against_the_fastest_baseline(tmp_path, capsys):
    """Beside each executor's own baseline: the compiled flattened layer against the baseline by direct
    convolution and against PyTorch's faster layout, case by case."""
    def rec(layer, backend, size, pas, ms):
        return dict(layer=layer, size=size, batch=8, backend=backend, median_ms=ms, min_ms=ms, max_ms=ms, gflops=1.0,
                    **{"pass": pas})
    times = {("baseline", "cpu compiled"): 10.0, ("baseline", "cpu compiled direct"): 30.0,
             ("flattened", "cpu compiled"): 4.0, ("baseline", "torch-nchw"): 25.0,
             ("baseline", "torch-channels-last"): 20.0, ("flattened", "torch-nchw"): 9.0}
    records = [rec(layer, backend, size, pas, ms * size / 16 * (2 if pas == "backward" else 1))
               for (layer, backend), ms in times.items() for size in (16, 32) for pas in ("forward", "backward")]
    path = tmp_path / "b.json"
    path.write_text(json.dumps(records))
    run(["--out", tmp_path / "o", "--bench", path, "--figures", "7"], capsys)
    rows = read_csv(tmp_path / "o" / "fig7-speedup.csv")
    got = {(r["baseline"], r["size"], r["pass"]): float(r["speedup"]) for r in rows}
    assert {r["backend"] for r in rows} == {"cpu compiled"} and len(rows) == 12
    for size in ("16", "32"):
        for pas in ("forward", "backward"):
            assert got[("cpu compiled", size, pas)] == pytest.approx(10 / 4)
            assert got[("cpu compiled direct", size, pas)] == pytest.approx(30 / 4)
            assert got[(figures.TORCH_BEST, size, pas)] == pytest.approx(20 / 4)  # the faster layout


def recipe_run(folder, dataset, model, seed, rng, logged=None, **kw):
    """A run of `train.py --dataset D --model M --seed S` (recipe reproduce) with a log of random accuracies, its
    planned epochs unless `logged` cuts it short; `kw` replaces settings. Returns its [(train_acc, test_acc)]."""
    s = settings(model, seed, dataset=dataset, recipe="reproduce", **recipe("reproduce", dataset, model))
    s.update(kw)
    accs = [tuple(rng.uniform(0.1, 1.0, 2).round(4)) for _ in range(logged or s["epochs"])]
    write_run(folder, s, accs)
    return accs


def test_figure3_draws_exactly_the_listed_runs(tmp_path, monkeypatch, capsys):
    """Two models x seeds on CIFAR-10 and on MNIST, named by a run list of recipe reproduce, among decoys: runs of
    other settings, of another data set, on a part of the data, one in progress and folders the list misnames.
    The CSV holds exactly the mean and sd over the listed finished seeds, per panel, model and epoch; one
    legend entry per model in every panel."""
    rng = np.random.default_rng(0)
    root = tmp_path / "runs"
    chosen = {("CIFAR-10", "baseline"): [recipe_run(root / "cb-s0", "cifar10", "baseline", 0, rng, threads=2)],
              ("CIFAR-10", "flattened"): [recipe_run(root / f"cf-s{i}", "cifar10", "flattened", i, rng)
                                          for i in range(3)],
              ("MNIST", "baseline"): [recipe_run(root / "mb-s0", "mnist", "baseline", 0, rng)],
              ("MNIST", "flattened"): [recipe_run(root / f"deep/mf-s{i}", "mnist", "flattened", i, rng)
                                       for i in (0, 1)]}
    # decoys the list does not name: each would change a mean if it were drawn
    recipe_run(root / "other-wd", "cifar10", "flattened", 0, rng, weight_decay=5e-4)
    recipe_run(root / "cifar100", "cifar100", "flattened", 0, rng)
    recipe_run(root / "short", "cifar10", "baseline", 1, rng, epochs=5, limit_train=1000)
    # decoys the list names: in progress, not the recipe's, a run of another model, a folder that is not there
    recipe_run(root / "cf-s3", "cifar10", "flattened", 3, rng, logged=7)
    (root / "cf-s3" / "checkpoint.npz").write_bytes(b"not read")
    recipe_run(root / "cf-60", "cifar10", "flattened", 4, rng, epochs=60, lr_drop_epochs=[40, 52])
    recipe_run(root / "cb-as-flat", "cifar10", "baseline", 5, rng)
    listed = write_list(tmp_path / "fig3-runs.json", [
        ("cifar10", {"baseline": ["cb-s0"],
                     "flattened": ["cf-s0", "cf-s1", "cf-s2", "cf-s3", "cf-60", "cb-as-flat", "missing"]}),
        ("mnist", {"baseline": ["mb-s0"], "flattened": ["deep/mf-s0", str(root / "deep/mf-s1")]})], "reproduce")
    drawn = []
    save = figures.save_figure
    monkeypatch.setattr(figures, "save_figure", lambda fig, path: (drawn.append(fig), save(fig, path)))
    out = tmp_path / "o"
    got = run(["--runs", root, "--out", out, "--figures", "3", "--fig3-runs", listed], capsys)
    assert f"Figure 3 leaves out {root / 'cf-s3'}: in progress (epoch 7 of 180, checkpoint.npz present)" in got.out
    warnings = got.err.strip().split("\n")
    assert len(warnings) == 3, got.err
    assert (f"warning: skipped {root / 'cf-60'} for Figure 3: not a run of recipe reproduce: epochs 60 (recipe: "
            f"180), lr_drop_epochs 40,52 (recipe: 120,156)") in warnings
    assert f"warning: skipped {root / 'cb-as-flat'} for Figure 3: a cifar10 baseline run, listed as cifar10 " \
           "flattened" in warnings
    assert f"warning: skipped {root / 'missing'} for Figure 3: no such run folder" in warnings

    rows = read_csv(out / "fig3-accuracy.csv")
    assert list(rows[0]) == ["panel", "dataset", "model", "runs", "seeds", "epoch", "n", "train_acc_mean_pct",
                             "train_acc_std_pct", "test_acc_mean_pct", "test_acc_std_pct"]
    want = []
    for (panel, model), logs in chosen.items():
        for e in range(1, len(logs[0]) + 1):
            row = [panel, model, str(e), str(len(logs))]
            for j in (0, 1):
                v = np.array([100 * log[e - 1][j] for log in logs])
                row += [v.mean(), v.std(ddof=1) if len(v) > 1 else ""]
            want.append(row)
    got_rows = [[r["panel"], r["model"], r["epoch"], r["n"],
                 float(r["train_acc_mean_pct"]), float(r["train_acc_std_pct"]) if r["train_acc_std_pct"] else "",
                 float(r["test_acc_mean_pct"]), float(r["test_acc_std_pct"]) if r["test_acc_std_pct"] else ""]
                for r in rows]
    assert len(got_rows) == len(want) == 120 + 180 + 30 + 30
    for g, w in zip(got_rows, want):
        assert g[:4] == w[:4], (g, w)
        for a, b in zip(g[4:], w[4:]):  # the sd of one run is blank
            assert a == b == "" or a == pytest.approx(b, rel=1e-12, abs=1e-12), (g, w)
    assert {(r["panel"], r["dataset"], r["model"], r["runs"], r["seeds"]) for r in rows} == {
        ("CIFAR-10", "cifar10", "baseline", "cb-s0", "0"), ("CIFAR-10", "cifar10", "flattened", "cf-s0 cf-s1 cf-s2",
                                                           "0 1 2"),
        ("MNIST", "mnist", "baseline", "mb-s0", "0"), ("MNIST", "mnist", "flattened", "mf-s0 mf-s1", "0 1")}

    fig, = drawn
    fig.canvas.draw()
    assert len(fig.axes) == 4  # one row per panel: training, test
    legends = {}
    for ax in fig.axes:
        assert ax.get_xlabel() == "epoch" and ax.get_ylabel().endswith("accuracy (%)")
        leg = ax.get_legend()
        legends[ax.get_title()] = [t.get_text() for t in leg.get_texts()]
        box, frame = leg.get_window_extent(), ax.get_window_extent()
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        assert len(ax.collections) == 1  # one band: the models of several seeds here are the flattened ones
    assert legends == {"CIFAR-10: training accuracy": ["baseline (1 run)", "flattened (3 seeds)"],
                       "CIFAR-10: test accuracy": ["baseline (1 run)", "flattened (3 seeds)"],
                       "MNIST: training accuracy": ["baseline (1 run)", "flattened (2 seeds)"],
                       "MNIST: test accuracy": ["baseline (1 run)", "flattened (2 seeds)"]}
    boxes = [ax.get_tightbbox() for ax in fig.axes]  # no panel overlaps another, titles and labels included
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0, (a, b)


def test_figure3_seeds_of_one_model_are_one_experiment(tmp_path, capsys):
    """Without a recipe in the list, any runs may be drawn, but the seeds of one model must differ only in the
    seed and options such as threads: another weight decay is left out with the settings that differ."""
    root = tmp_path / "runs"
    write_run(root / "a", settings("flattened", 0), [(0.2, 0.3)])
    write_run(root / "b", settings("flattened", 1, threads=4), [(0.4, 0.5)])
    write_run(root / "c", settings("flattened", 2, weight_decay=0.0005), [(0.9, 0.9)])
    chosen = write_list(tmp_path / "list.json", [("cifar10", {"flattened": ["a", "b", "c"]})])
    got = run(["--runs", root, "--out", tmp_path / "o", "--figures", "3", "--fig3-runs", chosen], capsys)
    assert got.err == (f"warning: skipped {root / 'c'} for Figure 3: differs from {root / 'a'} in more than the "
                       "seed: weight_decay 0.0005 against 0.0001\n")
    row, = read_csv(tmp_path / "o" / "fig3-accuracy.csv")
    assert (row["runs"], row["n"], row["panel"]) == ("a b", "2", "CIFAR-10")
    assert float(row["test_acc_mean_pct"]) == pytest.approx(40.0)


@pytest.mark.parametrize("text, why", [
    ("{", "cannot read"), ("[]", "not an object"), ('{"panels": []}', "no list of panels"),
    ('{"recipe": "fast", "panels": [{"dataset": "mnist", "models": {"baseline": ["a"]}}]}', "unknown recipe"),
    ('{"panels": [{"dataset": "mnist", "models": {"baseline": "a"}}]}', "not a list of run folders"),
    ('{"panels": [{"dataset": "mnist", "model": {"baseline": ["a"]}}]}', "panel 1 is not an object"),
    ('{"panels": [{"dataset": "mnist", "models": {"baseline": ["a"], "flattened": ["a"]}}]}', "listed twice")])
def test_a_bad_run_list_is_an_error(tmp_path, text, why):
    (tmp_path / "list.json").write_text(text)
    with pytest.raises(SystemExit, match=rf"^error: --fig3-runs .*list\.json.*{why}"):
        figures.main(["--runs", str(tmp_path), "--out", str(tmp_path / "o"), "--figures", "3",
                      "--fig3-runs", str(tmp_path / "list.json")])
    with pytest.raises(SystemExit, match=r"^error: --fig3-runs .*nothing\.json: no such file$"):
        figures.main(["--out", str(tmp_path / "o"), "--figures", "3", "--fig3-runs", str(tmp_path / "nothing.json")])


def test_default_output_folder_is_ignored_by_git(tmp_path, monkeypatch, capsys):
    """Without --out the figures go to runs/figures, which git ignores: docs/figures changes only when named."""
    default = Path(figures.parser().parse_args([]).out)
    assert default == Path("runs/figures") and not default.is_absolute()
    monkeypatch.chdir(tmp_path)
    got = run(["--figures", "5"], capsys)
    assert got.out == f"wrote {Path('runs/figures/fig5-params.csv')}\nwrote {Path('runs/figures/fig5-params.png')}\n"
    assert (tmp_path / "runs" / "figures" / "fig5-params.png").is_file()
    if (ROOT / ".git").exists() and shutil.which("git"):
        ignored = subprocess.run(["git", "check-ignore", "-q", "runs/figures/fig3-accuracy.png"], cwd=ROOT)
        assert ignored.returncode == 0
        tracked = subprocess.run(["git", "check-ignore", "-q", "docs/figures/fig3-accuracy.png"], cwd=ROOT)
        assert tracked.returncode == 1


def test_committed_figure3_is_the_listed_runs(tmp_path, capsys):
    """docs/figures/fig3-accuracy.csv is what the command draws from docs/runs with the shipped run list, and every
    listed run is a finished run of the list's recipe (no warning, none left out)."""
    listed = ROOT / "docs" / "figures" / "fig3-runs.json"
    got = run(["--runs", ROOT / "docs" / "runs", "--out", tmp_path, "--figures", "3", "--fig3-runs", listed], capsys)
    assert got.err == "" and "leaves out" not in got.out
    new, committed = read_csv(tmp_path / "fig3-accuracy.csv"), read_csv(ROOT / "docs" / "figures" / "fig3-accuracy.csv")
    assert [list(r.values())[:7] for r in new] == [list(r.values())[:7] for r in committed]
    for a, b in zip(new, committed):
        for k in list(a)[7:]:
            assert (a[k] == b[k] == "") or float(a[k]) == pytest.approx(float(b[k]), rel=1e-12), (k, a, b)
    models = {(r["panel"], r["model"]): (r["runs"], r["n"]) for r in new if r["epoch"] == "1"}
    assert models == {("CIFAR-10", "baseline"): ("long120-baseline-cifar10", "1"),
                      ("CIFAR-10", "flattened"): ("long180-flattened-cifar10 long180-flattened-cifar10-s1 "
                                                  "long180-flattened-cifar10-s2", "3"),
                      ("MNIST", "baseline"): ("long-baseline-mnist", "1"),
                      ("MNIST", "flattened"): ("long-flattened-mnist", "1")}

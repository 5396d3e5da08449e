"""docs/compare_runs.py on the committed run logs, against docs/results.json.

docs/results.json holds, for every comparison of runs that docs/results.md quotes, the command's arguments and
the figures it prints (the table's rows, each run's final, mean, best and first-reached accuracies, its wall time
and rates, and the mean and spread over seeds). Each entry is run here and its output, read back into numbers, must
equal the entry's: a figure of the document is checked through its data, never through the document's sentences.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docs" / "compare_runs.py"
DATA = json.loads((ROOT / "docs" / "results.json").read_text())

PCT = r"(\d+\.\d\d)%"
SPEED = re.compile(r"(?:epochs (\d+)-(\d+): )?([\d,]+) min; images/s ([\d,]+), ([\d,]+), ([\d,]+); "
                   r"s/epoch (\d+), (\d+), (\d+) \(min, median, max\)")
PARTS = {  # one part of a run's summary line: its pattern and where its numbers go
    "final": re.compile(rf"final test {PCT} \(epoch (\d+)\)"),
    "range": re.compile(rf"epochs (\d+)-(\d+): mean test {PCT}, train {PCT}"),
    "best": re.compile(rf"best test {PCT} \(epoch (\d+)\)"),
    "reach": re.compile(r"(\d+)% first at epoch (\d+)"),
    "missed": re.compile(r"(\d+)% not reached"),
}
OVERALL = re.compile(rf"final test, (\d+) runs: mean {PCT}, sd (\d+\.\d\d)")


def _int(text):
    return int(text.replace(",", ""))


def _speed(m):
    return {"minutes": _int(m[3]), "images_per_s": [_int(m[i]) for i in (4, 5, 6)],
            "s_per_epoch": [int(m[i]) for i in (7, 8, 9)]}


def parse(stdout):
    """compare_runs.py's output as numbers: {"rows": {epoch: {"lr": lr, run: {"train", "test"[, "loss"]}}},
    "runs": {run: {"final", "ranges", "best", "reach", "speed", "speed_ranges"}}[, "final": {...}]}.
    A line that is not one of the forms the script prints fails the parse, so its format is checked too."""
    lines = stdout.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:2] == ["epoch", "lr"] and lines[1] == "|" + "---:|" * len(header), lines[:2]
    columns = [tuple(c.split(", ", 1)) for c in header[2:]]  # (train | test | test loss, run)
    rows, i = {}, 2
    while lines[i]:
        cells = [c.strip() for c in lines[i].strip("|").split("|")]
        assert len(cells) == len(header) and re.fullmatch(r"\d+", cells[0]), lines[i]
        row = rows.setdefault(cells[0], {"lr": float(cells[1])})
        for (kind, run), cell in zip(columns, cells[2:]):
            if kind == "test loss":
                assert re.fullmatch(r"\d+\.\d{3}", cell), lines[i]
                row.setdefault(run, {})["loss"] = float(cell)
            else:
                assert kind in ("train", "test") and re.fullmatch(PCT, cell), lines[i]
                row.setdefault(run, {})[kind] = float(cell[:-1])
        i += 1
    out = {"rows": rows, "runs": {}}
    for line in lines[i + 1:]:
        if m := OVERALL.fullmatch(line):
            out["final"] = {"runs": int(m[1]), "mean": float(m[2]), "sd": float(m[3])}
            continue
        name, rest = line.split(": ", 1)
        run = out["runs"].setdefault(name, {})
        if m := SPEED.fullmatch(rest):
            if m[1]:
                run.setdefault("speed_ranges", {})[f"{m[1]}-{m[2]}"] = _speed(m)
            else:
                run["speed"] = _speed(m)
            continue
        assert "best" not in run, line  # one summary line per run, before its speed lines
        for part in rest.split("; "):
            kind, m = next(((k, m) for k, p in PARTS.items() if (m := p.fullmatch(part))), (None, None))
            assert kind, f"unexpected output: {part!r} in {line!r}"
            if kind == "final":
                run["final"] = [float(m[1]), int(m[2])]
            elif kind == "range":
                run.setdefault("ranges", {})[f"{m[1]}-{m[2]}"] = {"test": float(m[3]), "train": float(m[4])}
            elif kind == "best":
                run["best"] = [float(m[1]), int(m[2])]
            else:
                run.setdefault("reach", {})[m[1]] = int(m[2]) if kind == "reach" else None
    return out


def compare_runs(args):
    r = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("entry", DATA["comparisons"], ids=lambda e: e["id"])
def test_compare_runs_prints_the_figures_of_results_json(entry):
    """Every comparison in docs/results.json: the command on the committed logs prints the entry's figures."""
    runs = [a for a in entry["args"] if a.startswith("docs/runs/")]
    assert runs and all((ROOT / a / "log.jsonl").is_file() for a in runs), runs
    got = parse(compare_runs(entry["args"]))
    expected = entry["prints"]
    assert set(expected) <= {"rows", "runs", "final"} and "runs" in expected, expected.keys()
    # every run's summary and speed lines are in the entry, whole
    assert got["runs"] == expected["runs"]
    assert got.get("final") == expected.get("final")
    # the table: whole where the entry chose its epochs (a command without --epochs prints every epoch)
    if "--epochs" in entry["args"]:
        assert got["rows"] == expected["rows"]
    else:
        assert "rows" not in expected


def test_results_json_names_each_comparison_once():
    ids = [e["id"] for e in DATA["comparisons"]]
    assert len(ids) == len(set(ids))
    assert len({tuple(e["args"]) for e in DATA["comparisons"]}) == len(ids)


def test_parse_reads_back_what_compare_runs_prints():
    """The reader above, on an output whose every figure is known: a figure it misread would pass unnoticed."""
    out = parse(compare_runs(["docs/runs/long-flattened-cifar10", "docs/runs/wd5e-4-flattened-cifar10", "--epochs",
                              "60", "--ranges", "41-60", "--reach", "80,99", "--loss", "--spread", "--speed"]))
    assert out["rows"] == {"60": {"lr": 0.0003,
                                  "long-flattened-cifar10": {"train": 93.58, "test": 82.34, "loss": 0.618},
                                  "wd5e-4-flattened-cifar10": {"train": 92.56, "test": 83.10, "loss": 0.569}}}
    run = out["runs"]["long-flattened-cifar10"]
    assert run["final"] == [82.34, 60] and run["best"] == [82.46, 55] and run["reach"] == {"80": 39, "99": None}
    assert run["ranges"]["41-60"]["test"] == 82.26
    assert out["runs"]["wd5e-4-flattened-cifar10"]["reach"] == {"80": 41, "99": None}
    assert set(run["speed"]) == {"minutes", "images_per_s", "s_per_epoch"} and "speed_ranges" in run
    assert out["final"]["runs"] == 2
    with pytest.raises(AssertionError):
        parse("| epoch | lr |\n|---:|---:|\n\nrun: best test 82.46% (epoch 55); something else\n")


def test_compare_runs_refuses_a_folder_that_is_not_a_run():
    r = subprocess.run([sys.executable, str(SCRIPT), str(ROOT / "docs" / "runs")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "no log.jsonl" in r.stderr  # a folder of runs is not a run


def test_final_and_spread_give_the_last_epochs_and_their_mean_and_sample_standard_deviation(tmp_path):
    """--final: each run's last logged epoch (runs may differ in length); --spread also their mean and sd (n-1)."""
    for name, accs in (("a", [0.5, 0.8]), ("b", [0.4, 0.6, 0.9])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "log.jsonl").write_text("".join(
            json.dumps(dict(epoch=e, lr=0.1, train_acc=a, test_acc=a)) + "\n" for e, a in enumerate(accs, 1)))
    final = parse(compare_runs([str(tmp_path / "a"), str(tmp_path / "b"), "--final"]))
    assert final["runs"]["a"]["final"] == [80.0, 2] and final["runs"]["b"]["final"] == [90.0, 3]
    assert "final" not in final  # runs of different settings: no mean
    spread = parse(compare_runs([str(tmp_path / "a"), str(tmp_path / "b"), "--spread"]))
    assert spread["runs"] == final["runs"] and spread["final"] == {"runs": 2, "mean": 85.0, "sd": 7.07}  # 5 * sqrt(2)
    assert "final" not in parse(compare_runs([str(tmp_path / "a"), "--spread"]))  # one run: no spread

"""docs/compare_runs.py on the committed run logs: the figures docs/results.md quotes."""
import subprocess
import sys
from pathlib import Path

import pytest


def test_compare_runs_prints_the_figures_results_md_quotes():
    """docs/compare_runs.py on the committed logs gives the comparison results.md prints."""
    root = Path(__file__).resolve().parents[1]
    runs = root / "docs" / "runs"
    r = subprocess.run([sys.executable, str(root / "docs" / "compare_runs.py"), str(runs / "long-flattened-cifar10"),
                        str(runs / "wd5e-4-flattened-cifar10"), "--epochs", "60", "--ranges", "41-60", "--reach", "80",
                        "--loss"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| 60 | 0.0003 | 93.58% | 82.34% | 92.56% | 83.10% | 0.618 | 0.569 |" in r.stdout
    assert "epochs 41-60: mean test 82.26%" in r.stdout and "epochs 41-60: mean test 82.83%" in r.stdout
    assert "best test 82.46% (epoch 55)" in r.stdout and "80% first at epoch 41" in r.stdout
    results = (root / "docs" / "results.md").read_text()
    assert "| 60 | 0.0003 | 93.58% | 82.34% | 92.56% | **83.10%** | 0.618 | 0.569 |" in results
    r = subprocess.run([sys.executable, str(root / "docs" / "compare_runs.py"), str(runs)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "no log.jsonl" in r.stderr  # a folder of runs is not a run


@pytest.mark.parametrize("run, printed, quoted", [
    ("long120-flattened-cifar10", "88 min; images/s 997, 1,187, 1,363; s/epoch 37, 42, 50",
     "88 minutes (997–1,363 images/s, median 1,187; 37–50 s an epoch of"),
    ("long180-flattened-cifar10", "123 min; images/s 1,056, 1,291, 1,456; s/epoch 34, 39, 47",
     "123 minutes in all over the two sessions, evaluations included (1,056–1,456 images/s, "
     "median\n1,291; 34–47 s"),
    ("wd2e-4-flattened-cifar10", "125 min; images/s 1,076, 1,254, 1,375; s/epoch 36, 40, 46",
     "125 minutes (images/s 1,076 / 1,254 / 1,375, min / median / max)"),
    ("long180-flattened-cifar10-s1", "136 min; images/s 331, 1,213, 1,365; s/epoch 37, 41, 151",
     "136 minutes (images/s 331, 1,213, 1,365; s/epoch 37, 41, 151"),
    ("long180-flattened-cifar10-s2", "130 min; images/s 294, 1,266, 1,442; s/epoch 35, 39, 170",
     "130 minutes (images/s 294,\n1,266, 1,442; s/epoch 35, 39, 170"),
    ("long180-cutout8-flattened-cifar10-s1", "122 min; images/s 943, 1,281, 1,453; s/epoch 34, 39, 53",
     "122 minutes\n(images/s 943, 1,281, 1,453; s/epoch 34, 39, 53"),
    ("seeds/baseline-cifar10-s0", "2 min; images/s 328, 363, 376; s/epoch 27, 28, 31",
     "2 minutes (images/s 328 / 363 /\n376, min / median / max"),
    ("long120-baseline-cifar10", "292 min; images/s 251, 362, 401; s/epoch 125, 138, 198",
     "292 minutes over the two sessions, evaluations included (images/s 251, 362, 401; s/epoch\n125, 138, 198")])
def test_compare_runs_speed_prints_the_wall_time_and_rates_results_md_quotes(run, printed, quoted):
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "docs" / "compare_runs.py"), str(root / "docs" / "runs" / run),
                        "--speed"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{Path(run).name}: {printed} (min, median, max)" in r.stdout
    assert quoted in (root / "docs" / "results.md").read_text()


@pytest.mark.parametrize("run, ranges, printed, quoted", [
    # epochs 1-87 ran on an AVX2-only machine, 88-180 on an AVX-512 one (each part rounded to the minute, so the
    # parts add up to one more than the whole)
    ("long180-cutout8-flattened-cifar10", "1-87,88-180",
     ["205 min; images/s 445, 1,216, 1,534; s/epoch 33, 41, 112",
      "epochs 1-87: 146 min; images/s 445, 523, 579; s/epoch 86, 96, 112",
      "epochs 88-180: 60 min; images/s 1,162, 1,351, 1,534; s/epoch 33, 37, 43"],
     ["146 minutes (images/s 445,\n523, 579; s/epoch 86, 96, 112",
      "60 minutes\n(images/s 1,162, 1,351, 1,534; s/epoch 33, 37, 43)"]),
    # a run carried over two sessions: the epochs each session trained, as each quotes them
    ("long120-baseline-cifar10", "1-55,56-120",
     ["epochs 1-55: 136 min; images/s 251, 356, 401; s/epoch 125, 140, 198",
      "epochs 56-120: 155 min; images/s 329, 365, 397; s/epoch 126, 137, 152"],
     ["136 minutes for the 55 epochs, evaluations included, at images/s 251, 356, 401; s/epoch 125,\n140, 198",
      "epochs 56–120: 155 minutes (images/s 329,\n365, 397; s/epoch 126, 137, 152)"]),
])
def test_compare_runs_speed_per_range_prints_each_part_as_results_md_quotes(run, ranges, printed, quoted):
    """--speed with --ranges prints each range's own figures: a run continued on another machine, or the parts
    of a run that each session trained."""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "docs" / "compare_runs.py"), str(root / "docs" / "runs" / run),
                        "--speed", "--ranges", ranges], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for line in printed:
        assert f"{run}: {line} (min, median, max)" in r.stdout, r.stdout
    results = (root / "docs" / "results.md").read_text()
    for text in quoted:
        assert text in results

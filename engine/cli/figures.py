"""Draw the paper's Figures 3 to 7 from run folders, model files and the layer benchmark.

    python -m engine.figures                        # into runs/figures (git ignores runs/)
    python -m engine.figures --out docs/figures     # the committed figures, redrawn

Each figure is a PNG beside the file holding the numbers it was drawn from (same stem):

  fig3-accuracy.png / .csv   training and test accuracy per epoch of the runs that a run list names
                             (--fig3-runs), as the paper draws its Figure 3: one row of panels per data
                             set, one line per model for the mean over its seeds with a shade for +-1
                             standard deviation, one legend entry per model. The CSV holds the plotted
                             numbers: per panel, model and epoch, n and the mean and sd (--band minmax:
                             min and max) of the training and test accuracy in percent
  fig4-filters.png / .npy    first-layer filters of a --flatten-first CIFAR-10 run, rebuilt as 3D
                             filters from the 1D ones (engine.filterbank), sorted by variance
  fig5-params.png / .csv     parameter reduction of one layer (3D weights / flattened weights) against
                             the channel ratio F/C, counted as engine.Flattened builds the layer, with
                             Table 1's layers 2 and 3 marked
  fig6-memory.png / .csv     extra memory of one baseline and one flattened layer, forward and
                             backward: measured beside the theory (`bench layers --memory --json F`)
  fig7-speedup.png / .csv    speed-up of the flattened over the baseline layer (baseline ms /
                             flattened ms), forward and backward, per image size (`bench layers --json F`):
                             each executor against its own baseline, and the compiled flattened layer
                             against the baseline by direct convolution and against PyTorch's (--compare torch)

Figure 3's run list (--fig3-runs, default docs/figures/fig3-runs.json) is a JSON file:

  {"note": "any text (optional)",
   "recipe": "reproduce",
   "panels": [{"dataset": "cifar10", "title": "CIFAR-10",
               "models": {"baseline": ["long120-baseline-cifar10"],
                          "flattened": ["long180-flattened-cifar10", "long180-flattened-cifar10-s1"]}},
              {"dataset": "mnist", "models": {...}}]}

One row of panels per entry of "panels" (the title defaults to the data set's name), one line per
model, averaged over the run folders listed for it (relative to --runs, or absolute). No other
folder is drawn. A listed run is left out, with a warning saying why, when its settings.json or
log.jsonl cannot be read, when its data set or model is not the one it is listed under, when it
differs from the first run of its model in more than the seed (and options such as threads), or,
where the list names a recipe (optional), when its settings are not that recipe's for its data
set and model (models/recipes.py) on the full data set (no --limit-train or --limit-test). A run
in progress (short of its planned epochs, with checkpoint.npz kept) is left out with a line
saying so: a seed still training would change n within a band.

A figure whose inputs are missing is skipped with a line saying why; a run folder whose settings
or log cannot be read is skipped with a warning. Every file written is printed.
"""
import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from engine.models.recipes import RECIPES, complete_settings, recipe, setting_text

from ..checkpoint import CHECKPOINT_FILE
from ..npzfile import check_writable_folder
from .common import Parser, fail

# Settings that do not change what a run trains (train.py's RUN_OPTIONS, the seed, the planned epochs and the
# recipe's name, whose values are settings of their own): runs that differ only in these are samples of the same
# experiment, the seeds that one line of Figure 3 averages.
NOT_THE_EXPERIMENT = ("seed", "epochs", "recipe", "data_dir", "cache_dir", "download", "no_download", "eval_batch_size", "backend",
                      "threads", "plot", "quiet", "step", "zca_storage", "compress_model", "conv", "tf32",
                      "bucket_mib", "overlap")
# Table 1 of the paper: the two flattened layers (C input channels, F filters, k x k) and their weights.
TABLE1 = (("layer 2", 96, 128, 5, 307200, 30912), ("layer 3", 128, 256, 5, 819200, 102144))
FIGURES = (3, 4, 5, 6, 7)
# Figure 3's run list when --fig3-runs is not given, and its format in one line for error messages.
DEFAULT_RUN_LIST = Path("docs/figures/fig3-runs.json")
RUN_LIST_FORMAT = ('{"recipe": NAME (optional), "panels": [{"dataset": D, "title": T (optional), '
                   '"models": {MODEL: [RUN FOLDER, ...], ...}}, ...]}')
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "mnist": "MNIST"}
MODEL_COLOURS = {"baseline": "C0", "flattened": "C3"}
DEFAULT_OUT = "runs/figures"  # git ignores runs/: the committed docs/figures are redrawn only when named


def say(line):
    print(line, flush=True)


def warn(line):
    print(f"warning: {line}", file=sys.stderr, flush=True)


def skip(figure, why):
    say(f"Figure {figure} skipped: {why}")


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    say(f"wrote {path}")


def save_figure(fig, path):
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    say(f"wrote {path}")


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ----------------------------------------------------------------------------- run folders

def _finite_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_settings(folder):
    """settings.json of a run folder as a dict with string 'model' and 'dataset'; ValueError with the reason."""
    path = folder / "settings.json"
    if not path.is_file():
        raise ValueError("no settings.json")
    try:
        settings = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"settings.json unreadable ({e})") from None
    if not isinstance(settings, dict) or not all(isinstance(settings.get(k), str) for k in ("model", "dataset")):
        raise ValueError("settings.json lacks the model or the dataset")
    return complete_settings(settings)  # a run from before a setting existed: the value it trained with


def read_log(folder):
    """log.jsonl as a list of epoch records (epoch, train_acc, test_acc at least), epochs increasing."""
    path = folder / "log.jsonl"
    if not path.is_file():
        raise ValueError("no log.jsonl")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"log.jsonl unreadable ({e})") from None
    log = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"log.jsonl line {i} is not JSON") from None
        if not (isinstance(r, dict) and isinstance(r.get("epoch"), int) and not isinstance(r["epoch"], bool)
                and all(_finite_number(r.get(k)) for k in ("train_acc", "test_acc"))):
            raise ValueError(f"log.jsonl line {i} lacks an integer epoch or a finite train_acc/test_acc")
        if log and r["epoch"] <= log[-1]["epoch"]:
            raise ValueError(f"log.jsonl line {i}: epoch {r['epoch']} does not follow epoch {log[-1]['epoch']}")
        log.append(r)
    if not log:
        raise ValueError("log.jsonl has no epochs")
    return log


def scan_runs(runs):
    """Every folder under `runs` (at any depth) that is a run: [(folder, settings)], sorted by path.

    A folder is taken for a run when it holds settings.json or has no sub-folder (a folder of runs,
    such as runs/seeds/, is searched instead); warns for those whose settings cannot be read."""
    found = []
    for folder in sorted({runs, *(p for p in runs.rglob("*") if p.is_dir())}):
        has_runs_below = any(p.is_dir() for p in folder.iterdir())
        if not (folder / "settings.json").exists() and (has_runs_below or folder == runs):
            continue
        try:
            found.append((folder, read_settings(folder)))
        except ValueError as e:
            warn(f"skipped {folder}: {e}")
    return found


# ----------------------------------------------------------------------------- Figure 3

def experiment_key(settings):
    return json.dumps({k: v for k, v in settings.items() if k not in NOT_THE_EXPERIMENT}, sort_keys=True)


def read_run_list(path):
    """The runs Figure 3 draws, from the JSON file `path` (format in RUN_LIST_FORMAT): dict(recipe, panels), each
    panel dict(dataset, title, models=[(model, [folder name, ...]), ...]). ValueError with the reason."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read it ({e})") from None

    def bad(why):
        return ValueError(f"{path}: {why} (expected {RUN_LIST_FORMAT})")
    if not isinstance(data, dict) or not set(data) <= {"note", "recipe", "panels"}:
        raise bad("not an object with the keys panels and, optionally, recipe and note")
    name = data.get("recipe")
    if name is not None and name not in RECIPES:
        raise bad(f"unknown recipe {name!r} (known: {', '.join(RECIPES)})")
    panels, seen = [], set()
    if not isinstance(data.get("panels"), list) or not data["panels"]:
        raise bad("no list of panels")
    for i, panel in enumerate(data["panels"], 1):
        if not (isinstance(panel, dict) and set(panel) <= {"dataset", "title", "models"}
                and isinstance(panel.get("dataset"), str) and isinstance(panel.get("title", ""), str)
                and isinstance(panel.get("models"), dict) and panel["models"]):
            raise bad(f"panel {i} is not an object with a dataset, models and, optionally, a title")
        if name is not None and panel["dataset"] not in RECIPES[name]:
            raise bad(f"panel {i}: recipe {name} has no data set {panel['dataset']!r}")
        models = []
        for model, folders in panel["models"].items():
            if not (isinstance(folders, list) and folders and all(isinstance(f, str) and f for f in folders)):
                raise bad(f"panel {i}, model {model}: not a list of run folders")
            for f in folders:
                if f in seen:
                    raise bad(f"run folder {f} is listed twice")
                seen.add(f)
            models.append((model, folders))
        panels.append(dict(dataset=panel["dataset"], title=panel.get("title") or DATASET_NAMES.get(
            panel["dataset"], panel["dataset"]), models=models))
    return dict(recipe=name, panels=panels)


def recipe_mismatch(settings, name):
    """Where a run's settings differ from recipe `name` for its data set and model, on the full data set: a text
    such as "epochs 60 (recipe: 180)", or '' where they agree."""
    want = dict(recipe(name, settings["dataset"], settings["model"]), limit_train=None, limit_test=None)
    return ", ".join(f"{k} {setting_text(settings.get(k))} (recipe: {setting_text(v)})"
                     for k, v in want.items() if settings.get(k) != v)


def aggregate(members):
    """Per epoch: n, and mean, sample std (NaN for one run), min, max of train and test accuracy in percent."""
    epochs = sorted({r["epoch"] for _, _, log in members for r in log})
    rows = []
    for e in epochs:
        row = dict(epoch=e)
        for what in ("train_acc", "test_acc"):
            v = np.array([100.0 * r[what] for _, _, log in members for r in log if r["epoch"] == e])
            row["n"] = len(v)
            row[what] = dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else math.nan,
                             min=float(v.min()), max=float(v.max()))
        rows.append(row)
    return rows


def in_progress(folder, settings, log):
    """A run that has logged fewer epochs than it plans and keeps a checkpoint to continue from: its last
    epoch, else None. Averaging it with finished runs would mix n per epoch in one band. (A run stopped for
    good has no checkpoint kept.)"""
    planned, last = settings.get("epochs"), log[-1]["epoch"] if log else 0
    running = isinstance(planned, int) and last < planned and (folder / CHECKPOINT_FILE).is_file()
    return last if running else None


def listed_runs(runs, run_list, panel, model, folders):
    """The listed run folders of one model that Figure 3 can draw: [(folder, settings, log)], and how many of
    them are in progress. Each one left out is named with the reason (a warning, or a line if in progress)."""
    kept, running = [], 0
    for name in folders:
        folder = Path(name) if Path(name).is_absolute() else runs / name
        try:
            if not folder.is_dir():
                raise ValueError("no such run folder")
            settings = read_settings(folder)
            if (settings["dataset"], settings["model"]) != (panel["dataset"], model):
                raise ValueError(f"a {settings['dataset']} {settings['model']} run, listed as "
                                 f"{panel['dataset']} {model}")
            if run_list["recipe"] is not None:
                differs = recipe_mismatch(settings, run_list["recipe"])
                if differs:
                    raise ValueError(f"not a run of recipe {run_list['recipe']}: {differs}")
            log = read_log(folder)
        except ValueError as e:
            warn(f"skipped {folder} for Figure 3: {e}")
            continue
        last = in_progress(folder, settings, log)
        if last is not None:
            say(f"Figure 3 leaves out {folder}: in progress (epoch {last} of {settings['epochs']}, "
                f"{CHECKPOINT_FILE} present)")
            running += 1
            continue
        if kept and experiment_key(settings) != experiment_key(kept[0][1]):
            first = kept[0][1]
            differs = ", ".join(f"{k} {setting_text(settings.get(k))} against {setting_text(first.get(k))}"
                                for k in sorted(set(settings) | set(first))
                                if k not in NOT_THE_EXPERIMENT and settings.get(k) != first.get(k))
            warn(f"skipped {folder} for Figure 3: differs from {kept[0][0]} in more than the seed: {differs}")
            continue
        kept.append((folder, settings, log))
    return kept, running


def figure3(runs, list_path, out, band):
    if not runs.is_dir():
        return skip(3, f"no run folder {runs}")
    if list_path is None:
        return skip(3, f"no run list {DEFAULT_RUN_LIST} (name one with --fig3-runs)")
    run_list = read_run_list(list_path)  # read and checked by main() already: no error here
    panels, running = [], 0
    for panel in run_list["panels"]:
        models = []
        for model, folders in panel["models"]:
            kept, n = listed_runs(runs, run_list, panel, model, folders)
            running += n
            if kept:
                models.append(dict(model=model, runs=kept, rows=aggregate(kept)))
        if models:
            panels.append(dict(panel, models=models))
    if not panels:
        return skip(3, f"no run folder in {runs} listed in {list_path} is usable (readable settings.json and "
                       f"log.jsonl, the listed data set and model{', its recipe' if run_list['recipe'] else ''})"
                       f"{f' and is finished ({running} in progress)' if running else ''}")

    spread = ("std",) if band == "std" else ("min", "max")
    rows = []
    for p in panels:
        for m in p["models"]:
            names = " ".join(folder.name for folder, _, _ in m["runs"])
            seeds = " ".join(str(s.get("seed")) for _, s, _ in m["runs"])
            for r in m["rows"]:
                rows.append([p["title"], p["dataset"], m["model"], names, seeds, r["epoch"], r["n"]]
                            + [("" if r["n"] == 1 and s != "mean" else r[w][s])
                               for w in ("train_acc", "test_acc") for s in ("mean",) + spread])
    write_csv(out / "fig3-accuracy.csv", ["panel", "dataset", "model", "runs", "seeds", "epoch", "n"]
              + [f"{w}_{s}_pct" for w in ("train_acc", "test_acc") for s in ("mean",) + spread], rows)

    plt = pyplot()
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 0.6 + 4.4 * len(panels)), squeeze=False)
    others = iter(f"C{i}" for i in (2, 1, 4, 5, 6, 7, 8, 9))
    colours = {}
    for p in panels:
        for m in p["models"]:
            colours.setdefault(m["model"], MODEL_COLOURS.get(m["model"]) or next(others, "k"))
    for row, p in zip(axes, panels):
        for ax, what, title in zip(row, ("train_acc", "test_acc"), ("training", "test")):
            handles = []
            for m in p["models"]:
                colour, n_runs = colours[m["model"]], len(m["runs"])
                x = np.array([r["epoch"] for r in m["rows"]])
                mean = np.array([r[what]["mean"] for r in m["rows"]])
                several = np.array([r["n"] > 1 for r in m["rows"]])
                if band == "std":
                    sd = np.array([r[what]["std"] for r in m["rows"]])
                    lo, hi = mean - sd, mean + sd
                else:
                    lo = np.array([r[what]["min"] for r in m["rows"]])
                    hi = np.array([r[what]["max"] for r in m["rows"]])
                line, = ax.plot(x, mean, "-", color=colour, linewidth=1.4, zorder=3,
                                marker="o" if len(x) == 1 else None, markersize=4)
                handle = line
                if several.any():
                    if len(x) > 1:
                        ax.fill_between(x, np.where(several, lo, mean), np.where(several, hi, mean), where=several,
                                        color=colour, alpha=0.25, linewidth=0, zorder=2)
                    else:  # one epoch: a band would be invisible
                        ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], color=colour, capsize=4, fmt="none")
                    handle = (Patch(color=colour, alpha=0.25, linewidth=0), line)
                handles.append((handle, f"{m['model']} ({n_runs} seeds)" if n_runs > 1 else f"{m['model']} (1 run)"))
            ax.set_title(f"{p['title']}: {title} accuracy")
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"{title} accuracy (%)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            ax.grid(alpha=0.3)
            ax.legend(*zip(*handles), loc="lower right", fontsize=9)
    band_text = "±1 standard deviation" if band == "std" else "their range"
    recipe_text = f", recipe {run_list['recipe']}" if run_list["recipe"] else ""
    fig.suptitle(f"Figure 3: training and test accuracy per epoch{recipe_text} "
                 f"(line: the mean over a model's seeds; shade: {band_text})", fontsize=11)
    fig.tight_layout()
    save_figure(fig, out / "fig3-accuracy.png")


# ----------------------------------------------------------------------------- Figure 4

def figure4(runs, found, out, chosen=None):
    """The first layer's filters of a --flatten-first CIFAR-10 run (the best final test accuracy if several)."""
    from ..filterbank import reconstruct
    from ..layers import Flattened
    from ..model import load
    from ..modelfile import ModelFileError
    from .filters import draw
    if chosen is not None:
        candidates = [chosen]
    else:
        if found is None:
            return skip(4, f"no run folder {runs}")
        ff = [f for f, s in found if s.get("dataset") == "cifar10" and s.get("model") == "flattened"
              and s.get("flatten_first") is True]
        candidates = [f for f in ff if (f / "model.npz").is_file()]
        if not candidates:
            why = (f"{len(ff)} such run(s) but none has a model.npz (the run has not finished)" if ff else
                   "none of its runs has settings with model flattened, dataset cifar10 and flatten_first true")
            return skip(4, f"needs a finished `train.py --flatten-first` CIFAR-10 run in {runs}: {why}")

        def final_test_acc(folder):
            try:
                return read_log(folder)[-1]["test_acc"]
            except ValueError:
                return -1.0
        candidates.sort(key=lambda f: (-final_test_acc(f), f.name))
    for folder in candidates:
        path = folder / "model.npz" if folder.is_dir() else folder
        try:
            model = load(path, compiled=False)
        except (OSError, ModelFileError) as e:
            warn(f"skipped {path} for Figure 4: {e}")
            continue
        flat = [(n, layer) for n, layer in model.net.children if isinstance(layer, Flattened)]
        if not flat or flat[0][1].c_in != 3:
            warn(f"skipped {path} for Figure 4: its first layer is not a flattened layer on colour images")
            continue
        name, layer = flat[0]
        filters = reconstruct(layer)
        filters = filters[np.argsort(-filters.reshape(len(filters), -1).var(axis=1), kind="stable")]
        npy, png = out / "fig4-filters.npy", out / "fig4-filters.png"
        np.save(npy, filters.astype(np.float32))
        say(f"wrote {npy}")
        n, _, kh, kw = filters.shape
        draw(filters, png, f"Figure 4: {name} of {folder.name}, {n} filters {kh}x{kw}\n"
                           "rebuilt from its 1D filters (biases excluded), sorted by variance")
        say(f"wrote {png}")
        return
    skip(4, "no usable model file (see the warnings above)")


# ----------------------------------------------------------------------------- Figure 5

def conv_weights(c, f, k):
    """Weights of a 3D convolution layer: C*X*Y*F (biases excluded)."""
    return c * k * k * f


def flattened_weights(c, f, k, stages=2):
    """Weights of engine.Flattened(c, f, k, stages), biases excluded: the first stage's vertical and
    horizontal filters act on the C inputs and its lateral maps C -> F; every later stage's act on F."""
    return 2 * k * c + c * f + (stages - 1) * (2 * k * f + f * f)


def paper_formula_weights(c, f, k):
    """The paper's section 4.3 count F(F + C + 2X + 2Y) (Table 1's numbers do not follow it)."""
    return f * (f + c + 4 * k)


def figure5_rows(k=5, stages=2, channels=(128, 96), max_ratio=32):
    rows = []
    for c in channels:
        fs = set(np.unique(np.round(np.geomspace(1, max_ratio * c, 300)).astype(int)).tolist())
        fs |= {f for _, tc, f, tk, _, _ in TABLE1 if tc == c and tk == k}
        for f in sorted(fs):
            base, flat = conv_weights(c, f, k), flattened_weights(c, f, k, stages)
            paper = paper_formula_weights(c, f, k)
            rows.append([c, f, k, stages, f / c, base, flat, base / flat, paper, base / paper])
    return rows


def figure5(out, k=5, stages=2):
    rows = figure5_rows(k, stages)
    write_csv(out / "fig5-params.csv", ["C", "F", "k", "stages", "F_over_C", "conv_weights", "flattened_weights",
                                        "reduction", "paper_formula_weights", "paper_formula_reduction"], rows)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for c, colour in zip(sorted({r[0] for r in rows}, reverse=True), ("C0", "C2")):
        mine = [r for r in rows if r[0] == c]
        ax.plot([r[4] for r in mine], [r[7] for r in mine], color=colour,
                label=f"C = {c} input channels" + (" (the paper's Figure 5)" if c == 128 else ""))
        if c == 128:
            ax.plot([r[4] for r in mine], [r[9] for r in mine], ":", color=colour,
                    label="C = 128, the paper's formula F(F+C+2X+2Y)")
    for name, c, f, tk, base, flat in TABLE1:
        ax.plot(f / c, base / flat, "o", color="C3", markersize=7, zorder=5)
        ax.annotate(f"Table 1 {name} ({c} -> {f} channels):\n{base:,} / {flat:,} = {base / flat:.2f}x",
                    (f / c, base / flat), textcoords="offset points", xytext=(10, 2), fontsize=8)
    ax.set_xscale("log")
    ax.axhline(1, color="grey", linewidth=0.8)
    ax.annotate("1 = no reduction", (0, 1), xycoords=("axes fraction", "data"), xytext=(4, 3),
                textcoords="offset points", fontsize=7, color="grey")
    ax.set_xlabel("channel ratio F / C (output channels / input channels)")
    ax.set_ylabel("parameter reduction (3D weights / flattened weights)")
    ax.set_title(f"Figure 5: parameter reduction of one layer, {k}x{k} filters, {stages} stages\n"
                 "(weights as engine.Flattened builds them, biases excluded)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "fig5-params.png")


# ----------------------------------------------------------------------------- Figures 6 and 7

def read_bench(path):
    """(timing records, memory records) of a `bench layers --json` file (a list, or {"records": [...]})."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    records = data.get("records") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise ValueError(f"{path} holds no list of benchmark records")
    timing, memory, bad = [], [], 0
    for r in records:
        if not isinstance(r, dict) or r.get("pass") not in ("forward", "backward") \
                or r.get("layer") not in ("baseline", "flattened") or not isinstance(r.get("size"), int):
            bad += 1
        elif r.get("kind") == "memory":
            ok = all(_finite_number(r.get(k)) for k in ("measured_bytes", "theory_bytes")) and all(
                isinstance(r.get(k), int) for k in ("channels", "k", "batch"))
            memory.append(r) if ok else None
            bad += not ok
        elif "kind" not in r:
            ok = isinstance(r.get("backend"), str) and _finite_number(r.get("median_ms")) and r["median_ms"] > 0
            timing.append(r) if ok else None
            bad += not ok
    if bad:
        warn(f"{path}: {bad} record(s) not understood, left out")
    return timing, memory


def figure6(bench, memory, out):
    if not memory:
        return skip(6, f"{bench} has no memory records (write them with "
                       "`python -m engine.bench layers --memory --json FILE`)")
    configs = sorted({(r["channels"], r["k"], r["batch"]) for r in memory})
    mib = 2.0 ** 20
    rows = sorted([r["channels"], r["k"], r["batch"], r["layer"], r["size"], r["pass"],
                   r["measured_bytes"] / mib, r["theory_bytes"] / mib] for r in memory)
    write_csv(out / "fig6-memory.csv", ["channels", "k", "batch", "layer", "size", "pass", "measured_mib",
                                        "theory_mib"], rows)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    several = len(configs) > 1
    for ax, pas in zip(axes, ("forward", "backward")):
        for ci, config in enumerate(configs):
            for layer, colour in (("baseline", "C0"), ("flattened", "C3")):
                mine = sorted((r for r in rows if r[5] == pas and r[3] == layer and tuple(r[:3]) == config),
                              key=lambda r: r[4])
                if not mine:
                    continue
                tag = f"{layer}" + (f" ({config[0]} ch, {config[1]}x{config[1]}, batch {config[2]})" if several else "")
                x = [r[4] for r in mine]
                # theory as a wide pale line under the measured one: it shows where the two coincide
                ax.plot(x, [r[7] for r in mine], "-x", color=colour, alpha=0.3, linewidth=5, markersize=10,
                        label=f"{tag}: theory")
                ax.plot(x, [r[6] for r in mine], "-o", color=colour, alpha=1 - 0.3 * ci, linewidth=1.2,
                        markersize=4, label=f"{tag}: measured")
        sizes = sorted({r[4] for r in rows})
        ax.set_xticks(sizes, [f"{s}x{s}" for s in sizes])
        ax.set_title(f"{pas} pass")
        ax.set_xlabel("input image size (pixels)")
        ax.set_ylabel("extra memory during the call (MiB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    what = (f"{configs[0][0]}->{configs[0][0]} channels, {configs[0][1]}x{configs[0][1]}, batch {configs[0][2]}"
            if len(configs) == 1 else "one layer")
    fig.suptitle(f"Figure 6: extra memory of one layer ({what}), float32: measured peak allocation (tracemalloc) "
                 "beside the theory\n(baseline: output or input gradient + im2col columns; flattened: the six "
                 "sub-layers' outputs or input gradients)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "fig6-memory.png")


# Figure 7's baselines besides each executor's own: the engine's compiled flattened layer against the baseline
# layer by direct convolution and against PyTorch's fastest layout, so that the speed-up is also read against
# the fastest baseline available, not only against the engine's own (bench layers --compare torch).
TORCH_BEST = "PyTorch (faster layout)"


def figure7(bench, timing, out):
    engine_rows = [r for r in timing if not r["backend"].startswith("torch")]
    if not engine_rows:
        return skip(7, f"{bench} has no timing records of the engine's layers")
    medians = {}
    for r in timing:
        medians.setdefault((r["backend"], r.get("batch"), r["size"], r["pass"], r["layer"]), []).append(r["median_ms"])
    medians = {k: float(np.median(v)) for k, v in medians.items()}
    for (backend, batch, size, pas, layer), ms in list(medians.items()):  # PyTorch's faster layout per case
        if backend.startswith("torch"):
            key = (TORCH_BEST, batch, size, pas, layer)
            medians[key] = min(medians.get(key, ms), ms)
    rows = []
    for (backend, batch, size, pas, layer), base in sorted(medians.items(), key=lambda kv: str(kv[0])):
        if layer != "baseline" or backend.startswith("torch"):
            continue
        # the flattened layer of the same executor; against another baseline, the engine's compiled one
        own = backend in ("cpu", "cpu compiled", "cupy")
        flat = medians.get((backend if own else "cpu compiled", batch, size, pas, "flattened"))
        if flat is not None:
            rows.append([backend if own else "cpu compiled", backend, batch, size, pas, base, flat, base / flat])
    if not rows:
        return skip(7, f"{bench} has no size timed for both the baseline and the flattened layer")
    rows.sort(key=lambda r: (r[0], r[1], str(r[2]), r[4], r[3]))
    write_csv(out / "fig7-speedup.csv", ["backend", "baseline", "batch", "size", "pass", "baseline_ms",
                                         "flattened_ms", "speedup"], rows)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    lines = sorted({(r[0], r[1], r[2]) for r in rows}, key=str)
    batches = {b for _, _, b in lines}

    def label(backend, baseline):
        if baseline == backend == "cpu compiled":
            return "engine, cpu compiled: both layers as the lowering compiles them (fastest baseline)"
        if baseline == backend:
            return f"engine, {backend}: both layers"
        if baseline == TORCH_BEST:
            return f"engine, {backend}, against {TORCH_BEST}'s baseline"
        return f"engine, {backend}, against its baseline by direct convolution" if baseline.endswith("direct") \
            else f"engine, {backend}, against {baseline}'s baseline"
    for ax, pas in zip(axes, ("forward", "backward")):
        for i, (backend, baseline, batch) in enumerate(lines):
            mine = sorted((r for r in rows if (r[0], r[1], r[2], r[4]) == (backend, baseline, batch, pas)),
                          key=lambda r: r[3])
            if mine:
                ax.plot([r[3] for r in mine], [r[7] for r in mine], "-o", color=f"C{i % 10}",
                        label=label(backend, baseline) + (f", batch {batch}" if len(batches) > 1 else ""))
                for r in mine:
                    ax.annotate(f"{r[7]:.1f}x", (r[3], r[7]), textcoords="offset points", xytext=(0, 6),
                                ha="center", fontsize=7)
        ax.axhline(1, color="grey", linewidth=0.8)
        sizes = sorted({r[3] for r in rows})
        ax.set_xticks(sizes, [f"{s}x{s}" for s in sizes])
        ax.set_ylim(0, 1.12 * max(r[7] for r in rows))  # room for the labels above the points
        ax.set_title(f"{pas} pass")
        ax.set_xlabel("input image size (pixels)")
        ax.set_ylabel("speed-up (baseline time / flattened time)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    batch = f", batch {next(iter(batches))}" if len(batches) == 1 else ""
    fig.suptitle(f"Figure 7: speed-up of one flattened layer over the baseline convolution{batch} "
                 f"(medians from {Path(bench).name})", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out / "fig7-speedup.png")


# ----------------------------------------------------------------------------- CLI

def plot_history(history, path, title=""):
    """Learning curves (train and test accuracy per epoch, like the paper's Figure 3) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    style = dict(marker="o", markersize=4)  # a one-epoch run is a single point: a line alone would not show it
    axes[0].plot(epochs, [100 * h["train_acc"] for h in history], label="train", **style)
    axes[0].plot(epochs, [100 * h["test_acc"] for h in history], label="test", **style)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    axes[1].plot(epochs, [h["train_loss"] for h in history], label="train", **style)
    axes[1].plot(epochs, [h["test_loss"] for h in history], label="test", **style)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("loss")
    axes[1].legend()
    axes[1].grid(alpha=0.3)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs, even for one
    fig.suptitle(title)
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def figure_list(s):
    try:
        v = sorted({int(x) for x in s.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected figure numbers such as 3,5,7, got {s!r}") from None
    if not v or not set(v) <= set(FIGURES):
        raise argparse.ArgumentTypeError(f"expected figure numbers among {','.join(map(str, FIGURES))}, got {s!r}")
    return v


def parser():
    p = Parser(prog="python -m engine.figures", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="docs/runs",
                   help="folder of train.py run folders (each with settings.json and log.jsonl; model.npz for "
                        "Figure 4). Default: docs/runs. Missing: Figures 3 and 4 are skipped")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"folder to write the figures and their data files into (created if missing). "
                        f"Default: {DEFAULT_OUT}, which git ignores; --out docs/figures redraws the committed ones")
    p.add_argument("--bench", default="docs/raw/bench-layers-epyc512.json",
                   help="JSON records of `python -m engine.bench layers --json F` (add --memory for Figure 6). "
                        "Default: docs/raw/bench-layers-epyc512.json. Missing: Figures 6 and 7 are skipped")
    p.add_argument("--fig3-runs", default=None, metavar="FILE",
                   help=f"Figure 3's run list: a JSON file naming, per panel (data set) and model, the run folders "
                        f"to average (format above). Default: {DEFAULT_RUN_LIST}, the runs of the default recipe "
                        f"(skipped with a line if missing)")
    p.add_argument("--band", choices=["std", "minmax"], default="std",
                   help="Figure 3's shade around the mean over a model's seeds: +-1 sample standard "
                        "deviation (std, the paper's) or the range over the runs (minmax)")
    p.add_argument("--filters-run", default=None,
                   help="Figure 4 from this run folder (or model file) instead of the best --flatten-first "
                        "CIFAR-10 run found in --runs")
    p.add_argument("--figures", type=figure_list, default=list(FIGURES),
                   help="which figures to draw, e.g. 3,5 (default: all of 3,4,5,6,7)")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        fail("drawing the figures needs matplotlib: pip install matplotlib "
                         "(or pip install -e '.[plot]')")
    out, runs, bench = Path(args.out), Path(args.runs), Path(args.bench)
    if runs.exists() and not runs.is_dir():
        fail(f"--runs {runs} is a file, not a folder of run folders")
    if bench.is_dir():
        fail(f"--bench {bench} is a folder, not a benchmark JSON file")
    filters_run = Path(args.filters_run) if args.filters_run else None
    if filters_run is not None and not (filters_run / "model.npz").is_file() and not filters_run.is_file():
        fail(f"--filters-run {filters_run}: no model file there")
    wanted = set(args.figures)
    run_list = Path(args.fig3_runs) if args.fig3_runs else DEFAULT_RUN_LIST
    if 3 in wanted:
        if args.fig3_runs and not run_list.is_file():
            fail(f"--fig3-runs {run_list}: no such file")
        if not run_list.is_file():
            run_list = None  # the default list is missing: Figure 3 is skipped with a line
        else:
            try:
                read_run_list(run_list)
            except ValueError as e:
                fail(f"--fig3-runs {e}")
    try:
        check_writable_folder(out)
    except OSError as e:
        fail(f"cannot write to --out {out}: {e}")
    found = None
    if runs.is_dir() and 4 in wanted:
        found = scan_runs(runs)
    if 3 in wanted:
        figure3(runs, run_list, out, args.band)
    if 4 in wanted:
        figure4(runs, found, out, filters_run)
    if 5 in wanted:
        figure5(out)
    if wanted & {6, 7}:
        timing = memory = None
        if not bench.is_file():
            why = f"no benchmark file {bench} (write one with `python -m engine.bench layers --memory --json FILE`)"
        else:
            try:
                timing, memory = read_bench(bench)
            except ValueError as e:
                why = str(e)
        for n, draw in ((6, lambda: figure6(bench, memory, out)), (7, lambda: figure7(bench, timing, out))):
            if n in wanted:
                draw() if timing is not None else skip(n, why)
    return 0


if __name__ == "__main__":
    sys.exit(main())

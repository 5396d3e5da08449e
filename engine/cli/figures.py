"""Draw the paper's Figures 3 to 7 from run folders, model files and the layer benchmark.

    python -m engine.figures --runs docs/runs --out docs/figures [--bench docs/bench-layers.json]

Each figure is a PNG beside the file holding the numbers it was drawn from (same stem):

  fig3-accuracy.png / .csv   train and test accuracy per epoch, baseline vs flattened, per data set:
                             run folders of train.py grouped by their settings except the seed (runs
                             that differ only in the seed are averaged: a line for the mean and a band
                             for their spread; a run alone is a line with markers; a run in
                             progress, short of its epochs with checkpoint.npz kept, is left out)
  fig4-filters.png / .npy    first-layer filters of a --flatten-first CIFAR-10 run, rebuilt as 3D
                             filters from the 1D ones (engine.filters), sorted by variance
  fig5-params.png / .csv     parameter reduction of one layer (3D weights / flattened weights) against
                             the channel ratio F/C, counted as engine.Flattened builds the layer, with
                             Table 1's layers 2 and 3 marked
  fig6-memory.png / .csv     extra memory of one baseline and one flattened layer, forward and
                             backward: measured beside the theory (`bench layers --memory --json F`)
  fig7-speedup.png / .csv    speed-up of the flattened over the baseline layer (baseline ms /
                             flattened ms), forward and backward, per image size (`bench layers --json F`)

A figure whose inputs are missing is skipped with a line saying why; a run folder whose
settings or log cannot be read is skipped with a warning. Every file written is printed.
"""
import argparse
import csv
import json
import math
import sys
import textwrap
from pathlib import Path

import numpy as np

from models.recipes import complete_settings, setting_text

from ..npzfile import check_writable_folder
from ..trainer import CHECKPOINT_FILE

# Settings that do not change what a run trains (train.py's RUN_OPTIONS, the seed, the planned
# epochs and the recipe's name, whose values are settings of their own): runs that differ only in these are samples of the same experiment.
NOT_THE_EXPERIMENT = ("seed", "epochs", "recipe", "data_dir", "cache_dir", "no_download", "eval_batch_size", "backend",
                      "threads", "plot", "quiet", "step", "zca_storage", "compress_model")
# Table 1 of the paper: the two flattened layers (C input channels, F filters, k x k) and their weights.
TABLE1 = (("layer 2", 96, 128, 5, 307200, 30912), ("layer 3", 128, 256, 5, 819200, 102144))
FIGURES = (3, 4, 5, 6, 7)


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


def group_runs(runs_with_logs):
    """Runs grouped by (dataset, model, the other settings but the seed): [dict(dataset, model, label, runs)].

    Groups of one dataset and model that differ in other settings get those settings in their label."""
    groups = {}
    for folder, settings, log in runs_with_logs:
        key = (settings["dataset"], settings["model"], experiment_key(settings))
        groups.setdefault(key, []).append((folder, settings, log))
    out = []
    for (dataset, model, key), members in sorted(groups.items()):
        siblings = [json.loads(k) for d, m, k in groups if (d, m) == (dataset, model)]
        mine = json.loads(key)
        differs = sorted(k for k in set().union(*siblings) if any(s.get(k) != mine.get(k) for s in siblings))
        setting = ", ".join(f"{k} {setting_text(mine.get(k))}" for k in differs)
        out.append(dict(dataset=dataset, model=model, setting=setting, runs=members))
    return out


def aggregate(members):
    """Per epoch: n, and mean, sample std (0 for one run), min, max of train and test accuracy in percent."""
    epochs = sorted({r["epoch"] for _, _, log in members for r in log})
    rows = []
    for e in epochs:
        row = dict(epoch=e)
        for what in ("train_acc", "test_acc"):
            v = np.array([100.0 * r[what] for _, _, log in members for r in log if r["epoch"] == e])
            row["n"] = len(v)
            row[what] = dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0,
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


def figure3(runs, found, out, band):
    if found is None:
        return skip(3, f"no run folder {runs}")
    usable, running = [], 0
    for folder, settings in found:
        try:
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
        usable.append((folder, settings, log))
    if not usable:
        return skip(3, f"no run folder in {runs} has readable settings.json and log.jsonl"
                       f"{f' and is finished ({running} in progress)' if running else ''}")
    groups = group_runs(usable)
    csv_path, png_path = out / "fig3-accuracy.csv", out / "fig3-accuracy.png"
    rows = []
    for g in groups:
        g["label"] = (g["model"] + (f" ({g['setting']})" if g["setting"] else "")
                      + (f": mean of {len(g['runs'])} runs" if len(g["runs"]) > 1 else f": {g['runs'][0][0].name}"))
        g["rows"] = aggregate(g["runs"])
        names = " ".join(folder.name for folder, _, _ in g["runs"])
        seeds = " ".join(str(s.get("seed")) for _, s, _ in g["runs"])
        for r in g["rows"]:
            rows.append([g["dataset"], g["model"], g["setting"], names, seeds, r["epoch"], r["n"]]
                        + [r[w][s] for w in ("train_acc", "test_acc") for s in ("mean", "std", "min", "max")])
    write_csv(csv_path, ["dataset", "model", "setting", "runs", "seeds", "epoch", "n"]
              + [f"{w}_{s}_pct" for w in ("train_acc", "test_acc") for s in ("mean", "std", "min", "max")], rows)

    plt = pyplot()
    from matplotlib.ticker import MaxNLocator
    per_dataset = {d: [g for g in groups if g["dataset"] == d] for d in sorted({g["dataset"] for g in groups})}
    heights = [max(4.6, 0.62 * len(mine)) for mine in per_dataset.values()]  # room for the row's legend
    fig, axes = plt.subplots(len(per_dataset), 3, figsize=(18, sum(heights)), squeeze=False,
                             gridspec_kw=dict(width_ratios=(1, 1, 0.8), height_ratios=heights))  # third: legend
    band_text = "±1 standard deviation (n-1)" if band == "std" else "min to max"
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if max(map(len, per_dataset.values())) > len(colours):  # no two lines of a row share a colour
        colours = [c for name in ("tab20", "tab20b", "tab20c") for c in plt.get_cmap(name).colors]  # 60
    for row, (dataset, mine) in zip(axes, per_dataset.items()):
        for ax, what, title in zip(row, ("train_acc", "test_acc"), ("training", "test")):
            for i, g in enumerate(mine):
                colour = colours[i % len(colours)]
                x = np.array([r["epoch"] for r in g["rows"]])
                mean = np.array([r[what]["mean"] for r in g["rows"]])
                style = "--" if g["model"] == "baseline" else "-"
                several = len(g["runs"]) > 1
                label = textwrap.fill(g["label"] + (" (shaded: the spread)" if several else ""), 60,
                                      subsequent_indent="  ")
                ax.plot(x, mean, style, color=colour, label=label, linewidth=1.5,
                        marker=None if several and len(x) > 1 else "o", markersize=4)
                if several:
                    if band == "std":
                        lo = mean - [r[what]["std"] for r in g["rows"]]
                        hi = mean + [r[what]["std"] for r in g["rows"]]
                    else:
                        lo = np.array([r[what]["min"] for r in g["rows"]])
                        hi = np.array([r[what]["max"] for r in g["rows"]])
                    if len(x) > 1:
                        ax.fill_between(x, lo, hi, color=colour, alpha=0.25, linewidth=0)
                    else:  # one epoch: a band would be invisible
                        ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], color=colour, capsize=4, fmt="none")
            ax.set_title(f"{dataset}: {title} accuracy")
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"{title} accuracy (%)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            ax.grid(alpha=0.3)
        row[2].axis("off")
        row[2].legend(*row[1].get_legend_handles_labels(), fontsize=7, loc="center left", frameon=False,
                      title=dataset, title_fontsize=8)
    fig.suptitle("Figure 3: accuracy per epoch, baseline (dashed) vs flattened (solid); runs differing only in "
                 f"the seed are averaged (line: mean, shade: {band_text})", fontsize=10)
    fig.tight_layout()
    save_figure(fig, png_path)


# ----------------------------------------------------------------------------- Figure 4

def figure4(runs, found, out, chosen=None):
    """The first layer's filters of a --flatten-first CIFAR-10 run (the best final test accuracy if several)."""
    from ..filters import reconstruct
    from .filters import draw
    from ..inference import ModelFileError, load
    from ..layers import Flattened
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


def figure7(bench, timing, out):
    engine_rows = [r for r in timing if not r["backend"].startswith("torch")]
    if not engine_rows:
        return skip(7, f"{bench} has no timing records of the engine's layers")
    medians = {}
    for r in engine_rows:
        medians.setdefault((r["backend"], r.get("batch"), r["size"], r["pass"], r["layer"]), []).append(r["median_ms"])
    rows = []
    for (backend, batch, size, pas, layer), ms in sorted(medians.items(), key=lambda kv: str(kv[0])):
        if layer != "baseline" or (backend, batch, size, pas, "flattened") not in medians:
            continue
        base = float(np.median(ms))
        flat = float(np.median(medians[(backend, batch, size, pas, "flattened")]))
        rows.append([backend, batch, size, pas, base, flat, base / flat])
    if not rows:
        return skip(7, f"{bench} has no size timed for both the baseline and the flattened layer")
    rows.sort(key=lambda r: (r[0], str(r[1]), r[3], r[2]))
    write_csv(out / "fig7-speedup.csv", ["backend", "batch", "size", "pass", "baseline_ms", "flattened_ms",
                                         "speedup"], rows)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    lines = sorted({(r[0], r[1]) for r in rows}, key=str)
    batches = {b for _, b in lines}
    for ax, pas in zip(axes, ("forward", "backward")):
        for i, (backend, batch) in enumerate(lines):
            mine = sorted((r for r in rows if (r[0], r[1], r[3]) == (backend, batch, pas)), key=lambda r: r[2])
            if mine:
                ax.plot([r[2] for r in mine], [r[6] for r in mine], "-o", color=f"C{i % 10}",
                        label=f"engine, {backend}" + (f", batch {batch}" if len(batches) > 1 else ""))
                for r in mine:
                    ax.annotate(f"{r[6]:.1f}x", (r[2], r[6]), textcoords="offset points", xytext=(0, 6),
                                ha="center", fontsize=7)
        ax.axhline(1, color="grey", linewidth=0.8)
        sizes = sorted({r[2] for r in rows})
        ax.set_xticks(sizes, [f"{s}x{s}" for s in sizes])
        ax.set_ylim(0, 1.12 * max(r[6] for r in rows))  # room for the labels above the points
        ax.set_title(f"{pas} pass")
        ax.set_xlabel("input image size (pixels)")
        ax.set_ylabel("speed-up (baseline time / flattened time)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    batch = f", batch {next(iter(batches))}" if len(batches) == 1 else ""
    fig.suptitle(f"Figure 7: speed-up of one flattened layer over the baseline convolution{batch} "
                 f"(medians from {Path(bench).name})", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out / "fig7-speedup.png")


# ----------------------------------------------------------------------------- CLI

def figure_list(s):
    try:
        v = sorted({int(x) for x in s.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected figure numbers such as 3,5,7, got {s!r}") from None
    if not v or not set(v) <= set(FIGURES):
        raise argparse.ArgumentTypeError(f"expected figure numbers among {','.join(map(str, FIGURES))}, got {s!r}")
    return v


def parser():
    p = argparse.ArgumentParser(prog="python -m engine.figures", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="docs/runs",
                   help="folder of train.py run folders (each with settings.json and log.jsonl; model.npz for "
                        "Figure 4). Default: docs/runs. Missing: Figures 3 and 4 are skipped")
    p.add_argument("--out", default="docs/figures",
                   help="folder to write the figures and their data files into (created if missing). "
                        "Default: docs/figures")
    p.add_argument("--bench", default="docs/bench-layers.json",
                   help="JSON records of `python -m engine.bench layers --json F` (add --memory for Figure 6). "
                        "Default: docs/bench-layers.json. Missing: Figures 6 and 7 are skipped")
    p.add_argument("--band", choices=["std", "minmax"], default="std",
                   help="Figure 3's shade around the mean of runs differing only in the seed: +-1 sample standard "
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
        raise SystemExit("error: drawing the figures needs matplotlib: pip install matplotlib "
                         "(or pip install -e '.[plot]')") from None
    out, runs, bench = Path(args.out), Path(args.runs), Path(args.bench)
    if runs.exists() and not runs.is_dir():
        raise SystemExit(f"error: --runs {runs} is a file, not a folder of run folders")
    if bench.is_dir():
        raise SystemExit(f"error: --bench {bench} is a folder, not a benchmark JSON file")
    filters_run = Path(args.filters_run) if args.filters_run else None
    if filters_run is not None and not (filters_run / "model.npz").is_file() and not filters_run.is_file():
        raise SystemExit(f"error: --filters-run {filters_run}: no model file there")
    try:
        check_writable_folder(out)
    except OSError as e:
        raise SystemExit(f"error: cannot write to --out {out}: {e}") from None
    wanted = set(args.figures)
    found = None
    if runs.is_dir() and wanted & {3, 4}:
        found = scan_runs(runs)
    if 3 in wanted:
        figure3(runs, found, out, args.band)
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

#!/usr/bin/env python
"""Side-by-side figures of two or more train.py runs, from their log.jsonl: the numbers that
docs/results.md quotes when it compares runs.

    python docs/compare_runs.py docs/runs/long-flattened-cifar10 docs/runs/wd5e-4-flattened-cifar10 \\
        --epochs 1,10,20,30,40,41,44,48,52,56,60 --ranges 21-40,41-60 --loss

prints a Markdown table (per chosen epoch: the first run's lr and each run's train and test
accuracy, and with --loss its test loss), followed by each run's mean test and train accuracy over
each range of epochs, its best test accuracy, and the first epoch at which it reached each --reach
accuracy; with --final, its last epoch's test accuracy (with --spread also the mean and standard
deviation of those over the runs: seeds of one setting); with --speed, its wall time, images/s and
seconds per epoch, over the whole run and over each range (a run continued on another machine has
one range per machine).

docs/results.json holds the arguments of every comparison docs/results.md quotes, with the figures
this prints for them (tests/test_compare_runs.py runs each one).
"""
import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.cli.figures import read_log  # noqa: E402


def _ints(s):
    return [int(v) for v in s.split(",") if v]


def _ranges(s):
    return [tuple(int(v) for v in r.split("-")) for r in s.split(",") if r]


def _speed(recs):
    """Wall time (training and evaluation) and min, median, max of images/s and seconds per epoch."""
    recs = list(recs)
    rate, secs = [r["images_per_s"] for r in recs], [r["seconds"] for r in recs]
    minutes = sum(r["seconds"] + r["eval_seconds"] for r in recs) / 60
    return (f"{minutes:.0f} min; images/s {min(rate):,.0f}, {statistics.median(rate):,.0f}, {max(rate):,.0f}; "
            f"s/epoch {min(secs):.0f}, {statistics.median(secs):.0f}, {max(secs):.0f} (min, median, max)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each with log.jsonl)")
    p.add_argument("--epochs", type=_ints, default=None, help="epochs for the table, e.g. 1,10,40 (default: all)")
    p.add_argument("--ranges", type=_ranges, default=[], help="epoch ranges for the means, e.g. 1-10,41-60")
    p.add_argument("--reach", type=_ints, default=[], help="test accuracies in %% whose first epoch to print, e.g. 80")
    p.add_argument("--loss", action="store_true", help="add each run's test loss to the table")
    p.add_argument("--final", action="store_true",
                   help="print each run's last logged epoch and its test accuracy")
    p.add_argument("--spread", action="store_true",
                   help="--final, and the mean and standard deviation (n-1) of those accuracies over the runs "
                        "(two or more seeds of one setting)")
    p.add_argument("--speed", action="store_true",
                   help="print each run's wall time (training and evaluation, minutes), images/s and seconds per "
                        "epoch of training (min, median, max), over the whole run and over each --ranges range")
    args = p.parse_args(argv)
    args.final = args.final or args.spread
    try:
        logs = [{r["epoch"]: r for r in read_log(run)} for run in args.runs]
    except ValueError as e:
        sys.exit(f"error: {e}")
    names = [run.name for run in args.runs]
    common = sorted(set.intersection(*(set(log) for log in logs)))
    epochs = [e for e in (args.epochs or common) if e in common]
    header = ["epoch", "lr"] + [f"{k}, {n}" for n in names for k in ("train", "test")]
    header += [f"test loss, {n}" for n in names] if args.loss else []
    print("| " + " | ".join(header) + " |")
    print("|" + "---:|" * len(header))
    for e in epochs:
        row = [str(e), f"{logs[0][e]['lr']:.2g}"]
        row += [f"{100 * log[e][k]:.2f}%" for log in logs for k in ("train_acc", "test_acc")]
        row += [f"{log[e]['test_loss']:.3f}" for log in logs] if args.loss else []
        print("| " + " | ".join(row) + " |")
    print()
    for name, log in zip(names, logs):
        # each --ranges range as its records, labelled by its first asked-for and last logged epoch
        spans = [(f"epochs {lo}-{recs[-1]['epoch']}", recs) for lo, hi in args.ranges
                 if (recs := [log[e] for e in range(lo, hi + 1) if e in log])]
        parts = [f"final test {100 * log[max(log)]['test_acc']:.2f}% (epoch {max(log)})"] if args.final else []
        parts += [f"{label}: mean test {100 * statistics.mean(r['test_acc'] for r in recs):.2f}%"
                 f", train {100 * statistics.mean(r['train_acc'] for r in recs):.2f}%" for label, recs in spans]
        best = max(log.values(), key=lambda r: r["test_acc"])
        parts.append(f"best test {100 * best['test_acc']:.2f}% (epoch {best['epoch']})")
        for t in args.reach:
            first = next((e for e in sorted(log) if 100 * log[e]["test_acc"] >= t), None)
            parts.append(f"{t}% first at epoch {first}" if first else f"{t}% not reached")
        print(f"{name}: " + "; ".join(parts))
        if args.speed:
            print(f"{name}: {_speed(log.values())}")
            for label, recs in spans:
                print(f"{name}: {label}: {_speed(recs)}")
    if args.spread and len(logs) > 1:
        finals = [100 * log[max(log)]["test_acc"] for log in logs]
        print(f"final test, {len(finals)} runs: mean {statistics.mean(finals):.2f}%, sd {statistics.stdev(finals):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The recipe's elements beyond the paper's SGD: label smoothing, learning-rate warm-up and cosine decay, an
average of the weights; each against a plain reference, and a run using all of them resumed exactly."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from formats import write_mnist

from engine.checkpoint import checkpoint_weights, load_checkpoint
from engine.losses import SoftmaxCrossEntropy
from engine.optim import Lookahead, WeightAverage, scheduled_lr, sgd_momentum
from engine.trainer import Trainer
from models.paper import build

ROOT = Path(__file__).resolve().parents[1]


def smoothed_loss_reference(logits, labels, e):
    """Plain loops in float64: -sum_k q_k log softmax_k, q = (1-e) onehot + e/K, averaged over the batch."""
    n, k = logits.shape
    total = 0.0
    for i in range(n):
        row = [float(v) for v in logits[i]]
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        for j in range(k):
            q = (1 - e) * (j == labels[i]) + e / k
            total -= q * (row[j] - lse)
    return total / n


@pytest.mark.parametrize("e", [0.0, 0.1, 0.5])
def test_label_smoothed_loss_and_gradient_against_plain_loops_and_finite_differences(e):
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((5, 7)) * 3).astype(np.float64)
    labels = rng.integers(0, 7, 5)
    fn = SoftmaxCrossEntropy(smoothing=e)
    assert fn(logits, labels) == pytest.approx(smoothed_loss_reference(logits, labels, e), rel=1e-12)
    grad = fn.backward()
    h, fd = 1e-6, np.zeros_like(logits)
    for idx in np.ndindex(*logits.shape):
        up, down = logits.copy(), logits.copy()
        up[idx] += h
        down[idx] -= h
        fd[idx] = (smoothed_loss_reference(up, labels, e) - smoothed_loss_reference(down, labels, e)) / (2 * h)
    np.testing.assert_allclose(grad, fd, atol=1e-8)
    # a confident right answer (p ~ 1) is still pulled back towards the target 1 - e + e/3: its gradient is 2e/3
    sure = np.array([[30.0, 0, 0]])
    g = SoftmaxCrossEntropy(smoothing=e)
    g(sure, np.array([0]))
    assert g.backward()[0, 0] == pytest.approx(2 * e / 3, abs=1e-9)


def test_label_smoothing_outside_its_range_is_refused():
    for e in (-0.1, 1.0):
        with pytest.raises(ValueError, match="smoothing must lie in"):
            SoftmaxCrossEntropy(smoothing=e)


def test_schedules_at_their_boundaries():
    def lr(epoch, step, **kw):
        return scheduled_lr(0.1, epoch, step, steps_per_epoch=10, epochs=5, **kw)
    # linear warm-up over 2 epochs = 20 updates: update t takes (t + 1) / 20 of the rate, then the schedule
    assert lr(0, 0, warmup_epochs=2) == pytest.approx(0.1 / 20)
    assert lr(1, 9, warmup_epochs=2) == pytest.approx(0.1)
    assert lr(2, 0, warmup_epochs=2) == pytest.approx(0.1)
    assert lr(0, 0, warmup_epochs=0.3) == pytest.approx(0.1 / 3)  # 3 updates of warm-up
    # the stepped rate: x0.1 from each drop epoch on, the warm-up scaling the updates inside it
    assert [lr(e, 0, drop_epochs=[2, 4]) for e in range(5)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])
    assert lr(0, 4, drop_epochs=[0], warmup_epochs=1) == pytest.approx(0.01 * 5 / 10)
    # cosine over the 30 updates after a 2-epoch warm-up: full rate after the warm-up, half at the middle,
    # down towards 0 at the last update
    c = dict(schedule="cosine", warmup_epochs=2)
    assert lr(2, 0, **c) == pytest.approx(0.1)
    assert lr(3, 5, **c) == pytest.approx(0.05)
    assert lr(4, 9, **c) == pytest.approx(0.05 * (1 + math.cos(math.pi * 29 / 30)))
    assert lr(0, 0, schedule="cosine") == pytest.approx(0.1)
    rates = [lr(e, s, schedule="cosine") for e in range(5) for s in range(10)]
    assert all(a > b for a, b in zip(rates, rates[1:])) and rates[-1] > 0
    # linear over the 30 updates after the warm-up: full rate first, 0.1 * (30 - u) / 30 at update u after it,
    # 0.1 / 30 at the last; without warm-up over all 50 updates
    c = dict(schedule="linear", warmup_epochs=2)
    assert lr(1, 9, **c) == pytest.approx(0.1)
    assert lr(2, 0, **c) == pytest.approx(0.1)
    assert lr(3, 5, **c) == pytest.approx(0.05)
    assert lr(4, 9, **c) == pytest.approx(0.1 / 30)
    rates = [lr(e, s, schedule="linear") for e in range(5) for s in range(10)]
    assert rates == pytest.approx([0.1 * (50 - u) / 50 for u in range(50)])
    with pytest.raises(ValueError, match="unknown schedule"):
        lr(0, 0, schedule="exponential")


def test_weight_average_against_hand_computed_steps_and_swapping():
    w = {"a.weight": np.array([1.0, 2.0], np.float32), "a.bias": np.array([0.0], np.float32)}
    avg = WeightAverage(w, 0.9)
    w["a.weight"][...] = [2.0, 0.0]
    avg.update(w)
    np.testing.assert_allclose(avg.average["a.weight"], [0.9 * 1 + 0.1 * 2, 0.9 * 2 + 0.1 * 0], rtol=1e-6)
    w["a.weight"][...] = [3.0, 1.0]
    avg.update(w)
    np.testing.assert_allclose(avg.average["a.weight"], [0.9 * 1.1 + 0.1 * 3, 0.9 * 1.8 + 0.1 * 1], rtol=1e-6)
    buffer = w["a.weight"]
    with avg.swapped_in(w):
        assert w["a.weight"] is buffer  # the same buffers: compiled code holding their addresses sees the average
        np.testing.assert_allclose(w["a.weight"], [1.29, 1.72], rtol=1e-6)
    np.testing.assert_array_equal(w["a.weight"], [3.0, 1.0])
    with pytest.raises(ValueError, match="decay must lie in"):
        WeightAverage(w, 1.0)


def test_nesterov_momentum_against_hand_computed_steps():
    """w -= lr (d + momentum v), v = momentum v + d (v = d at first), d = g + decay w on weights only."""
    w = {"a.weight": np.array([1.0, -2.0], np.float32), "a.bias": np.array([0.5], np.float32)}
    g = {"a.weight": np.array([0.5, 0.25], np.float32), "a.bias": np.array([1.0], np.float32)}
    v = {}
    sgd_momentum(w, g, v, 0.1, 0.9, 0.1, 0.0, nesterov=True)
    # weight: d = (0.6, 0.05), v = d, w = (1 - 0.1 * 1.9 * 0.6, -2 - 0.1 * 1.9 * 0.05); bias: d = 1, no decay
    np.testing.assert_allclose(v["a.weight"], [0.6, 0.05], rtol=1e-6)
    np.testing.assert_allclose(w["a.weight"], [0.886, -2.0095], rtol=1e-6)
    np.testing.assert_allclose(w["a.bias"], [0.5 - 0.19], rtol=1e-6)
    sgd_momentum(w, g, v, 0.1, 0.9, 0.1, 0.0, nesterov=True)
    # weight: d = (0.5 + 0.0886, 0.25 - 0.20095), v = 0.9 (0.6, 0.05) + d, w -= 0.1 (d + 0.9 v)
    d = np.array([0.5886, 0.04905])
    vv = np.array([0.54 + 0.5886, 0.045 + 0.04905])
    np.testing.assert_allclose(v["a.weight"], vv, rtol=1e-6)
    np.testing.assert_allclose(w["a.weight"], np.array([0.886, -2.0095]) - 0.1 * (d + 0.9 * vv), rtol=1e-6)
    np.testing.assert_allclose(w["a.bias"], [0.31 - 0.1 * (1.0 + 0.9 * 1.9)], rtol=1e-6)
    # plain momentum from the same state steps by lr v only: the two rules differ
    plain_w, plain_v = {k: a.copy() for k, a in w.items()}, {k: a.copy() for k, a in v.items()}
    sgd_momentum(plain_w, g, plain_v, 0.1, 0.9, 0.0, 0.0)
    np.testing.assert_allclose(plain_w["a.bias"], w["a.bias"] - 0.1 * (0.9 * 1.9 + 1.0), rtol=1e-6)
    for damp, momentum in ((None, 0.9), (0.5, 0.9), (0.0, 0.0)):  # Torch7's and PyTorch's condition
        with pytest.raises(ValueError, match="Nesterov momentum needs"):
            sgd_momentum(w, g, v, 0.1, momentum, 0.0, damp, nesterov=True)


def test_lookahead_against_hand_computed_steps_and_swapping():
    w = {"a.weight": np.array([1.0, 2.0], np.float32)}
    look = Lookahead(w, 2, 0.25)
    w["a.weight"][...] = [3.0, 0.0]
    look.update(w, 1)  # not a multiple of k: nothing moves
    np.testing.assert_array_equal(look.slow["a.weight"], [1.0, 2.0])
    np.testing.assert_array_equal(w["a.weight"], [3.0, 0.0])
    with look.swapped_in(w):  # evaluation sees the slow weights
        np.testing.assert_array_equal(w["a.weight"], [1.0, 2.0])
    np.testing.assert_array_equal(w["a.weight"], [3.0, 0.0])
    w["a.weight"][...] = [5.0, -2.0]
    look.update(w, 2)  # slow += 0.25 (w - slow) = (2, 1); the weights restart from it
    np.testing.assert_array_equal(look.slow["a.weight"], [2.0, 1.0])
    np.testing.assert_array_equal(w["a.weight"], [2.0, 1.0])
    w["a.weight"][...] = [6.0, 1.0]
    look.update(w, 3)
    look.update(w, 4)  # (2, 1) + 0.25 (4, 0)
    np.testing.assert_array_equal(w["a.weight"], [3.0, 1.0])
    for k, alpha in ((0, 0.5), (2.0, 0.5), (2, 0.0), (2, 1.5)):
        with pytest.raises(ValueError, match="lookahead: "):
            Lookahead(w, k, alpha)


def _data(n=64):
    rng = np.random.default_rng(0)
    return dict(train_x=rng.standard_normal((n, 1, 28, 28)).astype(np.float32), train_y=rng.integers(0, 10, n),
                test_x=rng.standard_normal((16, 1, 28, 28)).astype(np.float32), test_y=rng.integers(0, 10, 16))


def _trainer(data, out, schedule="cosine"):
    cfg = dict(epochs=3, batch_size=16, lr=0.05, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-4,
               lr_drop_epochs=[], seed=1, lookahead=3, lookahead_alpha=0.5, schedule=schedule, warmup_epochs=0.5,
               label_smoothing=0.1, ema=0.8, augment="flip,crop2")
    return Trainer(build("flattened", (1, 28, 28), 10, seed=1), data, cfg, out, log=lambda m: None, progress=False)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_a_run_with_every_element_interrupted_and_resumed_equals_the_uninterrupted_one(tmp_path, schedule):
    data = _data()
    straight = _trainer(data, tmp_path / "a", schedule)
    assert straight.run() == "done"

    def stop(t):
        if (t.epoch, t.step_in_epoch) in ((0, 1), (1, 3), (2, 2)):
            t.stop_requested = True  # what Ctrl-C does

    t = _trainer(data, tmp_path / "b", schedule)
    t.on_step = stop
    while t.run() == "interrupted":
        t = _trainer(data, tmp_path / "b", schedule)
        t.on_step = stop
        t.resume()
    for name, w in straight.model.params.items():
        np.testing.assert_array_equal(w, t.model.params[name], err_msg=name)
        np.testing.assert_array_equal(straight.average.average[name], t.average.average[name], err_msg=name)
        np.testing.assert_array_equal(straight.lookahead.slow[name], t.lookahead.slow[name], err_msg=name)
    assert straight.history == [dict(h, seconds=s["seconds"], images_per_s=s["images_per_s"],
                                     eval_seconds=s["eval_seconds"]) for h, s in zip(t.history, straight.history)]
    # the rate of each epoch's first update follows the schedule over the 10 updates after half an epoch (2 updates)
    # of warm-up
    decayed = {"cosine": lambda u: 0.5 * (1 + math.cos(math.pi * u / 10)), "linear": lambda u: (10 - u) / 10}[schedule]
    assert [h["lr"] for h in straight.history] == pytest.approx([0.05 / 2, 0.05 * decayed(2), 0.05 * decayed(6)])
    # evaluation saw the average, not the last weights: the trainer's evaluation on the average agrees
    from engine.trainer import evaluate
    with straight.final_weights():
        on_average = evaluate(straight.model, data["test_x"], data["test_y"])
    on_weights = evaluate(straight.model, data["test_x"], data["test_y"])
    assert on_average == (straight.history[-1]["test_loss"], straight.history[-1]["test_acc"])
    assert on_weights[0] != on_average[0]
    params, _, _, _, average, slow = load_checkpoint(tmp_path / "a" / "checkpoint.npz")
    assert all(np.array_equal(slow[k], straight.lookahead.slow[k]) for k in params)
    assert not all(np.array_equal(params[k], average[k]) for k in params)
    chosen, _ = checkpoint_weights(tmp_path / "a" / "checkpoint.npz")
    assert all(np.array_equal(chosen[k], average[k]) for k in params)  # a model from the checkpoint: the average


def test_the_trainer_steps_by_nesterov_momentum_when_asked(tmp_path):
    data = _data(32)
    runs = []
    for nesterov in (False, True):
        cfg = dict(epochs=1, batch_size=16, lr=0.05, momentum=0.9, dampening=0.0, nesterov=nesterov,
                   weight_decay=0, lr_drop_epochs=[], seed=1)
        t = Trainer(build("flattened", (1, 28, 28), 10, seed=1), data, cfg, tmp_path / str(nesterov),
                    log=lambda m: None, progress=False)
        t.run()
        runs.append(t.model.params)
    # the first update is lr d either way (v = d) for plain momentum, lr (1 + momentum) d for Nesterov's
    assert all(not np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])


def _lookahead_run(data, out, k, epochs=1):
    cfg = dict(epochs=epochs, batch_size=16, lr=0.05, momentum=0.9, weight_decay=0, lr_drop_epochs=[], seed=1,
               lookahead=k, lookahead_alpha=0.5)
    t = Trainer(build("flattened", (1, 28, 28), 10, seed=1), data, cfg, out, log=lambda m: None, progress=False)
    start = {name: w.copy() for name, w in t.model.params.items()}
    assert t.run() == "done"
    return t, start


def test_the_trainer_syncs_lookahead_every_k_updates_and_evaluates_the_slow_weights(tmp_path):
    from engine.trainer import evaluate
    data = _data(32)  # 2 updates an epoch
    plain, start = _lookahead_run(data, tmp_path / "plain", 0)
    synced, _ = _lookahead_run(data, tmp_path / "synced", 2)
    waiting, _ = _lookahead_run(data, tmp_path / "waiting", 3)
    for name, w in plain.model.params.items():
        # update 2 synced: the slow weights (the start) moved half way to the plain run's, the weights with them
        want = start[name] + (w - start[name]) * np.float32(0.5)
        np.testing.assert_array_equal(synced.model.params[name], want, err_msg=name)
        np.testing.assert_array_equal(synced.lookahead.slow[name], want, err_msg=name)
        # no sync yet: the weights are the plain run's, the slow weights still the start
        np.testing.assert_array_equal(waiting.model.params[name], w, err_msg=name)
        np.testing.assert_array_equal(waiting.lookahead.slow[name], start[name], err_msg=name)
    # evaluation saw the slow weights: the start's accuracy and loss, not the weights'
    with waiting.final_weights():
        on_slow = evaluate(waiting.model, data["test_x"], data["test_y"])
    assert (waiting.history[-1]["test_loss"], waiting.history[-1]["test_acc"]) == on_slow
    assert on_slow[0] != plain.history[-1]["test_loss"]
    chosen, _ = checkpoint_weights(tmp_path / "waiting" / "checkpoint.npz")
    assert all(np.array_equal(chosen[k], start[k]) for k in start)  # a model made from it: the slow weights


def test_a_checkpoint_without_slow_weights_does_not_resume_a_run_with_lookahead(tmp_path):
    data = _data(32)
    _lookahead_run(data, tmp_path, 0)
    cfg = dict(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=0, lr_drop_epochs=[], seed=1,
               lookahead=2)
    t = Trainer(build("flattened", (1, 28, 28), 10, seed=1), data, cfg, tmp_path, log=lambda m: None, progress=False)
    with pytest.raises(Exception, match="holds no slow weights, the run keeps them"):
        t.resume()


def test_a_checkpoint_without_the_average_does_not_resume_a_run_that_keeps_one(tmp_path):
    data = _data(32)
    plain = Trainer(build("flattened", (1, 28, 28), 10, seed=1), data,
                    dict(epochs=1, batch_size=16, lr=0.05, momentum=0.9, weight_decay=0, lr_drop_epochs=[], seed=1),
                    tmp_path, log=lambda m: None, progress=False)
    plain.run()
    keeps = _trainer(data, tmp_path)
    with pytest.raises(Exception, match="holds no average of the weights"):
        keeps.resume()


def train_py(*args):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_train_py_holds_out_a_validation_split_and_keeps_the_average_in_the_model_file(tmp_path):
    write_mnist(tmp_path / "data", np.random.default_rng(0), n_train=192, n_test=64, learnable=True)
    out = tmp_path / "run"
    r = train_py("--model", "flattened", "--dataset", "mnist", "--data-dir", tmp_path / "data", "--cache-dir",
                 tmp_path / "cache", "--quiet", "--no-plot", "--batch-size", "32", "--epochs", "2", "--out", out,
                 "--validation", "64", "--schedule", "cosine", "--warmup-epochs", "1", "--label-smoothing", "0.1",
                 "--ema", "0.9", "--nesterov", "--lookahead", "2", "--lookahead-alpha", "0.8")
    assert r.returncode == 0, r.stderr
    assert "momentum 0.9 (Nesterov), dampening 0," in r.stdout and "Lookahead k 2 alpha 0.8" in r.stdout
    assert "128 training, 64 validation" in r.stdout and "validation accuracy: " in r.stdout
    assert "lr decayed to 0 along a half cosine" in r.stdout and "weight average (EMA) 0.9" in r.stdout
    settings = json.loads((out / "settings.json").read_text())
    assert (settings["validation"], settings["schedule"], settings["ema"], settings["nesterov"], settings["lookahead"],
            settings["lookahead_alpha"]) == (64, "cosine", 0.9, True, 2, 0.8)
    import engine
    model = engine.load(out / "model.npz")
    assert "validation_accuracy" in model.meta["extra"] and "test_accuracy" not in model.meta["extra"]
    average = load_checkpoint(out / "checkpoint.npz")[4]
    for name, w in model.net.params.items():
        np.testing.assert_array_equal(w, average[name], err_msg=name)
    # the held-out images are the last 64 of the training set: evaluating the model on them repeats the log's figure
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    from engine.data import load_dataset
    data = load_dataset("mnist", tmp_path / "data", tmp_path / "cache")
    from engine.trainer import evaluate
    assert evaluate(model.net, data["train_x"][128:], data["train_y"][128:])[1] == log[-1]["test_acc"]
    made = subprocess.run([sys.executable, "-m", "engine.makemodel", out / "checkpoint.npz", tmp_path / "made.npz"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert made.returncode == 0 and f"(validation accuracy {100 * log[-1]['test_acc']:.2f}%)" in made.stdout, made
    for name, w in engine.load(tmp_path / "made.npz").net.params.items():  # the average, as the run's model file
        np.testing.assert_array_equal(w, average[name], err_msg=name)
    r = train_py("--out", out, "--resume", "--epochs", "3", "--no-nesterov")
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "error: --nesterov cannot change a run: --resume continues with the checkpoint's True (start another run "
        "with --out to change it)"], r.stderr
    r = train_py("--out", out, "--resume", "--epochs", "3", "--quiet", "--no-plot")
    assert r.returncode == 0 and "warning: the cosine schedule was planned over 2 epochs" in r.stderr, r.stderr
    r = train_py("--model", "flattened", "--dataset", "mnist", "--data-dir", tmp_path / "data", "--validation", "192",
                 "--out", tmp_path / "other", "--epochs", "1")
    assert r.returncode == 1 and "--validation 192 leaves no training images" in r.stderr
    for flags, message in ((["--ema", "1"], "in [0, 1)"), (["--label-smoothing", "-0.1"], "non-negative"),
                           (["--schedule", "exponential"], "invalid choice"), (["--lookahead", "-1"], "non-negative"),
                           (["--lookahead-alpha", "0"], "in (0, 1]")):
        r = train_py(*flags)
        assert r.returncode == 2 and message in r.stderr, r.stderr


def test_train_py_refuses_nesterov_with_dampening(tmp_path):
    r = train_py("--model", "flattened", "--dataset", "mnist", "--data-dir", tmp_path, "--recipe", "paper",
                 "--nesterov", "--out", tmp_path / "run")
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "error: --nesterov needs --momentum above 0 and --dampening 0 (this run: momentum 0.9, dampening Torch7's "
        "(= momentum))"], r.stderr


def test_train_py_decays_the_rate_along_a_line_with_schedule_linear(tmp_path):
    write_mnist(tmp_path / "data", np.random.default_rng(0), n_train=128, n_test=32, learnable=True)
    out = tmp_path / "run"
    r = train_py("--model", "flattened", "--dataset", "mnist", "--data-dir", tmp_path / "data", "--cache-dir",
                 tmp_path / "cache", "--quiet", "--no-plot", "--batch-size", "32", "--epochs", "4", "--lr", "0.02",
                 "--out", out, "--schedule", "linear")
    assert r.returncode == 0, r.stderr
    assert "lr decayed to 0 along a straight line" in r.stdout
    assert json.loads((out / "settings.json").read_text())["schedule"] == "linear"
    # 4 updates an epoch, 16 in all: each epoch's first update takes 0.02 * (16 - u) / 16
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [h["lr"] for h in log] == pytest.approx([0.02, 0.015, 0.01, 0.005])

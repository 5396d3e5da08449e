"""Data-parallel training over MPI (engine/distributed.py): the parts without MPI, then 2-rank jobs on this machine.

The MPI tests launch `mpirun -np 2 --oversubscribe` (loopback only, with the settings Open MPI
needs as root in a container) running tests/mpi_worker.py (a Trainer on in-memory data) or
train.py. They skip, with the reason, where mpirun or mpi4py is missing or a 2-rank job cannot
start; FLATNET_REQUIRE_MPI=1 (set by .ci/run when it installed MPI) makes that a failure.

What must agree between a 2-rank run and one process with the same global batch: with dropout
off (p = 0), the weights, momentum buffers and training losses after every step, to float32
summation-order tolerance (each rank sums its shard's gradients, the shards' sums are then
added). With dropout on, the ranks draw their own masks, so only the test accuracy after a few
epochs agrees, within the noise of 64 test images. A 1-rank MPI run equals a plain run exactly.

The last section runs jobs across hosts: network namespaces joined over TCP (tests/multihost.py),
one rank per host, as root; they skip with the reason where namespaces cannot be made.
"""
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import multihost
import numpy as np
import pytest
from formats import write_mnist

from engine import distributed
from engine.distributed import bucket_bounds, fingerprint, flatten_grads, launcher, shard_bounds
from engine.checkpoint import load_checkpoint
from engine.trainstep import make_step
from models.paper import build

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "mpi_worker.py"
MPI_ENV = dict(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",  # root in a container
               OMPI_MCA_btl_tcp_if_include="lo", OMPI_MCA_oob_tcp_if_include="lo",  # loopback only
               OMPI_MCA_btl_vader_single_copy_mechanism="none",  # no ptrace (CMA) between processes in containers
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
TIMEOUT = 120  # seconds for a job; a hang fails the test instead of blocking the suite


# ----------------------------------------------------------------------------- without MPI

def test_importing_the_engine_never_imports_mpi4py():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import engine, engine.trainer, engine.distributed, "
            "engine.trainstep, train; assert 'mpi4py' not in sys.modules, 'mpi4py imported'; print('ok')")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_launcher_detection(monkeypatch):
    for name in distributed.LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    assert launcher() is None
    monkeypatch.setenv("PMI_SIZE", "4")
    assert launcher() == "PMI_SIZE=4"
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert launcher() == "OMPI_COMM_WORLD_SIZE=2"


def test_train_py_under_a_launcher_without_mpi4py_says_how_to_install_it(tmp_path):
    """Launched by mpirun but mpi4py cannot be imported: a clear error on every rank, no training alone."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
                       "        if name == 'mpi4py' or name.startswith('mpi4py.'):\n"
                       "            raise ImportError('mpi4py blocked by the test')\n"
                       "sys.meta_path.insert(0, Block())\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}", OMPI_COMM_WORLD_SIZE="2")
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--dataset", "mnist", "--out", tmp_path / "run"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and "needs mpi4py" in r.stderr and "pip install '.[mpi]'" in r.stderr, r.stderr
    assert "OMPI_COMM_WORLD_SIZE=2" in r.stderr and not (tmp_path / "run").exists()


def test_shards_partition_every_batch():
    for m in range(1, 40):
        for size in range(1, 6):
            bounds = [shard_bounds(m, r, size) for r in range(size)]
            assert bounds[0][0] == 0 and bounds[-1][1] == m
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, in rank order
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1 and (m % size or len(set(sizes)) == 1)


@pytest.mark.parametrize("floats", [0, -1, 1, 40, 100, 10**6])
def test_buckets_tile_the_buffer_from_its_end_at_array_boundaries(floats):
    rng = np.random.default_rng(floats % 97)
    sizes = rng.integers(1, 60, 12)
    offsets = np.concatenate([[0], np.cumsum(-(-sizes // 16) * 16)[:-1]])  # 16-float aligned, as flatten_grads
    end = int(offsets[-1] + sizes[-1] + 5)  # and a tail
    spans = list(zip(offsets.tolist(), sizes.tolist()))
    b = bucket_bounds(spans[::-1], end, floats)  # any order of the spans
    assert b[0][1] == end and b[-1][0] == 0 and all(x[0] == y[1] for x, y in zip(b, b[1:]))  # from the end down
    assert all(lo < hi for lo, hi in b) and {lo for lo, _ in b[:-1]} <= set(offsets.tolist())
    if floats <= 0:
        assert b == [(0, end)]
    else:
        assert all(hi - lo >= floats for lo, hi in b[:-1])  # each at least `floats`, but the first's rest
        assert all(hi - lo - floats < 64 for lo, hi in b[:-1])  # cut at the first boundary past it
        assert len(b) == 1 or floats < end


def test_fingerprint_tells_data_apart():
    rng = np.random.default_rng(0)
    data = dict(train_x=rng.standard_normal((8, 1, 4, 4)).astype(np.float32), train_y=rng.integers(0, 10, 8),
                test_x=rng.standard_normal((3, 1, 4, 4)).astype(np.float32), test_y=rng.integers(0, 10, 3))
    same = {k: v.copy() for k, v in data.items()}
    assert fingerprint(same) == fingerprint(data)
    def changed(key, fn):
        other = {k: v.copy() for k, v in data.items()}
        other[key] = fn(other[key])
        return other
    assert fingerprint(changed("train_x", lambda a: a + np.float32(1e-6) * (np.arange(a.size) == 37).reshape(
        a.shape))) != fingerprint(data)  # one value, changed in its last bits
    assert fingerprint(changed("test_y", lambda a: (a + 1) % 10)) != fingerprint(data)
    assert fingerprint(changed("train_x", lambda a: a.reshape(8, 1, 2, 8))) != fingerprint(data)  # same bytes


@pytest.mark.parametrize("kind", ["compiled", "layers"])
def test_one_gradient_buffer_leaves_training_unchanged(kind):
    """The layers' gradient arrays become views of one buffer (before the step is built): the same
    steps give bitwise the same weights, and the buffer holds every gradient."""
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((8, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 8)
    plain, flat = build("flattened", (1, 28, 28), 10, seed=2), build("flattened", (1, 28, 28), 10, seed=2)
    buf, n = flatten_grads(flat)
    assert buf.dtype == np.float32 and buf.ctypes.data % 64 == 0 and len(buf) == n + distributed.TAIL
    grads = flat.grads
    assert all(np.shares_memory(g, buf) for g in grads.values())
    assert n >= sum(g.size for g in grads.values()) and n < sum(g.size for g in grads.values()) + 16 * len(grads)
    steps = [make_step(m, kind, 8)[0] for m in (plain, flat)]
    vel = [{}, {}]
    for _ in range(2):
        for step, v in zip(steps, vel):
            step.step(x, y, 0.05, 0.9, 1e-4, None, v)
    for name, w in plain.params.items():
        np.testing.assert_array_equal(w, flat.params[name], err_msg=name)
    assert abs(float(np.abs(buf[:n]).sum()) - sum(float(np.abs(g).sum()) for g in grads.values())) < 1e-3
    assert np.any(buf[:n] != 0)


# ----------------------------------------------------------------------------- with MPI

def _mpi_problem():
    if shutil.which("mpirun") is None:
        return "mpirun is not on the PATH (install Open MPI: apt-get install openmpi-bin libopenmpi-dev)"
    try:
        importlib.import_module("mpi4py")  # the package only: MPI starts with mpi4py.MPI, in the jobs
    except ImportError as e:
        return f"mpi4py is not installed (pip install '.[mpi]'): {e}"
    r = _mpirun(["-np", "2", sys.executable, "-c",
                 "from mpi4py import MPI; import numpy as np; c = MPI.COMM_WORLD; b = np.ones(3, np.float32); "
                 "c.Allreduce(MPI.IN_PLACE, b); assert c.size == 2 and b[0] == 2"], timeout=60)
    if r.returncode != 0:
        return f"a 2-rank MPI job does not run here (exit {r.returncode}): {(r.stdout + r.stderr)[-500:]}"
    return None


def _mpirun(args, timeout=TIMEOUT):
    return subprocess.run(["mpirun", "--oversubscribe", "--bind-to", "none", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=dict(os.environ, **MPI_ENV), timeout=timeout)


@pytest.fixture(scope="module")
def mpi():
    problem = _mpi_problem()
    if problem:
        if os.environ.get("FLATNET_REQUIRE_MPI") == "1":
            pytest.fail(f"FLATNET_REQUIRE_MPI=1 but {problem}")
        pytest.skip(problem)


def worker(out, *args, np_=2):
    return _mpirun(["-np", np_, sys.executable, WORKER, out, *args])


def plain_worker(out, *args):
    return subprocess.run([sys.executable, str(WORKER), str(out), "--plain", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=TIMEOUT)


def ckpt(out, rank=0):
    return load_checkpoint(Path(out) / f"rank{rank}" / "checkpoint.npz")


def test_two_ranks_equal_one_process_with_the_same_global_batch(mpi, tmp_path):
    """Dropout off: 2 ranks x 8 images and 1 process x 16 images agree after 10 steps (2 epochs of 67
    images: each ends with a batch of 3, split 1 + 2 and weighted by the shards' sizes; an lr drop,
    momentum, weight decay), to float32 summation-order tolerance; only rank 0 wrote files."""
    r = worker(tmp_path / "two", "--epochs", "2", "--no-dropout", "--n-train", "67")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("epoch   2") == 1  # only rank 0 logs
    assert not any((tmp_path / "two" / "rank1").iterdir())  # only rank 0 wrote files
    r = plain_worker(tmp_path / "one", "--epochs", "2", "--no-dropout", "--n-train", "67")
    assert r.returncode == 0, r.stderr
    assert_like_one_process(ckpt(tmp_path / "two"), ckpt(tmp_path / "one"), 2)


def assert_like_one_process(ranks, one, n):
    """The checkpoints of n ranks and of one process (dropout off, same global batch) agree to float32
    summation-order tolerance: weights, momentum, and each epoch's losses and accuracies."""
    (p2, v2, m2, _, _, _), (p1, v1, m1, _, _, _) = ranks, one
    assert m2["ranks"]["count"] == n and "ranks" not in m1
    init = build("flattened", (1, 28, 28), 10, seed=1).params
    for name in p1:
        scale = float(np.abs(p1[name]).max())
        err = float(np.abs(p2[name] - p1[name]).max())
        moved = float(np.abs(p1[name] - init[name]).max())
        assert err <= 2e-5 * scale + 1e-7, f"{name}: weights differ by {err:.2e} (scale {scale:.2e})"
        assert moved > 100 * err, f"{name}: training moved the weights by only {moved:.2e}"
        np.testing.assert_allclose(v2[name], v1[name], rtol=1e-3, atol=1e-4 * float(np.abs(v1[name]).max()),
                                   err_msg=name)
    assert len(m2["history"]) == len(m1["history"]) > 0
    for h2, h1 in zip(m2["history"], m1["history"]):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-5)
        assert h2["train_acc"] == h1["train_acc"] and abs(h2["test_acc"] - h1["test_acc"]) <= 1 / 32
        assert h2["test_loss"] == pytest.approx(h1["test_loss"], rel=1e-4)  # the test set evaluated in shares


def test_each_rank_trains_on_its_share_of_the_images_one_process_would_augment(mpi, tmp_path):
    """Flips and shifts are drawn per image: the shards of 2 ranks, put together, are bit for bit
    the batches of one process (2 epochs of 67 images; the last batch of 3 split 1 + 2)."""
    args = ("--epochs", "2", "--no-dropout", "--n-train", "67", "--augment", "flip,crop3", "--record-inputs")
    r = worker(tmp_path / "two", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    r = plain_worker(tmp_path / "one", *args)
    assert r.returncode == 0, r.stderr
    one, rank0, rank1 = (np.load(tmp_path / run / "inputs.npz") for run in ("one/rank0", "two/rank0", "two/rank1"))
    assert len(one.files) == len(rank0.files) == len(rank1.files) == 10
    for name in one.files:
        assert len(rank0[name]) >= 1 and len(rank1[name]) >= 1
        np.testing.assert_array_equal(one[name], np.concatenate([rank0[name], rank1[name]]), err_msg=name)


def test_one_rank_equals_a_plain_run_exactly_and_resume_with_two_ranks_is_exact(mpi, tmp_path):
    """Dropout on. 1 rank under mpirun = no MPI, bit for bit. Then 2 ranks: 2 epochs straight equal
    2 epochs stopped by a SIGUSR1 to rank 0 alone in epoch 2, then resumed (the ranks agree on the
    step to stop after; every rank's dropout generator is in the checkpoint)."""
    assert worker(tmp_path / "mpi1", "--epochs", "1", np_=1).returncode == 0
    assert plain_worker(tmp_path / "plain", "--epochs", "1").returncode == 0
    a, b = ckpt(tmp_path / "mpi1"), ckpt(tmp_path / "plain")
    for name in a[0]:
        np.testing.assert_array_equal(a[0][name], b[0][name], err_msg=name)
    assert a[2]["model_rng"] == b[2]["model_rng"]

    r = worker(tmp_path / "straight", "--epochs", "2", "--n-train", "65")  # a last batch of 1: rank 0's is empty
    assert r.returncode == 0, r.stdout + r.stderr
    r = worker(tmp_path / "resumed", "--epochs", "2", "--n-train", "65", "--signal-at", "1,2")
    assert r.returncode == 0 and "rank 0 of 2: interrupted" in r.stdout and "SIGUSR1: finishing" in r.stdout, \
        r.stdout + r.stderr
    meta = ckpt(tmp_path / "resumed")[2]
    assert (meta["epoch"], meta["step_in_epoch"]) == (1, 3)  # rank 1 stopped after the same step as rank 0
    r = worker(tmp_path / "resumed", "--epochs", "2", "--n-train", "65", "--resume")
    assert r.returncode == 0 and "rank 0 of 2: done" in r.stdout, r.stdout + r.stderr
    (ps, _, ms, _, _, _), (pr, _, mr, _, _, _) = ckpt(tmp_path / "straight"), ckpt(tmp_path / "resumed")
    assert len(ms["ranks"]["model_rng"]) == 1 and ms["ranks"]["model_rng"] == mr["ranks"]["model_rng"]
    assert ms["ranks"]["model_rng"][0] != ms["model_rng"]  # rank 1 draws its own masks
    for name in ps:
        np.testing.assert_array_equal(ps[name], pr[name], err_msg=name)


def test_reduction_overlapped_with_the_backward_sums_what_the_one_after_it_does(mpi, tmp_path):
    """4 ranks, buckets of 0.02 MiB, dropout on, 2 epochs of 67 images (the last batch of 3 leaves a rank
    without images): buckets reduced while the backward goes on, and after it, end bit for bit equal
    (weights and momentum), and with overlap the reductions really started before the backwards ended."""
    runs = {}
    for mode in ("overlap", "no-overlap"):
        extra = ["--no-overlap"] if mode == "no-overlap" else []
        r = worker(tmp_path / mode, "--epochs", "2", "--n-train", "67", "--bucket-mib", "0.02", *extra, np_=4)
        assert r.returncode == 0, r.stdout + r.stderr
        early = {int(m[0]): (int(m[1]), int(m[3])) for m in re.findall(
            r"rank (\d): (\d+) buckets, started during the backward: (\d+)-(\d+)", r.stdout)}
        assert sorted(early) == [0, 1, 2, 3], r.stdout
        buckets = {n for n, _ in early.values()}
        assert len(buckets) == 1 and buckets.pop() >= 3
        assert all((most >= 2) if mode == "overlap" else (most == 0) for _, most in early.values()), early
        runs[mode] = ckpt(tmp_path / mode)
    (p1, v1, *_), (p2, v2, *_) = runs.values()
    for name in p1:
        np.testing.assert_array_equal(p1[name], p2[name], err_msg=name)
        np.testing.assert_array_equal(v1[name], v2[name], err_msg=name)


@pytest.mark.parametrize("sends, agreed", [(["1,SIGUSR1"], "SIGUSR1"), (["0,SIGUSR1", "1,SIGTERM"], "SIGTERM"),
                                           (["0,SIGTERM", "1,SIGINT"], "SIGTERM"), (["1,SIGINT"], "SIGINT")])
def test_ranks_stopped_by_signals_stop_together_for_one_signal(mpi, tmp_path, sends, agreed):
    """Signals reach some ranks after the same step: every rank stops after the next one, and every rank reports
    the same signal (train.py exits 128 + it on each rank), SIGTERM's when any rank had one (a batch system's stop)."""
    args = [a for to_sig in sends for a in ("--send", f"{to_sig},1,1")]
    r = worker(tmp_path / "run", "--epochs", "2", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    for rank in (0, 1):
        assert f"rank {rank} of 2: interrupted by {agreed}," in r.stdout, r.stdout + r.stderr
    meta = ckpt(tmp_path / "run")[2]
    assert (meta["epoch"], meta["step_in_epoch"]) == (1, 2)  # after the step following the signals' step


@pytest.mark.parametrize("fail", ["raise", "kill", "nan"])
def test_a_failing_rank_stops_the_job_with_its_message(mpi, tmp_path, fail):
    """Rank 1 raises or is killed in epoch 2, or the loss is NaN: the job ends within seconds, non-zero,
    with the message, and the last checkpoint is intact."""
    t0 = time.monotonic()
    r = worker(tmp_path, "--epochs", "2", "--fail", fail)
    seconds = time.monotonic() - t0
    assert r.returncode != 0 and seconds < 60, (r.returncode, seconds)
    if fail == "raise":
        assert "rank 1 of 2" in r.stderr and "RuntimeError: rank 1 fails on purpose" in r.stderr, r.stderr
    elif fail == "kill":
        assert "signal 9" in r.stderr or "Killed" in r.stderr, r.stderr
    else:
        assert "TrainingDiverged: loss is" in r.stderr, r.stderr
    if fail == "nan":
        assert not (tmp_path / "rank0" / "checkpoint.npz").exists()  # diverged at its first steps
    else:
        assert ckpt(tmp_path)[2]["epoch"] == 1  # epoch 1's checkpoint, whole
    assert not any((tmp_path / "rank1").iterdir())


# ----------------------------------------------------------------------------- train.py

COMMON = ["--model", "flattened", "--dataset", "mnist", "--batch-size", "16", "--quiet", "--seed", "3", "--no-plot",
          "--dampening", "0", "--lr", "0.02", "--lr-drop-epochs", "9"]


@pytest.fixture
def mnist(tmp_path):
    write_mnist(tmp_path / "data", np.random.default_rng(0), n_train=256, n_test=64, learnable=True)
    return tmp_path


def two_hosts(*per_rank):
    """mpirun's MPMD form: rank 0 and rank 1 with their own arguments (as two hosts would have)."""
    return [*["-np", "1", sys.executable, ROOT / "train.py", *per_rank[0]], ":",
            *["-np", "1", sys.executable, ROOT / "train.py", *per_rank[1]]]


def test_train_py_two_ranks_writes_from_rank_0_only_and_resumes_with_another_rank_count(mpi, mnist):
    """2 ranks (rank 1 given its own --out) for 2 epochs, resumed by one process for the 3rd; one process
    for 2 epochs resumed by 2 ranks: both learn, to the same test accuracy within noise."""
    d, c = mnist / "data", mnist / "cache"
    common = [*COMMON, "--data-dir", d, "--cache-dir", c, "--epochs", "2"]
    r = _mpirun(two_hosts([*common, "--out", mnist / "A"], [*common, "--out", mnist / "B"]))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "distributed over MPI: 2 ranks on 1 host" in r.stdout and "1 thread per rank" in r.stdout
    assert r.stdout.count("test accuracy: ") == 1 and r.stdout.count("epoch   2") == 1  # rank 0 alone prints
    assert not (mnist / "B").exists()  # rank 1 writes nothing
    assert {p.name for p in (mnist / "A").iterdir()} == {"checkpoint.npz", "log.jsonl", "model.npz", "settings.json"}
    meta = load_checkpoint(mnist / "A" / "checkpoint.npz")[2]
    assert meta["ranks"]["count"] == 2 and meta["epoch"] == 2

    train = [sys.executable, str(ROOT / "train.py")]
    r = subprocess.run([*train, "--resume", "--epochs", "3", "--out", mnist / "A", "--quiet"], capture_output=True,
                       text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=TIMEOUT)
    assert r.returncode == 0 and "distributed" not in r.stdout, r.stdout + r.stderr
    r = subprocess.run([*train, *common, "--out", mnist / "P"], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    r = _mpirun(["-np", "2", sys.executable, ROOT / "train.py", "--resume", "--epochs", "3", "--out", mnist / "P",
                 "--quiet", "--bucket-mib", "0.05", "--no-overlap"])
    assert r.returncode == 0 and "2 ranks" in r.stdout, r.stdout + r.stderr
    logs = [[json.loads(line) for line in (mnist / run / "log.jsonl").read_text().splitlines()] for run in "AP"]
    assert [[h["epoch"] for h in log] for log in logs] == [[1, 2, 3], [1, 2, 3]]
    acc = [log[-1]["test_acc"] for log in logs]
    # 64 test images: one run's accuracy has a standard error of about 5 points near 85%; different
    # dropout masks move it like another seed would (measured: 80-89% after these 3 epochs)
    assert min(acc) > 0.6 and abs(acc[0] - acc[1]) <= 0.2, acc
    assert all(log[-1]["train_loss"] < log[0]["train_loss"] - 0.5 for log in logs)


def test_two_ranks_keep_the_average_of_the_weights_in_the_checkpoint_and_the_model_file(mpi, mnist):
    """--ema and --lookahead under MPI: every rank averages and syncs the same weights; rank 0 writes the average
    and the slow weights, which a single process resumes, and the model file holds the average."""
    d, c = mnist / "data", mnist / "cache"
    common = [*COMMON, "--data-dir", d, "--cache-dir", c, "--epochs", "2", "--ema", "0.9", "--schedule", "cosine",
              "--label-smoothing", "0.1", "--nesterov", "--lookahead", "3", "--out", mnist / "E"]
    r = _mpirun(["-np", "2", sys.executable, ROOT / "train.py", *common])
    assert r.returncode == 0, r.stdout + r.stderr
    params, _, meta, _, average, slow = load_checkpoint(mnist / "E" / "checkpoint.npz")
    assert meta["ranks"]["count"] == 2 and average is not None and slow is not None
    assert not all(np.array_equal(slow[k], params[k]) for k in params)
    import engine
    model = engine.load(mnist / "E" / "model.npz")
    for name, w in model.net.params.items():
        np.testing.assert_array_equal(w, average[name], err_msg=name)
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", "--epochs", "3", "--out", mnist / "E",
                        "--quiet"], capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    log = [json.loads(line) for line in (mnist / "E" / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in log] == [1, 2, 3] and log[-1]["test_acc"] > 0.5


@pytest.mark.parametrize("case", ["different", "missing"])
def test_ranks_refuse_different_or_missing_data(mpi, mnist, case):
    """Rank 1 reads other data (a different MNIST), or its data folder lacks the files: the job stops
    at start with the reason, nothing trained."""
    other = mnist / "other"
    if case == "different":
        write_mnist(other, np.random.default_rng(1), n_train=256, n_test=64, learnable=True)
    else:
        other.mkdir()
    common = [*COMMON, "--epochs", "1", "--out", mnist / "run", "--no-download"]
    t0 = time.monotonic()
    r = _mpirun(two_hosts([*common, "--data-dir", mnist / "data", "--cache-dir", mnist / "c0"],
                          [*common, "--data-dir", other, "--cache-dir", mnist / "c1"]))
    assert r.returncode != 0 and time.monotonic() - t0 < 60
    if case == "different":
        assert "rank 1 on" in r.stderr and "holds different data from rank 0" in r.stderr, r.stderr
    else:
        assert "rank 1 of 2" in r.stderr and "error:" in r.stderr and "mnist" in r.stderr, r.stderr
    assert not (mnist / "run" / "checkpoint.npz").exists() and "epoch   1" not in r.stdout


def test_bench_distributed_runs(mpi):
    """`python -m engine.bench distributed` under mpirun, on tiny sizes (no timing asserted)."""
    r = _mpirun(["-np", "2", sys.executable, "-m", "engine.bench", "distributed", "--dataset", "mnist", "--batch", "4",
                 "--repeat", "1", "--threads", "1"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "allreduce of the gradients:" in r.stdout and "MiB in" in r.stdout
    assert "1 rank x 2 thread(s)" in r.stdout and "bucket(s) of" in r.stdout
    for how in ("overlapped", "reduced after the backward"):
        assert re.search(rf"2 rank\(s\) x 1 thread\(s\), {how} +[\d.]+ +[\d.]+ +[\d.]+ +\d+", r.stdout), r.stdout
    assert r.stdout.count("# environment") == 1  # rank 0 alone reports


# ----------------------------------------------------------------------------- across hosts
# Hosts are network namespaces on one machine joined by a bridge (tests/multihost.py): one rank per
# host, TCP only (no shared memory), each host with its own disk (a tmpfs) at the same path, the
# daemons started by mpirun through an agent in place of ssh. Needs root and iproute2.

@pytest.fixture(scope="module")
def netns(mpi):
    why = multihost.problem()
    if why:
        pytest.skip(f"hosts as network namespaces: {why}")


@pytest.fixture
def hosts(netns, tmp_path):
    """hosts(n, rate=None): a Cluster of n hosts, closed after the test whatever its outcome; the test
    then fails if a namespace, link or process of it is left behind."""
    made = []

    def make(n, rate=None):
        made.append(multihost.Cluster(n, rate, workdir=tmp_path))
        return made[-1]
    yield make
    for c in made:
        c.close()
    listed = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], check=False, capture_output=True, text=True).stdout
    for c in made:
        assert not any(name in listed for name in c.names), listed
        assert c.bridge not in links and not any(f"{link}@" in links or f"{link}:" in links for link in c.links)


def host_worker(c, out, *args, hosts=None, wait=True):
    return c.mpirun([sys.executable, WORKER, out, *args], hosts=hosts, env={"PYTHONPATH": str(ROOT)},
                    timeout=TIMEOUT, wait=wait)


@pytest.mark.parametrize("n", [2, 4])
def test_hosts_learn_like_one_process_over_tcp(hosts, tmp_path, n):
    """n hosts, one rank each, reducing over TCP at 1 Gbit/s: dropout off, 2 epochs of 67 images (the
    last batch of 3 split 1 + 2, or 0 + 1 + 1 + 1), equal to one process to float32 tolerance. The
    ranks run on their own hosts, and only the first host's disk holds files."""
    c = hosts(n, rate="1gbit")
    r = host_worker(c, c.shared_disk / "w", "--epochs", "2", "--no-dropout", "--n-train", "67")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("epoch   2") == 1 and f"rank {n - 1} of {n}: done" in r.stdout, r.stdout
    assert (c.disk(0) / "w" / "rank0" / "checkpoint.npz").is_file()
    for i in range(1, n):
        assert not any((c.disk(i) / "w" / f"rank{i}").iterdir())  # created by the worker, left empty
        assert not (c.disk(0) / "w" / f"rank{i}").exists()  # each rank on its own host
    r = plain_worker(tmp_path / "one", "--epochs", "2", "--no-dropout", "--n-train", "67")
    assert r.returncode == 0, r.stderr
    assert_like_one_process(ckpt(c.disk(0) / "w"), ckpt(tmp_path / "one"), n)


def write_host_data(c, hosts, seed=0):
    for i in hosts:
        write_mnist(c.disk(i) / "data", np.random.default_rng(seed), n_train=256, n_test=64, learnable=True)


def test_train_py_across_hosts_writes_on_the_first_hosts_disk_and_resumes_on_other_host_counts(hosts):
    """train.py on 2 hosts, the same command on each, --data-dir, --cache-dir and --out on each host's own
    disk (a different file system per host): only the first host's disk gets the run; the checkpoint
    resumes on 4 hosts, then on 1, and the run learns."""
    c = hosts(4)
    write_host_data(c, range(4))
    d = c.shared_disk
    common = [*COMMON, "--data-dir", d / "data", "--cache-dir", d / "cache", "--out", d / "run"]
    train = [sys.executable, ROOT / "train.py"]
    r = c.mpirun([*train, *common, "--epochs", "2"], hosts=2, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"2 ranks on 2 hosts ({c.names[0]} x1, {c.names[1]} x1)" in r.stdout, r.stdout
    assert r.stdout.count("epoch   2") == 1
    assert {p.name for p in (c.disk(0) / "run").iterdir()} == {"checkpoint.npz", "log.jsonl", "model.npz",
                                                              "settings.json"}
    assert not (c.disk(1) / "run").exists() and (c.disk(1) / "cache").is_dir()  # host 1 read its own data
    r = c.mpirun([*train, "--resume", "--epochs", "3", "--out", d / "run", "--quiet"], hosts=4, timeout=TIMEOUT)
    assert r.returncode == 0 and "4 ranks on 4 hosts" in r.stdout, r.stdout + r.stderr
    assert load_checkpoint(c.disk(0) / "run" / "checkpoint.npz")[2]["ranks"]["count"] == 4
    r = c.mpirun([*train, "--resume", "--epochs", "4", "--out", d / "run", "--quiet"], hosts=1, timeout=TIMEOUT)
    assert r.returncode == 0 and "1 rank on 1 host" in r.stdout, r.stdout + r.stderr
    assert not any((c.disk(i) / "run").exists() for i in (1, 2, 3))
    log = [json.loads(line) for line in (c.disk(0) / "run" / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in log] == [1, 2, 3, 4]
    assert log[-1]["train_loss"] < log[0]["train_loss"] - 0.5 and log[-1]["test_acc"] > 0.6, log


@pytest.mark.parametrize("case", ["different", "missing"])
def test_a_host_with_other_data_or_none_is_refused_at_start(hosts, case):
    """The same command on 2 hosts, the data on each host's own disk: host 1 holds another MNIST (the
    fingerprints differ), or no data at all. The job stops at start naming host 1, nothing trained."""
    c = hosts(2)
    write_host_data(c, [0])
    if case == "different":
        write_host_data(c, [1], seed=1)
    d = c.shared_disk
    t0 = time.monotonic()
    r = c.mpirun([sys.executable, ROOT / "train.py", *COMMON, "--epochs", "1", "--no-download", "--data-dir",
                  d / "data", "--cache-dir", d / "cache", "--out", d / "run"], timeout=TIMEOUT)
    assert r.returncode != 0 and time.monotonic() - t0 < 60
    if case == "different":
        assert f"rank 1 on {c.names[1]} holds different data from rank 0 on {c.names[0]}" in r.stderr, r.stderr
    else:
        assert f"rank 1 of 2 ({c.names[1]}): error:" in r.stderr and "mnist" in r.stderr, r.stderr
    assert not (c.disk(0) / "run" / "checkpoint.npz").exists() and "epoch   1" not in r.stdout


@pytest.mark.parametrize("how", ["cut", "kill"])
def test_a_host_lost_mid_run_ends_the_job_naming_it_and_the_checkpoint_resumes(hosts, how):
    """2 hosts training (a pause after each step keeps the job running); once the first checkpoints are
    written, host 1's link goes down (its packets are dropped, nothing tells TCP) or its rank is
    killed. The whole job ends within 60 s, non-zero, with a line naming host 1 (mpirun's: the
    daemons' TCP keepalive of tests/multihost.py notices a cut link in about 10 s), host 1 runs
    nothing of it afterwards, and the checkpoint is whole and resumes on both hosts once the link is back."""
    c = hosts(2)
    out = c.shared_disk / "w"
    saved = c.disk(0) / "w" / "rank0" / "checkpoint.npz"
    p = host_worker(c, out, "--epochs", "300", "--pause", "0.05", wait=False)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and p.poll() is None and \
                not (saved.exists() and load_checkpoint(saved)[2]["epoch"] >= 2):
            time.sleep(0.1)
        assert p.poll() is None, p.communicate()
        if how == "cut":
            c.cut(1)
        else:
            ranks = [pid for pid in c.pids(1) if "mpi_worker" in Path(f"/proc/{pid}/cmdline").read_text()]
            assert len(ranks) == 1, ranks
            os.kill(ranks[0], signal.SIGKILL)
        t0 = time.monotonic()
        _, stderr = p.communicate(timeout=90)
        seconds = time.monotonic() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    assert p.returncode != 0 and seconds < 60, (p.returncode, seconds, stderr)
    for _ in range(300):  # the lost host's daemon and rank end too (they lost mpirun)
        if not c.pids(1):
            break
        time.sleep(0.1)
    assert not c.pids(1), [Path(f"/proc/{pid}/cmdline").read_text() for pid in c.pids(1)]
    if how == "cut":
        assert re.search(rf"Remote daemon: .* on node {c.names[1]}$", stderr, re.MULTILINE), stderr
    else:
        assert re.search(rf"rank 1 with PID \d+ on node {c.names[1]} exited on signal 9", stderr), stderr
    meta = load_checkpoint(saved)[2]
    assert 2 <= meta["epoch"] < 300 and meta["step_in_epoch"] == 0, meta["epoch"]
    if how == "cut":
        c.restore(1)
    r = host_worker(c, out, "--epochs", meta["epoch"] + 1, "--pause", "0.05", "--resume")
    assert r.returncode == 0 and "rank 0 of 2: done" in r.stdout, r.stdout + r.stderr
    assert load_checkpoint(saved)[2]["epoch"] == meta["epoch"] + 1

"""engine.initialize.lsuv: layer-sequential unit-variance scaling, and train.py --init lsuv."""
import numpy as np
import pytest

from engine import Conv2d, Dropout, Flatten, Flattened, Linear, MaxPool2d, ReLU, Sequential
from engine.initialize import lsuv
from models.paper import INITS, build


def _net(seed=0):
    rng = np.random.default_rng(seed)
    return Sequential(Conv2d(3, 6, 3, padding=1, rng=rng), ReLU(), Dropout(0.5, rng=rng),
                      Flattened(6, 8, 3, rng=rng), ReLU(), MaxPool2d(2, 2), Flatten(),
                      Sequential(Linear(8 * 4 * 4, 5, rng=rng)),
                      names=["conv", "relu", "drop", "flat", "relu2", "pool", "flatten", "head"])


def test_every_weighted_layer_ends_at_unit_std_and_only_its_weight_is_scaled():
    net = _net()
    x = np.random.default_rng(1).standard_normal((32, 3, 8, 8)).astype(np.float32) * 5.0
    before = {k: v.copy() for k, v in net.params.items()}
    report = lsuv(net, x, tol=0.01)
    names = [name for name, _, _ in report]
    assert names == ["conv", "flat.stage1.vertical", "flat.stage1.horizontal", "flat.stage1.lateral",
                     "flat.stage2.vertical", "flat.stage2.horizontal", "flat.stage2.lateral", "head.0"]
    after = net.params
    for name, _, scale in report:
        np.testing.assert_allclose(after[f"{name}.weight"], before[f"{name}.weight"] * scale, rtol=1e-5)
        np.testing.assert_array_equal(after[f"{name}.bias"], before[f"{name}.bias"])
    # Walk the network again, in float64 from the float32 weights, and check each output's std.
    net.eval()
    h = x
    stds = []
    for _, layer in net.children:
        subs = layer.children if isinstance(layer, Sequential) else [(None, layer)]
        for _, sub in subs:
            h = sub.forward(h).copy()
            if "weight" in sub._params:
                stds.append(float(h.astype(np.float64).std()))
    np.testing.assert_allclose(stds, 1.0, atol=0.011)
    assert report[0][1] > 2  # the conv's output started far from unit std (the input has std 5)


def test_the_network_keeps_its_mode_and_dropout_is_off_during_the_passes():
    net = _net()
    x = np.random.default_rng(2).standard_normal((16, 3, 8, 8)).astype(np.float32)
    net.train()
    r1 = lsuv(_net(), x)
    r2 = lsuv(net, x)  # dropout on in training mode would draw masks and change the scales
    assert net.training and all(layer.training for layer in net.layers)
    assert [s for _, _, s in r1] == [s for _, _, s in r2]
    net.eval()
    lsuv(net, x)
    assert not net.training


def test_target_std_is_honoured():
    net = _net()
    x = np.random.default_rng(3).standard_normal((16, 3, 8, 8)).astype(np.float32)
    lsuv(net, x, target_std=0.5, tol=0.01)
    net.eval()
    y = net.forward(x)
    assert abs(float(y.std()) / 0.5 - 1.0) <= 0.011  # the last layer is the head


def test_a_layer_with_constant_output_cannot_be_rescaled():
    net = Sequential(Linear(4, 3, init="glorot"), names=["fc"])  # glorot: zero biases
    with pytest.raises(ValueError, match="fc gives output std 0"):
        lsuv(net, np.zeros((8, 4), np.float32))
    with pytest.raises(ValueError, match="at least one image"):
        lsuv(net, np.zeros((0, 4), np.float32))


def test_the_paper_model_accepts_lsuv_as_its_auto_draw():
    a, b = build("flattened", init="auto", seed=4), build("flattened", init="lsuv", seed=4)
    for k, v in a.params.items():
        np.testing.assert_array_equal(v, b.params[k])
    assert b.arch["init"] == "lsuv"


def test_train_py_lists_the_models_inits():
    import train
    assert train.INITS == INITS

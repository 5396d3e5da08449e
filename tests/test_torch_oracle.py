"""The paper's whole networks against PyTorch used as an oracle (skipped when torch is absent).

The flattened layers are written in torch as grouped (k,1)/(1,k) convolutions and 1x1
convolutions with explicit zero padding: an independent implementation of the same maths.
"""
import numpy as np
import pytest

from engine import Conv2d, Flattened, Linear, MaxPool2d, SoftmaxCrossEntropy
from models.paper import build

torch = pytest.importorskip("torch", reason="PyTorch is an optional oracle here: pip install torch (its CPU build)")
F = torch.nn.functional


def torch_forward(net, x, P):
    h = x
    for name, layer in net.children:
        if isinstance(layer, Flattened):
            for sub, child in layer.children:
                w, b = P[f"{name}.{sub}.weight"], P[f"{name}.{sub}.bias"]
                if sub.endswith("lateral"):
                    h = F.conv2d(h, w[:, :, None, None], b)
                else:
                    c, k = w.shape
                    if sub.endswith("vertical"):
                        h = F.pad(h, (0, 0, child.before, child.after))
                        h = F.conv2d(h, w.reshape(c, 1, k, 1), b, groups=c)
                    else:
                        h = F.pad(h, (child.before, child.after, 0, 0))
                        h = F.conv2d(h, w.reshape(c, 1, 1, k), b, groups=c)
        elif isinstance(layer, Conv2d):
            h = F.conv2d(h, P[f"{name}.weight"], P[f"{name}.bias"], padding=layer.padding)
        elif isinstance(layer, MaxPool2d):
            h = F.max_pool2d(h, layer.k, layer.stride, ceil_mode=layer.ceil_mode)
        elif isinstance(layer, Linear):
            h = F.linear(h, P[f"{name}.weight"], P[f"{name}.bias"])
        elif name.startswith("relu"):
            h = F.relu(h)
        elif name == "flatten":
            h = h.flatten(1)
    return h


@pytest.mark.parametrize("model,shape,kw", [
    ("baseline", (3, 32, 32), {}),
    ("flattened", (3, 32, 32), {}),
    ("flattened", (1, 28, 28), dict(flatten_first=True, stages=3)),
    ("baseline", (1, 28, 28), dict(pool=(2, 3), pool_ceil=False)),
])
def test_model_matches_torch(model, shape, kw):
    net = build(model, shape, n_classes=7, seed=2, **kw).astype(np.float64).eval()  # eval: no dropout
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, *shape))
    y = np.array([0, 6, 3])
    loss_fn = SoftmaxCrossEntropy()
    out = net.forward(x).copy()
    loss = loss_fn(out, y)
    dx = net.backward(loss_fn.backward()).copy()
    P = {k: torch.tensor(v, requires_grad=True) for k, v in net.params.items()}
    xt = torch.tensor(x, requires_grad=True)
    ht = torch_forward(net, xt, P)
    lt = F.cross_entropy(ht, torch.tensor(y))
    lt.backward()
    np.testing.assert_allclose(out, ht.detach().numpy(), rtol=1e-9, atol=1e-12)
    assert loss == pytest.approx(lt.item(), rel=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-7, atol=1e-14)
    grads = net.grads
    for k, p in P.items():
        np.testing.assert_allclose(grads[k], p.grad.numpy(), rtol=1e-7, atol=1e-14, err_msg=k)

"""Softmax cross-entropy, computed stably from logits (numpy or CuPy arrays: labels on the same backend)."""
import numpy as np

from .runtime import get_ops, is_array


class SoftmaxCrossEntropy:
    """Mean cross-entropy of softmax(logits) against integer labels, optionally smoothed.

    ``loss = forward(logits (N, K), labels (N,))`` subtracts each row's maximum
    before exponentiating (log-sum-exp), so large logits neither overflow nor
    lose precision; ``dlogits = backward()`` is (softmax - target) / N. The target
    is the one-hot label, or with ``smoothing`` e (label smoothing, Szegedy et al.
    2016) (1 - e) * onehot + e / K: the loss is then
    -(1 - e) * log p[label] - e/K * sum_k log p[k].
    """

    def __init__(self, smoothing=0.0):
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"SoftmaxCrossEntropy: smoothing must lie in [0, 1), got {smoothing!r}")
        self.smoothing = float(smoothing)

    def forward(self, logits, labels, as_array=False):
        """The mean loss, a float (read back from a device), or with `as_array` a float64 scalar
        on the logits' backend (a 0-d array on a device: nothing read back). `labels` may live on the logits'
        backend or on the host: host labels are checked there and then copied, so a device
        pays no read for the range check. The labels used stay in `self.labels`."""
        logits = logits if is_array(logits) else np.asarray(logits)
        xp = get_ops(logits).xp
        on_host = not is_array(labels) or isinstance(labels, np.ndarray)
        labels = np.asarray(labels) if on_host else labels
        if logits.dtype.kind != "f" or logits.ndim != 2:
            raise ValueError(f"SoftmaxCrossEntropy: expected float logits of shape (N, K), got "
                             f"{logits.dtype} {logits.shape}")
        if labels.dtype.kind not in "iu" or labels.shape != (logits.shape[0],):
            raise ValueError(f"SoftmaxCrossEntropy: expected integer labels of shape ({logits.shape[0]},), got "
                             f"{labels.dtype} {labels.shape}")
        n, k = logits.shape
        if n == 0:
            raise ValueError("SoftmaxCrossEntropy: empty batch")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= k:
            raise ValueError(f"SoftmaxCrossEntropy: labels must lie in [0, {k}), got [{lo}, {hi}]")
        labels = xp.asarray(labels)
        z = logits - logits.max(axis=1, keepdims=True)
        lse = xp.log(xp.exp(z).sum(axis=1, keepdims=True))
        logp = z - lse
        self._p = xp.exp(logp)
        self.labels = labels
        self._dtype = logits.dtype
        e = self.smoothing
        loss = -logp[xp.arange(n), labels].astype(np.float64).mean()
        if e:
            loss = (1.0 - e) * loss - e / k * logp.astype(np.float64).sum(axis=1).mean()
        return loss if as_array else float(loss)

    def backward(self):
        n, k = self._p.shape
        xp = get_ops(self._p).xp
        e = self.smoothing
        d = self._p.copy()
        if e:
            d -= e / k
        d[xp.arange(n), self.labels] -= 1 - e
        d /= n
        return d.astype(self._dtype, copy=False)

    __call__ = forward


def softmax(logits):
    """Row-wise softmax, stable for large logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = get_ops(logits).xp.exp(z)
    return e / e.sum(axis=1, keepdims=True)

"""The update rule and the learning-rate schedule, below the training loop and both training steps."""


def sgd_momentum(params, grads, velocity, lr, momentum, weight_decay, dampening=None):
    """One SGD step, in place, as Torch7's optim.sgd (the paper's framework):

        d = g + weight_decay * w;  v = momentum * v + (1 - dampening) * d;  w -= lr * v

    with dampening = momentum by default, as Torch7 does: a step is then lr * d at
    steady state, not lr * d / (1 - momentum) as in PyTorch's SGD (dampening=0).
    The first step uses v = d. Weight decay applies to '*weight' parameters, not biases.
    `velocity` maps names to buffers; missing ones are created on the first step.
    """
    dampening = momentum if dampening is None else dampening
    for name, w in params.items():
        d = grads[name]
        if weight_decay and name.endswith("weight"):
            d = d + weight_decay * w
        v = velocity.get(name)
        if v is None:
            v = velocity[name] = d.astype(w.dtype, copy=True)
        else:
            v *= momentum
            v += (1.0 - dampening) * d
        w -= lr * v
    return velocity


def lr_at(epoch, base_lr, drop_epochs, factor=0.1):
    """Learning rate of a 0-based epoch: base_lr times `factor` for each drop epoch already reached."""
    return base_lr * factor ** sum(epoch >= d for d in drop_epochs)

"""`bench winograd`: the rounding error of Winograd's F(m x m, 5 x 5) in float32 on the baseline network's
trained 5x5 layers and real inputs (forward, input gradient, weight gradient), against float64 direct
convolution, beside float32 direct convolution's."""
import numpy as np

from engine.winograd import conv2d, direct_conv2d, direct_weight_grad, multiplications, weight_grad


def _layer_data(model_path, data_dir, n):
    """[(name, input (n, C, H, W), weight, padding, gradient of its output)] of each stride-1 5x5 Conv2d after the
    first, from one forward and backward of the layer path on n images (whitened test images when data_dir holds
    CIFAR-10, else standard normal images)."""
    import engine
    from engine.catalog import pretrained_path
    from engine.layers import Conv2d
    from engine.losses import SoftmaxCrossEntropy
    model = engine.load(model_path or pretrained_path("baseline-cifar10"), compiled=False)
    rng = np.random.default_rng(0)
    source = "standard normal images"
    x, y = rng.standard_normal((n, *model.input_shape)).astype(np.float32), rng.integers(0, 10, n)
    if data_dir:
        from engine.data import load_cifar
        raw = load_cifar(data_dir, "cifar10", download_ok=False)
        x, y = model.preprocess(raw["test_x"][:n].transpose(0, 2, 3, 1)), raw["test_y"][:n]
        source = f"the first {n} CIFAR-10 test images, whitened ({raw['source']})"
    convs = [(name, layer) for name, layer in model.net.children if isinstance(layer, Conv2d)
             and layer.k == 5 and layer.stride == 1][1:]
    seen = {}
    for name, layer in convs:
        forward, backward = layer.forward, layer.backward

        def fwd(inp, name=name, forward=forward):
            seen[name] = [np.array(inp)]
            return forward(inp)

        def bwd(dy, name=name, backward=backward):
            seen[name].append(np.array(dy))
            return backward(dy)
        layer.forward, layer.backward = fwd, bwd
    net = model.net.eval()
    loss = SoftmaxCrossEntropy()
    loss(net.forward(x), y)
    net.backward(loss.backward())
    return source, [(name, *seen[name][:1], layer.params["weight"], layer.padding, seen[name][1])
                    for name, layer in convs]


def bench_winograd(args):
    source, layers = _layer_data(args.model_file, args.data_dir, args.batch)
    print(f"# weights: {args.model_file or 'the shipped baseline-cifar10'}; inputs: {source}")
    print("# error: RMS of (result - float64 direct) / RMS of the float64 result; max: largest |difference| / RMS")
    print(f"{'layer':<8} {'pass':<11} {'algorithm':<14} {'mults/px':>8} {'rms_error':>10} {'max_error':>10}")
    for name, x, w, pad, dy in layers:
        r = w.shape[-1]
        # the input gradient is the correlation of dy with the filters flipped and transposed: the same algorithm
        passes = [("forward", x, w, pad), ("input-grad", dy, np.ascontiguousarray(w[:, :, ::-1, ::-1].swapaxes(0, 1)),
                                           r - 1 - pad)]
        cases = [(what, direct_conv2d(inp.astype(np.float64), filt.astype(np.float64), p),
                  [("direct fp32", r * r, direct_conv2d(inp, filt, p, np.float32))]
                  + [(f"F({m}x{m},{r}x{r})", multiplications(m, r), conv2d(inp, filt, m, p)) for m in args.tiles])
                 for what, inp, filt, p in passes]
        # the weight gradient, in the transformed domain as the training step computes it
        cases.append(("weight-grad", direct_weight_grad(x.astype(np.float64), dy.astype(np.float64), r, pad),
                      [("direct fp32", r * r, direct_weight_grad(x, dy, r, pad, np.float32))]
                      + [(f"F({m}x{m},{r}x{r})", multiplications(m, r), weight_grad(x, dy, m, r, pad))
                         for m in args.tiles]))
        for what, exact, runs in cases:
            scale = float(np.sqrt(np.mean(exact ** 2)))
            for algo, mults, got in runs:
                diff = got.astype(np.float64) - exact
                print(f"{name:<8} {what:<11} {algo:<14} {mults:>8.2f} {np.sqrt(np.mean(diff ** 2)) / scale:>10.2e} "
                      f"{np.abs(diff).max() / scale:>10.2e}")

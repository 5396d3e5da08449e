"""Export a model file to ONNX with standard operators.

    proto = to_onnx(engine.load("model.npz"))      # python -m engine.export MODEL.npz OUT.onnx

The graph takes preprocessed float32 NCHW input (as `model.predict(..., preprocessed=True)`)
and returns class probabilities. Conv2d -> Conv; the flattened layers' vertical and
horizontal filters -> grouped Conv with (k,1) / (1,k) kernels and their zero padding
(cropping, when a stage's padding is negative, -> Slice); lateral -> 1x1 Conv;
MaxPool2d -> MaxPool (ceil_mode kept); Linear -> Gemm; dropout is dropped (inference).
Needs the `onnx` package (pip install onnx).
"""
import numpy as np

from .lowering import lower

OPSET = 13
IR_VERSION = 7


def _conv_nodes(helper, numpy_helper, name, x, w, b, pads, group=1, crop=None, stride=1):
    """A Conv node (weights as initializers) followed, if `crop` is given, by a Slice along axes 2 and 3."""
    nodes, inits = [], [numpy_helper.from_array(w.astype(np.float32), f"{name}.weight"),
                        numpy_helper.from_array(b.astype(np.float32), f"{name}.bias")]
    out = f"{name}.out"
    nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [out], name=name,
                                  kernel_shape=list(w.shape[2:]), pads=pads, group=group, strides=[stride] * 2))
    if crop:
        starts, ends = crop
        for suffix, arr in (("starts", starts), ("ends", ends), ("axes", [2, 3])):
            inits.append(numpy_helper.from_array(np.array(arr, dtype=np.int64), f"{name}.crop_{suffix}"))
        nodes.append(helper.make_node("Slice", [out, f"{name}.crop_starts", f"{name}.crop_ends", f"{name}.crop_axes"],
                                      [f"{name}.cropped"], name=f"{name}.crop"))
        out = f"{name}.cropped"
    return nodes, inits, out


def to_onnx(model):
    """Build an onnx.ModelProto for a loaded engine Model."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install onnx") from None
    nodes, inits = [], []
    x = "input"
    big = np.iinfo(np.int64).max
    for op in lower(model.net, model.input_shape):  # the shared lowering: one case per op kind
        name, layer = op.name, op.layer
        p = layer.params
        if op.kind == "conv":
            n, i, x = _conv_nodes(helper, numpy_helper, name, x, p["weight"], p["bias"], [layer.padding] * 4,
                                  stride=layer.stride)
        elif op.kind == "lateral":
            n, i, x = _conv_nodes(helper, numpy_helper, name, x, p["weight"][:, :, None, None], p["bias"],
                                  [0, 0, 0, 0])
        elif op.kind in ("vertical", "horizontal"):
            w, b = p["weight"], p["bias"]
            c, k = w.shape
            before, after = layer.before, layer.after
            pb, pa = max(before, 0), max(after, 0)
            crop = None
            if before < 0 or after < 0:
                cb, ca = max(-before, 0), max(-after, 0)
                starts, ends = [0, 0], [big, big]
                axis = 0 if op.kind == "vertical" else 1
                starts[axis], ends[axis] = cb, -ca if ca else big
                crop = (starts, ends)
            if op.kind == "vertical":
                n, i, x = _conv_nodes(helper, numpy_helper, name, x, w.reshape(c, 1, k, 1), b, [pb, 0, pa, 0],
                                      group=c, crop=crop)
            else:
                n, i, x = _conv_nodes(helper, numpy_helper, name, x, w.reshape(c, 1, 1, k), b, [0, pb, 0, pa],
                                      group=c, crop=crop)
        elif op.kind == "pool":
            n, i = [helper.make_node("MaxPool", [x], [f"{name}.out"], name=name, kernel_shape=[layer.k] * 2,
                                     strides=[layer.stride] * 2, ceil_mode=int(layer.ceil_mode))], []
            x = f"{name}.out"
        elif op.kind == "relu":
            n, i = [helper.make_node("Relu", [x], [f"{name}.out"], name=name)], []
            x = f"{name}.out"
        elif op.kind == "flatten":
            n, i = [helper.make_node("Flatten", [x], [f"{name}.out"], name=name, axis=1)], []
            x = f"{name}.out"
        elif op.kind == "linear":
            i = [numpy_helper.from_array(p["weight"].astype(np.float32), f"{name}.weight"),
                 numpy_helper.from_array(p["bias"].astype(np.float32), f"{name}.bias")]
            n = [helper.make_node("Gemm", [x, f"{name}.weight", f"{name}.bias"], [f"{name}.out"], name=name,
                                  transB=1)]
            x = f"{name}.out"
        elif op.kind == "dropout":
            continue
        else:
            raise ValueError(f"ONNX export: layer {name} of type {type(layer).__name__} is not supported")
        nodes += n
        inits += i
    nodes.append(helper.make_node("Softmax", [x], ["probabilities"], name="softmax", axis=1))
    c, h, w = model.input_shape
    graph = helper.make_graph(
        nodes, "flatnet", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c, h, w])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(model.classes)])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="flatnet")
    proto.ir_version = IR_VERSION  # what opset 13 needs; newer onnx writes newer IRs than runtimes read
    proto.metadata_props.add(key="classes", value=",".join(model.classes))
    onnx.checker.check_model(proto)
    return proto

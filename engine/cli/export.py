"""python -m engine.export MODEL.npz OUT.onnx: a model file as an ONNX graph (engine.onnx_export.to_onnx).

The graph takes preprocessed float32 NCHW input (as `model.predict(..., preprocessed=True)`)
and returns class probabilities. Needs the `onnx` package (pip install onnx).
"""
import argparse
import sys

from ..onnx_export import to_onnx
from .common import MODEL_HELP, Parser, fail, load_model, needs, writable_file


def main(argv=None):
    p = Parser(prog="python -m engine.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("out", help="ONNX file to write")
    args = p.parse_args(argv)
    writable_file(args.out)
    model = load_model(args.model)
    onnx = needs("onnx", "ONNX export", "pip install onnx")
    proto = to_onnx(model)
    try:
        onnx.save(proto, args.out)
    except OSError as e:
        fail(f"cannot write {args.out}: {e}")
    print(f"wrote {args.out}: {len(proto.graph.node)} nodes, input (N, {', '.join(map(str, model.input_shape))}) "
          f"preprocessed, output probabilities over {len(model.classes)} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

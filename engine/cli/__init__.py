"""The command-line tools: one module per command (bench: a package, one module per subcommand), each a
thin layer over the library.

    python -m engine.predict   classify image files or a .npy batch with a model file
    python -m engine.evaluate  test accuracy of a model file on a data set
    python -m engine.export    a model file to ONNX
    python -m engine.filters   draw a flattened layer's reconstructed 3D filters
    python -m engine.figures   the paper's figures from finished runs
    python -m engine.bench     speed and memory, beside PyTorch and onnxruntime
    python -m engine.selftest  check a backend (the GPU) on this machine

Library functions raise exceptions; these modules turn them into one-line errors
(``common.fail``). Only these modules import ``models/`` (the paper's networks and
recipes); the library (the rest of ``engine``) never imports them.
"""

#!/usr/bin/env python
"""Train the paper's baseline or flattened network: `python train.py --help` explains every flag.

The command lives in engine/cli/train.py; this file runs it from a checkout.
"""
import sys

from engine.cli.train import main

if __name__ == "__main__":
    sys.exit(main())

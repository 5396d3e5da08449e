"""`python -m engine.evaluate`: the command lives in engine/cli/evaluate.py (importing this module runs nothing)."""
if __name__ == "__main__":
    import sys

    from engine.cli.evaluate import main
    sys.exit(main())

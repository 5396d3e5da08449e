"""`python -m engine.figures`: the command lives in engine/cli/figures.py (importing this module runs nothing)."""
if __name__ == "__main__":
    import sys

    from engine.cli.figures import main
    sys.exit(main())

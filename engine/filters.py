"""`python -m engine.filters`: the command lives in engine/cli/filters.py (importing this module runs nothing)."""
if __name__ == "__main__":
    import sys

    from engine.cli.filters import main
    sys.exit(main())

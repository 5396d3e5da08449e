"""`python -m engine.bench`: the command lives in engine/cli/bench/ (importing this module runs nothing)."""
if __name__ == "__main__":
    import sys

    from engine.cli.bench import main
    sys.exit(main())

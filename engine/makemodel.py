"""`python -m engine.makemodel`: the command lives in engine/cli/makemodel.py (importing this module runs nothing)."""
if __name__ == "__main__":
    import sys

    from engine.cli.makemodel import main
    sys.exit(main())

"""`python -m engine.selftest`: the command lives in engine/cli/selftest.py (importing this module runs nothing)."""
if __name__ == "__main__":
    import sys

    from engine.cli.selftest import main
    sys.exit(main())

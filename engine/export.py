"""`python -m engine.export`: the command lives in engine/cli/export.py (importing this module runs nothing)."""
if __name__ == "__main__":
    import sys

    from engine.cli.export import main
    sys.exit(main())

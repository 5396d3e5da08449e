"""`python -m engine.predict`: the command lives in engine/cli/predict.py (importing this module runs nothing)."""
if __name__ == "__main__":
    import sys

    from engine.cli.predict import main
    sys.exit(main())

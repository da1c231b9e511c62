"""Shim: evaluation is `python -m automoe.evaluate` (automoe/evaluate.py); this path runs the same command."""

from automoe.evaluate import main

if __name__ == "__main__":
    main()

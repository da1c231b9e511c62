"""Shim: text generation is `python -m automoe.generate` (automoe/generate.py); this path runs the same command."""

from automoe.generate import main

if __name__ == "__main__":
    main()

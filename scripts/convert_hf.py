"""Shim: the converter is the command `python -m automoe.convert` (installed as `automoe-convert`)."""

from automoe.convert import main

if __name__ == "__main__":
    main()

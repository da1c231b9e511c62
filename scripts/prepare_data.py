"""Shim: corpus -> token file is `python -m automoe.prepare_data` (automoe/prepare_data.py); this path keeps old
commands working."""

from automoe.prepare_data import main

if __name__ == "__main__":
    main()

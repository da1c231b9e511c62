"""Shim: the layout planner is `python -m automoe.plan` (automoe/plan.py); this path keeps old commands working."""

from automoe.plan import main

if __name__ == "__main__":
    main()

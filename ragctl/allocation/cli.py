"""Moved to `ragctl.cli` (`ragctl/cli/allocate.py`); kept only because `ragctl/evaluation/cli.py`
still imports `load_plan_option` from here. Delete once it imports `ragctl.cli.common`."""

from ragctl.cli.common import load_plan_option

__all__ = ["load_plan_option"]

"""Grids: many cells, on local worker processes or Ray, resumable, with one writer.

- :mod:`~harness.scheduler.gridfile`: the YAML grid file, parsed with line-numbered errors.
- :mod:`~harness.scheduler.cells`: the product of the axes, each cell resolved and planned.
- :mod:`~harness.scheduler.executors`: local per-device workers and Ray tasks.
- :mod:`~harness.scheduler.run`: :func:`run_grid`.
"""

from harness.scheduler.cells import Cell, expand, plan
from harness.scheduler.gridfile import GridError, GridSpec, load_grid
from harness.scheduler.run import GridSummary, run_grid

__all__ = ["Cell", "GridError", "GridSpec", "GridSummary", "expand", "load_grid", "plan", "run_grid"]

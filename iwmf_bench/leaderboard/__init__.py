"""Leaderboards rendered from cell records, and the regression check CI runs.

Per model: rows are defenses; columns are the FRR on genuine images after purification,
the FAR under each threat model (single-shot, with 95% Wilson intervals), and seconds
per image of purification. Written as Markdown (tabulate), CSV and JSON; each cell's
record is also kept as one JSON file (``cells/``), which is what the check compares.

One concern per module: :mod:`.cells` (reading a record), :mod:`.tables` (the tables and
rankings; the worst case and the ranking rules are :mod:`iwmf_bench.ranking`, the
equal-utility section :mod:`iwmf_bench.equal_utility`), :mod:`.notes` (notes and sanity
rules), :mod:`.deployments` (random defenses' deployments and known randomness),
:mod:`.check` (provenance, staleness, the regression check) and :mod:`.render` (files).
"""

from ..pipeline.outcome import metrics_of
from ..ranking import budget_order, worst_case
from .cells import cell_display, cell_file, checked_rates, success
from .check import check, committed_suite_cells, provenance, staleness
from .deployments import deployment_notes
from .notes import first_per_defense, sanity_notes, weaker_than_reference
from .render import render
from .tables import tables

__all__ = ["budget_order", "cell_display", "cell_file", "check", "checked_rates", "committed_suite_cells",
           "deployment_notes", "first_per_defense", "metrics_of", "provenance", "render", "sanity_notes", "staleness", "success",
           "tables", "weaker_than_reference", "worst_case"]

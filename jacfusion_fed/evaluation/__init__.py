"""Paper-style evaluation: tables (Tables 1-7 layout), curves (Figures 4/6/7), TwoMoon heatmaps
(Figures 2-3), gamma selection on a validation split.

Entry points for the CLI: :func:`run_evaluation` (``EvaluationConfig -> EvaluationResult``) and
:func:`write_reports` (Markdown, CSV, JSON, PNG).
"""

from .config import (
    PRESETS,
    ColumnSpec,
    EvaluationConfig,
    SweepSpec,
    TablePreset,
    config_from_options,
)
from .gamma import GAMMA_CANDIDATES, gamma_scores, select_gamma
from .reports import write_reports
from .results import Column, Curve, EvaluationResult, Row, Table
from .runner import run_evaluation
from .tables import arrows, intervals, table_to_csv, table_to_markdown

__all__ = [
    "GAMMA_CANDIDATES",
    "PRESETS",
    "Column",
    "ColumnSpec",
    "Curve",
    "EvaluationConfig",
    "EvaluationResult",
    "Row",
    "SweepSpec",
    "Table",
    "TablePreset",
    "arrows",
    "config_from_options",
    "gamma_scores",
    "intervals",
    "run_evaluation",
    "select_gamma",
    "table_to_csv",
    "table_to_markdown",
    "write_reports",
]

"""Evaluating and analysing sweeps: answers, predictions, accuracy curves and reports.

- `evaluate` (`qalign eval`): check every proposal with its task, store the verdicts in `answers`.
- `data`: load a run's independent samples or chain trajectories with their verdicts.
- `predict` (pure): MV, WMV, BoN, MBR and QAlign predictions; accuracy curves over budgets with
  bootstrap intervals and compute (tokens, FLOPs).
- `convergence`: R-hat and bulk/tail ESS of the chains' state reward and length, per prompt and
  pooled per run (`qalign sweep status`, `qalign report`).
- `report` (`qalign predict`, `qalign report`): curves per run and method; Markdown + PNG report.
"""

from qalign.analysis.data import AnalysisError, NotEvaluatedError
from qalign.analysis.predict import (
    METHODS,
    Point,
    Sample,
    Trajectory,
    independent_curve,
    qalign_curve,
)

__all__ = [
    "METHODS",
    "AnalysisError",
    "NotEvaluatedError",
    "Point",
    "Sample",
    "Trajectory",
    "independent_curve",
    "qalign_curve",
]

"""Settings shared by the exit-classifier experiment's two halves: ``exit_classifier_features.py`` (collects
states and features) and ``exit_classifier_analysis.py`` (fits classifiers on them). Kept apart so that the
analysis does not import the collection script (and the other way round only to run the analysis)."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: where the collected states and features go
WORK = Path("/tmp/ltt-exit-classifier")
#: the affine exit adapters fitted by ``bench_adapters.py``
ADAPTERS = Path("/tmp/ltt-bench-adapters/affine.safetensors")
#: first consulted layer of the experiment
MIN_EXIT = 12
#: per-(token, layer) feature columns of the collected arrays, in order
FEATURES = ("p1", "p2", "margin", "entropy", "eq_prev_chain", "run_chain", "eq_prev_view", "prev_p_top",
            "prev_margin_view", "cos_raw", "cos_adapted", "log_k")

"""Early-exit decoding (stage 1 of ltt-exit): ``EarlyExitDecoder`` and its parts.

    from ltt_exit.decode import EarlyExitDecoder, SCORERS, PRUNINGS

The exit rule itself (which layers consult a head, the threshold test, state propagation, the cost
account) is :mod:`ltt_exit.decode.exit_rule`; every decoding path calls it. docs/architecture.md maps
the other files.
"""
from .backends import BACKENDS, DecoderOnlyBackend, ExitBackend, T5Backend
from .decoder import CONFIG_SCHEMA_VERSION, EarlyExitDecoder
from .fast import FastEarlyExitDecoder
from .outputs import CostAccount, DecodedSequence
from .pruning import (
    PRUNINGS,
    DecayingPruning,
    FixedPruning,
    NoPruning,
    ShortlistPruning,
    VocabPruning,
    keep_best,
    resolve_pruning,
)
from .schedule import ThresholdSchedule
from .scorers import (
    SCORERS,
    ConfidenceScorer,
    ExitView,
    HiddenCosine,
    JSDContrastive,
    SoftmaxMargin,
    SoftmaxMax,
    WeightedContrastive,
    resolve_scorer,
)

__all__ = [
    "EarlyExitDecoder",
    "FastEarlyExitDecoder",
    "DecodedSequence",
    "CostAccount",
    "SCORERS",
    "PRUNINGS",
    "BACKENDS",
    "ConfidenceScorer",
    "ExitView",
    "SoftmaxMax",
    "SoftmaxMargin",
    "HiddenCosine",
    "WeightedContrastive",
    "JSDContrastive",
    "VocabPruning",
    "NoPruning",
    "FixedPruning",
    "DecayingPruning",
    "ShortlistPruning",
    "keep_best",
    "ThresholdSchedule",
    "ExitBackend",
    "T5Backend",
    "DecoderOnlyBackend",
    "resolve_scorer",
    "resolve_pruning",
    "CONFIG_SCHEMA_VERSION",
]

"""Exit adapters: per-layer maps applied to the hidden state h_ℓ before the exit head.

A model that was not trained for early exit predicts poorly from its intermediate layers: the
residual stream after layer ℓ is not yet in the "language" the final norm and LM head read. An exit
adapter A_ℓ maps h_ℓ towards the final hidden state h_L, and the exit head then reads
``head(A_ℓ(h_ℓ))`` instead of ``head(h_ℓ)``. The backbone, the last layer and the head stay frozen, so
the full model's output Y_full — what a certificate's guarantee compares against — never changes;
an adapter only changes *which* tokens leave early and with which prediction.

Two kinds of per-layer map (``LAYER_MAPS``, selected by name):

* ``affine``  — A(h) = W h + b, W (d, d). Fitted in closed form (:func:`RidgeStatistics.solve`):
  ridge regression of h_L on h_ℓ, shrunk towards the identity, solved per layer from accumulated
  second-moment statistics (memory O(L d²), independent of the number of prompts).
* ``low-rank`` — A(h) = h + U (D h) + c, D (r, d), U (d, r). Trained with a distillation loss
  (KL from the final layer's distribution to the adapted exit head's) for a few hundred steps
  (:func:`train_low_rank`). U = 0, c = 0 is the identity.

The package's files follow its concepts:

* ``maps.py``       — the per-layer maps (``LayerMap``, ``AffineMap``, ``LowRankMap``, ``LAYER_MAPS``)
* ``fitting.py``    — the ridge fit (``RidgeStatistics``), the distillation fit (``train_low_rank``,
  ``TokenReservoir``) and ``ExitFitData``, which streams fitting prompts through the model once for both
* ``states.py``     — state collection (``collect_states``, ``StateBatch``, ``head_logits``)
* ``classifier.py`` — the exit classifier (``fit_exit_classifier`` and its samples and fit)
* ``file.py``       — the adapter file: ``ExitAdapters``, its format version and fingerprint
* ``overlap.py``    — the fitting examples' hashes and the calibration-overlap checks (``ExampleHashes``,
  ``fitting_set``, ``fit_set_digest``)
* ``errors.py``     — ``AdapterMismatch`` and ``CalibrationOverlap``

An :class:`ExitAdapters` object holds one map per adapted layer (1-based; layers without a map and the
last layer pass h_ℓ through unchanged), the fingerprint of the model it was fitted for, and where its
fitting prompts came from. It is what ``EarlyExitDecoder(..., exit_adapters=...)`` takes
(``apply(layer, hidden)``, ``describe()``). Files are safetensors with a JSON header in the metadata;
the file's own fingerprint covers the tensors and the header, and loading refuses a file that was
edited, or that was fitted for another model.

The fitting prompts must not be calibration prompts: the certificate's guarantee needs calibration
examples the decoder (adapters included) did not see. The file keeps hashes of the fitting examples
(ids, prompts, long text fields); :meth:`ExitAdapters.check_disjoint` refuses a calibration set that
shares any of them, and :func:`fitting_set` refuses to draw fitting prompts from the calibration split
unless the calibration sample is excluded.
"""
from .classifier import (
    DEFAULT_CLASSIFIER_FEATURES,
    exit_classifier_samples,
    fit_exit_classifier,
    fit_logistic_exit_model,
)
from .errors import AdapterMismatch, CalibrationOverlap
from .file import ADAPTER_FORMAT_VERSION, ExitAdapters, check_disjoint, resolve_exit_adapters
from .fitting import ExitFitData, RidgeStatistics, TokenReservoir, train_low_rank
from .maps import LAYER_MAPS, AffineMap, LayerMap, LowRankMap
from .overlap import ExampleHashes, fit_set_digest, fitting_set
from .states import StateBatch, collect_states, head_logits

__all__ = [
    "ADAPTER_FORMAT_VERSION",
    "LAYER_MAPS",
    "AdapterMismatch",
    "CalibrationOverlap",
    "LayerMap",
    "AffineMap",
    "LowRankMap",
    "ExitAdapters",
    "ExampleHashes",
    "StateBatch",
    "collect_states",
    "head_logits",
    "RidgeStatistics",
    "TokenReservoir",
    "ExitFitData",
    "train_low_rank",
    "fitting_set",
    "fit_set_digest",
    "DEFAULT_CLASSIFIER_FEATURES",
    "exit_classifier_samples",
    "fit_logistic_exit_model",
    "fit_exit_classifier",
    "resolve_exit_adapters",
    "check_disjoint",
]

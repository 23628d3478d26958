"""Certify the threshold of *any* thresholded system from a loss matrix — no model, no torch.

The system here is a two-model cascade: a cheap classifier answers when its confidence is at
least λ, otherwise an expensive one answers. The loss of an example at threshold λ is 1 when the
cascade's answer differs from the expensive model's answer (what you would have got without the
cascade), else 0. We want the smallest λ (the most cheap answers) such that, with probability
1 − ε over the calibration data, the disagreement rate on new data is at most δ.

Run: python examples/certify_custom_scorer.py
"""
from __future__ import annotations

import numpy as np

from ltt_exit.certify import certify
from ltt_exit.loss_table import LossTable

rng = np.random.default_rng(7)
n = 2000
# calibration data: the cheap model's confidence, and whether it agrees with the expensive model
confidence = rng.beta(5, 2, size=n)
agrees = rng.random(n) < 0.5 + 0.5 * confidence  # more confident -> more often right

# the candidate grid, fixed before looking at the data: most conservative (largest λ) first
lambdas = np.round(np.arange(1.0, 0.39, -0.05), 2)

# one data contract: losses[i, j] is the loss of example i at lambdas[j]
answered_cheaply = confidence[:, None] >= lambdas[None, :]
losses = (answered_cheaply & ~agrees[:, None]).astype(float)
cost = 1.0 - answered_cheaply.mean(axis=0)  # share of calls to the expensive model

certificate = certify(losses, lambdas, delta=0.05, epsilon=0.05, pvalue="binomial", costs=cost,
                      metadata={"system": "two-model cascade", "loss": "disagreement with the big model"})
print(certificate.summary())
if certificate.certified_any:
    j = certificate.chosen_index
    print(f"expensive-model calls at λ̂: {cost[j]:.1%} (instead of 100%)")

# the same losses as a loss table file, so that ltt-calibrate and ltt-report can use it:
LossTable(losses, lambdas, [f"q{i}" for i in range(n)], {"metric": "disagreement"},
          candidate_columns={"expensive_calls": 1.0 - answered_cheaply.astype(float)}
          ).save("cascade_losses.parquet")
print("wrote cascade_losses.parquet — try: ltt-calibrate --delta 0.05 --epsilon 0.05 "
      "--table cascade_losses.parquet --pvalue binomial --cost-column expensive_calls")

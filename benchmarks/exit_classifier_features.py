"""Feasibility of a learned early-exit classifier (CALM's third confidence measure) on SmolLM2-135M / SAMSum.

    python3 benchmarks/exit_classifier_features.py collect     # states -> per-(token, layer) features (npz)
    python3 benchmarks/exit_classifier_features.py analyse     # logistic models vs softmax margin

Teacher-forced: the full model greedy-decodes each prompt (``collect_states``), and at every generated position
and consulted layer ℓ (min exit layer 12 .. 29) the exit decision's inputs are computed exactly as the decoder
computes them: the exit head (raw, or after the affine exit adapters of ``bench_adapters.py``), decaying pruning
(k_max 1000, k_min 10) chained over the consulted layers, the softmax over the pruned set. Three prompt sets:

* ``clf``: 120 SAMSum *test* prompts drawn after the 200 the adapters were fitted on (same seeded sample): the
  classifier's training data (the fitting split, never the calibration split);
* ``adapt``: 40 of the adapters' own fitting prompts (to see how in-sample adapted heads differ);
* ``heldout``: validation prompts 100..219 of seed 0 (the calibration sample is the first 100; the bench's
  held-out 30 are the first 30 of these).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from exit_classifier_setup import ADAPTERS, MIN_EXIT, REPO, WORK  # this script's folder is on sys.path


def log(message):
    print(message, flush=True)


def features_of(backend, batch, adapters, L, pruning):
    """(T, L - MIN_EXIT, F) features and (T, L - MIN_EXIT) correctness of the decoder's exit prediction."""
    target = torch.tensor(batch.tokens)
    T = len(target)
    rows, correct = [], []
    set_ids = None
    prev_top = None
    run = torch.zeros(T)
    adapted_prev = None

    def adapt(layer, hidden):
        return hidden if adapters is None else adapters.apply(layer, hidden)

    adapted_prev = adapt(MIN_EXIT - 1, batch.hidden[MIN_EXIT - 1])
    for layer in range(MIN_EXIT, L):
        hidden = batch.hidden[layer]
        adapted = adapt(layer, hidden)
        pruned = pruning.select(layer, min_exit_layer=MIN_EXIT, num_layers=L, prev_ids=set_ids,
                                head=lambda ids, h=adapted: backend.head(h, ids))
        probs = torch.softmax(pruned.logits.double(), -1)
        top2 = probs.topk(2, -1).values
        entropy = -(probs * probs.clamp_min(1e-300).log()).sum(-1)
        best = pruned.logits.argmax(-1)
        top_id = best if pruned.ids is None else pruned.ids.gather(-1, best[:, None])[:, 0]
        if prev_top is None:
            eq_chain = torch.zeros(T)
            run = torch.zeros(T)
        else:
            eq_chain = (top_id == prev_top).double()
            run = (run + 1) * eq_chain
        # what an ExitView can compute: the previous layer's head over the *current* set S_ℓ
        prev_logits = backend.head(adapted_prev, pruned.ids).double()
        prev_probs = torch.softmax(prev_logits, -1)
        eq_view = (prev_logits.argmax(-1) == best).double()
        prev_p_top = prev_probs.gather(-1, best[:, None])[:, 0]
        prev_top2 = prev_probs.topk(2, -1).values
        cos_raw = torch.nn.functional.cosine_similarity(hidden.double(), batch.hidden[layer - 1].double(), dim=-1)
        cos_adapted = torch.nn.functional.cosine_similarity(adapted.double(), adapted_prev.double(), dim=-1)
        k = torch.full((T,), float(np.log(pruned.logits.shape[-1])))
        rows.append(torch.stack([top2[:, 0], top2[:, 1], top2[:, 0] - top2[:, 1], entropy, eq_chain, run, eq_view,
                                 prev_p_top, prev_top2[:, 0] - prev_top2[:, 1], cos_raw, cos_adapted, k], -1))
        correct.append(top_id == target)
        set_ids, prev_top, adapted_prev = pruned.ids, top_id, adapted
    return torch.stack(rows, 1).numpy(), torch.stack(correct, 1).numpy()


def collect(args):
    from ltt_exit.decode.adapters import ExitAdapters, collect_states, fitting_set
    from ltt_exit.decode.backends import backend_for
    from ltt_exit.models import load_model
    from ltt_exit.recipes import load_recipe

    WORK.mkdir(parents=True, exist_ok=True)
    loaded = load_model("smollm2-135m", device="cpu")
    backend = backend_for(loaded.model)
    L = backend.num_layers
    recipe = load_recipe("samsum")
    data_dir = REPO.parent / "shared" / "data"
    calibration = recipe.load(data_dir=data_dir, size=100, seed=0, family=loaded.family, tokenizer=loaded.tokenizer)
    validation = recipe.load(data_dir=data_dir, size=220, seed=0, family=loaded.family, tokenizer=loaded.tokenizer)
    fit_examples, _ = fitting_set(recipe, size=320, seed=1, split="test", data_files=data_dir / "samsum_test.jsonl",
                                  family=loaded.family, tokenizer=loaded.tokenizer, exclude=calibration)
    affine = ExitAdapters.load(ADAPTERS, model_fingerprint=loaded.fingerprint)
    from ltt_exit.decode.adapters import fit_set_digest
    assert fit_set_digest(fit_examples[:200]) == affine.fit_info["fit_set_sha256"], "adapter prompts differ"
    affine.check_disjoint(calibration)
    sets = {"clf": fit_examples[200:320], "adapt": fit_examples[:40], "heldout": validation.examples[100:220]}
    for name in args.sets.split(","):
        examples = sets[name]
        started = time.perf_counter()
        hiddens, finals, tokens, prompt_index, position = [], [], [], [], []
        with torch.inference_mode():
            for i, batch in enumerate(collect_states(loaded.model, loaded.tokenizer, [e.prompt for e in examples],
                                                     max_new_tokens=32, layers=range(MIN_EXIT - 1, L))):
                hiddens.append(torch.stack([batch.hidden[x] for x in range(MIN_EXIT - 1, L)], 1).numpy())
                finals.append(batch.final.numpy())
                tokens.extend(batch.tokens)
                prompt_index.extend([i] * len(batch.tokens))
                position.extend(range(len(batch.tokens)))
                if (i + 1) % 20 == 0:
                    log(f"  {name}: {i + 1}/{len(examples)} prompts ({time.perf_counter() - started:.0f}s)")
        # raw states h_11 .. h_29 (T, 19, d), the pre-norm final state (T, d) and the full model's tokens
        np.savez(WORK / f"{name}-states.npz", hidden=np.concatenate(hiddens), final=np.concatenate(finals),
                 tokens=np.array(tokens), prompt=np.array(prompt_index), position=np.array(position))
        log(f"{name}: {len(prompt_index)} tokens in {time.perf_counter() - started:.0f}s")


class _States:
    """A StateBatch-like view of tokens [start, stop) of one saved set."""

    def __init__(self, data, start, stop):
        hidden = data["hidden"][start:stop]
        self.hidden = {MIN_EXIT - 1 + i: torch.from_numpy(hidden[:, i].copy()) for i in range(hidden.shape[1])}
        self.tokens = data["tokens"][start:stop].tolist()


def features(args):
    """Per (kind, pruning): features and correctness from the saved states, as the decoder computes them."""
    from ltt_exit.decode import resolve_pruning
    from ltt_exit.decode.adapters import ExitAdapters
    from ltt_exit.decode.backends import backend_for
    from ltt_exit.models import load_model

    loaded = load_model("smollm2-135m", device="cpu")
    backend = backend_for(loaded.model)
    affine = ExitAdapters.load(ADAPTERS, model_fingerprint=loaded.fingerprint)
    for name in args.sets.split(","):
        data = dict(np.load(WORK / f"{name}-states.npz"))
        n = len(data["tokens"])
        arrays = {"prompt": data["prompt"], "position": data["position"]}
        for pruning_name in args.prunings.split(","):
            pruning = resolve_pruning(PRUNINGS[pruning_name])
            for kind, adapters in (("raw", None), ("affine", affine)):
                started = time.perf_counter()
                xs, ys = [], []
                with torch.inference_mode():
                    for start in range(0, n, 256):
                        x, y = features_of(backend, _States(data, start, start + 256), adapters, backend.num_layers,
                                           pruning)
                        xs.append(x)
                        ys.append(y)
                arrays[f"{kind}_{pruning_name}_x"] = np.concatenate(xs)
                arrays[f"{kind}_{pruning_name}_y"] = np.concatenate(ys)
                log(f"{name} {kind} {pruning_name}: {time.perf_counter() - started:.0f}s")
        np.savez(WORK / f"{name}-features.npz", **arrays)


PRUNINGS = {"decaying": "decaying", "none": "none", "fixed1000": ("fixed", {"k": 1000}),
            "fixed100": ("fixed", {"k": 100})}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["collect", "features", "analyse"])
    parser.add_argument("--prunings", default="decaying,none,fixed1000")
    parser.add_argument("--sets", default="heldout,clf,adapt")
    parser.add_argument("--hidden", action="store_true", help="also fit classifiers on the hidden state")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.what == "collect":
        collect(args)
    elif args.what == "features":
        features(args)
    else:
        from exit_classifier_analysis import analyse  # noqa: E402

        analyse(args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()

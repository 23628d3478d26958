"""ltt-fit-exits: fit exit adapters (per-layer maps before the exit head) for one model."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ltt_exit.cli._arguments import json_object
from ltt_exit.cli._run import ArgumentParser, CLIError, run_cli

PROG = "ltt-fit-exits"

DESCRIPTION = """\
Fit exit adapters for a model that was not trained for early exit.

An early-exit decoder predicts from an intermediate layer l with the model's own final norm and LM
head. A model not trained for that predicts poorly there, so a certified threshold ends up late and
the speed-up small. An exit adapter maps the hidden state h_l towards the final hidden state before
the head; the backbone, the last layer and the head stay frozen, so the full model's output (what
the certificate compares against) does not change.

Two kinds:
  affine    W h + b per layer, closed form: ridge regression of the final state on h_l, shrunk
            towards the identity, from statistics accumulated prompt by prompt (memory O(L d^2))
  low-rank  h + U D h + c per layer (rank r), trained for a few hundred steps to match the final
            layer's next-token distribution (KL distillation; a GPU when the model is on one)
  affine with --distill-steps N: the closed form, then fine-tuned with that distillation loss

Optionally (--exit-classifier) also an exit classifier for the scorer "exit-classifier" (CALM's learned
confidence): a logistic model of "layer l's prediction equals the full model's token" on features of the
adapted exit head (pruned softmax top-1/margin/entropy, agreement with layer l-1's head, cosine of
h_l and h_(l-1)). It is fitted on further prompts of the fitting pool (--classifier-size; never the
adapters' own prompts, on which the adapted heads look better than they are) with the decoder's
--pruning and --min-exit-layer, and stored in the same file, so the adapter fingerprint covers it.
--adapters PATH adds a classifier to an existing adapter file instead of fitting new adapters.

The fitting prompts are greedy-decoded by the full model and the states at every generated position
are the training data. They must NOT be calibration prompts: a certificate needs calibration examples
the decoder never saw. Therefore:
  * fit on another split than the recipe calibrates on (--split with --data-files of that split), or
  * name the calibration sample (--calibration-size/--calibration-seed, and --calibration-data-files
    for a hub recipe) and it is left out of the fitting pool -- the way for recipes with one split
    (aclsum-summary, gensim-*), which then fit on a seeded sample of the remaining rows.
Fitting on the recipe's calibration split without naming the calibration sample is refused. The file
keeps hashes of the fitting examples; check_disjoint() refuses a calibration set that shares any.

The output is a safetensors file holding the maps, the fingerprint of the model they were fitted for
and the fitting provenance. Use it with
  EarlyExitDecoder(model, tokenizer, exit_adapters=ExitAdapters.load(PATH, model_fingerprint=...))
The sweep and the certificate record its fingerprint with the decoder configuration; ltt-generate
refuses a different file.
"""

EPILOG = """\
examples:
  # SAMSum: fit on the test split, calibrate on validation (the recipe's split)
  ltt-fit-exits --recipe samsum --data-files ../shared/data/samsum_test.jsonl --split test \\
      --size 200 --max-new-tokens 32 --layers 10-29 --kind affine --out smollm2-samsum.affine.safetensors

  # trained low-rank adapters from the same prompts
  ltt-fit-exits --recipe samsum --data-files ../shared/data/samsum_test.jsonl --split test \\
      --size 200 --max-new-tokens 32 --layers 10-29 --kind low-rank --rank 32 --steps 300 \\
      --out smollm2-samsum.lowrank.safetensors

  # the closed form fine-tuned by distillation (keep the learning rate small; 1e-3 diverged on SmolLM2)
  ltt-fit-exits --recipe samsum --data-files ../shared/data/samsum_test.jsonl --split test \
      --size 500 --max-new-tokens 32 --layers 12-29 --kind affine --distill-steps 1500 \
      --learning-rate 1e-4 --batch-size 256 --max-train-tokens 65536 --out smollm2-samsum.tuned.safetensors

  # add an exit classifier to existing adapters (decoder: decaying pruning, min exit layer 12)
  ltt-fit-exits --recipe samsum --data-files ../shared/data/samsum_test.jsonl --split test \
      --adapters smollm2-samsum.affine.safetensors --classifier-size 120 --max-new-tokens 32 \
      --pruning decaying --min-exit-layer 12 --out smollm2-samsum.affine-clf.safetensors

  # one-split recipe: leave out the calibration sample (the first 100 of seed 0)
  ltt-fit-exits --recipe gensim-lee-continue --calibration-size 100 --size 150 \\
      --kind affine --out smollm2-lee.affine.safetensors
"""


def _layers(text: str) -> str:
    return text.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="where to write the adapter file (.safetensors)")
    parser.add_argument("--model", default="smollm2-135m",
                        help="model alias, local folder, .gguf file or hub id (default smollm2-135m)")
    parser.add_argument("--device", default=None, help="cpu, cuda, … (default: CUDA when present)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, … (default: the model's)")

    data = parser.add_argument_group("fitting prompts")
    data.add_argument("--recipe", default="samsum", help="calibration-set recipe name or YAML path (default samsum)")
    data.add_argument("--data-files", nargs="+", default=None, metavar="PATH",
                      help="local files of the fitting split (e.g. ../shared/data/samsum_test.jsonl)")
    data.add_argument("--split", default=None,
                      help="the fitting split (default: the recipe's own split, which is its calibration split "
                           "and is refused unless the calibration sample is named below)")
    data.add_argument("--size", type=int, default=200, help="number of fitting prompts (default 200)")
    data.add_argument("--sample-seed", type=int, default=1, help="seed of the fitting sample (default 1)")
    data.add_argument("--max-new-tokens", type=int, default=None,
                      help="greedy tokens decoded per prompt; their positions are the training data "
                           "(default: the recipe's budget)")

    calibration = parser.add_argument_group(
        "the calibration sample to keep out of fitting",
        "Naming the sample you will calibrate on makes the tool leave it out of the fitting pool (and shows "
        "that nothing overlaps when the splits differ).")
    calibration.add_argument("--calibration-size", type=int, default=None,
                             help="size n of the calibration sample (ltt-calibrate --size)")
    calibration.add_argument("--calibration-seed", type=int, default=0,
                             help="its sample seed (ltt-calibrate --sample-seed; default 0)")
    calibration.add_argument("--calibration-data-files", nargs="+", default=None, metavar="PATH",
                             help="its local files (hub recipes offline), e.g. ../shared/data/samsum_validation.jsonl")
    calibration.add_argument("--calibration-split", default=None, help="its split (default: the recipe's)")

    fit = parser.add_argument_group("the fit")
    fit.add_argument("--kind", choices=["affine", "low-rank"], default="affine",
                     help="affine: closed-form ridge fit (default); low-rank: trained with distillation")
    fit.add_argument("--layers", type=_layers, default="all",
                     help="layers to adapt: 'all' (1..L-1, default), 'A-B' or a comma list. Only layers at or "
                          "above the decoder's --min-exit-layer are ever used")
    fit.add_argument("--ridge", type=float, default=0.1,
                     help="affine: ridge strength relative to the mean input variance (default 0.1; large = "
                          "closer to the raw head, 0 = plain least squares)")
    fit.add_argument("--target", choices=["final", "final-normalized"], default="final",
                     help="affine: regress the pre-norm final state (default) or the final state divided by its "
                          "RMS (every token weighs the same)")
    fit.add_argument("--distill-steps", type=int, default=0,
                     help="affine: then fine-tune the closed-form maps for this many distillation steps (the "
                          "low-rank options below: --batch-size, --learning-rate, --vocabulary, --max-train-tokens); "
                          "default 0, the closed form alone")
    fit.add_argument("--rank", type=int, default=32, help="low-rank: rank r (default 32)")
    fit.add_argument("--steps", type=int, default=300, help="low-rank: training steps (default 300)")
    fit.add_argument("--batch-size", type=int, default=64, help="low-rank: tokens per step (default 64)")
    fit.add_argument("--learning-rate", type=float, default=3e-3, help="low-rank: Adam learning rate (default 3e-3)")
    fit.add_argument("--weight-decay", type=float, default=0.0,
                     help="low-rank: AdamW weight decay, pulling the map towards the identity (default 0)")
    fit.add_argument("--vocabulary", choices=["sampled", "full"], default=None,
                     help="low-rank: KL over the full vocabulary, or over the teacher's top ids plus random "
                          "ids (default: full on a GPU, sampled on the CPU)")
    fit.add_argument("--max-train-tokens", type=int, default=8192,
                     help="low-rank: tokens kept for training (uniform reservoir sample; default 8192)")
    fit.add_argument("--seed", type=int, default=0, help="low-rank: training seed (default 0)")

    clf = parser.add_argument_group("exit classifier (for --scorer exit-classifier)")
    clf.add_argument("--exit-classifier", action="store_true",
                     help="also fit an exit classifier and store it in the adapter file")
    clf.add_argument("--adapters", type=Path, default=None, metavar="PATH",
                     help="add the classifier to this existing adapter file instead of fitting adapters "
                          "(implies --exit-classifier; the result goes to --out)")
    clf.add_argument("--classifier-size", type=int, default=100,
                     help="fitting prompts for the classifier, drawn from the fitting pool after (and never "
                          "among) the adapters' own prompts (default 100)")
    clf.add_argument("--pruning", default="decaying",
                     help="the decoder's exit-head pruning (none, fixed, decaying; default decaying): the "
                          "classifier reads the pruned softmax, so fit it for the pruning you calibrate with")
    clf.add_argument("--pruning-params", type=json_object, default={}, metavar="JSON",
                     help="pruning parameters as JSON, e.g. '{\"k\": 2000}'")
    clf.add_argument("--min-exit-layer", type=int, default=15,
                     help="the decoder's first consulted layer (ltt-calibrate --min-exit-layer; default 15)")
    clf.add_argument("--classifier-l2", type=float, default=1e-3,
                     help="L2 penalty on the standardised weights (default 1e-3)")
    clf.add_argument("--classifier-per-layer", action="store_true",
                     help="one weight vector per layer (default: shared weights, one intercept per layer)")
    parser.add_argument("--batch-prompts", type=int, default=None, metavar="B",
                        help="prompts decoded together while collecting states (default 8 on the CPU, 16 on CUDA; "
                             "the states agree with one prompt at a time up to rounding)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; on a busy machine 1 can be much faster)")
    parser.add_argument("--quiet", action="store_true", help="print only the final summary")
    return parser


def parse_layers(text: str, num_layers: int) -> list[int]:
    """'all' | 'A-B' | 'a,b,c' -> sorted layer numbers in [1, L-1]; ValueError naming the problem."""
    text = text.strip().lower()
    if text == "all":
        return list(range(1, num_layers))
    layers: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                first, last = (int(x) for x in part.split("-", 1))
                layers.update(range(first, last + 1))
            else:
                layers.add(int(part))
    except ValueError:
        raise ValueError(f"--layers takes 'all', a range like 10-29 or a list like 10,12,14; got {text!r}") from None
    bad = sorted(x for x in layers if not 1 <= x < num_layers)
    if bad or not layers:
        raise ValueError(f"--layers must name layers in [1, {num_layers - 1}] (the last layer has no adapter); got {text!r}")
    return sorted(layers)


def _log(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def run(args) -> dict:
    import torch

    from ltt_exit.decode.adapters import ExitAdapters, ExitFitData, fit_exit_classifier, fitting_set
    from ltt_exit.models import load_model
    from ltt_exit.recipes import load_recipe

    if args.size < 1:
        raise ValueError(f"--size must be at least 1, got {args.size}")
    with_classifier = args.exit_classifier or args.adapters is not None
    if with_classifier and args.classifier_size < 1:
        raise ValueError(f"--classifier-size must be at least 1, got {args.classifier_size}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.batch_prompts is not None and args.batch_prompts < 1:
        raise ValueError(f"--batch-prompts must be at least 1, got {args.batch_prompts}")
    if args.distill_steps < 0 or (args.distill_steps and args.kind != "affine"):
        raise ValueError(f"--distill-steps takes a count >= 0 and goes with --kind affine; got "
                         f"{args.distill_steps} with --kind {args.kind}")
    recipe = load_recipe(args.recipe)
    started = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    from ltt_exit.pipeline import default_batch_prompts

    batch_prompts = args.batch_prompts or default_batch_prompts(loaded.device.type)
    _log(args, f"model {args.model!r}: {loaded.num_layers} layers, fingerprint {loaded.fingerprint[:19]}…")
    layers = parse_layers(args.layers, loaded.num_layers)
    exclude = None
    named = (args.calibration_size is not None or args.calibration_data_files is not None
             or args.calibration_split is not None)
    if named:
        exclude = recipe.load(size=args.calibration_size, seed=args.calibration_seed,
                              data_files=args.calibration_data_files, split=args.calibration_split,
                              family=loaded.family, tokenizer=loaded.tokenizer)
        _log(args, f"calibration sample kept out of fitting: {len(exclude)} examples of split {exclude.split!r}")
    max_new_tokens = args.max_new_tokens or recipe.max_new_tokens
    if args.adapters is not None:
        adapters = ExitAdapters.load(args.adapters, model_fingerprint=loaded.fingerprint)
        _log(args, f"adding an exit classifier to {args.adapters} ({adapters.kind}, layers "
                   f"{adapters.layers[0]}..{adapters.layers[-1]})")
        layers = adapters.layers
        n_prompts, n_tokens = adapters.fit_info.get("n_prompts"), adapters.fit_info.get("n_tokens")
    else:
        examples, info = fitting_set(recipe, size=args.size, seed=args.sample_seed, split=args.split,
                                     data_files=args.data_files, family=loaded.family, tokenizer=loaded.tokenizer,
                                     exclude=exclude)
        _log(args, f"fitting prompts: {len(examples)} of split {info['split']!r} ({info['source']}); "
                   f"{max_new_tokens} greedy tokens each; layers {layers[0]}..{layers[-1]}")
        trains = args.kind == "low-rank" or args.distill_steps > 0
        keep_tokens = args.max_train_tokens if trains else 0
        data = ExitFitData.collect(loaded, examples, info, max_new_tokens=max_new_tokens, layers=layers,
                                   max_train_tokens=keep_tokens, target=args.target, seed=args.seed,
                                   progress=not args.quiet, batch_size=batch_prompts)
        _log(args, f"collected {data.info['n_tokens']} token positions in {data.collect_seconds:.1f}s")
        vocabulary = args.vocabulary or ("full" if loaded.device.type == "cuda" else "sampled")
        if args.kind == "affine":
            distill = None
            if args.distill_steps:
                distill = {"steps": args.distill_steps, "batch_size": args.batch_size,
                           "learning_rate": args.learning_rate, "vocabulary": vocabulary, "seed": args.seed,
                           "log_every": 0 if args.quiet else max(1, args.distill_steps // 10)}
            adapters = data.affine(ridge=args.ridge, distill=distill)
        else:
            adapters = data.low_rank(rank=args.rank, steps=args.steps, batch_size=args.batch_size,
                                     learning_rate=args.learning_rate, weight_decay=args.weight_decay,
                                     vocabulary=vocabulary, seed=args.seed,
                                     log_every=0 if args.quiet else max(1, args.steps // 10))
        n_prompts, n_tokens = data.info["n_prompts"], data.info["n_tokens"]
    classifier_summary = None
    if with_classifier:
        # the classifier's prompts: the same seeded pool, minus the calibration sample and minus every prompt
        # the adapters were fitted on (on those the adapted heads agree more often than on new prompts)
        pool, pool_info = fitting_set(recipe, size=None, seed=args.sample_seed, split=args.split,
                                      data_files=args.data_files, family=loaded.family, tokenizer=loaded.tokenizer,
                                      exclude=exclude)
        fitted = adapters.example_hashes
        fresh = [e for e in pool if not fitted.overlaps(e, recipe=pool_info.get("recipe"),
                                                        source=pool_info.get("source"))][: args.classifier_size]
        if not fresh:
            raise ValueError("no prompts are left in the fitting pool for the exit classifier after leaving out the "
                             "adapters' own prompts and the calibration sample")
        if len(fresh) < args.classifier_size:
            _log(args, f"only {len(fresh)} prompts left for the classifier (asked for {args.classifier_size})")
        pool_info = pool_info | {"n_prompts": len(fresh)}
        _log(args, f"exit classifier: {len(fresh)} further prompts, pruning {args.pruning} "
                   f"{args.pruning_params or ''}, min exit layer {args.min_exit_layer}")
        adapters = fit_exit_classifier(loaded, adapters, fresh, pool_info, max_new_tokens=max_new_tokens,
                                       min_exit_layer=args.min_exit_layer,
                                       pruning=(args.pruning, args.pruning_params), l2=args.classifier_l2,
                                       per_layer=args.classifier_per_layer, progress=not args.quiet,
                                       batch_size=batch_prompts)
        record = adapters.fit_info["exit_classifier"]
        classifier_summary = {key: record[key] for key in ("n_prompts", "n_tokens", "min_exit_layer", "pruning",
                                                           "features")}
        classifier_summary["log_loss"] = record["method"]["log_loss"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    adapters.save(args.out)
    summary = {
        "out": str(args.out),
        "kind": adapters.kind,
        "fingerprint": adapters.fingerprint,
        "model_fingerprint": adapters.model_fingerprint,
        "layers": f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else layers,
        "n_prompts": n_prompts,
        "n_tokens": n_tokens,
        "exit_classifier": classifier_summary,
        "parameters": adapters.num_parameters(),
        "file_bytes": args.out.stat().st_size,
        "seconds": round(time.perf_counter() - started, 1),
        "device": str(loaded.device),
        "torch_threads": torch.get_num_threads(),
        "batch_prompts": batch_prompts,
    }
    return summary


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    from ltt_exit.decode.adapters import AdapterMismatch, CalibrationOverlap

    try:
        summary = run(args)
    except (AdapterMismatch, CalibrationOverlap) as err:
        raise CLIError(f"refused: {err}") from None
    print(json.dumps(summary, indent=2))
    return 0


def main(argv=None) -> int:
    """Entry point of ``ltt-fit-exits``: 0 ok, 2 bad input or refused (one line on stderr), 1 internal error."""
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())

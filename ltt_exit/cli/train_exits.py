"""ltt-train-exits: fine-tune a model so that its intermediate layers are exit points (an exit-ready model)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ltt_exit.cli._run import ArgumentParser, CLIError, run_cli

DESCRIPTION = """\
Fine-tune a model so that its early layers predict well through the model's own exit head.

A model that was not trained for early exit predicts poorly from its intermediate layers, so the
threshold ltt-calibrate certifies for it exits late and saves little. This command trains the model
(a LoRA adapter through peft by default, or every weight with --method full) so that every layer
l >= --min-layer predicts the next token through the shared head (decoder-only: final norm + LM
head; T5: final layer norm, the d_model^-0.5 rescale of tied embeddings, LM head), while an anchor
keeps the last layer close to the original model.

The loss (any weighted mix; docs/training.md has the formulas):
  --kl W        self-distillation: KL(original model's final distribution || layer l's head) on the
                original model's own greedy continuations of the training prompts (default 1)
  --ce W        CALM's per-layer cross-entropy on those continuations (default 0)
  --layer-weights linear|layerskip|uniform   w_l of layer l: proportional to l (CALM, default), to
                sum_{i<=l} i (LayerSkip), or equal; they sum to 1 over the active layers
  --anchor W    weight of the last layer's own terms (default 1)
  --curriculum none|rotational|gradual       LayerSkip's early-exit curricula: every R-th layer in
                turn (--rotation R), or layers switched on from the top down during training
  --layer-dropout P   LayerSkip's layer dropout, rate rising with depth to P at the last layer

Training prompts come from calibration-set recipes (--recipe, repeatable), exactly as ltt-fit-exits
draws its fitting prompts: a recipe's calibration split is refused unless the calibration sample is
named (--calibration-*) and left out; the manifest keeps hashes of every training prompt, and
ltt-calibrate refuses a calibration set that shares one. The original model's greedy continuations
are generated once (batched) and cached (--cache-dir) by model fingerprint, prompts and budget.

Training runs on the Hugging Face Trainer: bf16 on a GPU, gradient accumulation, seeded, a progress
bar, checkpoints under OUT/training (--resume continues the latest), and several GPUs with
  torchrun --nproc-per-node 4 -m ltt_exit.cli.train_exits ...   (or accelerate launch)
(--batch-size is per process; the global batch is batch-size x processes x grad-accumulation).

The output folder OUT is the exit-ready model: peft's adapter files (or a full model folder) and
manifest.json (base-model fingerprint, training configuration, training-data provenance and hashes),
plus training_curves.png (losses and per-layer teacher-forced agreement with the last layer).
Load it anywhere a model goes: load_model("OUT"), ltt-calibrate --model OUT, ltt-generate. The
adapter is merged into the base weights; the model's fingerprint is the merged weights', and a base
model whose fingerprint differs from the manifest's is refused.
"""

EPILOG = """\
examples:
  # the shipped smollm2-135m-exit adapter (on a GPU; docs/training.md): offline, license-clean prompts
  # (gensim Lee news + ACLSum abstracts), the default calibration sample (lee-news-quick, 100 of seed 0) left out
  ltt-train-exits --model smollm2-135m --recipe gensim-lee-continue --recipe gensim-lee --recipe aclsum-summary \\
      --calibration-recipe lee-news-quick --calibration-size 100 --max-new-tokens 48 --kl 1 --anchor 3 \\
      --lora-rank 16 --learning-rate 1e-3 --steps 200 --batch-size 32 --warmup-steps 20 --seed 0 --out smollm2-135m-exit

  # SAMSum: train on the test split, calibrate on validation (the recipe's own split)
  ltt-train-exits --recipe samsum:test --data-files ../shared/data/samsum_test.jsonl --steps 500 --out smollm2-samsum-exit

  # LayerSkip-style: cross-entropy, rotational curriculum, layer dropout up to 0.1, full fine-tune
  ltt-train-exits --recipe gensim-lee-continue --calibration-size 100 --ce 1 --kl 0 --layer-weights layerskip \\
      --curriculum rotational --rotation 4 --layer-dropout 0.1 --method full --learning-rate 1e-4 --out lee-layerskip

  # then certify and generate with it
  ltt-calibrate --model smollm2-samsum-exit --recipe samsum --data-files ../shared/data/samsum_validation.jsonl --size 500
"""


def _recipe_spec(text: str):
    from ltt_exit.train.data import RecipeSpec

    name, _, split = text.partition(":")
    if not name.strip():
        raise argparse.ArgumentTypeError(f"--recipe takes NAME or NAME:SPLIT, got {text!r}")
    return RecipeSpec(recipe=name.strip(), split=split.strip() or None)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="ltt-train-exits", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="the exit-ready model folder to write")
    parser.add_argument("--model", default="smollm2-135m",
                        help="base model: alias, local folder, .gguf file or hub id (default smollm2-135m)")
    parser.add_argument("--device", default=None, help="cpu, cuda, … (default: CUDA when present; torchrun: "
                                                        "cuda:LOCAL_RANK)")
    parser.add_argument("--dtype", default=None, help="the base weights' dtype (default: the model's; bf16 "
                                                      "autocast is separate, see --bf16)")

    data = parser.add_argument_group("training prompts")
    data.add_argument("--recipe", action="append", type=_recipe_spec, default=None, metavar="NAME[:SPLIT]",
                      help="calibration-set recipe (name or YAML path) and optionally the split to draw from; "
                           "repeat for several (default gensim-lee-continue)")
    data.add_argument("--data-files", nargs="+", default=None, metavar="PATH",
                      help="local files for the recipe (only with a single --recipe)")
    data.add_argument("--size", type=int, default=None,
                      help="prompts per recipe (default: every usable row not in the calibration sample)")
    data.add_argument("--sample-seed", type=int, default=1, help="seed of the prompts' sample (default 1)")
    data.add_argument("--save-prompts", type=Path, default=None, metavar="FILE",
                      help="only select the training prompts (recipes, exclusion) and write them to FILE, then stop: "
                           "for a training machine without the recipes' data packages")
    data.add_argument("--prompts-file", type=Path, default=None, metavar="FILE",
                      help="train on the prompts of a --save-prompts FILE instead of --recipe")
    data.add_argument("--max-new-tokens", type=int, default=48,
                      help="greedy tokens the original model continues each prompt with (default 48)")
    data.add_argument("--max-prompt-tokens", type=int, default=320,
                      help="longer prompts keep their last this-many tokens (default 320)")
    data.add_argument("--teacher-batch", type=int, default=None,
                      help="prompts generated together (default 64 on CUDA, 8 on the CPU)")
    data.add_argument("--cache-dir", default=None, help="cache of continuations (default $LTT_EXIT_CACHE or "
                                                        "~/.cache/ltt-exit)")

    cal = parser.add_argument_group(
        "the calibration sample to keep out of training",
        "Name the sample you will calibrate on: it is left out of every recipe's prompts (required when a "
        "recipe's split is its calibration split, e.g. the one-split gensim and ACLSum recipes).")
    cal.add_argument("--calibration-recipe", default=None,
                     help="its recipe (default: the first --recipe)")
    cal.add_argument("--calibration-size", type=int, default=None, help="its size n (ltt-calibrate --size)")
    cal.add_argument("--calibration-seed", type=int, default=0, help="its seed (ltt-calibrate --sample-seed; default 0)")
    cal.add_argument("--calibration-data-files", nargs="+", default=None, metavar="PATH", help="its local files")
    cal.add_argument("--calibration-split", default=None, help="its split (default: the recipe's)")

    loss = parser.add_argument_group("the loss")
    loss.add_argument("--kl", type=float, default=1.0, help="weight of the self-distillation KL (default 1)")
    loss.add_argument("--ce", type=float, default=0.0, help="weight of the per-layer cross-entropy (default 0)")
    loss.add_argument("--anchor", type=float, default=1.0, help="weight of the last layer's terms (default 1)")
    loss.add_argument("--min-layer", type=int, default=None,
                      help="first layer with an exit loss (default L/5, e.g. 6 of 30)")
    loss.add_argument("--layer-weights", default="linear", choices=["linear", "layerskip", "uniform"],
                      help="per-layer weights w_l (default linear: w_l proportional to l, as CALM)")
    loss.add_argument("--curriculum", default="none", choices=["none", "rotational", "gradual"],
                      help="which layers' exit losses count at each step (default none: all)")
    loss.add_argument("--rotation", type=int, default=2, help="R of the rotational curriculum (default 2)")
    loss.add_argument("--layer-dropout", type=float, default=0.0,
                      help="LayerSkip layer dropout at the last layer, scaled down with depth (default 0)")
    loss.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (default 1)")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--method", choices=["lora", "full"], default="lora",
                     help="lora: a peft LoRA adapter (default); full: every weight")
    opt.add_argument("--lora-rank", type=int, default=16, help="LoRA rank r (default 16)")
    opt.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (default 32)")
    opt.add_argument("--lora-targets", nargs="+", default=["all-linear"], metavar="NAME",
                     help="module names to adapt, e.g. q_proj v_proj (default all-linear: every linear layer "
                          "but the LM head)")
    opt.add_argument("--learning-rate", type=float, default=1e-3,
                     help="peak learning rate (default 1e-3; about 1e-4 for --method full)")
    opt.add_argument("--steps", type=int, default=None, help="optimiser steps (default: --epochs passes)")
    opt.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --steps is not given")
    opt.add_argument("--batch-size", type=int, default=32, help="sequences per step and process (default 32)")
    opt.add_argument("--grad-accumulation", type=int, default=1, help="gradient accumulation steps (default 1)")
    opt.add_argument("--warmup-steps", type=int, default=30, help="linear warm-up steps (default 30)")
    opt.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    opt.add_argument("--scheduler", default="cosine", help="transformers scheduler name (default cosine)")
    opt.add_argument("--seed", type=int, default=0, help="seed of initialisation, order and dropout (default 0)")
    opt.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                     help="bf16 autocast (default: on with CUDA)")
    opt.add_argument("--logging-steps", type=int, default=10, help="log (and record agreement) every N steps")
    opt.add_argument("--save-steps", type=int, default=200, help="checkpoint every N steps (default 200)")
    opt.add_argument("--adapter-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                     help="dtype of the saved LoRA tensors (default float16: half the size)")
    opt.add_argument("--resume", action="store_true", help="continue from the latest checkpoint under OUT/training")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _log(args, message: str) -> None:
    if not args.quiet and int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr, flush=True)


def _configs(args):
    from ltt_exit.train.losses import ExitLossConfig
    from ltt_exit.train.trainer import TrainConfig

    targets = args.lora_targets[0] if args.lora_targets == ["all-linear"] else tuple(args.lora_targets)
    train = TrainConfig(method=args.method, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                        lora_targets=targets, learning_rate=args.learning_rate, steps=args.steps,
                        epochs=args.epochs, batch_size=args.batch_size, grad_accumulation=args.grad_accumulation,
                        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, scheduler=args.scheduler,
                        seed=args.seed, bf16=args.bf16, logging_steps=args.logging_steps,
                        save_steps=args.save_steps, adapter_dtype=args.adapter_dtype)
    loss = ExitLossConfig(ce=args.ce, kl=args.kl, anchor=args.anchor, min_layer=args.min_layer or 1,
                          weights=args.layer_weights, curriculum=args.curriculum, rotation=args.rotation,
                          layer_dropout=args.layer_dropout, temperature=args.temperature)
    return train, loss


def _select_prompts(args, specs, loaded):
    """Training prompts from the recipes, the named calibration sample left out; (prompts, exclusion record)."""
    from ltt_exit.recipes import load_recipe
    from ltt_exit.train.data import training_prompts

    exclude = None
    if args.calibration_size is not None or args.calibration_data_files or args.calibration_split:
        cal_recipe = load_recipe(args.calibration_recipe or specs[0].recipe)
        exclude = cal_recipe.load(size=args.calibration_size, seed=args.calibration_seed,
                                  data_files=args.calibration_data_files, split=args.calibration_split,
                                  family=loaded.family, tokenizer=loaded.tokenizer)
        _log(args, f"calibration sample kept out: {len(exclude)} examples of {exclude.recipe!r} ({exclude.split!r})")
    prompts = training_prompts(specs, family=loaded.family, tokenizer=loaded.tokenizer, seed=args.sample_seed,
                               exclude=exclude)
    _log(args, f"training prompts: {len(prompts.prompts)} from "
               + ", ".join(f"{i['recipe']}:{i['split']} ({i['n_prompts']})" for i in prompts.info))
    excluded = None if exclude is None else {"recipe": exclude.recipe, "split": exclude.split, "n": len(exclude),
                                             "seed": exclude.seed, "fingerprint": exclude.fingerprint}
    return prompts, excluded


def run(args) -> dict:
    """Validate everything cheap first, then load, build the data, train and write the artefact."""
    import dataclasses

    train_config, loss_config = _configs(args)
    train_config.validate()  # lr <= 0, bad counts: before anything is loaded
    for name in ("max_new_tokens", "max_prompt_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.size is not None and args.size < 1:
        raise ValueError(f"--size must be >= 1; got {args.size}")
    specs = args.recipe or [_recipe_spec("gensim-lee-continue")]
    if args.data_files:
        if len(specs) != 1:
            raise ValueError("--data-files goes with a single --recipe")
        specs = [dataclasses.replace(specs[0], data_files=tuple(args.data_files))]
    specs = [dataclasses.replace(s, size=args.size) for s in specs]
    if args.out.exists() and (args.out / "manifest.json").exists() and not args.resume:
        raise ValueError(f"--out {args.out} already holds an exit-ready model; choose another folder or --resume")

    import torch

    from ltt_exit.models import load_model
    from ltt_exit.recipes import load_recipe
    from ltt_exit.train.data import teacher_sequences
    from ltt_exit.train.trainer import check_lora_targets, train_exits

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for spec in specs:
        load_recipe(spec.recipe)  # an unknown recipe fails before the model loads
    device = args.device
    if device is None and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    loaded = load_model(args.model, device=device, dtype=args.dtype, cache_dir=args.cache_dir)
    from ltt_exit.decode.backends import backend_for

    backend_for(loaded.model)  # an architecture the decoder cannot exit is refused here
    if loaded.exit_training is not None:
        raise ValueError(f"--model {args.model!r} is already an exit-ready model; train from its base "
                         f"{loaded.exit_training['base_model']['name']!r}")
    if args.method == "lora":
        check_lora_targets(loaded.model, train_config.lora_targets)
    if args.min_layer is None:
        loss_config.min_layer = max(1, loaded.num_layers // 5)
    loss_config.validate(loaded.num_layers)
    _log(args, f"model {args.model!r}: {loaded.num_layers} layers, fingerprint {loaded.fingerprint[:19]}…")

    if args.prompts_file is not None:
        from ltt_exit.train.data import TrainingPrompts

        prompts, excluded = TrainingPrompts.load(args.prompts_file, tokenizer=loaded.tokenizer)
        _log(args, f"training prompts: {len(prompts.prompts)} from {args.prompts_file}")
    else:
        prompts, excluded = _select_prompts(args, specs, loaded)
    if args.save_prompts is not None:
        prompts.save(args.save_prompts, tokenizer=loaded.tokenizer, exclusion=excluded)
        return {"saved_prompts": str(args.save_prompts), "n_prompts": len(prompts.prompts)}
    batch = args.teacher_batch or (64 if loaded.device.type == "cuda" else 8)
    if batch < 1:
        raise ValueError(f"--teacher-batch must be >= 1; got {batch}")
    sequences, teacher_info = teacher_sequences(loaded, prompts.prompts, max_new_tokens=args.max_new_tokens,
                                                max_prompt_tokens=args.max_prompt_tokens, batch_size=batch,
                                                cache_dir=args.cache_dir, progress=not args.quiet,
                                                # torchrun: rank 0 generates, the others read its cache
                                                wait_seconds=3600.0 if int(os.environ.get("RANK", "0")) else 0.0)
    _log(args, f"teacher continuations: {teacher_info['n_sequences']} sequences, {teacher_info['n_target_tokens']} "
               f"tokens ({'cached' if teacher_info['cached'] else 'generated'})")
    data = {"recipes": prompts.info, "sample_seed": args.sample_seed, "teacher": teacher_info,
            "calibration_excluded": excluded}
    summary = train_exits(loaded, sequences, loss_config, train_config, args.out, resume=args.resume,
                          progress=not args.quiet, manifest_extra=data, hashes=prompts.hashes)
    summary["n_prompts"] = len(prompts.prompts)
    summary["n_target_tokens"] = teacher_info["n_target_tokens"]
    return summary


PROG = "ltt-train-exits"


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    from ltt_exit.decode.adapters import CalibrationOverlap

    try:
        summary = run(args)
    except CalibrationOverlap as err:
        raise CLIError(f"refused: {err}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2, default=str))
    return 0


def main(argv=None) -> int:
    """Entry point of ``ltt-train-exits``: 0 ok, 2 bad input or refused (one line on stderr), 1 internal error."""
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())

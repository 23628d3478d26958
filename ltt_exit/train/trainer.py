"""Exit-ready fine-tuning on the Hugging Face ``Trainer``: our code is the loss and the data, not a loop.

``train_exits(loaded, sequences, loss_config, train_config, out)`` wraps the model in a peft LoRA
(default: every linear layer but the LM head) or trains it whole, and runs ``ExitTrainer`` — a
``Trainer`` whose only override is ``compute_loss`` (:class:`~ltt_exit.train.losses.ExitLoss`).
Everything else is the Trainer's: bf16 autocast on a GPU, gradient accumulation, seeding, the
progress bar, checkpoints (``<out>/training/checkpoint-N``) and resuming from them, and
``torchrun`` / ``accelerate launch`` over several processes (DDP; gloo on the CPU).

The teacher of the distillation term is the original model: with LoRA the same module with its
adapters disabled (no second copy in memory), with a full fine-tune a frozen copy.

``ExitProgress`` (a TrainerCallback) writes the loss terms and the per-layer teacher-forced top-1
agreement with the last layer, measured on the training batches, to ``training/metrics.jsonl`` at
every logging step and plots them to ``training/curves.png``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .losses import ExitLoss, ExitLossConfig, LayerDropout

__all__ = ["TrainConfig", "ExitTrainer", "ExitProgress", "Teacher", "linear_module_names",
           "check_lora_targets", "train_exits", "plot_curves"]


@dataclass
class TrainConfig:
    """The optimisation: method "lora" or "full"; LoRA rank/alpha/targets ("all-linear" or module
    names); steps (max optimiser steps; None: ``epochs`` passes); batch_size per process and device;
    grad_accumulation; bf16 (None: on CUDA); adapter_dtype of the saved LoRA tensors."""

    method: str = "lora"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] | str = "all-linear"
    learning_rate: float = 1e-3
    steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 32
    grad_accumulation: int = 1
    warmup_steps: int = 30
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    seed: int = 0
    bf16: bool | None = None
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 2
    adapter_dtype: str = "float16"

    def validate(self) -> None:
        """ValueError naming the bad option (CLI names)."""
        if self.method not in ("lora", "full"):
            raise ValueError(f"--method must be 'lora' or 'full'; got {self.method!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning-rate must be > 0; got {self.learning_rate}")
        if self.lora_rank < 1:
            raise ValueError(f"--lora-rank must be >= 1; got {self.lora_rank}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1; got {self.steps}")
        if self.steps is None and not self.epochs > 0:
            raise ValueError(f"--epochs must be > 0; got {self.epochs}")
        for name in ("batch_size", "grad_accumulation", "logging_steps", "save_steps", "save_total_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("--warmup-steps and --weight-decay must be >= 0")
        if self.adapter_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"--adapter-dtype must be float16, bfloat16 or float32; got {self.adapter_dtype!r}")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["lora_targets"] = self.lora_targets if isinstance(self.lora_targets, str) else list(self.lora_targets)
        return data


def linear_module_names(model: torch.nn.Module) -> set[str]:
    """Last name parts of the model's Linear modules other than the LM head (what LoRA targets name)."""
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")}


def check_lora_targets(model: torch.nn.Module, targets) -> None:
    """ValueError naming the LoRA targets that match no linear layer of ``model``."""
    if isinstance(targets, str):
        if targets == "all-linear":
            return
        targets = [targets]
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing or not targets:
        raise ValueError(f"--lora-targets {list(missing or targets)} name no linear layer of {type(model).__name__}; "
                         f"its linear layers are {sorted(available)} (or use 'all-linear')")


class Teacher:
    """The original model's final logits at the trained positions, without gradients."""

    def __init__(self, model: torch.nn.Module, *, frozen: torch.nn.Module | None, dropout: LayerDropout | None):
        self.model = model  # the peft model (adapters disabled for the teacher) when frozen is None
        self.frozen = frozen
        self.dropout = dropout

    @torch.no_grad()
    def __call__(self, inputs: dict[str, torch.Tensor], target_mask: torch.Tensor) -> torch.Tensor:
        paused = self.dropout.paused() if self.dropout is not None else contextlib.nullcontext()
        with paused:
            if self.frozen is not None:
                outputs = self.frozen(**inputs, use_cache=False)
            else:
                with self.model.disable_adapter():
                    outputs = self.model(**inputs, use_cache=False)
        return outputs.logits[target_mask]


class ExitTrainer(Trainer):
    """A Trainer whose loss is :class:`ExitLoss` (per-layer exit losses through the shared head)."""

    def __init__(self, *args, exit_loss: ExitLoss, teacher: Teacher | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.exit_loss = exit_loss
        self.teacher = teacher
        # our loss is a mean per batch: let the Trainer divide it by the accumulation steps
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        target_mask = inputs.pop("target_mask")
        targets = inputs.pop("targets")
        teacher_logits = self.teacher(inputs, target_mask) if self.teacher is not None else None
        outputs = model(**inputs, output_hidden_states=True, use_cache=False)
        loss = self.exit_loss(outputs, target_mask, targets, teacher_logits, step=self.state.global_step,
                              total_steps=max(1, self.state.max_steps))
        return (loss, outputs) if return_outputs else loss


def plot_curves(history: list[dict[str, Any]], path: Path, num_layers: int) -> None:
    """Loss terms and per-layer agreement against the step, one PNG (skipped, with a warning, without matplotlib:
    metrics.jsonl holds the same numbers)."""
    try:
        import matplotlib
    except ImportError:
        import warnings

        warnings.warn("matplotlib is not installed: no training_curves.png (metrics.jsonl has the numbers)",
                      stacklevel=2)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in history if "loss" in r]
    if not records:
        return
    steps = [r["step"] for r in records]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "loss_final", "loss_exits"):
        if any(key in r for r in records):
            left.plot(steps, [r.get(key, float("nan")) for r in records], label=key)
    left.set_xlabel("optimiser step")
    left.set_ylabel("loss")
    left.set_yscale("log")
    left.legend()
    left.set_title("training loss")
    layers = sorted({int(k.split("_")[1]) for r in records for k in r if k.startswith("agreement_")})
    shown = layers if len(layers) <= 8 else layers[:: max(1, len(layers) // 8)]
    colours = plt.cm.viridis([i / max(1, len(shown) - 1) for i in range(len(shown))])
    for colour, layer in zip(colours, shown):
        right.plot(steps, [r.get(f"agreement_{layer}", float("nan")) for r in records], color=colour,
                   label=f"layer {layer}")
    right.set_ylim(0, 1)
    right.set_xlabel("optimiser step")
    right.set_ylabel(f"top-1 agreement with layer {num_layers}")
    right.set_title("teacher-forced agreement (training batches)")
    right.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


class ExitProgress(TrainerCallback):
    """Adds the exit loss's running statistics to every log and writes metrics.jsonl + curves.png."""

    def __init__(self, exit_loss: ExitLoss, folder: Path, num_layers: int):
        self.exit_loss = exit_loss
        self.folder = Path(folder)
        self.num_layers = num_layers
        self.metrics = self.folder / "metrics.jsonl"
        self.history: list[dict[str, Any]] = []
        if self.metrics.is_file():  # a resumed run continues the same curves
            self.history = [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def on_train_begin(self, args, state, control, **kwargs):
        # a resumed run drops records logged after its checkpoint
        self.history = [r for r in self.history if r.get("step", 0) <= state.global_step]

    def on_log(self, args, state, control, logs=None, **kwargs):
        stats = self.exit_loss.take_stats()
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        record = {"step": state.global_step,
                  **{k: v for k, v in logs.items() if isinstance(v, (int, float))}, **stats}
        self.history.append(record)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.metrics.write_text("".join(json.dumps(r) + "\n" for r in self.history))

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_curves(self.history, self.folder / "curves.png", self.num_layers)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_curves(self.history, self.folder / "curves.png", self.num_layers)


def _layers_of(backend) -> list[torch.nn.Module]:
    return list(backend.decoder.block) if backend.family == "t5" else list(backend.layers)


def train_exits(loaded, sequences: Sequence, loss_config: ExitLossConfig, train_config: TrainConfig,
                out: str | os.PathLike[str], *, resume: bool | str = False, progress: bool = True,
                manifest_extra: dict[str, Any] | None = None, hashes: Any = None) -> dict[str, Any]:
    """Fine-tune ``loaded`` (a LoadedModel) on ``sequences`` and write the exit-ready artefact to ``out``.

    ``resume``: True (the latest checkpoint under ``out/training``) or a checkpoint path. ``manifest_extra``:
    the data provenance recorded in the manifest; ``hashes``: the training prompts' ExampleHashes. Returns a
    summary. ``loaded.model`` is trained in place (with LoRA, peft injects its layers into it).
    """
    from transformers import set_seed

    from ltt_exit.decode.backends import backend_for

    from .artifact import save_lora, write_manifest
    from .data import ExitCollator, ExitTrainingDataset

    train_config.validate()
    num_layers = loaded.num_layers
    loss_config.validate(num_layers)
    dataset = ExitTrainingDataset(sequences)
    out = Path(out)
    training_dir = out / "training"
    model = loaded.model
    if train_config.method == "lora":
        check_lora_targets(model, train_config.lora_targets)
    set_seed(train_config.seed)
    frozen = None
    if train_config.method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = train_config.lora_targets
        lora = LoraConfig(r=train_config.lora_rank, lora_alpha=train_config.lora_alpha, lora_dropout=0.0,
                          target_modules=targets if isinstance(targets, str) else list(targets), bias="none")
        model = get_peft_model(model, lora)
        inner = model.get_base_model()
    else:
        if loss_config.kl:
            frozen = copy.deepcopy(model).eval().requires_grad_(False)
        inner = model
    model.train()
    backend = backend_for(inner)
    dropout = LayerDropout(_layers_of(backend), loss_config.layer_dropout) if loss_config.layer_dropout else None
    exit_loss = ExitLoss(loss_config, num_layers, loaded.family, backend.head)
    teacher = Teacher(model, frozen=frozen, dropout=dropout) if loss_config.kl else None

    on_cuda = loaded.device.type == "cuda" or torch.cuda.is_available() and os.environ.get("LOCAL_RANK") is not None
    bf16 = on_cuda if train_config.bf16 is None else train_config.bf16
    args = TrainingArguments(
        output_dir=str(training_dir),
        per_device_train_batch_size=train_config.batch_size,
        gradient_accumulation_steps=train_config.grad_accumulation,
        learning_rate=train_config.learning_rate,
        max_steps=train_config.steps if train_config.steps is not None else -1,
        num_train_epochs=train_config.epochs,
        warmup_steps=train_config.warmup_steps,
        weight_decay=train_config.weight_decay,
        lr_scheduler_type=train_config.scheduler,
        logging_steps=train_config.logging_steps,
        save_steps=train_config.save_steps,
        save_total_limit=train_config.save_total_limit,
        seed=train_config.seed,
        data_seed=train_config.seed,
        bf16=bf16,
        use_cpu=not on_cuda,
        remove_unused_columns=False,
        report_to=[],
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        ddp_backend="gloo" if not on_cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,
    )
    if frozen is not None:
        frozen.to(args.device)
    tokenizer = loaded.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = ExitCollator(family=loaded.family, pad_token_id=int(pad),
                            decoder_start_token_id=int(getattr(loaded.model.config, "decoder_start_token_id", 0) or 0))
    callback = ExitProgress(exit_loss, training_dir, num_layers)
    trainer = ExitTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                          callbacks=[callback], exit_loss=exit_loss, teacher=teacher)
    if not progress:  # without a progress bar the Trainer prints every log to stdout; the caller's output is JSON
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume if resume else None)
    seconds = time.perf_counter() - started
    if dropout is not None:
        dropout.remove()
    model.eval()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    last = next((r for r in reversed(callback.history) if "loss" in r), {})
    summary = {
        "out": str(out),
        "method": train_config.method,
        "steps": trainer.state.global_step,
        "train_seconds": round(seconds, 1),
        "trainable_parameters": trainable,
        "final_loss": result.training_loss,
        "last_log": last,
        "world_size": args.world_size,
        "bf16": bf16,
    }
    if trainer.is_world_process_zero():
        if train_config.method == "lora":
            save_lora(model, out, dtype=getattr(torch, train_config.adapter_dtype))
            kind = "lora"
        else:
            model.save_pretrained(str(out))
            tokenizer.save_pretrained(str(out))
            kind = "full"
        training = {"loss": loss_config.to_json(), "optimisation": train_config.to_json(),
                    "world_size": args.world_size, "steps": trainer.state.global_step,
                    "train_seconds": round(seconds, 1), "trainable_parameters": trainable}
        write_manifest(out, kind=kind, base_name=loaded.name, base_fingerprint=loaded.fingerprint,
                       training=training, data=manifest_extra or {}, hashes=hashes,
                       metrics={"last_log": last}, base_dtype=str(loaded.dtype).removeprefix("torch."))
        if (training_dir / "curves.png").is_file():
            (out / "training_curves.png").write_bytes((training_dir / "curves.png").read_bytes())
    return summary

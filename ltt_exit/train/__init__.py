"""Exit-ready fine-tuning: train a model so that its intermediate layers are good exit points.

* :mod:`~ltt_exit.train.losses` — the objective (CALM's weighted per-layer cross-entropy, LayerSkip's
  early-exit loss with its curricula and layer dropout, self-distillation to the original model, a
  final-layer anchor), through the decoder's own exit head;
* :mod:`~ltt_exit.train.data` — prompts from recipes' fitting splits (disjoint from calibration
  samples), the original model's cached greedy continuations, batches;
* :mod:`~ltt_exit.train.trainer` — ``train_exits`` on the Hugging Face ``Trainer`` (LoRA via peft or
  a full fine-tune; checkpoints, resume, torchrun/accelerate) and the loss/agreement curves;
* :mod:`~ltt_exit.train.artifact` — the artefact (adapter or model folder + ``manifest.json``) and
  ``load_exit_ready``, which ``ltt_exit.models.load_model`` uses for such folders.

The command is ``ltt-train-exits`` (:mod:`ltt_exit.cli.train_exits`). This package imports torch.
"""

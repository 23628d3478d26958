"""End to end through the real entry points: ltt-calibrate decodes a model, ltt-generate applies the
certificate and refuses edited certificates, other models and other decoder configurations."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ltt_exit.decode.tiny_models import tiny_llama, tiny_word_tokenizer

VOCAB = 96


def _save_model(folder: Path, seed: int) -> Path:
    model = tiny_llama(vocab_size=VOCAB, num_layers=4, seed=seed)
    model.generation_config.eos_token_id = 1
    model.save_pretrained(folder)
    tiny_word_tokenizer(VOCAB).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    _save_model(root / "model", seed=0)
    _save_model(root / "other-model", seed=1)
    rng = np.random.default_rng(0)
    with open(root / "data.jsonl", "w") as handle:
        for i in range(40):
            words = " ".join(f"w{w}" for w in rng.integers(3, VOCAB - 1, size=6))
            handle.write(json.dumps({"id": f"row{i}", "text": words}) + "\n")
    (root / "recipe.yaml").write_text(
        "name: words\nsource:\n  kind: jsonl\nsplit: all\nfields:\n  id: id\n  text: text\n"
        "templates:\n  decoder-only: \"{text}\"\nreference: null\nmetric: rouge-l\nmax_new_tokens: 4\n"
        "sample:\n  seed: 0\n  size: null\n")
    return root


def _run(module: str, *args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          input=stdin, timeout=600)


def _calibrate(root: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    return _run("ltt_exit.cli.calibrate", "--delta", "0.3", "--epsilon", "0.2", "--model", str(root / "model"),
                "--recipe", str(root / "recipe.yaml"), "--data-files", str(root / "data.jsonl"),
                "--grid", "1,0.9,0.6,0.3,0", "--min-exit-layer", "1", "--pruning", "none",
                "--device", "cpu", "--cache-dir", str(root / "cache"), "--out", out, *extra, cwd=root)


def test_calibrate_generate_round_trip_and_refusals(workspace):
    root = workspace
    first = _calibrate(root, "cert.json")
    assert first.returncode == 0, first.stderr
    assert "sweeping 5 candidate thresholds over 40 prompts" in first.stderr
    assert "n = 40 calibration prompts" in first.stdout
    cert = json.loads((root / "cert.json").read_text())
    meta = cert["metadata"]
    assert meta["model_fingerprint"].startswith("sha256:")
    assert meta["decoder"]["min_exit_layer"] == 1 and meta["max_new_tokens"] == 4
    assert cert["n"] == 40 and cert["lambdas"] == [1.0, 0.9, 0.6, 0.3, 0.0]

    # same configuration again: the cached loss table is reused, no decoding
    second = _calibrate(root, "cert2.json", "--threads", "1")  # threads change speed, not the cached table
    assert second.returncode == 0, second.stderr
    assert "reusing the loss table" in second.stderr and "sweeping" not in second.stderr
    assert json.loads((root / "cert2.json").read_text())["lambda_hat"] == cert["lambda_hat"]

    # apply: decodes with the certified λ and reports per-token exits
    gen = _run("ltt_exit.cli.generate", "--certificate", "cert.json", "--model", str(root / "model"),
               "--device", "cpu", "--json", "w5 w6 w7", "w9 w10", cwd=root)
    assert gen.returncode == 0, gen.stderr
    rows = [json.loads(line) for line in gen.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["w5 w6 w7", "w9 w10"]
    for row in rows:
        assert len(row["exit_layers"]) == len(row["token_ids"]) >= 1
        assert all(1 <= layer <= 4 for layer in row["exit_layers"])
        assert row["flops_ratio"] > 0
    # --fast: the fast decoder under the same certificate gives the same tokens and exits
    fast = _run("ltt_exit.cli.generate", "--certificate", "cert.json", "--model", str(root / "model"),
                "--device", "cpu", "--json", "--fast", "w5 w6 w7", "w9 w10", cwd=root)
    assert fast.returncode == 0, fast.stderr
    fast_rows = [json.loads(line) for line in fast.stdout.splitlines()]
    assert [(r["token_ids"], r["exit_layers"]) for r in fast_rows] == [(r["token_ids"], r["exit_layers"]) for r in rows]

    # prompts from standard input
    piped = _run("ltt_exit.cli.generate", "--certificate", "cert.json", "--model", str(root / "model"),
                 "--device", "cpu", cwd=root, stdin="w3 w4\n")
    assert piped.returncode == 0, piped.stderr
    assert "mean exit layer" in piped.stdout and "the full model's FLOPs" in piped.stdout

    # a certificate edited by hand is refused
    edited = dict(cert, lambda_hat=0.0)
    (root / "edited.json").write_text(json.dumps(edited))
    refused = _run("ltt_exit.cli.generate", "--certificate", "edited.json", "--model", str(root / "model"),
                   "--device", "cpu", "w5", cwd=root)
    assert refused.returncode == 2 and "refused" in refused.stderr

    # another model is refused
    other = _run("ltt_exit.cli.generate", "--certificate", "cert.json", "--model", str(root / "other-model"),
                 "--device", "cpu", "w5", cwd=root)
    assert other.returncode == 2 and "not the model this certificate was made for" in other.stderr


def test_certified_decoder_refuses_another_configuration_and_budget(workspace):
    from ltt_exit.apply import CertificateMismatch, CertifiedDecoder
    from ltt_exit.certificate import Certificate
    from ltt_exit.certify import certify

    root = workspace
    if not (root / "cert.json").exists():
        assert _calibrate(root, "cert.json").returncode == 0
    cert = Certificate.load(root / "cert.json")
    certified = CertifiedDecoder(cert, str(root / "model"), device="cpu")
    with pytest.raises(CertificateMismatch, match="max_new_tokens"):
        certified.generate(["w5"], max_new_tokens=9)

    meta = json.loads(json.dumps(cert.metadata))
    meta["decoder"]["exit_rule"] = "some other rule"
    tampered = certify(np.zeros((40, 2)), np.array([1.0, 0.5]), 0.3, 0.2, metadata=meta)
    with pytest.raises(CertificateMismatch, match="exit_rule"):
        CertifiedDecoder(tampered, str(root / "model"), device="cpu")

    bare = certify(np.zeros((40, 2)), np.array([1.0, 0.5]), 0.3, 0.2)
    with pytest.raises(CertificateMismatch, match="no 'model_fingerprint'"):
        CertifiedDecoder(bare, str(root / "model"), device="cpu")


def test_calibrate_bad_arguments(workspace):
    root = workspace
    cases = [  # (output name, bad option and value, what the message must say)
        ("x.json", ["--grid", "0.5,0.9"], "strictly decreasing"),
        ("y.json", ["--min-exit-layer", "9"], "min_exit_layer"),
        ("t.json", ["--threads", "0"], "--threads must be at least 1"),
        ("z.json", ["--batch-prompts", "0"], "--batch-prompts must be at least 1"),
    ]
    for out, option, message in cases:
        bad = _calibrate(root, out, *option)
        assert bad.returncode == 2 and message in bad.stderr, option
        assert not (root / out).exists()
    no_prompts = _run("ltt_exit.cli.generate", "--certificate", "missing.json", cwd=root, stdin="")
    assert no_prompts.returncode == 2 and "no prompts" in no_prompts.stderr


def test_help_texts_teach():
    calibrate = _run("ltt_exit.cli.calibrate", "--help", cwd=Path.cwd())
    assert calibrate.returncode == 0
    assert "risk tolerance" in calibrate.stdout and "--recipe" in calibrate.stdout
    generate = _run("ltt_exit.cli.generate", "--help", cwd=Path.cwd())
    assert generate.returncode == 0 and "refuses" in generate.stdout


def test_generate_finds_a_moved_exit_adapter_file(workspace):
    """ltt-calibrate --exit-adapters records the file; after it moves, ltt-generate refuses until it is told
    where the file is now (--exit-adapters), and refuses adapters for a certificate made without them."""
    from ltt_exit.decode.adapters import ExitAdapters
    from ltt_exit.models import load_model

    root = workspace
    loaded = load_model(str(root / "model"), device="cpu")
    adapters = ExitAdapters.identity("affine", num_layers=4, hidden_size=loaded.model.config.hidden_size,
                                     model_fingerprint=loaded.fingerprint)
    original = adapters.save(root / "adapters.safetensors")
    made = _calibrate(root, "cert-adapters.json", "--exit-adapters", str(original))
    assert made.returncode == 0, made.stderr
    assert json.loads((root / "cert-adapters.json").read_text())["metadata"]["decoder"]["exit_adapters"]
    moved = original.rename(root / "moved-adapters.safetensors")

    def generate(*extra: str) -> subprocess.CompletedProcess:
        return _run("ltt_exit.cli.generate", "--certificate", "cert-adapters.json", "--model", str(root / "model"),
                    "--device", "cpu", "--json", *extra, "w5 w6 w7", cwd=root)

    lost = generate()
    assert lost.returncode == 2 and "not there" in lost.stderr and "--exit-adapters" in lost.stderr
    found = generate("--exit-adapters", str(moved))
    assert found.returncode == 0, found.stderr
    assert len(json.loads(found.stdout.splitlines()[0])["exit_layers"]) >= 1
    if not (root / "cert.json").exists():
        assert _calibrate(root, "cert.json").returncode == 0
    without = _run("ltt_exit.cli.generate", "--certificate", "cert.json", "--model", str(root / "model"),
                   "--device", "cpu", "--exit-adapters", str(moved), "w5", cwd=root)
    assert without.returncode == 2 and "made without them" in without.stderr


def test_calibrate_and_generate_with_the_exit_classifier_scorer(workspace):
    """--scorer exit-classifier takes its fitted parameters from the --exit-adapters file; without a file
    holding a classifier the command refuses, naming the problem."""
    import torch

    from ltt_exit.decode.adapters import ExitAdapters
    from ltt_exit.decode.scorers import LogisticExitModel
    from ltt_exit.models import load_model

    root = workspace
    loaded = load_model(str(root / "model"), device="cpu")
    plain = ExitAdapters.identity("affine", num_layers=4, hidden_size=loaded.model.config.hidden_size,
                                  model_fingerprint=loaded.fingerprint)
    classifier = LogisticExitModel(["margin"], [1, 2, 3], torch.full((3, 1), 4.0), torch.tensor([-2.0, -1.0, 0.0]))
    with_classifier = plain.with_exit_classifier(classifier).save(root / "classifier.safetensors")
    made = _calibrate(root, "cert-classifier.json", "--scorer", "exit-classifier", "--exit-adapters",
                      str(with_classifier))
    assert made.returncode == 0, made.stderr
    decoder = json.loads((root / "cert-classifier.json").read_text())["metadata"]["decoder"]
    assert decoder["scorer"]["name"] == "exit-classifier"
    gen = _run("ltt_exit.cli.generate", "--certificate", "cert-classifier.json", "--model", str(root / "model"),
               "--device", "cpu", "--json", "w5 w6 w7", cwd=root)
    assert gen.returncode == 0, gen.stderr
    assert len(json.loads(gen.stdout.splitlines()[0])["exit_layers"]) >= 1

    no_classifier = plain.save(root / "plain.safetensors")
    refused = _calibrate(root, "cert-refused.json", "--scorer", "exit-classifier", "--exit-adapters",
                         str(no_classifier))
    assert refused.returncode == 2 and "hold no fitted classifier" in refused.stderr
    assert not (root / "cert-refused.json").exists()


def test_json_options_must_be_json_objects():
    import argparse

    from ltt_exit.cli._arguments import json_object

    assert json_object('{"k": 2000}') == {"k": 2000}
    with pytest.raises(argparse.ArgumentTypeError, match="not valid JSON"):
        json_object("{k: 2000}")
    with pytest.raises(argparse.ArgumentTypeError, match="expected a JSON object"):
        json_object("[2000]")

"""End to end with Pareto Testing through the real entry points on a tiny random model:
ltt-calibrate --space --risks sweeps and certifies one configuration, reuses the cached space table,
certifies again from --table; ltt-generate decodes with exactly that configuration and refuses an
edited one; ltt-report runs the random-split check and draws the risk–cost plane."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ltt_exit.certificate import canonical_json
from ltt_exit.decode.tiny_models import tiny_llama, tiny_word_tokenizer

VOCAB = 96
SPACE = "{min_exit_layer: [1, 2], pruning: [none, {name: fixed, k: 20}]}"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pareto")
    model = tiny_llama(vocab_size=VOCAB, num_layers=4, seed=0)
    model.generation_config.eos_token_id = 1
    model.save_pretrained(root / "model")
    tiny_word_tokenizer(VOCAB).save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    with open(root / "data.jsonl", "w") as handle:
        for i in range(40):
            words = " ".join(f"w{w}" for w in rng.integers(3, VOCAB - 1, size=6))
            summary = " ".join(f"w{w}" for w in rng.integers(3, VOCAB - 1, size=3))
            handle.write(json.dumps({"id": f"row{i}", "text": words, "summary": summary}) + "\n")
    (root / "recipe.yaml").write_text(
        "name: words\nsource:\n  kind: jsonl\nsplit: all\nfields:\n  id: id\n  text: text\n  summary: summary\n"
        "templates:\n  decoder-only: \"{text}\"\nreference: summary\nmetric: rouge-l\nmax_new_tokens: 4\n"
        "sample:\n  seed: 0\n  size: null\n")
    return root


def _run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def _calibrate(root: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    return _run("ltt_exit.cli.calibrate", "--epsilon", "0.2", "--risks", "textual=0.5,risk=0.5", "--space", SPACE,
                "--grid", "1,0.6,0.2", "--model", str(root / "model"), "--recipe", str(root / "recipe.yaml"),
                "--data-files", str(root / "data.jsonl"), "--scorer", "softmax-max", "--device", "cpu",
                "--threads", "1", "--cache-dir", str(root / "cache"), "--out", out, *extra, cwd=root)


def test_calibrate_generate_report_with_pareto_testing(workspace):
    root = workspace
    first = _calibrate(root, "cert.json", "--table-out", "space.parquet", "--seed", "3")
    assert first.returncode == 0, first.stderr
    assert "sweeping 12 configurations (4 settings) over 40 prompts" in first.stderr
    cert = json.loads((root / "cert.json").read_text())
    assert cert["procedure"] == {"name": "pareto-testing", "params": {"split": 0.5, "seed": 3}}
    pareto = cert["pareto"]
    assert [r["name"] for r in pareto["risks"]] == ["textual", "risk"]
    assert [r["delta"] for r in pareto["risks"]] == [0.5, 0.5]
    assert pareto["split"]["n_optimisation"] + pareto["split"]["n_testing"] == 40
    assert len(pareto["configurations"]) == 12
    chosen = pareto["configuration"]
    assert chosen["decoder"] == cert["metadata"]["decoder"] and chosen["lambda"] == cert["lambda_hat"]
    assert chosen["decoder"]["scorer"]["name"] == "softmax-max"  # the knob the space left to the command line
    assert "Pareto Testing" in first.stdout or "Nothing certified" in first.stdout

    again = _calibrate(root, "cert2.json", "--seed", "3")
    assert again.returncode == 0, again.stderr
    assert "reusing the space table" in again.stderr and "sweeping" not in again.stderr
    assert json.loads((root / "cert2.json").read_text())["pareto"]["configuration"] == chosen

    from_table = _run("ltt_exit.cli.calibrate", "--epsilon", "0.2", "--delta", "0.5", "--table", "space.parquet",
                      "--seed", "3", "--out", "cert3.json", cwd=root)
    assert from_table.returncode == 0, from_table.stderr
    assert [r["name"] for r in json.loads((root / "cert3.json").read_text())["pareto"]["risks"]] == ["textual"]

    gen = _run("ltt_exit.cli.generate", "--certificate", "cert.json", "--model", str(root / "model"),
               "--device", "cpu", "--json", "w5 w6 w7", "w9 w10", cwd=root)
    assert gen.returncode == 0, gen.stderr
    rows = [json.loads(line) for line in gen.stdout.splitlines()]
    from ltt_exit.decode import EarlyExitDecoder
    from ltt_exit.apply import decoder_settings
    from ltt_exit.models import load_model

    loaded = load_model(str(root / "model"), device="cpu")
    expected = EarlyExitDecoder(loaded.model, loaded.tokenizer, **decoder_settings(chosen["decoder"])).generate(
        ["w5 w6 w7", "w9 w10"], threshold=chosen["lambda"], max_new_tokens=4)
    assert [(r["token_ids"], r["exit_layers"]) for r in rows] == [(s.token_ids, s.exit_layers) for s in expected]

    # a certificate whose decoder settings were edited (digest recomputed) is refused
    edited = json.loads((root / "cert.json").read_text())
    edited["metadata"]["decoder"]["min_exit_layer"] = 3
    content = {k: v for k, v in edited.items() if k != "digest"}
    edited["digest"] = "sha256:" + hashlib.sha256(canonical_json(content)).hexdigest()
    (root / "edited.json").write_text(json.dumps(edited))
    refused = _run("ltt_exit.cli.generate", "--certificate", "edited.json", "--model", str(root / "model"),
                   "--device", "cpu", "w5", cwd=root)
    assert refused.returncode == 2 and "min_exit_layer" in refused.stderr

    report = _run("ltt_exit.cli.report", "space.parquet", "--risks", "textual=0.5,risk=0.5", "--epsilon", "0.2",
                  "--trials", "20", "--out", "rep", cwd=root)
    assert report.returncode == 0, report.stderr
    text = (root / "rep" / "report.md").read_text()
    assert "Pareto Testing" in text and "violation rate" in text and "textual δ = 0.5" in text
    assert (root / "rep" / "pareto_plane.png").stat().st_size > 0


def test_bad_pareto_arguments(workspace):
    root = workspace
    cases = [
        (["--risks", "colour=0.1"], "--risks"),
        (["--risks", "textual=1.5"], "--risks"),
        (["--split", "1"], "--split"),
        (["--space", "min_exit_layer: [1, 1]"], "same setting twice"),
        (["--space", "nope.yaml"], "nope.yaml"),
    ]
    for extra, message in cases:
        result = _run("ltt_exit.cli.calibrate", "--epsilon", "0.2", "--delta", "0.5", *extra,
                      "--model", str(root / "model"), "--recipe", str(root / "recipe.yaml"),
                      "--data-files", str(root / "data.jsonl"), "--device", "cpu", "--cache-dir",
                      str(root / "cache"), "--out", "bad.json", cwd=root)
        assert result.returncode == 2 and message in result.stderr, (extra, result.stderr)
        assert not (root / "bad.json").exists()
    no_delta = _run("ltt_exit.cli.calibrate", "--epsilon", "0.2", "--space", SPACE, "--out", "bad.json", cwd=root)
    assert no_delta.returncode == 2 and "--delta" in no_delta.stderr

"""The sweep on torch.distributed: two gloo processes on CPU give the single-process table, and a
rank killed mid-way leaves the others' parts intact so that a rerun resumes to the same table."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ltt_exit.loss_table import LossTable

pytestmark = pytest.mark.slow

WORKER = textwrap.dedent('''
    import os, sys
    import numpy as np
    import torch
    torch.set_num_threads(1)
    from ltt_exit.decode import EarlyExitDecoder
    from ltt_exit.decode.tiny_models import tiny_llama, tiny_word_tokenizer
    from ltt_exit.recipes.recipe import CalibrationSet, Example
    from ltt_exit.sweep import SweepSpec, run_sweep

    VOCAB = 96
    rng = np.random.default_rng(0)
    examples = [Example(id=f"ex{i}", prompt=" ".join(f"w{w}" for w in rng.integers(3, VOCAB - 1, size=5)),
                        reference=None, fields={}) for i in range(9)]
    calset = CalibrationSet(recipe="synthetic", examples=examples, metric="rouge-l", max_new_tokens=5,
                            fingerprint="sha256:synthetic-dist", family="decoder-only", split="all",
                            source="test", template="{text}", seed=0, n_available=9)
    decoder = EarlyExitDecoder(tiny_llama(vocab_size=VOCAB, num_layers=3), tiny_word_tokenizer(VOCAB),
                               scorer="softmax-max", min_exit_layer=1)
    spec = SweepSpec(lambdas=(1.0, 0.8, 0.5, 0.2), max_new_tokens=5)
    out = sys.argv[1]
    if os.environ.get("WORLD_SIZE", "1") == "1":
        run_sweep(decoder, calset, spec, out_path=out, model_fingerprint="sha256:m", progress=False)
    else:
        import time
        from pathlib import Path
        from ltt_exit.sweep.distributed import init_distributed, run_sweep_distributed
        from ltt_exit.sweep.run import partial_path
        rank, world, _ = init_distributed("cpu")
        kill_after = int(os.environ.get("KILL_RANK1_AFTER", "0"))
        def hook(k):
            if rank == 1 and kill_after and k == kill_after:
                # die only once rank 0 has recorded its whole shard (header + one line per example): without
                # the wait, a slow rank 0 is stopped by torchrun before its first record and the test would race
                part0, deadline = partial_path(Path(out), 0, world), time.monotonic() + 300
                whole = 1 + len(examples[0::world])
                while time.monotonic() < deadline and not (
                        part0.exists() and len(part0.read_text().splitlines()) == whole):
                    time.sleep(0.02)
                os._exit(17)  # as abrupt as a killed process: no cleanup, no exception handling
        run_sweep_distributed(decoder, calset, spec, out_path=out, model_fingerprint="sha256:m",
                              progress=False, after_example=hook)
''')


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(script: Path, out: Path, nproc: int, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    if nproc == 1:
        cmd = [sys.executable, str(script), str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _assert_same(a: LossTable, b: LossTable) -> None:
    assert a.example_ids == b.example_ids
    np.testing.assert_array_equal(a.losses, b.losses)
    assert set(a.candidate_columns) == set(b.candidate_columns)
    for name in a.candidate_columns:
        np.testing.assert_array_equal(a.candidate_columns[name], b.candidate_columns[name])
    for name in a.example_columns:
        np.testing.assert_array_equal(a.example_columns[name], b.example_columns[name])


def test_two_gloo_ranks_match_single_process_and_resume_after_a_killed_rank(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    single = _run(script, tmp_path / "single.parquet", 1)
    assert single.returncode == 0, single.stderr
    reference = LossTable.load(tmp_path / "single.parquet")

    two = _run(script, tmp_path / "two.parquet", 2)
    assert two.returncode == 0, two.stderr
    table = LossTable.load(tmp_path / "two.parquet")
    _assert_same(table, reference)
    assert table.metadata["world_size"] == 2 and reference.metadata["world_size"] == 1

    # rank 1 dies after recording 2 of its 4 examples; rank 0's part is complete and untouched
    out = tmp_path / "killed.parquet"
    killed = _run(script, out, 2, {"KILL_RANK1_AFTER": "2"})
    assert killed.returncode != 0
    assert not out.exists()
    parts = sorted(p.name for p in tmp_path.glob("killed.parquet.partial-r*-of-2.jsonl"))
    assert parts == ["killed.parquet.partial-r0-of-2.jsonl", "killed.parquet.partial-r1-of-2.jsonl"]
    assert len((tmp_path / parts[0]).read_text().splitlines()) == 1 + 5  # rank 0's shard of 9, whole
    rank1_lines = (tmp_path / parts[1]).read_text().splitlines()
    assert len(rank1_lines) == 1 + 2  # header + the two examples it finished

    rerun = _run(script, out, 2)
    assert rerun.returncode == 0, rerun.stderr
    _assert_same(LossTable.load(out), reference)
    assert not list(tmp_path.glob("killed.parquet.partial-*"))

"""Fault tests: a writer killed with SIGKILL at a random moment (issue 14).

A child process rewrites a certificate / a loss table over and over, alternating two versions, or
appends to a sweep's partial file; the test kills it with SIGKILL after a random delay. Whatever the
moment, the file under the final name must be a complete old or new version (never a torn one), and
a rerun must finish the job: for the sweep, the resumed run gives the same table as an uninterrupted
one, with no lost or duplicated examples.

The kill delays are seeded; each test runs a bounded number of kills (a few seconds in all).
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ltt_exit.certificate import Certificate
from ltt_exit.loss_table import LossTable
from ltt_exit.sweep.partial import PartialSweep

pytestmark = [pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL"),
              pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
KILLS = 5  # per test; each kill starts a fresh Python process


def _start(script: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)


def _kill_after_ready(process: subprocess.Popen, delay: float) -> None:
    """Wait for the child's "ready" line (its first complete write), then SIGKILL it after ``delay`` s."""
    line = process.stdout.readline()
    assert line.strip() == "ready", process.stderr.read()
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the child finished before it was killed"


# ---------------------------------------------------------------------------- certificate

CERTIFICATE_WRITER = """
import sys
import numpy as np
from ltt_exit.certify import certify

path = sys.argv[1]
losses = (np.random.default_rng(0).random((300, 4)) < [0.0, 0.02, 0.05, 0.5]).astype(float)
# a large metadata block makes each write take long enough to be interrupted part-way
versions = [certify(losses, [1.0, 0.9, 0.8, 0.7], 0.1, 0.05, metadata={"version": v, "pad": "x" * 2_000_000})
            for v in ("old", "new")]
versions[0].save(path)
print("ready", flush=True)
i = 1
while True:
    versions[i % 2].save(path)
    i += 1
"""


def test_certificate_killed_while_saving_leaves_old_or_new_complete_and_a_rerun_writes_it(tmp_path):
    path = tmp_path / "certificate.json"
    rng = random.Random(14)
    seen = set()
    for _ in range(KILLS):
        _kill_after_ready(_start(CERTIFICATE_WRITER, str(path)), rng.uniform(0.0, 0.4))
        loaded = Certificate.load(path)  # a torn file would fail here (JSON, digest)
        assert loaded.metadata["version"] in ("old", "new")
        seen.add(loaded.metadata["version"])
    # the rerun: a complete write over whatever the kill left
    rerun = _start(CERTIFICATE_WRITER.replace("while True:", "while i < 3:"), str(path))
    assert rerun.wait(timeout=120) == 0, rerun.stderr.read()
    assert Certificate.load(path).metadata["version"] in ("old", "new")
    leftovers = [p for p in tmp_path.iterdir() if p.name != "certificate.json"]
    print(f"{len(leftovers)} of {KILLS} kills landed inside a write (temporary files left behind)")
    assert all(p.name.startswith(".certificate.json.") and p.name.endswith(".tmp.json") for p in leftovers)


# ---------------------------------------------------------------------------- loss table

TABLE_WRITER = """
import sys
import numpy as np
from ltt_exit.loss_table import LossTable

path = sys.argv[1]
n = 40_000
rng = np.random.default_rng(0)
versions = [LossTable(rng.random((n, 4)), [1.0, 0.9, 0.8, 0.7], None, {"version": v},
                      candidate_columns={"mean_layers": rng.random((n, 4))}) for v in ("old", "new")]
versions[0].save(path)
print("ready", flush=True)
i = 1
while True:
    versions[i % 2].save(path)
    i += 1
"""


def test_loss_table_killed_while_saving_leaves_old_or_new_complete(tmp_path):
    path = tmp_path / "losses.parquet"
    rng = random.Random(15)
    for _ in range(KILLS):
        _kill_after_ready(_start(TABLE_WRITER, str(path)), rng.uniform(0.0, 0.5))
        table = LossTable.load(path)  # a torn Parquet file would fail here
        assert table.metadata["version"] in ("old", "new") and table.n == 40_000
    leftovers = [p for p in tmp_path.iterdir() if p.name != "losses.parquet"]
    print(f"{len(leftovers)} of {KILLS} kills landed inside a write (temporary files left behind)")
    assert all(p.name.startswith(".losses.parquet.") for p in leftovers)


# ---------------------------------------------------------------------------- sweep partial file

PARTIAL_WRITER = """
import sys
from ltt_exit.sweep.partial import PartialSweep

partial = PartialSweep(sys.argv[1], "config-A")
print("ready", flush=True)
for i in range(int(sys.argv[2])):
    key = f"ex{i}"
    if key not in partial:
        partial.append(key, {"i": i, "payload": "y" * (i % 97) * 50})
"""


def test_partial_file_killed_while_appending_keeps_whole_records_and_reruns_resume(tmp_path):
    path = tmp_path / "sweep.partial.jsonl"
    total = 3000
    rng = random.Random(16)
    counts = []
    for _ in range(KILLS):
        _kill_after_ready(_start(PARTIAL_WRITER, str(path), str(total)), rng.uniform(0.0, 0.3))
        if not path.exists():  # killed before the first append finished: nothing recorded
            counts.append(0)
            continue
        partial = PartialSweep(path, "config-A")  # cuts a torn last line
        ids = list(partial)
        assert ids == [f"ex{i}" for i in range(len(ids))]  # a prefix: nothing lost, nothing twice
        assert all(partial.records[f"ex{i}"] == {"i": i, "payload": "y" * (i % 97) * 50} for i in range(len(ids)))
        counts.append(len(ids))
    assert counts == sorted(counts) and counts[-1] > 0  # each rerun resumed and added to the last
    finish = _start(PARTIAL_WRITER, str(path), str(total))
    assert finish.wait(timeout=120) == 0, finish.stderr.read()
    done = PartialSweep(path, "config-A")
    assert list(done) == [f"ex{i}" for i in range(total)]
    assert len(path.read_text().splitlines()) == total + 1  # header + one line per example, no duplicates


SWEEP_RUNNER = """
import sys, time
from pathlib import Path
from test_sweep import GRID, _calibration_set, _decoder
from ltt_exit.sweep.run import SweepSpec, run_sweep

out = Path(sys.argv[1])
slow = sys.argv[2] == "slow"
print("ready", flush=True)
run_sweep(_decoder("decoder-only"), _calibration_set(8, seed=5), SweepSpec(lambdas=GRID, max_new_tokens=6),
          out_path=out, model_fingerprint="sha256:m", progress=False,
          after_example=(lambda k: time.sleep(0.3)) if slow else None)
print("done", flush=True)
"""


@pytest.mark.slow
def test_real_sweep_killed_mid_run_resumes_to_the_uninterrupted_table(tmp_path):
    torch = pytest.importorskip("torch")  # noqa: F841 (the sweep decodes with a tiny model)
    sys.path.insert(0, str(ROOT / "tests"))
    from test_sweep import GRID, _calibration_set, _decoder

    from ltt_exit.sweep.run import SweepSpec, partial_path, run_sweep

    reference = run_sweep(_decoder("decoder-only"), _calibration_set(8, seed=5), SweepSpec(lambdas=GRID, max_new_tokens=6),
                          out_path=tmp_path / "ref.parquet", model_fingerprint="sha256:m", progress=False).table
    out = tmp_path / "t.parquet"
    killed = _start(SWEEP_RUNNER, str(out), "slow")
    _kill_after_ready(killed, 0.0)  # killed while loading or decoding, before the table is written
    assert not out.exists()
    # wait for examples to be recorded by a second killed run, so that the resume has something to reuse
    second = _start(SWEEP_RUNNER, str(out), "slow")
    assert second.stdout.readline().strip() == "ready"
    def recorded() -> int:  # example lines in the partial file (the first line is its header)
        return len(partial_path(out).read_text().splitlines()) - 1 if partial_path(out).exists() else 0

    deadline = time.time() + 120
    while time.time() < deadline and recorded() < 2:
        time.sleep(0.05)
    second.send_signal(signal.SIGKILL)
    second.wait(timeout=60)
    recorded = recorded()
    assert 2 <= recorded < 8 and not out.exists()
    resumed = run_sweep(_decoder("decoder-only"), _calibration_set(8, seed=5), SweepSpec(lambdas=GRID, max_new_tokens=6),
                        out_path=out, model_fingerprint="sha256:m", progress=False)
    assert resumed.resumed_examples >= recorded - 1 and resumed.resumed_examples + resumed.decoded_examples == 8
    table = LossTable.load(out)
    assert table.example_ids == reference.example_ids
    np.testing.assert_array_equal(table.losses, reference.losses)
    for name, column in reference.candidate_columns.items():
        np.testing.assert_array_equal(table.candidate_columns[name], column)


@pytest.mark.parametrize("text", ['[1, 2]\n', '{"kind": "header", "format": 1, "config_key": "config-A"}\n[3]\n',
                                  '{"kind": "header", "format": 1, "config_key": "config-A"}\n{"id": 5, "data": {}}\n'])
def test_partial_file_with_json_lines_of_the_wrong_shape_is_refused_naming_it(tmp_path, text):
    from ltt_exit.sweep.partial import PartialSweepMismatch

    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(PartialSweepMismatch, match=str(path)):
        PartialSweep(path, "config-A")

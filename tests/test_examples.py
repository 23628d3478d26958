"""The examples run as a user would run them."""
import subprocess
import sys
from pathlib import Path

from ltt_exit.certificate import Certificate
from ltt_exit.loss_table import LossTable

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_custom_scorer_example_certifies_and_writes_a_usable_table(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "certify_custom_scorer.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Certified λ = " in done.stdout and "expensive-model calls at λ̂" in done.stdout
    table = LossTable.load(tmp_path / "cascade_losses.parquet")
    assert table.n == 2000 and table.lambdas[0] == 1.0
    cli = subprocess.run([sys.executable, "-m", "ltt_exit.cli.calibrate", "--delta", "0.05", "--epsilon", "0.05",
                          "--table", "cascade_losses.parquet", "--pvalue", "binomial",
                          "--cost-column", "expensive_calls", "--out", "c.json"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    certificate = Certificate.load(tmp_path / "c.json")
    assert certificate.certified_any and certificate.empirical_risk[certificate.chosen_index] <= 0.05

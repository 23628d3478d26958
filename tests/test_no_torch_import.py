"""The certification stages never import torch (nor transformers): they must run on any machine."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

MODULES = [
    "ltt_exit",
    "ltt_exit.certify",
    "ltt_exit.certify.pvalues",
    "ltt_exit.certify.procedures",
    "ltt_exit.certify.core",
    "ltt_exit.certify.simulate",
    "ltt_exit.certificate",
    "ltt_exit.loss_table",
    "ltt_exit._atomic",
    "ltt_exit.cli.calibrate",
    "ltt_exit.certify.pareto",
    "ltt_exit.space_table",
    "ltt_exit.pareto_pipeline",
    "ltt_exit.sweep.space",
]
FORBIDDEN = ("torch", "transformers", "accelerate", "safetensors")


def run_isolated(code: str) -> dict:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", MODULES)
def test_importing_does_not_import_torch(module):
    loaded = run_isolated(
        f"""
        import importlib, json, sys
        importlib.import_module({module!r})
        print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))
        """
    )
    assert loaded == []


def test_full_certification_and_cli_run_without_torch(tmp_path):
    # Block the imports outright: any attempt to import torch fails the run.
    loaded = run_isolated(
        f"""
        import json, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in {FORBIDDEN!r}:
                    raise ImportError('blocked import of ' + name)
        sys.meta_path.insert(0, Block())
        import numpy as np
        from ltt_exit.certify import certify, PVALUES, PROCEDURES
        from ltt_exit.certificate import Certificate
        from ltt_exit.loss_table import LossTable
        from ltt_exit.cli.calibrate import main
        losses = (np.random.default_rng(0).random((200, 4)) < [0, 0.01, 0.05, 0.3]).astype(float)
        for p in PVALUES:
            for proc in PROCEDURES:
                certify(losses, [1.0, 0.9, 0.8, 0.7], 0.1, 0.05, pvalue=p, procedure=proc)
        LossTable(losses, [1.0, 0.9, 0.8, 0.7]).save({str(tmp_path / 't.parquet')!r})
        code = main(['--delta', '0.1', '--epsilon', '0.05', '--table', {str(tmp_path / 't.parquet')!r},
                     '--out', {str(tmp_path / 'c.json')!r}, '--quiet'])
        Certificate.load({str(tmp_path / 'c.json')!r})
        print(json.dumps([code] + sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))
        """
    )
    assert loaded == [0]

"""benchmarks/compare_decodings.py: agreement between two sweep decodings of the same prompts."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import compare_decodings as cd  # noqa: E402


def _run(outputs, prompts=2, candidates=2, **extra):
    return {"prompts": prompts, "candidates": candidates, "decoding": "grid", "batch": prompts,
            "dtype": "torch.float32", "outputs": outputs, **extra}


def test_first_difference_is_the_first_differing_token_or_the_shorter_length():
    assert cd.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert cd.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert cd.first_difference([1, 2], [1, 2, 3]) == 2


def test_comparison_separates_full_from_early_sequences_and_counts_exit_shifts():
    # two prompts x two candidates early (rows p0c0, p0c1, p1c0, p1c1), then the two full sequences
    ref = [[[1, 2], [3, 3]], [[1, 2], [2, 2]], [[4], [3]], [[4], [1]], [[1, 2], [4, 4]], [[4], [4]]]
    other = [[[1, 2], [3, 3]], [[1, 2], [4, 4]], [[4], [3]], [[5], [1]], [[1, 2], [4, 4]], [[7], [4]]]
    c = cd.compare(_run(ref), _run(other))
    assert (c["identical"], c["identical_early"], c["identical_full"]) == (3, 2, 1)
    assert c["same_tokens"] == 4  # candidate p0c1 has the same tokens, other exit layers
    assert c["first_difference_median"] == 0
    # candidate 0: |3-3| and |3-3| -> 0; candidate 1: |2-4| and |1-1| -> mean 1
    assert c["exit_layer_shift_per_candidate"] == [0.0, 1.0]


def test_other_prompts_and_foreign_files_are_refused_with_the_reason(tmp_path):
    with pytest.raises(SystemExit, match="other prompts or grid"):
        cd.compare(_run([[[1], [1]]] * 6), _run([[[1], [1]]] * 4))
    bad = tmp_path / "rows.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match="rows.json: not a bench_grid_decode.py --json file"):
        cd.load(bad)


def test_bench_grid_decode_refuses_an_unknown_scorer_before_loading_a_model(capsys, tmp_path):
    import bench_grid_decode

    data = tmp_path / "samsum.jsonl"
    data.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        bench_grid_decode.main(["--scorer", "no-such-scorer", "--model", "/nonexistent/model.gguf",
                                "--data", str(data)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--scorer: 'no-such-scorer' is not one of" in err and "jsd-contrastive" in err


def test_bench_grid_decode_counts_the_columns_each_jsd_search_reads_and_restores_the_scorer():
    import bench_grid_decode
    import torch

    from ltt_exit.decode.scorers import JSDContrastive

    scorer = JSDContrastive(alpha=0.1)
    # row 0: one token far above the rest (head set of 1); row 1: three tokens level (head set of 3)
    logits = torch.full((2, 50), -20.0)
    logits[0, 7] = 5.0
    logits[1, :3] = 5.0
    log_p = torch.log_softmax(logits, dim=-1)
    reading = JSDContrastive._head_columns
    with bench_grid_decode.jsd_width_counter() as calls:
        columns = scorer._head_columns(log_p)
    assert JSDContrastive._head_columns is reading
    assert calls == [(2, 4)] and columns.shape == (2, 4)  # the widest head set (3) plus one
    summary = bench_grid_decode.width_summary(calls + [(5, 10), (3, 50)], vocab=50)
    assert summary["calls"] == 3 and summary["rows_max"] == 5 and summary["columns_quantiles"]["1"] == 50
    assert summary["columns_quantiles"]["0.5"] == 10

"""Wall clock of the sweep's decoding of every candidate on real prompts: the shared grid
(``EarlyExitDecoder.generate_grid``) or the rows sweep (K + 1 rows per prompt on ``FastEarlyExitDecoder``,
CUDA graphs on CUDA; ``SweepSpec.decoding``).

Decodes the first ``--prompts`` SAMSum prompts (seed 0) with the default grid of 20 candidates, the given scorer
(default the margin) and pruning (j = 15), and reports prompt-steps per second (one prompt, all candidates, one token
position). ``--code`` decodes with another checkout's ``ltt_exit`` (a before/after comparison of the same
prompts); ``--json`` writes the outputs' tokens and exit layers so two runs can be compared (``--compare``:
the share of identical sequences; exit status 1 unless all are).

    python benchmarks/bench_grid_decode.py --prompts 16 --max-new-tokens 24
    python benchmarks/bench_grid_decode.py --prompts 16 --max-new-tokens 24 --code /tmp/old-checkout --json old.json
    python benchmarks/bench_grid_decode.py --prompts 16 --max-new-tokens 24 --json new.json --compare old.json
    python benchmarks/bench_grid_decode.py --prompts 64 --decoding rows --batch 16 --dtype bfloat16 --compare grid.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from _common import STUDY_PRUNINGS, add_samsum_arguments, samsum_prompts  # this script's folder is on sys.path

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_samsum_arguments(parser, prompts=16, max_new_tokens=24)
    parser.add_argument("--decoding", choices=("grid", "rows"), default="grid",
                        help="grid: one generate_grid call over all prompts; rows: K + 1 rows per prompt on the fast "
                             "path, --batch prompts at a time in length order")
    parser.add_argument("--scorer", default="softmax-margin",
                        help="confidence scorer (a name of ltt_exit.decode.SCORERS; default softmax-margin). "
                             "The grid decodes each distinct row once, the rows sweep all K + 1: the saving grows "
                             "with what the scorer costs per row (jsd-contrastive with --pruning none the most)")
    parser.add_argument("--batch", type=int, default=16, help="prompts per batch of the rows decoding (default 16)")
    parser.add_argument("--device", default=None, help="default: CUDA when present")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--code", type=Path, default=None, help="a checkout whose ltt_exit package is timed instead")
    parser.add_argument("--json", type=Path, default=None, help="write timing and outputs here")
    parser.add_argument("--compare", type=Path, default=None, help="a --json file of another run: check same outputs")
    parser.add_argument("--jsd-widths", action="store_true",
                        help="with jsd-contrastive: record how many vocabulary columns each amateur search reads "
                             "(the batch's widest expert head set plus one; eager decoding only) and report their "
                             "quantiles (the counting adds a little to the timing)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.code.resolve() if args.code else REPO))

    import torch

    from ltt_exit.decode import SCORERS, EarlyExitDecoder, FastEarlyExitDecoder
    from ltt_exit.models import load_model
    from ltt_exit.sweep.run import DEFAULT_GRID, decode_candidates

    if args.scorer not in SCORERS:
        parser.error(f"--scorer: {args.scorer!r} is not one of {', '.join(sorted(SCORERS))}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(args.model, device=device, dtype=args.dtype)
    prompts = samsum_prompts(args, loaded)
    settings = dict(scorer=args.scorer, pruning=STUDY_PRUNINGS[args.pruning], min_exit_layer=15)
    lambdas = list(DEFAULT_GRID)
    if args.decoding == "grid":
        decoder = EarlyExitDecoder(loaded.model, loaded.tokenizer, **settings)
    else:  # the study table's rows-sweep decoder (benchmarks/study_table_core.py)
        decoder = FastEarlyExitDecoder(loaded.model, loaded.tokenizer, max_sessions=2, length_bucket=128, **settings)

    def decode(batch_prompts):  # the sweep's own decoding of every candidate
        return decode_candidates(decoder, batch_prompts, lambdas, args.max_new_tokens, args.decoding)

    def sweep():
        if args.decoding == "grid":
            return decode(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # as SweepSpec(decoding="rows")
        full, early = [None] * len(prompts), [None] * len(prompts)
        for first in range(0, len(order), args.batch):
            chunk = order[first:first + args.batch]
            batch_full, batch_early = decode([prompts[i] for i in chunk])
            for i, f, e in zip(chunk, batch_full, batch_early):
                full[i], early[i] = f, e
        return full, early

    if device.startswith("cuda"):  # untimed: kernels, the allocator and (rows) the graphs of every length bucket
        if args.decoding == "rows":
            sweep()
        else:
            decode(prompts[:2])
        torch.cuda.synchronize()
    with jsd_width_counter() if args.jsd_widths else contextlib.nullcontext() as widths:
        start = time.perf_counter()
        full, early = sweep()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    stats = getattr(decoder, "last_grid_stats", None) if args.decoding == "grid" else None
    prompt_steps = sum(len(sequence.token_ids) for sequence in full)
    result = {
        "code": str(args.code or REPO), "device": device,
        "hardware": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "dtype": str(loaded.model.dtype), "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens, "scorer": args.scorer, "pruning": args.pruning,
        "candidates": len(DEFAULT_GRID),
        "decoding": args.decoding, "batch": args.batch if args.decoding == "rows" else len(prompts),
        "seconds": round(seconds, 3), "prompt_steps": prompt_steps,
        "prompt_steps_per_second": round(prompt_steps / seconds, 3),
        "rows_decoded": stats.rows_decoded if stats else None, "sharing": round(stats.sharing, 3) if stats else None,
        "outputs": [[sequence.token_ids, sequence.exit_layers] for row in early for sequence in row]
                   + [[sequence.token_ids, sequence.exit_layers] for sequence in full],
    }
    if widths is not None:
        result["jsd_head_columns"] = width_summary(widths, loaded.model.config.vocab_size)
        print("JSD amateur search columns read (widest head set + 1 per call): "
              + json.dumps(result["jsd_head_columns"]))
    shared = f", {stats.rows_decoded} rows decoded, sharing {stats.sharing:.2f}" if stats else ""
    print(f"{len(prompts)} prompts x {len(DEFAULT_GRID)} candidates x {args.max_new_tokens} tokens ({args.decoding}, "
          f"{args.scorer}, {args.pruning}, {device}, {result['dtype']}): {seconds:.1f} s, "
          f"{result['prompt_steps_per_second']:.2f} prompt-steps/s{shared}")
    status = 0
    if args.compare is not None:
        other = json.loads(args.compare.read_text())
        if len(other["outputs"]) != len(result["outputs"]):
            parser.error(f"--compare: {args.compare} holds {len(other['outputs'])} sequences, this run "
                         f"{len(result['outputs'])} (other prompts or grid)")
        same = sum(a == b for a, b in zip(other["outputs"], result["outputs"]))
        result["identical_to_compare"] = same / len(result["outputs"])
        print(f"sequences identical to {args.compare}: {same} of {len(result['outputs'])}; "
              f"speed-up {other['seconds'] / seconds:.2f}x")
        status = 0 if same == len(result["outputs"]) else 1
    if args.json is not None:
        args.json.write_text(json.dumps(result))
    return status


@contextlib.contextmanager
def jsd_width_counter():
    """Inside: every JSD amateur search that reads only its head-set columns appends (rows, columns read)."""
    from ltt_exit.decode import scorers

    calls: list[tuple[int, int]] = []
    read_columns = scorers.JSDContrastive._head_columns

    def counted(self, log_p_expert):
        columns = read_columns(self, log_p_expert)
        calls.append((log_p_expert.shape[0], log_p_expert.shape[-1] if columns is None else columns.shape[-1]))
        return columns

    scorers.JSDContrastive._head_columns = counted
    try:
        yield calls
    finally:
        scorers.JSDContrastive._head_columns = read_columns


def width_summary(calls: list[tuple[int, int]], vocab: int) -> dict:
    import numpy as np

    if not calls:
        return {"calls": 0}
    rows, columns = np.array(calls).T
    return {"calls": len(calls), "vocabulary": vocab, "rows_median": float(np.median(rows)),
            "rows_max": int(rows.max()),
            "columns_quantiles": {q: float(np.quantile(columns, float(q))) for q in ("0.5", "0.9", "0.99", "1")}}


if __name__ == "__main__":
    sys.exit(main())

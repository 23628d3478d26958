"""How far apart two or more sweep decodings of the same prompts are: reads ``bench_grid_decode.py --json``
files (one reference, then the others) and says, per file, how many sequences are identical to the
reference's (all, the full model's alone, the early-exit candidates alone), where the first differing token
falls, and how the mean exit layer per candidate moves. Used to tell a decoding's own disagreement from
what the number format does (bf16 greedy decoding changes with batch composition; float32 must not).

    python benchmarks/compare_decodings.py grid_fp32.json grid_bf16.json rows_bf16.json rows8_bf16.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def load(path: Path) -> dict:
    try:
        result = json.loads(path.read_text())
        result["outputs"]  # noqa: B018 — a file of another kind fails here, with its name
    except (OSError, ValueError, KeyError) as error:
        raise SystemExit(f"{path}: not a bench_grid_decode.py --json file ({error})") from None
    return result


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token, the shorter length when one is a prefix of the other, None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(reference: dict, other: dict) -> dict:
    """Agreement of ``other``'s outputs with ``reference``'s. Outputs are laid out as bench_grid_decode.py writes
    them: prompts × candidates early sequences row by row, then one full-model sequence per prompt."""
    ref, out = reference["outputs"], other["outputs"]
    if len(ref) != len(out):
        raise SystemExit(f"{len(out)} sequences against the reference's {len(ref)}: other prompts or grid")
    prompts, candidates = reference["prompts"], reference["candidates"]
    early = prompts * candidates
    same = np.array([a == b for a, b in zip(ref, out)])
    diverge = [first_difference(a[0], b[0]) for a, b in zip(ref, out)]
    differing = [d for d in diverge if d is not None]
    mean_exit = [[float(np.mean(s[1])) if s[1] else np.nan for s in seqs[:early]] for seqs in (ref, out)]
    shift = np.nanmean(np.abs(np.subtract(*mean_exit)).reshape(prompts, candidates), axis=0)
    return {"identical": int(same.sum()), "sequences": len(ref),
            "identical_full": int(same[early:].sum()), "identical_early": int(same[:early].sum()),
            "same_tokens": int(sum(d is None for d in diverge)),
            "first_difference_median": float(np.median(differing)) if differing else None,
            "exit_layer_shift_per_candidate": [round(float(x), 3) for x in shift]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", type=Path, help="the decoding the others are read against")
    parser.add_argument("others", type=Path, nargs="+")
    parser.add_argument("--json", type=Path, default=None, help="write the comparison here")
    args = parser.parse_args(argv)
    reference = load(args.reference)
    report = {}
    for path in args.others:
        other = load(path)
        c = compare(reference, other)
        report[str(path)] = c
        prompts = reference["prompts"]
        print(f"{path.name} ({other['decoding']}, batch {other['batch']}, {other['dtype']}) vs {args.reference.name}: "
              f"{c['identical']} of {c['sequences']} identical (full model {c['identical_full']} of {prompts}, "
              f"early {c['identical_early']} of {c['sequences'] - prompts}); same tokens {c['same_tokens']}; "
              f"first differing token at median {c['first_difference_median']}; mean |Δ exit layer| per candidate "
              f"up to {max(c['exit_layer_shift_per_candidate']):.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

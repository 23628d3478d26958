"""ltt-generate: decode with a certified early-exit threshold."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ltt_exit.cli._run import ArgumentParser, CLIError, run_cli

PROG = "ltt-generate"

DESCRIPTION = """\
Decode prompts with the early-exit threshold a certificate certified.

The certificate (written by ltt-calibrate) names the model, the decoder configuration (scorer,
pruning, minimum exit layer, threshold decay) and the token budget it was certified for.
ltt-generate loads that model, checks its fingerprint and rebuilds exactly that decoder; if
anything differs — another model or tokenizer, a file edited by hand, another configuration —
it refuses instead of decoding without the guarantee.

Prompts come from the command line, from --file (one prompt per line, or JSON Lines with a
"prompt" field), or from standard input. They are formatted like the calibration prompts
(the chat template for instruct models).
"""

EPILOG = """\
examples:
  ltt-generate --certificate certificate.json "Continue the story: The river rose overnight."
  ltt-generate --certificate certificate.json --file prompts.txt --json > outputs.jsonl
  echo "Summarize: ..." | ltt-generate --certificate certificate.json --show-exits
  ltt-generate --certificate certificate.json --device cuda --fast --file prompts.txt   # GPU, batch 1 latency

exit status: 0 ok; 2 bad input or a refused certificate (one line on stderr); 1 internal error
"""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", nargs="*", help="prompt texts (default: --file, else standard input)")
    parser.add_argument("--certificate", required=True, type=Path, help="certificate JSON from ltt-calibrate")
    parser.add_argument("--file", type=Path, help="prompts file: one per line, or .jsonl with a 'prompt' field")
    parser.add_argument("--model", help="load the model from here instead of the name in the certificate "
                                        "(it must still match the certified fingerprint)")
    parser.add_argument("--exit-adapters", type=Path, default=None, metavar="PATH",
                        help="where the certified exit-adapter file is now, when it moved since ltt-calibrate "
                             "(default: the path the certificate records; the file must have the certified "
                             "fingerprint)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: CUDA when present)")
    parser.add_argument("--fast", action="store_true",
                        help="the fast decoder (static buffers, CUDA graphs, lagged host reads; for a GPU at batch "
                             "1): same exit rule and configuration as the reference decoder the sweep used; "
                             "identical outputs in float64, but in bfloat16 on a GPU other kernels can flip a "
                             "borderline exit now and then (docs/decoder.md)")
    parser.add_argument("--raw", action="store_true", help="send prompts as given, without the chat template")
    parser.add_argument("--show-exits", action="store_true", help="print each token with its exit layer")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt on standard output")
    return parser


def _read_prompts(args) -> list[str]:
    if args.prompts:
        return list(args.prompts)
    if args.file is not None:
        text = args.file.read_text(encoding="utf-8")
        if args.file.suffix == ".jsonl":
            prompts = []
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CLIError(f"{args.file}:{number}: not valid JSON ({exc})") from None
                if not isinstance(row, dict) or "prompt" not in row:
                    raise CLIError(f"{args.file}:{number}: no 'prompt' field (each line must be a JSON object "
                                   "with a \"prompt\")")
                prompts.append(str(row["prompt"]))
            return prompts
        return [line for line in text.splitlines() if line.strip()]
    return [line for line in sys.stdin.read().splitlines() if line.strip()]


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    from ltt_exit.apply import CertificateMismatch, CertifiedDecoder
    from ltt_exit.certificate import CertificateError

    prompts = _read_prompts(args)
    if not prompts:
        raise CLIError("no prompts given (arguments, --file or standard input)")
    try:
        certified = CertifiedDecoder(args.certificate, args.model, device=args.device,
                                     exit_adapters=args.exit_adapters, fast=args.fast)
    except (CertificateMismatch, CertificateError) as err:
        raise CLIError(f"refused: {err}") from None
    outputs = certified.generate(prompts, formatted=args.raw)
    num_layers = certified.decoder.num_layers
    tokenizer = certified.loaded.tokenizer
    for prompt, seq in zip(prompts, outputs):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": seq.text, "token_ids": seq.token_ids,
                              "exit_layers": seq.exit_layers,
                              "confidences": [None if c != c else c for c in seq.confidences],
                              "mean_layers": seq.cost.mean_layers, "num_layers": num_layers,
                              "flops_ratio": seq.cost.flops_ratio if seq.token_ids else None},
                             ensure_ascii=False))
            continue
        print(seq.text)
        if args.show_exits:
            pieces = [f"{tokenizer.decode([t])!r}@{layer}" for t, layer in zip(seq.token_ids, seq.exit_layers)]
            print("  exits: " + " ".join(pieces))
        print(f"  [{len(seq.token_ids)} tokens, mean exit layer {seq.cost.mean_layers:.2f} of {num_layers}, "
              f"estimated speed-up {num_layers / seq.cost.mean_layers:.2f}× in layers; work "
              f"{seq.cost.flops_ratio:.2f}× the full model's FLOPs]" if seq.token_ids else "  [no tokens]")
    if not args.json:
        tokens = sum(len(s.token_ids) for s in outputs)
        layers = sum(sum(s.exit_layers) for s in outputs)
        full = sum(s.cost.full_flops for s in outputs)
        work = sum(s.cost.flops for s in outputs) / full if full else float("nan")
        cert = certified.certificate
        print(f"λ = {certified.threshold:g} (certified at δ = {cert.delta:g}, ε = {cert.epsilon:g}, n = {cert.n}); "
              f"{tokens} tokens, mean exit layer {layers / max(tokens, 1):.2f} of {num_layers}, work {work:.2f}× "
              "the full model's FLOPs", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """Entry point of ``ltt-generate``: 0 ok, 2 bad input or refused (one line on stderr), 1 internal error."""
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())

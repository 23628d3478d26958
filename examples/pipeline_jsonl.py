"""The whole pipeline on your own JSON Lines file, through the Python API.

decode (sweep) → loss table → certify → certificate → apply, on a local file whose rows have a
question and a context (here: SQuAD v1.1 dev from ../shared/data when present, else a small file
written by this script). Everything runs offline with the embedded SmolLM2 model.

Run:
    python examples/pipeline_jsonl.py                       # SmolLM2, 60 prompts
    python examples/pipeline_jsonl.py --data my.jsonl --size 200 --out-dir runs/mine
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ltt_exit.apply import CertifiedDecoder
from ltt_exit.certify import certify
from ltt_exit.decode import EarlyExitDecoder
from ltt_exit.models import fingerprint_parts, load_model
from ltt_exit.recipes import load_recipe
from ltt_exit.sweep import SweepSpec, run_sweep

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "squad_v1.1_dev.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED if SHARED.exists() else None,
                        help="JSON Lines file with 'id', 'question', 'context' and 'answers' fields")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--size", type=int, default=60)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--min-exit-layer", type=int, default=15)
    parser.add_argument("--out-dir", type=Path, default=Path("pipeline-jsonl"))
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    if args.data is None:  # a tiny stand-in so the example always runs
        args.data = args.out_dir / "toy.jsonl"
        rows = [{"id": f"toy{i}", "question": f"What is {i} plus {i}?", "context": f"{i} plus {i} is {2 * i}.",
                 "answers": [str(2 * i)]} for i in range(args.size)]
        args.data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    # 1. the recipe: the generic jsonl recipe with a field mapping, a template and a reference
    recipe = load_recipe(
        "jsonl",
        fields={"id": ["id", "@index"], "question": "question", "context": "context", "answers": "answers"},
        templates={"t5": "question: {question} context: {context}",
                   "decoder-only": "Answer in a few words.\n\nContext: {context}\n\nQuestion: {question}"},
        reference="answers", metric="token-f1", max_new_tokens=args.max_new_tokens,
        truncate_words={"context": 120},
    )
    loaded = load_model(args.model)
    calibration = recipe.load(data_files=args.data, size=args.size, family=loaded.family, tokenizer=loaded.tokenizer)
    print(calibration.describe())

    # 2. decode once for every candidate λ → loss table (resumable: rerun after a crash continues)
    decoder = EarlyExitDecoder(loaded.model, loaded.tokenizer, scorer="softmax-margin", pruning="decaying",
                               min_exit_layer=args.min_exit_layer)
    spec = SweepSpec(max_new_tokens=calibration.max_new_tokens, metric=calibration.metric, loss="textual")
    metadata = {"model": {"name": args.model, "source": loaded.source, "family": loaded.family},
                "model_fingerprint_parts": fingerprint_parts(loaded.model, loaded.tokenizer),
                "prompt_format": "chat-template" if calibration.chat_template_applied else "raw"}
    table = run_sweep(decoder, calibration, spec, out_path=args.out_dir / "losses.parquet",
                      model_fingerprint=loaded.fingerprint, metadata=metadata).table

    # 3. certify for a few δ from the same table — no decoding again
    layers = table.candidate_columns["mean_layers"].mean(axis=0)
    for delta in (0.05, 0.1, 0.2):
        cert = certify(table.losses, table.lambdas, delta, 0.05, costs=layers, metadata=table.metadata)
        print(f"\nδ = {delta}:\n{cert.summary()}")
    cert = certify(table.losses, table.lambdas, 0.2, 0.05, costs=layers, metadata=table.metadata)
    cert.save(args.out_dir / "certificate.json")

    # 4. apply: the certified decoder refuses any other model or configuration
    certified = CertifiedDecoder(args.out_dir / "certificate.json", loaded)
    out = certified.generate(["Context: The Nile flows north into the Mediterranean Sea.\n\n"
                              "Question: Into which sea does the Nile flow?"])[0]
    print(f"\n{out.text!r}  (mean exit layer {out.cost.mean_layers:.1f} of {certified.decoder.num_layers})")
    print("mean layers per candidate:", np.round(layers, 2))


if __name__ == "__main__":
    main()

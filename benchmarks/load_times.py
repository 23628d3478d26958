"""Time the model and data loading paths: GGUF conversion, cached load, fingerprint, recipes.

    python benchmarks/load_times.py                      # fresh temporary cache: first + cached load
    python benchmarks/load_times.py --cache-dir ~/.cache/ltt-exit --skip-first
    python benchmarks/load_times.py --data-dir ../shared/data

Each model load runs in a fresh interpreter so the numbers include what a user waits for
(imports of torch and transformers, reported apart as import_s; hashing; reading the cache). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOAD_SNIPPET = """
import json, time
start = time.perf_counter()
import torch, transformers
from ltt_exit.models import load_model, model_fingerprint
imported = time.perf_counter()
loaded = load_model({model!r}, device="cpu", cache_dir={cache!r})
done = time.perf_counter()
model_fingerprint(loaded.model, loaded.tokenizer)
fingerprinted = time.perf_counter()
print(json.dumps({{"import_s": imported - start, "load_s": done - imported, "total_s": done - start,
                  "fingerprint_s": fingerprinted - done, "source": loaded.source}}))
"""


def time_load(model: str, cache: str) -> dict:
    code = LOAD_SNIPPET.format(model=model, cache=cache)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_recipes(data_dir: Path | None) -> dict:
    from ltt_exit.recipes import load_recipe

    cases = [("aclsum-summary", None), ("gensim-lee", None)]
    if data_dir is not None:
        cases += [(n, data_dir) for n in ("squad", "samsum", "cnn-dailymail", "xsum", "iwslt2017-en-de")]
    times = {}
    for name, folder in cases:
        start = time.perf_counter()
        calibration = load_recipe(name).load(data_dir=folder)
        times[name] = {"seconds": time.perf_counter() - start, "examples": len(calibration),
                       "available": calibration.n_available}
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cache-dir", default=None, help="default: a fresh temporary folder")
    parser.add_argument("--skip-first", action="store_true", help="only time the cached load")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder with the shared JSONL files")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ltt-exit-bench-") as temp:
        cache = args.cache_dir or temp
        report = {"model": args.model, "cache_dir": cache}
        if not args.skip_first:
            report["first_load"] = time_load(args.model, cache)
        report["cached_load"] = time_load(args.model, cache)
        report["recipes"] = time_recipes(args.data_dir)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

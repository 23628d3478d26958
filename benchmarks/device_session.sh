#!/usr/bin/env bash
# The H200 measurements of one device session (issues 15, 16, 17), as one resumable call: every phase
# skips what an earlier call on the same warm machine finished, long sweeps resume from their partial
# files, and everything measured so far is copied to $OUT before the call's time is up.
# Bring-up first (benchmarks/gguf_transfer.py stash of the four GGUF parts into /tmp/gguf-parts, wheels
# into /tmp/site, the ../shared/data task files into /tmp/study-data; docs/study_table.md). Then:
#   BUDGET=570 bash benchmarks/device_session.sh        # repeat while the machine stays warm
source benchmarks/device_common.sh
mkdir -p /tmp/exit/tables $LTT_EXIT_CACHE/loss-tables
[ -e ../shared/data ] || { mkdir -p ../shared && ln -s /tmp/study-data ../shared/data; }

# 1. issue 15: the shipped exit-ready adapter against the frozen model, SAMSum test, n = 500 (the frozen
#    table and the adapter's interrupted sweep of 160 prompts come from the previous session)
if [ ! -f $DONE/exit ] && [ "$(left)" -gt 300 ]; then
  log "exit-ready n=500"
  cp -rn ltt_exit/models/exit_ready/smollm2-135m-exit /tmp/exit/
  [ -f /tmp/exit/tables/smollm2-135m.j15.parquet ] || cp .device/exit/smollm2-135m.j15.parquet /tmp/exit/tables/
  partial=$LTT_EXIT_CACHE/loss-tables/badbe3d9e2f55abf8564b68258849eee.parquet.partial.jsonl
  [ -f $partial ] || cp .device/exit/exit_partial.jsonl $partial
  timeout $(( $(left) - 200 )) python3 benchmarks/bench_exit_ready.py --models smollm2-135m /tmp/exit/smollm2-135m-exit \
    --recipe benchmarks/data/samsum_jsonl_recipe.yaml --data-files /tmp/study-data/samsum_test.jsonl --size 500 \
    --max-new-tokens 32 --min-exit-layer 15 --device cuda --dtype bfloat16 --batch-prompts 64 \
    --tables /tmp/exit/tables --out $OUT/bench_exit_ready.json > $OUT/exit_ready.log 2>&1 && touch $DONE/exit
  cp /tmp/exit/tables/*.json $OUT/ 2>/dev/null; tail -3 $OUT/exit_ready.log
fi

# 2. issue 15: what λ = 1 costs on the fast path (head consultations, ms/token against model.generate)
if [ ! -f $DONE/lambda_one ] && [ "$(left)" -gt 200 ]; then
  log "lambda one"
  timeout 150 python3 benchmarks/bench_lambda_one.py --model $GGUF --out $OUT/lambda_one.json > $OUT/lambda_one.log 2>&1 \
    && touch $DONE/lambda_one; tail -5 $OUT/lambda_one.log
fi

# 3. issue 16: Pareto Testing on the real model (27 settings x 10 lambdas, 200 SAMSum validation prompts,
#    24 new tokens; analysed on the GPU for risk consistency <= 0.2, re-analysed here for other risks)
# the sweep stops starting batches after its budget; one batch of 24 prompts x 27 settings takes about
# 150 s on the H200, and the analysis with the wall clock about 60 s: keep 240 s back, sweep only if 60 remain
if [ ! -f $DONE/pareto ] && [ "$(left)" -gt 300 ]; then
  log "pareto"
  mkdir -p /tmp/pareto_real
  [ -f /tmp/pareto_real/space.parquet.partial.jsonl ] || [ ! -f .device/pareto/space.parquet.partial.jsonl ] \
    || cp .device/pareto/space.parquet.partial.jsonl /tmp/pareto_real/
  timeout $(( $(left) - 20 )) python3 benchmarks/bench_pareto_real.py --model $GGUF \
    --data /tmp/study-data/samsum_validation.jsonl --size 200 --max-new-tokens 24 --device cuda --dtype bfloat16 \
    --batch-prompts 24 --risks risk=0.2 --time-budget $(( $(left) - 240 )) --out-dir /tmp/pareto_real --wall-prompts 16 \
    --space benchmarks/data/pareto_real_space.yaml > $OUT/pareto.log 2>&1
  grep -q "sweep complete" $OUT/pareto.log && [ -f /tmp/pareto_real/results-mean_layers.json ] && touch $DONE/pareto
  rm -rf $OUT/pareto_real && cp -r /tmp/pareto_real $OUT/pareto_real
  tail -4 $OUT/pareto.log
fi

# 4. issue 15: the shortlist head's time on the GPU
if [ ! -f $DONE/shortlist ] && [ "$(left)" -gt 150 ]; then
  log "shortlist"
  timeout 130 python3 benchmarks/bench_shortlist_head.py --device cuda --dtype bfloat16 --size 8 --tokens 24 \
    --sections flops head_time decode --out $OUT/shortlist_head_gpu.json > $OUT/shortlist.log 2>&1 && touch $DONE/shortlist
  tail -3 $OUT/shortlist.log
fi

# 5. issue 17: the study table's remaining tasks (frozen model, margin + decaying, j 15)
if [ "$(left)" -gt 100 ]; then
  log "study table"
  [ -d /tmp/study_out ] || cp -r benchmarks/results/study_table /tmp/study_out
  python3 benchmarks/study_table.py --models smollm2-135m=$GGUF --device cuda --dtype bfloat16 --data-dir /tmp/study-data \
    --tasks squad,samsum,xsum,cnn-dailymail,iwslt2017-en-de --scorers softmax-margin --reductions decaying \
    --n-test 50 --n-time 10 --max-new-tokens squad=24,samsum=32,xsum=32,cnn-dailymail=64,iwslt2017-en-de=48 \
    --time-budget $(( $(left) - 40 )) --quiet --no-report --out /tmp/study_out > $OUT/study.log 2>&1
  rm -rf $OUT/study_out && cp -r /tmp/study_out $OUT/study_out; tail -4 $OUT/study.log
fi
log "end"

#!/usr/bin/env bash
# The GPU evidence behind the committed results/, stage by stage; each stage resumes (complete
# results are skipped), so a stage cut short by a time limit is finished by running it again.
#   bash experiments/gpu_evidence.sh measure   # issue 4 (+ the spike claim, the generation bench)
#   bash experiments/gpu_evidence.sh finish    # what measure's time limit cut: spike, generation
#   bash experiments/gpu_evidence.sh base      # issue 6/8: reference base, PTQ, speed numerics
#   bash experiments/gpu_evidence.sh foundation   # issue 2: the four weight settings on the 7B shape
#   bash experiments/gpu_evidence.sh quality   # issue 6: the 36-run quality sweep on the base
#   bash experiments/gpu_evidence.sh speed-llama / speed-bloom   # issues 8/15, one 7B shape each
#   bash experiments/gpu_evidence.sh speed-peaks   # the isolated runs of the speed arms' peaks
#   bash experiments/gpu_evidence.sh peaks-fast   # issue 16: the fast arm's isolated run again, at the current code
#   bash experiments/gpu_evidence.sh numerics-graphs / graphs-llama / graphs-bloom   # issue 16: CUDA graphs' numerics; their comparison
#   bash experiments/gpu_evidence.sh stacks-llama / stacks-bloom   # issue 16: + Liger, Unsloth (SEED=1: a second one)
#   bash experiments/gpu_evidence.sh stacks-tests / numerics-liger   # issue 16: the stacks' GPU tests; Liger's numerics
#       # (the stacks' stages need the liger and unsloth extras: device_bundle.sh pack speed)
#   bash experiments/gpu_evidence.sh backends   # issue 18: SmolLM2 across quantization backends x adapter init/form
#   bash experiments/gpu_evidence.sh real / real-eval   # issue 14: SmolLM2 fine-tuned on chitchat
#       # (35 runs), then qlab eval of every run and of the three bases; RESULTS=/tmp/... where the
#       # tree is laid anew each call (the device: experiments/device_bundle.sh unpacks what they need)
#   bash experiments/gpu_evidence.sh parallel finish base speed-llama speed-bloom
#       # one stage per GPU of a multi-GPU host (CUDA_VISIBLE_DEVICES=0, 1, ...), all at once;
#       # each stage's output in results/logs/<stage>.out. Timed stages then share the host's
#       # CPUs and disk (not their GPU) with the others: the results record the host.
# Sized for calls of under 10 minutes on one H100/H200 (estimates in each stage's comment);
# the stages after `base` need the base in $QLAB_CACHE (43 s to rebuild on an H200).
# Every command's output goes to $RESULTS/logs/<stage>-<name>.log (default results/); a failing command is
# reported and the stage goes on.
set -uo pipefail
SELF=$(realpath "$0")
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAGE=${1:?usage: gpu_evidence.sh measure|finish|base|foundation|quality|speed-llama|speed-bloom|speed-peaks|peaks-fast|numerics-graphs|graphs-llama|graphs-bloom|stacks-llama|stacks-bloom|stacks-tests|numerics-liger|real|backends|real-eval|parallel STAGE...}
R=${RESULTS:-results}  # the real stages' results (the older stages write results/)
mkdir -p results/logs "$R/logs"
status=0

step() {  # step NAME SECONDS CMD...: run with a time limit, log, keep going on failure
  local name=$1 limit=$2
  shift 2
  echo "== $(date +%T) $STAGE/$name (limit ${limit}s)"
  timeout "$limit" "$@" >"$R/logs/$STAGE-$name.log" 2>&1
  local rc=$?
  echo "== $(date +%T) $STAGE/$name exit $rc"
  tail -n 3 "$R/logs/$STAGE-$name.log"
  [ $rc -eq 0 ] || status=1
}

MODEL=${MODEL:-llama-7b}  # MODEL=tiny-llama TRAIN=cpu: a dry run of the commands on a CPU
GPU7B=(model=$MODEL train=${TRAIN:-gpu} data.pad_to=max_seq_len train.progress=false)

generation() {  # every quantization setting with and without an r=64 nf4+DQ adapter (~20-40 s each)
  # the adapter: trained here when no run of this machine kept one (adapters are not committed)
  local adapter
  adapter=$(ls -dt results/adapter-$MODEL/${MODEL}_nf4-dq_*/adapter 2>/dev/null | head -n 1)
  if [ -z "$adapter" ]; then
    rm -rf results/adapter-$MODEL  # its result without the adapter would count as complete
    step adapter-run 120 $PY -m qlab.run "${GPU7B[@]}" quant=nf4 quant.double_quant=true tracker.sweep=adapter-$MODEL \
      train.steps=10 train.warmup_steps=3 data.max_eval_samples=16 train.save_adapter=true
    adapter=$(ls -dt results/adapter-$MODEL/${MODEL}_nf4-dq_*/adapter 2>/dev/null | head -n 1)
    # a new adapter (a result's id holds its weights' hash): the adapter rows measured with
    # another one go, so that all of them are measured with this one
    rm -rf results/generate-$MODEL/*_lora_*
  fi
  step generate 480 $PY -m qlab.tasks.generate ${adapter:+--run "$(dirname "$adapter")"} --model $MODEL \
    --quants nf4+dq,nf4,fp4,fp4+dq,int8,bf16 --prompts 3 --repeats 2 --new-tokens 24 --sweep generate-$MODEL
}

case $STAGE in
measure)
  step stability 60 $PY experiments/stability.py
  # nf4+DQ / nf4 / fp4 / int8 / bf16 on the 7B shape: the memory accounting, predicted vs
  # measured and the DQ saving
  step memory-sweep 270 $PY -m qlab.run "${GPU7B[@]}" tracker.sweep=measure-$MODEL hydra.mode=MULTIRUN \
    quant=nf4,fp4,int8,bf16 quant.double_quant=false,true optim=paged_adamw_32bit adapter=all_linear \
    train.steps=10 train.warmup_steps=3 data.max_eval_samples=16 train.save_adapter=false
  step kernels 120 $PY experiments/kernels.py
  step spike 150 $PY -m qlab.run experiment=spike "${GPU7B[@]}" tracker.sweep=spike-$MODEL
  generation
  ;;
finish)  # ~7 min at most: preset build 40 s, spike 2 x 30 s, the adapter when none is here (25 s),
  # the generation configurations without a result (30-70 s each)
  step spike 150 $PY -m qlab.run experiment=spike "${GPU7B[@]}" tracker.sweep=spike-$MODEL
  generation
  ;;
base)  # ~6 min: base 45 s (H200), PTQ of 7 types ~1-2 min, numerics 8 arms x 200 steps, 4 at a time
  step base 420 $PY -m qlab.reference.pretrain --size gpu --quiet
  step ptq 240 $PY -m qlab.claims.ptq --size gpu
  QLAB_NUM_GPUS=1 QLAB_RUNS_PER_GPU=4 step numerics 420 \
    $PY -m qlab.run experiment=numerics hydra/launcher=local_gpus  # verdicts: results/numerics-base-gpu/numerics.md
  ;;
foundation)  # ~5 min: issue 2's nf4+DQ / fp4 / int8 / bf16 on the 7B shape, 20 steps each
  step foundation 560 $PY -m qlab.run experiment=foundation model=$MODEL train=${TRAIN:-gpu}
  ;;
quality)  # ~8 min: 36 runs x 300 steps (0.17 s/step alone) in waves of 9 (QLAB_RUNS_PER_GPU);
  # NUM_GPUS=3 RUNS_PER_GPU=12: all 36 at once on three H200s, 2 min. Resumable: a second call
  # finishes what a time limit cut
  QLAB_NUM_GPUS=${NUM_GPUS:-1} QLAB_RUNS_PER_GPU=${RUNS_PER_GPU:-9} step quality-sweep 560 \
    $PY -m qlab.run experiment=quality model=base-gpu train=gpu data.max_seq_len=512 train.progress=false \
    hydra/launcher=local_gpus tracker.sweep=quality-base
  step claims 120 $PY -m qlab.claims --no-run
  ;;
speed-llama | speed-bloom)  # ~8 min: the interleaved comparison (conf/experiment/speed.yaml:
  # preset build, 8 arms in one process, rounds until the target or 450 s of the run)
  step compare 560 $PY -m qlab.run experiment=speed model=$([ "$STAGE" = speed-llama ] && echo llama-7b || echo bloom-7b1)
  ;;
stacks-llama | stacks-bloom)  # ~9.5 min: issue 16's comparison (conf/experiment/speed-stacks.yaml:
  # preset build, 7 arm processes set up one after another, rounds until the target or BUDGET s)
  step stacks 580 $PY -m qlab.run experiment=speed-stacks model=$([ "$STAGE" = stacks-llama ] && echo llama-7b || echo bloom-7b1) \
    seed=${SEED:-0} compare.time_budget_s=${BUDGET:-450}
  ;;
stacks-tests)  # ~3 min: the Liger and Unsloth arms set up and run blocks of steps on small-llama
  step gpu-tests 300 $PY -m pytest tests/tasks/test_arm_worker.py -m gpu -q -rs -p no:cacheprovider
  ;;
numerics-liger)  # ~5 min: the base (45 s), then the recipe and Liger's arm, 200 steps each, side by side;
  # verdicts: results/numerics-base-gpu-liger/numerics.md
  step base 420 $PY -m qlab.reference.pretrain --size gpu --quiet
  QLAB_NUM_GPUS=1 QLAB_RUNS_PER_GPU=2 step numerics 420 $PY -m qlab.run experiment=numerics hydra/launcher=local_gpus \
    '+arm=recipe,liger' tracker.sweep=numerics-base-gpu-liger
  ;;
peaks-fast)  # ~2 min: the fast arm's isolated run (speed-peaks) at the current code, over its earlier
  # result (force=true): issue 16's "fast's torch and NVML peaks no higher than before"
  step peaks-fast 300 $PY -m qlab.run experiment=speed-peaks model=llama-7b +arm=nf4-dq speed=fast force=true
  ;;
numerics-graphs)  # ~5 min: the base (45 s), then the recipe and the fast step under CUDA graphs, 200
  # steps each, side by side; verdicts: results/numerics-base-gpu-graphs/numerics.md
  step base 420 $PY -m qlab.reference.pretrain --size gpu --quiet
  QLAB_NUM_GPUS=1 QLAB_RUNS_PER_GPU=2 step numerics 420 $PY -m qlab.run experiment=numerics hydra/launcher=local_gpus \
    '+arm=recipe,graphs' tracker.sweep=numerics-base-gpu-graphs
  ;;
graphs-llama | graphs-bloom)  # ~9.5 min: fast and bf16-fast with and without CUDA graphs (conf/experiment/speed-graphs.yaml)
  step graphs 580 $PY -m qlab.run experiment=speed-graphs model=$([ "$STAGE" = graphs-llama ] && echo llama-7b || echo bloom-7b1) \
    seed=${SEED:-0} compare.time_budget_s=${BUDGET:-420}
  ;;
speed-peaks)  # the isolated runs memory peaks come from (results/speed-<model>/): complete ones are
  # skipped, so only what is missing runs (~1-2 min a run with the preset build)
  step peaks-llama 560 $PY -m qlab.run experiment=speed-peaks model=llama-7b
  step peaks-bloom 560 $PY -m qlab.run experiment=speed-peaks model=bloom-7b1
  ;;
real|backends)  # experiment=real (7 arms x 5 seeds, 150 steps of 8 x 512 on SmolLM2), RUNS_PER_GPU at
  # once on each of NUM_GPUS H200s: ~18 min on one (two calls), 8.5 min on two; experiment=backends
  # (issue 18: 9 arms x 5 seeds, the same steps) likewise. Resumable: a call runs what an earlier
  # call's time limit cut.
  # Further arguments are overrides, e.g. '+arm=fp4-all-linear,full-ft' (the long arms first, so that
  # a call's time limit cuts none midway); the run ids are the full sweep's
  QLAB_NUM_GPUS=${NUM_GPUS:-1} QLAB_RUNS_PER_GPU=${RUNS_PER_GPU:-12} step $STAGE-sweep ${LIMIT:-540} \
    $PY -m qlab.run experiment=$STAGE hydra/launcher=local_gpus tracker.results_dir=$R "${@:2}"
  ;;
real-eval)  # ~5 min: qlab eval of every run of the real sweep and of the three bases, EVALS at once
  # on each of NUM_GPUS GPUs (every NUM_GPUS-th target on one); complete evaluations are skipped
  n=${NUM_GPUS:-1} pids=()
  for ((g = 0; g < n; g++)); do
    printf "%s\n" smollm2-135m:bf16 smollm2-135m:nf4+dq smollm2-135m:fp4 "$R"/real-smollm2-135m/*/ | awk "NR % $n == $g" |
      CUDA_VISIBLE_DEVICES=$g LIMIT=${LIMIT:-540} timeout ${LIMIT:-540} xargs -P "${EVALS:-8}" -n 1 bash "$SELF" eval-one &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || status=1; done
  ;;
eval-one)  # eval-one RUN_DIR | MODEL:QUANT: lm-eval on qlab's local tasks, 512-token windows, the
  # first 200 documents or items of each task
  what=${2:?eval-one RUN_DIR or MODEL:QUANT}
  case $what in *:*) args=("${what%%:*}" --quant "${what#*:}") ;; *) args=("$what") ;; esac
  name=$(basename "${what%%:*}")${what#"${what%%:*}"}
  step "eval-${name//[^A-Za-z0-9_.+-]/_}" ${LIMIT:-540} $PY -m qlab.tasks.eval "${args[@]}" --limit 200 \
    --tasks qlab_wiki_ppl,qlab_c4_ppl,qlab_tinystories_ppl,qlab_chitchat_mc --max-length 512 --batch-size 16 \
    --results-dir "$R" --sweep eval-smollm2-135m
  ;;
parallel)  # parallel STAGE...: stage i on GPU i, all at once
  shift
  gpu=0
  pids=()
  for s in "$@"; do
    echo "== $(date +%T) $s on GPU $gpu: results/logs/$s.out"
    CUDA_VISIBLE_DEVICES=$gpu bash "$SELF" "$s" >"results/logs/$s.out" 2>&1 &
    pids+=($!)
    gpu=$((gpu + 1))
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { status=1; echo "== stage ${*:i+1:1} failed (results/logs/${*:i+1:1}.out)"; }
  done
  ;;
*)
  echo "unknown stage $STAGE" >&2
  exit 2
  ;;
esac
exit $status

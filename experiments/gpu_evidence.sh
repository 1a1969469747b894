#!/usr/bin/env bash
# The GPU evidence behind the committed results/, stage by stage; each stage resumes (complete
# results are skipped), so a stage cut short by a time limit is finished by running it again.
#   bash experiments/gpu_evidence.sh measure   # issue 4 (+ the spike claim, the generation bench)
#   bash experiments/gpu_evidence.sh quality   # issue 6: reference base, PTQ, quality sweep
#   bash experiments/gpu_evidence.sh speed     # issue 8: Trainer / recipe / fast / bf16 LoRA
# Every command's output goes to results/logs/<stage>-<name>.log; a failing command is
# reported and the stage goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAGE=${1:?usage: gpu_evidence.sh measure|quality|speed}
mkdir -p results/logs
status=0

step() {  # step NAME SECONDS CMD...: run with a time limit, log, keep going on failure
  local name=$1 limit=$2
  shift 2
  echo "== $(date +%T) $STAGE/$name (limit ${limit}s)"
  timeout "$limit" "$@" >"results/logs/$STAGE-$name.log" 2>&1
  local rc=$?
  echo "== $(date +%T) $STAGE/$name exit $rc"
  tail -n 3 "results/logs/$STAGE-$name.log"
  [ $rc -eq 0 ] || status=1
}

MODEL=${MODEL:-llama-7b}  # MODEL=tiny-llama TRAIN=cpu: a dry run of the commands on a CPU
GPU7B=(model=$MODEL train=${TRAIN:-gpu} data.pad_to=max_seq_len train.progress=false)

case $STAGE in
measure)
  step stability 60 $PY experiments/stability.py
  # nf4+DQ / nf4 / fp4 / int8 / bf16 on the 7B shape: the memory accounting, predicted vs
  # measured and the DQ saving (the nf4+DQ run keeps its adapter for the generation bench)
  step memory-sweep 270 $PY -m qlab.run "${GPU7B[@]}" tracker.sweep=measure-$MODEL hydra.mode=MULTIRUN \
    quant=nf4,fp4,int8,bf16 quant.double_quant=false,true optim=paged_adamw_32bit adapter=all_linear \
    train.steps=10 train.warmup_steps=3 data.max_eval_samples=16 train.save_adapter=true
  step kernels 120 $PY experiments/kernels.py
  step overhead 150 $PY experiments/overhead.py --rounds 5 --steps 6
  step spike 150 $PY -m qlab.run experiment=spike "${GPU7B[@]}" tracker.sweep=spike-$MODEL
  adapter_run=$(ls -d results/measure-$MODEL/${MODEL}_nf4-dq_* 2>/dev/null | head -n 1)
  step generate 600 $PY -m qlab.generate_bench ${adapter_run:+--run "$adapter_run"} --model $MODEL \
    --quants nf4+dq,nf4,fp4,fp4+dq,int8,bf16 --prompts 3 --repeats 2 --new-tokens 24 --sweep generate-$MODEL
  ;;
quality)
  step base 420 $PY -m qlab.base --size gpu --quiet
  ;;
speed)
  ;;
*)
  echo "unknown stage $STAGE" >&2
  exit 2
  ;;
esac
exit $status

#!/usr/bin/env bash
# Issue 2's GPU evidence: one run each of nf4+DQ / fp4 / int8 / bf16 on the llama-7b shape,
# r=64 all-linear LoRA, paged AdamW 32-bit, 4 x 512 tokens per step (padded to fixed shapes).
#   bash experiments/foundation_gpu.sh            # MODEL=tiny-llama DEVICE=cpu to dry-run on a CPU
set -uo pipefail
MODEL=${MODEL:-llama-7b}
DEVICE=${DEVICE:-cuda}
SWEEP=${SWEEP:-foundation-gpu}
common=(model="$MODEL" train=gpu train.device="$DEVICE" adapter=all_linear adapter.r=64
        optim=paged_adamw_32bit data.pad_to=max_seq_len data.max_seq_len=512 tracker.sweep="$SWEEP")
status=0
for quant in "quant=nf4 quant.double_quant=true" "quant=fp4" "quant=int8" "quant=bf16"; do
  # shellcheck disable=SC2086
  "${PYTHON:-python3}" -m qlab.run "${common[@]}" $quant train.progress=false "$@" || status=$?
done
exit $status

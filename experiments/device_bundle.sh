#!/usr/bin/env bash
# What a GPU machine with no package index and no hub needs, cut into payloads that each fit one
# transfer beside the working tree, and put back together there.
#
# Here:   bash experiments/device_bundle.sh pack [all|speed]   # -> .device/call1, ... (ignored by git)
# There:  bash experiments/device_bundle.sh unpack .device/callN   # once per call, in order
#         source /tmp/qlab-device/env.sh                # PYTHONPATH, QLAB_CACHE for every command
#
# A transfer carries at most 64 MiB: the working tree (28 MB at the end of 2026-11, results/
# included) plus one payload of at most PAYLOAD_MB (default: what the tree leaves, less 1 MiB). Payloads hold the wheels the image lacks (bitsandbytes, Hydra,
# gguf, lm-evaluation-harness and what it needs beyond the image), the data wheels (chitchat,
# exllamav3's texts) and the SmolLM2 GGUF in checksummed parts (qlab/reference/transfer.py).
# unpack copies each payload out of the tree into /tmp/qlab-device (files there outlive the call
# while the machine stays warm; the tree does not), installs what it can, and joins the GGUF once
# every part has arrived (its SHA-256 checked) into $QLAB_CACHE/gguf/files/, where
# qlab/reference/gguf.py finds a hand-placed copy.
# `pack speed` holds only what the speed comparison needs (experiment=speed-stacks, numerics): the
# wheels of qlab's training path and the public stacks' extras (pyproject's liger and unsloth, at
# their pinned versions, with pillow, which unsloth-zoo imports), no texts and no GGUF.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEV=${DEVICE_DIR:-/tmp/qlab-device}  # where payloads land; SITE the wheels, CACHE qlab's cache
SITE=${SITE:-/tmp/site}
CACHE=${CACHE:-/tmp/qlab-cache}
PAYLOAD_MB=${PAYLOAD_MB:-}

tree_bytes() {  # what travels with every call: tracked and untracked, not ignored, files
  { git ls-files -z; git ls-files -z -o --exclude-standard; } | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1 || true
}

locked() {  # locked NAME: NAME==version as requirements.lock pins it
  grep -i "^$1==" requirements.lock || { echo "device_bundle.sh: $1 is not in requirements.lock" >&2; exit 1; }
}

extras() {  # extras NAME...: the requirements pyproject's optional-dependencies NAME pin
  $PY - "$@" <<'EOF'
import sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
print(" ".join(r for name in sys.argv[1:] for r in deps[name]))
EOF
}

pack() {
  local profile=${1:-all} work=.device/pack out=.device
  if [ -z "$PAYLOAD_MB" ]; then
    PAYLOAD_MB=$(( (64 * 1048576 - $(tree_bytes)) / 1048576 - 1 ))
    echo "payloads of at most $PAYLOAD_MB MiB beside the $(( $(tree_bytes) / 1048576 )) MiB working tree"
  fi
  rm -rf "$work" "$out"/call*; mkdir -p "$work/wheels" "$work/data" "$work/parts"
  local plat="--only-binary=:all: --python-version 3.12 --implementation cp"
  for n in 28 27 24 17 5; do plat="$plat --platform manylinux_2_${n}_x86_64"; done
  plat="$plat --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
  # the image has torch, transformers, peft, accelerate, numpy, pandas, pyarrow, scikit-learn,
  # sacrebleu, requests, tqdm, jinja2, xxhash, fsspec, huggingface-hub, joblib, click, regex; what it
  # lacks comes at requirements.lock's versions, the ones the CPU suite ran with
  local wheels=(bitsandbytes hydra-core omegaconf hydra-joblib-launcher gguf lm-eval datasets evaluate dill
                multiprocess pytablewriter dataproperty mbstrdecoder pathvalidate tabledata tcolorpy typepy chardet
                rouge-score nltk absl-py more-itertools defusedxml torchao einops termcolor)
  local sources=(antlr4-python3-runtime sqlitedict word2number hqq)  # published as source only
  # speed: training only; unsloth, unsloth-zoo and trl import datasets when imported
  [ "$profile" = speed ] && wheels=(bitsandbytes hydra-core omegaconf hydra-joblib-launcher datasets dill multiprocess) \
    && sources=(antlr4-python3-runtime)
  local p spec binaries=() built=()
  for p in "${wheels[@]}"; do spec=$(locked "$p"); binaries+=("$spec"); done  # a name the lock lacks stops here
  for p in "${sources[@]}"; do spec=$(locked "$p"); built+=("$spec"); done
  if [ "$profile" = speed ]; then
    # shellcheck disable=SC2207
    binaries+=($(extras liger unsloth) pillow==13.0.0)
  else  # lm-eval reads its .zst data files with it on the device; the CPU install does without (not in the lock)
    binaries+=(zstandard==0.25.0)
  fi
  for p in "${binaries[@]}"; do $PY -m pip download -q --no-deps $plat -d "$work/wheels" "$p" 2>&1 | grep -v WARNING || true; done
  for p in "${built[@]}"; do
    DISABLE_CUDA=1 $PY -m pip wheel -q --no-deps -w "$work/wheels" "$p" 2>&1 | grep -v WARNING || true
  done
  # slimmed wheels: bitsandbytes with its CPU and CUDA 13 libraries only (the image's CUDA); unsloth
  # without studio/, its web UI (26 of its 28.6 MB), which training never imports
  $PY - "$work/wheels" <<'EOF'
import glob, os, sys, zipfile
DROP = {"bitsandbytes": lambda n: n.endswith(".so") and "libbitsandbytes_" in n
                                  and not any(k in n for k in ("_cpu", "_cuda130", "_cuda132")),
        "unsloth": lambda n: n.startswith("studio/")}
for name, dropped in DROP.items():
    for whl in glob.glob(os.path.join(sys.argv[1], f"{name}-*.whl")):
        with zipfile.ZipFile(whl) as z, zipfile.ZipFile(whl + ".tmp", "w", zipfile.ZIP_DEFLATED) as o:
            drop = {n for n in z.namelist() if dropped(n)}
            for n in z.namelist():
                if n not in drop:
                    data = z.read(n)
                    if n.endswith(".dist-info/RECORD"):
                        data = "".join(l + "\n" for l in data.decode().splitlines() if l.split(",")[0] not in drop).encode()
                    o.writestr(n, data)
        os.replace(whl + ".tmp", whl)
EOF
  if [ "$profile" = all ]; then  # the texts and the GGUF
    for p in chitchat-dataset==0.9.0 exllamav3==1.6.5; do
      $PY -m pip download -q --no-deps $plat -d "$work/data" "$p" 2>&1 | grep -v WARNING || true
    done
    local gguf
    gguf=$($PY -c "from qlab.reference import gguf; print(gguf.locate('smollm2-135m'))")
    # small parts (93.8 MiB / 24 = 3.9 MiB each) fill every payload to its brim: 4 calls beside a 28 MB tree
    $PY -m qlab.reference.transfer split "$gguf" --parts 24 --out "$work/parts"
  fi
  # greedily fill payloads of at most PAYLOAD_MB, the wheels first (the first call installs them)
  $PY - "$work" "$out" "$PAYLOAD_MB" <<'EOF'
import os, shutil, sys
from pathlib import Path
work, out, cap = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]) * 2**20
files = [f for d in ("wheels", "data", "parts") for f in sorted((work / d).iterdir())]  # the manifest last
calls, size = [[]], 0
for f in files:
    if size + f.stat().st_size > cap and calls[-1]:
        calls.append([]); size = 0
    calls[-1].append(f); size += f.stat().st_size
for i, group in enumerate(calls, 1):
    d = out / f"call{i}"
    d.mkdir(parents=True)
    for f in group:
        shutil.copy2(f, d / f.name)
    print(f"{d}: {len(group)} files, {sum(f.stat().st_size for f in group) / 2**20:.1f} MiB")
EOF
  rm -rf "$work"
}

unpack() {
  local payload=${1:?usage: device_bundle.sh unpack .device/callN}
  mkdir -p "$DEV/parts" "$SITE" "$CACHE/gguf/files"
  cp "$payload"/* "$DEV/parts/"
  cat > "$DEV/env.sh" <<EOF
export PYTHONPATH=$SITE:$PWD QLAB_CACHE=$CACHE WANDB_MODE=offline
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
EOF
  local whl=("$DEV"/parts/*.whl)
  [ -e "${whl[0]}" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$DEV"/parts/*.whl && rm -f "$DEV"/parts/*.whl
  # shellcheck disable=SC1091
  source "$DEV/env.sh"
  local manifest
  for manifest in "$DEV"/parts/*.sha256; do
    [ -e "$manifest" ] || continue
    local name n have
    name=$(basename "$manifest" .sha256)
    n=$(grep -c "\.part[0-9]*$" "$manifest")
    have=$(ls "$DEV/parts/$name".part* 2>/dev/null | wc -l)
    if [ "$have" -eq "$n" ]; then
      python3 -m qlab.reference.transfer join "$DEV/parts/$name".part* --out "$CACHE/gguf/files/$name"
      rm -f "$DEV/parts/$name".part* "$manifest"
    else
      echo "$name: $have of $n parts here; the rest come with the next payloads"
    fi
  done
}

case ${1:-} in
  pack) shift; pack "$@" ;;
  unpack) shift; unpack "$@" ;;
  *) echo "usage: device_bundle.sh pack [all|speed] | unpack .device/callN" >&2; exit 2 ;;
esac

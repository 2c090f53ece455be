#!/usr/bin/env bash
# The GPU benchmarks, each under its own timeout, with the arguments their committed results were made with:
#   bash experiments/run_gpu.sh                  # infer 240 + profile 240 + train 300 + moe 200 s: several 10-minute calls
#   bash experiments/run_gpu.sh infer profile    # only these (names: infer, profile, train, moe, qwen35, qwen35-off, qwen35_kernels-none, qwen35_kernels-fla, qwen35_9b_pair, profile_qwen35, profile_norms, fits-fp16, fits-bf16, fits-2b, peers, peers_fp16, peers_equal, peers_qwen35_fp16, peers_qwen35_score, peers_qwen35_bf16, peers_qwen35_islands, peers_qwen35_9b, unsloth-check, peers_unsloth, peers_ways, peers_loader, peers_unsloth_ways, peers_unsloth_bf16, peers_unsloth_qwen35, peers_unsloth_qwen35_bf16, peers_unsloth_qwen35_bf16_long, peers_unsloth_qwen35_fp32, peers_unsloth_equal, peers_unsloth_equal_bf16, peers_unsloth_settings_bf16, peers_unsloth_offload_bf16, peers_offload_bf16, peers_offload_fp16, peers_fused_lora, peers_fused_lora_bf16, peers_unsloth_helpers_bf16, peers_unsloth_helpers_fp16, peers_unsloth_compiled_bf16, peers_unsloth_compiled_fp16, peers_unsloth_profile_bf16, peers_unsloth_profile_fp16, bench_attention, bench_attention_odd, peers_unsloth_unmasked_bf16, peers_unsloth_unmasked_fp16, peers_unsloth_default_bf16, peers_t4_kernels, peers_liger_bf16, peers_liger_fp16, peers_liger_qwen35, peers_unsloth_liger_bf16, peers_unsloth_liger_fp16, peers_qwen35_conv_fp16, peers_qwen35_conv_bf16, peers_qwen35_compiled, peers_vision16, peers_checkpointing, peers_compiled, replay)
#   bash experiments/run_gpu.sh peers            # bench_peers.py: the project vs TRL and Unsloth, about 5 min
#   bash experiments/run_gpu.sh rehearse-8b      # the rehearsal (rehearse.py): rehearse-8b, rehearse-2b, rehearse-30b, rehearse-more, rehearse-high, rehearse-1gpu, rehearse-qwen35,
#                                               rehearse-qwen35-9b, rehearse-qwen25-7b, rehearse-9b-alloc, rehearse-4b-alloc, rehearse-vision16, rehearse-vision16-x2,
#                                               rehearse-x2-default, rehearse-x2-qwen3.5-27b, rehearse-x2-qwen3.6-35b-a3b,
#                                               rehearse-checkpointing, rehearse-offload, rehearse-compiled,
#                                               rehearse-8b-compiled-x2 rehearse-8b-compiled-long-x2
#                                               rehearse-8b-compiled-300, rehearse-8b-padding-mask-300, rehearse-8b-t4-kernels-240, rehearse-8b-val-scores-240, rehearse-8b-liger-300, rehearse-qwen35-liger-120 (two GPUs,
#                                               one run each)
#   bash experiments/run_gpu.sh gpu-tests        # the tests skipped in CI for want of a GPU (.whl-test/ carried)
# A failure of one is logged and does not stop the others. JSON and logs are written to "$OUT/" (the folder whose
# files come back from the GPU machine) as they run, and the JSON copied to experiments/results/. The benchmarks
# write their JSON after every model, so one cut short, by its timeout or the device call's, still leaves what it
# measured.
# The GPU machine has no bitsandbytes (nor perhaps peft): both come as wheels in .whl/ (carried, git-ignored).
# experiments/fetch_wheels.sh downloads .whl/, .whl-peers/ and .whl-unsloth/ at the versions the results used.
# bench_peers.py also needs TRL and what it requires beyond the machine's packages (datasets, dill, multiprocess): the
# wheels in .whl-peers/ (carried beside .whl/, git-ignored), installed with them where the folder is there.
cd "$(dirname "$0")/.." || exit 1
wheels=(.whl/*.whl)
[[ -d .whl-peers ]] && wheels+=(.whl-peers/*.whl)
[[ -d .whl-test ]] && wheels+=(.whl-test/*.whl)  # pytest, for gpu-tests
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" &&
    export PYTHONPATH=/tmp/site || echo "WARNING: installing ${wheels[*]} failed; 4-bit loading will fail"

set -u
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/bench-out}"
mkdir -p "$OUT" experiments/results
started=$SECONDS

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "WARNING: nvidia-smi failed"
python3 - <<'EOF'
import importlib
for name in ("torch", "transformers", "accelerate", "peft", "bitsandbytes", "trl", "datasets", "pyarrow"):
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
selected="${*:-infer profile train moe peers rehearse-8b rehearse-2b rehearse-30b rehearse-more}"
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
    # The JSON is written under $OUT while it runs (what is there comes back even when the device call is cut
    # short), starting from the committed one (some scripts add to it), and copied back to experiments/results/.
    local json=${name%%-*}.json
    [[ -f experiments/results/$json && ! -f $OUT/$json ]] && cp "experiments/results/$json" "$OUT/"
    timeout -k 10 "$limit" python3 "$script" --out "$OUT/$json" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    [[ -f $OUT/$json ]] && cp "$OUT/$json" experiments/results/
    if [[ $rc -ne 0 ]]; then
        [[ $rc -eq 124 || $rc -eq 137 ]] && echo "== $name: TIMED OUT after ${limit} s" || echo "== $name: FAILED (exit $rc)"
        failures+=("$name:$rc")
    else
        echo "== $name: done in $((SECONDS - started)) s elapsed"
    fi
}

# rehearse NAME SECONDS ARGS...: one rehearsal run of the whole notebook (rehearse.py) on 4 CPU cores, as a Kaggle
# session has, every GPU capped at 14.5 GiB; all runs go into results/rehearsal.json.
rehearse() {
    local name=$1 limit=$2
    shift 2
    [[ " $selected " == *" $name "* ]] || return 0
    echo "== $name: rehearse.py $* (timeout ${limit} s, $((SECONDS - started)) s elapsed)"
    python3 experiments/rehearse.py --out /dev/null --prepare-only "$@" 2>&1 | tail -n 2
    [[ ! -f $OUT/rehearsal.json ]] && cp experiments/results/rehearsal.json "$OUT/"  # as run() does with its JSON
    MPLBACKEND=Agg timeout -s INT -k 30 "$limit" taskset -c 0-3 python3 experiments/rehearse.py \
        --out "$OUT/rehearsal.json" "$@" 2>&1 | tee -a "$OUT/$name.log" | grep -v "it/s\]$"
    local rc=${PIPESTATUS[0]}
    cp "$OUT/rehearsal.json" experiments/results/ 2>/dev/null
    [[ $rc -eq 0 ]] && echo "== $name: done in $((SECONDS - started)) s elapsed" || failures+=("$name:$rc")
}

# rehearse_both NAME SECONDS GPUS OPTION JSON ARGS...: one rehearsal twice at once, with OPTION on (cores 0-3) and off
# (cores 4-7), each a four-core Kaggle session: both on one GPU (GPUS=1: their seconds are then no measurement, they
# share it) or on a GPU each (GPUS=2, nvidia-h200-x2: side by side in one call where a pair in turn would not fit its
# 600 s). Each writes JSON_on.json or JSON_off.json and NAME-on.log or NAME-off.log under $OUT.
rehearse_both() {
    local name=$1 limit=$2 gpus=$3 option=$4 json=$5
    shift 5
    [[ " $selected " == *" $name "* ]] || return 0
    echo "== $name: rehearse.py $* $option on|off, side by side (timeout ${limit} s, $((SECONDS - started)) s elapsed)"
    python3 experiments/rehearse.py --out /dev/null --prepare-only "$@" 2>&1 | tail -n 2
    local i value pids=()
    for i in 0 1; do
        value=$([[ $i == 0 ]] && echo on || echo off)
        CUDA_VISIBLE_DEVICES=$((i % gpus)) MPLBACKEND=Agg timeout -s INT -k 30 "$limit" \
            taskset -c $((4 * i))-$((4 * i + 3)) python3 experiments/rehearse.py "$@" "$option" $value \
            --out "$OUT/${json}_$value.json" >"$OUT/$name-$value.log" 2>&1 &
        pids+=($!)
    done
    for i in 0 1; do
        wait "${pids[$i]}" || failures+=("$name:$i:$?")
    done
    cp "$OUT/${json}"_o*.json experiments/results/ 2>/dev/null  # written under $OUT, as run() does
    grep -h "rehearsal .*total_s\|out of memory\|Error" "$OUT/$name"-o*.log | cut -c 1-400
}

rehearse rehearse-8b 330 --model 8b --level safe --precision fp16 --parallel off
rehearse rehearse-8b 300 --model 8b --level safe --precision fp16 --parallel on
# The run that stepped on a NaN gradient at step 24 before optimizer_step (1024 rows, seed 0, as it was then)
rehearse rehearse-2b 240 --model 2b --level safe --precision bf16 --parallel off --train-rows 1024 --seed 0
rehearse rehearse-30b 540 --model 30b --level safe --precision fp16
rehearse rehearse-more 300 --model 8b --level high --precision bf16 --parallel on
# One GPU (when no two are lent): the largest level in the T4's precision, 4 TTA rotations
rehearse rehearse-high 480 --model 8b --level high --precision fp16 --parallel off
# One GPU, the T4's precision at `safe`: the first fp16 rehearsal after cuDNN's attention was turned off
rehearse rehearse-1gpu 330 --model 8b --level safe --precision fp16 --parallel off
# Qwen3.5-4B on one GPU in fp16, the T4 precision (600/200 rows: what the last device minutes of 2026-11-29 allowed)
rehearse rehearse-qwen35 240 --model qwen3.5-4b --level safe --precision fp16 --parallel off --train-rows 600 --test-rows 200
# Qwen2.5-VL-7B the same way: the first real-size run of the Qwen2.5-VL family (3B: --model qwen2.5-3b)
rehearse rehearse-qwen25-7b 270 --model qwen2.5-7b --level safe --precision fp16 --parallel off --train-rows 600 --test-rows 200
# Qwen3.5-9B the same way (the model that would replace the default if it ran the whole notebook)
rehearse rehearse-qwen35-9b 330 --model qwen3.5-9b --level safe --precision fp16 --parallel off --train-rows 600 --test-rows 200
# Not run yet: the default model with its vision encoder in 16 bits (Config(quantize_vision=False), as Unsloth keeps
# it), the gate for making that the default; one GPU, then two (folds side by side) where nvidia-h200-x2 is lent
rehearse rehearse-vision16 240 --model qwen3.5-4b --level safe --precision fp16 --parallel off --train-rows 600 --test-rows 200 --quantize-vision off
rehearse rehearse-vision16-x2 300 --model qwen3.5-4b --level safe --precision fp16 --parallel on --train-rows 1000 --test-rows 300 --quantize-vision off

# nvidia-h200-x2: the default model as a T4 x2 user runs it (parallel_folds=None: side by side on 2 GPUs since the
# fix of 2026-11-29), then in turn, for the ratio (about 4 minutes each)
rehearse rehearse-x2-default 290 --model qwen3.5-4b --level safe --precision fp16 --parallel auto
rehearse rehearse-x2-default 270 --model qwen3.5-4b --level safe --precision fp16 --parallel off
# nvidia-h200-x2: Qwen3-VL-8B with two folds side by side, its norms compiled (two processes, each with its compile
# workers' host memory) and eager, for the ratio (8 minutes; compiled was slower, and is off by default since)
rehearse rehearse-8b-compiled-x2 270 --model 8b --level safe --precision fp16 --parallel on --compile-norms on --liger-kernels off
rehearse rehearse-8b-compiled-x2 250 --model 8b --level safe --precision fp16 --parallel on --compile-norms off --liger-kernels off
# The same with longer folds, where compiling could repay its 10-15 s a process (0.13 s a step shorter): 4 folds of
# 60 steps, two a GPU: 120 steps a process. (1440 rows, 136 steps a process, did not fit twice in one device call: the
# compiled run alone passed its 245 s.)
rehearse rehearse-8b-compiled-long-x2 270 --model 8b --level safe --precision fp16 --parallel on --compile-norms on --liger-kernels off \
    --folds 4 --train-rows 1280 --test-rows 100
rehearse rehearse-8b-compiled-long-x2 270 --model 8b --level safe --precision fp16 --parallel on --compile-norms off --liger-kernels off \
    --folds 4 --train-rows 1280 --test-rows 100
# Not run yet: where compiling should repay, 300 steps a process (4 folds of 75 steps in turn on one GPU, 1600 rows),
# compiled and eager side by side on the two GPUs of one nvidia-h200-x2 (about 5 minutes after the checkpoint builds),
# into results/rehearsal_compiled_300_on.json and _off.json
rehearse_both rehearse-8b-compiled-300 420 2 --compile-norms rehearsal_compiled_300 --model 8b --level safe \
    --precision fp16 --parallel off --folds 4 --train-rows 1600 --test-rows 100 --liger-kernels off
# The same length with the training steps' padding mask given (the old call, on GPU 0) and not (the default, GPU 1)
rehearse_both rehearse-8b-padding-mask-300 420 2 --padding-mask rehearsal_padding_mask_300 --model 8b --level safe \
    --precision fp16 --parallel off --folds 4 --train-rows 1600 --test-rows 100
# On a T4's kernels (SDPA's flash off: memory-efficient and math only), masked (GPU 0, the T4's call until now) and
# unmasked with the key/value heads repeated (GPU 1, helpers.unmasked_attention's choice there); 4 folds of 60 steps,
# for the vision attention's slower kernel to fit the call
rehearse_both rehearse-8b-t4-kernels-240 420 2 --padding-mask rehearsal_t4_kernels_240 --model 8b --level safe \
    --precision fp16 --parallel off --folds 4 --train-rows 1280 --test-rows 100 --flash off
# The validation rows scored again after training (GPU 0, as before 89413fd) and taken from the best adapter's
# validation pass (GPU 1, helpers.validation_scores): the same 4 folds of 60 steps, fp16, flash as the H200 has it
rehearse_both rehearse-8b-val-scores-240 420 2 --rescore-validation rehearsal_val_scores_240 --model 8b --level safe \
    --precision fp16 --parallel off --folds 4 --train-rows 1280 --test-rows 100
# Liger's kernels on the language model (GPU 0) and its norms eager (GPU 1, the default), 300 steps a process as the
# compiled norms were run: the gate for Config.liger_kernels (liger-kernel's wheel in .whl/)
rehearse_both rehearse-8b-liger-300 420 2 --liger-kernels rehearsal_liger_300 --model 8b --level safe \
    --precision fp16 --parallel off --folds 4 --train-rows 1600 --test-rows 100
# The same pair on the default model, Qwen3.5-4B (a step about 1.7 s on an H200): 4 folds of 30 steps
rehearse_both rehearse-qwen35-liger-120 420 2 --liger-kernels rehearsal_liger_qwen35_120 --model qwen3.5-4b \
    --level safe --precision fp16 --parallel off --folds 4 --train-rows 640 --test-rows 100
# nvidia-h200-x2: the two models that need both GPUs, one call each (a random checkpoint builds in about 60 s before
# the timeout starts); the 16-bit checkpoint (54 and 70 GB) is removed after, for the RAM disk's sake
for model in qwen3.5-27b qwen3.6-35b-a3b; do
    rehearse "rehearse-x2-$model" 420 --model "$model" --level safe --precision fp16 --train-rows 320 --test-rows 96
    [[ " $selected " == *" rehearse-x2-$model "* ]] && rm -rf /dev/shm/rehearse/qwen3.5-{27b,35b-a3b}-random
done

# The default model through the whole notebook with each checkpointing way (Config.reentrant_checkpointing,
# offload_activations), one after the other on the one GPU and 4 cores, into results/rehearsal_checkpointing.json:
# the gate for making reentrant checkpointing the default, as it is since (3 minutes each). rehearse-offload: the
# default and the offloaded way only, the gate for helpers.OffloadedCheckpointing (offloading on a side stream).
# rehearse-compiled: the default model with its norms compiled (Config.compile_norms=True) and eager, the gate for
# compiling them (3-4 minutes each; compiled was slower, and Qwen3.5 runs eager by default since).
if [[ " $selected " == *" rehearse-compiled "* ]]; then
    args=(--model qwen3.5-4b --level safe --precision fp16 --parallel off --train-rows 600 --test-rows 200)
    python3 experiments/rehearse.py --out /dev/null --prepare-only "${args[@]}" 2>&1 | tail -n 2
    for norms in on off; do
        echo "== rehearse-compiled: norms compiled $norms ($((SECONDS - started)) s elapsed)"
        MPLBACKEND=Agg timeout -s INT -k 30 240 taskset -c 0-3 python3 experiments/rehearse.py "${args[@]}" \
            --compile-norms $norms --liger-kernels off --out "$OUT/rehearsal_compiled.json" 2>&1 |
            tee "$OUT/rehearse-compiled-$norms.log" | grep -v "it/s\]$" | grep "rehearsal \|Error\|out of memory"
        [[ ${PIPESTATUS[0]} -eq 0 ]] || failures+=("rehearse-compiled:$norms")
    done
    cp "$OUT/rehearsal_compiled.json" experiments/results/ 2>/dev/null
fi
ways=()
[[ " $selected " == *" rehearse-checkpointing "* ]] && ways=(non-reentrant reentrant reentrant-offload)
[[ " $selected " == *" rehearse-offload "* ]] && ways=(reentrant reentrant-offload)
if [[ ${#ways[@]} -gt 0 ]]; then
    args=(--model qwen3.5-4b --level safe --precision fp16 --parallel off --train-rows 600 --test-rows 200)
    python3 experiments/rehearse.py --out /dev/null --prepare-only "${args[@]}" 2>&1 | tail -n 2
    # The committed non-reentrant run was made as "default" (it was then): its log says so, its name has no way
    for way in "${ways[@]}"; do
        echo "== rehearse-checkpointing: $way ($((SECONDS - started)) s elapsed)"
        MPLBACKEND=Agg timeout -s INT -k 30 200 taskset -c 0-3 python3 experiments/rehearse.py "${args[@]}" \
            --checkpointing $way --out "$OUT/rehearsal_checkpointing.json" 2>&1 |
            tee "$OUT/rehearse-checkpointing-$way.log" | grep -v "it/s\]$" | grep "rehearsal \|Error\|out of memory"
        [[ ${PIPESTATUS[0]} -eq 0 ]] || failures+=("rehearse-checkpointing:$way")
    done
    cp "$OUT/rehearsal_checkpointing.json" experiments/results/ 2>/dev/null
fi

# Qwen3.5 through the notebook with the CUDA allocator's expandable segments on (helpers' default since 2026-11-29)
# and off, side by side on the one GPU, each capped at 14.5 GiB and on 4 cores of its own: whether the 9B's fold 1
# still runs out of memory at micro-batch 16 (it did with them off), and what the default 4B holds. Their peaks and
# micro-batches are the measurement; their seconds are not (they share the GPU).
for size in 9b 4b; do
    rehearse_both "rehearse-$size-alloc" 540 1 --expandable-segments "rehearsal_alloc_$size" --model "qwen3.5-$size" \
        --level safe --precision fp16 --parallel off --train-rows 600 --test-rows 200
done

run infer 240 experiments/bench_infer.py --rows 512 --original-rows 64 --batch-sizes 16,32 --repeats 2
run profile 240 experiments/profile_infer.py --models 8b --rows 512
run train 300 experiments/bench_train.py
run moe 200 experiments/bench_moe.py
run qwen35 560 experiments/bench_qwen35_fp16.py --models 4b --steps 200 --islands on
run qwen35-off 330 experiments/bench_qwen35_fp16.py --models 4b --steps 200 --islands off
# Qwen3.5-9B for 200 steps with and without the fp32 islands, the two runs side by side on the one GPU (each capped at
# 14.5 GiB) so that both fit one 10-minute call: their skipped and non-finite steps are the measurement, their seconds
# per step are not (they share the GPU). The first process builds the checkpoint and the images, the second waits.
if [[ " $selected " == *" qwen35_9b_pair "* ]]; then
    echo "== qwen35_9b_pair: bench_qwen35_fp16.py 9b, 200 steps, islands on and off side by side"
    pids=()
    for islands in on off; do
        while [[ $islands == off && ! -f /tmp/qwen-vqa-bench/qwen3.5-9b-random/done ]] && kill -0 "${pids[0]}" 2>/dev/null; do
            sleep 5
        done
        timeout -k 10 540 python3 experiments/bench_qwen35_fp16.py --models 9b --steps 200 --islands $islands \
            --out "experiments/results/qwen35_9b_$islands.json" >"$OUT/qwen35_9b_$islands.log" 2>&1 &
        pids+=($!)
    done
    for i in 0 1; do
        wait "${pids[$i]}" || failures+=("qwen35_9b_pair:$i:$?")
    done
    cp experiments/results/qwen35_9b_o*.json "$OUT/" 2>/dev/null
    grep -h -v "it/s\]$" "$OUT"/qwen35_9b_o*.log | grep -v "falling back" | tail -n 20
fi
run profile_qwen35 300 experiments/profile_qwen35_precision.py --models qwen3.5-2b,qwen3.5-4b
# Why compiled norms train Qwen3.5-4B slower and gain less in bf16 than in fp16 on Qwen3-VL-8B: each step eager, then
# compiled, profiled (GPU busy time against the step's; the CPU ops with the most time): about 6 minutes. Not run yet.
run profile_norms 560 experiments/profile_qwen35_precision.py --models "${PROFILE_NORMS_MODELS:-qwen3.5-4b,8b}" --variants bf16,fp16-islands \
    --norms eager,compiled
# Qwen3.5-4B without, then with flash-linear-attention's Triton DeltaNet kernels (transformers uses the
# `fla` package where it imports). .whl-fla/ (carried, git-ignored): fla_core and flash_linear_attention 0.6.0, 1.5 MiB.
#   bash experiments/run_gpu.sh qwen35_kernels-none qwen35_kernels-fla    # on an H200 fla refuses its backward (fla#640)
run qwen35_kernels-none 280 experiments/bench_qwen35_fp16.py --models 4b --steps 40 --islands on --label " no fla"
if [[ " $selected " == *" qwen35_kernels-fla "* ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-fla/*.whl ||
        echo "WARNING: installing .whl-fla/ failed: the next run has no fast kernels"
fi
run qwen35_kernels-fla 280 experiments/bench_qwen35_fp16.py --models 4b --steps 40 --islands on --label " fla"
run replay 200 experiments/replay_nonfinite.py
# Which model fits which GPU: Qwen3-VL-8B (today's default) beside Qwen3.5, every level, one precision per call
run fits-fp16 560 experiments/bench_fits.py --models qwen3-vl-8b,qwen3.5-9b,qwen3.5-4b,qwen3.5-2b --precisions fp16
run fits-bf16 480 experiments/bench_fits.py --models qwen3-vl-8b,qwen3.5-9b,qwen3.5-4b,qwen3.5-2b --precisions bf16
# Qwen3.5-2B in fp16 (the first fits-fp16 call did not know its name)
run fits-2b 120 experiments/bench_fits.py --models qwen3.5-2b --precisions fp16
run peers 400 experiments/bench_peers.py --model 8b
# fp16 only, TRL's adapters cast back to fp32 (TRL 1.16 makes them bf16, which fp16 cannot train): about 4 minutes
run peers_fp16 300 experiments/bench_peers.py --model 8b --precisions fp16 --tools project,trl
# Equal memory at the project's setting: TRL at micro-batch 16 too, 10 timed steps (3 were too noisy), both precisions
run peers_equal 580 experiments/bench_peers.py --model 8b --precisions fp16,bf16 --tools project,trl --steps 10 \
    --micro-batches 16 --worker-timeout 150
# The same on Qwen3.5-4B, the notebook's default model since 2026-11-29 (its project process ran out of time)
run peers_qwen35_fp16 560 experiments/bench_peers.py --model qwen3.5-4b --precisions fp16 --tools project,trl --steps 10 --micro-batches 2,16
# ... before scoring (micro-batch 2 took 130 of its 180 s): the project alone again, to score
run peers_qwen35_score 300 experiments/bench_peers.py --model qwen3.5-4b --precisions fp16 --tools project --steps 5 \
    --micro-batches 16 --worker-timeout 240
# The same in bf16 at equal memory (micro-batch 16; at 2 fp16 showed parity and took most of that call)
run peers_qwen35_bf16 400 experiments/bench_peers.py --model qwen3.5-4b --precisions bf16 --tools project,trl --steps 10 \
    --micro-batches 16 --worker-timeout 180
# Not run yet: Qwen3.5-9B (the issue names it) against TRL in fp16 at micro-batch 16, 10 steps.
run peers_qwen35_9b 560 experiments/bench_peers.py --model qwen3.5-9b --precisions fp16 --tools project,trl \
    --steps 10 --rows 256 --micro-batches 16 --score-rows 64 --generate-rows 8 --worker-timeout 240
# Unsloth: with .whl-unsloth/ carried too (beside .whl/ and .whl-peers/: about 37 MiB in all, bench_peers.py, top),
# its packages go into /tmp/site-unsloth with bitsandbytes, peft and qwen-vl-utils from .whl/, apart from /tmp/site:
# Unsloth needs the machine's transformers 5.17 and trl 1.15. The Unsloth worker runs on that folder alone
# (--unsloth-site). `unsloth-check` imports it on the GPU. (Until bitsandbytes' wheel was stripped of its other CUDA
# versions this took two calls, the results below among them. peers_unsloth's first call, --steps 10
# --micro-batches 16,2 --worker-timeout 240, ran past the 600 s of a device call: the results its workers had
# written are in results/peers_unsloth_mb2.json.)
if [[ -d .whl-unsloth && $selected == *unsloth* ]]; then  # only for the runs that use it: about 40 s
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-unsloth \
        .whl-unsloth/*.whl .whl/bitsandbytes-*.whl .whl/peft-*.whl .whl/qwen_vl_utils-*.whl ||
        echo "WARNING: installing .whl-unsloth/ failed; the Unsloth runs will say so"
fi
if [[ " $selected " == *" unsloth-check "* ]]; then
    echo "== unsloth-check: Unsloth from /tmp/site-unsloth"
    PYTHONPATH=/tmp/site-unsloth python3 -c "
import unsloth, transformers, trl
from unsloth import FastVisionModel
print('unsloth', unsloth.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)" ||
        failures+=("unsloth-check")
fi
run peers_unsloth 480 experiments/bench_peers.py --model 8b --precisions fp16 --tools project,unsloth --steps 30 \
    --rows 600 --micro-batches 16 --worker-timeout 300 --unsloth-site /tmp/site-unsloth
# The project's own ways beside its default (bench_peers.py PROJECT_WAYS): what Unsloth's settings would give it.
run peers_ways 520 experiments/bench_peers.py --model 8b --precisions fp16 --tools project --steps 30 --rows 600 \
    --micro-batches 16 --score-rows 128 --worker-timeout 300 --project-ways default,no-dropout,compiled
# The project fed as helpers.fit feeds it (DataLoader workers) beside the benchmark's main-process collation.
run peers_loader 150 experiments/bench_peers.py --model 8b --precisions fp16 --tools project --steps 12 --rows 208 \
    --micro-batches 16 --score-rows 16 --worker-timeout 75 --project-ways default,loader
# Unsloth beside the project's default and DataLoader ways in one run (7-9 minutes each with Unsloth's install).
run peers_unsloth_ways 480 experiments/bench_peers.py --model 8b --precisions fp16 --tools project,unsloth \
    --steps 30 --rows 600 --micro-batches 16 --score-rows 128 --worker-timeout 240 \
    --project-ways default,loader --unsloth-site /tmp/site-unsloth
# The same in bf16.
run peers_unsloth_bf16 480 experiments/bench_peers.py --model 8b --precisions bf16 --tools project,unsloth \
    --steps 30 --rows 600 --micro-batches 16 --score-rows 128 --worker-timeout 240 \
    --project-ways default,loader --unsloth-site /tmp/site-unsloth
# The default model, Qwen3.5-4B; Unsloth vendors DeltaNet kernels for it (in fp16 it trains in fp32 and timed out).
run peers_unsloth_qwen35 480 experiments/bench_peers.py --model qwen3.5-4b --precisions fp16 --tools project,unsloth \
    --steps 20 --rows 336 --micro-batches 16 --score-rows 128 --generate-rows 8 --worker-timeout 240 \
    --project-ways default,loader --unsloth-site /tmp/site-unsloth
# Unsloth on Qwen3.5-4B in bf16 (it did not finish its first step within the 240 s); not run yet: the same with time
# for its first steps (440 s), and fp16 (where it trains in fp32) long enough for 3 timed steps.
run peers_unsloth_qwen35_bf16 480 experiments/bench_peers.py --model qwen3.5-4b --precisions bf16 \
    --tools project,unsloth --steps 20 --rows 336 --micro-batches 16 --score-rows 128 --generate-rows 8 \
    --worker-timeout 240 --project-ways default,loader --unsloth-site /tmp/site-unsloth
run peers_unsloth_qwen35_bf16_long 560 experiments/bench_peers.py --model qwen3.5-4b --precisions bf16 \
    --tools project,unsloth --steps 5 --rows 112 --micro-batches 16 --score-rows 32 --generate-rows 4 --loader \
    --worker-timeout 440 --unsloth-site /tmp/site-unsloth
run peers_unsloth_qwen35_fp32 540 experiments/bench_peers.py --model qwen3.5-4b --precisions fp16 \
    --tools project,unsloth --steps 3 --rows 64 --micro-batches 16 --score-rows 32 --generate-rows 4 \
    --worker-timeout 420 --unsloth-site /tmp/site-unsloth
# Unsloth at equal memory: the project with both checkpointing switches (Unsloth's memory), with reentrant
# checkpointing alone and with neither, each fed as helpers.fit feeds it, 40 steps: 9 minutes. Its "default" way was
# non-reentrant then; reentrant is the default since, so today this runs "reentrant" twice (the non-reentrant way:
# non-reentrant).
run peers_unsloth_equal 560 experiments/bench_peers.py --model 8b --precisions fp16 --tools project,unsloth \
    --steps 40 --rows 656 --micro-batches 16 --score-rows 32 --generate-rows 8 --worker-timeout 240 --loader \
    --project-ways default,reentrant,reentrant-offload --unsloth-site /tmp/site-unsloth
# Not run yet: the same in bf16, with today's default (reentrant).
run peers_unsloth_equal_bf16 560 experiments/bench_peers.py --model 8b --precisions bf16 --tools project,unsloth \
    --steps 40 --rows 656 --micro-batches 16 --score-rows 32 --generate-rows 8 --worker-timeout 240 --loader \
    --project-ways default,non-reentrant,reentrant-offload --unsloth-site /tmp/site-unsloth
# bf16 at equal memory once more, and with Unsloth's settings too (LoRA dropout 0): the project offloaded at 0.95x
# Unsloth in the call above, with dropout 0.05.
run peers_unsloth_settings_bf16 560 experiments/bench_peers.py --model 8b --precisions bf16 --tools project,unsloth \
    --steps 40 --rows 656 --micro-batches 16 --score-rows 32 --generate-rows 8 --worker-timeout 240 --loader \
    --project-ways default,reentrant-offload,offload-no-dropout --unsloth-site /tmp/site-unsloth
# The offloaded way's copies on a second stream, as Unsloth's, beside torch's save_on_cpu, the default and Unsloth,
# bf16, 40 steps: about 9.5 minutes. Made with the prototype (bench_peers.SideStreamOffload, since moved into helpers
# as OffloadedCheckpointing) as `--project-ways default,reentrant-offload,side-stream-offload`: its
# reentrant-offload was then save_on_cpu, what save-on-cpu is now, and side-stream-offload what reentrant-offload is.
run peers_unsloth_offload_bf16 560 experiments/bench_peers.py --model 8b --precisions bf16 --tools project,unsloth \
    --steps 40 --rows 656 --micro-batches 16 --score-rows 32 --generate-rows 8 --worker-timeout 240 --loader \
    --project-ways default,save-on-cpu,reentrant-offload --unsloth-site /tmp/site-unsloth
# The same ways through helpers.OffloadedCheckpointing itself, the project only, in bf16 and fp16 (4 minutes each)
run peers_offload_bf16 300 experiments/bench_peers.py --model 8b --precisions bf16 --tools project \
    --steps 40 --rows 656 --micro-batches 16 --score-rows 32 --worker-timeout 240 --loader \
    --project-ways default,save-on-cpu,reentrant-offload
run peers_offload_fp16 250 experiments/bench_peers.py --model 8b --precisions fp16 --tools project \
    --steps 30 --rows 496 --micro-batches 16 --score-rows 32 --worker-timeout 200 --loader \
    --project-ways default,save-on-cpu,reentrant-offload
# Unsloth's LoRA forward (one addmm, no copy of the base output; bench_peers.fuse_lora_products, a
# prototype) beside peft's, with LoRA dropout 0.05 and 0, fp16, 30 steps (5 minutes): what is left of Unsloth's
# shorter median step
run peers_fused_lora 330 experiments/bench_peers.py --model 8b --precisions fp16 --tools project \
    --steps 30 --rows 496 --micro-batches 16 --score-rows 32 --worker-timeout 200 --loader \
    --project-ways default,fused-lora,no-dropout,fused-lora-no-dropout
# The same in bf16, where peft multiplies in fp32 (no autocast) and the fused forward, since, in bf16; and the rotary
# positions computed on the GPU, as before helpers.rope_positions; profiled: 5 minutes
run peers_fused_lora_bf16 360 experiments/bench_peers.py --model 8b --precisions bf16 --tools project --steps 14 \
    --rows 256 --micro-batches 16 --score-rows 32 --worker-timeout 120 --loader --profile \
    --project-ways default,fused-lora,rope-on-gpu
# helpers.OffloadedCheckpointing beside Unsloth in one call, in bf16 and in fp16 (9.5 minutes each): the default, the
# offloaded way (Unsloth's memory), and that with Unsloth's LoRA settings (dropout 0, one addmm for each product)
run peers_unsloth_helpers_bf16 560 experiments/bench_peers.py --model 8b --precisions bf16 --tools project,unsloth \
    --steps 40 --rows 656 --micro-batches 16 --score-rows 32 --generate-rows 8 --worker-timeout 240 --loader \
    --project-ways default,reentrant-offload,offload-fused-lora-no-dropout --unsloth-site /tmp/site-unsloth
# In fp16 with the norms and rotary embedding compiled too (then a prototype, now helpers.compile_norms): made as
# default,compiled-norms,... when the default ran them eager, as eager-norms does now (its reentrant-offload ran them
# eager too, as it does again since compiling is off by default).
run peers_unsloth_helpers_fp16 580 experiments/bench_peers.py --model 8b --precisions fp16 --tools project,unsloth \
    --steps 40 --rows 656 --micro-batches 16 --score-rows 32 --generate-rows 8 --worker-timeout 240 --loader \
    --project-ways eager-norms,compiled-norms,reentrant-offload,offload-compiled-norms-fused-lora-no-dropout \
    --unsloth-site /tmp/site-unsloth
# Unsloth beside the project with Qwen3-VL's norms compiled (and offloaded: Unsloth's memory), with the norms eager
# for the ratio, in bf16 (where the goal was not met) and fp16: 7-8 minutes each. The committed results ran the
# compiled ways as default and reentrant-offload (Qwen3-VL compiled its norms by default then).
run peers_unsloth_compiled_bf16 560 experiments/bench_peers.py --model 8b --precisions bf16 --tools project,unsloth \
    --steps 40 --rows 656 --micro-batches 16 --score-rows 32 --generate-rows 8 --worker-timeout 240 --loader \
    --project-ways default,compiled-norms,offload-compiled-norms --unsloth-site /tmp/site-unsloth
run peers_unsloth_compiled_fp16 560 experiments/bench_peers.py --model 8b --precisions fp16 --tools project,unsloth \
    --steps 40 --rows 656 --micro-batches 16 --score-rows 32 --generate-rows 8 --worker-timeout 240 --loader \
    --project-ways default,compiled-norms,offload-compiled-norms --unsloth-site /tmp/site-unsloth
# Where Unsloth's step is shorter: one step after 14 timed ones profiled (--profile), Unsloth's and the project's, eager
# and with the norms compiled at Unsloth's LoRA dropout 0: bf16 (where the gap is), then fp16; about 6 minutes each
# (Unsloth's first step compiles for about 55 s: 150 s for its process was too short).
# ("unsloth" in the name installs it, above: the first call, named peers_profile_*, ran without Unsloth; its results
# are results/peers_profile_bf16.json and peers_profile_fp16.json.)
for precision in bf16 fp16; do
    run "peers_unsloth_profile_$precision" 440 experiments/bench_peers.py --model 8b --precisions $precision \
        --tools project,unsloth --steps 14 --rows 256 --micro-batches 16 --score-rows 32 --generate-rows 2 \
        --worker-timeout 220 --loader --profile --project-ways default,compiled-norms-no-dropout \
        --unsloth-site /tmp/site-unsloth
done
# What that profile found, the attention, alone (bench_attention.py): the masked call of left-padded batches against
# the unmasked one of right-padded batches, Qwen3-VL-8B's shapes; a few seconds each, no wheels needed.
run bench_attention 120 experiments/bench_attention.py
run bench_attention_odd 120 experiments/bench_attention.py --mean-length 300 --spread 7 --precisions bf16
# The training step with its batches right-padded and unmasked (helpers.padding_mask_needed, the default since) beside
# the masked call it replaced, the default offloaded (Unsloth's memory) and Unsloth, profiled: bf16, then fp16; about
# 7-9 minutes each (the bf16 call ran out at 440 s: Unsloth compiles under the profiler).
for precision in bf16 fp16; do
    run "peers_unsloth_unmasked_$precision" 540 experiments/bench_peers.py --model 8b --precisions $precision \
        --tools project,unsloth --steps 14 --rows 256 --micro-batches 16 --score-rows 32 --generate-rows 2 \
        --worker-timeout 220 --loader --profile --project-ways default,masked-attention,reentrant-offload \
        --unsloth-site /tmp/site-unsloth
done
# Liger's Triton kernels (liger-kernel 0.8.5, from .whl/) on the language model's norms, rotary embedding and
# SwiGLU (the default since; eager-norms without them, the default before), beside compile_norms: Qwen3-VL-8B in bf16
# and fp16, Qwen3.5-4B (the default model) in fp16; profiled, about 5 minutes each (.whl/ and .whl-peers/ carried).
# The committed results ran as "default,liger,compiled-norms" when the default ran its norms eager.
for precision in bf16 fp16; do
    run "peers_liger_$precision" 360 experiments/bench_peers.py --model 8b --precisions $precision --tools project \
        --steps 14 --rows 256 --micro-batches 16 --score-rows 32 --worker-timeout 120 --loader --profile \
        --project-ways default,eager-norms,compiled-norms
done
run peers_liger_qwen35 360 experiments/bench_peers.py --model qwen3.5-4b --precisions fp16 --tools project \
    --steps 14 --rows 256 --micro-batches 16 --score-rows 32 --worker-timeout 120 --loader --profile \
    --project-ways default,eager-norms,compiled-norms
# Qwen3.5's DeltaNet convolutions on bucketed lengths (the default since) and on each batch's own, profiled, fp16 and
# bf16 (about 4 minutes each); the profile shows whether cuDNN's host time (aten::cudnn_convolution) went
for precision in fp16 bf16; do
    run "peers_qwen35_conv_$precision" 300 experiments/bench_peers.py --model qwen3.5-4b --precisions $precision \
        --tools project --steps 14 --rows 256 --micro-batches 16 --score-rows 32 --worker-timeout 120 --loader \
        --profile --project-ways default,conv-unbucketed
done
# Liger's kernels beside Unsloth in one call, unprofiled: the default (with them), without them (the default before),
# at Unsloth's memory (offloaded) and with its LoRA dropout 0, then Unsloth; 5.5-6 minutes each (all three wheel
# folders carried). peers_unsloth_liger_bf16_first.json ran as "default,liger,liger-no-dropout", the default eager
# then; peers_unsloth_liger_bf16_repeat.json is the bf16 call run a second time.
for precision in bf16 fp16; do
    run "peers_unsloth_liger_$precision" 540 experiments/bench_peers.py --model 8b --precisions $precision \
        --tools project,unsloth --steps 14 --rows 256 --micro-batches 16 --score-rows 16 --generate-rows 1 \
        --worker-timeout 220 --loader --project-ways default,eager-norms,reentrant-offload,offload-no-dropout \
        --unsloth-site /tmp/site-unsloth
done
# A T4's attention on the H200 (SDPA's flash off): the training batches masked, as a T4 ran them, and unmasked with
# the key/value heads repeated (the default there since), beside the default with flash; fp16, profiled, 4-5 minutes.
run peers_t4_kernels 330 experiments/bench_peers.py --model 8b --precisions fp16 --tools project --steps 14 \
    --rows 256 --micro-batches 16 --score-rows 32 --loader --profile \
    --project-ways default,t4-kernels,t4-kernels-masked
# The same, unprofiled, the default and Unsloth only, for the device time a session's end leaves: about 5 minutes.
run peers_unsloth_default_bf16 330 experiments/bench_peers.py --model 8b --precisions bf16 --tools project,unsloth \
    --steps 14 --rows 256 --micro-batches 16 --score-rows 16 --generate-rows 1 --worker-timeout 200 --loader \
    --project-ways default --unsloth-site /tmp/site-unsloth
# The default model's norms compiled and eager, per step (the rehearsal saw no gain in its second fold): 5 minutes.
# The committed results ran the compiled way as "default" (named "project"; compiled was every family's default then).
run peers_qwen35_compiled 290 experiments/bench_peers.py --model qwen3.5-4b --precisions fp16 --tools project \
    --steps 20 --rows 336 --micro-batches 16 --score-rows 32 --worker-timeout 140 \
    --project-ways compiled-norms,eager-norms
# The vision encoder in 16 bits (Config(quantize_vision=False)) beside the default, at micro-batch 16: 2 minutes.
run peers_vision16 200 experiments/bench_peers.py --model 8b --precisions fp16 --tools project --steps 12 --rows 208 \
    --micro-batches 16 --score-rows 16 --worker-timeout 100 --project-ways default,vision16
# Unsloth's checkpointing on the project's step, each part beside the default in one call: offloaded to the CPU
# (its 1.6 GiB less memory) and reentrant (3 minutes); then (not run yet) with compiled layers (its shorter median
# step?), alone and with all of it.
run peers_checkpointing 220 experiments/bench_peers.py --model 8b --precisions fp16 --tools project --steps 12 \
    --rows 208 --micro-batches 16 --score-rows 16 --worker-timeout 75 --project-ways default,offload,reentrant
run peers_compiled 540 experiments/bench_peers.py --model 8b --precisions fp16 --tools project --steps 30 --loader \
    --rows 600 --micro-batches 16 --score-rows 32 --worker-timeout 230 --project-ways default,reentrant-compiled,unsloth-like
# fp16 at equal memory again, 20 timed steps, and the project also without its fp32 islands: what they cost
run peers_qwen35_islands 360 experiments/bench_peers.py --model qwen3.5-4b --precisions fp16 --tools project,trl \
    --project-ways default,no-islands --micro-batches 16 --steps 20 --rows 336 --score-rows 128 --generate-rows 8 \
    --worker-timeout 140

# The tests that need a GPU, skipped in CI (pytest from .whl-test/, experiments/fetch_wheels.sh); on two GPUs the
# offloading and compiled-norms tests also split the model over both
if [[ " $selected " == *" gpu-tests "* ]]; then
    echo "== gpu-tests ($((SECONDS - started)) s elapsed)"
    timeout -k 10 300 python3 -m pytest -q -p no:cacheprovider -rs tests/test_offloaded_checkpointing.py \
        tests/test_compiled_norms.py tests/test_liger_kernels.py tests/test_model.py::test_sdpa_trains_the_unmasked_call_of_every_family_in_16_bits_on_this_gpu \
        tests/test_model.py::test_on_a_t4_s_kernels_the_repeated_heads_train_as_the_masked_call 2>&1 |
        tee "$OUT/gpu-tests.log" | tail -n 8
    [[ ${PIPESTATUS[0]} -eq 0 ]] || failures+=("gpu-tests")
fi

echo "== all done in $((SECONDS - started)) s; failures: ${failures[*]:-none}"
ls -l "$OUT"

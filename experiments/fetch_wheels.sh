#!/usr/bin/env bash
# The wheels the GPU machine lacks (Python 3.12, x86-64 Linux), downloaded here into the git-ignored folders that
# run_gpu.sh installs from on that machine, at the versions the committed results were made with:
#   .whl/          transformers, peft, bitsandbytes (only its CPU and CUDA 13.0/13.2 libraries), qwen-vl-utils, Liger's
#                  kernels (Config.liger_kernels): 22 MiB
#   .whl-peers/    TRL and what it needs beyond the machine's packages (bench_peers.py): 1.8 MiB
#   .whl-unsloth/  Unsloth without its Studio web app, and what it imports (bench_peers.py, top): 14 MiB
#   .whl-test/     pytest, for the tests that need a GPU (run_gpu.sh gpu-tests): 2 MiB
# A device call carries them: carry [".whl", ".whl-peers", ".whl-unsloth"] (64 MiB at most with the tracked files).
#   bash experiments/fetch_wheels.sh            # into the repository
#   bash experiments/fetch_wheels.sh /tmp/w     # elsewhere, e.g. to check the recipe
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
root="${1:-$repo}"

get() {  # get FOLDER PACKAGE==VERSION...: binary wheels for the GPU machine's Python, without their requirements
    local folder="$root/$1"
    shift
    mkdir -p "$folder"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$folder" "$@"
}

get .whl transformers==5.24.0 peft==0.21.2 bitsandbytes==0.50.2 qwen-vl-utils==0.0.14 liger-kernel==0.8.5
# pytest, for the GPU-only tests (run_gpu.sh gpu-tests)
get .whl-test pytest==9.0.3 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 packaging==26.4
# pyarrow stays out: datasets' dill cannot pickle it from a --target folder (experiments/README, "A trap")
get .whl-peers trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# Unsloth requires transformers<=5.17 (the machine's), trl<=1.15 and datasets<5: it runs from a folder of its own
get .whl-unsloth unsloth==2026.10.9 unsloth_zoo==2026.10.9 torchao==0.18.0 cut_cross_entropy==25.1.1 trl==1.15.0 \
    datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.1 \
    pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 msgspec==0.22.0 \
    structlog==26.1.0 json5==0.17.3 nest_asyncio==1.6.0

python3 "$repo/experiments/strip_wheel.py" "$root"/.whl/bitsandbytes-0.50.2-*.whl --keep-only '_(cpu|cuda130|cuda132)\.so'
python3 "$repo/experiments/strip_wheel.py" "$root"/.whl-unsloth/unsloth-2026.10.9-*.whl --drop '^studio/'
du -sh "$root/.whl" "$root/.whl-peers" "$root/.whl-unsloth" "$root/.whl-test"

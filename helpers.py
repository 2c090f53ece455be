"""Fine-tune Qwen vision-language models on multiple-choice VQA, one notebook section at a time.

This module is the engine behind `Kaggle_Qwen_VQA_AllInOne.ipynb`; its sections follow the notebook's order:

    1. Setup          packages on Kaggle/Colab, progress bars, environment report, seeds, finding the data
    2. Config         one dataclass, memory-level presets
    3. Data           loading and validating the competition files
    4. EDA            plots of answers, task types, question lengths, image sizes
    5. Folds          stratified K-fold
    6. Dataset        chat prompts, answer-only labels, batching
    7. Model          4-bit load across GPUs, LoRA, mixture-of-experts weights in 4 bits
    8. Training       AMP, gradient accumulation, checkpoint/resume, OOM back-off
    9. Inference      one forward pass per batch scoring the letters a/b/c/d
   10. Ensemble       majority vote, soft vote, validated submissions

Attach it to a Kaggle notebook as a utility script (any name) or a dataset, or keep it next to the notebook: the
setup cell finds it wherever it is by the words "engine behind `Kaggle_Qwen_VQA_AllInOne.ipynb`" above.
"""

from __future__ import annotations

import codecs
import contextlib
import copy
import dataclasses
import functools
import gc
import glob
import hashlib
import importlib.util
import io
import itertools
import json
import logging
import math
import multiprocessing as mp
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import types
import unicodedata
import urllib.parse
import warnings
import weakref
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

LETTERS = ("a", "b", "c", "d")

# ---------------------------------------------------------------------------------------------------------------------
# 1. Setup
# ---------------------------------------------------------------------------------------------------------------------

# Expandable segments: the CUDA allocator grows one segment in place instead of caching blocks of every size a step
# asked for, which under a T4's 15 GiB leaves memory reserved but unusable. Unsloth sets the same. Torch reads it when
# CUDA first allocates, so it takes effect when helpers is imported before anything touches the GPU (the setup cell;
# the processes that train folds side by side inherit it). A value the user set, under either name, wins.
if not (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")):
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"

# -- Packages on Kaggle and Colab --------------------------------------------------------------------------------------
# Hosted notebooks ship older versions of these than the notebook needs. The setup cell installs them before anything
# imports transformers (this module imports only torch, numpy, pandas, PIL and tqdm at the top). The bounds are
# requirements.txt's: tests/test_setup.py checks that both say the same.
HOSTED_PACKAGES = (
    "transformers>=5.21,<6",
    "peft>=0.21,<0.23",
    "accelerate>=1.10,<2",
    "bitsandbytes>=0.48,<0.51",
    "qwen-vl-utils>=0.0.14,<0.1",
    "liger-kernel>=0.8.5,<0.9",
)
# Those that only make the notebook faster: with Internet off and no wheel of theirs attached (a wheels folder built
# before they were added), it runs without them rather than stopping.
OPTIONAL_PACKAGES = ("liger-kernel",)


def on_hosted_notebook() -> bool:
    return os.path.exists("/kaggle") or "google.colab" in sys.modules


def outdated_packages(requirements: tuple[str, ...] = HOSTED_PACKAGES) -> list[str]:
    """The requirements that the installed versions do not meet, missing packages included."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    outdated = []
    for line in requirements:
        requirement = Requirement(line)
        try:
            met = requirement.specifier.contains(version(requirement.name), prereleases=True)
        except PackageNotFoundError:
            met = False
        if not met:
            outdated.append(line)
    return outdated


def index_reachable(timeout: float = 3.0) -> bool:
    """Whether pip's package index answers: not on Kaggle with Internet off."""
    url = urllib.parse.urlsplit(os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def find_wheels_dir(roots: tuple[str, ...] = ("/kaggle/input", "/content")) -> Path | None:
    """An attached folder of wheels that holds transformers (kaggle/build_wheels.sh makes one), or None.
    Searched a few levels deep only: a competition's inputs may hold many thousand images."""
    for root in roots:
        for depth in range(1, 5):
            hits = sorted(glob.glob(f"{root}/{'*/' * depth}transformers-*.whl"))
            if hits:
                return Path(hits[0]).parent
    return None


def install_packages(
    requirements: tuple[str, ...] = HOSTED_PACKAGES, wheel_roots: tuple[str, ...] = ("/kaggle/input", "/content")
) -> str:
    """Install the requirements the installed versions do not meet: from the package index when it answers, else
    from an attached wheels folder (pip --no-index --find-links), for Kaggle with Internet off. Says what it did."""
    outdated = outdated_packages(requirements)
    if not outdated:
        return "packages: " + ", ".join(requirements) + " already met"
    left_out = ""
    if index_reachable():
        source, where = [], "the package index"
    else:
        wheels = find_wheels_dir(wheel_roots)
        missing = [
            line
            for line in outdated
            if requirement_name(line) in OPTIONAL_PACKAGES and (wheels is None or not has_wheel(wheels, line))
        ]
        if missing:
            outdated = [line for line in outdated if line not in missing]
            left_out = f"; without {', '.join(missing)} (no internet, no wheel attached): it only speeds things up"
        if not outdated:
            return "packages: nothing to install" + left_out
        if wheels is None:
            raise RuntimeError(
                f"no internet, and these need installing: {', '.join(outdated)}. Turn Internet on (Settings), or "
                "attach the wheels dataset that kaggle/build_wheels.sh builds (README, Kaggle quick start)."
            )
        source, where = ["--no-index", "--find-links", str(wheels)], f"{wheels} (no internet)"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *source, *outdated], check=True)
    importlib.invalidate_caches()  # so that this process finds the packages just installed
    return f"installed {', '.join(outdated)} from {where}" + left_out


def requirement_name(line: str) -> str:
    """The canonical name of the package a requirement line names ("liger-kernel>=0.8.5" -> "liger-kernel")."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    return canonicalize_name(Requirement(line).name)


def has_wheel(folder: Path, requirement: str) -> bool:
    """Whether `folder` holds a wheel of the package that `requirement` names."""
    from packaging.utils import parse_wheel_filename

    name = requirement_name(requirement)
    return any(parse_wheel_filename(p.name)[0] == name for p in folder.glob("*.whl"))


# -- Progress that reads well saved ------------------------------------------------------------------------------------
# A notebook saves every redraw of a progress bar: a headless run (papermill, Kaggle's "Save Version") kept 2,600
# output chunks of bars in the smoke run. So bars redraw live only where someone watches them (a terminal, an
# interactive Kaggle or Colab session); elsewhere a bar writes a plain line now and then, and short ones none at all.


def live_progress() -> bool:
    """Whether progress bars may redraw in place: a terminal, or an interactive Kaggle or Colab session."""
    run_type = os.environ.get("KAGGLE_KERNEL_RUN_TYPE")  # "Interactive" or "Batch" (a saved version)
    if run_type:
        return run_type == "Interactive"
    return sys.stderr.isatty() or "google.colab" in sys.modules


# The Hugging Face libraries' own bars (downloads, loading, saving) are off unless watched. Set at import, as
# huggingface_hub reads it when it is imported (after this module).
if not live_progress():
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class _Lines:
    """A file for tqdm that writes each redraw as a line of its own and drops the blank ones that erase a bar:
    in a saved notebook a carriage return does not overwrite the output before it."""

    def __init__(self, file):
        self.file = file

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.file.write(text + "\n")

    def flush(self) -> None:
        self.file.flush()


class _LogBar(tqdm):
    """A bar for a log: set_postfix waits for the next line rather than writing one at every step."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


def progress_bar(iterable=None, total: int | None = None, **kwargs):
    """tqdm live where it is watched; otherwise a line at most every 20th of the way and 30 s apart, none for a bar
    that ends within 30 s."""
    if live_progress():
        from tqdm.auto import tqdm as live_tqdm  # here, not at the top: in a kernel without widgets it warns

        return live_tqdm(iterable, total=total, **kwargs)
    total = total if total is not None else len(iterable) if hasattr(iterable, "__len__") else None
    every = dict(mininterval=30, delay=30, miniters=max(1, (total or 0) // 20), dynamic_ncols=False, position=0)
    every["maxinterval"] = math.inf  # else tqdm's monitor thread sets miniters to 1 after 10 s without a line
    return _LogBar(iterable, total=total, file=_Lines(sys.stdout), **{**kwargs, **every})


def compact_inline_figures(colors: int = 16, dpi: int = 64) -> None:
    """Show matplotlib figures in the notebook as PNGs of `colors` colours at `dpi` (Jupyter's classic is 72; the files
    under outputs/ keep 100): a chart has few colours, so it looks the same in a fraction of the bytes (the four EDA
    plots: 88 KB of the saved smoke notebook at 100 dpi in full colour, 28 KB in 64 colours, 15 KB at 72 dpi in 32),
    and the saved smoke notebook stays under 100 KB with the training, error and agreement plots. Outside IPython:
    nothing."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    import matplotlib.pyplot as plt

    plt.switch_backend(plt.get_backend())  # load the inline backend now: loading registers its own PNG printer

    def png(figure) -> bytes:
        full, small = io.BytesIO(), io.BytesIO()
        figure.savefig(full, format="png", bbox_inches="tight", dpi=dpi)
        Image.open(full).convert("RGB").quantize(colors).save(small, format="png", optimize=True)
        return small.getvalue()

    shell.display_formatter.formatters["image/png"].for_type(plt.Figure, png)


# -- Warnings that tell a user nothing ---------------------------------------------------------------------------------
# peft reads the deprecated property when it wraps a model (PeftModel.__init__); nothing in this notebook uses it.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
# huggingface_hub imports tqdm.auto, which warns in a kernel without ipywidgets (papermill) and falls back to the plain
# bars that are switched off there anyway.
warnings.filterwarnings("ignore", message="IProgress not found")
# Reentrant checkpointing (Config.reentrant_checkpointing, the default) warns on the vision encoder's blocks, which
# have no trainable weights and so need no gradient.
warnings.filterwarnings("ignore", message="None of the inputs have requires_grad=True. Gradients will be None")
# bitsandbytes (0.50) looks for an optional CPU kernel package (`kernels`) when it is imported on a CPU with AVX-512
# BF16, and logs a warning to install it when it is missing: this notebook computes on the GPU, or on the CPU without
# 4-bit weights.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# The GradScaler skips the optimizer step whose fp16 gradients overflowed, and the schedule steps anyway, by design:
# skipped steps are counted in result.json.
warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")


def environment_report() -> pd.DataFrame:
    """Library versions and every visible GPU (name, memory, bf16), as a table for the notebook."""
    import importlib.metadata as md

    rows = [{"item": "python", "value": sys.version.split()[0]}]
    for package in ("torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            rows.append({"item": package, "value": md.version(package)})
        except md.PackageNotFoundError:
            rows.append({"item": package, "value": "not installed"})
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            bf16 = props.major >= 8  # Ampere and newer; a T4 (sm_75) has no bf16
            value = f"{props.name}, {props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor}, bf16={bf16}"
            rows.append({"item": f"cuda:{i}", "value": value})
    else:
        rows.append({"item": "gpu", "value": "none (CPU only)"})
    return pd.DataFrame(rows)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so that a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def find_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The folder holding train.csv: the explicit one, else Kaggle's inputs, else Colab's /content, else ./data."""
    if explicit:
        path = Path(explicit)
        if not (path / "train.csv").exists():
            raise ValueError(f"DATA_DIR {path} holds no train.csv")
        return path
    for pattern in ("/kaggle/input/*/train.csv", "/kaggle/input/*/*/train.csv", "/content/*/train.csv"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return Path(hits[0]).parent
    for path in (Path("/content"), Path("data"), Path(__file__).resolve().parent / "data"):
        if (path / "train.csv").exists():
            return path
    raise ValueError("no train.csv found in /kaggle/input, /content or ./data: set DATA_DIR in the Config cell")


def _alphanumeric(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def kaggle_model_name(folder: Path) -> str | None:
    """The model and variation of a Kaggle Models folder .../<model>/transformers/<variation>/<version>, joined, in
    letters and digits only (Kaggle may write "qwen-3" where the Hub writes "Qwen3"); None for any other folder."""
    parts = folder.parts
    if len(parts) < 4 or parts[-3] != "transformers":
        return None
    return _alphanumeric(parts[-4] + parts[-2])


def find_local_model(model_id: str, roots: tuple[str, ...] = ("/kaggle/input",)) -> str:
    """The folder `model_id` names, from the working directory or helpers.py's folder (the repository: the smoke
    model); else an attached copy (a folder with config.json named like it); else the id itself, for the Hub.

    Kaggle mounts models under /kaggle/input/<model>/transformers/<variation>/<version> or
    /kaggle/input/models/<owner>/<model>/transformers/<variation>/<version>, where Qwen/Qwen2.5-VL-7B-Instruct is
    model "qwen2.5-vl", variation "7b-instruct": a folder matches when "<model>-<variation>" spells the model's name,
    or when its path holds the name (a dataset named after the model). Matching on the name keeps the Config cell the
    same everywhere.
    """
    if Path(model_id).exists():
        return model_id
    beside_helpers = Path(__file__).resolve().parent / model_id
    if beside_helpers.exists():
        return str(beside_helpers)
    name = model_id.split("/")[-1].lower()
    kaggle_name = _alphanumeric(name)
    for root in roots:
        for config in sorted(glob.glob(f"{root}/**/config.json", recursive=True)):
            if name in config.lower() or kaggle_model_name(Path(config).parent) == kaggle_name:
                return str(Path(config).parent)
    if model_id == SMOKE_MODEL:  # not a Hub id: without this, from_pretrained would look for it on the Hub
        raise FileNotFoundError(
            f"the smoke profile's tiny model {SMOKE_MODEL} is neither in the working directory ({Path.cwd()}) nor "
            f"beside helpers.py ({beside_helpers.parent}), nor attached under {', '.join(roots)}. It comes with the "
            f"repository; to make it again: python data/make_tiny_model.py --arch qwen3_vl --seed 42 --out "
            f"{SMOKE_MODEL} (in the repository), or set model_id to the folder where it is."
        )
    return model_id


# ---------------------------------------------------------------------------------------------------------------------
# 2. Config
# ---------------------------------------------------------------------------------------------------------------------

# Memory levels for Kaggle's T4 x2 (15 GiB each). They govern activations: higher levels see more image detail
# (more vision tokens), train a larger adapter and score more rotations, and need more memory and time. If a run dies
# with out-of-memory, step one level down. Where the weights go does not depend on the level: plan_device_map puts
# them on as few GPUs as hold them with ACTIVATION_RESERVE_GIB to spare on each.
# `tta_rotations` multiplies inference time (each fold scores the test set once per rotation, and its validation rows
# once per rotation after the first, which its validation pass scored): `safe` already spends a Kaggle session on
# training, so it scores once; raise it if time is left.
MEMORY_LEVELS = {
    "safe": dict(image_size=384, lora_r=8, batch_size=1, grad_accum=16, tta_rotations=1),
    "balanced": dict(image_size=448, lora_r=12, batch_size=1, grad_accum=12, tta_rotations=2),
    "high": dict(image_size=512, lora_r=16, batch_size=2, grad_accum=8, tta_rotations=4),
}
NEXT_LOWER_LEVEL = {"high": "balanced", "balanced": "safe"}

# A Kaggle GPU session ends after 12 hours, 9 on some accounts; the setup cell's installs and a margin come off that.
KAGGLE_BUDGET_HOURS = 8.5

# Compute precisions. A T4 has no bf16: "auto" gives fp16 there, trained with a GradScaler.
PRECISIONS = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# What the memory levels share. The model: Qwen3.5-4B scores above Qwen3-VL-30B-A3B on its model card (MMBench 89.4,
# MMMU 77.6), fits one T4 at every level (peak 8.8 GiB at `high` in fp16) and, 4 folds x 2 epochs at `safe` two folds
# at a time, trains 4000 rows and scores 1000 in about 5.2 h on T4 x2 (estimated from an H200: experiments/README.md,
# "Which model fits which GPU"). 4 folds, not 5: two GPUs train folds in pairs, and a fifth fold costs a third round,
# as much time as a sixth.
GPU_DEFAULTS = {
    "model_id": "Qwen/Qwen3.5-4B",
    "n_folds": 4,
    "epochs": 2,
    "lr": 1e-4,
    "lora_targets": ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj"),  # why: section 7
    "eval_batch_size": 32,  # the fastest of 16/32 for Qwen3-VL-2B and -8B (experiments/results/infer.json)
    "num_workers": 2,
    "save_every_steps": 50,
    "debias_samples": 32,  # 4 x 32 extra rows scored per fold: negligible next to the test set
    "early_stopping_patience": 2,  # only ever stops a fold whose accuracy fell twice: no harm at 2 epochs
}

# The smoke profile: a tiny random Qwen3-VL, trained on CPU on the sample data in a few minutes. Its checkpoint folder
# is committed beside the sample data (data/make_tiny_model.py made it) and loads like any downloaded model.
# A random model needs more epochs, a higher learning rate and LoRA on the MLPs too to learn anything.
SMOKE_MODEL = "data/tiny-qwen3-vl"  # relative to the working directory or to helpers.py's folder
SMOKE_PROFILE = {
    "image_size": 64,
    "lora_r": 16,
    "batch_size": 8,
    "grad_accum": 1,
    "model_id": SMOKE_MODEL,
    "n_folds": 2,
    "epochs": 20,
    "lr": 2e-3,
    "lora_targets": GPU_DEFAULTS["lora_targets"] + ("gate_proj", "up_proj", "down_proj"),
    "eval_batch_size": 32,
    "num_workers": 0,
    "save_every_steps": 20,
    "early_stopping_patience": 0,  # a random tiny model's accuracy wanders before it climbs
    "tta_rotations": 4,
    "debias_samples": 32,
}


@dataclass
class Config:
    """Everything a run depends on. Fields left as None are filled from the profile's preset."""

    profile: str = "safe"  # "safe" | "balanced" | "high" (MEMORY_LEVELS) or "smoke" (tiny model, CPU)
    model_id: str | None = None  # Hub id or local folder (Kaggle Models, the smoke profile's data/tiny-qwen3-vl)
    data_dir: str | None = None  # None: search Kaggle inputs, Colab, ./data
    output_dir: str = "outputs"
    move_stale_run_aside: bool = False  # output_dir holds folds or adapters made from another config or data: False
    # stops the run and lists what changed; True renames the folder <output_dir>-<time> (nothing deleted), starts afresh
    zero_shot: bool = False  # skip training and predict with the base model
    adapters_from: str | None = None  # an earlier run's output_dir, e.g. "/kaggle/input/my-run/outputs" (attached
    # read-only; the folder holding folds.csv or one above it): train nothing, predict with its fold adapters
    zero_shot_baseline: bool = True  # score the base model on (a sample of) the train rows before training

    # Memory level (from MEMORY_LEVELS unless set here)
    image_size: int | None = None  # images get at most image_size ** 2 pixels, each shape (PixelBudget); vision
    # tokens grow with it
    lora_r: int | None = None  # adapter rank: capacity vs. memory and time
    batch_size: int | None = None  # micro-batch per forward pass; halves itself on out-of-memory
    auto_micro_batch: bool = True  # start at the whole effective batch and halve on out-of-memory: the largest
    # micro-batch that fits is found in the first steps (a QLoRA step at micro-batch 1 leaves a GPU mostly idle)
    grad_accum: int | None = None  # micro-batches per optimizer step (effective batch = batch_size * grad_accum)
    precision: str = "auto"  # "auto": bf16 where the GPU has it, fp16 on a T4, fp32 on CPU; or "bf16" | "fp16" | "fp32"
    gpu_memory_cap_gib: float | None = None  # use at most this much of each GPU (e.g. 14.5 to rehearse a T4 on a
    # larger GPU); None: the whole GPU
    fp32_islands: bool = True  # in fp16, the layers that overflow there (Qwen3.5's DeltaNet) compute in fp32; False
    # only to measure what they cost (experiments/bench_qwen35_fp16.py)
    quantize_vision: bool = True  # the vision encoder in 4 bits too; False keeps it in 16 bits, as Unsloth does
    # (4-bit vision broke Qwen2-VL-2B in Unsloth's tests): 0.5-0.8 GiB more weights (experiments/README, plan)
    offload_activations: bool = False  # keep each checkpointed layer's input in CPU memory until the backward, as
    # Unsloth does: 1.7 GiB less for Qwen3-VL-8B at micro-batch 16 at 0.96-0.99x the speed; with Liger's kernels, less
    # than Unsloth's memory at 1.05-1.26x its samples/s in three calls (experiments/README, Liger beside Unsloth)
    reentrant_checkpointing: bool = True  # torch's reentrant checkpointing, as Unsloth runs it: the same gradients,
    # 1.06-1.11x the training speed of the non-reentrant variant (False) on Qwen3-VL-8B and Qwen3.5-4B, whole runs too
    compile_norms: bool = False  # True, on a GPU: fuse each RMSNorm and rotary embedding of the language model into
    # one kernel (torch.compile): a step 1.06-1.18x shorter on Qwen3-VL-8B, but compiling takes 10-15 s a process: the
    # whole notebook took longer at 120 steps a GPU (240 s against 226) and broke even at 300 (395 s against 399)
    liger_kernels: bool = True  # on a GPU: Liger's Triton kernels (liger-kernel) for the language model's RMSNorms,
    # rotary embedding and SwiGLU: the whole notebook 1.10x on Qwen3-VL-8B (0.5 GiB less), 1.01x on Qwen3.5-4B, the
    # same losses; eager where they cannot serve (helpers.why_no_liger_kernels: a CPU, a model spread over GPUs, a
    # GPU where they fail their check against transformers' modules at load)

    # Folds
    n_folds: int | None = None  # more folds: more training data per fold and ensemble members, more time
    train_folds: tuple[int, ...] | None = None  # None: all folds; e.g. (0, 1) to fit a session's time
    seed: int = 42

    # Optimisation
    epochs: int | None = None
    lr: float | None = None
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    early_stopping_patience: int | None = None  # stop a fold after this many epochs without a better validation
    # accuracy (the best adapter is kept either way); 0: train every epoch
    report_to: str | None = None  # "tensorboard" or "wandb" (if installed) also logs each fold's curves; None: off
    time_budget_hours: float | None = None  # the session time this run may take, from the setup cell: training stops
    # in time to score and submit. None: 8.5 on Kaggle (sessions end after 9-12 h), unlimited elsewhere
    lora_alpha: int | None = None  # None: 2 * lora_r
    lora_dropout: float = 0.05  # 0 (Unsloth's default) steps about 1.07x faster, without this regularisation
    lora_targets: tuple[str, ...] | None = None  # projections of the language model that get adapters
    shuffle_options: bool = False  # permute the options of each training sample and remap its answer

    # Runtime
    parallel_folds: bool | None = None  # train one fold per GPU at a time, each GPU with its own copy of the model
    # (train_folds_on_gpus); None: when there are 2+ GPUs and the model fits one (every dense model up to 9B in 4 bits)
    gpu: int | None = None  # the one GPU to load the whole model on (set per process by train_folds_on_gpus);
    # None: device_map="auto" over every GPU
    eval_batch_size: int | None = None  # inference batch; halves itself on out-of-memory, for the passes after too
    num_workers: int | None = None  # DataLoader workers running the processor in parallel with the GPU
    save_every_steps: int | None = None  # optimizer steps between resumable checkpoints
    max_bad_steps: int = 8  # consecutive non-finite losses before a fold is stopped

    # Inference (section 9)
    tta_rotations: int | None = None  # 1 (off), 2 or 4 cyclic rotations of the options, averaged; cost x rotations
    debias_samples: int | None = None  # test rows used to estimate the model's letter prior (PriDe); 0 = off
    select_variant: bool = True  # submit the variant (plain, TTA, debiased) with the best out-of-fold accuracy;
    # False: always the fullest one scored. TTA only helps a model that reads the options, not one that learned their
    # positions (the smoke model), and debiasing helps only where the model has a letter prior.

    def __post_init__(self):
        preset = SMOKE_PROFILE if self.profile == "smoke" else {**GPU_DEFAULTS, **MEMORY_LEVELS.get(self.profile, {})}
        for name, value in preset.items():
            if getattr(self, name) is None:  # an explicit value always wins over the profile's
                setattr(self, name, value)
        if self.lora_alpha is None and self.lora_r is not None:
            self.lora_alpha = 2 * self.lora_r
        if self.time_budget_hours is None:
            self.time_budget_hours = KAGGLE_BUDGET_HOURS if Path("/kaggle/working").is_dir() else math.inf
        self.validate()

    def validate(self) -> None:
        """Collect every problem and raise one error, so a user fixes the Config cell in one go."""
        if self.profile not in (*MEMORY_LEVELS, "smoke"):
            raise ValueError(f"invalid Config: profile {self.profile!r} is not one of {[*MEMORY_LEVELS, 'smoke']}")
        problems = []
        if not self.model_id:
            problems.append("model_id is empty")
        if self.n_folds < 2:
            problems.append(f"n_folds must be at least 2, got {self.n_folds}")
        if self.train_folds is not None and not set(self.train_folds) <= set(range(self.n_folds)):
            problems.append(f"train_folds {self.train_folds} must be within 0..{self.n_folds - 1}")
        for name in ("image_size", "lora_r", "batch_size", "grad_accum", "epochs", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be positive, got {value}")
        if self.image_size is not None and self.image_size < 32:
            problems.append(f"image_size must be at least 32 pixels, got {self.image_size}")
        if not 0 < self.lr < 1:
            problems.append(f"lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.tta_rotations not in (1, 2, 4):  # evenly spaced shifts only: each option visits positions equally
            problems.append(f"tta_rotations must be 1, 2 or 4, got {self.tta_rotations}")
        if self.report_to not in (None, "tensorboard", "wandb"):
            problems.append(f"report_to must be None, 'tensorboard' or 'wandb', got {self.report_to!r}")
        if self.gpu_memory_cap_gib is not None and not self.gpu_memory_cap_gib > 0:
            problems.append(
                f"gpu_memory_cap_gib must be positive (or None: the whole GPU), got {self.gpu_memory_cap_gib}"
            )
        if not self.time_budget_hours > 0:
            problems.append(f"time_budget_hours must be positive, got {self.time_budget_hours}")
        if self.early_stopping_patience < 0:
            problems.append(f"early_stopping_patience must be 0 (off) or positive, got {self.early_stopping_patience}")
        if self.debias_samples < 0:
            problems.append(f"debias_samples must be 0 (off) or positive, got {self.debias_samples}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.compile_norms and self.liger_kernels:
            problems.append("compile_norms and liger_kernels fuse the same norms: set liger_kernels=False to compile")
        if self.adapters_from and self.zero_shot:
            problems.append("adapters_from (predict with an earlier run's adapters) and zero_shot exclude each other")
        if problems:
            raise ValueError("invalid Config:\n  - " + "\n  - ".join(problems))

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum

    @property
    def folds_to_train(self) -> list[int]:
        return list(self.train_folds) if self.train_folds is not None else list(range(self.n_folds))

    @property
    def out(self) -> Path:
        return Path(self.output_dir)

    def fold_dir(self, fold: int) -> Path:
        return self.out / f"fold{fold}"

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(Path(path), json.dumps(dataclasses.asdict(self), indent=2))

    def summary(self) -> str:
        """What the run will do, in a few lines (every field is in config.json)."""
        folds = "all" if self.train_folds is None else ", ".join(map(str, self.train_folds))
        debias = f"letter prior from {self.debias_samples} test rows" if self.debias_samples else "no debiasing"
        return "\n".join(
            [
                f"profile   {self.profile}: {self.model_id}, images up to {self.image_size}^2 pixels",
                f"LoRA      r {self.lora_r}, alpha {self.lora_alpha} on {', '.join(self.lora_targets)}",
                f"training  {self.n_folds} folds (training {folds}), {self.epochs} epochs, lr {self.lr:g}, "
                f"effective batch {self.effective_batch}"
                + (" (zero-shot: no training)" if self.zero_shot else "")
                + (f" (no training: the adapters of {self.adapters_from})" if self.adapters_from else ""),
                f"inference {f'TTA x{self.tta_rotations}' if self.tta_rotations > 1 else 'no TTA'}, {debias}, "
                + ("best variant out of fold" if self.select_variant else "fullest variant"),
                f"data      {self.data_dir or 'found by itself'}; outputs in {self.output_dir}",
            ]
        )


def resolve_profile(profile: str | None) -> str:
    """'auto' (or None) picks the smoke profile without a GPU and the safe memory level with one."""
    if profile in (None, "", "auto"):
        return "safe" if torch.cuda.is_available() else "smoke"
    return profile


# ---------------------------------------------------------------------------------------------------------------------
# 3. Data
# ---------------------------------------------------------------------------------------------------------------------

TEST_COLUMNS = ("id", "path", "question", *LETTERS)
TRAIN_COLUMNS = (*TEST_COLUMNS, "answer")


def _preview(items, limit: int = 5) -> str:
    """'[x, y, z] (12 in all)': enough to find the culprits without flooding the notebook."""
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:limit])
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return f"[{shown}{more}]"


def read_table(
    path: Path, required: tuple[str, ...], may_be_blank: tuple[str, ...] = ()
) -> tuple[pd.DataFrame | None, list[str]]:
    """Read a competition CSV as text (ids stay strings) and list its problems; None when it cannot be used at all."""
    if not path.exists():
        return None, [f"{path}: file not found"]
    raw = path.read_bytes()
    try:
        text = raw.decode(csv_encoding(raw))
    except UnicodeDecodeError as err:
        return None, [
            f"{path}: not UTF-8 or UTF-16 (byte {err.start} is {raw[err.start : err.start + 1]!r}); likely "
            f"{likely_encoding(raw)}: save it as UTF-8 (Excel: 'CSV UTF-8')"
        ]
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        return None, [f"{path}: empty file"]
    except pd.errors.ParserError as err:
        return None, [f"{path}: not a readable CSV: {err}"]
    header = {c.strip().lower(): c.strip() for c in df.columns}  # as the file spells it (write_submission's header)
    df.columns = list(header)
    df.attrs["header"] = header
    missing = [c for c in required if c not in df.columns]
    if missing:
        return None, [f"{path}: missing columns {missing} (found {list(df.columns)})"]
    if df.empty:
        return None, [f"{path}: no rows, only a header"]
    problems = []
    for column in required:
        df[column] = df[column].str.strip()
        if column in may_be_blank:
            continue
        if column == "id":  # no id to name the row by: its line in the file (the header is line 1)
            lines = (df.index[df["id"] == ""] + 2).tolist()
            if lines:
                problems.append(f"{path}: empty 'id' on lines {_preview(lines)}")
            continue
        empty = df.loc[df[column] == "", "id"].tolist()
        if empty:
            problems.append(f"{path}: empty {column!r} in rows with id {_preview(empty)}")
    duplicated = df.loc[df["id"].duplicated(keep=False), "id"].unique().tolist()
    if duplicated:
        problems.append(f"{path}: duplicate ids {_preview(duplicated)}")
    return df, problems


def csv_encoding(raw: bytes) -> str:
    """UTF-16 when the file starts with its byte-order mark, or with a zero byte next to the header's first (ASCII)
    letter, as UTF-16 without a mark does; UTF-8 otherwise, with or without its byte-order mark."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    if raw[1:2] == b"\x00":
        return "utf-16-le"
    if raw[:1] == b"\x00":
        return "utf-16-be"
    return "utf-8-sig"


def likely_encoding(raw: bytes) -> str:
    """A guess, for the error message, at the encoding of a CSV that is neither UTF-8 nor UTF-16."""
    with contextlib.suppress(UnicodeDecodeError):
        if re.search("[\uac00-\ud7a3]", raw.decode("cp949")):  # decodes to Hangul syllables
            return "cp949 / EUC-KR (Korean Excel)"
    return "a Windows code page such as cp1252 (Excel)"


def find_image(data_dir: Path, split: str, raw: str) -> Path | None:
    """An image path relative to the data dir, to its split folder (train/, test/), or absolute; None if absent."""
    candidates = [data_dir / raw, data_dir / split / raw, data_dir / split / Path(raw).name, Path(raw)]
    return next((c.resolve() for c in candidates if c.is_file()), None)


def image_errors(paths: list[str], image_size: int, desc: str) -> list[str]:
    """Why each image cannot be loaded ('' when it can), decoding every one with load_image as training will.

    On threads: PIL releases the GIL while it decodes, so each CPU core decodes an image at a time.
    """
    budget = data_check_budget(image_size)

    def error(path: str) -> str:
        try:
            load_image(path, budget)
            return ""
        except Exception as err:  # any failure here is the row's problem to report, whatever PIL raised
            return f"{type(err).__name__}: {err}"

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        return list(progress_bar(pool.map(error, paths), total=len(paths), desc=desc, unit="image"))


def resolve_image_paths(
    df: pd.DataFrame, data_dir: Path, split: str, csv: Path, image_size: int
) -> tuple[pd.Series, list[str]]:
    """Absolute image paths, each image decoded once here: a missing, truncated, corrupt or oversized image is an
    error now, never a crash hours into training or inference, and never replaced by a blank one."""
    found = [find_image(data_dir, split, raw) for raw in df["path"]]
    missing = [f"{i}: {raw}" for i, raw, path in zip(df["id"], df["path"], found, strict=True) if path is None]
    rows = [(i, raw, str(path)) for i, raw, path in zip(df["id"], df["path"], found, strict=True) if path]
    errors = image_errors([path for _, _, path in rows], image_size, desc=f"{split} images")
    broken = [f"{i}: {raw}: {error}" for (i, raw, _), error in zip(rows, errors, strict=True) if error]
    problems = []
    if missing:
        problems.append(f"{csv}: images not found (id: path) {_preview(missing)}")
    if broken:
        problems.append(f"{csv}: images unreadable (id: path: reason) {_preview(broken)}")
    return pd.Series([str(p or "") for p in found], index=df.index), problems


def load_competition_data(
    data_dir: str | os.PathLike, image_size: int = 512
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(train, test, sample_submission), validated up front; one ValueError lists every problem found.

    Every image is decoded at `image_size` (the Config's) through load_image, as training and inference read it
    (data_check_budget).
    """
    data_dir = Path(data_dir)
    train, problems = read_table(data_dir / "train.csv", TRAIN_COLUMNS)
    test, test_problems = read_table(data_dir / "test.csv", TEST_COLUMNS)
    # Competitions often ship sample_submission.csv with the answer column blank: it only has to exist.
    sample, sample_problems = read_table(data_dir / "sample_submission.csv", ("id", "answer"), may_be_blank=("answer",))
    problems += test_problems + sample_problems

    if train is not None:
        train["answer"] = train["answer"].str.replace(r"\s+", "", regex=True)
        if sample is not None:  # the submission answers in the case of the labels it is graded against
            sample.attrs["uppercase_answers"] = bool(train["answer"].isin([x.upper() for x in LETTERS]).all())
        train["answer"] = train["answer"].str.lower()
        bad = train.loc[~train["answer"].isin(LETTERS)]
        if len(bad):
            culprits = [f"{i}: {a!r}" for i, a in zip(bad["id"], bad["answer"], strict=True)]
            problems.append(f"{data_dir / 'train.csv'}: answers not in a-d (id: answer) {_preview(culprits)}")
    for df, split in ((train, "train"), (test, "test")):
        if df is not None:
            csv = data_dir / f"{split}.csv"
            df["image_path"], image_problems = resolve_image_paths(df, data_dir, split, csv, image_size)
            problems += image_problems
    if test is not None and sample is not None:
        only_test = sorted(set(test["id"]) - set(sample["id"]))
        only_sample = sorted(set(sample["id"]) - set(test["id"]))
        if only_test or only_sample:
            problems.append(
                f"{data_dir / 'sample_submission.csv'}: ids differ from test.csv: "
                f"missing {_preview(only_test)}, unknown {_preview(only_sample)}"
            )
    if train is not None and test is not None:
        overlap = sorted(set(train["id"]) & set(test["id"]))
        if overlap:
            problems.append(f"{data_dir}: ids in both train.csv and test.csv {_preview(overlap)}")
    if problems:
        raise ValueError("invalid competition data:\n  - " + "\n  - ".join(problems))
    return train.reset_index(drop=True), test.reset_index(drop=True), sample.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------------------------
# 4. EDA
# ---------------------------------------------------------------------------------------------------------------------


def plot_eda(train: pd.DataFrame, test: pd.DataFrame, out_dir: str | os.PathLike) -> dict:
    """Answer balance, task types, question lengths and image sizes; each figure saved as a PNG in out_dir."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    both = pd.concat([train.assign(split="train"), test.assign(split="test")], ignore_index=True)
    both["question_chars"] = both["question"].str.len()
    sizes = [Image.open(p).size for p in both["image_path"]]  # reads headers only
    both["width"], both["height"] = [s[0] for s in sizes], [s[1] for s in sizes]

    figures = {}

    def new(name, title):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.set_title(title)
        figures[name] = fig
        return ax

    sns.countplot(data=train, x="answer", order=list(LETTERS), ax=new("answers", "Answer letters (train)"))
    if "task_type" in train.columns:
        ax = new("task_types", "Task types")
        sns.countplot(data=both, y="task_type", hue="split", ax=ax)
    ax = new("question_length", "Question length (characters)")
    sns.histplot(data=both, x="question_chars", hue="split", bins=30, ax=ax)
    ax = new("image_sizes", "Image sizes (pixels)")
    sns.scatterplot(data=both, x="width", y="height", hue="split", alpha=0.5, ax=ax)
    for name, fig in figures.items():
        save_figure(fig, out_dir / f"{name}.png")
    return figures


def save_figure(fig, path: Path):
    """Lay out and save as a PNG (the notebook shows the figure inline too); returns the figure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return fig


# ---------------------------------------------------------------------------------------------------------------------
# 5. Stratified K-fold
# ---------------------------------------------------------------------------------------------------------------------


def fold_strata(train: pd.DataFrame, n_folds: int) -> pd.Series:
    """The label each row is stratified on: task_type|answer (answer alone without task_type), rare ones merged.

    A stratum with fewer rows than folds cannot be split. Its rows first join their answer letter's stratum (which
    keeps the answers balanced); what is still too small joins the largest stratum, where it disturbs the balance
    least. Stratification is never dropped.
    """
    strata = train["answer"].copy()
    if "task_type" in train.columns:
        strata = train["task_type"].astype(str) + "|" + train["answer"]
        rare = strata.map(strata.value_counts()) < n_folds
        strata[rare] = train.loc[rare, "answer"]
    counts = strata.value_counts().sort_index()  # sorted, so a tie for the largest is broken the same way every run
    rare = strata.map(counts) < n_folds
    strata[rare] = counts.idxmax()
    return strata


def make_folds(train: pd.DataFrame, n_folds: int, seed: int) -> pd.DataFrame:
    """`train` with a `fold` column, stratified on the answer letter and task_type (fold_strata)."""
    from sklearn.model_selection import StratifiedKFold

    if len(train) < n_folds:
        raise ValueError(f"{len(train)} training rows cannot make {n_folds} folds: lower n_folds in the Config cell")
    folds = train.copy()
    folds["fold"] = -1
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, val_idx) in enumerate(splitter.split(folds, fold_strata(train, n_folds))):
        folds.loc[folds.index[val_idx], "fold"] = fold
    return folds


# -- The run folder: every artefact bound to what it was made from -------------------------------------------------
# A re-run into the same output_dir reuses what it finds there: each fold's adapter, checkpoints and result, each
# member's scores. Reused after a change of data, seed, n_folds, image_size or lr they give wrong numbers without any
# error, so each artefact keeps a fingerprint: the values it was made from, by name, so that a mismatch can say which
# changed. fingerprint.json beside folds.csv (the data and the folds) and in each fold folder (its adapter); inside
# scores.npz (the member's model and the inference settings). Folds and adapters are checked before any work starts
# (prepare_run_folder) and a mismatch stops the run, as they cost hours; scores are cheap and are simply made again.

# The Config fields that define each artefact; any other field (train_folds, micro-batch and workers, parallel_folds,
# time_budget_hours, ...) may change between runs of one folder.
FOLD_FIELDS = ("n_folds", "seed")
ADAPTER_FIELDS = (
    "model_id",
    "precision",
    "image_size",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "quantize_vision",
    "lr",
    "epochs",
    "effective_batch",  # batch_size x grad_accum: the gradient of a step, whatever micro-batch fits
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "shuffle_options",
    "early_stopping_patience",
)
SCORE_FIELDS = ("image_size", "tta_rotations", "debias_samples", "seed")  # seed: the rows the letter prior is fit on


class StaleRunError(RuntimeError):
    pass


def config_fields(cfg: Config, names: tuple[str, ...]) -> dict:
    """The named Config values as JSON stores them (tuples become lists), so a stored fingerprint compares equal."""
    return json.loads(json.dumps({name: getattr(cfg, name) for name in names}))


def data_hash(df: pd.DataFrame) -> str:
    """A short hash of a competition table as read from its CSV, rows in order. Without image_path (where this machine
    found each image: not the same on Kaggle as on a laptop) and fold (made from the data); images count by path."""
    table = df.drop(columns=["image_path", "fold"], errors="ignore")
    return hashlib.sha256(table.to_csv(index=False).encode()).hexdigest()[:16]


def files_hash(folder: Path) -> str:
    """A short hash of the files in `folder` (an adapter: a few MB to a few hundred, read in well under a second)."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def folds_fingerprint(cfg: Config, train: pd.DataFrame) -> dict:
    return {"train data": data_hash(train), **config_fields(cfg, FOLD_FIELDS)}


def adapter_fingerprint(cfg: Config, folds_print: dict, fold: int) -> dict:
    """What a fold's adapter is made from: its folds (folds_fingerprint), the model and the training settings."""
    return {**folds_print, "fold": fold, **config_fields(cfg, ADAPTER_FIELDS)}


def scores_fingerprint(cfg: Config, name: str, folds: pd.DataFrame, test: pd.DataFrame) -> dict:
    """What a member's scores are made from: its adapter's files (or, zero-shot, the base model), the rows scored and
    the inference settings. The adapter's files rather than its fingerprint: a fold trained again is scored again."""
    if name == "zeroshot":
        model = config_fields(cfg, ("model_id", "precision", "quantize_vision"))
    else:
        model = {"adapter": files_hash(trained_dir(cfg, int(name[4:])) / "best_adapter")}
    rows = {"rows scored": data_hash(val_rows(name, folds)), "test data": data_hash(test)}
    return {**model, **rows, **config_fields(cfg, SCORE_FIELDS)}


# Fields fingerprinted since a later version; an older fingerprint lacks them, and was made with their default then.
FIELDS_ADDED_LATER = {"quantize_vision": True}


def fingerprint_changes(stored: dict, expected: dict) -> list[str]:
    """'field: old -> new' for every field that differs."""
    stored = {k: v for k, v in FIELDS_ADDED_LATER.items() if k in expected} | stored
    keys = {**stored, **expected}
    return [f"{k}: {stored.get(k)!r} -> {expected.get(k)!r}" for k in keys if stored.get(k) != expected.get(k)]


def stored_fingerprint_changes(path: Path, expected: dict, made: bool) -> list[str]:
    """How the fingerprint stored at `path` differs from `expected`; [] when it agrees, or when there is none and
    nothing was `made` yet. A made artefact without a readable fingerprint is never reused on trust."""
    if not path.exists():
        return ["no fingerprint.json (made by an older version of this notebook)"] if made else []
    try:
        stored = json.loads(path.read_text())
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        return [f"fingerprint.json unreadable ({error})"]
    return fingerprint_changes(stored, expected)


def fold_changes(cfg: Config, folds_print: dict, fold: int) -> list[str]:
    """How fold `fold`'s folder (adapter, checkpoints, result, scores) differs from what cfg would make."""
    fold_dir = cfg.fold_dir(fold)
    made = fold_dir.is_dir() and any(p.name != "fingerprint.json" for p in fold_dir.iterdir())
    return stored_fingerprint_changes(fold_dir / "fingerprint.json", adapter_fingerprint(cfg, folds_print, fold), made)


def stale_run_error(cfg: Config, stale: dict[Path, list[str]]) -> StaleRunError:
    found = "\n".join(f"  - {path}: {'; '.join(changes)}" for path, changes in stale.items())
    return StaleRunError(
        f"{cfg.out} holds results made from another config or data; reused, they would give wrong scores:\n{found}\n"
        f"Either set OUTPUT_DIR to a new folder, or set move_stale_run_aside=True in the Config cell: {cfg.out} is "
        "then renamed with the time appended (nothing is deleted) and the run starts afresh."
    )


def prepare_run_folder(cfg: Config, train: pd.DataFrame) -> None:
    """Before any work: check that the folds and every fold folder in cfg.out were made from this data and cfg.
    A mismatch stops the run with the fields that changed, or with cfg.move_stale_run_aside moves the folder aside
    (renamed <output_dir>-<time>) so the run starts afresh. Then writes config.json. With cfg.adapters_from, the
    earlier run's folds and adapters are checked first (check_earlier_run)."""
    if cfg.adapters_from:
        check_earlier_run(cfg, train)
    folds_print = folds_fingerprint(cfg, train)
    made = (cfg.out / "folds.csv").exists()
    stale = {cfg.out / "fingerprint.json": stored_fingerprint_changes(cfg.out / "fingerprint.json", folds_print, made)}
    for fold_dir in cfg.out.glob("fold*"):
        if fold_dir.is_dir() and fold_dir.name[4:].isdigit():
            stale[fold_dir / "fingerprint.json"] = fold_changes(cfg, folds_print, int(fold_dir.name[4:]))
    stale = {path: changes for path, changes in sorted(stale.items()) if changes}
    if stale and not cfg.move_stale_run_aside:
        raise stale_run_error(cfg, stale)
    if stale:
        aside = cfg.out.resolve().with_name(f"{cfg.out.resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}")
        cfg.out.rename(aside)
        print(f"{cfg.out} was made from another config or data: moved to {aside}, starting afresh")
    cfg.save(cfg.out / "config.json")


def save_folds(folds: pd.DataFrame, cfg: Config) -> None:
    """folds.csv, and the fingerprint that binds it to the data, n_folds and seed (written first: folds.csv is never
    without one)."""
    atomic_write_text(cfg.out / "fingerprint.json", json.dumps(folds_fingerprint(cfg, folds), indent=2))
    atomic_write_text(cfg.out / "folds.csv", folds[["id", "fold"]].to_csv(index=False))


# -- An earlier run's adapters (cfg.adapters_from) -------------------------------------------------------------------
# Kaggle users often train in one session and predict in another, with the first session's output attached as a
# dataset (read-only). The earlier run is checked with the same fingerprints as a re-run, its folds.csv and each fold's
# adapter and result.json are read there, and everything this run makes (folds.csv copied, scores, submissions,
# plots) is written to cfg.out only.


def earlier_run_dir(adapters_from: str | os.PathLike) -> Path:
    """The earlier run's output folder: the one holding folds.csv, which is `adapters_from` itself or a folder in it
    (a notebook's output attached on Kaggle keeps its path: /kaggle/input/<name>/outputs/folds.csv)."""
    root = Path(adapters_from)
    if not root.is_dir():
        raise FileNotFoundError(f"adapters_from: {root} is not a folder (attach the earlier run's output as an input)")
    found = [root] if (root / "folds.csv").is_file() else sorted(p.parent for p in root.glob("*/folds.csv"))
    if not found:
        raise FileNotFoundError(f"adapters_from: {root} holds no earlier run: no folds.csv in it or a folder in it")
    if len(found) > 1:
        raise ValueError(f"adapters_from: {root} holds several runs {[str(p) for p in found]}: set it to one of them")
    return found[0]


def trained_dir(cfg: Config, fold: int) -> Path:
    """Where fold `fold`'s adapter and result.json are read: the earlier run's fold folder with cfg.adapters_from,
    else this run's."""
    return earlier_run_dir(cfg.adapters_from) / f"fold{fold}" if cfg.adapters_from else cfg.fold_dir(fold)


def check_earlier_run(cfg: Config, train: pd.DataFrame) -> None:
    """Check the earlier run at cfg.adapters_from against this data and cfg, as a re-run is checked: its folds and the
    adapter of each fold of cfg.folds_to_train it trained (their fingerprints). A difference stops with each
    fingerprint file and each changed field, old -> new; a run without trained folds stops too. Reads only."""
    root = earlier_run_dir(cfg.adapters_from)
    if root.resolve() == cfg.out.resolve():
        raise ValueError(f"adapters_from and output_dir are both {root}: set OUTPUT_DIR to a new folder")
    trained = [fold for fold in cfg.folds_to_train if fold_is_trained(cfg, fold)]
    incomplete = [fold for fold in trained if not (trained_dir(cfg, fold) / "best_adapter").is_dir()]
    if incomplete:
        raise FileNotFoundError(f"{root}: folds {incomplete} have a result.json but no best_adapter/ (copied in part?)")
    if not trained:
        raise FileNotFoundError(
            f"{root} holds no trained fold of {cfg.folds_to_train} (fold<k>/result.json and fold<k>/best_adapter/)"
        )
    folds_print = folds_fingerprint(cfg, train)
    expected = {root / "fingerprint.json": folds_print}
    expected |= {root / f"fold{k}" / "fingerprint.json": adapter_fingerprint(cfg, folds_print, k) for k in trained}
    stale = {path: stored_fingerprint_changes(path, fingerprint, made=True) for path, fingerprint in expected.items()}
    stale = {path: changes for path, changes in stale.items() if changes}
    if stale:
        found = "\n".join(f"  - {path}: {'; '.join(changes)}" for path, changes in stale.items())
        raise StaleRunError(
            f"adapters_from: {root} was made from another config or data; its adapters would give wrong scores:\n"
            f"{found}\nSet the Config cell as that run had it (its config.json), or adapters_from=None to train."
        )
    left_out = [fold for fold in cfg.folds_to_train if fold not in trained]
    print(f"folds {trained}: adapters from {root}" + (f"; folds {left_out} not trained there" if left_out else ""))


def run_folds(train: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """`train` with the fold column this run trains and judges on: a new split (make_folds) in a new output_dir; the
    one its folds.csv holds in a re-run (prepare_run_folder has matched it with the data, n_folds and seed); with
    adapters_from, the earlier run's. A stored split is read, not made again: its folds may be trained already, and
    make_folds could split otherwise after an update of scikit-learn or of this file, judging folds on rows they
    trained on."""
    if cfg.adapters_from:
        return stored_folds(earlier_run_dir(cfg.adapters_from) / "folds.csv", train)
    if (cfg.out / "folds.csv").exists():
        return stored_folds(cfg.out / "folds.csv", train)
    return make_folds(train, cfg.n_folds, cfg.seed)


def stored_folds(path: Path, train: pd.DataFrame) -> pd.DataFrame:
    """`train` with the fold column of the folds.csv at `path`, which must cover its ids exactly."""
    saved = pd.read_csv(path, dtype={"id": str})
    fold = train["id"].map(saved.set_index("id")["fold"])
    unknown = sorted(set(saved["id"]) - set(train["id"]))
    if fold.isna().any() or unknown:
        raise ValueError(
            f"{path} does not match train.csv: ids without a fold {_preview(train.loc[fold.isna(), 'id'])}, "
            f"unknown ids {_preview(unknown)}"
        )
    return train.assign(fold=fold.astype(int))


def earlier_fold_results(cfg: Config, folds: pd.DataFrame) -> pd.DataFrame:
    """What train_folds returns, from the earlier run's result.json files, training nothing. Each fold folder of this
    run gets that adapter's fingerprint (bind_fold), so a re-run into this output_dir is checked as usual."""
    folds_print = folds_fingerprint(cfg, folds)
    trained = [fold for fold in cfg.folds_to_train if fold_is_trained(cfg, fold)]
    for fold in trained:
        bind_fold(cfg, folds_print, fold)
    return fold_table([fold_result(cfg, fold) for fold in trained])


# ---------------------------------------------------------------------------------------------------------------------
# 6. Dataset and collator
# ---------------------------------------------------------------------------------------------------------------------

SYSTEM_PROMPT = "You are a careful visual assistant. Look at the image and answer the multiple-choice question."
INSTRUCTION = "Answer with one lowercase letter: a, b, c or d."
# Qwen3.5's chat template opens a thinking block after the assistant header unless told otherwise ("<think>\n"; with
# enable_thinking=False an empty "<think>\n\n</think>\n\n"), and writes a trained answer after that empty block. The
# letter is scored, and trained, right where the answer starts, with thinking off. Templates without the switch
# (Qwen2.5-VL, Qwen3-VL) are not given it: transformers warns on every call about a keyword its template lacks.
CHAT_TEMPLATE_KWARGS = {"enable_thinking": False}


def chat_template_kwargs(processor) -> dict:
    """CHAT_TEMPLATE_KWARGS that the processor's chat template reads."""
    return {key: value for key, value in CHAT_TEMPLATE_KWARGS.items() if key in str(processor.chat_template)}


def normalize_text(text: str) -> str:
    """NFKC folds full-width letters and compatibility characters (common in Korean text) and trims whitespace."""
    return unicodedata.normalize("NFKC", str(text)).strip()


def build_messages(row: dict, order: tuple[int, ...] = (0, 1, 2, 3), answer: str | None = None) -> list[dict]:
    """Qwen chat messages for one question. `order` lists which original option goes under (a), (b), (c), (d)."""
    options = "\n".join(f"({LETTERS[i]}) {normalize_text(row[LETTERS[j]])}" for i, j in enumerate(order))
    hint = normalize_text(row.get("task_hint", "") or "")
    question = normalize_text(row["question"]) + (f"\nHint: {hint}" if hint else "")
    messages = [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": f"{question}\n{options}\n{INSTRUCTION}"}],
        },
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


# Qwen-VL's image processors refuse an aspect ratio above 200 (smart_resize: "absolute aspect ratio must be smaller
# than 200"). Longer strips are padded to half of that, with a mid grey that stands for nothing in the image.
MAX_ASPECT_RATIO = 100
PAD_COLOUR = (128, 128, 128)


@dataclass(frozen=True)
class PixelBudget:
    """How large an image reaches the model, as Qwen's own preprocessing sizes it (qwen-vl-utils' smart_resize): both
    sides multiples of `factor` (one visual token per factor x factor pixels), as many pixels as fit `max_pixels` and
    at least `min_pixels`, the aspect ratio kept as nearly as that allows. A memory level sets max_pixels to
    image_size ** 2, so a square image keeps image_size x image_size; any other shape uses nearly all of it too (a
    16:9 photo at `safe` 512 x 288, where shrinking the longest side to 384 gave 384 x 216, 58% of the pixels)."""

    max_pixels: int  # the memory level's image_size ** 2
    min_pixels: int  # the model's own minimum (its processor's): a small image is brought up to it
    factor: int  # the vision tower's patch side times its 2 x 2 merge: 32 for Qwen3-VL and Qwen3.5, 28 for Qwen2.5-VL

    @property
    def max_aspect_ratio(self) -> float:
        """Strips are padded to this: MAX_ASPECT_RATIO, or less where the budget cannot hold one factor x factor patch
        across such a strip (at image_size 64)."""
        return min(MAX_ASPECT_RATIO, self.max_pixels // self.factor**2)

    def size_for(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) that an image of this size gets, after pad_to_aspect_ratio."""
        from qwen_vl_utils import smart_resize

        ratio = self.max_aspect_ratio
        padded_width, padded_height = max(width, math.ceil(height / ratio)), max(height, math.ceil(width / ratio))
        height, width = smart_resize(padded_height, padded_width, self.factor, self.min_pixels, self.max_pixels)
        return width, height


# The data check runs before any model is loaded, so it sizes images with qwen-vl-utils' defaults for what depends on
# the model (28-pixel merged patches, at least 4 of them). The model's own factor moves a side by less than one merged
# patch; nothing the check looks for (an image that cannot be decoded, turned, converted or sized) depends on it.
def data_check_budget(image_size: int) -> PixelBudget:
    return PixelBudget(max_pixels=image_size**2, min_pixels=4 * 28 * 28, factor=28)


def set_pixel_budget(processor, image_size: int) -> PixelBudget:
    """The memory level's pixel budget for this model, set on its processor too: the processor then keeps every image
    that load_image sized (its own smart_resize returns the same size) instead of resizing it a second time."""
    image_processor = processor.image_processor
    budget = PixelBudget(
        max_pixels=image_size**2,
        min_pixels=image_processor.size["shortest_edge"],  # as the checkpoint's preprocessor_config.json gives it
        factor=image_processor.patch_size * image_processor.merge_size,
    )
    if budget.min_pixels > budget.max_pixels:
        raise ValueError(
            f"image_size {image_size} is below this model's smallest image ({budget.min_pixels} pixels, "
            f"{math.isqrt(budget.min_pixels)} px square): raise image_size in the Config cell"
        )
    image_processor.size = {"shortest_edge": budget.min_pixels, "longest_edge": budget.max_pixels}
    return budget


def pixel_budget(processor) -> PixelBudget:
    """The pixel budget that set_pixel_budget gave the processor."""
    image_processor = processor.image_processor
    factor = image_processor.patch_size * image_processor.merge_size
    return PixelBudget(image_processor.size["longest_edge"], image_processor.size["shortest_edge"], factor)


def load_image(path: str, budget: PixelBudget) -> Image.Image:
    """RGB, upright, extreme strips padded, sized to the pixel budget exactly as the model's processor sizes it.

    The data check, training and inference all read images here, so an image that passed the check loads later.
    """
    with Image.open(path) as image:
        refuse_huge(image)
        # A JPEG decodes at a reduced scale, never below the size it gets (draft): image loading was the largest CPU
        # cost of a scoring pass. smart_resize treats both sides alike, so turning the image upright after changes
        # nothing in that size.
        image.draft("RGB", budget.size_for(*image.size))
        image = pad_to_aspect_ratio(upright_rgb(image), budget.max_aspect_ratio)
        return image.resize(budget.size_for(*image.size), Image.Resampling.BICUBIC, reducing_gap=2.0)


def refuse_huge(image: Image.Image) -> None:
    """Refuse an image over PIL's decompression-bomb limit (89 megapixels by default): it takes gigabytes to decode."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > limit:
        raise ValueError(
            f"{image.width} x {image.height} pixels, over PIL's decompression-bomb limit of {limit:,} pixels "
            "(PIL.Image.MAX_IMAGE_PIXELS): shrink the image or raise the limit"
        )


def upright_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image as a viewer shows it: EXIF orientation applied, any mode converted keeping its contrast."""
    # Phone photos are often stored sideways with an Orientation tag. exif_transpose returns a new image either way
    # (a copy when there is nothing to turn), so an RGB one needs no further copy: the common case costs one copy.
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I", "F"):
        # 16- and 32-bit greyscale: PIL's convert clips at 255, which turns most of such an image white. Scale it
        # instead, from black at 0 to white at its brightest pixel (or at 255, so 8-bit values kept in 'I' stay).
        pixels = np.asarray(image, dtype=np.float32).clip(0, None)
        scaled = pixels * (255 / max(255.0, float(pixels.max())))
        return Image.fromarray(scaled.round().astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # Transparent pixels hold arbitrary colours (often black): show them on white, as a viewer would.
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # CMYK, P, L, 1, YCbCr ...


def pad_to_aspect_ratio(image: Image.Image, max_ratio: float = MAX_ASPECT_RATIO) -> Image.Image:
    """`image`, centred on a PAD_COLOUR canvas when one side is more than `max_ratio` times the other."""
    width, height = image.size
    short = math.ceil(max(width, height) / max_ratio)
    if min(width, height) >= short:
        return image
    size = (width, short) if width > height else (short, height)
    canvas = Image.new("RGB", size, PAD_COLOUR)
    canvas.paste(image, ((size[0] - width) // 2, (size[1] - height) // 2))
    return canvas


def prompt_text(row: pd.Series | dict) -> str:
    """The user turn's text for one row, as the model reads it (the image comes before it)."""
    return build_messages(dict(row))[1]["content"][1]["text"]


class VQADataset(torch.utils.data.Dataset):
    """Rows as (image, chat messages). With answers for training; `order` rotates or shuffles options (TTA, aug)."""

    def __init__(
        self, df: pd.DataFrame, budget: PixelBudget, train: bool, shuffle_options: bool = False, seed: int = 0
    ):
        self.rows = df.to_dict("records")
        self.budget = budget
        self.train = train
        self.shuffle_options = shuffle_options
        self.seed = seed
        self.order = (0, 1, 2, 3)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        order = self.order
        if self.shuffle_options:  # seeded per row, so a resumed run sees the same permutation
            order = tuple(np.random.default_rng([self.seed, i]).permutation(4))
        answer = LETTERS[order.index(LETTERS.index(row["answer"]))] if self.train else None
        return {
            "index": i,
            "image": load_image(row["image_path"], self.budget),
            "messages": build_messages(row, order, answer),
        }


class VQACollator:
    """Runs the processor once per batch (in DataLoader workers) and, for training, builds answer-only labels.

    Training batches are padded on the right: causal attention then keeps every real token from seeing a pad, and
    the model can run without a padding mask (answer_loss_sum). Inference batches are padded on the left, so that
    the next token of every row is predicted at the last position (`logits_to_keep=1`).
    """

    def __init__(self, processor, train: bool):
        self.processor = processor
        self.train = train
        tokenizer = processor.tokenizer
        self.im_end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.header_ids = tokenizer.encode(answer_header(processor), add_special_tokens=False)
        self.template_kwargs = chat_template_kwargs(processor)

    def __call__(self, items: list[dict]) -> dict:
        texts = [
            self.processor.apply_chat_template(
                it["messages"], tokenize=False, add_generation_prompt=not self.train, **self.template_kwargs
            )
            for it in items
        ]
        batch = self.processor(
            text=texts,
            images=[it["image"] for it in items],
            padding=True,
            padding_side="right" if self.train else "left",
            return_tensors="pt",
        )
        batch = dict(batch)
        batch["index"] = torch.tensor([it["index"] for it in items])
        if self.train:
            batch["labels"] = answer_labels(batch["input_ids"], self.header_ids, self.im_end_id)
        return batch


def answer_header(processor) -> str:
    """What the chat template writes before the answer: "<|im_start|>assistant\\n", for Qwen3.5 followed by the empty
    thinking block. Read off the template's own generation prompt, so training labels start where inference scores."""
    probe = [{"role": "user", "content": [{"type": "text", "text": "?"}]}]
    kwargs = chat_template_kwargs(processor)
    prompt = processor.apply_chat_template(probe, tokenize=False, add_generation_prompt=True, **kwargs)
    return prompt[prompt.rindex("<|im_start|>") :]


def answer_labels(input_ids: torch.Tensor, header_ids: list[int], im_end_id: int) -> torch.Tensor:
    """Labels covering exactly the assistant's answer and the <|im_end|> that closes it; -100 elsewhere.

    The chat template ends with "<|im_end|>\\n", so the answer is NOT the last token: it starts after the last answer
    header (`answer_header`) and runs to the next <|im_end|>.
    """
    labels = torch.full_like(input_ids, -100)
    header = torch.tensor(header_ids)
    width = len(header_ids)
    for row, ids in enumerate(input_ids):
        starts = [s for s in range(len(ids) - width, -1, -1) if torch.equal(ids[s : s + width], header)]
        if not starts:
            raise ValueError(f"batch row {row}: no assistant header found; is the chat template a Qwen one?")
        begin = starts[0] + width
        ends = (ids[begin:] == im_end_id).nonzero()
        if len(ends) == 0:
            raise ValueError(f"batch row {row}: the assistant answer is not closed by <|im_end|>")
        end = begin + int(ends[0])
        labels[row, begin : end + 1] = ids[begin : end + 1]
    return labels


def split_batch(batch: dict, size: int) -> list[dict]:
    """Micro-batches of `size` rows, each with the padding it does not need (columns none of its rows uses) trimmed
    away, on whichever side the batch is padded.

    Qwen-VL packs all images' patches into one `pixel_values` tensor; image_grid_thw says how many each image has.
    """
    n = batch["input_ids"].shape[0]
    seq_len = batch["input_ids"].shape[1]
    patches = batch["image_grid_thw"].prod(-1)
    offsets = torch.cat([torch.zeros(1, dtype=patches.dtype), patches.cumsum(0)]).tolist()
    chunks = []
    for lo in range(0, n, size):
        hi = min(lo + size, n)
        used = batch["attention_mask"][lo:hi].any(0).nonzero()  # the columns any row of the chunk uses
        first, last = int(used[0]), int(used[-1])
        chunk = {}
        for key, value in batch.items():
            if key == "pixel_values":
                chunk[key] = value[offsets[lo] : offsets[hi]]
            elif value.dim() >= 2 and value.shape[:2] == (n, seq_len):
                chunk[key] = value[lo:hi, first : last + 1]
            else:
                chunk[key] = value[lo:hi]
        chunks.append(chunk)
    return chunks


def labelled_text(processor, rows: pd.DataFrame, cfg: Config) -> list[str]:
    """The tokens that training labels cover, decoded: a check that labels hold exactly "<answer><|im_end|>"."""
    dataset = VQADataset(rows.reset_index(drop=True), pixel_budget(processor), train=True)
    batch = VQACollator(processor, train=True)([dataset[i] for i in range(len(dataset))])
    labels = batch["labels"]
    return [processor.tokenizer.decode(ids[ids != -100]) for ids in labels]


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffled batches of similar lengths: less padding, same randomness across epochs as a plain shuffle.

    Indices are shuffled, cut into groups of 50 batches, sorted by length inside each group, cut into batches,
    and the batches shuffled again.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    group = batch_size * 50
    batches = []
    for lo in range(0, len(order), group):
        block = sorted(order[lo : lo + group], key=lambda i: lengths[i])
        batches += [block[i : i + batch_size] for i in range(0, len(block), batch_size)]
    return [[int(i) for i in batches[j]] for j in rng.permutation(len(batches))]


def length_sorted_batches(df: pd.DataFrame, batch_size: int) -> list[list[int]]:
    """Row positions in batches of similar length, shortest first (inference: least padding, no shuffling)."""
    by_length = np.argsort(prompt_lengths(df), kind="stable")
    return [by_length[i : i + batch_size].tolist() for i in range(0, len(df), batch_size)]


def prompt_lengths(df: pd.DataFrame) -> list[int]:
    """A cheap stand-in for token length (characters of question and options) used to group similar rows."""
    return (df["question"].str.len() + sum(df[c].str.len() for c in LETTERS)).tolist()


def make_loader(dataset: VQADataset, collator: VQACollator, batches: list[list[int]], workers: int):
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collator,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        # Its own generator: a DataLoader otherwise draws its worker seed from the global RNG, so a resumed run
        # would see different dropout masks from an uninterrupted one.
        generator=torch.Generator().manual_seed(0),
        # Workers only run the processor on the CPU, so forking them is safe, and fast. A process started by spawn
        # (each train_folds_on_gpus process) would otherwise spawn its workers too: 15 s of imports on 4 busy cores
        # for every DataLoader, 18 s to score 32 rows (measured in the rehearsal).
        multiprocessing_context="fork" if workers and "fork" in mp.get_all_start_methods() else None,
    )


# ---------------------------------------------------------------------------------------------------------------------
# 7. Model: multi-GPU 4-bit load, LoRA
# ---------------------------------------------------------------------------------------------------------------------


# -- Model families ---------------------------------------------------------------------------------------------------
# What differs between the Qwen-VL architectures, in one place; the rest of this module is shared by all of them.
# Adding a family means one entry here (and its tiny config in data/make_tiny_model.py, for the tests).


@dataclass(frozen=True)
class ModelFamily:
    model_class: str  # transformers' image-text-to-text class, as saved in a checkpoint's config.json
    vision_attention: str  # the vision tower's attention module class, batched by batch_vision_attention
    expert_tensors: tuple[str, ...] = ()  # fused 3-D expert parameters, stored in NF4 by the MoE loader
    fp32_modules: tuple[str, ...] = ()  # modules that overflow in fp16: run in fp32 when the model computes in fp16


MODEL_FAMILIES = {  # by config.json's model_type
    "qwen2_5_vl": ModelFamily("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLVisionAttention"),
    "qwen3_vl": ModelFamily("Qwen3VLForConditionalGeneration", "Qwen3VLVisionAttention"),
    "qwen3_vl_moe": ModelFamily(
        "Qwen3VLMoeForConditionalGeneration",
        "Qwen3VLMoeVisionAttention",
        expert_tensors=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    ),
    # Qwen3.5 and Qwen3.6: a hybrid language model (three Gated DeltaNet layers, linear_attn, to each full-attention
    # layer, self_attn) under Qwen3-VL's vision tower without deepstack; its vision attention is Qwen3-VL's.
    # The Gated DeltaNet (linear_attn) computes its recurrence in fp32 by casting, but under autocast the matmuls inside
    # are cast back to fp16, where its decays and gates overflow (the checkpoints' mamba_ssm_dtype is float32).
    "qwen3_5": ModelFamily("Qwen3_5ForConditionalGeneration", "Qwen3_5VisionAttention", fp32_modules=("linear_attn",)),
    "qwen3_5_moe": ModelFamily(
        "Qwen3_5MoeForConditionalGeneration",
        "Qwen3_5MoeVisionAttention",
        expert_tensors=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        fp32_modules=("linear_attn",),
    ),
}


def model_family(model_type: str) -> ModelFamily:
    if model_type not in MODEL_FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {list(MODEL_FAMILIES)}")
    return MODEL_FAMILIES[model_type]


def compute_dtype(precision: str = "auto") -> torch.dtype:
    """The dtype the model computes in: `precision` if given, else bf16 where the GPU has it, fp16 on older GPUs such
    as the T4 (trained with a GradScaler), fp32 on CPU."""
    if PRECISIONS[precision] is not None:
        return PRECISIONS[precision]
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def input_device(model) -> torch.device:
    """Where inputs go: the embedding's device (device_map may spread layers over several GPUs)."""
    return model.get_input_embeddings().weight.device


def weight_devices(model) -> set[torch.device]:
    """The devices the model's weights are on. Read from the weights, not model.hf_device_map: transformers sets that
    only for a model spread over devices, so a model on one GPU has none (folds trained in turn, silently, until
    2026-11-29, when use_parallel_folds read it)."""
    return {p.device for p in model.parameters()}


def load_model_and_processor(cfg: Config):
    """The base model (4-bit NF4 on CUDA, fp32 on CPU) with gradient checkpointing, and its processor.

    `cfg.model_id` may be a Hub id or a local folder (Kaggle Models, the smoke profile's tiny model): find_local_model.
    On GPUs the weights go where plan_device_map says: a model that cannot fit stops here, before anything is loaded.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_path = find_local_model(cfg.model_id)
    family = model_family(_checkpoint_config(model_path).get("model_type"))  # an unsupported model stops here
    processor = AutoProcessor.from_pretrained(model_path)
    processor.tokenizer.padding_side = "left"
    set_pixel_budget(processor, cfg.image_size)  # images of at most image_size ** 2 pixels: the level's vision tokens

    dtype = compute_dtype(cfg.precision)
    kwargs = quantization_kwargs(model_path, dtype, quantize_vision=cfg.quantize_vision)
    kwargs["attn_implementation"] = "sdpa"
    # cuDNN's attention backward returns NaN gradients on padded batches whose length is 64 modulo 128 (pytorch#196678;
    # on an H200 with torch 2.11, every such bf16 step of the 2B rehearsal: experiments/replay_nonfinite.py). SDPA then
    # takes its memory-efficient kernel, which gives finite gradients on the same batches (4% slower there).
    torch.backends.cuda.enable_cudnn_sdp(False)
    if torch.cuda.is_available():
        gpus = [cfg.gpu] if cfg.gpu is not None else list(range(torch.cuda.device_count()))
        budget = cap_gpu_memory(gpus, cfg.gpu_memory_cap_gib)
        kwargs["device_map"] = plan_device_map(model_path, kwargs.get("quantization_config"), dtype, budget)
    model = AutoModelForImageTextToText.from_pretrained(model_path, **kwargs)
    print(f"vision attention batched over images in {batch_vision_attention(model)} layers")
    attention = use_unmasked_attention(model)
    masked = "with" if padding_mask_needed(model) else "without"
    print(f"language model attention {attention}: training batches {masked} the padding mask")
    if dtype == torch.float16 and cfg.fp32_islands and family.fp32_modules:
        print(f"{compute_in_fp32(model, family.fp32_modules)} {'/'.join(family.fp32_modules)} modules compute in fp32")
    if bucket_short_convolutions(model):
        print(f"Gated DeltaNet convolutions on lengths padded to a multiple of {CONV_BUCKET} tokens")
    model.requires_grad_(False)
    model.config.use_cache = False
    model.config.get_text_config().use_cache = False  # the language model reads its own config
    # Checkpointing keeps each decoder layer's input and recomputes the rest in the backward. The reentrant variant
    # runs the forward without autograd (transformers then makes the embeddings' output require grad, so that the
    # LoRA weights get theirs); offload keeps the inputs in pinned CPU memory (OffloadedCheckpointing; on a CPU they
    # are in CPU memory already).
    # transformers 5.23 renamed gradient checkpointing "activation checkpointing"; 5.21 and 5.22 know only the old name.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": cfg.reentrant_checkpointing})
    if cfg.offload_activations and torch.cuda.is_available():
        OffloadedCheckpointing(cfg.reentrant_checkpointing).install(model)
    # Never on a CPU (the smoke profile, the tests): compiling would take longer than it saves; Triton needs a GPU.
    norms = compile_norms(model, compiled=cfg.compile_norms and torch.cuda.is_available())
    if norms:
        print(f"{norms} RMSNorms and the rotary embedding compiled (torch.compile)")
    if cfg.liger_kernels:
        reason = why_no_liger_kernels(model)
        print(f"liger_kernels: {reason}; norms eager" if reason else use_liger_kernels(model))
    return model, processor


# Every supported family's vision encoder (its blocks and mergers), as transformers 5 names it.
VISION_ENCODER = "model.visual"


def quantization_kwargs(
    model_path: str, dtype: torch.dtype, on_gpu: bool | None = None, quantize_vision: bool = True
) -> dict:
    """from_pretrained's dtype and 4-bit config for `model_path`: NF4 with double quantization on a GPU (on_gpu=None:
    if there is one; a CPU keeps the weights unquantized), and an MoE's fused experts through the MoE loader.
    quantize_vision=False leaves the vision encoder in `dtype`."""
    from transformers import BitsAndBytesConfig

    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    # A list given replaces transformers' own (lm_head), so lm_head is listed again.
    skip_modules = None if quantize_vision else ["lm_head", VISION_ENCODER]
    kwargs = {"dtype": dtype}
    if on_gpu:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=skip_modules,
        )
    if model_family(_checkpoint_config(model_path).get("model_type")).expert_tensors:
        # fused experts that BitsAndBytesConfig leaves in 16 bits: see the MoE section
        kwargs = moe_load_kwargs(model_path, kwargs, quantize_linears=on_gpu, skip_modules=skip_modules)
    return kwargs


def compute_in_fp32(model, names: tuple[str, ...]) -> int:
    """Run every module called one of `names` in fp32 with autocast off, its output cast back to the input's dtype, so
    that an fp16 model keeps an fp16 residual stream around these fp32 islands. 4-bit layers inside still multiply in
    their compute dtype (bitsandbytes casts their input) and return fp32. Returns how many modules were wrapped."""
    modules = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in names]
    for module in modules:
        module.forward = _fp32_forward(module.forward)
    return len(modules)


def _fp32_forward(forward):
    @functools.wraps(forward)
    def fp32_forward(hidden_states, *args, **kwargs):
        with torch.autocast(hidden_states.device.type, enabled=False):
            return forward(hidden_states.float(), *args, **kwargs).to(hidden_states.dtype)

    return fp32_forward


# Each Gated DeltaNet layer (Qwen3.5) runs a depthwise causal convolution over the tokens through cuDNN, which builds
# an execution plan for each new input shape (costly on the host for depthwise convolutions: NVIDIA/cudnn-frontend
# #1066). A training batch has a new length almost every step: on an H200 the profiled Qwen3.5-4B step spent
# 0.36-0.51 s of CPU in the convolutions' forward and 0.17-0.20 s in their backward, and left the GPU idle 0.51 s of a
# 1.76 s step, where one batch repeated left it idle 0.11 s with no convolution among the costly CPU ops
# (experiments/README, "Liger's kernels"; results/profile_norms.json). Padded on the right to a multiple of
# CONV_BUCKET tokens, the lengths repeat after a few steps and cuDNN's plans can be reused; a causal convolution's
# outputs read no later input, so the outputs kept are the same. Measured: in fp16 (the DeltaNet layers in fp32, a
# T4's case) the step 1.43x shorter, 1.37x the samples/s, the same GPU work and losses; in bf16, where cuDNN's
# convolution is not among the costly ops either way, the same speed (experiments/README, "DeltaNet convolutions").
CONV_BUCKET = 64


def bucket_short_convolutions(model) -> bool:
    """Give the model's Gated DeltaNet layers the bucketed causal convolution; False for a family without them."""
    if not hasattr(sys.modules[type(model).__module__], "causal_conv1d_fn"):
        return False
    replace_modeling_function(model, "causal_conv1d_fn", bucketed_causal_conv1d)
    return True


def bucketed_causal_conv1d(causal_conv1d_fn):
    @functools.wraps(causal_conv1d_fn)
    def on_bucketed_length(hidden_states, weight, bias=None, activation=None, **kwargs):
        if any(isinstance(value, torch.Tensor) for value in kwargs.values()):  # packed sequences' seq_idx: by token
            return causal_conv1d_fn(hidden_states, weight, bias, activation, **kwargs)
        length = hidden_states.shape[-1]
        padded = torch.nn.functional.pad(hidden_states, (0, -length % CONV_BUCKET))
        return causal_conv1d_fn(padded, weight, bias, activation, **kwargs)[..., :length]

    return on_bucketed_length


# -- Where the weights go ----------------------------------------------------------------------------------------------
# transformers' device_map="auto" with a max_memory per GPU failed on the real Qwen3-VL-30B-A3B: under 2 x 9 GiB its
# 15.8 GiB of 4-bit weights did not fit after the bitsandbytes quantizer took 10% off each budget and the balancing
# kept a layer's worth spare, so layers went to the CPU and loading stopped. So the weights get a plan of their own:
# the model's 4-bit size as transformers' own quantizer counts it (on an empty, meta-device model), the fewest GPUs
# that hold it with ACTIVATION_RESERVE_GIB free on each, the layers spread evenly over them. One GPU when the model
# fits one (no hops between GPUs, the other GPU free for a second fold); never the CPU.

# Room for activations beside the weights on each GPU that holds part of the model: a training step of Qwen3-VL-8B at
# micro-batch 16 and 384 px took 3.3 GiB above its weights, scoring 32 rows 3.5 GiB (experiments/README.md); both
# halve their batch on out-of-memory.
ACTIVATION_RESERVE_GIB = 3.5


def cap_gpu_memory(gpus: list[int], cap_gib: float | None) -> dict[int, float]:
    """GiB each GPU in `gpus` gives this process; with cap_gib, torch's allocator is held to it as well."""
    budget = {}
    for gpu in gpus:
        total = torch.cuda.get_device_properties(gpu).total_memory / 2**30
        if cap_gib is not None and cap_gib < total:
            torch.cuda.set_per_process_memory_fraction(cap_gib / total, gpu)
        budget[gpu] = min(total, cap_gib or total)
    return budget


def quantized_module_sizes(model_path: str, quantization_config, dtype: torch.dtype):
    """The model on the meta device (no weights read), its quantizer, and the bytes of every module once loaded as
    `quantization_config` says (transformers' own accounting; "" is the whole model)."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.integrations.accelerate import compute_module_sizes
    from transformers.quantizers.auto import AutoHfQuantizer

    config = AutoConfig.from_pretrained(model_path)
    pre_quantized = getattr(config, "quantization_config", None) is not None  # a save_quantized_base folder
    quantizer = AutoHfQuantizer.from_config(
        config.quantization_config if pre_quantized else quantization_config, pre_quantized=pre_quantized
    )
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    quantizer.preprocess_model(model=model, dtype=dtype, device_map="auto", checkpoint_files=None, use_kernels=False)
    return model, quantizer, compute_module_sizes(model, quantizer)[0]


def plan_device_map(model_path: str, quantization_config, dtype: torch.dtype, gpu_gib: dict[int, float]) -> dict:
    """A device_map for from_pretrained: the model's 4-bit weights on the fewest of the GPUs in `gpu_gib` ({index:
    GiB}) that hold them with ACTIVATION_RESERVE_GIB to spare on each, spread evenly over those. Raises a ValueError
    naming the model, its 4-bit size and the GPU memory if they cannot hold it. No weights are read: sizes come from
    transformers' quantizer on a meta-device copy of the model."""
    from transformers.integrations.accelerate import get_max_layer_size, infer_auto_device_map

    model, quantizer, module_sizes = quantized_module_sizes(model_path, quantization_config, dtype)
    weights = module_sizes[""]
    largest_block = max(
        (module_sizes[name] for name, m in model.named_modules() if type(m).__name__ in model._no_split_modules),
        default=0,
    )
    # infer_auto_device_map keeps room on the first GPU for the largest layer, to stream offloaded layers through it.
    # Nothing is offloaded here, so that room is given back: without it the first GPU took up to that much less than
    # its share (Qwen3.5-27B: its 2.4 GiB embeddings) and the last GPU, which also holds lm_head, the rest.
    offload_room = get_max_layer_size(list(model.named_children()), module_sizes, model._no_split_modules)[0]
    gpus = list(gpu_gib)
    free = {gpu: max(0.0, gib - ACTIVATION_RESERVE_GIB) * 2**30 for gpu, gib in gpu_gib.items()}
    for n in range(1, len(gpus) + 1):
        used = gpus[:n]
        if sum(free[g] for g in used) < weights + (n - 1) * largest_block:
            continue
        # Even spread: each GPU but the last takes its share plus one block (layers do not split), the last the rest.
        share = weights / n + largest_block
        max_memory = {g: int(min(free[g], share)) for g in used[:-1]} | {used[-1]: int(free[used[-1]])}
        max_memory[used[0]] += int(offload_room)
        device_map = infer_auto_device_map(
            model, max_memory=max_memory, no_split_module_classes=model._no_split_modules, hf_quantizer=quantizer
        )
        placed = weights_per_gpu(device_map, module_sizes)
        if set(device_map.values()) <= set(used) and all(placed[g] <= free[g] for g in used):
            return device_map
    gpu_list = ", ".join(f"cuda:{g} {gib:.1f} GiB" for g, gib in gpu_gib.items())
    raise ValueError(
        f"{model_path} does not fit: its 4-bit weights take {weights / 2**30:.1f} GiB, and the GPUs ({gpu_list}) "
        f"hold {sum(free.values()) / 2**30:.1f} GiB of weights once {ACTIVATION_RESERVE_GIB} GiB each is kept for "
        "activations. Take a smaller model, or a machine with more GPU memory."
    )


def weights_per_gpu(device_map: dict, module_sizes: dict) -> dict:
    """Bytes of weights a device_map puts on each device, from quantized_module_sizes' sizes."""
    placed = defaultdict(int)
    for name, device in device_map.items():
        placed[device] += module_sizes[name]
    return dict(placed)


# -- Vision attention over all images at once ------------------------------------------------------------------------
# Without FlashAttention (a T4 has none) transformers' Qwen-VL vision towers run attention image by image, and
# Qwen2.5-VL window by window: one small SDPA call each, so 27 layers x 32 images = 864 calls per batch of Qwen3-VL-8B.
# On an H100 those launches left the GPU waiting for the CPU through a third of a scoring pass (profile_infer.py).
# Images (or windows) with the same number of patches are independent attention problems of the same shape, so each
# such group goes through one batched SDPA call. Same weights, same result (tests/test_model.py compares both).
def batched_vision_attention_forward(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    """Forward of a Qwen-VL vision attention module (bound to it) with one SDPA call per sequence length."""
    tokens = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(tokens, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    rotary = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision  # the model file's own rotary embedding
    q, k = rotary(q, k, cos, sin)
    out = None  # [tokens, heads, head_dim], in the dtype SDPA returns (autocast may lower it)
    starts_by_length = defaultdict(list)
    bounds = cu_seqlens.tolist()  # one read from the GPU, which waits for every kernel queued before it
    for start, end in itertools.pairwise(bounds):
        starts_by_length[end - start].append(start)
    for length, starts in starts_by_length.items():
        rows = (torch.tensor(starts, device=q.device)[:, None] + torch.arange(length, device=q.device)).flatten()
        shape = (len(starts), length)  # -> [sequences, heads, length, head_dim] for SDPA
        group_q, group_k, group_v = (x[rows].unflatten(0, shape).transpose(1, 2) for x in (q, k, v))
        attended = F.scaled_dot_product_attention(group_q, group_k, group_v, scale=self.scaling)
        if out is None:
            out = attended.new_empty(q.shape)
        out[rows] = attended.transpose(1, 2).flatten(0, 1)
    return self.proj(out.reshape(tokens, -1))


def vision_attention_modules(model) -> list:
    name = model_family(model.config.model_type).vision_attention
    return [m for m in model.modules() if type(m).__name__ == name]


def batch_vision_attention(model) -> int:
    """Give every vision attention module of a Qwen-VL model the batched forward; returns how many it changed.
    Finding none is an error, not a silent fallback to the slow path: transformers renamed the class."""
    modules = vision_attention_modules(model)
    if not modules:
        name = model_family(model.config.model_type).vision_attention
        raise RuntimeError(f"no {name} module in this {model.config.model_type} model: update MODEL_FAMILIES")
    for module in modules:
        module.forward = types.MethodType(batched_vision_attention_forward, module)
    return len(modules)


# -- The language model's attention without the padding mask --------------------------------------------------------
# Training batches are padded on the right (VQACollator): the pads follow a row's tokens, so causal attention alone
# keeps them from every real token and the model needs no padding mask where an SDPA kernel takes the causal, unmasked
# call. Without the mask the step's attention took 1.8-2.0x less time (flash against the masked memory-efficient
# kernel, Qwen3-VL-8B's shapes on an H200), the step 0.07 s less GPU work, a fold 1.05x less time with the same
# accuracy (experiments/README, "Right-padded, unmasked training measured"). Unmasked, transformers asks SDPA for
# grouped-query attention, which of its fused kernels only flash takes (sm80 and later, 16 bits); a T4 has no flash,
# and its memory-efficient kernel takes the call once the key/value heads are repeated to the query's, as transformers
# repeats them for a masked call: on an H200's memory-efficient kernel 1.40-1.47x faster than the masked call
# (experiments/bench_attention.py; a T4 itself and the whole step on that kernel are not measured yet).
SDPA_KV_REPEATED = "sdpa_kv_repeated"


def sdpa_kv_heads_repeated(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, with the key/value heads repeated to the query's for an unmasked call (a masked
    one, scoring's left-padded batches, goes through as it is: transformers repeats them itself)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if attention_mask is None:
        groups = getattr(module, "num_key_value_groups", 1)
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@functools.cache
def fused_unmasked_attention(device, dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether SDPA has a fused kernel (flash or memory-efficient) that trains a causal, unmasked attention of these
    heads as transformers calls it (grouped-query), as torch itself answers for a query of a few tokens."""
    query = torch.zeros(1, heads, 8, head_dim, device=device, dtype=dtype, requires_grad=True)
    key = torch.zeros(1, kv_heads, 8, head_dim, device=device, dtype=dtype, requires_grad=True)
    sdpa = torch.backends.cuda
    params = sdpa.SDPAParams(query, key, key, None, 0.0, True, True)  # no mask, causal, grouped-query
    return sdpa.can_use_flash_attention(params) or sdpa.can_use_efficient_attention(params)


def unmasked_attention(model) -> str | None:
    """The attention under which `model`'s language model trains without the padding mask on a fused kernel, for its
    device, dtype and heads: "sdpa", transformers' own (flash takes its grouped-query call; a CPU takes any call),
    SDPA_KV_REPEATED (the memory-efficient kernel takes the call with the heads repeated: a T4; fp32), or None (no
    fused kernel would: the mask stays)."""
    weight = model.get_input_embeddings().weight  # where and in what dtype the language model computes
    if weight.device.type != "cuda":
        return "sdpa"
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    if fused_unmasked_attention(weight.device, weight.dtype, heads, kv_heads, head_dim):
        return "sdpa"
    if fused_unmasked_attention(weight.device, weight.dtype, heads, heads, head_dim):
        return SDPA_KV_REPEATED
    return None


def use_unmasked_attention(model) -> str:
    """Give the language model the attention that unmasked_attention names, where it is not transformers' SDPA;
    returns what it runs. The vision encoder keeps its own."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if unmasked_attention(model) == SDPA_KV_REPEATED:
        AttentionInterface.register(SDPA_KV_REPEATED, sdpa_kv_heads_repeated)
        AttentionMaskInterface.register(SDPA_KV_REPEATED, sdpa_mask)  # scoring's masks, as SDPA's
        model.set_attn_implementation({"text_config": SDPA_KV_REPEATED})
    return model.config.get_text_config()._attn_implementation


# -- The language model's norms and rotary embedding fused -------------------------------------------------------------
# In eager PyTorch an RMSNorm is seven passes over the tokens in the forward (to fp32, square, mean, rsqrt, two
# products, back to 16 bits) and more in the backward, and the rotary embedding six more over the queries and keys.
# torch.compile fuses each into one kernel: on Qwen3-VL-8B (micro-batch 16, fp16, one H200) the training step took
# 0.670 s instead of 0.801 (1.18x the samples/s, 0.2 GiB less), with the same losses (experiments/README, peers); on
# Qwen3.5-4B, fed by fit's DataLoader on 4 cores, 0.94x. Compiling costs 10-15 s a process and more for the scoring's
# graphs: with up to 120 steps a process the whole notebook took longer compiled (it repays near 300 on an H200, not
# measured on a T4), so Config.compile_norms is off by default, an option for long folds (experiments/README,
# "Compiled norms over the whole notebook"). Only these are compiled: whole decoder layers traced bitsandbytes'
# dequantization, held more memory and ran slower.
@functools.cache
def compiler_works(device_type: str) -> bool:
    """Whether torch.compile builds kernels on this device (it needs Triton on a GPU, a C compiler on a CPU): a tiny
    RMS normalisation compiled once, forward and backward, as the norms will be. Where it cannot, the reason is printed
    and the model runs eager."""

    def rms_normalised(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    try:
        x = torch.ones(4, 8, device=device_type, requires_grad=True)
        torch.compile(rms_normalised, dynamic=True)(x).sum().backward()
        return True
    except Exception as error:  # torch raises a different class for each missing piece
        print(f"torch.compile does not work here ({type(error).__name__}: {str(error)[:200]}): norms stay eager")
        return False


# transformers' layers look some functions up by name in their modeling module (the rotary embedding, the Gated
# DeltaNet's convolution), shared by every model of the family in the process: replaced there, for all of them.
TRANSFORMERS_FUNCTIONS = {}  # (modeling module, function name): transformers' own function, before it was replaced


def replace_modeling_function(model, name: str, replacement) -> None:
    """Give `model`'s modeling module replacement(transformers' own function `name`), built on the original however
    often it is replaced (each fold's model is loaded again)."""
    modeling = sys.modules[type(model).__module__]
    original = TRANSFORMERS_FUNCTIONS.setdefault((modeling.__name__, name), getattr(modeling, name))
    setattr(modeling, name, replacement(original))


def language_modules(model) -> list:
    """Every module of the language model (and the model's head), none of the vision encoder's."""
    return [m for n, m in model.named_modules() if VISION_ENCODER not in n]


def language_norms(model) -> list:
    """Every RMSNorm of the language model, none of the vision encoder's."""
    return [m for m in language_modules(model) if type(m).__name__.endswith("RMSNorm")]


def compile_norms(model, compiled: bool = True) -> int:
    """Compile every RMSNorm of the language model (not the vision encoder's) and the rotary embedding its attention
    applies, with dynamic shapes, so that a batch of a new length does not recompile; returns how many norms.
    compiled=False puts back transformers' own rotary embedding (replace_modeling_function)."""
    compiled = compiled and compiler_works(input_device(model).type)
    replace_modeling_function(
        model, "apply_rotary_pos_emb", lambda eager: torch.compile(eager, dynamic=True) if compiled else eager
    )
    if not compiled:
        return 0
    # A norm compiles one graph per input rank (hidden states; queries and keys by head), grad mode, whether its input
    # requires grad, device, and for a batch of one: past dynamo's default of 8 graphs a function, the rest would run
    # eager, with a warning. (cache_size_limit: the name all torch 2 releases know; newer ones say recompile_limit.)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    norms = language_norms(model)
    for norm in norms:
        norm.compile(dynamic=True)
    return len(norms)


# Liger's Triton kernels do the same fusion without torch.compile's graphs: each kernel is built once for a shape class
# and cached on disk, so a fold's process pays for it once a machine, not once a process. On Qwen3-VL-8B (fp16,
# micro-batch 16, one H200) they took 27% of the GPU's work and 0.5 GiB out of a step, more than compiling (19%, 0.2
# GiB); over the whole notebook (4 folds of 75 steps) 1.10x, with the same step losses (experiments/README, "Liger's
# kernels over the whole notebook"). Config.liger_kernels, on by default.
#
# At its first rotary call liger-kernel looks for its kernels for other hardware (CuTe DSL, Ascend NPUs) and logs a
# warning for each that is not there; its Triton kernels, the ones used here, are. Should no kernel serve a call,
# liger-kernel raises.
logging.getLogger("liger_kernel.backends.registry").setLevel(logging.ERROR)


def why_no_liger_kernels(model) -> str | None:
    """Why Liger's kernels cannot serve this model, or None where they can."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    # Triton launches on the current GPU, and liger-kernel 0.8.5's rotary kernel does not switch to its input's
    # (Liger-Kernel#1303): a layer on another GPU would fail or compute wrong. Not measured across GPUs either.
    devices = weight_devices(model)
    if len(devices) > 1:
        return f"the model is spread over {len(devices)} devices"
    (device,) = devices
    if device.type != "cuda":
        return "not on a GPU"
    if device.index != torch.cuda.current_device():
        return f"the model is on cuda:{device.index}, not the current GPU (torch.cuda.set_device({device.index}) first)"
    if not liger_kernels_work(model):
        return "they failed their check on this GPU"
    return None


def liger_kernels_work(model) -> bool:
    """Whether Liger's kernels build and compute right here, before they are bound: Triton supports GPUs of Compute
    Capability 8.0 and later (a T4 is 7.5), and builds a kernel at its first call. A copy of one of the model's
    RMSNorms and SwiGLU MLPs, and its rotary embedding, run forward and backward on two rows of its widths with Liger's
    kernels and must agree with transformers' within 1%. Where they do not, the reason is printed."""
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    modeling = sys.modules[type(model).__module__]
    norm = language_norms(model)[0]
    dtype = model.get_input_embeddings().weight.dtype  # the residual stream's, which the norms and MLPs take in
    randn = functools.partial(torch.randn, dtype=dtype, device=norm.weight.device)
    try:
        copied = bind_liger_norm(copy.deepcopy(norm), model.config.model_type)
        checks = [("RMSNorm", norm, copied, [randn(2, norm.weight.numel())])]
        for mlp in swiglu_mlps(model)[:1]:
            copied = bind_liger_swiglu(copy.deepcopy(mlp))
            checks.append(("SwiGLU MLP", mlp, copied, [randn(2, mlp.gate_proj.in_features)]))
        if liger_rotary(model):
            text = model.config.get_text_config()
            head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
            angles = randn(1, 2, head_dim // 2).repeat(1, 1, 2)  # both halves of a head turn by the same angles
            rotary_inputs = [randn(1, 2, 2, head_dim), randn(1, 2, 2, head_dim), angles.cos(), angles.sin()]
            eager = TRANSFORMERS_FUNCTIONS.get(
                (modeling.__name__, "apply_rotary_pos_emb"), modeling.apply_rotary_pos_emb
            )
            checks.append(("rotary embedding", eager, liger_rotary_pos_emb, rotary_inputs))
        for name, eager, liger, inputs in checks:
            got, expected = outputs_and_input_grads(liger, inputs), outputs_and_input_grads(eager, inputs)
            error = max(((g - e).norm() / e.norm()).item() for g, e in zip(got, expected, strict=True))
            if not error < 0.01:  # a NaN fails too
                print(f"liger_kernels: Liger's {name} differs from transformers' here by {error:.1%}")
                return False
    except Exception as error:  # Triton raises a different class for each thing it cannot build
        print(f"liger_kernels: Liger's kernels do not run here ({type(error).__name__}: {str(error)[:200]})")
        return False
    return True


def outputs_and_input_grads(function, inputs: list) -> list:
    """`function`'s outputs and the gradients of the first two of its inputs (those that a layer gives it; cos and sin
    are constants), for the sum of its outputs, in fp32. The inputs are passed as copies: Liger's kernels may write
    into them."""
    leaves = [t.detach().clone().requires_grad_(i < 2) for i, t in enumerate(inputs)]
    outputs = function(*[t.clone() for t in leaves])
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
    return [o.detach().float() for o in outputs] + [t.grad.float() for t in leaves if t.requires_grad]


def bind_liger_norm(norm, family: str):
    """Liger's RMSNorm kernel in `norm`, with the family's arithmetic; returns `norm`."""
    from liger_kernel.transformers.monkey_patch import _patch_rms_norm_module

    if family.startswith("qwen3_5"):  # scaled by 1 + weight, computed in fp32: Liger's "gemma" casting
        _patch_rms_norm_module(norm, offset=1.0, casting_mode="gemma", in_place=False)
    else:
        _patch_rms_norm_module(norm, casting_mode="llama")
    return norm


def bind_liger_swiglu(mlp):
    """Liger's SwiGLU kernel in `mlp` (its gate and up projections as they are); returns `mlp`."""
    from liger_kernel.transformers.monkey_patch import _patch_swiglu_module
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    _patch_swiglu_module(mlp, LigerSwiGLUMLP)
    return mlp


def swiglu_mlps(model) -> list:
    """The language model's dense MLPs with a SwiGLU (MoE experts are fused tensors, not these)."""
    silu = model.config.get_text_config().hidden_act in ("silu", "swish")
    return [m for m in language_modules(model) if silu and hasattr(m, "gate_proj") and hasattr(m, "up_proj")]


def liger_rotary(model) -> bool:
    """Whether the family applies the plain rotary embedding that Liger's kernel computes (Qwen3-VL; Qwen3.5's partial
    and Qwen2.5-VL's multimodal ones are transformers' own)."""
    return model.config.model_type in ("qwen3_vl", "qwen3_vl_moe")


def use_liger_kernels(model) -> str:
    """Liger's kernels bound to the language model (not the vision encoder), module by module as liger-kernel's own
    apply_liger_kernel_to_<family> binds them: every RMSNorm (Qwen3.5's scaled by 1 + weight, in fp32), the rotary
    embedding where the family applies the plain one, and the SwiGLU of the dense MLPs. Not through those functions:
    liger-kernel 0.8.5's import output classes that transformers 5.24 renamed. Says what it bound."""
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    norms = [bind_liger_norm(norm, model.config.model_type) for norm in language_norms(model)]
    mlps = [bind_liger_swiglu(mlp) for mlp in swiglu_mlps(model)]
    rotary = liger_rotary(model)
    if rotary:  # a later load puts transformers' own back (compile_norms)
        replace_modeling_function(model, "apply_rotary_pos_emb", lambda eager: liger_rotary_pos_emb)
    return f"Liger's kernels: {len(norms)} RMSNorms, {len(mlps)} SwiGLU MLPs" + (
        ", the rotary embedding" if rotary else ""
    )


# -- Layer inputs offloaded to the CPU on a stream of their own --------------------------------------------------------
# Checkpointing keeps one tensor per decoder layer for the backward: its input (Qwen3-VL-8B at micro-batch 16: 36 x
# 42 MB). Config.offload_activations keeps those in pinned CPU memory instead, as Unsloth does. torch's save_on_cpu
# (transformers' offload=True) copies them on the stream that computes, which waits for every copy: 1.17x the step of
# Qwen3-VL-8B in bf16 on an H200. Like Unsloth (unsloth_zoo/gradient_checkpointing.py), this copies on a second CUDA
# stream: the forward computes on while an input goes out, and in the backward the input of the layer before is fetched
# while this one recomputes: on Qwen3-VL-8B the same memory at 1.08-1.09x save_on_cpu's speed, 0.96-0.97x the speed
# without offloading; its prototype trained 1.03x Unsloth's samples/s at its memory (experiments/README, side stream).
@dataclass(eq=False, slots=True, weakref_slot=True)
class OffloadedInput:
    host: torch.Tensor  # the layer input, in pinned CPU memory
    device: torch.device
    previous: weakref.ref | None  # to the input saved before it in the forward
    on_gpu: torch.Tensor | None = None  # fetched back for the backward, or being fetched
    used: bool = False


class OffloadedCheckpointing:
    """The checkpointing function of every decoder layer (see above); `install(model)` puts it in place of the one
    transformers set. The chain of inputs is held by autograd, here only weakly: a forward cut short by an error
    leaves nothing behind."""

    def __init__(self, use_reentrant: bool):
        self.use_reentrant = use_reentrant
        self.streams = {}  # one side stream per GPU: a model split over two GPUs copies on each
        self.last = None  # weak reference to the last input saved in this forward: the one before the next

    def install(self, model) -> int:
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
        for layer in layers:
            layer._gradient_checkpointing_func = self.checkpoint
        return len(layers)

    def checkpoint(self, function, *args):
        # A layer whose input needs no gradient (the frozen vision encoder's) keeps nothing for a backward.
        if not any(torch.is_tensor(a) and a.requires_grad for a in args):
            return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=self.use_reentrant)
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=self.use_reentrant)

    def side_stream(self, device: torch.device):
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]

    def pack(self, tensor: torch.Tensor) -> OffloadedInput:
        side = self.side_stream(tensor.device)
        side.wait_stream(torch.cuda.current_stream(tensor.device))  # the copy starts once the input is computed
        with torch.cuda.stream(side):
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(side)  # its GPU memory is not reused before the copy has read it
        saved = OffloadedInput(host, tensor.device, self.last)
        self.last = weakref.ref(saved)
        return saved

    def fetch(self, saved: OffloadedInput) -> None:
        with torch.cuda.stream(self.side_stream(saved.device)):
            saved.on_gpu = saved.host.to(saved.device, non_blocking=True)

    def unpack(self, saved: OffloadedInput) -> torch.Tensor:
        self.last = None  # the backward has begun: the next forward starts a new chain
        if saved.on_gpu is None:  # the last layer's input, or one whose fetch was not started ahead
            self.fetch(saved)
        compute = torch.cuda.current_stream(saved.device)
        compute.wait_stream(self.side_stream(saved.device))
        tensor, saved.on_gpu, saved.used = saved.on_gpu, None, True
        tensor.record_stream(compute)  # allocated on the side stream, used on this one
        previous = saved.previous and saved.previous()
        if previous is not None and previous.on_gpu is None and not previous.used:
            self.fetch(previous)  # while this layer recomputes
        return tensor


# Which projections get adapters by default (GPU_DEFAULTS' lora_targets): q/k/v/o_proj of the attention layers and, in
# Qwen3.5, in_proj_qkv, in_proj_z and out_proj of the Gated DeltaNet layers (their query-key-value, output-gate and
# output projections; the other families have no such modules). With q/k/v/o alone LoRA would reach only the 8
# full-attention layers of Qwen3.5-9B's 32: the 24 DeltaNet layers, three quarters of the token mixing, would not adapt
# at all. It is cheap: at r=8 on Qwen3.5-9B (transformers' default Qwen3_5TextConfig) the DeltaNet adapters add 5.5 M
# parameters to attention's 2.0 M, about 90 MB more in fp32 with their gradients and AdamW state, and little compute
# (two rank-8 matrices beside each 4096-wide projection). Axolotl's Qwen3.5 examples add exactly these three
# (examples/qwen3.5/README.md, "Gated DeltaNet Linear Attention"); ms-swift's default, all-linear, adapts every linear
# layer. Left out: in_proj_a and in_proj_b, whose outputs, one per value head (32 in 9B), set each head's state decay
# and write strength: a rank-8 adapter there has a quarter of the rank of the small matrix it adapts.
def lora_target_regex(targets: tuple[str, ...]) -> str:
    """Only the language model's attention, DeltaNet (Qwen3.5's linear_attn) and MLP projections: the vision tower
    shares names such as gate_proj in Qwen2.5-VL, and an MoE's 4-bit experts hold modules named
    mlp.experts.parametrizations.down_proj."""
    return rf".*language_model.*\.(self_attn|linear_attn|mlp)\.({'|'.join(targets)})$"


def attach_lora(base_model, cfg: Config):
    """A fresh LoRA adapter on the base model (one per fold, so folds never share trained weights)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_target_regex(cfg.lora_targets),
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(cfg.seed)  # the same fold starts from the same adapter on a re-run
    return get_peft_model(base_model, config)


def load_adapter(base_model, adapter_dir: str | os.PathLike):
    """The base model with a fold's saved adapter, ready for inference."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=False)


def detach_lora(peft_model):
    """The base model with the adapter removed (not merged), and the memory it used released."""
    base = peft_model.unload()
    release_memory()
    return base


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- Mixture-of-experts weights in 4 bits (Qwen3-VL-30B-A3B) -------------------------------------------------------
# BitsAndBytesConfig(load_in_4bit=True) swaps nn.Linear for bitsandbytes' Linear4bit, but Qwen3-VL-MoE keeps each
# layer's experts as two fused 3-D nn.Parameters (mlp.experts.gate_up_proj and mlp.experts.down_proj), which it leaves
# in 16 bits: 1.125 GiB a layer at 128 experts, 54 GiB for 48 layers, against Kaggle's 2 x 15 GiB of T4. bitsandbytes
# can keep any parameter in NF4 behind a torch parametrization (bnb.nn.parametrize: the module reads the tensor
# dequantized on access), 0.28 GiB a layer.
#
# transformers 5 already loads one tensor at a time: it reads a checkpoint tensor, converts it (qwen3_vl_moe's experts
# are transposed from the Hub's [experts, hidden, 2 x width] layout), hands it to its quantizer's quantize op on the
# device the device map gives it, and only then reads the next. So the MoE loader is transformers' own bitsandbytes
# 4-bit quantizer, registered under a method name of its own (transformers' mapping for custom quantizers), that
#   - also claims the expert tensors, so device_map="auto" budgets them at 4 bits and the loader passes them to it;
#   - stores each with bnb's replace_parameter_4bit as it arrives (nn.Linear still goes to transformers' Linear4bit op),
#     so no more than one 16-bit expert tensor is ever held, on the GPU or in host memory;
#   - rebuilds them from a folder written by save_quantized_base (bnb's replace_parameter_4bit_prequantized).
# Qwen3.5-MoE (and Qwen3.6-35B-A3B) checkpoints store each expert's gate/up/down_proj apart; transformers fuses them
# into the same two tensors (mlp.experts.gate_up_proj, down_proj) before the quantize op sees them, so the same loader
# holds at most one layer's experts in 16 bits. Its shared expert is a plain MLP (nn.Linear, Linear4bit on a GPU).
# This much is hand-rolled because neither library does it: transformers' bitsandbytes quantizer only knows Linear4bit
# (it has no option for other parameters), and bitsandbytes' parametrization comes without a loader.
#
# LoRA stays on attention (lora_targets), not on the 4-bit experts: PEFT 0.21's target_parameters adds its adapter as
# a second parametrization on top of bnb's, and on a parameter that is already parametrized it breaks (tried on CPU):
# its fp32 path never removes the adapter after a forward pass (one more adapter stacks up every pass, with PEFT's
# warning "Could not find any LoRA parametrization"), and with both gate_up_proj and down_proj targeted, down_proj's
# adapter gets no gradient. Its 16-bit path would also build a dense 16-bit delta of every expert tensor each pass.
MOE_QUANT_METHOD = "bitsandbytes_moe_4bit"
_EXPERT_TENSORS = tuple(dict.fromkeys(name for f in MODEL_FAMILIES.values() for name in f.expert_tensors))


def is_expert_tensor(name: str) -> bool:
    """A fused expert tensor of an MoE decoder layer ([experts, out, in]), by its parameter name."""
    return name.endswith(tuple(f".{tensor}" for tensor in _EXPERT_TENSORS))


def _checkpoint_config(model_path: str) -> dict:
    from transformers import PretrainedConfig

    return PretrainedConfig.get_config_dict(model_path)[0]


def moe_load_kwargs(model_path: str, kwargs: dict, quantize_linears: bool, skip_modules: list | None = None) -> dict:
    """from_pretrained's kwargs for a Qwen3-VL-MoE checkpoint: the dense path's, with the MoE loader's quantization
    config instead of BitsAndBytesConfig; with none for a folder save_quantized_base wrote, whose config.json has it
    (transformers then rebuilds the 4-bit tensors instead of quantizing; a quantization_config passed, even None,
    would replace the saved one). quantize_linears: nn.Linear in 4 bits too, as on a GPU."""
    config_class = register_moe_quantizer()
    kwargs = {key: value for key, value in kwargs.items() if key != "quantization_config"}
    if "quantization_config" not in _checkpoint_config(model_path):
        # The dense path's settings. Linear4bit needs a GPU; on CPU nn.Linear stays fp32 as in the dense path.
        kwargs["quantization_config"] = config_class(
            quantize_linears=quantize_linears,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"],
            llm_int8_skip_modules=skip_modules,
        )
    return kwargs


def register_moe_quantizer():
    """Make MOE_QUANT_METHOD known to transformers (once per process); returns its config class."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    if MOE_QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        config_class, quantizer_class = _moe_quantizer_classes()
        register_quantization_config(MOE_QUANT_METHOD)(config_class)
        register_quantizer(MOE_QUANT_METHOD)(quantizer_class)
    return AUTO_QUANTIZATION_CONFIG_MAPPING[MOE_QUANT_METHOD]


def _moe_quantizer_classes():
    """The MoE loader's config and quantizer classes, defined here because their bases live in transformers and
    bitsandbytes, whose import helpers defers (it takes seconds)."""
    import bitsandbytes.nn.parametrize as bnb_parametrize
    from transformers import BitsAndBytesConfig
    from transformers.core_model_loading import ConversionOps
    from transformers.integrations.bitsandbytes import Bnb4bitDeserialize, Bnb4bitQuantize
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    # The flags that make transformers read a saved config as plain bitsandbytes (and skip this quantizer).
    bnb_flags = ("load_in_4bit", "load_in_8bit", "_load_in_4bit", "_load_in_8bit")

    class MoeBnb4BitConfig(BitsAndBytesConfig):
        """BitsAndBytesConfig in 4 bits under MOE_QUANT_METHOD; quantize_linears=False leaves nn.Linear as it is."""

        def __init__(self, quantize_linears: bool = True, **kwargs):
            for key in ("quant_method", *bnb_flags):  # present when read back from a config.json
                kwargs.pop(key, None)
            super().__init__(load_in_4bit=True, **kwargs)
            self.quant_method = MOE_QUANT_METHOD
            self.quantize_linears = quantize_linears

        def to_dict(self) -> dict:
            return {key: value for key, value in super().to_dict().items() if key not in bnb_flags}

    def place_expert(model, name: str, data: torch.Tensor):
        """Set expert parameter `name` (a meta placeholder until now) to `data`; returns its module and attribute."""
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, attr, torch.nn.Parameter(data, requires_grad=False))
        module._is_hf_initialized = True  # or transformers' weight init would overwrite it after loading
        return module, attr

    class QuantizeOp(ConversionOps):
        """Expert tensors: to NF4 as each arrives; everything else (nn.Linear weights): transformers' Linear4bit op."""

        def __init__(self, hf_quantizer):
            self.hf_quantizer = hf_quantizer
            self.linear_op = Bnb4bitQuantize(hf_quantizer)

        def convert(self, input_dict, model=None, missing_keys=None, **kwargs):
            if not any(map(is_expert_tensor, input_dict)):
                return self.linear_op.convert(input_dict, model=model, **kwargs)
            config = self.hf_quantizer.quantization_config
            for name, value in input_dict.items():
                module, attr = place_expert(model, name, value[0] if isinstance(value, list) else value)
                bnb_parametrize.replace_parameter_4bit(
                    module,
                    attr,
                    compress_statistics=config.bnb_4bit_use_double_quant,
                    quant_type=config.bnb_4bit_quant_type,
                )
                missing_keys.discard(name)  # placed here, so nothing is returned for the loader to place
            return {}

    class DeserializeOp(ConversionOps):
        """Expert tensors: the NF4 data and statistics of a saved base back into a parametrization; everything else:
        transformers' Linear4bit op."""

        def __init__(self, hf_quantizer):
            self.hf_quantizer = hf_quantizer  # its presence also stops the loader casting the statistics to `dtype`
            self.linear_op = Bnb4bitDeserialize(hf_quantizer)

        def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
            if not is_expert_tensor(full_layer_name):
                return self.linear_op.convert(input_dict, model=model, full_layer_name=full_layer_name, **kwargs)
            tensors = {key: value[0] if isinstance(value, list) else value for key, value in input_dict.items()}
            data = tensors.pop(next(key for key in tensors if full_layer_name.endswith(key)))
            module, attr = place_expert(model, full_layer_name, data)
            bnb_parametrize.replace_parameter_4bit_prequantized(module, attr, tensors, data.device)
            missing_keys.discard(full_layer_name)
            return {}

    class MoeBnb4BitQuantizer(Bnb4BitHfQuantizer):
        """transformers' bitsandbytes 4-bit quantizer that also stores the fused expert tensors in NF4."""

        # The names a quantized expert is saved under (bnb's parametrization writes them like Linear4bit's weight)
        serialized_names = {
            **Bnb4BitHfQuantizer.serialized_names,
            **{
                tensor: [name.replace("weight", tensor, 1) for name in Bnb4BitHfQuantizer.serialized_names["weight"]]
                for tensor in _EXPERT_TENSORS
            },
        }

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            return is_expert_tensor(param_name) or super().param_needs_quantization(model, param_name, **kwargs)

        def _process_model_before_weight_loading(self, model, device_map, **kwargs):
            if self.quantization_config.quantize_linears:  # nn.Linear -> Linear4bit
                super()._process_model_before_weight_loading(model, device_map, **kwargs)

        def update_weight_conversions(self, weight_conversions, model):
            if self.pre_quantized:  # a saved base holds packed experts in the model's own layout: nothing to transpose
                experts = set(_EXPERT_TENSORS)
                weight_conversions = [c for c in weight_conversions if not set(c.target_patterns) & experts]
            return super().update_weight_conversions(weight_conversions, model)

        def get_quantize_ops(self):
            return QuantizeOp(self)

        def get_load_operations(self) -> dict:
            return {"deserialize": DeserializeOp}

    return MoeBnb4BitConfig, MoeBnb4BitQuantizer


def save_quantized_base(model, processor, out_dir: str | os.PathLike) -> Path:
    """Save a base model loaded by load_model_and_processor in 4 bits, so that later sessions load `out_dir` (as
    cfg.model_id) without reading and quantizing the 16-bit checkpoint again.

    Saved: config.json with the quantization config, the generation config, the processor, and safetensors shards with
    every tensor as the model holds it: the packed NF4 data and statistics (absmax, quant_map, ...) of the expert
    tensors and, on a GPU, of every Linear4bit weight; the rest (router, norms, embeddings, lm_head; on CPU the
    nn.Linear weights too) in the load dtype. Tensors keep transformers' in-memory names and layout
    (save_original_format=False), so the folder loads only through transformers with this module's quantizer
    registered, as load_model_and_processor does. Not saved: LoRA adapters (save_adapter), training state.
    Pass the base model, not a PEFT model.
    """
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, save_original_format=False)
    processor.save_pretrained(out_dir)
    return out_dir


def expert_storage(model) -> dict:
    """Bytes of the fused expert tensors as stored (4-bit data and statistics, or plain tensors) and in 16 bits."""
    from torch.nn.utils import parametrize

    stored = fp16 = layers = 0
    for name, module in model.named_modules():
        if not name.endswith(".mlp.experts"):
            continue
        layers += 1
        for attr in ("gate_up_proj", "down_proj"):
            if parametrize.is_parametrized(module, attr):
                quant_state = module.parametrizations[attr][0].quant_state
                statistics = quant_state.as_dict(packed=True).values()
                stored += module.parametrizations[attr].original.nbytes + sum(t.nbytes for t in statistics)
                fp16 += 2 * quant_state.shape.numel()
            else:
                stored += getattr(module, attr).nbytes
                fp16 += 2 * getattr(module, attr).numel()
    return {"layers": layers, "stored_bytes": stored, "fp16_bytes": fp16}


# ---------------------------------------------------------------------------------------------------------------------
# 8. Training
# ---------------------------------------------------------------------------------------------------------------------


def model_inputs(batch: dict, device: torch.device) -> dict:
    """Tensors the model's forward takes, on its input device (labels and row indices are ours)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k not in ("labels", "index")}


def padding_mask_needed(model) -> bool:
    """Whether a right-padded training batch must give `model` its padding mask: unless its language model runs the
    attention that unmasked_attention names for its device, dtype and heads (set when it was loaded)."""
    return model.config.get_text_config()._attn_implementation != unmasked_attention(model)


def transformers_model(model):
    """The transformers model (a Qwen ...ForConditionalGeneration) under PEFT's wrapper, or `model` if unwrapped."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def rope_positions(model, batch: dict, masked: bool) -> torch.Tensor:
    """The batch's multimodal rotary positions, from the model's own get_rope_index, computed while the batch is still
    on the CPU: left to the model, on the GPU, they would make it wait for the GPU several times a row (it reads each
    row's token types and each image's grid: experiments/count_syncs.py). The same call as the model's forward makes,
    with the padding mask where the model gets it."""
    positions, _ = transformers_model(model).model.get_rope_index(
        input_ids=batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"] if masked else None,
    )
    return positions


def forward_inputs(model, batch: dict, masked: bool) -> dict:
    """What training and scoring give the model's forward: model_inputs, the rotary positions computed on the CPU
    (rope_positions), and the padding mask only if `masked`."""
    device = input_device(model)
    inputs = model_inputs(batch, device)
    inputs["position_ids"] = rope_positions(model, batch, masked).to(device, non_blocking=True)
    if not masked:
        del inputs["attention_mask"]
    return inputs


def answer_loss_sum(model, batch: dict) -> torch.Tensor:
    """Summed cross-entropy over the labelled answer tokens of a right-padded batch (VQACollator).

    Logits are computed only at the positions that predict a label: with a vocabulary of 150k, full-sequence logits
    would cost more memory than the rest of the step. So the language model's hidden states are taken from the
    model's inner `model` and only those positions go through `lm_head`. The padding mask goes to the model only where
    padding_mask_needed says so: causal attention already hides the pads that follow a row from its real tokens.
    """
    labels = batch["labels"]
    rows, positions = (labels[:, 1:] != -100).nonzero(as_tuple=True)  # position t predicts token t + 1
    vlm = transformers_model(model)
    hidden = vlm.model(**forward_inputs(model, batch, padding_mask_needed(model))).last_hidden_state
    logits = vlm.lm_head(hidden[rows.to(hidden.device), positions.to(hidden.device)])
    targets = labels[rows, positions + 1].to(logits.device)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


class NonFiniteLossError(RuntimeError):
    pass


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory, as torch raises it or as cuBLAS/cuDNN report a failed allocation of their workspace.
    The one test of it for training, inference and the benchmarks."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and any(
        sign in message for sign in ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_NOT_ALLOCATED", "CUDA out of memory")
    )


def out_of_memory_at_one(cfg: Config, where: str) -> RuntimeError:
    """The error for an out-of-memory that halving cannot fix any more: it names the level to step down to, or at
    `safe` what is left to lower."""
    if cfg.profile == "safe":
        step_down = "lower image_size (320, 256) or take a smaller model_id in the Config cell"
    else:
        step_down = f"set the Config cell's profile to {NEXT_LOWER_LEVEL.get(cfg.profile, 'safe')!r}"
    return RuntimeError(f"out of memory {where} (image_size {cfg.image_size}): {step_down}")


def halve_on_out_of_memory(attempt, size: int, cfg: Config, where: str, what: str, clean_up=None) -> tuple:
    """`attempt(size)`, tried again at half the size after each out-of-memory (is_out_of_memory), down to 1, where
    it raises the error that names the level to step down to. Returns the result and the size that worked, which the
    caller keeps for the batches after. The one out-of-memory policy of training, inference and the benchmarks.

    `clean_up` (release_memory if None) runs after the failed attempt's exception is gone: until then the frames it
    holds keep the attempt's tensors alive."""
    while True:
        try:
            return attempt(size), size
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
        (clean_up or release_memory)()
        if size == 1:
            raise out_of_memory_at_one(cfg, f"{where} at {what} 1")
        size //= 2
        tqdm.write(f"out of memory {where}: {what} now {size}")


def accumulate_gradients(model, batch: dict, micro_batch: int, scaler, autocast) -> float:
    """Forward and backward over one optimizer step's batch in micro-batches; returns the mean token loss.

    Each micro-batch's loss is divided by the step's total label count, so the gradient equals the full batch's
    whatever the micro-batch size (which halves itself on out-of-memory).
    """
    n_tokens = int((batch["labels"] != -100).sum())
    total = 0.0
    for chunk in split_batch(batch, micro_batch):
        with autocast():
            loss = answer_loss_sum(model, chunk)
        scaler.scale(loss / n_tokens).backward()
        total += loss.item()
        del loss
    return total / n_tokens


def optimizer_step(optimizer, scaler, params: list, max_grad_norm: float) -> float:
    """Unscale, clip and step; returns the gradient norm. A non-finite gradient skips the step in every precision, so
    it never reaches the weights: in fp16 it is the GradScaler's overflow (the scaler then lowers its scale), in bf16
    or fp32 nothing else would stop it (a bf16 run of Qwen3-VL-2B stepped on a NaN gradient at step 24, from cuDNN's
    attention backward, and trained on NaN weights from then on). The caller zeroes the gradients."""
    scaler.unscale_(optimizer)
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    if math.isfinite(norm):
        scaler.step(optimizer)
    scaler.update()
    return norm


def autocast_context(device: torch.device, dtype: torch.dtype):
    return lambda: torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")


def checkpoint_paths(fold_dir: Path) -> list[Path]:
    return sorted(fold_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def check_finite(tensors: dict, destination: Path) -> None:
    """Refuse to write non-finite weights: a checkpoint or adapter holding a NaN would poison every run that loads it.
    optimizer_step keeps them out; this is the last line of defence."""
    bad = [name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise FloatingPointError(f"not writing {destination}: non-finite values in {_preview(bad)}")


def save_checkpoint(fold_dir: Path, state: dict, model, keep: int = 2) -> None:
    """Adapter, optimizer, scheduler, scaler, RNG and position, written to a temp folder and renamed (atomic)."""
    final = fold_dir / f"checkpoint-{state['global_step']}"
    tmp = fold_dir / f".tmp-checkpoint-{state['global_step']}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable = {k: v.detach().cpu() for k, v in model.named_parameters() if v.requires_grad}
    check_finite(trainable, final)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({**state, "trainable": trainable, "rng": rng}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in checkpoint_paths(fold_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def newest_readable_checkpoint(fold_dir: Path) -> dict | None:
    """The state of the newest checkpoint that can be read, or None.

    A checkpoint that cannot be read (truncated by a full disk or a killed session) is renamed
    unreadable-checkpoint-<step> with a warning, and the one before it is tried (save_checkpoint keeps two). Renamed,
    it no longer counts as the newest, so the checkpoints written after it are kept and pruned as usual.
    """
    for path in reversed(checkpoint_paths(fold_dir)):
        try:
            return torch.load(path / "state.pt", weights_only=False)
        except Exception as error:  # torch raises RuntimeError, EOFError or UnpicklingError on a damaged file
            aside = path.with_name(f"unreadable-{path.name}")
            shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
            print(
                f"warning: {path / 'state.pt'} is unreadable ({error}); moved to {aside}, resuming from the "
                "checkpoint before it (or from the start if there is none)"
            )
    return None


def load_checkpoint(fold_dir: Path, model) -> dict | None:
    """The newest readable checkpoint's state with the adapter weights and RNG restored, or None."""
    state = newest_readable_checkpoint(fold_dir)
    if state is None:
        return None
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.pop("trainable").items():
            params[name].copy_(value)
    rng = state.pop("rng")
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def memory_report() -> str:
    """Allocated / peak / total GPU memory per device, or the process's resident memory on CPU."""
    if not torch.cuda.is_available():
        import psutil

        return f"CPU only; process resident memory {psutil.Process().memory_info().rss / 2**30:.2f} GiB"
    lines = []
    for i in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(i).total_memory
        allocated, peak = torch.cuda.memory_allocated(i), torch.cuda.max_memory_allocated(i)
        lines.append(
            f"cuda:{i}: {allocated / 2**30:.2f} GiB allocated, {peak / 2**30:.2f} peak, {total / 2**30:.1f} total"
        )
    return "\n".join(lines)


def memory_summary() -> str:
    return " ".join(f"{torch.cuda.max_memory_allocated(i) / 2**30:.1f}G" for i in range(torch.cuda.device_count()))


# -- The session clock ------------------------------------------------------------------------------------------------
# Whatever is not written when a Kaggle session ends is lost, so a run that does not fit its time must stop training
# early enough to score and submit with the folds it has. The clock starts when helpers is first imported in the
# session (the setup cell); the processes that train folds side by side inherit that start through the environment.
SESSION_START = float(os.environ.setdefault("VQA_SESSION_START", str(time.time())))

ESTIMATE_AFTER_STEPS = 5  # the first steps warm up (kernels, allocator): the whole-run estimate waits for a few

# What this process has measured so far, for the time estimates: samples trained and rows scored, and their seconds.
MEASURED = {"train_samples": 0, "train_seconds": 0.0, "score_rows": 0, "score_seconds": 0.0}


def now() -> float:
    """The one clock of the run's timing (tests replace it)."""
    return time.time()


@dataclass
class TimeBudget:
    """When training must stop so that scoring the folds started so far, and the submission, still fit."""

    cfg: Config
    rows_per_member: int  # rows a fold model scores: test rows per rotation, validation rows per rotation but the
    # first (its last validation pass scored them: VAL_SCORES), and the prior's
    val_rows: int  # rows validated at the end of each epoch
    members: int = 0  # folds started so far: each is scored after training
    folds_left: int = 0  # folds still to train, the current one included (for the whole-run estimate)
    reported: bool = False  # the whole-run estimate is printed once, after the first steps

    @classmethod
    def for_run(cls, cfg: Config, folds: pd.DataFrame, test: pd.DataFrame) -> TimeBudget:
        val_rows = math.ceil(len(folds) / cfg.n_folds)
        rows = val_rows * (cfg.tta_rotations - 1) + len(test) * cfg.tta_rotations + 4 * cfg.debias_samples
        return cls(cfg, rows, val_rows)

    def seconds_left(self) -> float:
        return SESSION_START + self.cfg.time_budget_hours * 3600 - now()

    def seconds(self, samples: int = 0, rows: int = 0) -> float:
        """Estimated time to train `samples` and score `rows` at the rates measured so far (0 before any)."""
        train_rate = MEASURED["train_samples"] / MEASURED["train_seconds"] if MEASURED["train_seconds"] else math.inf
        # Scoring a row took 0.4 of a training sample in the rehearsal: 0.5 stands in until scoring has been timed.
        score_rate = MEASURED["score_rows"] / MEASURED["score_seconds"] if MEASURED["score_seconds"] else 2 * train_rate
        return samples / train_rate + rows / score_rate

    def scoring_reserve(self) -> float:
        return self.seconds(rows=self.members * self.rows_per_member)

    def can_train(self, samples: int) -> bool:
        """Whether `samples` more training samples and a validation pass fit before the scoring reserve."""
        return self.seconds_left() - self.scoring_reserve() >= self.seconds(samples=samples, rows=self.val_rows)

    def report_once(self, steps_done: int, steps_in_epoch: int, fold_samples: int) -> None:
        """After the first few steps (warm-up), once: the whole run's estimate from the rates measured so far."""
        if self.reported or steps_done < min(ESTIMATE_AFTER_STEPS, steps_in_epoch):
            return
        self.reported = True
        folds = self.folds_left
        training = self.seconds(samples=fold_samples * folds, rows=self.val_rows * self.cfg.epochs * folds)
        scoring = self.seconds(rows=(self.members + folds - 1) * self.rows_per_member)
        left = self.seconds_left()
        estimate = f"time estimate: {folds} fold(s) to train {training / 3600:.1f} h + scoring {scoring / 3600:.1f} h"
        if math.isinf(left):
            tqdm.write(f"{estimate}; no time budget (time_budget_hours=inf)")
            return
        verdict = "it fits" if training + scoring <= left else "it does not fit: training stops in time to score"
        tqdm.write(f"{estimate}; {left / 3600:.1f} h left of time_budget_hours={self.cfg.time_budget_hours}: {verdict}")


@dataclass
class TrainState:
    """Where a fold's training stands; saved in every checkpoint, so a resumed run goes on exactly from here."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    micro_batch: int = 1
    history: list = dataclasses.field(default_factory=list)  # validation metrics per epoch
    losses: list = dataclasses.field(default_factory=list)  # training loss per optimizer step (None: non-finite)
    stopped_early: bool = False  # no better validation accuracy for cfg.early_stopping_patience epochs
    stopped_for_time: bool = False  # the time budget left only enough to score and submit
    best_accuracy: float = -1.0
    best_loss: float = float("inf")
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient (fp16 overflows included)
    nonfinite_steps: list = dataclasses.field(default_factory=list)  # the skips the GradScaler does not explain
    # (record_nonfinite; at most 20)
    train_seconds: float = 0.0
    data_wait_seconds: float = 0.0  # of train_seconds, waiting for the DataLoader: input-bound if large
    val_seconds: float = 0.0  # scoring the validation rows after each epoch (not in train_seconds)


def record_nonfinite(state: TrainState, model, batch: dict, ids: pd.Series, loss: float, grad_norm: float) -> None:
    """Keep what it takes to find the cause of a non-finite step: the rows, their lengths (padding), and where in the
    model the gradient went bad (backward runs from the output down, so the last bad parameter in forward order is
    the nearest to where it started)."""
    if len(state.nonfinite_steps) >= 20:
        return
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    state.nonfinite_steps.append(
        {
            "step": state.global_step,
            "ids": ids.iloc[batch["index"].tolist()].tolist(),
            "tokens_per_row": batch["attention_mask"].sum(1).tolist(),
            "loss": loss,
            "grad_norm": grad_norm,
            "nonfinite_grad_count": len(bad),
            "last_nonfinite_grads": bad[-3:],
        }
    )


class Tracker:
    """A fold's curves in TensorBoard or Weights & Biases (cfg.report_to), through their own APIs; does nothing when
    report_to is None. Neither library is a dependency: it is imported only when asked for."""

    def __init__(self, cfg: Config, fold: int):
        self.writer = self.run = None
        if cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.writer = SummaryWriter(str(cfg.out / "tensorboard" / f"fold{fold}"))
        elif cfg.report_to == "wandb":
            import wandb

            config = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}
            self.run = wandb.init(project="qwen-vqa", name=f"fold{fold}", group=str(cfg.out), config=config)

    def log(self, step: int, metrics: dict) -> None:
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, step)
        if self.run is not None:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()


def epochs_without_improvement(history: list[dict]) -> int:
    """Epochs since the best validation accuracy (ties: the earliest is the best, as fit keeps it)."""
    accuracies = [h["val_acc"] for h in history]
    return len(accuracies) - 1 - accuracies.index(max(accuracies)) if accuracies else 0


@dataclass
class FoldRun:
    """What one fold trains with, rebuilt on every run of it (fit's start_fold); the checkpoint holds the rest: the
    TrainState, the adapter and the optimizer's, scheduler's and scaler's state."""

    cfg: Config
    fold: int
    fold_dir: Path
    model: object  # the base model with this fold's fresh LoRA adapter
    processor: object
    train_df: pd.DataFrame
    dataset: VQADataset  # train_df's rows as the model reads them
    collator: VQACollator
    params: list  # the trainable (LoRA) parameters
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    autocast: object
    budget: TimeBudget | None  # None: no time limit
    tracker: Tracker | None = None
    progress: object = None
    bad_in_a_row: int = 0  # consecutive non-finite steps the GradScaler does not explain (counted afresh on resume)


def make_optimizer(model, cfg: Config) -> tuple[list, torch.optim.Optimizer]:
    """The trainable (LoRA) parameters and AdamW on them (the benchmarks take the same)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return params, torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def mixed_precision(model, cfg: Config) -> tuple[torch.amp.GradScaler, object]:
    """The GradScaler (on in fp16 only: bf16 and fp32 gradients do not underflow) and the compute dtype's autocast
    (the benchmarks take the same)."""
    device = input_device(model)
    dtype = compute_dtype(cfg.precision)
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), autocast_context(device, dtype)


def start_fold(
    model, processor, train_df: pd.DataFrame, fold: int, cfg: Config, budget: TimeBudget | None, total_steps: int
) -> FoldRun:
    """The fold's folder, training data, optimizer, schedule and mixed precision, all fresh (resume_or_start restores
    their state from a checkpoint)."""
    from transformers import get_cosine_schedule_with_warmup

    fold_dir = cfg.fold_dir(fold)
    fold_dir.mkdir(parents=True, exist_ok=True)
    images = pixel_budget(processor)
    dataset = VQADataset(train_df, images, train=True, shuffle_options=cfg.shuffle_options, seed=cfg.seed)
    params, optimizer = make_optimizer(model, cfg)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    scaler, autocast = mixed_precision(model, cfg)
    return FoldRun(
        cfg=cfg,
        fold=fold,
        fold_dir=fold_dir,
        model=model,
        processor=processor,
        train_df=train_df,
        dataset=dataset,
        collator=VQACollator(processor, train=True),
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        autocast=autocast,
        budget=budget,
    )


def resume_or_start(run: FoldRun) -> TrainState:
    """The state of the fold's newest readable checkpoint, with the adapter, optimizer, schedule, scaler and RNG
    restored; a fresh state if there is none."""
    cfg = run.cfg
    resumed = load_checkpoint(run.fold_dir, run.model)
    if resumed is None:
        return TrainState(micro_batch=cfg.effective_batch if cfg.auto_micro_batch else cfg.batch_size)
    run.optimizer.load_state_dict(resumed.pop("optimizer"))
    run.scheduler.load_state_dict(resumed.pop("scheduler"))
    scaler = resumed.pop("scaler")
    # precision="auto" resolves per GPU: a fold begun in bf16 (an A100) may go on on a T4 (fp16), or the other way.
    trained_in, trains_in = resumed.pop("compute_dtype", None), str(compute_dtype(cfg.precision))
    if trained_in in (None, trains_in):  # None: a checkpoint written before the dtype was recorded
        run.scaler.load_state_dict(scaler)
    else:  # fp16's GradScaler state means nothing in bf16, and bf16 has none to give fp16
        print(
            f"fold {run.fold}: its checkpoint was trained in {trained_in} and this GPU trains in {trains_in}: it goes "
            f"on in {trains_in} with a fresh GradScaler, close to but not exactly as one uninterrupted run would"
        )
    state = TrainState(**resumed)
    print(f"fold {run.fold}: resuming at epoch {state.epoch} step {state.step_in_epoch}")
    return state


def save_fold_checkpoint(run: FoldRun, state: TrainState) -> None:
    """Everything resume_or_start needs to go on exactly from here."""
    optimizers = {
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "compute_dtype": str(compute_dtype(run.cfg.precision)),
    }
    save_checkpoint(run.fold_dir, {**dataclasses.asdict(state), **optimizers}, run.model)


def should_stop(state: TrainState, cfg: Config) -> bool:
    return state.epoch >= cfg.epochs or state.stopped_early or state.stopped_for_time


def train_epoch(run: FoldRun, state: TrainState) -> None:
    """The epoch's optimizer steps from where `state` stands (a resumed epoch skips the batches it has trained on),
    each logged and timed, with a checkpoint every cfg.save_every_steps. Stops at the step the time budget has no
    room for (state.stopped_for_time)."""
    cfg, budget = run.cfg, run.budget
    seed = cfg.seed * 1000 + state.epoch  # a new order every epoch, the same one on resume
    batches = length_grouped_batches(prompt_lengths(run.train_df), cfg.effective_batch, seed)
    loader = make_loader(run.dataset, run.collator, batches[state.step_in_epoch :], cfg.num_workers)
    run.model.train()
    waited_from = now()
    for batch in loader:
        if budget is not None and not budget.can_train(cfg.effective_batch):
            state.stopped_for_time = True
            return
        state.data_wait_seconds += now() - waited_from
        loss = train_step(run, state, batch)

        # -- log and checkpoint
        lr = run.scheduler.get_last_lr()[0]
        run.progress.update(1)
        postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"}
        if torch.cuda.is_available():
            postfix["mem"] = memory_summary()  # peak GPU memory, per GPU
        run.progress.set_postfix(postfix)
        run.tracker.log(state.global_step, {"train/loss": loss, "train/lr": lr})
        if state.global_step % cfg.save_every_steps == 0:
            save_fold_checkpoint(run, state)

        # -- time: the wait for this batch and the step, for the time budget's estimates
        step_ended = now()
        state.train_seconds += step_ended - waited_from
        MEASURED["train_samples"] += len(batch["labels"])
        MEASURED["train_seconds"] += step_ended - waited_from
        if budget is not None:
            budget.report_once(state.step_in_epoch, len(loader), fold_samples=len(run.dataset) * cfg.epochs)
        waited_from = step_ended


def train_step(run: FoldRun, state: TrainState, batch: dict) -> float:
    """One optimizer step over `batch`; returns its loss. Forward and backward halve the micro-batch on out-of-memory
    (the effective batch stays). A non-finite loss or gradient skips the step, so it never reaches the weights; a run
    of cfg.max_bad_steps of them that the GradScaler does not explain stops the fold (NonFiniteLossError)."""
    cfg = run.cfg

    # -- forward and backward
    def backward(micro_batch: int) -> float:
        return accumulate_gradients(run.model, batch, micro_batch, run.scaler, run.autocast)

    def discard_gradients() -> None:
        run.optimizer.zero_grad(set_to_none=True)
        release_memory()

    loss, state.micro_batch = halve_on_out_of_memory(
        backward, state.micro_batch, cfg, "in training", "micro-batch", clean_up=discard_gradients
    )
    check_every_weight_has_a_gradient(run.model, run.params)

    # -- optimizer step, skipped on a non-finite loss or gradient
    grad_norm = math.nan
    if math.isfinite(loss):
        grad_norm = optimizer_step(run.optimizer, run.scaler, run.params, cfg.max_grad_norm)
    stepped = math.isfinite(grad_norm)
    # A skip in fp16 is the GradScaler's overflow, which halving the scale fixes within a few steps; once the scale is
    # below 1 (16 halvings from its start) the gradient is non-finite unscaled too: a NaN, as in bf16 or fp32.
    overflow = not stepped and run.scaler.is_enabled() and run.scaler.get_scale() >= 1  # read on a skip only
    unexplained = not math.isfinite(loss) or (not stepped and not overflow)
    if unexplained:
        record_nonfinite(state, run.model, batch, run.train_df["id"], loss, grad_norm)
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    state.skipped_steps += not stepped
    run.bad_in_a_row = run.bad_in_a_row + 1 if unexplained else 0
    if run.bad_in_a_row >= cfg.max_bad_steps:
        raise too_many_nonfinite_steps(run, state)
    state.losses.append(loss if math.isfinite(loss) else None)
    state.global_step += 1
    state.step_in_epoch += 1
    return loss


def check_every_weight_has_a_gradient(model, params: list) -> None:
    """Every trained weight got a gradient in this step's backward. Reentrant checkpointing (the default) gives none to
    the weights of a checkpointed layer whose input requires none, such as the vision encoder's blocks, with only the
    warning silenced at the top of this module: adapters there would train nothing, and nothing else would say so."""
    if all(p.grad is not None for p in params):
        return
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    raise RuntimeError(
        f"no gradient reached {len(missing)} of the {len(params)} trained weights (the first: {missing[0]}); "
        "set reentrant_checkpointing=False in the Config cell"
    )


def too_many_nonfinite_steps(run: FoldRun, state: TrainState) -> NonFiniteLossError:
    last_good = checkpoint_paths(run.fold_dir)[-1:] or ["none yet: the fold starts from scratch"]
    return NonFiniteLossError(
        f"fold {run.fold}: {run.bad_in_a_row} non-finite steps in a row at step {state.global_step} (rows and "
        f"parameters: {state.nonfinite_steps[-1]}). No non-finite value reached the weights; the last good "
        f"checkpoint is {last_good[0]}, and re-running resumes from it. Lower lr (now {run.cfg.lr}), or set "
        "precision='fp32' in the Config cell."
    )


def validate(run: FoldRun, state: TrainState, val_df: pd.DataFrame) -> None:
    """Score the validation rows at the end of an epoch; keep the adapter in fold_dir/best_adapter if it is the best
    so far (by accuracy, then loss)."""
    started = now()
    log_probs = letter_log_probs(run.model, run.processor, val_df, run.cfg)
    state.val_seconds += now() - started
    metrics = validation_metrics(log_probs, val_df["answer"])
    metrics.update(epoch=state.epoch + 1, step=state.global_step, skipped_steps=state.skipped_steps)
    state.history.append(metrics)
    run.tracker.log(state.global_step, {"val/accuracy": metrics["val_acc"], "val/loss": metrics["val_loss"]})
    tqdm.write(
        f"fold {run.fold} epoch {state.epoch + 1}: val_loss {metrics['val_loss']:.4f} val_acc {metrics['val_acc']:.4f}"
    )
    if (metrics["val_acc"], -metrics["val_loss"]) > (state.best_accuracy, -state.best_loss):
        state.best_accuracy, state.best_loss = metrics["val_acc"], metrics["val_loss"]
        fingerprint = json.dumps(val_scores_fingerprint(run.cfg, val_df))
        save_adapter(run.model, run.fold_dir / "best_adapter", {"log_probs": log_probs, "fingerprint": fingerprint})


def end_epoch(run: FoldRun, state: TrainState) -> None:
    """Count the epoch, stop early after cfg.early_stopping_patience epochs without a better accuracy, checkpoint."""
    cfg = run.cfg
    state.epoch += 1
    state.step_in_epoch = 0
    patience = cfg.early_stopping_patience or math.inf
    state.stopped_early = state.epoch < cfg.epochs and epochs_without_improvement(state.history) >= patience
    if state.stopped_early:
        tqdm.write(f"fold {run.fold}: stopped early, no better validation accuracy for {patience} epochs")
    if state.stopped_for_time:
        tqdm.write(f"fold {run.fold}: stopped at step {state.global_step}: the rest of the time budget is for scoring")
    save_fold_checkpoint(run, state)


def fold_summary(state: TrainState, fold: int) -> dict:
    """result.json: the best metrics, the steps taken and skipped, time and memory, and the curves."""
    return {
        "fold": fold,
        "best_val_acc": state.best_accuracy,
        "best_val_loss": state.best_loss,
        "skipped_steps": state.skipped_steps,
        "optimizer_steps": state.global_step,
        "micro_batch": state.micro_batch,
        "epochs_trained": state.epoch,
        "stopped_early": state.stopped_early,
        "stopped_for_time": state.stopped_for_time,
        "train_seconds": state.train_seconds,
        "data_wait_seconds": state.data_wait_seconds,
        "val_seconds": state.val_seconds,
        "peak_gpu_gib": [torch.cuda.max_memory_allocated(i) / 2**30 for i in range(torch.cuda.device_count())],
        # what the allocator held at most: above the peak by what fragmentation cost
        "peak_reserved_gib": [torch.cuda.max_memory_reserved(i) / 2**30 for i in range(torch.cuda.device_count())],
        "nonfinite_steps": state.nonfinite_steps,
        "history": state.history,
        "losses": state.losses,
    }


def fit(model, processor, folds: pd.DataFrame, fold: int, cfg: Config, budget: TimeBudget | None = None) -> dict:
    """Train one fold's LoRA adapter; keep the adapter with the best validation accuracy in fold_dir/best_adapter.

    Resumes from the fold's newest checkpoint if there is one. Returns the fold's history and best metrics.
    With a `budget`, training stops (validating what it has) when one more step would eat into the time that scoring
    needs, and the fold is finished as it stands.
    """
    train_df = folds[folds["fold"] != fold].reset_index(drop=True)
    val_df = folds[folds["fold"] == fold].reset_index(drop=True)
    total_steps = math.ceil(len(train_df) / cfg.effective_batch) * cfg.epochs  # an epoch's partial batch is a step
    run = start_fold(model, processor, train_df, fold, cfg, budget, total_steps)
    state = resume_or_start(run)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run.tracker = Tracker(cfg, fold)
    run.progress = progress_bar(total=total_steps, initial=state.global_step, desc=f"fold {fold}", dynamic_ncols=True)
    while not should_stop(state, cfg):
        train_epoch(run, state)
        validate(run, state, val_df)  # what it has, also when the time budget stopped the epoch
        end_epoch(run, state)
    run.progress.close()
    run.tracker.close()

    result = fold_summary(state, fold)
    atomic_write_text(run.fold_dir / "result.json", json.dumps(result, indent=2))
    release_memory()
    return result


def fold_is_trained(cfg: Config, fold: int) -> bool:
    return fold_result(cfg, fold) is not None


def fold_result(cfg: Config, fold: int) -> dict | None:
    """A finished fold's result.json (best validation accuracy and loss, skipped steps, history), or None.

    An unreadable result.json is renamed unreadable-result.json with a message and the fold counts as unfinished:
    training it again resumes from its last checkpoint, which holds the whole result, so that costs no training.
    With cfg.adapters_from it is the earlier run's (trained_dir), which is never moved: unreadable, it stops the run.
    """
    path = trained_dir(cfg, fold) / "result.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError: truncated or damaged
        if cfg.adapters_from:  # read-only, and nothing is trained here to make it again
            raise ValueError(f"{path} is unreadable ({error}): leave fold {fold} out with train_folds") from error
        aside = path.with_name(f"unreadable-{path.name}")
        path.replace(aside)
        print(f"{path} is unreadable ({error}); moved to {aside}, fold {fold} runs again from its last checkpoint")
        return None


def bind_fold(cfg: Config, folds_print: dict, fold: int) -> None:
    """Before a fold is trained, resumed or reused: stop if its folder was made from another config or data, else
    record what it is made from (fingerprint.json, before its first checkpoint)."""
    changes = fold_changes(cfg, folds_print, fold)
    if changes:
        raise stale_run_error(cfg, {cfg.fold_dir(fold) / "fingerprint.json": changes})
    path = cfg.fold_dir(fold) / "fingerprint.json"
    if not path.exists():
        atomic_write_text(path, json.dumps(adapter_fingerprint(cfg, folds_print, fold), indent=2))


def save_adapter(model, path: Path, val_scores: dict | None = None) -> None:
    """Adapter weights only (a few MB), replaced atomically; with `val_scores`, its validation pass's scores saved
    beside them in the same step (VAL_SCORES), so that they always belong to these weights."""
    check_finite({k: v for k, v in model.named_parameters() if v.requires_grad}, path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    if val_scores is not None:
        np.savez(tmp / VAL_SCORES, **val_scores)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def fold_table(results: list[dict]) -> pd.DataFrame:
    """One row per fold for the notebook: best metrics, steps (skipped ones too), micro-batch, time. The per-epoch
    history and the non-finite step records stay in each fold's result.json."""
    table = pd.DataFrame(results)
    details = ("history", "losses", "nonfinite_steps", "peak_gpu_gib", "peak_reserved_gib")
    return table.drop(columns=[c for c in details if c in table])


def train_folds(base_model, processor, folds: pd.DataFrame, test: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """Train every fold in cfg.folds_to_train with a fresh adapter, skipping folds already finished, stopping at one
    made from another config or data (bind_fold), and starting no fold whose first epoch would not fit the time
    budget (the folds trained so far must still be scored)."""
    folds_print = folds_fingerprint(cfg, folds)
    for fold in cfg.folds_to_train:
        bind_fold(cfg, folds_print, fold)
    to_train = [fold for fold in cfg.folds_to_train if not fold_is_trained(cfg, fold)]
    results = [fold_result(cfg, fold) for fold in cfg.folds_to_train if fold not in to_train]
    budget = TimeBudget.for_run(cfg, folds, test)
    budget.members = len(results)  # trained folds are scored too
    if results:
        print(f"folds {[r['fold'] for r in results]}: already trained, skipped")
    for i, fold in enumerate(to_train):
        # A fold starts if one epoch of it fits before the scoring of every fold started, itself included. A fold
        # resumed with an epoch done (its best adapter saved) goes on as far as time allows: it is scored anyway.
        budget.members += 1
        resumed = (cfg.fold_dir(fold) / "best_adapter").is_dir()
        if not budget.can_train(0 if resumed else int((folds["fold"] != fold).sum())):
            print(
                f"folds {to_train[i:]}: not trained: one epoch would not leave time to score "
                f"({budget.seconds_left() / 3600:.1f} h left of time_budget_hours={cfg.time_budget_hours}); "
                f"the submission uses the {len(results)} fold(s) trained"
            )
            break
        budget.folds_left = len(to_train) - i
        model = attach_lora(base_model, cfg)
        results.append(fit(model, processor, folds, fold, cfg, budget))
        base_model = detach_lora(model)
    return fold_table(sorted(results, key=lambda r: r["fold"]))


def train_folds_on_gpus(
    folds: pd.DataFrame, test: pd.DataFrame, cfg: Config, processes: int | None = None
) -> pd.DataFrame:
    """train_folds on every visible GPU at once: one process per GPU, each loading its own copy of the model on its
    GPU, training every n-th fold and scoring it (score_member: predict_folds then finds the scores saved).
    For models that fit one GPU (Qwen3.5-4B: 3.1 GiB in 4 bits, Qwen3-VL-8B: 6.0 GiB, measured); the 30B MoE model
    needs both GPUs for one copy and trains with train_folds.

    Why not DDP: K folds are independent, so training them side by side needs no gradient exchange at all, and each
    fold's adapter is exactly the one a single GPU would train. Resumes like train_folds (finished folds skipped).
    `processes` defaults to the GPU count (a test may run several on a CPU).
    """
    import torch.multiprocessing as mp

    processes = processes or torch.cuda.device_count()
    to_train = sum(not fold_is_trained(cfg, fold) for fold in cfg.folds_to_train)
    if to_train % processes:
        print(
            f"{to_train} folds to train on {processes} GPUs: the last round leaves "
            f"{processes - to_train % processes} GPU(s) idle (n_folds a multiple of {processes} keeps all busy)"
        )
    mp.start_processes(_train_share, args=(processes, folds, test, cfg), nprocs=processes, start_method="spawn")
    return fold_table([fold_result(cfg, fold) for fold in cfg.folds_to_train if fold_is_trained(cfg, fold)])


def fold_shares(cfg: Config, processes: int) -> list[tuple[int, ...]]:
    """The folds each train_folds_on_gpus process takes: folds still to train dealt out first, so that a resumed run
    splits the training evenly, then the trained ones (which only need scoring)."""
    order = sorted(cfg.folds_to_train, key=lambda fold: fold_is_trained(cfg, fold))  # stable: untrained first
    return [tuple(order[rank::processes]) for rank in range(processes)]


def _train_share(rank: int, processes: int, folds: pd.DataFrame, test: pd.DataFrame, cfg: Config) -> None:
    """One train_folds_on_gpus process: its own model on GPU `rank`, and its share of the folds."""
    cpus = len(os.sched_getaffinity(0))  # Kaggle: 4
    share = dataclasses.replace(
        cfg,
        train_folds=fold_shares(cfg, processes)[rank],
        gpu=rank if torch.cuda.is_available() else None,
        parallel_folds=False,
        # Each process gets its part of the CPU cores: one for its own thread (it launches the GPU kernels), the rest
        # for DataLoader workers. Left at their defaults, every process ran as many torch threads as the machine has
        # cores, and two processes side by side were slower than one after the other.
        num_workers=min(cfg.num_workers, max(1, cpus // processes - 1)),
    )
    torch.set_num_threads(max(1, cpus // processes))
    if torch.cuda.is_available():
        torch.cuda.set_device(rank)  # the default device of memory stats and new tensors
    if share.train_folds:
        model, processor = load_model_and_processor(share)
        train_folds(model, processor, folds, test, share)
        for fold in share.train_folds:
            if fold_is_trained(share, fold):  # not a fold the time budget left unstarted: it has no adapter
                score_member(model, processor, f"fold{fold}", folds, test, share)


def use_parallel_folds(cfg: Config, model) -> bool:
    """cfg.parallel_folds, or where it is None: two or more GPUs, two or more folds to train, and a model that the
    device plan put on one GPU (so every GPU can hold a copy)."""
    if cfg.parallel_folds is not None:
        return cfg.parallel_folds
    devices = weight_devices(model)
    on_one_gpu = len(devices) == 1 and next(iter(devices)).type == "cuda"
    return torch.cuda.device_count() >= 2 and len(cfg.folds_to_train) >= 2 and on_one_gpu


def plot_training_curves(cfg: Config) -> object:
    """Every trained fold on one figure: training loss per optimizer step (a rolling mean over 5% of the steps: the
    raw values are noise at this scale) and validation accuracy per epoch (the epoch lines print its loss too). Saved
    as plots/training_curves.png."""
    import matplotlib.pyplot as plt

    results = [fold_result(cfg, fold) for fold in cfg.folds_to_train if fold_is_trained(cfg, fold)]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 2.8))
    for result in results:
        losses = pd.Series(result.get("losses", []), dtype=float)
        smooth = losses.rolling(max(1, len(losses) // 20), min_periods=1).mean()
        label = f"fold {result['fold']}"
        color = loss_ax.plot(losses.index + 1, smooth, label=label)[0].get_color()
        history = pd.DataFrame(result["history"])
        acc_ax.plot(history["epoch"], history["val_acc"], marker="o", color=color, label=label)
    loss_ax.set(title="Training loss per optimizer step", xlabel="optimizer step", ylabel="answer-token loss")
    acc_ax.set(title="Validation accuracy (chance 0.25)", xlabel="epoch", ylabel="accuracy")
    acc_ax.axhline(0.25, color="grey", linestyle=":", linewidth=1)
    acc_ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        if results:
            ax.legend(fontsize=8)
    return save_figure(fig, cfg.out / "plots" / "training_curves.png")


# ---------------------------------------------------------------------------------------------------------------------
# 9. Inference: score the four letters in one forward pass
# ---------------------------------------------------------------------------------------------------------------------


def letter_token_ids(tokenizer) -> list[int]:
    ids = [tokenizer.encode(letter, add_special_tokens=False) for letter in LETTERS]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"the tokenizer splits the option letters: {dict(zip(LETTERS, ids, strict=True))}")
    return [i[0] for i in ids]


@torch.no_grad()
def position_log_probs(model, processor, df: pd.DataFrame, cfg: Config, order: tuple[int, ...] = (0, 1, 2, 3)):
    """[N, 4] log-probabilities (over the whole vocabulary) of the letters a-d as the answer's first token.

    Columns are letter POSITIONS: column j is the letter shown at position j, which holds original option order[j]
    (`to_options` maps them back). Prior debiasing needs this letter space, before the mapping.
    Rows are scored in batches of similar length and returned in the input order.
    On out-of-memory the batch size halves and the batch is retried.
    Non-finite scores (an overflowing model) raise an error naming the rows, rather than silently answering "a".

    Autocast only in fp16 (a T4). In bf16 the model needs none: it already computes in bf16 (4-bit layers dequantize
    to it, the rest is loaded in it; fp32 LoRA layers cast their own input), and under autocast LayerNorms return
    fp32, which bitsandbytes hands back in fp32 too: those casts cost a tenth of a scoring pass (profile_infer.py).
    In fp16 the fp32 LayerNorm outputs are worth their cost: Qwen-VL vision towers are known to overflow fp16
    (huggingface/transformers#33294), and training, which validated this path, runs under autocast too.
    """
    was_training = model.training
    model.eval()
    device = input_device(model)
    dataset = VQADataset(df, pixel_budget(processor), train=False)
    dataset.order = order
    collator = VQACollator(processor, train=False)
    letter_ids = torch.tensor(letter_token_ids(processor.tokenizer))
    batches = length_sorted_batches(df, cfg.eval_batch_size)
    out = torch.empty(len(df), 4)
    micro = cfg.eval_batch_size  # halved on out-of-memory, and kept for the batches after
    dtype = compute_dtype(cfg.precision)
    autocast = autocast_context(device, dtype) if dtype == torch.float16 else contextlib.nullcontext

    def score(batch: dict, size: int) -> None:
        """The batch's letter scores into `out`, `size` rows a forward pass."""
        for chunk in split_batch(batch, size):
            with autocast():
                logits = model(**forward_inputs(model, chunk, masked=True), logits_to_keep=1).logits[:, -1]
            out[chunk["index"]] = logits.float().log_softmax(-1)[:, letter_ids.to(logits.device)].cpu()

    started = now()
    for batch in progress_bar(make_loader(dataset, collator, batches, cfg.num_workers), desc="predict", leave=False):
        _, micro = halve_on_out_of_memory(functools.partial(score, batch), micro, cfg, "in inference", "batch size")
    # Later passes (each fold's validation, each rotation, each member) start at the batch that fitted: from
    # eval_batch_size each ran out of memory again (Qwen3.5-27B on two T4-sized GPUs: 17 times in one run).
    cfg.eval_batch_size = micro
    model.train(was_training)
    MEASURED["score_rows"] += len(df)
    MEASURED["score_seconds"] += now() - started
    broken = ~torch.isfinite(out).all(1).numpy()
    if broken.any():
        raise FloatingPointError(
            f"{broken.sum()} of {len(df)} rows got non-finite letter scores (the model overflowed in "
            f"{dtype}): ids {_preview(df['id'][broken])}"
        )
    return out.numpy()


def to_options(values: np.ndarray, order: tuple[int, ...]) -> np.ndarray:
    """Columns by letter position -> columns by original option (position j shows option order[j])."""
    restored = np.empty_like(values)
    restored[:, list(order)] = values
    return restored


def letter_log_probs(model, processor, df: pd.DataFrame, cfg: Config, order: tuple[int, ...] = (0, 1, 2, 3)):
    """[N, 4] log-probabilities of the original options a-d, with the options presented permuted by `order`."""
    return to_options(position_log_probs(model, processor, df, cfg, order), order)


def softmax4(log_probs: np.ndarray) -> np.ndarray:
    """Probabilities over the four options only."""
    z = log_probs - log_probs.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def validation_metrics(log_probs: np.ndarray, answers: pd.Series) -> dict:
    """Accuracy, and the loss on the answer letter token (the training objective's first token)."""
    target = answers.map(LETTERS.index).to_numpy()
    return {
        "val_acc": float((log_probs.argmax(1) == target).mean()),
        "val_loss": float(-log_probs[np.arange(len(target)), target].mean()),
    }


# -- Test-time augmentation and prior debiasing ----------------------------------------------------------------------
# Models prefer some answer letters whatever the options say (Zheng et al., "Large Language Models Are Not Robust
# Multiple Choice Selectors", ICLR 2024). Two remedies, both at inference:
#   TTA     score the question under cyclic rotations of its options, map each back, average the probabilities.
#           Costs one pass over the rows per rotation (4 rotations: 4x inference time).
#   PriDe   estimate the letter prior once per model on a few unlabelled (test) rows scored under all four rotations,
#           then divide it out of every prediction in letter space. Costs 4 x debias_samples rows per model.


def cyclic_orders(n: int) -> list[tuple[int, ...]]:
    """`n` evenly spaced cyclic shifts of the options: 1 -> as given; 2 -> shifts 0 and 2; 4 -> all four.

    With all four, every option is shown once under every letter, so a preference for one letter adds the same to
    every option and cancels in the average. The first order is always the original one.
    """
    return [tuple((shift + i) % 4 for i in range(4)) for shift in range(0, 4, 4 // n)]


def score_orders(
    model, processor, df: pd.DataFrame, cfg: Config, orders: list[tuple[int, ...]], known: dict | None = None
) -> np.ndarray:
    """[len(orders), N, 4] letter-position log-probabilities, one pass over the rows for each order whose scores are
    not `known` already ({order: [N, 4]})."""
    known = known or {}
    scored = [known[o] if o in known else position_log_probs(model, processor, df, cfg, o) for o in orders]
    return np.stack(scored)


def estimate_prior(scores: np.ndarray, orders: list[tuple[int, ...]]) -> np.ndarray:
    """PriDe's prior over the four letter positions from rows scored under every cyclic order ([4], sums to 1).

    PriDe's model: log P_observed(letter j | x, order) = log prior_j + log P_debiased(option order[j] | x) + const.
    Averaged over orders that put every option once at every position, the content term is the same for every j,
    so softmax(mean over orders) is the row's prior (the paper's Eq. 4); the prior is its mean over rows (Eq. 5).
    """
    positions = np.array(orders)  # [orders, 4]: option shown at each position
    if sorted(map(len, map(set, positions.T))) != [len(orders)] * 4 or len(orders) != 4:
        raise ValueError(f"estimate_prior needs every option once at every position (4 cyclic orders), got {orders}")
    return softmax4(scores.mean(0)).mean(0)


def tta_proba(scores: np.ndarray, orders: list[tuple[int, ...]], prior: np.ndarray | None = None) -> np.ndarray:
    """[N, 4] option probabilities: per order, the letter-position probabilities divided by `prior` (if given) and
    renormalised over the four letters (PriDe's debiasing), mapped back to the options; then averaged over orders."""
    log_prior = 0.0 if prior is None else np.log(prior)
    return np.mean([to_options(softmax4(s - log_prior), o) for s, o in zip(scores, orders, strict=True)], axis=0)


def fit_prior(model, processor, df: pd.DataFrame, cfg: Config) -> np.ndarray | None:
    """The model's letter prior from cfg.debias_samples rows of df (no labels needed: test rows do), or None if off."""
    if not cfg.debias_samples:
        return None
    rows = df.sample(n=min(cfg.debias_samples, len(df)), random_state=cfg.seed)
    orders = cyclic_orders(4)
    return estimate_prior(score_orders(model, processor, rows, cfg, orders), orders)


def variant_probs(scores: np.ndarray, orders: list[tuple[int, ...]], prior: np.ndarray | None) -> dict:
    """Option probabilities of every inference variant the scores allow: plain, TTA, debiased, both."""
    out = {"plain": tta_proba(scores[:1], orders[:1])}
    if len(orders) > 1:
        out[f"tta x{len(orders)}"] = tta_proba(scores, orders)
    if prior is not None:
        out["debias"] = tta_proba(scores[:1], orders[:1], prior)
        if len(orders) > 1:
            out[f"tta x{len(orders)} + debias"] = tta_proba(scores, orders, prior)
    return out


def variant_name(cfg: Config) -> str:
    """The fullest variant cfg scores (TTA and debiasing as configured), as named by variant_probs."""
    names = [f"tta x{cfg.tta_rotations}"] if cfg.tta_rotations > 1 else []
    names += ["debias"] if cfg.debias_samples else []
    return " + ".join(names) or "plain"


def answer_index(answers: pd.Series) -> np.ndarray:
    return answers.map(LETTERS.index).to_numpy()


def val_rows(name: str, folds: pd.DataFrame) -> pd.DataFrame:
    """The rows a member did not train on: its fold's, or every row for the zero-shot model."""
    return folds if name == "zeroshot" else folds[folds["fold"] == int(name[4:])]


def predict_folds(base_model, processor, folds: pd.DataFrame, test: pd.DataFrame, cfg: Config) -> dict:
    """Per fold: out-of-fold and test probabilities from its best adapter, saved as .npy and reused on re-runs.

    In zero-shot mode the base model predicts once, as the single member "zeroshot".
    Each member scores its rows under cfg.tta_rotations rotations and estimates its own letter prior on
    cfg.debias_samples test rows; the raw letter-position scores are kept (scores.npz) so that `variant_report` can
    compare TTA and debiasing on and off without scoring again. "oof"/"test" are the probabilities of one variant
    for every member: with cfg.select_variant the one with the best out-of-fold accuracy (`choose_variant`), else
    the fullest scored (variant_name(cfg)); "val_acc" is its out-of-fold accuracy (the weight in the weighted vote).
    """
    members = [] if cfg.zero_shot else [f"fold{k}" for k in cfg.folds_to_train if fold_is_trained(cfg, k)]
    if not members and not cfg.zero_shot:
        print("no fold was trained (time budget): the base model answers, as in zero-shot mode")
    members = members or ["zeroshot"]
    orders = cyclic_orders(cfg.tta_rotations)
    predictions = {}
    for name in members:
        saved = score_member(base_model, processor, name, folds, test, cfg)
        prior = saved["prior"] if len(saved["prior"]) else None
        predictions[name] = {"oof_scores": saved["oof"], "test_scores": saved["test"], "orders": orders, "prior": prior}

    variant = choose_variant(predictions, folds) if cfg.select_variant else variant_name(cfg)
    for name, pred in predictions.items():
        pred["variant"] = variant
        pred["oof"] = variant_probs(pred["oof_scores"], orders, pred["prior"])[variant]
        pred["test"] = variant_probs(pred["test_scores"], orders, pred["prior"])[variant]
        pred["val_acc"] = float((pred["oof"].argmax(1) == answer_index(val_rows(name, folds)["answer"])).mean())
        atomic_save_npy(cfg.out / name / "oof_probs.npy", pred["oof"])  # the chosen variant's probabilities
        atomic_save_npy(cfg.out / name / "test_probs.npy", pred["test"])
    return predictions


def score_member(base_model, processor, name: str, folds: pd.DataFrame, test: pd.DataFrame, cfg: Config) -> dict:
    """One member's raw scores: its out-of-fold rows and the test set under every rotation ([orders, N, 4] letter
    positions), and its letter prior. Saved in <member>/scores.npz with their fingerprint (scores_fingerprint: the
    member's adapter files, the rows, tta_rotations, debias_samples, image_size) and reused while it matches, so a
    re-run, or predict_folds after train_folds_on_gpus scored, costs nothing. A change, or an unreadable file, rescores.
    """
    orders = cyclic_orders(cfg.tta_rotations)
    scores_file = cfg.out / name / "scores.npz"
    fingerprint = scores_fingerprint(cfg, name, folds, test)
    saved = saved_scores(scores_file, fingerprint)
    if saved is not None:
        return saved
    adapter = None if name == "zeroshot" else trained_dir(cfg, int(name[4:])) / "best_adapter"
    model = base_model if adapter is None else load_adapter(base_model, adapter)
    prior = fit_prior(model, processor, test, cfg)
    rows = val_rows(name, folds)
    validated = {} if adapter is None else validation_scores(adapter, rows, cfg)
    saved = {
        "oof": score_orders(model, processor, rows, cfg, orders, known=validated),
        "test": score_orders(model, processor, test, cfg, orders),
        "prior": np.zeros(0) if prior is None else prior,
        "orders": np.array(orders),
        "fingerprint": np.array(json.dumps(fingerprint)),
    }
    if name != "zeroshot":
        detach_lora(model)  # the base model, as it came (unload restores it in place)
    atomic_write(scores_file, lambda file: np.savez(file, **saved))
    return saved


# The validation pass after each epoch scores a fold's validation rows, its out-of-fold rows, in their original order;
# the adapter it keeps as best_adapter is the one predict_folds scores them with again. So the best adapter's folder
# also holds that pass's scores (validate, save_adapter), and score_member takes them instead of a second pass: the
# out-of-fold rows were about two thirds of the scoring after training at `safe` (400 of each fold's 628 rows scored in
# the rehearsal: 400 validation, 100 test, 4 x 32 for the letter prior).
VAL_SCORES = "val_scores.npz"


def val_scores_fingerprint(cfg: Config, rows: pd.DataFrame) -> dict:
    """What a validation pass's scores are made from besides the adapter saved with them: the rows, the model, the
    image size, and the dtype it computed in (a fold predicted on another GPU may compute in another)."""
    fields = config_fields(cfg, ("model_id", "quantize_vision", "image_size"))
    return {"rows scored": data_hash(rows), "compute dtype": str(compute_dtype(cfg.precision)), **fields}


def validation_scores(adapter: Path, rows: pd.DataFrame, cfg: Config) -> dict:
    """{the original order: [N, 4] scores} of `rows` from the validation pass saved with `adapter`, where it scored
    them as `cfg` would now; {} where it did not (an adapter saved by an older version, other rows or settings)."""
    what = f"{adapter.parent.name}'s validation rows"
    saved = saved_scores(adapter / VAL_SCORES, val_scores_fingerprint(cfg, rows), what)
    scores = None if saved is None else saved.get("log_probs")
    if scores is None or scores.shape != (len(rows), 4):
        return {}
    return {(0, 1, 2, 3): scores}


def saved_scores(path: Path, fingerprint: dict, what: str | None = None) -> dict | None:
    """The scores saved at `path` if they were made from what `fingerprint` describes; else None, saying why and that
    `what` (the member, path's folder) is scored again."""
    what = what or path.parent.name
    if not path.exists():
        return None
    try:
        with np.load(path) as stored:
            saved = dict(stored)
        changes = fingerprint_changes(json.loads(str(saved["fingerprint"])), fingerprint)
    except KeyError:
        changes = ["no fingerprint (made by an older version of this notebook)"]
    except Exception as error:  # numpy raises BadZipFile, EOFError, OSError or ValueError on a damaged file
        print(f"{path} is unreadable ({error}): scoring {what} again")
        return None
    if changes:
        print(f"{path} was made from other inputs ({'; '.join(changes)}): scoring {what} again")
        return None
    return saved


def choose_variant(predictions: dict, folds: pd.DataFrame) -> str:
    """The inference variant with the best out-of-fold accuracy over all members; on a tie the simplest (plain
    first), as TTA costs time and the prior is an estimate. Chosen on the same rows it is then reported on, so its
    accuracy in variant_report is slightly optimistic; with a few hundred rows or more the difference is small."""
    return variant_report(predictions, folds)["all (out-of-fold)"].idxmax()  # idxmax: the first maximum


def oof_report(predictions: dict, folds: pd.DataFrame) -> pd.DataFrame:
    """Validation accuracy of each member on the rows it did not train on, and overall."""
    rows = []
    for name, pred in predictions.items():
        correct = pred["oof"].argmax(1) == answer_index(val_rows(name, folds)["answer"])
        rows.append({"member": name, "rows": len(correct), "accuracy": correct.mean(), "correct": correct.sum()})
    report = pd.DataFrame(rows)
    total = {"member": "all (out-of-fold)", "rows": report["rows"].sum(), "correct": report["correct"].sum()}
    total["accuracy"] = total["correct"] / max(total["rows"], 1)
    return pd.concat([report, pd.DataFrame([total])], ignore_index=True).drop(columns="correct")


def variant_report(predictions: dict, folds: pd.DataFrame) -> pd.DataFrame:
    """Out-of-fold accuracy of every inference variant (plain, TTA, debiased, both): one row per variant, one
    column per member and "all (out-of-fold)". Honest: each row is scored by the one member that never trained on it,
    and the letter prior comes from unlabelled test rows. Once predict_folds has chosen, "selected" marks its choice.
    """
    table = {}
    for name, pred in predictions.items():
        target = answer_index(val_rows(name, folds)["answer"])
        for variant, probs in variant_probs(pred["oof_scores"], pred["orders"], pred["prior"]).items():
            table.setdefault(variant, {})[name] = probs.argmax(1) == target
    rows = []
    for variant, correct in table.items():
        row = {"variant": variant, **{name: c.mean() for name, c in correct.items()}}
        row["all (out-of-fold)"] = np.concatenate(list(correct.values())).mean()
        rows.append(row)
    report = pd.DataFrame(rows).set_index("variant")
    chosen = next(iter(predictions.values())).get("variant")
    if chosen is not None:
        report["selected"] = report.index == chosen
    return report


def zero_shot_report(model, processor, folds: pd.DataFrame, cfg: Config, max_rows: int = 512) -> pd.DataFrame:
    """Accuracy of the base model (before any adapter) on up to max_rows train rows, for every inference variant:
    what fine-tuning has to beat. Costs tta_rotations x max_rows rows (+ 4 x debias_samples for the prior)."""
    rows = folds.sample(n=min(max_rows, len(folds)), random_state=cfg.seed)
    orders = cyclic_orders(cfg.tta_rotations)
    prior = fit_prior(model, processor, rows, cfg)
    target = answer_index(rows["answer"])
    variants = variant_probs(score_orders(model, processor, rows, cfg, orders), orders, prior)
    report = pd.DataFrame(
        [{"variant": v, "rows": len(rows), "accuracy": (p.argmax(1) == target).mean()} for v, p in variants.items()]
    )
    if prior is not None:
        shares = ", ".join(f"{letter} {share:.3f}" for letter, share in zip(LETTERS, prior, strict=True))
        print(f"base model's letter prior: {shares}")
    return report.set_index("variant")


def plot_oof_errors(predictions: dict, folds: pd.DataFrame, out_dir: Path):
    """Where the out-of-fold answers go wrong (each row scored by the one member that never trained on it): the
    confusion matrix of the chosen variant, and every variant's accuracy per task type (per answer letter when the
    data has no task type). Saved as oof_errors.png in out_dir."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    rows = pd.concat([val_rows(name, folds) for name in predictions], ignore_index=True)
    target = answer_index(rows["answer"])
    chosen = np.concatenate([p["oof"] for p in predictions.values()]).argmax(1)
    confusion = pd.crosstab(
        pd.Categorical(np.array(LETTERS)[target], categories=LETTERS),
        pd.Categorical(np.array(LETTERS)[chosen], categories=LETTERS),
        dropna=False,
    )
    fig, (matrix_ax, bars_ax) = plt.subplots(1, 2, figsize=(9, 3.2), gridspec_kw={"width_ratios": [2, 3]})
    sns.heatmap(confusion, annot=True, fmt="d", cmap="Blues", cbar=False, ax=matrix_ax)
    variant = next(iter(predictions.values())).get("variant", "")
    matrix_ax.set(title=f"Out-of-fold answers ({variant})", xlabel="predicted", ylabel="true")
    matrix_ax.tick_params(axis="y", rotation=0)

    correct = {}
    for name, pred in predictions.items():
        answers = answer_index(val_rows(name, folds)["answer"])
        for variant_name, probs in variant_probs(pred["oof_scores"], pred["orders"], pred["prior"]).items():
            correct.setdefault(variant_name, []).append(probs.argmax(1) == answers)
    group = "task_type" if "task_type" in rows else "answer"
    table = pd.DataFrame({v: np.concatenate(c) for v, c in correct.items()})
    table[group] = rows[group].astype(str).to_numpy()
    accuracy = table.groupby(group)[list(correct)].mean().reset_index().melt(group, var_name="variant")
    sns.barplot(data=accuracy, x="value", y=group, hue="variant", orient="h", ax=bars_ax)
    bars_ax.axvline(0.25, color="grey", linestyle=":", linewidth=1)
    bars_ax.set(title=f"Out-of-fold accuracy by {group}", xlabel="accuracy", ylabel="", xlim=(0, 1))
    bars_ax.legend(title="variant", fontsize=8, bbox_to_anchor=(1, 1))
    return save_figure(fig, out_dir / "oof_errors.png")


# ---------------------------------------------------------------------------------------------------------------------
# 10. Ensemble and submission
# ---------------------------------------------------------------------------------------------------------------------


def majority_vote(member_probs: list[np.ndarray]) -> np.ndarray:
    """Letter index per row chosen by most members; ties broken by summed probability."""
    stacked = np.stack(member_probs)  # [members, N, 4]
    votes = np.eye(4)[stacked.argmax(-1)].sum(0)  # [N, 4]
    summed = stacked.sum(0)
    # summed / (members + 1) < 1, so it only decides between letters with equal votes
    return (votes + summed / (len(member_probs) + 1)).argmax(-1)


def soft_vote(member_probs: list[np.ndarray]) -> np.ndarray:
    return np.mean(member_probs, axis=0).argmax(-1)


def weighted_soft_vote(member_probs: list[np.ndarray], weights) -> np.ndarray:
    """Letter index per row with the highest weighted mean probability (weights: e.g. each fold's val accuracy).

    Equal weights give soft_vote; exact ties go to the earlier letter, as in argmax.
    """
    weights = np.asarray(weights, dtype=float)
    if weights.shape != (len(member_probs),) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"need one non-negative weight per member, not all zero; got {weights.tolist()}")
    return np.tensordot(weights / weights.sum(), np.stack(member_probs), axes=1).argmax(-1)


def ensemble_votes(predictions: dict) -> dict:
    """Each ensemble's letter index per test row: majority, soft and accuracy-weighted soft vote of the members."""
    test_probs = [p["test"] for p in predictions.values()]
    return {
        "majority": majority_vote(test_probs),
        "soft": soft_vote(test_probs),
        "weighted soft": weighted_soft_vote(test_probs, [p["val_acc"] for p in predictions.values()]),
    }


def ensemble_report(predictions: dict) -> pd.DataFrame:
    """How often the ensemble variants pick the same answer on the test set (fraction of rows, pairwise).

    Their accuracies cannot be compared honestly out of fold: each train row was held out by exactly one fold, and
    every other fold trained on it, so an ensemble's vote on it would be leaked. Compare TTA/debiasing with
    `variant_report` (honest), and use this table to see how much the choice of ensemble matters at all: where the
    variants agree on nearly every row, the choice cannot change the score much.
    """
    votes = ensemble_votes(predictions)
    return pd.DataFrame({a: {b: (va == vb).mean() for b, vb in votes.items()} for a, va in votes.items()})


def plot_member_agreement(predictions: dict, out_dir: Path):
    """On how many test rows the members (folds) split: how many of them give the majority answer (the ensembles'
    agreement with each other is ensemble_report's table). Saved as member_agreement.png in out_dir."""
    import matplotlib.pyplot as plt

    members = np.stack([pred["test"].argmax(1) for pred in predictions.values()])  # [members, rows]
    majority_size = np.stack([(members == letter).sum(0) for letter in range(4)]).max(0)
    counts = pd.Series(majority_size).value_counts().reindex(range(1, len(members) + 1), fill_value=0)
    fig, ax = plt.subplots(figsize=(4.5, 2.8))
    ax.bar(counts.index.astype(str), counts.to_numpy() / max(members.shape[1], 1))
    ax.set(
        title="Members behind the majority answer",
        xlabel=f"members agreeing (of {len(members)})",
        ylabel="fraction of test rows",
        ylim=(0, 1),
    )
    return save_figure(fig, out_dir / "member_agreement.png")


def validate_submission(submission: pd.DataFrame, sample: pd.DataFrame) -> None:
    problems = []
    if list(submission.columns) != ["id", "answer"]:
        problems.append(f"columns {list(submission.columns)} should be ['id', 'answer']")
    if submission["id"].tolist() != sample["id"].tolist():
        problems.append("ids differ from sample_submission.csv (same ids in the same order expected)")
    bad = submission.loc[~submission["answer"].isin(LETTERS), "id"].tolist()
    if bad:
        problems.append(f"answers not in a-d for ids {_preview(bad)}")
    if problems:
        raise ValueError("invalid submission:\n  - " + "\n  - ".join(problems))


def write_submission(choices: np.ndarray, test: pd.DataFrame, sample: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Submission in sample_submission's id order, validated, written atomically as the competition spells it:
    sample_submission.csv's header (`ID,Answer` stays so) and train.csv's letter case (A-D where its answers are)."""
    answers = pd.Series([LETTERS[int(c)] for c in choices], index=test["id"])
    submission = pd.DataFrame({"id": sample["id"], "answer": sample["id"].map(answers)})
    validate_submission(submission, sample)
    header = sample.attrs.get("header", {})
    letters = submission["answer"].str.upper() if sample.attrs.get("uppercase_answers") else submission["answer"]
    written = pd.DataFrame({header.get("id", "id"): submission["id"], header.get("answer", "answer"): letters})
    atomic_write_text(path, written.to_csv(index=False))
    return submission


def write_submissions(predictions: dict, fold_results: pd.DataFrame | None, test, sample, cfg: Config) -> dict:
    """submission_ensemble.csv (majority vote), submission_soft.csv (mean probability), submission_weighted.csv
    (mean probability weighted by each member's out-of-fold accuracy), submission_single.csv (the best fold)."""
    best = next(iter(predictions))
    if fold_results is not None and len(fold_results):
        best = f"fold{int(fold_results.sort_values('best_val_acc', ascending=False)['fold'].iloc[0])}"
    votes = ensemble_votes(predictions)
    choices = {
        "submission_ensemble.csv": votes["majority"],
        "submission_soft.csv": votes["soft"],
        "submission_weighted.csv": votes["weighted soft"],
        "submission_single.csv": predictions[best]["test"].argmax(-1),
    }
    return {name: write_submission(c, test, sample, cfg.out / name) for name, c in choices.items()}


def atomic_write(path: Path, write) -> None:
    """`write(file)` into a temporary file beside `path`, then rename it: a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as file:
        write(file)
    tmp.replace(path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda file: file.write(text.encode("utf-8")))


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda file: np.save(file, array))

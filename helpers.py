"""Fine-tune Qwen vision-language models on multiple-choice VQA, one notebook section at a time.

This module is the engine behind `Kaggle_Qwen_VQA_AllInOne.ipynb`; its sections follow the notebook's order:

    1. Setup          packages on Kaggle/Colab, progress bars, environment report, seeds, finding the data
    2. Config         one dataclass, memory-level presets
    3. Data           loading and validating the competition files
    4. EDA            plots of answers, task types, question lengths, image sizes
    5. Folds          stratified K-fold
    6. Dataset        chat prompts, answer-only labels, batching
    7. Model          4-bit load across GPUs, LoRA, tiny offline models for tests and the smoke profile
    8. Training       AMP, gradient accumulation, checkpoint/resume, OOM back-off
    9. Inference      one forward pass per batch scoring the letters a/b/c/d
   10. Ensemble       majority vote, soft vote, validated submissions

Attach it to a Kaggle notebook as a utility script (any name) or a dataset, or keep it next to the notebook: the
setup cell finds it wherever it is by the words "engine behind `Kaggle_Qwen_VQA_AllInOne.ipynb`" above.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import glob
import io
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import types
import unicodedata
import urllib.parse
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

LETTERS = ("a", "b", "c", "d")

# ---------------------------------------------------------------------------------------------------------------------
# 1. Setup
# ---------------------------------------------------------------------------------------------------------------------

# -- Packages on Kaggle and Colab --------------------------------------------------------------------------------------
# Hosted notebooks ship older versions of these than the notebook needs. The setup cell installs them before anything
# imports transformers (this module imports only torch, numpy, pandas, PIL and tqdm at the top). The bounds are
# requirements.txt's: tests/test_setup.py checks that both say the same.
HOSTED_PACKAGES = ("transformers>=5.21,<6", "peft>=0.21,<0.23", "accelerate>=1.10,<2", "bitsandbytes>=0.48,<0.51")


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
    if index_reachable():
        source, where = [], "the package index"
    else:
        wheels = find_wheels_dir(wheel_roots)
        if wheels is None:
            raise RuntimeError(
                f"no internet, and these need installing: {', '.join(outdated)}. Turn Internet on (Settings), or "
                "attach the wheels dataset that kaggle/build_wheels.sh builds (README, Kaggle quick start)."
            )
        source, where = ["--no-index", "--find-links", str(wheels)], f"{wheels} (no internet)"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *source, *outdated], check=True)
    return f"installed {', '.join(outdated)} from {where}"


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


def compact_inline_figures(colors: int = 64) -> None:
    """Show matplotlib figures in the notebook as PNGs of `colors` colours: a chart has few, so it looks the same in a
    third of the bytes (the four EDA plots: 88 KB of the saved smoke notebook, 28 KB so). Outside IPython: nothing."""
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
        figure.savefig(full, format="png", bbox_inches="tight")
        Image.open(full).convert("RGB").quantize(colors).save(small, format="png", optimize=True)
        return small.getvalue()

    shell.display_formatter.formatters["image/png"].for_type(plt.Figure, png)


# -- Warnings that tell a user nothing ---------------------------------------------------------------------------------
# peft reads the deprecated property when it wraps a model (PeftModel.__init__); nothing in this notebook uses it.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
# huggingface_hub imports tqdm.auto, which warns in a kernel without ipywidgets (papermill) and falls back to the plain
# bars that are switched off there anyway.
warnings.filterwarnings("ignore", message="IProgress not found")
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


def find_local_model(model_id: str, roots: tuple[str, ...] = ("/kaggle/input",)) -> str:
    """A Kaggle Models copy of `model_id` if one is attached (a folder with config.json named like it), else the id.

    Kaggle mounts models under /kaggle/input/<model>/transformers/<variation>/<version> or
    /kaggle/input/models/<owner>/<model>/...; matching on the model's name keeps the Config cell the same everywhere.
    """
    if Path(model_id).exists():
        return model_id
    name = model_id.split("/")[-1].lower()
    for root in roots:
        for config in sorted(glob.glob(f"{root}/**/config.json", recursive=True)):
            if name in config.lower():
                return str(Path(config).parent)
    return model_id


# ---------------------------------------------------------------------------------------------------------------------
# 2. Config
# ---------------------------------------------------------------------------------------------------------------------

# Memory levels for Kaggle's T4 x2 (15 GiB each). Higher levels see more image detail and train faster but need
# more memory: if a run dies with out-of-memory, step one level down. `max_memory_gib` caps the weights placed on
# each GPU by device_map="auto"; what it leaves free holds activations.
# `tta_rotations` multiplies inference time (each fold scores its validation rows and the test set once per
# rotation): `safe` already spends a Kaggle session on training, so it scores once; raise it if time is left.
MEMORY_LEVELS = {
    "safe": dict(image_size=384, lora_r=8, batch_size=1, grad_accum=16, max_memory_gib=9.0, tta_rotations=1),
    "balanced": dict(image_size=448, lora_r=12, batch_size=1, grad_accum=12, max_memory_gib=11.0, tta_rotations=2),
    "high": dict(image_size=512, lora_r=16, batch_size=2, grad_accum=8, max_memory_gib=12.5, tta_rotations=4),
}
NEXT_LOWER_LEVEL = {"high": "balanced", "balanced": "safe", "safe": "a smaller model"}


# What the memory levels share. Kaggle's 9-12 h session fits about 5 folds x 2 epochs of an 8B model at `safe`.
GPU_DEFAULTS = {
    "model_id": "Qwen/Qwen3-VL-8B-Instruct",
    "n_folds": 5,
    "epochs": 2,
    "lr": 1e-4,
    "lora_targets": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "eval_batch_size": 32,  # the fastest of 16/32 for Qwen3-VL-2B and -8B (experiments/results/infer.json)
    "num_workers": 2,
    "save_every_steps": 50,
    "debias_samples": 32,  # 4 x 32 extra rows scored per fold: negligible next to the test set
}

# The smoke profile: a tiny random Qwen3-VL built offline, trained on CPU on the sample data in a few minutes.
# A random model needs more epochs, a higher learning rate and LoRA on the MLPs too to learn anything.
SMOKE_PROFILE = {
    "image_size": 64,
    "lora_r": 16,
    "batch_size": 8,
    "grad_accum": 1,
    "max_memory_gib": None,  # no cap: a tiny model fits anywhere (a GPU too, where one is present)
    "model_id": "tiny:qwen3_vl",
    "n_folds": 2,
    "epochs": 20,
    "lr": 2e-3,
    "lora_targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "eval_batch_size": 32,
    "num_workers": 0,
    "save_every_steps": 20,
    "tta_rotations": 4,
    "debias_samples": 32,
}


@dataclass
class Config:
    """Everything a run depends on. Fields left as None are filled from the profile's preset."""

    profile: str = "safe"  # "safe" | "balanced" | "high" (MEMORY_LEVELS) or "smoke" (tiny model, CPU)
    model_id: str | None = None  # Hub id or local folder; "tiny:<arch>" builds a tiny random one
    data_dir: str | None = None  # None: search Kaggle inputs, Colab, ./data
    output_dir: str = "outputs"
    zero_shot: bool = False  # skip training and predict with the base model
    zero_shot_baseline: bool = True  # score the base model on (a sample of) the train rows before training

    # Memory level (from MEMORY_LEVELS unless set here)
    image_size: int | None = None  # longest image side in pixels; vision tokens grow with its square
    lora_r: int | None = None  # adapter rank: capacity vs. memory and time
    batch_size: int | None = None  # micro-batch per forward pass; halves itself on out-of-memory
    auto_micro_batch: bool = True  # start at the whole effective batch and halve on out-of-memory: the largest
    # micro-batch that fits is found in the first steps (a QLoRA step at micro-batch 1 leaves a GPU mostly idle)
    grad_accum: int | None = None  # micro-batches per optimizer step (effective batch = batch_size * grad_accum)
    max_memory_gib: float | None = None  # weights per GPU for device_map="auto"; the rest holds activations

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
    lora_alpha: int | None = None  # None: 2 * lora_r
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] | None = None  # projections of the language model that get adapters
    shuffle_options: bool = False  # permute the options of each training sample and remap its answer

    # Runtime
    parallel_folds: bool = False  # several GPUs and a model that fits one (2B-8B in 4 bits): train one fold per GPU
    # at a time, each GPU with its own copy of the model (train_folds_on_gpus). Not yet run on real GPUs: opt in.
    gpu: int | None = None  # the one GPU to load the whole model on (set per process by train_folds_on_gpus);
    # None: device_map="auto" over every GPU
    eval_batch_size: int | None = None  # inference batch; halves itself on out-of-memory
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
        if self.debias_samples < 0:
            problems.append(f"debias_samples must be 0 (off) or positive, got {self.debias_samples}")
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
                f"profile   {self.profile}: {self.model_id}, images up to {self.image_size} px",
                f"LoRA      r {self.lora_r}, alpha {self.lora_alpha} on {', '.join(self.lora_targets)}",
                f"training  {self.n_folds} folds (training {folds}), {self.epochs} epochs, lr {self.lr:g}, "
                f"effective batch {self.effective_batch}" + (" (zero-shot: no training)" if self.zero_shot else ""),
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


def read_table(path: Path, required: tuple[str, ...]) -> tuple[pd.DataFrame, list[str]]:
    """Read a competition CSV as text (ids stay strings, a UTF-8 BOM is dropped) and list its problems."""
    if not path.exists():
        return pd.DataFrame(), [f"{path}: file not found"]
    df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    df.columns = [c.strip().lower() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        return df, [f"{path}: missing columns {missing} (found {list(df.columns)})"]
    problems = []
    for column in required:
        df[column] = df[column].str.strip()
        empty = df.loc[df[column] == "", "id"].tolist() if column != "id" else df.index[df["id"] == ""].tolist()
        if empty:
            problems.append(f"{path}: empty {column!r} in rows with id {_preview(empty)}")
    duplicated = df.loc[df["id"].duplicated(keep=False), "id"].unique().tolist()
    if duplicated:
        problems.append(f"{path}: duplicate ids {_preview(duplicated)}")
    return df, problems


def resolve_image_paths(df: pd.DataFrame, data_dir: Path, split: str, csv: Path) -> tuple[pd.Series, list[str]]:
    """Absolute image paths: relative to the data dir, to its split folder (train/, test/), or absolute.

    Every image is opened and verified: a missing or broken image is an error, never replaced by a blank one.
    """
    resolved, missing, broken = [], [], []
    for row_id, raw in zip(df["id"], df["path"], strict=True):
        candidates = [data_dir / raw, data_dir / split / raw, data_dir / split / Path(raw).name, Path(raw)]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            missing.append(f"{row_id}: {raw}")
            resolved.append("")
            continue
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception:
            broken.append(f"{row_id}: {raw}")
        resolved.append(str(path.resolve()))
    problems = []
    if missing:
        problems.append(f"{csv}: images not found (id: path) {_preview(missing)}")
    if broken:
        problems.append(f"{csv}: images unreadable (id: path) {_preview(broken)}")
    return pd.Series(resolved, index=df.index), problems


def load_competition_data(data_dir: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(train, test, sample_submission), validated up front; one ValueError lists every problem found."""
    data_dir = Path(data_dir)
    train, problems = read_table(data_dir / "train.csv", TRAIN_COLUMNS)
    test, test_problems = read_table(data_dir / "test.csv", TEST_COLUMNS)
    sample, sample_problems = read_table(data_dir / "sample_submission.csv", ("id", "answer"))
    problems += test_problems + sample_problems

    if not any("missing columns" in p or "not found" in p for p in problems):
        train["answer"] = train["answer"].str.lower().str.replace(r"\s+", "", regex=True)
        bad = train.loc[~train["answer"].isin(LETTERS)]
        if len(bad):
            culprits = [f"{i}: {a!r}" for i, a in zip(bad["id"], bad["answer"], strict=True)]
            problems.append(f"{data_dir / 'train.csv'}: answers not in a-d (id: answer) {_preview(culprits)}")
        for df, split in ((train, "train"), (test, "test")):
            df["image_path"], image_problems = resolve_image_paths(df, data_dir, split, data_dir / f"{split}.csv")
            problems += image_problems
        only_test = sorted(set(test["id"]) - set(sample["id"]))
        only_sample = sorted(set(sample["id"]) - set(test["id"]))
        if only_test or only_sample:
            problems.append(
                f"{data_dir / 'sample_submission.csv'}: ids differ from test.csv: "
                f"missing {_preview(only_test)}, unknown {_preview(only_sample)}"
            )
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
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}.png", dpi=100)
    return figures


# ---------------------------------------------------------------------------------------------------------------------
# 5. Stratified K-fold
# ---------------------------------------------------------------------------------------------------------------------


def make_folds(train: pd.DataFrame, n_folds: int, seed: int) -> pd.DataFrame:
    """`train` with a `fold` column, stratified on the answer letter (and task_type when present).

    Strata rarer than the fold count cannot be split and are merged: first into their answer letter alone,
    then into one 'rare' group.
    """
    from sklearn.model_selection import StratifiedKFold

    strata = train["answer"].copy()
    if "task_type" in train.columns:
        strata = train["task_type"].astype(str) + "|" + train["answer"]
        rare = strata.map(strata.value_counts()) < n_folds
        strata[rare] = train.loc[rare, "answer"]
    rare = strata.map(strata.value_counts()) < n_folds
    strata[rare] = "rare"
    if strata.value_counts().min() < n_folds:  # even the merged group is too small: plain shuffled split
        strata[:] = "all"
    folds = train.copy()
    folds["fold"] = -1
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, val_idx) in enumerate(splitter.split(folds, strata)):
        folds.loc[folds.index[val_idx], "fold"] = fold
    return folds


# ---------------------------------------------------------------------------------------------------------------------
# 6. Dataset and collator
# ---------------------------------------------------------------------------------------------------------------------

SYSTEM_PROMPT = "You are a careful visual assistant. Look at the image and answer the multiple-choice question."
INSTRUCTION = "Answer with one lowercase letter: a, b, c or d."


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


def load_image(path: str, image_size: int) -> Image.Image:
    """RGB image whose longest side is at most image_size (aspect ratio kept); never upscaled."""
    with Image.open(path) as image:
        # Shrink before converting: JPEGs then decode at a reduced scale (draft), and the colour conversion runs on
        # the small image. Image loading was the largest CPU cost of a scoring pass.
        image.draft("RGB", (image_size, image_size))
        image.thumbnail((image_size, image_size))
        return image.convert("RGB")


def prompt_text(row: pd.Series | dict) -> str:
    """The user turn's text for one row, as the model reads it (the image comes before it)."""
    return build_messages(dict(row))[1]["content"][1]["text"]


class VQADataset(torch.utils.data.Dataset):
    """Rows as (image, chat messages). With answers for training; `order` rotates or shuffles options (TTA, aug)."""

    def __init__(self, df: pd.DataFrame, image_size: int, train: bool, shuffle_options: bool = False, seed: int = 0):
        self.rows = df.to_dict("records")
        self.image_size = image_size
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
            "image": load_image(row["image_path"], self.image_size),
            "messages": build_messages(row, order, answer),
        }


class VQACollator:
    """Runs the processor once per batch (in DataLoader workers) and, for training, builds answer-only labels.

    Batches are left-padded for training and inference alike, so the answer sits at the end of every row: the
    model then only has to compute logits for the last few positions (`logits_to_keep`), not the whole sequence.
    """

    def __init__(self, processor, train: bool):
        self.processor = processor
        self.train = train
        tokenizer = processor.tokenizer
        self.im_end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.header_ids = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)

    def __call__(self, items: list[dict]) -> dict:
        texts = [
            self.processor.apply_chat_template(it["messages"], tokenize=False, add_generation_prompt=not self.train)
            for it in items
        ]
        batch = self.processor(
            text=texts, images=[it["image"] for it in items], padding=True, padding_side="left", return_tensors="pt"
        )
        batch = dict(batch)
        batch["index"] = torch.tensor([it["index"] for it in items])
        if self.train:
            batch["labels"] = answer_labels(batch["input_ids"], self.header_ids, self.im_end_id)
        return batch


def answer_labels(input_ids: torch.Tensor, header_ids: list[int], im_end_id: int) -> torch.Tensor:
    """Labels covering exactly the assistant's answer and the <|im_end|> that closes it; -100 elsewhere.

    The chat template ends with "<|im_end|>\\n", so the answer is NOT the last token: it starts after the last
    "<|im_start|>assistant\\n" header and runs to the next <|im_end|>.
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
    """Micro-batches of `size` rows, each with the left padding it does not need trimmed away.

    Qwen-VL packs all images' patches into one `pixel_values` tensor; image_grid_thw says how many each image has.
    """
    n = batch["input_ids"].shape[0]
    seq_len = batch["input_ids"].shape[1]
    patches = batch["image_grid_thw"].prod(-1)
    offsets = torch.cat([torch.zeros(1, dtype=patches.dtype), patches.cumsum(0)]).tolist()
    chunks = []
    for lo in range(0, n, size):
        hi = min(lo + size, n)
        first = int(batch["attention_mask"][lo:hi].any(0).float().argmax())  # first column any row uses
        chunk = {}
        for key, value in batch.items():
            if key == "pixel_values":
                chunk[key] = value[offsets[lo] : offsets[hi]]
            elif value.dim() >= 2 and value.shape[:2] == (n, seq_len):
                chunk[key] = value[lo:hi, first:]
            else:
                chunk[key] = value[lo:hi]
        chunks.append(chunk)
    return chunks


def labelled_text(processor, rows: pd.DataFrame, cfg: Config) -> list[str]:
    """The tokens that training labels cover, decoded: a check that labels hold exactly "<answer><|im_end|>"."""
    dataset = VQADataset(rows.reset_index(drop=True), cfg.image_size, train=True)
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
    )


# ---------------------------------------------------------------------------------------------------------------------
# 7. Model: multi-GPU 4-bit load, LoRA, tiny offline models
# ---------------------------------------------------------------------------------------------------------------------


def compute_dtype() -> torch.dtype:
    """bf16 where the GPU has it, fp16 on older GPUs such as the T4, fp32 on CPU."""
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def input_device(model) -> torch.device:
    """Where inputs go: the embedding's device (device_map may spread layers over several GPUs)."""
    return model.get_input_embeddings().weight.device


def load_model_and_processor(cfg: Config):
    """The base model (4-bit NF4 on CUDA, fp32 on CPU) with gradient checkpointing, and its processor.

    `cfg.model_id` may be a Hub id, a local folder (Kaggle Models), or "tiny:<arch>" for a tiny random model
    built offline under the output folder (the smoke profile).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    model_path = cfg.model_id
    if model_path.startswith("tiny:"):
        arch = model_path.split(":", 1)[1]
        model_path = str(build_tiny_model(cfg.out / f"tiny-{arch}", arch, seed=cfg.seed))
    else:
        model_path = find_local_model(model_path)

    processor = AutoProcessor.from_pretrained(model_path)
    processor.tokenizer.padding_side = "left"
    # Bound the vision tokens: the processor resizes to at most image_size^2 pixels (images are pre-shrunk too).
    processor.image_processor.size = {"shortest_edge": 32 * 32, "longest_edge": cfg.image_size * cfg.image_size}

    dtype = compute_dtype()
    kwargs = dict(dtype=dtype, attn_implementation="sdpa")
    if torch.cuda.is_available():
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        if cfg.gpu is not None:
            kwargs["device_map"] = {"": cfg.gpu}
        else:
            kwargs["device_map"] = "auto"
            if cfg.max_memory_gib:
                kwargs["max_memory"] = {i: f"{cfg.max_memory_gib}GiB" for i in range(torch.cuda.device_count())}
    if is_moe_checkpoint(model_path):  # fused experts that BitsAndBytesConfig leaves in 16 bits: see the MoE section
        kwargs = moe_load_kwargs(model_path, kwargs)
    model = AutoModelForImageTextToText.from_pretrained(model_path, **kwargs)
    batch_vision_attention(model)
    model.requires_grad_(False)
    model.config.use_cache = False
    model.config.get_text_config().use_cache = False  # the language model reads its own config
    # Non-reentrant checkpointing works with frozen inputs and LoRA without enable_input_require_grads hacks.
    # transformers 5.23 renamed gradient checkpointing "activation checkpointing"; 5.21 and 5.22 know only the old name.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, processor


# -- Vision attention over all images at once ------------------------------------------------------------------------
# Without FlashAttention (a T4 has none) transformers' Qwen-VL vision towers run attention image by image, and
# Qwen2.5-VL window by window: one small SDPA call each, so 27 layers x 32 images = 864 calls per batch of Qwen3-VL-8B.
# On an H100 those launches left the GPU waiting for the CPU through a third of a scoring pass (profile_infer.py).
# Images (or windows) with the same number of patches are independent attention problems of the same shape, so each
# such group goes through one batched SDPA call. Same weights, same result (tests/test_model.py compares both).
VISION_ATTENTION_CLASSES = ("Qwen2_5_VLVisionAttention", "Qwen3VLVisionAttention", "Qwen3VLMoeVisionAttention")


def batched_vision_attention_forward(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    """Forward of a Qwen-VL vision attention module (bound to it) with one SDPA call per sequence length."""
    tokens = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(tokens, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    rotary = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision  # the model file's own rotary embedding
    q, k = rotary(q, k, cos, sin)
    out = None  # [tokens, heads, head_dim], in the dtype SDPA returns (autocast may lower it)
    starts_by_length = defaultdict(list)
    for start, length in zip(cu_seqlens[:-1].tolist(), cu_seqlens.diff().tolist(), strict=True):
        starts_by_length[length].append(start)
    for length, starts in starts_by_length.items():
        rows = (torch.tensor(starts, device=q.device)[:, None] + torch.arange(length, device=q.device)).flatten()
        shape = (len(starts), length)  # -> [sequences, heads, length, head_dim] for SDPA
        group_q, group_k, group_v = (x[rows].unflatten(0, shape).transpose(1, 2) for x in (q, k, v))
        attended = F.scaled_dot_product_attention(group_q, group_k, group_v, scale=self.scaling)
        if out is None:
            out = attended.new_empty(q.shape)
        out[rows] = attended.transpose(1, 2).flatten(0, 1)
    return self.proj(out.reshape(tokens, -1))


def batch_vision_attention(model) -> int:
    """Give every vision attention module of a Qwen-VL model the batched forward; returns how many it changed."""
    modules = [m for m in model.modules() if type(m).__name__ in VISION_ATTENTION_CLASSES]
    for module in modules:
        module.forward = types.MethodType(batched_vision_attention_forward, module)
    return len(modules)


def lora_target_regex(targets: tuple[str, ...]) -> str:
    """Only the language model's attention and MLP projections: the vision tower shares names such as gate_proj in
    Qwen2.5-VL, and a Qwen3-VL-MoE's 4-bit experts hold modules named mlp.experts.parametrizations.down_proj."""
    return rf".*language_model.*\.(self_attn|mlp)\.({'|'.join(targets)})$"


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
# This much is hand-rolled because neither library does it: transformers' bitsandbytes quantizer only knows Linear4bit
# (it has no option for other parameters), and bitsandbytes' parametrization comes without a loader.
#
# LoRA stays on attention (lora_targets), not on the 4-bit experts: PEFT 0.21's target_parameters adds its adapter as
# a second parametrization on top of bnb's, and on a parameter that is already parametrized it breaks (tried on CPU):
# its fp32 path never removes the adapter after a forward pass (one more adapter stacks up every pass, with PEFT's
# warning "Could not find any LoRA parametrization"), and with both gate_up_proj and down_proj targeted, down_proj's
# adapter gets no gradient. Its 16-bit path would also build a dense 16-bit delta of every expert tensor each pass.
MOE_QUANT_METHOD = "bitsandbytes_moe_4bit"
_EXPERT_TENSORS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def is_expert_tensor(name: str) -> bool:
    """A fused expert tensor of a Qwen3-VL-MoE decoder layer ([experts, out, in]), by its parameter name."""
    return name.endswith(tuple(f".{tensor}" for tensor in _EXPERT_TENSORS))


def _checkpoint_config(model_path: str) -> dict:
    from transformers import PretrainedConfig

    return PretrainedConfig.get_config_dict(model_path)[0]


def is_moe_checkpoint(model_path: str) -> bool:
    return _checkpoint_config(model_path).get("model_type") == "qwen3_vl_moe"


def moe_load_kwargs(model_path: str, kwargs: dict) -> dict:
    """from_pretrained's kwargs for a Qwen3-VL-MoE checkpoint: the dense path's, with the MoE loader's quantization
    config instead of BitsAndBytesConfig; with none for a folder save_quantized_base wrote, whose config.json has it
    (transformers then rebuilds the 4-bit tensors instead of quantizing; a quantization_config passed, even None,
    would replace the saved one)."""
    config_class = register_moe_quantizer()
    kwargs = {key: value for key, value in kwargs.items() if key != "quantization_config"}
    if "quantization_config" not in _checkpoint_config(model_path):
        # The dense path's settings. Linear4bit needs a GPU; on CPU nn.Linear stays fp32 as in the dense path.
        kwargs["quantization_config"] = config_class(
            quantize_linears=torch.cuda.is_available(),
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"],
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


# -- Tiny random models, built offline -------------------------------------------------------------------------------
# Real weights cannot be downloaded everywhere (CI, air-gapped machines), so the tests and the smoke profile build a
# complete checkpoint folder (config, safetensors weights, tokenizer, processors, the real chat template) that loads
# through the same from_pretrained calls as Qwen's. Each model has about a million parameters; a build takes a second.
TINY_ARCHS = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")

# Special tokens of the real Qwen2.5-VL / Qwen3-VL vocabularies, in their real
# order. The processors read <|image_pad|>, <|video_pad|>, <|vision_start|> and
# <|vision_end|>; the others keep the vocabulary shaped like the real one.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Chat template of Qwen/Qwen2.5-VL-*-Instruct (chat_template.json). Copied from
# the public template as quoted by several projects (e.g. xorbitsai/inference's
# llm_family_modelscope.json). It adds a default system prompt when the first
# message is not a system message.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Chat template of Qwen/Qwen3-VL-*-Instruct (also used by the Qwen3-VL MoE
# Instruct models), verbatim: 5292 UTF-8 bytes, SHA-256 3636d0f0bd6bef02...,
# the hash pinned for the Qwen/Qwen3-VL-8B-Instruct GGUF template in a public
# test suite. Unlike Qwen2.5-VL it adds no default system prompt.
QWEN3_VL_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501 (verbatim template)

# Training text for the BPE: chat-template words plus English and Korean
# multiple-choice VQA phrasing, so merges resemble the text the tests feed in.
_BASE_SENTENCES = [
    "You are a helpful assistant.",
    "system user assistant",
    "What colour is the shape?",
    "What color is the object in the picture?",
    "How many objects are there?",
    "How many shapes can you see in the image?",
    "Which shape is the largest?",
    "Where is the circle?",
    "Is the square to the left of the triangle?",
    "Answer with one lowercase letter.",
    "Answer with the letter of the correct option.",
    "Choose the best answer from the options below.",
    "Look at the image and answer the question.",
    "The answer is (a).",
    "Question: What is shown in the image?",
    "Options:",
    "(a) red\n(b) green\n(c) blue\n(d) yellow",
    "(a) one\n(b) two\n(c) three\n(d) four",
    "(a) circle\n(b) square\n(c) triangle\n(d) star",
    "(a) left\n(b) right\n(c) top\n(d) bottom",
    "a b c d",
    "Which option best describes the scene?",
    "Count the number of red circles and pick the matching option.",
    "What is the relationship between the two objects?",
    "Is there anything unusual about this picture?",
    "Select the correct answer; reply with a, b, c or d only.",
    "The correct option is b because the triangle is smaller.",
    "Read the text in the image and answer the question below.",
    "What is the person holding in their hand?",
    "그림 속 사람은 무엇을 들고 있습니까?",
    "두 물체 사이의 관계는 무엇입니까?",
    "장면을 가장 잘 설명하는 선택지는 무엇입니까?",
    "삼각형이 더 작기 때문에 정답은 b입니다.",
    "도형의 색깔은 무엇입니까?",
    "이미지에 물체가 몇 개 있습니까?",
    "가장 큰 도형은 무엇입니까?",
    "원은 어디에 있습니까?",
    "소문자 한 글자로 답하세요.",
    "정답을 고르세요.",
    "이미지를 보고 질문에 답하세요.",
    "당신은 도움이 되는 조수입니다.",
    "(a) 빨간색\n(b) 초록색\n(c) 파란색\n(d) 노란색",
    "(a) 원\n(b) 사각형\n(c) 삼각형\n(d) 별",
    "(a) 하나\n(b) 둘\n(c) 셋\n(d) 넷",
]
# (English, Korean) word pairs expanded into templated sentences below.
_COLOURS = [
    ("red", "빨간색"),
    ("green", "초록색"),
    ("blue", "파란색"),
    ("yellow", "노란색"),
    ("black", "검은색"),
    ("white", "흰색"),
    ("purple", "보라색"),
    ("orange", "주황색"),
]
_SHAPES = [
    ("circle", "원"),
    ("square", "사각형"),
    ("triangle", "삼각형"),
    ("star", "별"),
    ("rectangle", "직사각형"),
    ("hexagon", "육각형"),
]
_COUNTS = [("one", "하나"), ("two", "둘"), ("three", "셋"), ("four", "넷"), ("five", "다섯"), ("six", "여섯")]
_POSITIONS = [("left", "왼쪽"), ("right", "오른쪽"), ("top", "위쪽"), ("bottom", "아래쪽"), ("center", "가운데")]
_BPE_VOCAB_SIZE = 1024

# Merged image patches side (pixels) = patch_size * merge_size: 28 for Qwen2.5-VL,
# 32 for Qwen3-VL. Small pixel budgets keep image token counts tiny (4-20).
_MIN_PIXELS = 32 * 32
_MAX_PIXELS = 128 * 128
_MERGE_SIZE = 2
_TEMPORAL_PATCH_SIZE = 2

# Tiny dimensions shared by all three archs. head_dim = 128 / 4 = 32, so the
# multimodal rope section [t, h, w] must sum to head_dim / 2 = 16.
_TEXT_DIMS = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
}
_HEAD_DIM = 32
_MROPE_SECTION = [8, 4, 4]
_VISION_DIMS = {
    "depth": 2,
    "hidden_size": 64,
    "num_heads": 4,
    "intermediate_size": 128,
    "out_hidden_size": _TEXT_DIMS["hidden_size"],
    "spatial_merge_size": _MERGE_SIZE,
    "temporal_patch_size": _TEMPORAL_PATCH_SIZE,
}


def _training_corpus() -> list[str]:
    """Base sentences plus templated scene descriptions and option lists in both languages."""
    corpus = list(_BASE_SENTENCES)
    for colour, colour_ko in _COLOURS:
        for shape, shape_ko in _SHAPES:
            corpus.append(f"There is a {colour} {shape} in the image.")
            corpus.append(f"이미지에 {colour_ko} {shape_ko}이 있습니다.")
    for (count, count_ko), (shape, shape_ko) in zip(_COUNTS, _SHAPES, strict=True):
        corpus.append(f"There are {count} {shape}s in the picture.")
        corpus.append(f"그림에 {shape_ko}이 {count_ko} 개 있습니다.")
    for position, position_ko in _POSITIONS:
        for shape, shape_ko in _SHAPES:
            corpus.append(f"The {shape} is at the {position} of the image.")
            corpus.append(f"{shape_ko}은 이미지의 {position_ko}에 있습니다.")
    # Rotated multiple-choice option lists, e.g. "(a) red\n(b) green\n...".
    for words in (_COLOURS, _SHAPES, _COUNTS, _POSITIONS):
        for shift in range(4):
            rotated = (words[shift:] + words[:shift])[:4]
            for lang in (0, 1):
                options = [f"({letter}) {pair[lang]}" for letter, pair in zip("abcd", rotated, strict=True)]
                corpus.append("\n".join(options))
    return corpus


def build_tokenizer():
    """Train a tiny byte-level BPE with the Qwen2 pre-tokenisation and wrap it as a Qwen2 tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    backend = Tokenizer(models.BPE())
    # Same normalizer / pre-tokenizer / decoder as transformers' Qwen2Tokenizer,
    # which rebuilds exactly this pipeline around vocab + merges on reload.
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        # Merge even once-seen pairs: the corpus is tiny, and whole-word tokens
        # ("Ġcolour") look more like the real Qwen vocabulary than fragments.
        min_frequency=0,
        # Every byte is a token, so any text (and every single letter) encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_training_corpus(), trainer=trainer)
    # Added after training, so (as in the real vocab) they sit after the BPE ids.
    backend.add_special_tokens(SPECIAL_TOKENS)

    # Settings mirror the real Qwen2.5-VL / Qwen3-VL tokenizer_config.json.
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=_TEXT_DIMS["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
        add_prefix_space=False,
    )

    # Callers score option letters by a single token id: make sure that holds,
    # including right after the assistant header of the chat template.
    letter_ids = {}
    for letter in "abcd":
        ids = tokenizer.encode(letter, add_special_tokens=False)
        assert len(ids) == 1, f"{letter!r} encodes to {ids}, expected one token"
        letter_ids[letter] = ids[0]
    chat = "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
    chat_ids = tokenizer.encode(chat, add_special_tokens=False)
    assert letter_ids["a"] in chat_ids, "the answer letter tokenises differently after the assistant header"
    return tokenizer


def _build_processor(arch: str, tokenizer):
    from transformers import (
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    size = {"shortest_edge": _MIN_PIXELS, "longest_edge": _MAX_PIXELS}
    common = {"merge_size": _MERGE_SIZE, "temporal_patch_size": _TEMPORAL_PATCH_SIZE}
    if arch == "qwen2_5_vl":
        # Qwen2.5-VL: 14-px patches, CLIP mean/std (the image processor default).
        image_processor = Qwen2VLImageProcessor(size=size, patch_size=14, **common)
        video_processor = Qwen2VLVideoProcessor(size=size, patch_size=14, **common)
        return Qwen2_5_VLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
        )
    # Qwen3-VL (dense and MoE): 16-px patches, mean/std 0.5 as in its preprocessor_config.json.
    image_processor = Qwen2VLImageProcessor(
        size=size, patch_size=16, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], **common
    )
    # The video budget counts pixels over all frames, hence the larger maximum.
    video_size = {"shortest_edge": _MIN_PIXELS, "longest_edge": 8 * _MAX_PIXELS}
    video_processor = Qwen3VLVideoProcessor(size=video_size, patch_size=16, **common)
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )


def _build_config(arch: str, tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig, Qwen3VLMoeConfig

    ids = tokenizer.convert_tokens_to_ids
    token_ids = {
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<|endoftext|>"),
    }
    text = {**_TEXT_DIMS, **token_ids, "vocab_size": len(tokenizer)}
    top = {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
        "tie_word_embeddings": False,
    }
    if arch == "qwen2_5_vl":
        # Qwen2.5-VL has no head_dim field (hidden / heads = 32) and plain mrope.
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": _MROPE_SECTION}
        vision = {
            **_VISION_DIMS,
            "patch_size": 14,
            "window_size": 112,
            # Layer 0 uses windowed attention, layer 1 full attention: both paths run.
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
        }
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **top)

    text["head_dim"] = _HEAD_DIM
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 5e6,
        "mrope_section": _MROPE_SECTION,
        "mrope_interleaved": True,
    }
    vision = {
        **_VISION_DIMS,
        "patch_size": 16,
        # Learned position grid of 16 x 16 (must be a square number), interpolated per image.
        "num_position_embeddings": 256,
        # Deepstack features from both vision layers feed the first two text layers.
        "deepstack_visual_indexes": [0, 1],
    }
    if arch == "qwen3_vl":
        return Qwen3VLConfig(text_config=text, vision_config=vision, **top)
    text.update(
        num_experts=4,
        num_experts_per_tok=2,
        # 192, not 64: with hidden 128 a 64-wide expert makes gate_up_proj square
        # (4, 128, 128). transformers' qwen3_vl_moe loader transposes expert
        # weights only when their shape differs from the model's, so a square
        # tensor saved in the original (E, H, 2I) layout would load untransposed.
        # A multiple of 64 because bitsandbytes' CPU dequantize (tests store the
        # experts in 4 bits on CPU) is wrong when the last dim is not.
        moe_intermediate_size=192,
        decoder_sparse_step=1,
    )
    return Qwen3VLMoeConfig(text_config=text, vision_config=vision, **top)


_MODEL_CLASSES = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
}


def _is_built(out_dir: Path, arch: str) -> bool:
    config_file = out_dir / "config.json"
    if not config_file.is_file():
        return False
    with config_file.open(encoding="utf-8") as handle:
        model_type = json.load(handle).get("model_type")
    # The weights are written last, so their presence means the build finished.
    return model_type == arch and (out_dir / "model.safetensors").is_file()


def build_tiny_model(out_dir, arch: str = "qwen3_vl", seed: int = 0) -> Path:
    """Build a tiny random ``arch`` checkpoint with its processor into ``out_dir``.

    Returns ``out_dir``; a directory already holding a finished build of the same
    arch is returned as is.
    """
    import transformers

    if arch not in TINY_ARCHS:
        raise ValueError(f"arch must be one of {TINY_ARCHS}, got {arch!r}")
    out_dir = Path(out_dir)
    if _is_built(out_dir, arch):
        return out_dir

    tokenizer = build_tokenizer()
    processor = _build_processor(arch, tokenizer)
    config = _build_config(arch, tokenizer)

    torch.manual_seed(seed)  # weights are initialised in the constructor
    model = getattr(transformers, _MODEL_CLASSES[arch])(config).to(torch.float32).eval()
    model.config.dtype = torch.float32  # recorded in config.json
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[config.text_config.eos_token_id, config.text_config.pad_token_id],
        pad_token_id=config.text_config.pad_token_id,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# ---------------------------------------------------------------------------------------------------------------------
# 8. Training
# ---------------------------------------------------------------------------------------------------------------------


def model_inputs(batch: dict, device: torch.device) -> dict:
    """Tensors the model's forward takes, on its input device (labels and row indices are ours)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k not in ("labels", "index")}


def answer_loss_sum(model, batch: dict) -> torch.Tensor:
    """Summed cross-entropy over the labelled answer tokens.

    Logits are computed for the last positions only, from one before the first labelled token: with a vocabulary
    of 150k, full-sequence logits would cost more memory than the rest of the step.
    """
    labels = batch["labels"]
    seq_len = labels.shape[1]
    first = int((labels != -100).float().argmax(1).min())
    keep = seq_len - first + 1
    logits = model(**model_inputs(batch, input_device(model)), logits_to_keep=keep).logits
    targets = labels[:, seq_len - keep + 1 :].to(logits.device)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")


class NonFiniteLossError(RuntimeError):
    pass


def out_of_memory_at_one(cfg: Config, where: str) -> RuntimeError:
    """The error for an out-of-memory that halving cannot fix any more: it names the level to step down to."""
    return RuntimeError(
        f"out of memory {where} (image_size {cfg.image_size}): set the Config cell's profile to "
        f"{NEXT_LOWER_LEVEL.get(cfg.profile, 'safe')!r}"
    )


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


def autocast_context(device: torch.device):
    dtype = compute_dtype()
    return lambda: torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")


def checkpoint_paths(fold_dir: Path) -> list[Path]:
    return sorted(fold_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(fold_dir: Path, state: dict, model, keep: int = 2) -> None:
    """Adapter, optimizer, scheduler, scaler, RNG and position, written to a temp folder and renamed (atomic)."""
    final = fold_dir / f"checkpoint-{state['global_step']}"
    tmp = fold_dir / f".tmp-checkpoint-{state['global_step']}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable = {k: v.detach().cpu() for k, v in model.named_parameters() if v.requires_grad}
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({**state, "trainable": trainable, "rng": rng}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in checkpoint_paths(fold_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(fold_dir: Path, model) -> dict | None:
    """The newest checkpoint's state with the adapter weights and RNG restored, or None."""
    paths = checkpoint_paths(fold_dir)
    if not paths:
        return None
    state = torch.load(paths[-1] / "state.pt", weights_only=False)
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
    if not torch.cuda.is_available():
        return ""
    return " ".join(f"{torch.cuda.max_memory_allocated(i) / 2**30:.1f}G" for i in range(torch.cuda.device_count()))


def fit(model, processor, folds: pd.DataFrame, fold: int, cfg: Config) -> dict:
    """Train one fold's LoRA adapter; keep the adapter with the best validation accuracy in fold_dir/best_adapter.

    Resumes from the fold's newest checkpoint if there is one. Returns the fold's history and best metrics.
    """
    from transformers import get_cosine_schedule_with_warmup

    fold_dir = cfg.fold_dir(fold)
    fold_dir.mkdir(parents=True, exist_ok=True)
    train_df = folds[folds["fold"] != fold].reset_index(drop=True)
    val_df = folds[folds["fold"] == fold].reset_index(drop=True)
    device = input_device(model)
    dataset = VQADataset(train_df, cfg.image_size, train=True, shuffle_options=cfg.shuffle_options, seed=cfg.seed)
    collator = VQACollator(processor, train=True)
    lengths = prompt_lengths(train_df)
    steps_per_epoch = math.ceil(len(train_df) / cfg.effective_batch)  # the last, partial batch is a step too
    total_steps = steps_per_epoch * cfg.epochs

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=compute_dtype() == torch.float16)
    autocast = autocast_context(device)

    # -- resume
    micro_batch = cfg.effective_batch if cfg.auto_micro_batch else cfg.batch_size
    state = {"global_step": 0, "epoch": 0, "step_in_epoch": 0, "micro_batch": micro_batch, "history": []}
    state.update({"best_accuracy": -1.0, "best_loss": float("inf"), "skipped_steps": 0})
    resumed = load_checkpoint(fold_dir, model)
    if resumed is not None:
        optimizer.load_state_dict(resumed.pop("optimizer"))
        scheduler.load_state_dict(resumed.pop("scheduler"))
        scaler.load_state_dict(resumed.pop("scaler"))
        state.update(resumed)
        print(f"fold {fold}: resuming at epoch {state['epoch']} step {state['step_in_epoch']}")

    def checkpoint():
        extra = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
        }
        save_checkpoint(fold_dir, {**state, **extra}, model)

    bad_in_a_row = 0
    progress = progress_bar(total=total_steps, initial=state["global_step"], desc=f"fold {fold}", dynamic_ncols=True)
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        batches = length_grouped_batches(lengths, cfg.effective_batch, seed=cfg.seed * 1000 + epoch)
        loader = make_loader(dataset, collator, batches[state["step_in_epoch"] :], cfg.num_workers)
        model.train()
        for batch in loader:
            # -- forward/backward, halving the micro-batch on out-of-memory (effective batch unchanged)
            while True:
                try:
                    loss = accumulate_gradients(model, batch, state["micro_batch"], scaler, autocast)
                    break
                except torch.OutOfMemoryError:
                    optimizer.zero_grad(set_to_none=True)
                    release_memory()
                    if state["micro_batch"] == 1:
                        raise out_of_memory_at_one(cfg, "at micro-batch 1") from None
                    state["micro_batch"] //= 2
                    tqdm.write(f"out of memory: micro-batch now {state['micro_batch']}, gradient accumulation doubled")

            # -- optimizer step; a non-finite loss is skipped, never trained on
            if math.isfinite(loss):
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                scale = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                skipped = scaler.is_enabled() and scaler.get_scale() < scale  # fp16 overflow in the gradients
            else:
                skipped = True
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state["skipped_steps"] += skipped
            bad_in_a_row = bad_in_a_row + 1 if not math.isfinite(loss) else 0
            if bad_in_a_row >= cfg.max_bad_steps:
                raise NonFiniteLossError(
                    f"fold {fold}: {bad_in_a_row} non-finite losses in a row at step {state['global_step']}. "
                    f"Lower lr (now {cfg.lr}), or load in bf16/fp32 if the GPU allows; the fold's last checkpoint "
                    "is kept, so re-running resumes from it."
                )
            state["global_step"] += 1
            state["step_in_epoch"] += 1

            # -- log and checkpoint
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", mem=memory_summary())
            if state["global_step"] % cfg.save_every_steps == 0:
                checkpoint()

        # -- validate at epoch end, keep the best adapter
        log_probs = letter_log_probs(model, processor, val_df, cfg)
        metrics = validation_metrics(log_probs, val_df["answer"])
        metrics.update(epoch=epoch + 1, step=state["global_step"], skipped_steps=state["skipped_steps"])
        state["history"].append(metrics)
        tqdm.write(
            f"fold {fold} epoch {epoch + 1}: val_loss {metrics['val_loss']:.4f} val_acc {metrics['val_acc']:.4f}"
        )
        better = (metrics["val_acc"], -metrics["val_loss"]) > (state["best_accuracy"], -state["best_loss"])
        if better:
            state["best_accuracy"], state["best_loss"] = metrics["val_acc"], metrics["val_loss"]
            save_adapter(model, fold_dir / "best_adapter")
        state["epoch"] += 1
        state["step_in_epoch"] = 0
        checkpoint()
    progress.close()

    result = {"fold": fold, "best_val_acc": state["best_accuracy"], "best_val_loss": state["best_loss"]}
    result.update(skipped_steps=state["skipped_steps"], history=state["history"])
    atomic_write_text(fold_dir / "result.json", json.dumps(result, indent=2))
    release_memory()
    return result


def fold_is_trained(cfg: Config, fold: int) -> bool:
    return (cfg.fold_dir(fold) / "result.json").exists()


def fold_result(cfg: Config, fold: int) -> dict:
    """A finished fold's result.json: best validation accuracy and loss, skipped steps, history."""
    return json.loads((cfg.fold_dir(fold) / "result.json").read_text())


def save_adapter(model, path: Path) -> None:
    """Adapter weights only (a few MB), replaced atomically."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def train_folds(base_model, processor, folds: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """Train every fold in cfg.folds_to_train with a fresh adapter, skipping folds already finished."""
    results = []
    for fold in cfg.folds_to_train:
        if fold_is_trained(cfg, fold):
            print(f"fold {fold}: already trained, skipped")
            results.append(fold_result(cfg, fold))
            continue
        model = attach_lora(base_model, cfg)
        results.append(fit(model, processor, folds, fold, cfg))
        base_model = detach_lora(model)
    return pd.DataFrame(results).drop(columns="history")


def train_folds_on_gpus(
    folds: pd.DataFrame, test: pd.DataFrame, cfg: Config, processes: int | None = None
) -> pd.DataFrame:
    """train_folds on every visible GPU at once: one process per GPU, each loading its own copy of the model on its
    GPU, training every n-th fold and scoring it (score_member: predict_folds then finds the scores saved).
    For models that fit one GPU (Qwen3-VL-8B: 6 GiB in 4 bits, measured); the 30B MoE model needs both GPUs for one
    copy and trains with train_folds.

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
    return pd.DataFrame([fold_result(cfg, fold) for fold in cfg.folds_to_train]).drop(columns="history")


def fold_shares(cfg: Config, processes: int) -> list[tuple[int, ...]]:
    """The folds each train_folds_on_gpus process takes: folds still to train dealt out first, so that a resumed run
    splits the training evenly, then the trained ones (which only need scoring)."""
    order = sorted(cfg.folds_to_train, key=lambda fold: fold_is_trained(cfg, fold))  # stable: untrained first
    return [tuple(order[rank::processes]) for rank in range(processes)]


def _train_share(rank: int, processes: int, folds: pd.DataFrame, test: pd.DataFrame, cfg: Config) -> None:
    """One train_folds_on_gpus process: its own model on GPU `rank`, and its share of the folds."""
    share = dataclasses.replace(
        cfg,
        train_folds=fold_shares(cfg, processes)[rank],
        gpu=rank if torch.cuda.is_available() else None,
        parallel_folds=False,
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(rank)  # the default device of memory stats and new tensors
    if share.train_folds:
        model, processor = load_model_and_processor(share)
        train_folds(model, processor, folds, share)
        for fold in share.train_folds:
            score_member(model, processor, f"fold{fold}", folds, test, share)


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
    dataset = VQADataset(df, cfg.image_size, train=False)
    dataset.order = order
    collator = VQACollator(processor, train=False)
    letter_ids = torch.tensor(letter_token_ids(processor.tokenizer))
    batches = length_sorted_batches(df, cfg.eval_batch_size)
    out = torch.empty(len(df), 4)
    micro = cfg.eval_batch_size  # halved on out-of-memory, and kept for the batches after
    autocast = autocast_context(device) if compute_dtype() == torch.float16 else contextlib.nullcontext
    for batch in progress_bar(make_loader(dataset, collator, batches, cfg.num_workers), desc="predict", leave=False):
        while True:
            try:
                for chunk in split_batch(batch, micro):
                    with autocast():
                        logits = model(**model_inputs(chunk, device), logits_to_keep=1).logits[:, -1]
                    out[chunk["index"]] = logits.float().log_softmax(-1)[:, letter_ids.to(logits.device)].cpu()
                break
            except torch.OutOfMemoryError:
                release_memory()
                if micro == 1:
                    raise out_of_memory_at_one(cfg, "in inference at batch size 1") from None
                micro //= 2
                tqdm.write(f"out of memory in inference: batch size now {micro}")
    model.train(was_training)
    broken = ~torch.isfinite(out).all(1).numpy()
    if broken.any():
        raise FloatingPointError(
            f"{broken.sum()} of {len(df)} rows got non-finite letter scores (the model overflowed in "
            f"{compute_dtype()}): ids {_preview(df['id'][broken])}"
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


def score_orders(model, processor, df: pd.DataFrame, cfg: Config, orders: list[tuple[int, ...]]) -> np.ndarray:
    """[len(orders), N, 4] letter-position log-probabilities, one pass over the rows per order."""
    return np.stack([position_log_probs(model, processor, df, cfg, order) for order in orders])


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
    members = ["zeroshot"] if cfg.zero_shot else [f"fold{k}" for k in cfg.folds_to_train]
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
    positions), and its letter prior. Saved in <member>/scores.npz and reused while tta_rotations and debias_samples
    stay the same (a change rescores), so a re-run, or predict_folds after train_folds_on_gpus scored, costs nothing.
    """
    orders = cyclic_orders(cfg.tta_rotations)
    scores_file = cfg.out / name / "scores.npz"
    if scores_file.exists():
        with np.load(scores_file) as stored:
            saved = dict(stored)
        if saved["orders"].tolist() == [list(o) for o in orders] and saved["debias_samples"] == cfg.debias_samples:
            return saved
    model = base_model if name == "zeroshot" else load_adapter(base_model, cfg.out / name / "best_adapter")
    prior = fit_prior(model, processor, test, cfg)
    saved = {
        "oof": score_orders(model, processor, val_rows(name, folds), cfg, orders),
        "test": score_orders(model, processor, test, cfg, orders),
        "prior": np.zeros(0) if prior is None else prior,
        "orders": np.array(orders),
        "debias_samples": np.array(cfg.debias_samples),
    }
    if name != "zeroshot":
        detach_lora(model)  # the base model, as it came (unload restores it in place)
    atomic_write(scores_file, lambda file: np.savez(file, **saved))
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
    """Submission in sample_submission's id order, validated, written atomically."""
    answers = pd.Series([LETTERS[int(c)] for c in choices], index=test["id"])
    submission = pd.DataFrame({"id": sample["id"], "answer": sample["id"].map(answers)})
    validate_submission(submission, sample)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, submission.to_csv(index=False))
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

"""What the benchmarks share: random Qwen-VL checkpoints at the real sizes, the synthetic rows, GPU bookkeeping.

Real weights cannot be downloaded on the benchmark machine, and speed and memory depend only on the shapes, so the
benchmarks build random weights with the architecture of Qwen3-VL-2B/8B-Instruct and load them through
`helpers.load_model_and_processor`, the same 4-bit code path a user runs. Answers of a random model are meaningless;
only throughput, memory and the agreement between two ways of computing the same thing are measured.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata as md
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))

import make_tiny_model  # noqa: E402 (data/make_tiny_model.py: the tiny configs and processors)

import helpers  # noqa: E402

# Sizes from the public config.json of Qwen/Qwen3-VL-2B-Instruct and Qwen/Qwen3-VL-8B-Instruct (Hugging Face Hub).
# Shared by both: head_dim 128, vocab 151936, rope_theta 5e6, interleaved mrope [24, 20, 20], vision patch 16,
# spatial merge 2, 16 vision heads, a 48 x 48 learned position grid (2304), max_position_embeddings 262144.
# "tiny" keeps the real vocabulary but shrinks everything else, so --tiny runs the same code path on a CPU.
SIZES = {
    "2b": {
        "hub_id": "Qwen/Qwen3-VL-2B-Instruct",
        "tie_word_embeddings": True,
        "text": dict(
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
        ),
        "vision": dict(
            depth=24,
            hidden_size=1024,
            intermediate_size=4096,
            out_hidden_size=2048,
            deepstack_visual_indexes=[5, 11, 17],
        ),
    },
    "8b": {
        "hub_id": "Qwen/Qwen3-VL-8B-Instruct",
        "tie_word_embeddings": False,
        "text": dict(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
        ),
        "vision": dict(
            depth=27,
            hidden_size=1152,
            intermediate_size=4304,
            out_hidden_size=4096,
            deepstack_visual_indexes=[8, 16, 24],
        ),
    },
    "tiny": {
        "hub_id": None,
        "tie_word_embeddings": True,
        "text": dict(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        ),
        "vision": dict(
            depth=2, hidden_size=64, intermediate_size=128, out_hidden_size=128, deepstack_visual_indexes=[0, 1]
        ),
    },
}
REAL_TEXT = dict(vocab_size=151936, head_dim=128, max_position_embeddings=262144, rms_norm_eps=1e-6)
REAL_ROPE = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20], "mrope_interleaved": True}
REAL_VISION = dict(
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    num_heads=16,
    num_position_embeddings=2304,
    hidden_act="gelu_pytorch_tanh",
)
# The tiny size keeps the tiny template's head_dim (32), mrope section and vision heads: mrope must sum to head_dim/2.
TINY_TEXT = dict(vocab_size=151936)

# The T4 stand-in: Kaggle's T4 shows about 14.7 GiB to torch; 14.5 GiB leaves room for the CUDA context.
T4_CAP_GIB = 14.5

# Peak dense bf16 tensor TFLOP/s (no sparsity), from NVIDIA's data sheets; MFU is left out for other GPUs.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}

# Realistic question padding: competition questions often carry a sentence or two of context.
CONTEXT_SENTENCES = [
    "Look carefully at the whole picture, including the background and the edges.",
    "The photo was taken under ordinary lighting, and some objects may be partly hidden.",
    "Choose the option that best matches what is actually visible, not what is most likely.",
    "사진 전체를 자세히 보고, 보이는 것에 가장 잘 맞는 보기를 고르세요.",
]


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--models", default="2b,8b", help=f"comma-separated, of {[k for k in SIZES if k != 'tiny']}")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model on CPU: checks the script end to end")
    parser.add_argument("--workdir", default="/tmp/qwen-vqa-bench", help="random checkpoints and images (GBs)")
    parser.add_argument("--rows", type=int, default=64, help="synthetic rows, the same for every variant")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU peak dense bf16 TFLOP/s for MFU")
    return parser


def model_names(args) -> list[str]:
    if args.tiny:
        return ["tiny"]
    names = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in SIZES or m == "tiny"]
    if unknown:
        raise SystemExit(f"unknown --models {unknown}; choose from 2b, 8b")
    return names


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- Random checkpoint at the real sizes -------------------------------------------------------------------------------


def real_size_config(name: str, template_dir: Path):
    """The tiny Qwen3-VL config (same special token ids as its processor) with the real model's sizes."""
    from transformers import AutoConfig

    template = AutoConfig.from_pretrained(template_dir)
    spec = SIZES[name]
    d = template.to_dict()
    tie = spec["tie_word_embeddings"]
    if name == "tiny":
        d["text_config"].update(TINY_TEXT, **spec["text"], tie_word_embeddings=tie)
        d["vision_config"].update(spec["vision"])
    else:
        d["text_config"].update(REAL_TEXT, **spec["text"], rope_parameters=dict(REAL_ROPE), tie_word_embeddings=tie)
        d["vision_config"].update(REAL_VISION, **spec["vision"])
    d["tie_word_embeddings"] = tie
    return type(template).from_dict(d)


def decoder_params(text_config) -> int:
    """Parameters of the language model's decoder layers (embeddings and lm_head excluded): the N of 6*N*tokens."""
    h, i, d = text_config.hidden_size, text_config.intermediate_size, text_config.head_dim
    q, kv = text_config.num_attention_heads * d, text_config.num_key_value_heads * d
    attention = h * q + 2 * h * kv + q * h + 2 * d  # q, k, v, o projections; q/k RMSNorm over head_dim
    mlp = 3 * h * i  # gate, up, down
    return text_config.num_hidden_layers * (attention + mlp + 2 * h)  # two RMSNorms per layer


def build_random_checkpoint(name: str, workdir: Path) -> tuple[Path, dict]:
    """A folder with random `name`-sized weights (bf16 on a GPU) and the tiny processor; reused if already there.

    The weights are created directly on the GPU (an 8B model in fp32 on the CPU would take minutes to initialise).
    The tiny processor's vocabulary (~900 ids) is smaller than the model's 151936, so every id it produces fits.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

    template_dir = make_tiny_model.build_tiny_model(workdir / "tiny-template", "qwen3_vl")
    config = real_size_config(name, template_dir)
    out = workdir / f"qwen3-vl-{name}-random"
    info = {"hub_id": SIZES[name]["hub_id"], "path": str(out), "decoder_params": decoder_params(config.text_config)}
    info["text_config"] = {k: getattr(config.text_config, k) for k in [*REAL_TEXT, *SIZES[name]["text"]]}
    info["vision_config"] = {k: getattr(config.vision_config, k) for k in [*REAL_VISION, *SIZES[name]["vision"]]}
    if (out / "done").exists():
        log(f"{name}: reusing the random checkpoint in {out}")
        info["build_s"] = 0.0
        return out, info

    start = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = helpers.compute_dtype()
    log(f"{name}: creating random weights on {device} in {dtype}")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    info["total_params"] = sum(p.numel() for p in model.parameters())
    info["decoder_params_counted"] = sum(p.numel() for p in model.model.language_model.layers.parameters())
    model.generation_config = GenerationConfig.from_pretrained(template_dir)
    log(f"{name}: {info['total_params'] / 1e9:.2f}B parameters; writing {out}")
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(template_dir).save_pretrained(out)
    del model
    helpers.release_memory()
    (out / "done").touch()  # written last: a half-written folder is rebuilt
    info["build_s"] = time.perf_counter() - start
    log(f"{name}: checkpoint built in {info['build_s']:.0f} s")
    return out, info


# Qwen2.5-VL, from the public config.json of Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct: head_dim 128 (hidden /
# heads), rope_theta 1e6, mrope [16, 24, 24]; one vision tower for both, 32 blocks of 1280 with 112-px windows but in
# blocks 7, 15, 23 and 31 (full attention), 14-px patches, SiLU.
QWEN25_TEXT = {
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}  # fmt: skip
QWEN25_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    patch_size=14,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
)


def qwen25_config(size: str, template_dir: Path):
    """The tiny Qwen2.5-VL config (same special token ids as its processor) with the real model's sizes."""
    from transformers import AutoConfig

    template = AutoConfig.from_pretrained(template_dir)
    d = template.to_dict()
    text = QWEN25_TEXT[size]
    d["text_config"].update(text, rms_norm_eps=1e-6, max_position_embeddings=128000)
    d["text_config"]["rope_parameters"].update(rope_theta=1e6, mrope_section=[16, 24, 24])
    d["text_config"]["layer_types"] = ["full_attention"] * text["num_hidden_layers"]
    d["vision_config"].update(QWEN25_VISION, out_hidden_size=text["hidden_size"])
    d["tie_word_embeddings"] = text["tie_word_embeddings"]
    return type(template).from_dict(d)


def write_random_checkpoint(config, template_dir: Path, out: Path) -> None:
    """Random weights for `config` (built on the GPU where there is one, in its compute dtype) saved in `out` with the
    tiny template's processor, whose ids all fit the real vocabulary."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForImageTextToText.from_config(config, dtype=helpers.compute_dtype())
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(template_dir).save_pretrained(out)
    del model
    helpers.release_memory()
    (out / "done").touch()  # written last: a half-written folder is rebuilt
    log(f"{out.name}: {params / 1e9:.2f}B parameters, built in {time.perf_counter() - start:.0f} s")


def qwen25_checkpoint(size: str, workdir: Path) -> Path:
    """A Qwen2.5-VL folder with random weights at `size`'s real sizes ("3b", "7b"); reused if already there."""
    out = workdir / f"qwen2.5-vl-{size}-random"
    if not (out / "done").exists():
        template_dir = make_tiny_model.build_tiny_model(workdir / "tiny-qwen2.5-template", "qwen2_5_vl")
        write_random_checkpoint(qwen25_config(size, template_dir), template_dir, out)
    return out


def random_checkpoint(name: str, workdir: Path) -> tuple[Path, dict]:
    """build_random_checkpoint for Qwen3-VL ("2b", "8b", "tiny"), Qwen3.5 at bench_qwen35_fp16's sizes for
    "qwen3.5-<size>" ("qwen3.5-4b", "qwen3.5-tiny"), or Qwen2.5-VL for "qwen2.5-3b" and "qwen2.5-7b": the checkpoint's
    folder and what is known of it."""
    if name.startswith("qwen2.5-"):
        size = name.removeprefix("qwen2.5-")
        return qwen25_checkpoint(size, workdir), {"family": "qwen2_5_vl", "size": size, **QWEN25_TEXT[size]}
    if name.startswith("qwen3.5-"):
        import bench_qwen35_fp16  # it imports this module

        size = name.removeprefix("qwen3.5-")
        return bench_qwen35_fp16.random_checkpoint(size, workdir), {"family": "qwen3_5", "size": size}
    return build_random_checkpoint(name, workdir)


def load(path: Path, workdir: Path, image_size: int = 384, profile: str = "safe"):
    """The model (4-bit NF4 on CUDA) and processor through helpers, exactly as the notebook loads them."""
    cfg = helpers.Config(profile=profile, model_id=str(path), output_dir=str(workdir / "out"), image_size=image_size)
    start = time.perf_counter()
    model, processor = helpers.load_model_and_processor(cfg)
    seconds = time.perf_counter() - start
    log(f"loaded {path.name} through helpers.load_model_and_processor in {seconds:.0f} s; {memory_note()}")
    return model, processor, cfg, seconds


def trainable_params(model) -> int:
    """The adapter's size (its trainable parameters): every tool and way compared should train the same LoRA."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def image_by_image_vision_attention(model):
    """transformers' own vision attention (one SDPA call per image), as the original notebooks ran it."""
    for module in helpers.vision_attention_modules(model):
        if "forward" in vars(module):
            del module.forward
    try:
        yield
    finally:
        helpers.batch_vision_attention(model)


# -- Synthetic rows -------------------------------------------------------------------------------------------------


def synthetic_rows(n: int, workdir: Path, image_px: int = 512, seed: int = 0) -> pd.DataFrame:
    """`n` rows cycled from the sample train set, images upscaled to image_px (64 px ones would give ~4 vision tokens).

    512 px covers every memory level: helpers.load_image shrinks a square one to image_size x image_size at each.
    Questions get 0-3 context sentences so that lengths vary like real ones (and length sorting has work to do).
    """
    train, _, _ = helpers.load_competition_data(ROOT / "data")
    rng = np.random.default_rng(seed)
    image_dir = workdir / f"images{image_px}"
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        row = train.iloc[i % len(train)].to_dict()
        extra = rng.choice(CONTEXT_SENTENCES, size=int(rng.integers(0, 4)), replace=False)
        row["question"] = " ".join([*extra, row["question"]])
        path = image_dir / f"{i}.jpg"  # JPEG, like the competition images
        if not path.exists():
            with Image.open(row["image_path"]) as image:
                image.convert("RGB").resize((image_px, image_px), Image.BICUBIC).save(path)
        row["image_path"] = str(path)
        rows.append(row)
    return pd.DataFrame(rows)


def token_lengths(processor, df: pd.DataFrame, train: bool) -> np.ndarray:
    """Tokens per row (text and vision) as the collator builds them."""
    dataset = helpers.VQADataset(df, helpers.pixel_budget(processor), train=train)
    collator = helpers.VQACollator(processor, train=train)
    lengths = []
    for lo in range(0, len(df), 16):
        batch = collator([dataset[i] for i in range(lo, min(lo + 16, len(df)))])
        lengths += batch["attention_mask"].sum(1).tolist()
    return np.array(lengths)


def length_stats(lengths: np.ndarray) -> dict:
    return {"min": int(lengths.min()), "mean": float(lengths.mean()), "max": int(lengths.max())}


# -- GPU bookkeeping -------------------------------------------------------------------------------------------------


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def start_profiler():
    """torch.profiler on the CPU and, where there is one, the GPU: started now, `profile_summary` once stopped."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sync()
    prof = profile(activities=activities)
    prof.start()
    return prof


def profile_summary(prof, wall_s: float, top: int = 15) -> dict:
    """What one profiled step spent: the GPU's busy time (the sum of its kernels: a step whose GPU is busy for much
    less than its wall time waits on the CPU, which launches the kernels), the kernels, and the ops with the most GPU
    and CPU time."""
    from torch.autograd import DeviceType

    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    ops = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)
    cpu_ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "profiled_step_s": wall_s,  # the profiler's own overhead included
        "gpu_busy_s": sum(e.device_time_total for e in kernels) / 1e6,
        "kernels": len(kernels),
        "top_gpu_ops": [
            {"name": e.key[:100], "calls": e.count, "gpu_ms": e.self_device_time_total / 1e3}
            for e in ops[:top]
            if e.self_device_time_total > 0
        ],
        "top_cpu_ops": [
            {"name": e.key[:100], "calls": e.count, "cpu_ms": e.self_cpu_time_total / 1e3} for e in cpu_ops[:top]
        ],
    }


def profiled_call(fn, top: int = 15) -> dict:
    """profile_summary of one call of `fn` (one training step), CUDA synchronised."""
    prof = start_profiler()
    start = time.perf_counter()
    fn()
    sync()
    prof.stop()
    return profile_summary(prof, time.perf_counter() - start, top)


def reset_peak() -> None:
    helpers.release_memory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    """Peak allocated GPU memory since the last reset_peak (all GPUs), or None on CPU."""
    if not torch.cuda.is_available():
        return None
    return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**30


def allocated_gib() -> float | None:
    if not torch.cuda.is_available():
        return None
    return sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**30


def memory_note() -> str:
    if not torch.cuda.is_available():
        return "CPU (no GPU memory stats)"
    return f"GPU allocated {allocated_gib():.2f} GiB, peak {peak_gib():.2f} GiB"


def cap_gpu_memory(gib: float) -> float | None:
    """Make the caching allocator raise out-of-memory beyond `gib` per GPU (a T4 stand-in); None on CPU."""
    if not torch.cuda.is_available():
        return None
    for i in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(i).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), i)
    return gib


def lift_gpu_cap() -> None:
    """Undo cap_gpu_memory (and helpers.cap_gpu_memory): every GPU's whole memory again."""
    for i in range(torch.cuda.device_count()):
        torch.cuda.set_per_process_memory_fraction(1.0, i)


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for key, value in PEAK_BF16_TFLOPS.items():  # most specific first
        if key in name:
            return value
    return None


def environment() -> dict:
    env = {"python": sys.version.split()[0]}
    for package in ("torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            env[package] = md.version(package)
        except md.PackageNotFoundError:
            env[package] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_total_gib=props.total_memory / 2**30)
        env["cuda"] = torch.version.cuda
    else:
        env["gpu"] = None
    # What precision="auto" picks on this GPU; a run's own precision is in its arguments (results before 2026-11-29
    # call this compute_dtype, whatever the run's precision was).
    env["auto_compute_dtype"] = str(helpers.compute_dtype())
    return env


def median(values) -> float:
    return float(np.median(values))


def write_json(path: str | Path, results: dict) -> None:
    """Written after every model, so a run cut short still leaves what it measured."""
    helpers.atomic_write_text(Path(path), json.dumps(results, indent=2, default=str))


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(value):
        if value is None:
            return "-"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    widths = {c: max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns), flush=True)
    for row in rows:
        print("  ".join(cell(row.get(c)).ljust(widths[c]) for c in columns), flush=True)

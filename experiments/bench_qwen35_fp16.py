"""Qwen3.5 in fp16, as a T4 trains it: does the hybrid model train for hundreds of steps under a GradScaler, with the
Gated DeltaNet layers as fp32 islands (Config.fp32_islands, the default) and without them?

    python3 experiments/bench_qwen35_fp16.py --out experiments/results/qwen35.json --models 4b,9b --steps 200
    python3 experiments/bench_qwen35_fp16.py --out /tmp/q.json --tiny    # the same code path on a CPU (fp32)
    bash experiments/run_gpu.sh qwen35_kernels-none qwen35_kernels-fla    # 4B without, with flash-linear-attention

For each model, one random checkpoint at the real sizes (weights cannot be downloaded here), loaded through
helpers.load_model_and_processor in 4 bits with precision="fp16", each GPU capped at 14.5 GiB like a T4; then for
fp32_islands in (True, False), a fresh LoRA adapter trained by helpers.fit for `--steps` optimizer steps at the `safe`
level's image size and rank (micro-batch 4, no accumulation, so that 200 steps fit a 10-minute call), validated on 64
rows. Recorded per run: optimizer steps, steps skipped (GradScaler overflow or a non-finite gradient norm), the losses,
the seconds per step and the peak GPU memory. Random weights overflow differently from trained ones (no outlier
features): a run that stays finite here shows the mechanism is sound, not that a real checkpoint never overflows.

Sizes (public config.json of Qwen/Qwen3.5-4B and -9B; the vision tower as Qwen3-VL-4B's / -8B's): hidden 2560 / 4096,
MLP 9216 / 12288, 32 layers (24 Gated DeltaNet, 8 full attention), 16 query / 4 key-value heads of 256, DeltaNet 16 key
/ 32 value heads of 128, vocabulary 248,320, embeddings tied for 4B only. Qwen3.5-2B (its config.json and model card,
as quoted by NVIDIA Megatron-LM's qwen35_vl configuration): hidden 2048, MLP 6144, 24 layers, 8 query / 2 key-value
heads of 256, DeltaNet 16 key / 16 value heads of 128, tied embeddings; vision tower 24 layers of width 1024.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import common
import pandas as pd
import torch
from common import helpers
from transformers.utils.import_utils import is_flash_linear_attention_available

SIZES = {
    "2b": dict(
        text=dict(
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=24,
            num_attention_heads=8,
            num_key_value_heads=2,
            linear_num_value_heads=16,
        ),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096),
        tie=True,
    ),
    "4b": dict(
        text=dict(hidden_size=2560, intermediate_size=9216),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096),
        tie=True,
    ),
    "9b": dict(
        text=dict(hidden_size=4096, intermediate_size=12288),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304),
        tie=False,
    ),
    # Qwen3.5-27B and Qwen3.6-27B (one architecture; their config.json): needs two T4s; planned (plan_fits.py) only
    "27b": dict(
        text=dict(
            hidden_size=5120,
            intermediate_size=17408,
            num_hidden_layers=64,
            num_attention_heads=24,
            linear_num_value_heads=48,
        ),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304),
        tie=False,
    ),
    # Qwen3.5-35B-A3B and Qwen3.6-35B-A3B (one architecture; config.json): 40 layers of 256 experts of width 512, 8 per
    # token, and a shared expert of 512; a qwen3_5_moe model, planned only like 27B
    "35b-a3b": dict(
        text=dict(
            hidden_size=2048,
            num_hidden_layers=40,
            num_key_value_heads=2,
            num_experts=256,
            num_experts_per_tok=8,
            moe_intermediate_size=512,
            shared_expert_intermediate_size=512,
        ),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304),
        tie=False,
        moe=True,
    ),
    "tiny": dict(text=dict(hidden_size=128, intermediate_size=256), vision=dict(), tie=False),
}
SHARED_TEXT = dict(
    vocab_size=248320,
    num_hidden_layers=32,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=256,
    linear_num_key_heads=16,
    linear_num_value_heads=32,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    linear_conv_kernel_dim=4,
    layer_types=["linear_attention"] * 3 + ["full_attention"],
    max_position_embeddings=262144,
)
SHARED_VISION = dict(num_heads=16, num_position_embeddings=2304)
TABLE = ("optimizer_steps", "skipped_steps", "nonfinite_steps", "loss_last_10", "seconds_per_step", "score_rows_per_s")


def template(name: str, workdir: Path) -> Path:
    """The tiny model of `name`'s architecture (qwen3_5, or qwen3_5_moe for an MoE size): its config and processor."""
    arch = "qwen3_5_moe" if SIZES[name].get("moe") else "qwen3_5"
    return common.make_tiny_model.build_tiny_model(workdir / f"tiny-{arch}", arch)


def real_size_config(name: str, template_dir: Path):
    """The tiny model's config (its special token ids match its processor) at `name`'s real sizes."""
    from transformers import AutoConfig

    d = AutoConfig.from_pretrained(template_dir).to_dict()
    spec = SIZES[name]
    if name != "tiny":
        text = dict(SHARED_TEXT, **spec["text"])
        text["layer_types"] = SHARED_TEXT["layer_types"] * (text["num_hidden_layers"] // 4)
        d["text_config"].update(text, tie_word_embeddings=spec["tie"])
        d["text_config"]["rope_parameters"]["mrope_section"] = [11, 11, 10]  # sums to 256 * 0.25 / 2
        d["vision_config"].update(SHARED_VISION, **spec["vision"], out_hidden_size=text["hidden_size"])
        d["tie_word_embeddings"] = spec["tie"]
    return type(AutoConfig.from_pretrained(template_dir)).from_dict(d)


def random_checkpoint(name: str, workdir: Path) -> Path:
    """A Qwen3.5 folder with random weights at `name`'s sizes and the tiny Qwen3.5 processor; reused if there."""
    out = workdir / f"qwen3.5-{name}-random"
    if not (out / "done").exists():
        template_dir = template(name, workdir)
        common.write_random_checkpoint(real_size_config(name, template_dir), template_dir, out)
    return out


def folds_for(rows: pd.DataFrame, val_rows: int) -> pd.DataFrame:
    """Fold 0 (validation) holds the first `val_rows` rows, fold 1 the rest: one fold trained on the rest."""
    return rows.assign(fold=[0 if i < val_rows else 1 for i in range(len(rows))])


def train_run(path: Path, folds: pd.DataFrame, islands: bool, args, workdir: Path) -> dict:
    tiny = args.tiny
    out = workdir / f"out-{path.name}-islands-{islands}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = helpers.Config(
        profile="smoke" if tiny else "safe",
        model_id=str(path),
        output_dir=str(out),
        precision="fp32" if tiny else "fp16",
        fp32_islands=islands,
        gpu_memory_cap_gib=None if tiny else common.T4_CAP_GIB,
        batch_size=args.micro_batch,
        grad_accum=1,
        auto_micro_batch=False,
        epochs=1,
        n_folds=2,
        early_stopping_patience=0,
        report_to=None,
    )
    common.reset_peak()
    model, processor = helpers.load_model_and_processor(cfg)
    peft_model = helpers.attach_lora(model, cfg)
    start = time.perf_counter()
    result = helpers.fit(peft_model, processor, folds, 0, cfg)
    seconds = time.perf_counter() - start
    losses = result["losses"]
    finite = [x for x in losses if x == x and abs(x) != float("inf")]
    val = folds[folds["fold"] == 0]
    score_start = time.perf_counter()
    helpers.letter_log_probs(peft_model, processor, val, cfg)
    score_seconds = time.perf_counter() - score_start
    entry = {
        "fp32_islands": islands,
        "fast_deltanet_kernels": is_flash_linear_attention_available(),
        "optimizer_steps": result["optimizer_steps"],
        "skipped_steps": result["skipped_steps"],
        "nonfinite_steps": len(result["nonfinite_steps"]),
        "nonfinite_records": result["nonfinite_steps"][:5],
        "finite_losses": f"{len(finite)}/{len(losses)}",
        "loss_first_10": sum(finite[:10]) / max(1, len(finite[:10])),
        "loss_last_10": sum(finite[-10:]) / max(1, len(finite[-10:])),
        "best_val_acc": result["best_val_acc"],
        "seconds_per_step": seconds / max(1, result["optimizer_steps"]),
        "score_rows_per_s": len(val) / score_seconds,
        "peak_gib": common.peak_gib(),
        "adapter_finite": all(torch.isfinite(p).all().item() for p in peft_model.parameters() if p.requires_grad),
    }
    common.log(f"{path.name} islands={islands}: {entry}")
    del peft_model, model
    helpers.release_memory()
    return entry


def main() -> None:
    parser = common.base_parser(__doc__.split("\n")[0])
    parser.set_defaults(models="4b,9b")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per optimizer step (no accumulation)")
    parser.add_argument("--val-rows", type=int, default=64)
    parser.add_argument("--islands", choices=("both", "on", "off"), default="both", help="which runs to make")
    parser.add_argument("--label", default="", help="appended to each run's name (e.g. whether kernels are there)")
    args = parser.parse_args()
    names = ["tiny"] if args.tiny else [m.strip() for m in args.models.split(",")]
    if args.tiny:
        args.steps, args.val_rows = min(args.steps, 3), min(args.val_rows, 8)
    workdir = Path(args.workdir)
    rows = common.synthetic_rows(args.steps * args.micro_batch + args.val_rows, workdir)
    rows["id"] = [f"ROW_{i:05d}" for i in range(len(rows))]
    folds = folds_for(rows, args.val_rows)
    islands = {"both": (True, False), "on": (True,), "off": (False,)}[args.islands]
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}  # runs of earlier calls are kept
    for name in names:
        path = random_checkpoint(name, workdir)
        for on in islands:
            run = train_run(path, folds, on, args, workdir)
            entry = {"environment": common.environment(), "args": vars(args), **run}
            results[f"{name} fp32_islands={on}{args.label}"] = entry
            common.write_json(out, results)  # after every run: a call cut short keeps what it measured
    common.print_table([{"run": k, **{c: v for c, v in r.items() if c in TABLE}} for k, r in results.items()])


if __name__ == "__main__":
    main()

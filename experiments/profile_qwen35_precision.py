"""Why Qwen3.5 trains slower in fp16 than in bf16 (results/fits.json at `safe`: 2B 12.0 against 21.6 samples/s, 4B
11.1 against 13.0) while Qwen3-VL-8B hardly differs (16.5 against 17.4): the same training step timed and profiled
three ways, side by side in one process per model.

    python3 experiments/profile_qwen35_precision.py --out experiments/results/profile_qwen35.json \\
        --models qwen3.5-2b,qwen3.5-4b
    python3 experiments/profile_qwen35_precision.py --out /tmp/p.json --tiny    # the same code path on a CPU (fp32)
    python3 experiments/profile_qwen35_precision.py --out experiments/results/profile_norms.json \
        --models qwen3.5-4b,8b --variants bf16,fp16-islands --norms eager,compiled

`--norms eager,compiled` runs each variant with the language model's RMSNorms and rotary embedding eager, then
compiled (helpers.compile_norms): why compiling them trains Qwen3-VL-8B faster but Qwen3.5-4B slower, and gains less in
bf16 than in fp16 (experiments/README, "Compiled norms in bf16 and on Qwen3.5"). The CPU ops with the most time are
recorded beside the GPU's. Models already in the --out JSON are kept (a later call adds to it; "calls" says which
call measured which model).

Variants, on one random checkpoint at the real sizes loaded in 4 bits through helpers.load_model_and_processor, the
GPU capped at 14.5 GiB, with a fresh LoRA adapter each:
  bf16               what an H200 or an A100 trains in
  fp16, no islands   fp16 autocast with the GradScaler, the Gated DeltaNet (linear_attn) left to autocast
  fp16, islands      ... with the DeltaNet layers in fp32 (Config.fp32_islands, the T4's default path)
Each: `--warmup` optimizer steps, then `--steps` timed ones (CUDA synchronised), then one step under torch.profiler.
All use the same 16 rows a step at the `safe` level's image size and LoRA rank, in one micro-batch (as fits.json
found for these models). From the profile: the step's wall time, the GPU's busy time (the sum of its kernels: a step
whose GPU is busy for much less than its wall time waits on the CPU, which launches the kernels), the number of
kernels, and the ops with the most GPU time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import bench_train
import common
from common import helpers

BATCH = 16
VARIANTS = {  # --variants: label, precision, fp32 islands
    "bf16": ("bf16", "bf16", False),
    "fp16": ("fp16, no islands", "fp16", False),
    "fp16-islands": ("fp16, islands", "fp16", True),
}


def step_fn(model, processor, rows, cfg: helpers.Config):
    """One optimizer step of helpers.fit's (forward and backward under its autocast, GradScaler, clipping, AdamW) on
    the same collated batch every time."""
    opt = bench_train.Optimizer(model, cfg)
    dataset = helpers.VQADataset(rows, helpers.pixel_budget(processor), train=True)
    batch = helpers.VQACollator(processor, train=True)([dataset[i] for i in range(len(rows))])
    model.train()

    def step() -> None:
        helpers.accumulate_gradients(model, batch, BATCH, opt.scaler, opt.autocast)
        opt.step()

    return step, int(batch["attention_mask"].sum())


def measure(model, processor, rows, cfg: helpers.Config, args) -> dict:
    step, tokens = step_fn(model, processor, rows, cfg)
    for _ in range(args.warmup):
        step()
    common.sync()
    common.reset_peak()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    common.sync()
    seconds = (time.perf_counter() - start) / args.steps
    timed = {"step_s": seconds, "samples_per_s": BATCH / seconds, "tokens_per_step": tokens}
    return timed | {"peak_gib": common.peak_gib()} | common.profiled_call(step, args.top)


def profile_model(name: str, args, rows) -> dict:
    workdir = Path(args.workdir)
    path, _ = common.random_checkpoint(name, workdir)
    results, model, loaded, with_islands, compiled = {}, None, None, False, False
    runs = [(VARIANTS[v], norms) for v in args.variants.split(",") for norms in args.norms.split(",")]
    for (label, precision, islands), norms in runs:
        precision = "fp32" if args.tiny else precision
        label += ", norms compiled" if norms == "compiled" else ""
        cfg = helpers.Config(
            profile="smoke" if args.tiny else "safe",
            model_id=str(path),
            output_dir=str(workdir / "profile-out"),
            precision=precision,
            fp32_islands=False,  # islands are added below, on the loaded fp16 model, so that fp16 loads once
            gpu_memory_cap_gib=None if args.tiny else common.T4_CAP_GIB,
            report_to=None,
            compile_norms=False,  # compiled below, after the variant's eager run (a compiled norm stays compiled)
        )
        if loaded != precision or (norms == "eager" and compiled):
            del model
            helpers.release_memory()
            model, processor = helpers.load_model_and_processor(cfg)
            helpers.set_pixel_budget(processor, cfg.image_size)
            loaded, with_islands, compiled = precision, False, False
        if islands and not with_islands:
            common.log(f"{helpers.compute_in_fp32(model, ('linear_attn',))} linear_attn modules now compute in fp32")
            with_islands = True
        if norms == "compiled" and not compiled:
            common.log(f"{helpers.compile_norms(model)} RMSNorms and the rotary embedding compiled")
            compiled = True
        peft_model = helpers.attach_lora(model, cfg)
        results[label] = measure(peft_model, processor, rows, cfg, args)
        model = helpers.detach_lora(peft_model)
        summary = {k: v for k, v in results[label].items() if k not in ("top_gpu_ops", "top_cpu_ops")}
        common.log(f"{name} {label}: {summary}")
        common.print_table(results[label]["top_gpu_ops"][:12])
    helpers.compile_norms(model, compiled=False)  # the eager rotary embedding back for the next model
    del model
    helpers.release_memory()
    for label in results:
        if "bf16" in results:
            results[label]["speed_vs_bf16"] = results[label]["samples_per_s"] / results["bf16"]["samples_per_s"]
        eager = results.get(label.removesuffix(", norms compiled"))
        if label.endswith(", norms compiled") and eager:
            results[label]["speed_vs_eager_norms"] = results[label]["samples_per_s"] / eager["samples_per_s"]
    return results


def main() -> None:
    parser = common.base_parser(__doc__.split("\n")[0])
    parser.set_defaults(models="qwen3.5-2b,qwen3.5-4b")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=20, help="ops with the most GPU (and CPU) time, per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--norms", default="eager", help="eager, compiled or both (eager,compiled): RMSNorms, rotary")
    args = parser.parse_args()
    names = ["qwen3.5-tiny"] if args.tiny else [m.strip() for m in args.models.split(",")]
    if args.tiny:
        args.warmup, args.steps = 1, 1
    rows = common.synthetic_rows(BATCH, Path(args.workdir))
    for name in names:  # built before any model loads: a loaded model caps the GPU at 14.5 GiB, too little to build 8B
        common.random_checkpoint(name, Path(args.workdir))
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"calls": [], "models": {}}  # earlier calls kept
    results["calls"].append({"models": names, "environment": common.environment(), "args": vars(args)})
    for name in names:
        results["models"][name] = profile_model(name, args, rows)
        common.write_json(args.out, results)  # after every model: a call cut short keeps what it measured
    common.print_table(
        [
            {"model": name, "variant": label, "samples_per_s": r["samples_per_s"], "gpu_busy_s": r["gpu_busy_s"]}
            | {"profiled_step_s": r["profiled_step_s"], "kernels": r["kernels"], "peak_gib": r["peak_gib"]}
            for name, variants in results["models"].items()
            for label, r in variants.items()
        ]
    )


if __name__ == "__main__":
    main()

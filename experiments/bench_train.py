"""Training speed: one QLoRA optimizer step of 16 samples, the original notebooks' loop vs. helpers' training path.

Original way (copied from the public SSAFY_AI_PJT_2025 notebooks, see `original_encode`): micro-batch 1 and gradient
accumulation 16; per sample the processor runs twice (prompt only, to find its length, then prompt + answer), and
`model(**inputs, labels=labels)` computes logits over the 151936-token vocabulary at every position of the sequence.
Project way: `helpers.VQADataset` + `helpers.VQACollator` (one processor call per 16 rows, answer-only labels) and
`helpers.accumulate_gradients` (micro-batches, logits for the last few positions only). Its micro-batch is the
largest of 16, 8, 4, 2, 1 that runs without out-of-memory under the T4 stand-in cap; it is also timed at micro-batch
1, which separates the gain of micro-batching from that of answer-only logits.

Both ways share the model (4-bit, activation checkpointing, the same LoRA adapter), the rows, the effective batch,
the GPU memory cap, the optimizer step (AdamW, GradScaler, gradient clipping as in helpers.fit) and autocast. The
original way runs transformers' own vision attention (one call per image), the project way helpers' batched one.
For the 8B size it also measures the peak memory of one training step at each memory level under the cap.

    python experiments/bench_train.py --out results/train.json              # GPU: Qwen3-VL-2B and -8B sizes
    python experiments/bench_train.py --out /tmp/train.json --tiny          # CPU check, under a minute
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

import common
import numpy as np
import torch
from common import helpers
from PIL import Image

GOAL_SPEEDUP = 3.0
EFFECTIVE_BATCH = 16
MICRO_BATCHES = (16, 8, 4, 2, 1)  # halved on out-of-memory as in helpers.fit; the first that runs is kept
ORIGINAL_MAX_LENGTH = 1024  # the original collator's truncation length (never reached by these rows)
MFU_FORMULA = (
    "MFU = 6 * decoder_params * tokens_per_s / (peak_tflops * 1e12). decoder_params: the language model's decoder "
    "layers (embeddings, lm_head and vision tower excluded); tokens: non-pad tokens (text and vision) trained on. "
    "6N per token is the standard dense-training count; for LoRA on a frozen base with activation checkpointing the "
    "real count is also about 6N (forward 2N, recomputed forward 2N, backward through activations 2N; frozen "
    "weights get no weight gradients). Attention scores, the vision tower and the original way's full-sequence "
    "lm_head are not counted: MFU measures useful work, not work done."
)


# -- What both ways share ---------------------------------------------------------------------------------------------


class Optimizer:
    """helpers.fit's AdamW, GradScaler, autocast and optimizer step (with its clipping)."""

    def __init__(self, model, cfg: helpers.Config):
        self.params, self.optimizer = helpers.make_optimizer(model, cfg)
        self.scaler, self.autocast = helpers.mixed_precision(model, cfg)
        self.max_grad_norm = cfg.max_grad_norm

    def step(self) -> None:
        helpers.optimizer_step(self.optimizer, self.scaler, self.params, self.max_grad_norm)
        self.optimizer.zero_grad(set_to_none=True)

    def discard(self) -> None:
        """After an out-of-memory: drop the partial gradients and give the cached blocks back."""
        self.optimizer.zero_grad(set_to_none=True)
        helpers.release_memory()


def peak_reserved_gib() -> float | None:
    """Peak memory the caching allocator held (what the cap limits; allocated plus fragmentation), or None on CPU."""
    if not torch.cuda.is_available():
        return None
    return sum(torch.cuda.max_memory_reserved(i) for i in range(torch.cuda.device_count())) / 2**30


def measure(step, warmup: list, timed: list, decoder_params: int, tflops: float | None, profiled=None) -> dict:
    """Run `step` on each warm-up batch untimed, then time each `timed` batch (CUDA synchronised) and summarise; then
    one step on the `profiled` batch, if given, under torch.profiler (not timed: the profiler slows it).

    `step(batch)` does one full optimizer step and returns {"samples", "tokens", "data_s"} (the project's: and "loss").
    """
    for batch in warmup:
        step(batch)
    common.sync()
    common.reset_peak()  # peak of the timed steps only (weights included)
    records = []
    for batch in timed:
        common.sync()
        start = time.perf_counter()
        record = step(batch)
        common.sync()
        records.append({**record, "step_s": time.perf_counter() - start})
    seconds = sum(r["step_s"] for r in records)
    samples, tokens = sum(r["samples"] for r in records), sum(r["tokens"] for r in records)
    tokens_per_s = tokens / seconds
    profile = common.profiled_call(lambda: step(profiled)) if profiled is not None else None
    return {
        "steps": len(records),
        "samples": samples,
        "seconds": seconds,
        "samples_per_s": samples / seconds,
        "tokens_per_sample": tokens / samples,
        "tokens_per_s": tokens_per_s,
        "data_share": sum(r["data_s"] for r in records) / seconds,  # CPU time in image loading and the processor
        "step_s": [r["step_s"] for r in records],
        "losses": [r.get("loss") for r in records],  # the project's steps: ways of computing one step should agree
        "peak_gib": common.peak_gib(),
        "peak_reserved_gib": peak_reserved_gib(),
        "mfu": 6 * decoder_params * tokens_per_s / (tflops * 1e12) if tflops else None,
        **({"profile": profile} if profile else {}),
    }


# -- Original way -----------------------------------------------------------------------------------------------------


def original_encode(processor, row: dict) -> dict:
    """One sample as the original notebooks' training collator builds it (batch size 1).

    Copied from the `DataCollator` of Junseo5/SSAFY_AI_PJT_2025, Kaggle_AllInOne_Pro2.ipynb (section 6, "Dataset &
    DataLoader"): the full-size image goes to the processor (which resizes it to its pixel budget); the processor is
    called on the prompt alone (add_generation_prompt=True) only to learn its length, then on prompt + answer; labels
    are the full input ids with pads and the first prompt_len tokens set to -100. The prompt text is helpers'
    (build_messages) so that both ways train on identical tokens; the notebooks' own prompt differs only in wording.
    Masking the prompt changes no compute: the model still returns logits for every position and the loss runs
    over all of them (the baseline notebook 251023_Baseline.ipynb, with labels = input_ids, costs the same).
    """
    with Image.open(row["image_path"]) as image:
        image = image.convert("RGB")
    prompt = processor.apply_chat_template(helpers.build_messages(row), tokenize=False, add_generation_prompt=True)
    full = processor.apply_chat_template(
        helpers.build_messages(row, answer=row["answer"]), tokenize=False, add_generation_prompt=False
    )
    kwargs = dict(return_tensors="pt", padding=True, truncation=True, max_length=ORIGINAL_MAX_LENGTH)
    enc_prompt = processor(images=[image], text=[prompt], **kwargs)
    enc_full = processor(images=[image], text=[full], **kwargs)
    labels = enc_full["input_ids"].clone()
    labels[enc_full["attention_mask"] == 0] = -100
    for i in range(labels.size(0)):
        nonpad = torch.nonzero(enc_full["attention_mask"][i].bool(), as_tuple=False).squeeze(-1)
        labels[i, nonpad[: int(enc_prompt["attention_mask"][i].sum())]] = -100
    enc_full["labels"] = labels
    return dict(enc_full)


def original_step(model, processor, rows: list[dict], opt: Optimizer) -> dict:
    """The original training loop for one optimizer step: `len(rows)` micro-batches of 1, loss / GRAD_ACCUM each."""
    device = helpers.input_device(model)
    data_s, tokens = 0.0, 0
    for row in rows:
        start = time.perf_counter()
        batch = {k: v.to(device) for k, v in original_encode(processor, row).items()}
        data_s += time.perf_counter() - start
        tokens += int(batch["attention_mask"].sum())
        with opt.autocast():
            loss = model(**batch).loss / len(rows)
        opt.scaler.scale(loss).backward()
        loss.item()  # the notebooks log the running loss every micro-batch (a host sync each time)
        del loss, batch
    opt.step()
    return {"samples": len(rows), "tokens": tokens, "data_s": data_s}


def original_way(model, processor, cfg, rows: list[dict], batches, steps: int, info: dict, tflops) -> dict:
    opt = Optimizer(model, cfg)
    warmup = [[rows[i] for i in batches[0][:2]]]  # two samples and an optimizer step: kernels, AdamW state
    timed = [[rows[i] for i in b] for b in batches[1 : 1 + steps]]
    model.train()
    with common.image_by_image_vision_attention(model):
        step = lambda b: original_step(model, processor, b, opt)  # noqa: E731
        result = measure(step, warmup, timed, info["decoder_params"], tflops)
    return {"micro_batch": 1, "grad_accum": EFFECTIVE_BATCH, **result}


# -- Project way ------------------------------------------------------------------------------------------------------


def collate_here(dataset, collator):
    """project_step's `next_batch` that collates the rows in the main process."""
    return lambda indices: collator([dataset[i] for i in indices])


def project_step(model, next_batch, indices: list[int], micro_batch: int, opt: Optimizer) -> dict:
    """What helpers.fit does for one optimizer step; data_s: the time spent waiting for the batch."""
    start = time.perf_counter()
    batch = next_batch(indices)
    data_s = time.perf_counter() - start
    loss = helpers.accumulate_gradients(model, batch, micro_batch, opt.scaler, opt.autocast)
    opt.step()
    return {"samples": len(indices), "tokens": int(batch["attention_mask"].sum()), "data_s": data_s, "loss": loss}


def project_way(
    model,
    processor,
    cfg,
    df,
    batches,
    steps: int,
    micro_batch: int,
    info: dict,
    tflops,
    workers: int = 0,
    profile: bool = False,
) -> dict:
    """Timed steps of the project's way. Batches are collated in the main process (workers=0: conservative, the
    CPU time is in every step), or by `workers` DataLoader processes overlapping the GPU as in helpers.fit. With
    `profile`, one more step after them (the next batch) runs under torch.profiler."""
    dataset = helpers.VQADataset(df, helpers.pixel_budget(processor), train=True)
    collator = helpers.VQACollator(processor, train=True)
    opt = Optimizer(model, cfg)
    model.train()
    collate = collate_here(dataset, collator)
    # The loader yields the warm-up and timed batches in the order measure() asks for them.
    used = 1 + steps + profile  # the warm-up batch, the timed ones, the profiled one
    loader = iter(helpers.make_loader(dataset, collator, batches[:used], workers)) if workers else None

    def next_batch(indices):
        return next(loader) if loader else collate(indices)

    def step(indices):
        return project_step(model, next_batch, indices, micro_batch, opt)

    try:
        profiled = batches[1 + steps] if profile else None
        result = measure(step, batches[:1], batches[1 : 1 + steps], info["decoder_params"], tflops, profiled)
    except BaseException:
        opt.discard()
        raise
    return {"micro_batch": micro_batch, "grad_accum": -(-EFFECTIVE_BATCH // micro_batch), **result}


def project_way_auto(
    model, processor, cfg, df, batches, steps: int, info: dict, tflops, workers: int = 0, profile: bool = False
) -> dict:
    """The largest micro-batch that runs the warm-up and timed steps without out-of-memory (effective batch 16): from
    16 down, halving on out-of-memory as helpers.fit does."""

    def attempt(micro_batch: int) -> dict:
        common.log(f"  micro-batch {micro_batch}")
        return project_way(model, processor, cfg, df, batches, steps, micro_batch, info, tflops, workers, profile)

    result, micro_batch = helpers.halve_on_out_of_memory(attempt, MICRO_BATCHES[0], cfg, "in training", "micro-batch")
    tried = {m: "out of memory" for m in MICRO_BATCHES if m > micro_batch}
    return {**result, "micro_batches_tried": {**tried, micro_batch: "ok"}}


# -- Memory levels ----------------------------------------------------------------------------------------------------


def memory_levels(model, processor, df, checkpoint: Path, workdir: Path, cap: float | None):
    """Peak memory of one training step (two micro-batches of the longest rows) at each memory level, under the cap.

    Each level gets its image size (processor and dataset) and a fresh LoRA adapter of its rank. Returns the model
    (with the last level's adapter) and {level: result}; an out-of-memory means the level does not fit.
    """
    longest = list(np.argsort(helpers.prompt_lengths(df))[::-1])
    levels = {}
    for level in helpers.MEMORY_LEVELS:
        cfg = helpers.Config(profile=level, model_id=str(checkpoint), output_dir=str(workdir / "out"))
        budget = helpers.set_pixel_budget(processor, cfg.image_size)
        model = helpers.attach_lora(helpers.detach_lora(model), cfg)
        model.train()
        dataset = helpers.VQADataset(df, budget, train=True)
        collator = helpers.VQACollator(processor, train=True)
        indices = [int(i) for i in longest[: 2 * cfg.batch_size]]
        opt = Optimizer(model, cfg)
        spec = {"image_size": cfg.image_size, "lora_r": cfg.lora_r, "micro_batch": cfg.batch_size}
        common.reset_peak()
        start = time.perf_counter()
        error = None
        try:
            record = project_step(model, collate_here(dataset, collator), indices, cfg.batch_size, opt)
            common.sync()
        except Exception as e:
            if not helpers.is_out_of_memory(e):
                raise
            error = str(e).splitlines()[0][:200]
        if error is None:
            peak, reserved = common.peak_gib(), peak_reserved_gib()
            levels[level] = {**spec, "fits": True, "peak_gib": peak, "peak_reserved_gib": reserved}
            levels[level]["headroom_gib"] = cap - reserved if cap else None  # what the cap leaves above the peak
            levels[level].update(tokens_per_sample=record["tokens"] / len(indices), step_s=time.perf_counter() - start)
        else:
            opt.discard()
            levels[level] = {**spec, "fits": False, "peak_gib": common.peak_gib(), "error": error}
        common.log(f"  level {level}: {levels[level]}")
        del opt
    return model, levels


# -- One model ---------------------------------------------------------------------------------------------------------


def bench_model(name: str, args, df, checkpoint: Path, info: dict, results: dict, save) -> None:
    """Fills `results`, calling `save()` after each phase so that a run cut short keeps what it measured."""
    workdir = Path(args.workdir)
    tflops = common.peak_tflops(args.peak_tflops)
    # Loading runs uncapped (a transient spike while quantizing must not cost the measurement); its peak is recorded.
    common.cap_gpu_memory(1e6)
    common.reset_peak()
    model, processor, cfg, load_s = common.load(checkpoint, workdir, image_size=args.image_size)
    results.update(checkpoint=info, load_s=load_s, weights_gib=common.allocated_gib(), load_peak_gib=common.peak_gib())
    results["image_size"] = cfg.image_size
    common.cap_gpu_memory(args.cap)  # every training step below runs under the T4 stand-in cap
    model = helpers.attach_lora(model, cfg)
    results["lora"] = {"r": cfg.lora_r, "targets": list(cfg.lora_targets)}
    results["trainable_params"] = common.trainable_params(model)
    rows = df.to_dict("records")
    batches = helpers.length_grouped_batches(helpers.prompt_lengths(df), EFFECTIVE_BATCH, seed=0)

    common.log(f"{name}: original way (micro-batch 1, 2 processor calls, full logits), {args.orig_steps} step(s)")
    original = original_way(model, processor, cfg, rows, batches, args.orig_steps, info, tflops)
    results["original"] = original
    common.log(f"{name}: original {original['samples_per_s']:.2f} samples/s, peak {original['peak_gib']} GiB")
    save()

    common.log(f"{name}: project way, largest micro-batch of {MICRO_BATCHES} that fits, {args.steps} step(s)")
    project = project_way_auto(model, processor, cfg, df, batches, args.steps, info, tflops)
    project["speedup"] = project["samples_per_s"] / original["samples_per_s"]
    results["project"] = project
    results.update(speedup=project["speedup"], goal_speedup=GOAL_SPEEDUP, meets_goal=project["speedup"] >= GOAL_SPEEDUP)
    common.log(
        f"{name}: project micro-batch {project['micro_batch']}: {project['samples_per_s']:.2f} samples/s "
        f"({project['speedup']:.1f}x), peak {project['peak_gib']} GiB"
    )
    save()

    if project["micro_batch"] != 1:
        common.log(f"{name}: project way at micro-batch 1 (answer-only logits alone), {args.steps} step(s)")
        mb1 = project_way(model, processor, cfg, df, batches, args.steps, 1, info, tflops)
    else:
        mb1 = {k: v for k, v in project.items() if k not in ("speedup", "micro_batches_tried")}
    mb1["speedup"] = mb1["samples_per_s"] / original["samples_per_s"]
    results["project_mb1"] = mb1
    common.log(f"{name}: project micro-batch 1: {mb1['samples_per_s']:.2f} samples/s ({mb1['speedup']:.1f}x)")
    save()

    if name in args.levels_models:
        common.log(f"{name}: memory levels {list(helpers.MEMORY_LEVELS)} under the {args.cap} GiB cap")
        model, results["memory_levels"] = memory_levels(model, processor, df, checkpoint, workdir, args.cap)
        save()
    del model
    helpers.release_memory()


def table_rows(results: dict) -> tuple[list[dict], list[dict]]:
    speed, levels = [], []
    for name, r in results["models"].items():
        if "error" in r:
            speed.append({"model": name, "way": f"ERROR {r['error'][:80]}"})
        ways = [("original", "original"), ("project", "project auto"), ("project_mb1", "project mb1")]
        for key, label in ways:
            if key not in r:
                continue
            w = r[key]
            speed.append({"model": name, "way": label, "micro": w["micro_batch"], "samples/s": w["samples_per_s"]})
            speed[-1].update({"tokens/s": w["tokens_per_s"], "data %": 100 * w["data_share"]})
            speed[-1].update({"peak GiB": w["peak_gib"], "MFU %": 100 * w["mfu"] if w["mfu"] else None})
            speed[-1]["speedup"] = w.get("speedup")
        for level, lv in r.get("memory_levels", {}).items():
            levels.append({"model": name, "level": level, "px": lv["image_size"], "r": lv["lora_r"]})
            levels[-1].update({"micro": lv["micro_batch"], "fits": lv["fits"], "peak GiB": lv["peak_gib"]})
            levels[-1]["headroom GiB"] = lv.get("headroom_gib")
    return speed, levels


def main() -> None:
    parser = common.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=384, help="the safe level's image size")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps of the project way")
    parser.add_argument("--orig-steps", type=int, default=2, help="timed optimizer steps of the original way")
    parser.add_argument("--cap", type=float, default=common.T4_CAP_GIB, help="GPU memory cap in GiB (T4 stand-in)")
    parser.add_argument("--levels-models", default="8b", help="models whose memory levels are measured")
    args = parser.parse_args()
    args.levels_models = [m.strip().lower() for m in args.levels_models.split(",") if m.strip()]
    if args.tiny:  # a 2-core CPU, well under a minute
        args.rows, args.steps, args.orig_steps, args.levels_models = 32, 1, 1, ["tiny"]
    needed = EFFECTIVE_BATCH * (1 + max(args.steps, args.orig_steps))
    if args.rows < needed:
        raise SystemExit(f"--rows must cover a warm-up step and the timed steps: at least {needed}")
    workdir = Path(args.workdir)
    helpers.seed_everything(0)

    started = time.perf_counter()
    df = common.synthetic_rows(args.rows, workdir)
    names = common.model_names(args)
    checkpoints = {name: common.build_random_checkpoint(name, workdir) for name in names}  # uncapped: 8B is 16 GB
    args.cap = args.cap if torch.cuda.is_available() else None
    results = {"benchmark": "training", "env": common.environment(), "models": {}}
    results["config"] = {
        "rows": args.rows,
        "effective_batch": EFFECTIVE_BATCH,
        "image_size": args.image_size,
        "profile": "safe",
        "steps": args.steps,
        "orig_steps": args.orig_steps,
        "micro_batches_tried": MICRO_BATCHES,
        "gpu_memory_cap_gib": args.cap,
        "cap_scope": "torch.cuda.set_per_process_memory_fraction for every training step; loading runs uncapped "
        "(load_peak_gib records its peak)",
        "peak_tflops": common.peak_tflops(args.peak_tflops),
        "tiny": args.tiny,
        "data": "data/train.csv rows cycled, images upscaled to 512 px, 0-3 context sentences prepended to each "
        "question; batches from helpers.length_grouped_batches (16 rows), the same rows for every way",
        "original": "micro-batch 1, grad accumulation 16; per sample 2 processor calls and model(**inputs, labels=...) "
        "(full-sequence logits); the DataCollator of Junseo5/SSAFY_AI_PJT_2025 Kaggle_AllInOne_Pro2.ipynb. "
        "Not copied: prepare_model_for_kbit_training (it would change the shared model), EMA, LoRA on the MLPs "
        "(both ways train the same adapter: helpers' targets and rank)",
        "project": "helpers.VQADataset + VQACollator (one processor call per step, answer-only labels) + "
        "helpers.accumulate_gradients (micro-batches, logits_to_keep); micro-batch: the first of micro_batches_tried "
        "that runs without out-of-memory; project_mb1: the same at micro-batch 1",
        "optimizer_step": "AdamW on the LoRA parameters, GradScaler (fp16 only), clip_grad_norm 1.0, as helpers.fit",
        "warmup": "original: one 2-sample step; project: one 16-sample step (also the micro-batch probe)",
        "throughput": "samples/s = samples / summed wall time of whole optimizer steps (CUDA synchronised); each step "
        "includes image loading and the processor in the main process (helpers.fit runs those in DataLoader "
        "workers, overlapped with the GPU, so the project way's numbers are conservative); data_share = that CPU "
        "time / step time",
        "peak_gib": "torch.cuda.max_memory_allocated over the timed steps (weights included); peak_reserved_gib: "
        "max_memory_reserved, what the cap limits; memory levels: headroom_gib = cap - peak_reserved_gib",
        "mfu": MFU_FORMULA,
        "memory_levels": "one optimizer step of 2 micro-batches of the longest rows at each helpers.MEMORY_LEVELS "
        "level (its image_size, micro-batch and a fresh LoRA of its rank) under the cap; out-of-memory = does not fit",
        "goal": f"project samples/s >= {GOAL_SPEEDUP} x original samples/s",
    }
    failed = []

    def save():
        common.write_json(args.out, results)

    for name in names:
        results["models"][name] = {}
        try:
            path, info = checkpoints[name]
            bench_model(name, args, df, path, info, results["models"][name], save)
        except Exception as error:  # keep the other model's numbers; the error is recorded and the exit code set
            traceback.print_exc()
            results["models"][name]["error"] = f"{type(error).__name__}: {error}"
            failed.append(name)
        helpers.release_memory()  # out here, where the exception no longer holds the model's tensors
        save()
    results["total_s"] = time.perf_counter() - started
    common.write_json(args.out, results)

    speed, levels = table_rows(results)
    print()
    common.print_table(speed)
    if levels:
        print()
        common.print_table(levels)
    print(f"\nresults in {args.out} ({results['total_s']:.0f} s in all)", flush=True)
    if failed:
        raise SystemExit(f"failed: {failed}")


if __name__ == "__main__":
    main()

"""Which model fits which GPU: per model, precision and memory level, the 4-bit weights, the peak of training, the
largest micro-batch that fits, and the samples per second of training and of scoring, under the T4 stand-in cap.

    python3 experiments/bench_fits.py --out experiments/results/fits.json --models qwen3.5-4b,qwen3.5-9b,qwen3-vl-8b \\
        --precisions fp16
    python3 experiments/bench_fits.py --out /tmp/fits.json --tiny    # the same code path on a CPU (fp32)

Every model is a random checkpoint at the real sizes (experiments/common.py for Qwen3-VL, bench_qwen35_fp16.py for
Qwen3.5), loaded once per precision through helpers.load_model_and_processor with every GPU capped at 14.5 GiB. At each
level (helpers.MEMORY_LEVELS: image size, LoRA rank, effective batch 16) the notebook's own code runs three times:
1. helpers.fit on one optimizer step with a fresh adapter: the fold starts at the whole effective batch in one
   micro-batch and halves it on out-of-memory (auto_micro_batch), as every fold of the notebook does. Its micro-batch
   is the level's largest that fits; this pass also warms the kernels up.
2. helpers.fit on `--steps` optimizer steps at that micro-batch, with a fresh adapter: samples per second (the fold's
   train_seconds, so without the end-of-epoch validation) and the peak GPU memory.
3. helpers.letter_log_probs on `--score-rows` rows at the notebook's eval batch (32, halved on out-of-memory): rows
   per second of one scoring pass (TTA multiplies the passes) and its peak.
A level whose micro-batch 1 does not fit is recorded as not fitting, with the error.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import common
import pandas as pd
from common import helpers

MODELS = ("qwen3-vl-2b", "qwen3-vl-8b", "qwen3.5-2b", "qwen3.5-4b", "qwen3.5-9b")  # --tiny: "qwen3.5-tiny"
TABLE = ("micro_batch", "train_samples_per_s", "train_peak_gib", "score_rows_per_s", "score_peak_gib")


def level_config(checkpoint: Path, level: str, precision: str, args, out: Path, **fields) -> helpers.Config:
    """The notebook's Config at `level` (the smoke profile for --tiny), one epoch, no early stopping."""
    return helpers.Config(
        profile="smoke" if args.tiny else level,
        model_id=str(checkpoint),
        output_dir=str(out),
        precision=precision,
        gpu_memory_cap_gib=None if args.tiny else common.T4_CAP_GIB,
        epochs=1,
        n_folds=2,
        early_stopping_patience=0,
        report_to=None,
        **fields,
    )


def fit_fresh(model, processor, folds: pd.DataFrame, cfg: helpers.Config) -> dict:
    """helpers.fit on fold 0 with a fresh adapter in an empty output folder (a checkpoint left there would resume)."""
    shutil.rmtree(cfg.out, ignore_errors=True)
    peft_model = helpers.attach_lora(model, cfg)
    result = helpers.fit(peft_model, processor, folds, 0, cfg)
    return {"peft_model": peft_model, **result}


def measure_level(model, processor, checkpoint: Path, level: str, precision: str, rows: pd.DataFrame, args) -> dict:
    out = Path(args.workdir) / "fits-out"
    cfg = level_config(checkpoint, level, precision, args, out)
    helpers.set_pixel_budget(processor, cfg.image_size)
    val = rows.iloc[: args.val_rows].assign(fold=0)
    train = rows.iloc[args.val_rows :].assign(fold=1)
    entry = {"image_size": cfg.image_size, "lora_r": cfg.lora_r, "effective_batch": cfg.effective_batch}

    # 1. the largest micro-batch, found as every fold finds it
    probe = fit_fresh(model, processor, pd.concat([val, train.iloc[: cfg.effective_batch]]), cfg)
    model = helpers.detach_lora(probe["peft_model"])
    micro_batch = probe["micro_batch"]

    # 2. training speed and peak at that micro-batch
    timed_cfg = level_config(
        checkpoint, level, precision, args, out, batch_size=micro_batch, grad_accum=cfg.effective_batch // micro_batch
    )
    steps = pd.concat([val, train.iloc[: args.steps * cfg.effective_batch]])
    common.reset_peak()
    timed = fit_fresh(model, processor, steps, timed_cfg)
    samples = len(steps) - len(val)
    entry.update(
        micro_batch=micro_batch,
        train_steps=timed["optimizer_steps"],
        skipped_steps=timed["skipped_steps"],
        train_samples_per_s=samples / timed["train_seconds"],
        train_peak_gib=common.peak_gib(),
    )

    # 3. one scoring pass at the notebook's eval batch
    score_rows = rows.iloc[: args.score_rows]
    common.reset_peak()
    start = time.perf_counter()
    helpers.letter_log_probs(timed["peft_model"], processor, score_rows, timed_cfg)
    entry.update(score_rows_per_s=len(score_rows) / (time.perf_counter() - start), score_peak_gib=common.peak_gib())
    helpers.detach_lora(timed["peft_model"])
    return entry


def main() -> None:
    parser = common.base_parser(__doc__.split("\n")[0])
    parser.set_defaults(models="qwen3.5-4b,qwen3.5-9b,qwen3-vl-8b")
    parser.add_argument("--precisions", default="fp16", help="comma-separated: fp16 (a T4's), bf16")
    parser.add_argument("--levels", default=",".join(helpers.MEMORY_LEVELS))
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per level")
    parser.add_argument("--val-rows", type=int, default=8, help="the fold's validation rows (scored after its epoch)")
    parser.add_argument("--score-rows", type=int, default=96)
    args = parser.parse_args()
    names = ["qwen3.5-tiny"] if args.tiny else [m.strip() for m in args.models.split(",")]
    precisions = ["fp32"] if args.tiny else [p.strip() for p in args.precisions.split(",")]
    levels = [lv.strip() for lv in args.levels.split(",")]
    unknown = [n for n in names if n not in (*MODELS, "qwen3.5-tiny")]
    if unknown:
        raise SystemExit(f"unknown --models {unknown}; choose from {list(MODELS)}")
    if args.tiny:
        args.steps, args.score_rows, levels = 1, 16, levels[:1]
    workdir = Path(args.workdir)
    rows = common.synthetic_rows(max(args.val_rows + args.steps * 16, args.score_rows), workdir)
    rows["id"] = [f"ROW_{i:05d}" for i in range(len(rows))]
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}  # runs of earlier calls are kept
    for name in names:
        common.lift_gpu_cap()  # a load capped it at 14.5 GiB: too little to build a 9B checkpoint on the GPU
        checkpoint = common.random_checkpoint(name.removeprefix("qwen3-vl-"), workdir)[0]  # Qwen3-VL: "8b"
        for precision in precisions:
            common.reset_peak()
            start = time.perf_counter()
            cfg = level_config(checkpoint, levels[0], precision, args, workdir / "fits-out")
            model, processor = helpers.load_model_and_processor(cfg)
            loaded = {"load_s": time.perf_counter() - start, "weights_gib": common.allocated_gib()}
            common.log(f"{name} {precision}: loaded {loaded}")
            for level in levels:  # each level needs more memory than the one before
                key = f"{name} {precision} {level}"
                entry = {"model": name, "precision": precision, "level": level, **loaded}
                try:
                    entry.update(measure_level(model, processor, checkpoint, level, precision, rows, args), fits=True)
                except RuntimeError as error:
                    if "out of memory" not in str(error):  # only helpers' out-of-memory at micro-batch 1 is a result
                        raise
                    entry.update(fits=False, error=str(error))
                entry["environment"] = common.environment()
                results[key] = entry
                common.write_json(out, results)  # after every level: a call cut short keeps what it measured
                common.log(f"{key}: {json.dumps({k: entry.get(k) for k in ('fits', *TABLE)}, default=str)}")
                if not entry["fits"]:
                    break  # the adapter that did not fit is still attached; the levels above need more memory
            del model, processor
            helpers.release_memory()
        shutil.rmtree(checkpoint)  # the GPU machine's disk holds about three 16-bit checkpoints of these sizes
    common.print_table([{"run": k, **{c: v for c, v in r.items() if c in TABLE}} for k, r in results.items()])


if __name__ == "__main__":
    main()

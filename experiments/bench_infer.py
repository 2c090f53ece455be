"""Inference speed: one generate() per sample (the original notebooks) vs. helpers.letter_log_probs (batched scoring).

Original way: per sample, the processor on that one sample with add_generation_prompt, `model.generate(
max_new_tokens=2)` and the letter parsed from the reply, with transformers' own vision attention (one call per image).
Project way: `helpers.letter_log_probs` (what predict_folds runs): length-sorted batches, one forward pass per batch,
the next-token log-probabilities of a/b/c/d, vision attention batched over images (`helpers.batch_vision_attention`).

Both read the same next-token distribution, so besides speed and peak memory the benchmark checks that they agree:
the letter with the highest logit at generate()'s first step vs. the argmax of letter_log_probs, and the largest
difference between their letter log-probabilities (left padding and batching must not change a row's answer).
A random model almost never *generates* a letter, so the parsed reply is reported but is not the agreement measure.

    python experiments/bench_infer.py --out results/infer.json              # GPU: Qwen3-VL-2B and -8B sizes
    python experiments/bench_infer.py --out /tmp/infer.json --tiny          # CPU check, under a minute
"""

from __future__ import annotations

import time
from pathlib import Path

import common
import numpy as np
import torch
from common import helpers

GOAL_SPEEDUP = 15.0


def generate_one(model, processor, row: dict, letter_ids: list[int]) -> tuple[str | None, np.ndarray]:
    """The original notebooks' loop body: one sample in, a parsed letter out (plus the first step's letter scores)."""
    device = helpers.input_device(model)
    image = helpers.load_image(row["image_path"], helpers.pixel_budget(processor))
    text = processor.apply_chat_template(helpers.build_messages(row), tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt").to(device)
    out = model.generate(
        **inputs,
        max_new_tokens=2,
        do_sample=False,
        use_cache=True,  # helpers turns the cache off for training; generate needs it
        output_logits=True,  # raw logits of each generated step, to compare with letter_log_probs
        return_dict_in_generate=True,
    )
    new_ids = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    # The random model may emit ids beyond the tiny processor's vocabulary; those decode to nothing.
    reply = processor.tokenizer.decode([i for i in new_ids if i < len(processor.tokenizer)], skip_special_tokens=True)
    reply = reply.strip().lower()
    letter = reply[:1] if reply[:1] in helpers.LETTERS else None
    first_step = out.logits[0][0].float().log_softmax(-1)[letter_ids].cpu().numpy()
    return letter, first_step


def original_way(model, processor, df, cfg, warmup: int) -> dict:
    letter_ids = helpers.letter_token_ids(processor.tokenizer)
    rows = df.to_dict("records")
    model.eval()
    with torch.no_grad(), common.image_by_image_vision_attention(model):
        for row in rows[:warmup]:
            generate_one(model, processor, row, letter_ids)
        common.sync()
        common.reset_peak()
        letters, scores, seconds = [], [], []
        for row in rows:
            start = time.perf_counter()
            letter, first_step = generate_one(model, processor, row, letter_ids)
            common.sync()
            seconds.append(time.perf_counter() - start)
            letters.append(letter)
            scores.append(first_step)
    return {
        "samples_per_s": len(rows) / sum(seconds),
        "median_sample_s": common.median(seconds),
        "peak_gib": common.peak_gib(),
        "letters": letters,
        "log_probs": np.stack(scores),
    }


def project_way(model, processor, df, cfg, batch_size: int, repeats: int) -> dict:
    cfg.eval_batch_size = batch_size
    helpers.letter_log_probs(model, processor, df.head(batch_size), cfg)  # warm-up: kernels, allocator, workers
    common.sync()
    common.reset_peak()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        log_probs = helpers.letter_log_probs(model, processor, df, cfg)
        common.sync()
        seconds.append(time.perf_counter() - start)
    return {
        "samples_per_s": len(df) / common.median(seconds),
        "seconds": seconds,
        "peak_gib": common.peak_gib(),
        "log_probs": log_probs,
    }


def agreement(original: dict, project: dict) -> dict:
    """On the rows both ways scored (the original way may score only the first --original-rows)."""
    first_step = original["log_probs"].argmax(1)
    project_log_probs = project["log_probs"][: len(first_step)]
    scored = project_log_probs.argmax(1)
    parsed = [(i, helpers.LETTERS.index(x)) for i, x in enumerate(original["letters"]) if x is not None]
    return {
        "argmax_agreement": float((first_step == scored).mean()),
        "max_abs_log_prob_diff": float(np.abs(original["log_probs"] - project_log_probs).max()),
        "generated_a_letter": len(parsed) / len(original["letters"]),
        "parsed_letter_agreement": float(np.mean([scored[i] == j for i, j in parsed])) if parsed else None,
    }


def bench_model(name: str, args, df, workdir: Path) -> dict:
    path, checkpoint = common.build_random_checkpoint(name, workdir)
    model, processor, cfg, load_s = common.load(path, workdir, image_size=args.image_size)
    weights_gib = common.allocated_gib()
    lengths = common.token_lengths(processor, df, train=False)
    common.log(f"{name}: prompt tokens {common.length_stats(lengths)}")

    original_rows = df.head(args.original_rows or len(df))
    common.log(f"{name}: original way (generate per sample) on {len(original_rows)} rows")
    original = original_way(model, processor, original_rows, cfg, warmup=args.warmup)
    common.log(f"{name}: original {original['samples_per_s']:.2f} samples/s, peak {original['peak_gib']} GiB")

    project = {}
    for batch_size in args.batch_sizes:
        common.log(f"{name}: project way (letter_log_probs) at batch {batch_size}, {args.repeats} repeats")
        result = project_way(model, processor, df, cfg, batch_size, args.repeats)
        result.update(agreement(original, result), speedup=result["samples_per_s"] / original["samples_per_s"])
        common.log(
            f"{name}: batch {batch_size}: {result['samples_per_s']:.2f} samples/s ({result['speedup']:.1f}x), "
            f"agreement {result['argmax_agreement']:.3f}, max |dlogp| {result['max_abs_log_prob_diff']:.3g}"
        )
        project[batch_size] = result

    best = max(project, key=lambda b: project[b]["samples_per_s"])
    del model
    helpers.release_memory()
    return {
        "checkpoint": checkpoint,
        "load_s": load_s,
        "weights_gib": weights_gib,
        "prompt_tokens": common.length_stats(lengths),
        "original": {k: v for k, v in original.items() if k != "log_probs"},
        "project": {b: {k: v for k, v in r.items() if k != "log_probs"} for b, r in project.items()},
        "best_batch_size": best,
        "speedup": project[best]["speedup"],
        "goal_speedup": GOAL_SPEEDUP,
        "meets_goal": project[best]["speedup"] >= GOAL_SPEEDUP,
    }


def main() -> None:
    parser = common.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=384, help="the safe level's image size")
    parser.add_argument("--batch-sizes", default="8,16,32", help="eval batch sizes of the project way")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of the project way (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed generate() samples first")
    parser.add_argument(
        "--original-rows",
        type=int,
        default=None,
        help="score only the first N rows the original way (its per-sample time does not depend on the row count; "
        "the project way's does, through DataLoader start-up): default all",
    )
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.tiny:  # small enough for a 2-core CPU in well under a minute
        args.rows, args.batch_sizes, args.repeats, args.warmup = 16, [4, 8], 1, 1
    workdir = Path(args.workdir)
    helpers.seed_everything(0)

    started = time.perf_counter()
    df = common.synthetic_rows(args.rows, workdir)
    results = {"benchmark": "inference", "env": common.environment(), "models": {}}
    results["config"] = {
        "rows": args.rows,
        "image_size": args.image_size,
        "batch_sizes": args.batch_sizes,
        "repeats": args.repeats,
        "warmup_samples": args.warmup,
        "original_rows": args.original_rows or args.rows,
        "profile": "safe",
        "tiny": args.tiny,
        "data": "data/train.csv rows cycled, images upscaled to 512 px then shrunk to image_size by "
        "helpers.load_image, 0-3 context sentences prepended to each question",
        "throughput": "samples/s; original: original_rows / summed per-sample time (CUDA synchronised, warm-up "
        "excluded); "
        "project: rows / median time of `repeats` full letter_log_probs passes (DataLoader start-up included)",
        "peak_gib": "torch.cuda.max_memory_allocated after a reset before each variant (weights included)",
    }
    for name in common.model_names(args):
        results["models"][name] = bench_model(name, args, df, workdir)
        common.write_json(args.out, results)
    results["total_s"] = time.perf_counter() - started
    common.write_json(args.out, results)

    table = []
    for name, r in results["models"].items():
        table.append({"model": name, "way": "generate x1", "samples/s": r["original"]["samples_per_s"]})
        table[-1].update({"peak GiB": r["original"]["peak_gib"]})
        for batch_size, p in r["project"].items():
            table.append({"model": name, "way": f"letter_log_probs b{batch_size}", "samples/s": p["samples_per_s"]})
            table[-1].update({"peak GiB": p["peak_gib"], "speedup": p["speedup"], "agree": p["argmax_agreement"]})
    print()
    common.print_table(table)
    print(f"\nresults in {args.out} ({results['total_s']:.0f} s in all)", flush=True)


if __name__ == "__main__":
    main()

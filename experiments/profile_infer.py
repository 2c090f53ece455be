"""Where a letter-scoring pass of Qwen3-VL-8B spends its time, and what two changes to the forward bought.

On the same pre-collated, length-sorted batches (so the CPU pipeline is out of the picture), the model's forwards:
  image_by_image_autocast   transformers' vision attention (one SDPA call per image) under autocast: the project's
                            way before these changes
  batched_autocast          helpers.batch_vision_attention (one SDPA call per group of equal-length images)
  batched                   ... and no autocast: what helpers.position_log_probs runs in bf16
and, apart: the input pipeline alone (DataLoader + collator, 0/2/4 workers; the time to its first batch), and
helpers.letter_log_probs end to end (pipeline and forwards overlapping). Plus the heaviest ops of one forward.

    python experiments/profile_infer.py --out results/profile.json --models 8b --rows 512
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import common
import numpy as np
import torch
from common import helpers


def loader_only(processor, df, cfg, workers: int) -> tuple[float, float]:
    """Seconds to the first batch and for the whole pass of the input pipeline alone."""
    dataset = helpers.VQADataset(df, helpers.pixel_budget(processor), train=False)
    collator = helpers.VQACollator(processor, train=False)
    start = time.perf_counter()
    first = None
    for _ in helpers.make_loader(dataset, collator, helpers.length_sorted_batches(df, cfg.eval_batch_size), workers):
        first = first or time.perf_counter() - start
    return first, time.perf_counter() - start


@torch.no_grad()
def forward_only(model, batches: list[dict], device, context, letter_ids) -> tuple[float, np.ndarray]:
    """Seconds for the model's forwards over pre-collated batches, and the letter log-probabilities they give."""
    out = []
    common.sync()
    start = time.perf_counter()
    for batch in batches:
        with context():
            logits = model(**helpers.model_inputs(batch, device), logits_to_keep=1).logits[:, -1]
        out.append(logits.float().log_softmax(-1)[:, letter_ids].cpu())
    common.sync()
    return time.perf_counter() - start, torch.cat(out).numpy()


@torch.no_grad()
def vision_only(model, batches: list[dict], device, context) -> float:
    common.sync()
    start = time.perf_counter()
    with context():
        for batch in batches:
            model.model.get_image_features(batch["pixel_values"].to(device), batch["image_grid_thw"].to(device))
    common.sync()
    return time.perf_counter() - start


@torch.no_grad()
def kernel_table(model, batch: dict, device, context, top: int = 25) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with context():
            model(**helpers.model_inputs(batch, device), logits_to_keep=1).logits.float().cpu()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
    return [
        {"name": e.key[:90], "calls": e.count, "cuda_ms": e.device_time_total / 1e3, "cpu_ms": e.cpu_time_total / 1e3}
        for e in events[:top]
    ]


def time_forwards(model, processor, batches, device, autocast: bool) -> tuple[dict, np.ndarray]:
    letter_ids = helpers.letter_token_ids(processor.tokenizer)
    context = helpers.autocast_context(device, helpers.compute_dtype()) if autocast else contextlib.nullcontext
    # Two passes: the first meets new shapes (cuDNN attention plans them).
    passes = [forward_only(model, batches, device, context, letter_ids) for _ in range(2)]
    r = {"forward_s": [seconds for seconds, _ in passes], "vision_s": vision_only(model, batches, device, context)}
    r["kernels"] = kernel_table(model, batches[len(batches) // 2], device, context)
    return r, passes[-1][1]


def main() -> None:
    parser = common.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    df = common.synthetic_rows(args.rows, workdir)
    results = {"env": common.environment(), "rows": args.rows, "batch_size": args.batch_size, "models": {}}
    for name in common.model_names(args):
        path, _ = common.build_random_checkpoint(name, workdir)
        model, processor, cfg, _ = common.load(path, workdir)
        cfg.eval_batch_size = args.batch_size
        device = helpers.input_device(model)
        r = {}
        helpers.letter_log_probs(model, processor, df.head(args.batch_size), cfg)  # warm-up
        for workers in (0, 2, 4):
            r[f"loader_first_batch_s_workers{workers}"], r[f"loader_s_workers{workers}"] = loader_only(
                processor, df, cfg, workers
            )
            common.log(f"{name}: loader only, {workers} workers: {r[f'loader_s_workers{workers}']:.2f} s")
        dataset = helpers.VQADataset(df, helpers.pixel_budget(processor), train=False)
        collator = helpers.VQACollator(processor, train=False)
        batches = [collator([dataset[i] for i in b]) for b in helpers.length_sorted_batches(df, args.batch_size)]
        r["tokens_per_batch"] = [int(b["input_ids"].numel()) for b in batches]
        with common.image_by_image_vision_attention(model):
            r["image_by_image_autocast"], reference = time_forwards(model, processor, batches, device, autocast=True)
        for label, autocast in (("batched_autocast", True), ("batched", False)):
            r[label], log_probs = time_forwards(model, processor, batches, device, autocast)
            r[label]["argmax_agreement"] = float((log_probs.argmax(1) == reference.argmax(1)).mean())
            r[label]["max_abs_log_prob_diff"] = float(np.abs(log_probs - reference).max())
        for label in ("image_by_image_autocast", "batched_autocast", "batched"):
            common.log(f"{name}: {label}: " + str({k: v for k, v in r[label].items() if k != "kernels"}))
        r["letter_log_probs_s"] = []
        for _ in range(2):
            start = time.perf_counter()
            helpers.letter_log_probs(model, processor, df, cfg)
            r["letter_log_probs_s"].append(time.perf_counter() - start)
        common.log(f"{name}: helpers.letter_log_probs end to end: {r['letter_log_probs_s']}")
        common.print_table(r["batched"]["kernels"])
        results["models"][name] = r
        common.write_json(args.out, results)
        del model
        helpers.release_memory()


if __name__ == "__main__":
    main()

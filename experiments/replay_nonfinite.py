"""Which operation makes the NaN gradients of the bf16 rehearsal of Qwen3-VL-2B?

The rehearsal `2b safe bf16 ... rows=1024 seed=0` (results/rehearsal.json) had three optimizer steps with a finite
loss and a NaN gradient in every LoRA tensor, the last layer's included; optimizer_step skipped them. This replays
those steps' batches (their row ids are recorded) on the same random checkpoint, loaded and prepared as fit prepares
it, with a fresh adapter, and asks:
  - does the batch give non-finite gradients again, and does any module give a non-finite output in the forward pass
    (a NaN that the loss never sees, at padded positions, still poisons the backward: 0 * NaN = NaN)?
  - with which attention kernel: SDPA restricted to each backend in turn, and eager attention;
  - for which rows: each row alone (no padding at all);
  - which backward operation first produces it (torch.autograd.detect_anomaly);
  - what the fix costs: forward and backward of a recorded batch timed with each backend.
helpers.load_model_and_processor now turns cuDNN's attention off, so "as_loaded" is the project's way, and each
"sdpa_*" entry takes one backend only (cuDNN included) for its pass. results/replay.json was made when training batches
were left-padded and masked; they are right-padded now, and unmasked on GPUs with flash attention
(helpers.padding_mask_needed), which a replay today runs.

    bash experiments/run_gpu.sh replay    # on the GPU machine: results/replay.json
"""

import argparse
import contextlib
import json
import time
import traceback
from pathlib import Path

import common
import pandas as pd
import rehearse
import torch
from common import helpers
from torch.nn.attention import SDPBackend, sdpa_kernel

RUN = "2b safe bf16 parallel=off gpus=1 rows=1024 seed=0 (cuDNN attention on)"  # before the fix
BACKENDS = {
    "math": SDPBackend.MATH,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
}


def recorded_batches() -> list[dict]:
    """The non-finite steps of the run, with their fold and row ids."""
    entry = json.loads((common.ROOT / "experiments/results/rehearsal.json").read_text())[RUN]
    return [
        {"fold": fold["fold"], "step": step["step"], "ids": step["ids"], "recorded_loss": step["loss"]}
        for fold in entry["folds"]
        for step in fold["nonfinite_steps"]
    ]


def nonfinite_outputs(model):
    """Forward hooks that list the modules whose output holds a NaN or inf, in the order they ran."""
    found, handles = [], []

    def hook(module, inputs, output):
        tensor = output[0] if isinstance(output, tuple) else output
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = ~torch.isfinite(tensor)
            where = bad.nonzero()[:, : min(2, tensor.dim())].unique(dim=0)[:4].tolist()  # (row, position) of some
            found.append({"module": names[module], "count": int(bad.sum()), "first_indices": where})

    names = {module: name for name, module in model.named_modules()}
    for module in names:
        handles.append(module.register_forward_hook(hook))
    return found, handles


def grad_report(model) -> dict:
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
    return {"lora_tensors": len(grads), "nonfinite_grad_tensors": len(bad), "first_nonfinite": bad[:2]}


def one_pass(model, batch: dict, autocast, *, hooks: bool = False, anomaly: bool = False) -> dict:
    """Forward and backward of the whole batch as accumulate_gradients does them (one micro-batch)."""
    model.zero_grad(set_to_none=True)
    found, handles = nonfinite_outputs(model) if hooks else ([], [])
    result = {}
    try:
        with torch.autograd.detect_anomaly(check_nan=True) if anomaly else contextlib.nullcontext():
            with autocast():
                loss = helpers.answer_loss_sum(model, batch)
            n_tokens = int((batch["labels"] != -100).sum())
            (loss / n_tokens).backward()
        result["loss"] = loss.item() / n_tokens
        result.update(grad_report(model))
    except RuntimeError as error:  # anomaly mode raises at the first backward op that returns NaN
        result["anomaly" if anomaly else "error"] = str(error)[:600]
        result["trace"] = [line.strip() for line in traceback.format_exc().splitlines() if "File" in line][-6:]
    finally:
        for handle in handles:
            handle.remove()
    if hooks:
        result["nonfinite_forward_outputs"] = found[:12]
        result["nonfinite_forward_modules"] = len(found)
    model.zero_grad(set_to_none=True)
    return result


def time_passes(model, batch: dict, autocast, repeats: int = 5) -> float | None:
    """Median seconds of one forward and backward over the batch, after one warm-up pass."""
    times = []
    for _ in range(repeats + 1):
        common.sync()
        start = time.perf_counter()
        if "error" in one_pass(model, batch, autocast):
            return None  # this backend cannot run here
        common.sync()
        times.append(time.perf_counter() - start)
    return round(common.median(times[1:]), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--workdir", type=Path, default=Path("/dev/shm/rehearse"))
    parser.add_argument("--per-row", type=int, default=16, help="rows of the first batch replayed alone")
    parser.add_argument("--tiny", action="store_true", help="the committed tiny model on a CPU: a check of the code")
    args = parser.parse_args()
    started = time.perf_counter()
    results = {"run": RUN, "environment": common.environment(), "batches": []}

    data = rehearse.competition_folder(args.workdir, 1024, 300)  # the rehearsal's rows (seeded), as it wrote them
    train = pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False).set_index("id", drop=False)
    train["image_path"] = train["path"]
    checkpoint = helpers.SMOKE_MODEL if args.tiny else common.build_random_checkpoint("2b", args.workdir)[0]
    cfg = helpers.Config(  # the rehearsal's weights (seeded), level, precision and seed
        profile="safe",
        model_id=str(checkpoint),
        output_dir=str(args.workdir / "replay"),
        precision="fp32" if args.tiny else "bf16",
        seed=0,
    )
    model, processor = helpers.load_model_and_processor(cfg)
    model = helpers.attach_lora(model, cfg)
    model.train()
    _, autocast = helpers.mixed_precision(model, cfg)
    budget = helpers.pixel_budget(processor)
    collate = helpers.VQACollator(processor, train=True)
    results["attention"] = model.config._attn_implementation
    results["cudnn_sdp_enabled_as_loaded"] = torch.backends.cuda.cudnn_sdp_enabled()

    def batch_of(ids: list[str]) -> dict:
        dataset = helpers.VQADataset(train.loc[ids], budget, train=True, shuffle_options=cfg.shuffle_options, seed=0)
        return collate([dataset[i] for i in range(len(dataset))])

    recorded_steps = recorded_batches()
    for recorded in recorded_steps:
        batch = batch_of(recorded["ids"])
        entry = {**recorded, "padding_per_row": (batch["attention_mask"] == 0).sum(1).tolist()}
        common.log(f"fold {recorded['fold']} step {recorded['step']}: {len(recorded['ids'])} rows")
        entry["as_loaded"] = one_pass(model, batch, autocast, hooks=True)
        common.log(f"  as loaded: {entry['as_loaded']}")
        for name, backend in BACKENDS.items():
            with sdpa_kernel([backend]):  # a backend that cannot take this mask or dtype says so in "error"
                entry[f"sdpa_{name}"] = one_pass(model, batch, autocast)
            common.log(f"  sdpa {name}: {entry[f'sdpa_{name}']}")
        entry["anomaly"] = one_pass(model, batch, autocast, anomaly=True)
        common.log(f"  anomaly: {entry['anomaly']}")
        results["batches"].append(entry)
        common.write_json(args.out, results)

    # Each row of the first batch alone: no padding, so a NaN that follows a row is in its content.
    first = recorded_steps[0]["ids"][: args.per_row]
    results["rows_alone"] = {}
    for row_id in first:
        report = one_pass(model, batch_of([row_id]), autocast)
        results["rows_alone"][row_id] = report
        common.log(f"  {row_id} alone: {report}")

    # What each backend costs: forward and backward of the first recorded batch, after a warm-up pass
    batch = batch_of(recorded_steps[0]["ids"])
    results["seconds_per_pass"] = {}
    for name in ("cudnn", "efficient", "math"):
        with sdpa_kernel([BACKENDS[name]]):
            results["seconds_per_pass"][name] = time_passes(model, batch, autocast)
    common.log(f"seconds per forward and backward: {results['seconds_per_pass']}")

    # Eager attention (no SDPA at all) on every recorded batch
    model.set_attn_implementation("eager")
    results["eager"] = [one_pass(model, batch_of(r["ids"]), autocast, hooks=True) for r in recorded_steps]
    common.log(f"eager: {results['eager']}")
    results["seconds"] = round(time.perf_counter() - started, 1)
    common.write_json(args.out, results)


if __name__ == "__main__":
    main()

"""The rehearsal: the notebook's own code cells end to end, as Run all executes them, at a real model size with
random weights, on the GPU machine standing in for Kaggle's T4 x2 (every GPU capped at 14.5 GiB, the process and its
children on 4 CPU cores).

    taskset -c 0-3 python3 experiments/rehearse.py --model 8b --level safe --precision fp16 \\
        --out experiments/results/rehearsal.json
    python3 experiments/rehearse.py --model tiny --out /tmp/rehearsal.json   # the same on a CPU: checks the script

Each run adds one entry to the results JSON (keyed by model, level, precision and GPU use): per notebook section its
wall time and peak GPU memory per GPU (this process; folds trained side by side report their own peaks per fold);
per fold the optimizer steps, skipped and non-finite steps, the micro-batch found, training seconds and the time spent
waiting for data; the peak host memory (RSS) of the process and of its largest child; whether
submission_ensemble.csv validated against sample_submission.csv and every adapter weight is finite; the CUDA
allocator's setting (--expandable-segments, on as helpers sets it) and its peak segment count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import threading
import time
from pathlib import Path

import common
import pandas as pd
import torch
from common import helpers
from safetensors.torch import load_file

NOTEBOOK = common.ROOT / "Kaggle_Qwen_VQA_AllInOne.ipynb"
# --checkpointing: the Config fields each way sets. Runs named without "checkpointing=" were made before the switch,
# all non-reentrant; in results/rehearsal_checkpointing.json the run without it is the non-reentrant one.
CHECKPOINTING = {
    "reentrant": {"reentrant_checkpointing": True, "offload_activations": False},  # the Config's default
    "reentrant-offload": {"reentrant_checkpointing": True, "offload_activations": True},
    "non-reentrant": {"reentrant_checkpointing": False, "offload_activations": False},
    "non-reentrant-offload": {"reentrant_checkpointing": False, "offload_activations": True},
}


def competition_folder(workdir: Path, train_rows: int, test_rows: int) -> Path:
    """train.csv, test.csv and sample_submission.csv in the competition's format, rows from common.synthetic_rows
    (512 px JPEGs, questions of varied length) with unique ids."""
    out = workdir / f"data-{train_rows}-{test_rows}"
    if (out / "sample_submission.csv").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rows = common.synthetic_rows(train_rows + test_rows, workdir)
    rows["path"] = rows["image_path"]
    columns = list(helpers.TRAIN_COLUMNS) + [c for c in ("task_type", "task_hint") if c in rows]
    train = rows.iloc[:train_rows].assign(id=[f"TRAIN_{i:05d}" for i in range(train_rows)])
    test = rows.iloc[train_rows:].assign(id=[f"TEST_{i:05d}" for i in range(test_rows)])
    train[columns].to_csv(out / "train.csv", index=False)
    test[[c for c in columns if c != "answer"]].to_csv(out / "test.csv", index=False)
    test.assign(answer="a")[["id", "answer"]].to_csv(out / "sample_submission.csv", index=False)
    return out


def random_checkpoint(model: str, workdir: Path) -> Path:
    """A random checkpoint at the real sizes: Qwen3-VL-2B/8B, Qwen2.5-VL-3B/7B or Qwen3.5/3.6 (common.random_checkpoint;
    Qwen3.6 has Qwen3.5's architecture), or the 48-layer Qwen3-VL-30B-A3B."""
    if model != "30b":
        return common.random_checkpoint(model.replace("qwen3.6-", "qwen3.5-"), workdir)[0]
    import bench_moe

    template = common.make_tiny_model.build_tiny_model(workdir / "tiny-moe-template", "qwen3_vl_moe")
    out = workdir / "qwen3-vl-30b-a3b-random"
    bench_moe.build_checkpoint(bench_moe.moe_config(template, bench_moe.REAL_LAYERS, tiny=False), template, out)
    return out


def notebook_sections() -> list[tuple[str, list[str]]]:
    """(section title, code cells) in notebook order; a section starts at each markdown heading '## ...'."""
    sections = [("0. Title", [])]
    for cell in json.loads(NOTEBOOK.read_text())["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown" and source.startswith("## "):
            sections.append((source.splitlines()[0][3:].strip(), []))
        elif cell["cell_type"] == "code":
            sections[-1][1].append(source)
    return [(title, cells) for title, cells in sections if cells]


def gpu_peaks_gib() -> list[float]:
    return [round(torch.cuda.max_memory_allocated(i) / 2**30, 2) for i in range(torch.cuda.device_count())]


def run_notebook(overrides: dict) -> list[dict]:
    """Every code cell in one namespace, as Run all runs them; after the Config cell, `overrides` replace its fields
    (as papermill's parameters would). Returns the wall time and peak GPU memory of each section."""
    namespace = {"display": print, "__name__": "__main__"}
    timings = []
    for title, cells in notebook_sections():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
        start = time.perf_counter()
        for source in cells:
            exec(source, namespace)  # noqa: S102 (the notebook's own code)
            if "cfg = helpers.Config(" in source:
                namespace["cfg"] = dataclasses.replace(namespace["cfg"], **overrides)
                print("rehearsal overrides:", overrides, flush=True)
        seconds = round(time.perf_counter() - start, 1)
        timings.append({"section": title, "seconds": seconds, "peak_gib": gpu_peaks_gib()})
        common.log(f"section {title}: {timings[-1]}")
    return timings


def anon_rss_gib(pid: int | str = "self") -> float:
    """Resident anonymous memory (RssAnon): what the process holds itself. ru_maxrss also counts file pages, such as
    the safetensors checkpoint that loading maps into memory, which the kernel can drop under pressure."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 2**20
    return 0.0


class AnonMemoryPeak(threading.Thread):
    """The peak RssAnon of this process and, summed, of its children (folds side by side), sampled twice a second."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_self = self.peak_children = 0.0

    def run(self):
        import psutil

        me = psutil.Process()
        while True:
            self.peak_self = max(self.peak_self, anon_rss_gib())
            children = 0.0
            for child in me.children(recursive=True):
                try:
                    children += anon_rss_gib(child.pid)
                except (FileNotFoundError, ProcessLookupError):
                    pass  # ended between listing and reading
            self.peak_children = max(self.peak_children, children)
            time.sleep(0.5)


def adapters_finite(output_dir: Path) -> bool:
    files = sorted(output_dir.glob("fold*/best_adapter/*.safetensors"))
    return bool(files) and all(torch.isfinite(t).all() for f in files for t in load_file(f).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="results JSON (one entry per run is added or replaced)")
    models = ("tiny", "2b", "8b", "30b", "qwen2.5-3b", "qwen2.5-7b")
    models += ("qwen3.5-2b", "qwen3.5-4b", "qwen3.5-9b", "qwen3.5-27b", "qwen3.6-35b-a3b")
    parser.add_argument("--model", choices=models, default="8b")
    parser.add_argument("--level", choices=tuple(helpers.MEMORY_LEVELS), default="safe")
    parser.add_argument("--precision", choices=("bf16", "fp16"), default="fp16", help="fp16: what a T4 runs")
    parser.add_argument("--parallel", choices=("auto", "on", "off"), default="auto", help="folds side by side")
    parser.add_argument("--train-rows", type=int, default=1000)
    parser.add_argument("--test-rows", type=int, default=300)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=helpers.Config.seed, help="Config.seed: folds, batch order, LoRA")
    parser.add_argument("--cap-gib", type=float, default=common.T4_CAP_GIB, help="GPU memory per GPU (T4 stand-in)")
    parser.add_argument(
        "--expandable-segments",
        choices=("on", "off"),
        default="on",
        help="the CUDA allocator's expandable segments: on is what helpers sets (PYTORCH_CUDA_ALLOC_CONF)",
    )
    parser.add_argument(
        "--quantize-vision",
        choices=("on", "off"),
        default="on",
        help="Config.quantize_vision: off keeps the vision encoder in 16 bits, as Unsloth does",
    )
    parser.add_argument(
        "--checkpointing",
        choices=tuple(CHECKPOINTING),
        default="reentrant",
        help="Config.reentrant_checkpointing and offload_activations: how the layer inputs are saved and replayed",
    )
    parser.add_argument(
        "--compile-norms",
        choices=("on", "off"),
        default="off",
        help="Config.compile_norms: on compiles the language model's RMSNorms and rotary embedding (off: the default)",
    )
    parser.add_argument(
        "--liger-kernels",
        choices=("on", "off"),
        default="on",
        help="Config.liger_kernels: on (the default since 2026-11-30) binds Liger's Triton kernels to the language "
        "model's RMSNorms, rotary embedding and SwiGLU; off runs them eager (--compile-norms on needs it off)",
    )
    parser.add_argument(
        "--padding-mask",
        choices=("on", "off"),
        default="off",
        help="on: every training step gives the model its padding mask, as a T4 does and every step did before "
        "right-padded batches (--parallel off only: it patches this process's helpers); off: "
        "helpers.padding_mask_needed decides (the default: no mask where SDPA has a fused kernel for that, flash)",
    )
    parser.add_argument(
        "--flash",
        choices=("on", "off"),
        default="on",
        help="off: SDPA's flash kernel turned off in this process, as a T4 has none (its memory-efficient and math "
        "kernels only; --parallel off only): the training batches then run with the key/value heads repeated "
        "(helpers.unmasked_attention), or masked with --padding-mask on",
    )
    parser.add_argument(
        "--rescore-validation",
        choices=("on", "off"),
        default="off",
        help="on: inference scores each fold's validation rows again, as before the best adapter kept its validation "
        "pass's scores (helpers.validation_scores; --parallel off only); off: they are taken from it",
    )
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="build the checkpoint and data, then stop (run it "
        "in a process of its own first, so that the rehearsal's host memory is the notebook's alone)",
    )
    parser.add_argument("--workdir", default="/dev/shm/rehearse" if Path("/dev/shm").exists() else "/tmp/rehearse")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    tiny = args.model == "tiny"
    if tiny:
        args.train_rows, args.test_rows, args.level = min(args.train_rows, 64), min(args.test_rows, 16), "smoke"

    started = time.perf_counter()
    data_dir = competition_folder(workdir, args.train_rows, args.test_rows)
    model_id = helpers.SMOKE_MODEL if tiny else str(random_checkpoint(args.model, workdir))
    prepare_s = time.perf_counter() - started
    if args.prepare_only:
        common.log(f"prepared {data_dir} and {model_id} in {prepare_s:.0f} s")
        return
    # Before anything allocates on the GPU, when torch reads it (helpers' import set the default already)
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = f"expandable_segments:{args.expandable_segments == 'on'}"
    parallel = {"auto": None, "on": True, "off": False}[args.parallel]
    name = f"{args.model} {args.level} {args.precision} parallel={args.parallel} gpus={torch.cuda.device_count()}"
    name += f" rows={args.train_rows} seed={args.seed} expandable={args.expandable_segments}"
    name += " vision=16bit" if args.quantize_vision == "off" else ""  # named only when off, as before the switch
    name += f" checkpointing={args.checkpointing}"
    name += f" folds={args.folds}" if args.folds != 2 else ""  # named only when not 2, as before --folds was varied
    compile_norms = args.compile_norms == "on" and torch.cuda.is_available()
    name += " norms=compiled" if compile_norms else ""  # runs named without it ran them eager
    liger_kernels = args.liger_kernels == "on" and torch.cuda.is_available()
    if compile_norms and liger_kernels:
        raise SystemExit("--compile-norms on needs --liger-kernels off: both fuse the same norms")
    name += " norms=liger" if liger_kernels else ""  # runs named without it before 2026-11-30 ran them eager
    # Runs named without "padding-mask=on" ran masked, left-padded, until f7377c9; padding_mask_needed's way since
    if args.padding_mask == "on":
        if parallel is not False:
            raise SystemExit("--padding-mask on needs --parallel off: folds side by side train in processes of theirs")
        helpers.padding_mask_needed = lambda model: True
        name += " padding-mask=on"
    # Runs named without "rescore-validation=on" scored the validation rows again until 89413fd; they are taken since
    if args.rescore_validation == "on":
        if parallel is not False:
            raise SystemExit("--rescore-validation on needs --parallel off: side by side, folds score in processes")
        helpers.validation_scores = lambda adapter, rows, cfg: {}
        name += " rescore-validation=on"
    if args.flash == "off":
        if parallel is not False:
            raise SystemExit("--flash off needs --parallel off: folds side by side train in processes of theirs")
        torch.backends.cuda.enable_flash_sdp(False)
        name += " flash=off"
    output_dir = workdir / "runs" / name.replace(" ", "_").replace("=", "-")
    if output_dir.exists():
        import shutil

        shutil.rmtree(output_dir)
    os.environ.update(VQA_PROFILE=args.level, VQA_DATA_DIR=str(data_dir), VQA_OUTPUT_DIR=str(output_dir))
    overrides = dict(model_id=model_id, n_folds=args.folds, epochs=args.epochs, parallel_folds=parallel, seed=args.seed)
    overrides["quantize_vision"] = args.quantize_vision == "on"
    overrides.update(CHECKPOINTING[args.checkpointing])
    overrides["compile_norms"] = compile_norms
    overrides["liger_kernels"] = liger_kernels
    if not tiny:
        overrides.update(precision=args.precision, gpu_memory_cap_gib=args.cap_gib)
    entry = {
        "run": name,
        "args": vars(args),
        "environment": common.environment(),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "prepare_s": round(prepare_s, 1),
        "alloc_conf": os.environ["PYTORCH_CUDA_ALLOC_CONF"],
    }
    common.log(f"rehearsal {name}: data {data_dir}, model {model_id}")
    anon_peak = AnonMemoryPeak()
    anon_peak.start()
    try:
        entry["sections"] = run_notebook(overrides)
    except BaseException as error:  # recorded, then raised: a failed rehearsal is a result too, and so is one
        # stopped by its timeout (SIGINT: KeyboardInterrupt), whose total_s is then the limit, not the run's length
        entry["error"] = f"{type(error).__name__}: {error}"
        raise
    finally:
        entry["total_s"] = round(time.perf_counter() - started, 1)
        entry["folds"] = [
            {k: v for k, v in json.loads(p.read_text()).items() if k != "history"}
            for p in sorted(output_dir.glob("fold*/result.json"))
        ]
        entry["host_peak_rss_gib"] = {
            "self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "largest_child": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
        }
        entry["host_peak_anon_gib"] = {
            "self": round(anon_peak.peak_self, 2),
            "children_together": round(anon_peak.peak_children, 2),
        }
        submission = output_dir / "submission_ensemble.csv"
        if submission.exists():
            sample = pd.read_csv(data_dir / "sample_submission.csv", dtype=str)
            helpers.validate_submission(pd.read_csv(submission, dtype=str, keep_default_na=False), sample)
            entry["submission_valid"] = True
        entry["adapters_finite"] = adapters_finite(output_dir)
        # Which allocator ran: dozens of segments without expandable segments, 0 with them (torch does not count them)
        entry["gpu_segments_peak"] = [
            torch.cuda.memory_stats(i).get("segment.all.peak") for i in range(torch.cuda.device_count())
        ]
        results = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
        results[name] = entry
        common.write_json(args.out, results)
        common.log(f"rehearsal {name}: {json.dumps({k: entry.get(k) for k in ('total_s', 'folds')}, default=str)}")


if __name__ == "__main__":
    main()

"""Where each model's 4-bit weights go on Kaggle's GPUs, as the notebook plans it before loading: on a CPU, no weights.

    python3 experiments/plan_fits.py --out experiments/results/plan.json

For every model the notebook knows, at its real sizes (config only: experiments/common.py for Qwen3-VL,
bench_moe.py for Qwen3-VL-30B-A3B, bench_qwen35_fp16.py for Qwen3.5 and Qwen3.6), helpers.plan_device_map plans the
4-bit NF4 load as a GPU loads it (helpers.quantization_kwargs: an MoE's experts too) for one T4 and for two,
each counted at 14.5 GiB, the T4 stand-in cap of every GPU measurement here. Recorded: the 4-bit weights as
transformers' quantizer counts them on a meta-device model, whether one T4 holds them with
helpers.ACTIVATION_RESERVE_GIB to spare (else the planner's error), and on two T4s the GPUs used and the weights and
room left on each. Where results/fits.json loaded the same model on a GPU, its measured weights stand beside. Also
the vision encoder's weights in 4 and in 16 bits, and the model's with it in 16 (Config(quantize_vision=False)).

This is the plan, not a run: what a training step needs beside the weights (the measured peaks: 3.3 GiB above the
weights for Qwen3-VL-8B at micro-batch 16 and 384 px, 5.4 GiB for Qwen3.5-9B) is measured only for the models that
fit one GPU. The 2-GPU models' peaks and speed need two GPUs (nvidia-h200-x2).
"""

from __future__ import annotations

import json
from pathlib import Path

import bench_moe
import bench_qwen35_fp16
import common
import torch
from common import helpers

MODELS = (
    "qwen3-vl-2b",
    "qwen3-vl-8b",
    "qwen3-vl-30b-a3b",
    "qwen3.5-2b",
    "qwen3.5-4b",
    "qwen3.5-9b",
    "qwen3.5-27b",
    "qwen3.6-35b-a3b",
)
GIB = 2**30


def real_size_config(name: str, workdir: Path):
    """`name`'s config at its real sizes, on the tiny model of its architecture."""
    build = common.make_tiny_model.build_tiny_model
    if name == "qwen3-vl-30b-a3b":
        template = build(workdir / "tiny-qwen3_vl_moe", "qwen3_vl_moe")
        return bench_moe.moe_config(template, bench_moe.REAL_LAYERS, tiny=False)
    if name.startswith("qwen3-vl-"):
        return common.real_size_config(name.removeprefix("qwen3-vl-"), build(workdir / "tiny-template", "qwen3_vl"))
    size = name.split("-", 1)[1]  # qwen3.5-9b -> 9b, qwen3.6-35b-a3b -> 35b-a3b (Qwen3.6 has Qwen3.5's architecture)
    return bench_qwen35_fp16.real_size_config(size, bench_qwen35_fp16.template(size, workdir))


def plan(name: str, workdir: Path, t4_gib: float) -> dict:
    folder = workdir / f"plan-{name}"
    real_size_config(name, workdir).save_pretrained(folder)
    # as a GPU loads it: on a CPU the MoE loader would leave nn.Linear unquantized, and count it in 16 bits
    quantization = helpers.quantization_kwargs(str(folder), torch.float16, on_gpu=True)["quantization_config"]
    _, _, sizes = helpers.quantized_module_sizes(str(folder), quantization, torch.float16)
    entry = {"weights_gib": sizes[""] / GIB}
    try:
        helpers.plan_device_map(str(folder), quantization, torch.float16, {0: t4_gib})
        entry["one_t4"] = "fits"
    except ValueError as error:
        entry["one_t4"] = str(error).replace(str(folder), name)
    device_map = helpers.plan_device_map(str(folder), quantization, torch.float16, {0: t4_gib, 1: t4_gib})
    per_gpu = {gpu: size / GIB for gpu, size in sorted(helpers.weights_per_gpu(device_map, sizes).items())}
    entry["t4_x2_weights_gib"] = per_gpu
    entry["t4_x2_room_gib"] = {gpu: t4_gib - gib for gpu, gib in per_gpu.items()}
    # Config(quantize_vision=False): the vision encoder in 16 bits, as Unsloth keeps it
    vision_16 = helpers.quantization_kwargs(str(folder), torch.float16, on_gpu=True, quantize_vision=False)
    _, _, sizes_16 = helpers.quantized_module_sizes(str(folder), vision_16["quantization_config"], torch.float16)
    entry["vision_encoder_gib"] = {
        "4-bit": sizes[helpers.VISION_ENCODER] / GIB,
        "16-bit": sizes_16[helpers.VISION_ENCODER] / GIB,
    }
    entry["weights_gib_vision_16bit"] = sizes_16[""] / GIB
    common.log(f"{name}: {entry}")
    return entry


def main() -> None:
    parser = common.base_parser(__doc__.split("\n")[0])
    parser.set_defaults(models=",".join(MODELS))
    parser.add_argument("--t4-gib", type=float, default=common.T4_CAP_GIB, help="GiB counted for each T4")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    fits = json.loads((common.ROOT / "experiments/results/fits.json").read_text())
    measured = {e["model"]: e["weights_gib"] for e in fits.values() if e["precision"] == "fp16"}  # after loading
    results = {"environment": common.environment(), "t4_gib": args.t4_gib, "models": {}}
    for name in [m.strip() for m in args.models.split(",")]:
        results["models"][name] = plan(name, workdir, args.t4_gib) | {"measured_weights_gib": measured.get(name)}
        common.write_json(args.out, results)
    common.print_table(
        [
            {
                "model": name,
                "4-bit GiB (planned)": r["weights_gib"],
                "measured": r["measured_weights_gib"],
                "one T4": "fits" if r["one_t4"] == "fits" else "no",
                "T4 x2 weights GiB": " + ".join(f"{g:.1f}" for g in r["t4_x2_weights_gib"].values()),
                "room GiB": " / ".join(f"{g:.1f}" for g in r["t4_x2_room_gib"].values()),
                "vision 4-bit GiB": r["vision_encoder_gib"]["4-bit"],
                "vision 16-bit GiB": r["vision_encoder_gib"]["16-bit"],
                "weights, vision 16-bit": r["weights_gib_vision_16bit"],
            }
            for name, r in results["models"].items()
        ]
    )


if __name__ == "__main__":
    main()

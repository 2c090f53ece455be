"""Qwen3-VL-30B-A3B in 4 bits: helpers' MoE loader vs. transformers' default bitsandbytes load, on random weights.

transformers' BitsAndBytesConfig quantizes nn.Linear only; Qwen3-VL-MoE's fused expert tensors stay 16-bit (about
1.1 GiB a layer). helpers.load_model_and_processor stores them in NF4 as it loads (see helpers' MoE section). This
benchmark measures both at the real widths of Qwen/Qwen3-VL-30B-A3B-Instruct, with --layers decoder layers instead of
48: the full model in bf16 (~60 GB) does not fit the benchmark machine's 64 GiB disk. The random checkpoint is written
one decoder layer per shard, never held whole, with the experts in the layout of Qwen's own files ([experts, in, out],
which transformers transposes while loading). Measured:

  helpers' loader   GPU memory per device after the load, expert bytes per layer in 16 bits and as stored, peak host
                    memory during the load (sampled), load time; then one QLoRA training step (batch 1, activation
                    checkpointing, the longest row) at each memory level's image size (384/448/512): peak GPU memory
                    and time.
  default load      BitsAndBytesConfig only, the same checkpoint: GPU memory after the load.

Weights are extrapolated to 48 layers as measured + (48 - layers) x (bytes of one decoder layer as loaded) and
compared with Kaggle's two T4s (KAGGLE_BUDGET_GIB).

    python experiments/bench_moe.py --out results/moe.json                  # GPU, 12 layers (~17 GB of disk)
    python experiments/bench_moe.py --out /tmp/moe.json --tiny              # CPU check, tiny sizes
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import common
import numpy as np
import psutil
import torch
from common import helpers

REAL_LAYERS = 48
# Two T4s as torch sees them (~14.7 GiB each), less the CUDA context and some allocator slack
KAGGLE_BUDGET_GIB = 2 * 14.0
GIB = 2**30

# Sizes from the public config.json of Qwen/Qwen3-VL-30B-A3B-Instruct (head_dim, vocabulary, rope and the vision
# patching are common.REAL_TEXT / REAL_ROPE / REAL_VISION, shared with the dense Qwen3-VL sizes).
MOE_TEXT = dict(
    hidden_size=2048,
    intermediate_size=6144,
    num_attention_heads=32,
    num_key_value_heads=4,
    num_experts=128,
    num_experts_per_tok=8,
    moe_intermediate_size=768,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    tie_word_embeddings=False,
)
MOE_VISION = dict(
    depth=27, hidden_size=1152, intermediate_size=4304, out_hidden_size=2048, deepstack_visual_indexes=[8, 16, 24]
)
EXTRAPOLATION = "bytes(48 layers) = bytes(N layers) + (48 - N) * bytes of one decoder layer as loaded (its state dict)"


# -- Random checkpoint, one decoder layer per shard --------------------------------------------------------------------


def moe_config(template_dir: Path, layers: int, tiny: bool):
    """The tiny MoE's config (its special token ids match its processor) at the real sizes, with `layers` layers."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(template_dir)
    config.text_config.num_hidden_layers = layers
    if not tiny:  # through the config objects: num_experts is an alias of num_local_experts
        config.text_config.update({**common.REAL_TEXT, **MOE_TEXT, "rope_parameters": dict(common.REAL_ROPE)})
        config.vision_config.update({**common.REAL_VISION, **MOE_VISION})
    config.tie_word_embeddings = False
    return config


def shard_of(name: str) -> str:
    """Decoder layer i's tensors go to shard "layer-i", everything else (embeddings, lm_head, vision) to "other"."""
    prefix = "model.language_model.layers."
    return f"layer-{int(name[len(prefix) :].split('.')[0]):03d}" if name.startswith(prefix) else "other"


def random_tensor(name: str, shape: torch.Size, dtype: torch.dtype, device: str) -> torch.Tensor:
    if helpers.is_expert_tensor(name):  # Qwen's files: [experts, in, out]; transformers transposes on load
        shape = (shape[0], shape[2], shape[1])
    if len(shape) == 1:  # norms start at one, biases at zero, as after a real initialisation
        fill = 0.0 if name.endswith("bias") else 1.0
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device).normal_(std=0.02)


def build_checkpoint(config, template_dir: Path, out: Path) -> dict:
    """Random weights in safetensors shards written one at a time (on the GPU if there is one, then to disk), with an
    index, the config and the tiny processor; reused if a finished one is there."""
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

    info = {"path": str(out), "layers": config.text_config.num_hidden_layers}
    if (out / "done").exists():
        common.log(f"reusing the random checkpoint in {out}")
        return {**info, "build_s": 0.0}
    start = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with torch.device("meta"):  # names and shapes only, no memory
        skeleton = AutoModelForImageTextToText.from_config(config)
    shards: dict[str, list[str]] = {}
    shapes = {name: tensor.shape for name, tensor in skeleton.state_dict().items()}
    for name in shapes:
        shards.setdefault(shard_of(name), []).append(name)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype, weight_map, total = helpers.compute_dtype(), {}, 0
    torch.manual_seed(0)
    for k, (shard, names) in enumerate(sorted(shards.items())):
        filename = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_tensor(name, shapes[name], dtype, device).cpu() for name in names}
        save_file(tensors, out / filename, metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update(dict.fromkeys(names, filename))
        del tensors
        common.log(f"  wrote {shard} ({k + 1}/{len(shards)})")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out)
    GenerationConfig.from_pretrained(template_dir).save_pretrained(out)
    AutoProcessor.from_pretrained(template_dir).save_pretrained(out)
    (out / "done").touch()  # written last: a half-written folder is rebuilt
    info.update(checkpoint_gib=total / GIB, dtype=str(dtype), build_s=time.perf_counter() - start)
    common.log(f"checkpoint of {total / GIB:.1f} GiB built in {info['build_s']:.0f} s")
    return info


# -- Measurements ------------------------------------------------------------------------------------------------------


class HostMemory:
    """Peak resident memory of this process inside the block, above its start, sampled every 5 ms, in GiB.

    rss: what the OS reports (psutil), pages of the memory-mapped checkpoint included; anon (Linux): heap only.
    """

    def __init__(self):
        self.process = psutil.Process()
        self.done = threading.Event()
        self.start = self.peak = self.read()

    def read(self) -> dict:
        values = {"rss": self.process.memory_info().rss}
        if Path("/proc/self/status").exists():
            with open("/proc/self/status") as status:
                lines = [line for line in status if line.startswith("RssAnon:")]
            values["anon"] = int(lines[0].split()[1]) * 1024
        return values

    def sample(self) -> None:
        while not self.done.is_set():
            self.peak = {key: max(value, self.peak[key]) for key, value in self.read().items()}
            time.sleep(0.005)

    def __enter__(self):
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()

    def report(self) -> dict:
        return {f"peak_{key}_gib": (self.peak[key] - self.start[key]) / GIB for key in self.peak}


def per_device_gib(stat) -> list[float] | None:
    if not torch.cuda.is_available():
        return None
    return [stat(i) / GIB for i in range(torch.cuda.device_count())]


def state_bytes(module) -> int:
    """Bytes of a module's weights as loaded: 4-bit data and statistics, or plain tensors (its state dict)."""
    return sum(t.nbytes for t in module.state_dict().values())


def weights_report(model, layers: int) -> dict:
    """Weight memory of a loaded model and its extrapolation to REAL_LAYERS (GPU allocated where there is a GPU)."""
    decoder = model.model.language_model.layers
    per_layer = np.mean([state_bytes(layer) for layer in decoder]) / GIB
    report = {"per_layer_gib": per_layer, "state_gib": state_bytes(model) / GIB}
    report["gpu_allocated_gib"] = per_device_gib(torch.cuda.memory_allocated)
    measured = sum(report["gpu_allocated_gib"]) if torch.cuda.is_available() else report["state_gib"]
    report["extrapolated"] = {
        "formula": EXTRAPOLATION,
        "measured": "GPU allocated (all devices)" if torch.cuda.is_available() else "state dict bytes (CPU run)",
        f"layers_{layers}_gib": measured,
        f"layers_{REAL_LAYERS}_gib": measured + (REAL_LAYERS - layers) * per_layer,
    }
    report["extrapolated"]["over_kaggle_budget_gib"] = report["extrapolated"][f"layers_{REAL_LAYERS}_gib"] - (
        KAGGLE_BUDGET_GIB
    )
    return report


class QLoRAStep:
    """One optimizer step as helpers.fit takes it (micro-batch 1): its AdamW, GradScaler and autocast
    (make_optimizer, mixed_precision) and helpers.optimizer_step (unscale, clip, skip a non-finite gradient)."""

    def __init__(self, model, batch: dict, cfg: helpers.Config):
        self.model, self.batch, self.max_grad_norm = model, batch, cfg.max_grad_norm
        self.params, self.optimizer = helpers.make_optimizer(model, cfg)
        self.scaler, self.autocast = helpers.mixed_precision(model, cfg)

    def __call__(self) -> float:
        loss = helpers.accumulate_gradients(self.model, self.batch, 1, self.scaler, self.autocast)
        helpers.optimizer_step(self.optimizer, self.scaler, self.params, self.max_grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        return loss


def training_steps(base, processor, rows, checkpoint: Path, workdir: Path, steps: int) -> dict:
    """Peak GPU memory and time of one QLoRA step on the longest row at each memory level's image size (batch 1)."""
    longest = rows.iloc[[int(np.argmax(helpers.prompt_lengths(rows)))]].reset_index(drop=True)
    results = {}
    for level in helpers.MEMORY_LEVELS:
        cfg = helpers.Config(profile=level, model_id=str(checkpoint), output_dir=str(workdir / "out"))
        budget = helpers.set_pixel_budget(processor, cfg.image_size)
        model = helpers.attach_lora(base, cfg)  # each level's rank
        model.train()
        dataset = helpers.VQADataset(longest, budget, train=True)
        batch = helpers.VQACollator(processor, train=True)([dataset[0]])
        step = QLoRAStep(model, batch, cfg)
        step()  # warm-up: kernels, allocator, optimizer state
        common.sync()
        common.reset_peak()
        seconds = []
        for _ in range(steps):
            start = time.perf_counter()
            loss = step()
            common.sync()
            seconds.append(time.perf_counter() - start)
        results[level] = {
            "image_size": cfg.image_size,
            "lora_r": cfg.lora_r,
            "tokens": int(batch["attention_mask"].sum()),
            "loss": loss,
            "step_s": common.median(seconds),
            "peak_gib_per_device": per_device_gib(torch.cuda.max_memory_allocated),
            "peak_gib": common.peak_gib(),
        }
        common.log(f"  {level}: {results[level]}")
        del step
        base = helpers.detach_lora(model)
    return results


def bench_helpers_loader(checkpoint: Path, layers: int, rows, workdir: Path, args) -> dict:
    cfg = helpers.Config(
        profile="safe", model_id=str(checkpoint), output_dir=str(workdir / "out"), gpu_memory_cap_gib=args.cap_gib
    )
    common.reset_peak()
    with HostMemory() as host:
        start = time.perf_counter()
        model, processor = helpers.load_model_and_processor(cfg)
        load_s = time.perf_counter() - start
    result = {"load_s": load_s, "gpu_memory_cap_gib": cfg.gpu_memory_cap_gib, **host.report()}
    result["load_peak_gib_per_device"] = per_device_gib(torch.cuda.max_memory_allocated)
    result["devices"] = sorted({str(p.device) for p in model.parameters()})  # hf_device_map is unset on one GPU
    storage = helpers.expert_storage(model)
    result["experts_per_layer"] = {
        "fp16_gib": storage["fp16_bytes"] / storage["layers"] / GIB,
        "stored_gib": storage["stored_bytes"] / storage["layers"] / GIB,
        "ratio": storage["stored_bytes"] / storage["fp16_bytes"],
    }
    result["weights"] = weights_report(model, layers)
    common.log(f"helpers loader: {load_s:.0f} s, {common.memory_note()}, host {host.report()}")
    result["training_step"] = training_steps(model, processor, rows, checkpoint, workdir, args.steps)
    weights_48 = result["weights"]["extrapolated"][f"layers_{REAL_LAYERS}_gib"]
    weights_n = result["weights"]["extrapolated"][f"layers_{layers}_gib"]
    for step in result["training_step"].values():  # activations and LoRA state on top of the extrapolated weights
        if step["peak_gib"] is not None:
            step["extrapolated_peak_48_layers_gib"] = weights_48 + step["peak_gib"] - weights_n
            step["fits_kaggle_budget"] = step["extrapolated_peak_48_layers_gib"] <= KAGGLE_BUDGET_GIB
    del model
    helpers.release_memory()
    return result


def bench_default_load(checkpoint: Path, layers: int) -> dict:
    """transformers' own 4-bit load (what the dense path passes): nn.Linear in NF4, the experts in 16 bits."""
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    dtype = helpers.compute_dtype()
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    kwargs = dict(dtype=dtype, attn_implementation="sdpa", quantization_config=quantization)
    if torch.cuda.is_available():
        kwargs["device_map"] = "auto"  # no max_memory: the point is how much it needs
    common.reset_peak()
    with HostMemory() as host:
        start = time.perf_counter()
        model = AutoModelForImageTextToText.from_pretrained(checkpoint, **kwargs)
        load_s = time.perf_counter() - start
    storage = helpers.expert_storage(model)
    result = {"load_s": load_s, **host.report(), "weights": weights_report(model, layers)}
    result["experts_per_layer"] = {"stored_gib": storage["stored_bytes"] / storage["layers"] / GIB}
    common.log(f"default load: {load_s:.0f} s, {common.memory_note()}")
    del model
    helpers.release_memory()
    return result


def main() -> None:
    parser = common.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12, help="decoder layers at the real widths (48 in the model)")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per image size (median)")
    parser.add_argument("--cap-gib", type=float, default=None, help="GPU memory per GPU (helpers' device plan)")
    parser.add_argument("--skip-default", action="store_true", help="skip transformers' default load")
    args = parser.parse_args()
    if args.tiny:
        args.layers, args.steps, args.rows = 2, 1, 4
    workdir = Path(args.workdir)
    helpers.seed_everything(0)

    started = time.perf_counter()
    template = common.make_tiny_model.build_tiny_model(workdir / "tiny-moe-template", "qwen3_vl_moe")
    config = moe_config(template, args.layers, args.tiny)
    name = "tiny" if args.tiny else f"{args.layers}-layers"
    checkpoint = workdir / f"qwen3-vl-30b-a3b-random-{name}"
    results = {"benchmark": "moe", "env": common.environment(), "kaggle_budget_gib": KAGGLE_BUDGET_GIB}
    results["config"] = {
        "hub_id": None if args.tiny else "Qwen/Qwen3-VL-30B-A3B-Instruct",
        "layers": args.layers,
        "real_layers": REAL_LAYERS,
        "tiny": args.tiny,
        "text_config": {k: getattr(config.text_config, k) for k in MOE_TEXT},
        "extrapolation": EXTRAPOLATION,
        "training_step": "batch 1, the longest synthetic row, AdamW on LoRA (each level's rank), activation "
        "checkpointing, GradScaler and autocast as helpers.fit; peak = torch.cuda.max_memory_allocated of the timed "
        "steps (weights included)",
        "host_memory": "peak above the start of the load, sampled every 5 ms",
        "kaggle_budget": "summed over both T4s; device_map places whole decoder layers (~0.3 GiB each in 4 bits), "
        "so splitting the model over two GPUs costs at most about a layer more",
    }
    results["checkpoint"] = build_checkpoint(config, template, checkpoint)
    common.write_json(args.out, results)
    rows = common.synthetic_rows(args.rows, workdir)

    common.log("helpers.load_model_and_processor (experts in 4 bits)")
    results["helpers_loader"] = bench_helpers_loader(checkpoint, args.layers, rows, workdir, args)
    common.write_json(args.out, results)
    if not args.skip_default:
        common.log("transformers' default bitsandbytes load (experts in 16 bits)")
        results["default_load"] = bench_default_load(checkpoint, args.layers)
    results["total_s"] = time.perf_counter() - started
    common.write_json(args.out, results)

    table = []
    for variant in ("helpers_loader", "default_load"):
        if variant not in results:
            continue
        weights = results[variant]["weights"]
        extrapolated = weights["extrapolated"]
        table.append(
            {
                "loader": variant,
                f"GiB ({args.layers} layers)": extrapolated[f"layers_{args.layers}_gib"],
                "GiB per layer": weights["per_layer_gib"],
                "GiB (48, extrapolated)": extrapolated[f"layers_{REAL_LAYERS}_gib"],
                f"over {KAGGLE_BUDGET_GIB:.0f} GiB": extrapolated["over_kaggle_budget_gib"],
                "load s": results[variant]["load_s"],
            }
        )
    print()
    common.print_table(table)
    steps = results["helpers_loader"]["training_step"]
    print()
    common.print_table([{"level": level, **{k: v for k, v in s.items() if k != "loss"}} for level, s in steps.items()])
    print(f"\nresults in {args.out} ({results['total_s']:.0f} s in all)", flush=True)


if __name__ == "__main__":
    main()

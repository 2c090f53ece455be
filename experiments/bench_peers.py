"""The project against the tools a competitor would pick instead: TRL's SFTTrainer and Unsloth, same model and rows.

One random checkpoint at the real size and one set of synthetic rows; each tool in a process of its own, so that
memory peaks and imports do not mix (Unsloth patches transformers when it is imported). For each precision (fp16, a
T4's, with a GradScaler; bf16) every tool trains the same LoRA (rank, alpha and targets of the `safe` level: r 8 on
the language model's q/k/v/o, and for Qwen3.5 its DeltaNet projections too) on 4-bit NF4 weights with the same
effective batch (16), image size (384) and GPU memory cap (14.5 GiB, a T4 stand-in, set after loading), then scores
rows with the trained adapter:

- project: `helpers.load_model_and_processor` + `attach_lora` + the fit step path, timed as bench_train.py times it
  (collation in the main process, the largest micro-batch that fits, and again at each peer's micro-batch for a
  comparison at equal memory); scoring: `helpers.letter_log_probs` (one forward per batch of 32).
- trl: `SFTTrainer` with the settings of TRL's examples/notebooks/sft_qwen_vl.ipynb (BitsAndBytesConfig NF4 with
  double quantization, micro-batch 2 with gradient accumulation, 8-bit AdamW, max_length None, its default gradient
  checkpointing and data collator), on a prompt-completion dataset so that the loss covers the answer only, as the
  project's does. Changed to match the project: LoRA rank, alpha and targets (the notebook: r 32 on attention and
  MLP), the model's dtype (the notebook loads float32 around the 4-bit weights; here the precision compared) and the
  accumulation (16 samples per step). Scoring: what its docs run, `model.generate` on one sample at a time (the
  chat template applied by the processor), with max_new_tokens=2: a trained model answers a letter and <|im_end|>.
- unsloth: `FastVisionModel` with the settings of Unsloth's Kaggle-Qwen3_VL_(8B)-Vision notebook (4-bit,
  use_gradient_checkpointing="unsloth", UnslothVisionDataCollator, 8-bit AdamW, micro-batch 2), the same LoRA rank
  and targets, answers only in the loss; scoring with generate as for TRL. Run where `unsloth` imports, or from
  --unsloth-site: on the GPU machine, the folder run_gpu.sh installs .whl-unsloth/ into (UNSLOTH_NOT_INSTALLED
  below); without it Unsloth is recorded as "not run: <reason>". Its settings keep the notebook's LoRA dropout 0 (the
  project's is 0.05: the `no-dropout` way below measures what that is worth).

For Qwen3.5 in fp16 the project runs its DeltaNet layers as fp32 islands (helpers.compute_in_fp32, the notebook's
default on a T4); the peers have nothing of the kind and run them as transformers does.

`--project-ways` times the project in more than one way, in the same run (PROJECT_WAYS): `no-islands` without its
fp32 islands (what they cost), `no-dropout` with LoRA dropout 0 (Unsloth's default), and `compiled` with dropout 0
and each language-model decoder layer compiled as one torch.compile region, as Unsloth compiles them; `loader` with
the rows collated by DataLoader workers, as helpers.fit does; `vision16` with the vision encoder in 16 bits, as
Unsloth keeps it; `reentrant` with torch's reentrant gradient checkpointing, as Unsloth runs it
(Config.reentrant_checkpointing), and `reentrant-compiled` with that, dropout 0 and compiled layers (Unsloth's step
without its offloading); `offload` with the layer inputs that checkpointing saves kept in CPU memory until the
backward, as Unsloth does (Config.offload_activations); `unsloth-like` with all of Unsloth's step: dropout 0,
reentrant checkpointing offloaded to the CPU, compiled layers; `reentrant-offload` with both checkpointing switches
and nothing compiled (Unsloth's memory with the project's kernels), and `offload-no-dropout` with LoRA dropout 0 as
well (Unsloth's memory and settings). Offloading is helpers.OffloadedCheckpointing (its copies on a second CUDA stream,
as Unsloth's) since 2026-11-29; `save-on-cpu` offloads as helpers did before, with torch's save_on_cpu (its copies on
the compute stream; the results made before name that way `reentrant-offload`, and the side-stream prototype
`side-stream-offload`). `fused-lora` adds each LoRA product to the base output with one addmm, as Unsloth does
(fuse_lora_products, a prototype), `fused-lora-no-dropout` with LoRA dropout 0 as well. `masked-attention` gives
the model the training batch's padding mask, as every step did before training batches were right-padded, and as a T4
does (helpers.padding_mask_needed); `rope-on-gpu` computes the rotary positions on the GPU, as the model did before
helpers.rope_positions. The default puts Liger's Triton kernels (Config.liger_kernels; liger-kernel, as TRL's
`use_liger_kernel` does) on the language model since 2026-11-30: its RMSNorms and SwiGLU MLPs and, for Qwen3-VL, its
rotary embedding; `eager-norms` runs without them, as the default did before. `conv-unbucketed` gives Qwen3.5's DeltaNet
convolutions each batch's own length, as before helpers.bucket_short_convolutions. `t4-kernels` turns SDPA's flash
kernel off before loading, as a T4 has none (its memory-efficient and math kernels left): the default then trains
unmasked with the key/value heads repeated (helpers.unmasked_attention); `t4-kernels-masked` with the mask, a T4's way
before. `--loader` feeds every way as `loader` does.

`--profile` runs one more optimizer step after the timed ones under torch.profiler, for every tool (the peers' in
their trainer, from after it collated the step's rows): the GPU's busy time, the kernels and the ops with the most GPU
and CPU time (common.profile_summary), to tell a step that waits on the CPU from one whose kernels take longer.

Training samples/s counts whole optimizer steps after one warm-up step (data preparation included, CUDA
synchronised); peak memory is torch.cuda.max_memory_allocated over the timed steps, weights included. Ratios are
project / peer within this one run.

    python experiments/bench_peers.py --out results/peers.json                        # GPU: Qwen3-VL-8B size
    python experiments/bench_peers.py --out results/peers_qwen35.json --model qwen3.5-4b  # the default model
    python experiments/bench_peers.py --out /tmp/peers.json --model tiny --precisions fp32 --steps 1 \\
        --rows 32 --score-rows 16 --generate-rows 2                                   # CPU check, no 4 bits
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import bench_train
import common
import torch
from common import helpers

EFFECTIVE_BATCH = bench_train.EFFECTIVE_BATCH  # 16, the `safe` level's
TOOLS = ("project", "trl", "unsloth")
VERSIONS = ("trl", "datasets", "unsloth", "unsloth_zoo", "xformers", "pyarrow")  # beside common.environment()'s

# How Unsloth reaches the GPU machine. A device call carries at most 64 MiB of working tree, the tracked files about
# 6 MiB of it. unsloth 2026.10.9 (the newest) is a 27.3 MiB wheel, 25 MiB of it the Unsloth Studio web app (its
# top-level `studio` package, which training never imports), and requires transformers<=5.17 (the project: >=5.21;
# the GPU machine has 5.17), trl<=1.15 and datasets<5. So .whl-unsloth/ (git-ignored, 14 MiB) holds the wheel without
# `studio` (2.2 MiB; experiments/strip_wheel.py), unsloth_zoo, torchao, trl 1.15, datasets 4.8.5 and the small
# packages they import. .whl/ (21 MiB) holds bitsandbytes without its libraries for CUDA versions other than 13.0 and
# 13.2 (6.8 instead of 41.1 MiB), so both fit one call beside .whl-peers/. run_gpu.sh installs .whl-unsloth/ with
# .whl/'s bitsandbytes, peft and qwen-vl-utils into /tmp/site-unsloth, apart from the project's /tmp/site, and the
# Unsloth worker runs on it (--unsloth-site) with the machine's own transformers.
UNSLOTH_NOT_INSTALLED = (
    "unsloth is not installed for this run: carry .whl-unsloth/ beside .whl/ and .whl-peers/ and pass "
    "--unsloth-site /tmp/site-unsloth, as run_gpu.sh's peers_unsloth does (bench_peers.py, top)"
)


def versions() -> dict:
    env = common.environment()
    for package in VERSIONS:
        try:
            env[package] = md.version(package)
        except md.PackageNotFoundError:
            env[package] = None
    return env


# -- Project -----------------------------------------------------------------------------------------------------------

# --project-ways: the name each way's run has in the results, its Config changes, and what else it does (run_project):
# "compile" each decoder layer, feed the rows from a DataLoader ("loader", cfg.num_workers processes, as helpers.fit
# does). peers_checkpointing.json was made before reentrant_checkpointing and offload_activations were Config fields,
# by the same transformers call (activation_checkpointing_enable) from here. "default" is the Config's defaults: with
# non-reentrant checkpointing in every result made before reentrant became the default (each run's settings say);
# the ways that measured against that set it explicitly, and `non-reentrant` is that old default.
COMPILED_NORMS = {"compile_norms": True, "liger_kernels": False}
PROJECT_WAYS = {
    "default": ("project", {}, ()),
    "non-reentrant": ("project, non-reentrant checkpointing", {"reentrant_checkpointing": False}, ()),
    "no-islands": ("project, no fp32 islands", {"fp32_islands": False}, ()),
    "no-dropout": ("project, LoRA dropout 0", {"lora_dropout": 0.0}, ()),
    "compiled": (
        "project, LoRA dropout 0, compiled layers",
        {"lora_dropout": 0.0, "reentrant_checkpointing": False},
        ("compile",),
    ),
    "loader": ("project, DataLoader workers", {}, ("loader",)),
    "vision16": ("project, vision encoder in 16 bits", {"quantize_vision": False}, ()),  # as Unsloth loads it
    "reentrant": ("project, reentrant checkpointing", {"reentrant_checkpointing": True}, ()),
    "reentrant-compiled": (
        "project, LoRA dropout 0, reentrant checkpointing, compiled layers",
        {"lora_dropout": 0.0, "reentrant_checkpointing": True},
        ("compile",),
    ),
    "offload": (
        "project, layer inputs offloaded to the CPU",
        {"offload_activations": True, "reentrant_checkpointing": False},
        (),
    ),
    "reentrant-offload": (  # both of Unsloth's checkpointing ways, without its compiled layers
        "project, reentrant checkpointing offloaded",
        {"reentrant_checkpointing": True, "offload_activations": True},
        (),
    ),
    "unsloth-like": (
        "project, LoRA dropout 0, reentrant checkpointing offloaded, compiled layers",
        {"lora_dropout": 0.0, "reentrant_checkpointing": True, "offload_activations": True},
        ("compile",),
    ),
    "save-on-cpu": (  # the offloading that helpers had before OffloadedCheckpointing: copies on the compute stream
        "project, reentrant checkpointing offloaded by save_on_cpu",
        {"reentrant_checkpointing": True},
        ("save-on-cpu",),
    ),
    "fused-lora": ("project, LoRA products fused (addmm)", {}, ("fused-lora",)),  # Unsloth's LoRA forward
    "fused-lora-no-dropout": (
        "project, LoRA products fused (addmm), LoRA dropout 0",
        {"lora_dropout": 0.0},
        ("fused-lora",),
    ),
    "offload-no-dropout": (  # Unsloth's memory and its settings (LoRA dropout 0), the project's kernels
        "project, reentrant checkpointing offloaded, LoRA dropout 0",
        {"reentrant_checkpointing": True, "offload_activations": True, "lora_dropout": 0.0},
        (),
    ),
    # peers_unsloth_helpers_fp16 measured the two ways below with bench_peers' prototype of helpers.compile_norms (the
    # same code), beside eager norms, the Config's default then (its "project" and other ways). Compiled was the default
    # from then until peers_qwen35_compiled (Qwen3.5-4B slower), Qwen3-VL's until rehearse-8b-compiled-x2 (the whole
    # notebook slower); off by default since.
    # Liger's kernels the default since rehearse-8b-liger-300: the ways below that compile or keep the norms eager
    # turn them off (the results before ran them without, the default then).
    "compiled-norms": ("project, RMSNorms and rotary embedding compiled", {**COMPILED_NORMS}, ()),
    "eager-norms": ("project, RMSNorms and rotary embedding eager", {"liger_kernels": False}, ()),
    "compiled-norms-no-dropout": (  # Unsloth's LoRA settings with the norms compiled: the profiled comparison
        "project, RMSNorms and rotary embedding compiled, LoRA dropout 0",
        {**COMPILED_NORMS, "lora_dropout": 0.0},
        (),
    ),
    "offload-compiled-norms": (  # Unsloth's memory (its checkpointing ways) with the norms compiled
        "project, reentrant checkpointing offloaded, RMSNorms and rotary embedding compiled",
        {"reentrant_checkpointing": True, "offload_activations": True, **COMPILED_NORMS},
        (),
    ),
    "offload-compiled-norms-fused-lora-no-dropout": (  # Unsloth's step but for compiling the matmuls with the rest
        "project, reentrant checkpointing offloaded, RMSNorms and rotary compiled, LoRA dropout 0, LoRA fused",
        {"reentrant_checkpointing": True, "offload_activations": True, "lora_dropout": 0.0, **COMPILED_NORMS},
        ("fused-lora",),
    ),
    "offload-fused-lora-no-dropout": (  # as far as the project goes towards Unsloth's step without compiling
        "project, reentrant checkpointing offloaded, LoRA dropout 0, LoRA products fused (addmm)",
        {"reentrant_checkpointing": True, "offload_activations": True, "lora_dropout": 0.0},
        ("fused-lora",),
    ),
    # Training batches went right-padded and, where SDPA has a fused kernel for the unmasked call (flash: an H200 in 16
    # bits), unmasked (helpers.padding_mask_needed) after peers_unsloth_profile_bf16; every result before ran masked.
    "masked-attention": ("project, padding mask given to the attention (a T4's way)", {}, ("masked-attention",)),
    # helpers.rope_positions computes the rotary positions on the CPU since; before, the model did on the GPU.
    "rope-on-gpu": ("project, rotary positions computed on the GPU", {}, ("rope-on-gpu",)),
    # helpers.bucket_short_convolutions pads Qwen3.5's DeltaNet convolutions to lengths that repeat (cuDNN's plans
    # reused) since; before, every batch's own length reached cuDNN.
    "conv-unbucketed": (
        "project, DeltaNet convolutions on each batch's own length (before)",
        {},
        ("conv-unbucketed",),
    ),
    # A T4's kernels: SDPA's flash off (a T4 has none), its memory-efficient and math kernels left; the default then
    # runs the training batches unmasked with the key/value heads repeated (helpers.unmasked_attention)
    "t4-kernels": ("project, flash off (a T4's kernels)", {}, ("no-flash",)),
    "t4-kernels-masked": (
        "project, flash off, padding mask given (a T4's way before)",
        {},
        ("no-flash", "masked-attention"),
    ),
}


def project_config(args) -> helpers.Config:
    return helpers.Config(
        profile="safe",
        model_id=args.checkpoint,
        output_dir=str(Path(args.workdir) / "peers-out"),
        image_size=args.image_size,
        precision=args.precision,
        **PROJECT_WAYS[args.project_way][1],
    )


def compile_decoder_layers(model) -> int:
    """Compiles each decoder layer of the language model as one region (nn.Module.compile), as Unsloth does: the
    gradient checkpoint stays around the layer, and its norms, rotary embedding, LoRA branches and residual adds are
    fused. Dynamic shapes from the first call: batches differ in length, and a recompile would fall in a timed step."""
    torch._dynamo.config.assume_static_by_default = False
    layers = [m for m in model.modules() if type(m).__name__.endswith("TextDecoderLayer")]
    for layer in layers:
        layer.compile()
    return len(layers)


def fused_lora_forward(self, x, *args, **kwargs):
    """peft's LoRA forward for one active plain adapter, as Unsloth rewrites it (unsloth_zoo/compiler.py,
    lora_forward; unsloth/kernels/utils.py, matmul_lora): the base output plus the scaled LoRA product in one addmm,
    without peft's defensive copy of the base output and its separate scale and add (three passes over each adapted
    layer's output, in the forward alone), and in the base output's dtype: the fp32 adapter weights are cast to it
    (a few KiB), where peft, without autocast (bf16), casts the input (rows x tokens x hidden) to fp32 and multiplies
    in fp32. The results of peers_fused_lora (fp16, under autocast) were made when this cast the input as peft does."""
    result = self.base_layer(x, *args, **kwargs)
    name = self.active_adapters[0]
    dtype = result.dtype
    xa = self.lora_dropout[name](x.to(dtype)) @ self.lora_A[name].weight.to(dtype).t()
    weight = self.lora_B[name].weight.to(dtype)
    shape = result.shape
    fused = torch.addmm(
        result.reshape(-1, shape[-1]), xa.reshape(-1, xa.shape[-1]), weight.t(), alpha=self.scaling[name]
    )
    return fused.view(shape)


def fuse_lora_products(model) -> int:
    """Gives every LoRA layer with one active plain adapter (no DoRA or other variant, no bias, not merged) the fused
    forward above; returns how many. A prototype: it goes into helpers only if it measures faster on the GPU."""
    import types

    from peft.tuners.lora import LoraLayer

    fused = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or len(module.active_adapters) != 1 or module.merged:
            continue
        name = module.active_adapters[0]
        if name in module.lora_variant or module.lora_B[name].bias is not None:
            continue
        module.forward = types.MethodType(fused_lora_forward, module)
        fused += 1
    return fused


def score_letters(model, processor, df, cfg) -> dict:
    """helpers.letter_log_probs on `df` after a warm-up pass on its first batch (kernels, allocator, workers)."""
    helpers.letter_log_probs(model, processor, df.head(cfg.eval_batch_size), cfg)
    common.sync()
    common.reset_peak()
    start = time.perf_counter()
    helpers.letter_log_probs(model, processor, df, cfg)
    common.sync()
    seconds = time.perf_counter() - start
    return {
        "way": f"helpers.letter_log_probs, batch {cfg.eval_batch_size}, {cfg.num_workers} DataLoader workers",
        "rows": len(df),
        "seconds": seconds,
        "rows_per_s": len(df) / seconds,
        "peak_gib": common.peak_gib(),
    }


def run_project(args, df, result: dict, save) -> None:
    cfg = project_config(args)
    extras = PROJECT_WAYS[args.project_way][2]
    if "no-flash" in extras:  # before loading: the loader asks torch which kernels take the unmasked call
        torch.backends.cuda.enable_flash_sdp(False)
    start = time.perf_counter()
    model, processor = helpers.load_model_and_processor(cfg)
    result.update(load_s=time.perf_counter() - start, weights_gib=common.allocated_gib())
    common.cap_gpu_memory(args.cap)
    model = helpers.attach_lora(model, cfg)
    result["settings"] = {
        "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout, "targets": cfg.lora_targets},
        "image_size": cfg.image_size,
        "optimizer": "AdamW (torch), GradScaler in fp16, clip 1.0",
        "vision_attention": "batched over images (helpers.batch_vision_attention)",
        "fp32_islands": cfg.fp32_islands,
    }
    result["settings"]["trainable_params"] = common.trainable_params(model)
    result["settings"]["checkpointing"] = {"reentrant": cfg.reentrant_checkpointing, "offload": cfg.offload_activations}
    result["settings"]["compile_norms"] = cfg.compile_norms and torch.cuda.is_available()
    if "compile" in extras:
        result["settings"]["compiled_layers"] = compile_decoder_layers(model)
    if "fused-lora" in extras:
        result["settings"]["fused_lora_layers"] = fuse_lora_products(model)
    liger = helpers.language_norms(model.get_base_model())[0]._get_name() == "LigerRMSNorm"  # bound by the loader
    result["settings"]["liger_kernel"] = md.version("liger-kernel") if liger else None
    buckets = hasattr(sys.modules[type(model.get_base_model()).__module__], "causal_conv1d_fn")
    if "conv-unbucketed" in extras and buckets:  # transformers' own convolution back
        helpers.replace_modeling_function(model.get_base_model(), "causal_conv1d_fn", lambda original: original)
    result["settings"]["conv_buckets"] = buckets and "conv-unbucketed" not in extras
    if "masked-attention" in extras:  # the masked SDPA call of every training step before, and of a T4's now
        helpers.padding_mask_needed = lambda model: True
    result["settings"]["padding_mask"] = helpers.padding_mask_needed(model)
    result["settings"]["text_attention"] = model.config.get_text_config()._attn_implementation
    result["settings"]["flash"] = torch.backends.cuda.flash_sdp_enabled()
    if "rope-on-gpu" in extras:  # the same get_rope_index call on the GPU's copy of its inputs, as the model made it
        on_cpu, keys = helpers.rope_positions, ("input_ids", "mm_token_type_ids", "image_grid_thw", "attention_mask")
        helpers.rope_positions = lambda model, batch, masked: on_cpu(
            model, {k: batch[k].to(helpers.input_device(model)) for k in keys}, masked
        )
    result["settings"]["rope_positions"] = "on the GPU" if "rope-on-gpu" in extras else "on the CPU"
    if "save-on-cpu" in extras:  # the offloading helpers had before OffloadedCheckpointing
        model.get_base_model().activation_checkpointing_enable({"use_reentrant": True}, offload=True)
        result["settings"]["checkpointing"]["offload"] = "torch's save_on_cpu (transformers' offload=True)"
    elif cfg.offload_activations:
        result["settings"]["checkpointing"]["offload"] = "side stream (helpers.OffloadedCheckpointing)"
    train_df = df.head(EFFECTIVE_BATCH * (1 + args.steps + args.profile))  # the rows the peers train on
    batches = helpers.length_grouped_batches(helpers.prompt_lengths(train_df), EFFECTIVE_BATCH, seed=0)
    info = {"decoder_params": None}  # for MFU, which needs the GPU's peak TFLOP/s: left out here (tflops None)
    common.log(f"project {args.precision}: training, largest micro-batch that fits, {args.steps} timed step(s)")
    workers = cfg.num_workers if "loader" in extras or args.loader else 0
    result["settings"]["dataloader_workers"] = workers
    result["train"] = bench_train.project_way_auto(
        model, processor, cfg, train_df, batches, args.steps, info, None, workers, args.profile
    )
    save()
    for micro_batch in args.micro_batches:  # the peers' micro-batches: the same speed question at equal memory
        if micro_batch == result["train"]["micro_batch"]:
            result[f"train_mb{micro_batch}"] = result["train"]  # the largest that fits: measured already
            continue
        common.log(f"project {args.precision}: training at micro-batch {micro_batch}")
        result[f"train_mb{micro_batch}"] = bench_train.project_way(
            model, processor, cfg, train_df, batches, args.steps, micro_batch, info, None, workers
        )
        save()
    common.log(f"project {args.precision}: letter scoring of {args.score_rows} rows")
    result["score"] = score_letters(model, processor, df.head(args.score_rows), cfg)


# -- What TRL and Unsloth share: SFTTrainer timing and generate() ----------------------------------------------------


def step_timer(warmup_steps: int, profiled_step: int | None = None):
    """A TrainerCallback (defined here, not at the top: the Unsloth worker must import unsloth before transformers)
    that notes when each optimizer step ends (CUDA synchronised) and resets the peak memory
    after the warm-up steps. Step k's time is from step k-1's end to its own: data, forward, backward, optimizer
    and the trainer's logging, as the project's step time covers its collation and optimizer step. Optimizer step
    `profiled_step` (0-based), the last, runs under torch.profiler: from on_step_begin, after the trainer has
    collated its micro-batches, to its end."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends, self.profiler, self.started, self.profile = [], None, None, None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == profiled_step:
                self.profiler, self.started = common.start_profiler(), time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            common.sync()
            self.ends.append(time.perf_counter())
            if len(self.ends) == warmup_steps:
                common.reset_peak()
            if self.profiler:
                self.profiler.stop()
                self.profile = common.profile_summary(self.profiler, self.ends[-1] - self.started)
                self.profiler = None

    return StepTimer()


def peer_sft_config(args, micro_batch: int, **overrides):
    """SFTConfig as both notebooks set it, with the comparison's batch, precision and step count."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(Path(args.workdir) / f"peers-out/{args.worker}"),
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=EFFECTIVE_BATCH // micro_batch,
        max_steps=1 + args.steps + args.profile,  # one warm-up step, the timed ones, the profiled one
        warmup_steps=5,
        learning_rate=2e-4,
        # bitsandbytes' 8-bit AdamW needs CUDA; the CPU check runs torch's AdamW instead
        optim="adamw_8bit" if torch.cuda.is_available() else "adamw_torch",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        fp16=args.precision == "fp16",
        bf16=args.precision == "bf16",  # SFTConfig would default to bf16 otherwise
        seed=3407,
        **overrides,
    )


def train_with_trainer(trainer, timer, micro_batch: int) -> dict:
    trainer.train()
    ends = timer.ends[: len(timer.ends) - bool(timer.profile)]  # the profiled step is not timed
    timed = [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)]  # after the warm-up step
    seconds = sum(timed)
    return {
        "micro_batch": micro_batch,
        "grad_accum": EFFECTIVE_BATCH // micro_batch,
        "steps": len(timed),
        "samples": EFFECTIVE_BATCH * len(timed),
        "seconds": seconds,
        "samples_per_s": EFFECTIVE_BATCH * len(timed) / seconds,
        "step_s": timed,
        "peak_gib": common.peak_gib(),
        "peak_reserved_gib": bench_train.peak_reserved_gib(),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        **({"profile": timer.profile} if timer.profile else {}),
    }


def messages_with_image(row: dict, budget: helpers.PixelBudget, answer: str | None = None) -> list[dict]:
    """helpers' chat messages for a row with its image (as helpers.load_image gives it) in the user turn."""
    messages = helpers.build_messages(row, answer=answer)
    messages[1]["content"][0]["image"] = helpers.load_image(row["image_path"], budget)
    return messages


def generate_one(model, processor, row: dict, budget: helpers.PixelBudget) -> None:
    """TRL's docs' inference: the processor applies the chat template and reads the image, then generate()."""
    inputs = processor.apply_chat_template(
        messages_with_image(row, budget),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    ).to(helpers.input_device(model))
    model.generate(**inputs, max_new_tokens=2, do_sample=False, use_cache=True)


def score_by_generate(model, processor, df, budget: helpers.PixelBudget) -> dict:
    rows = df.to_dict("records")
    model.eval()
    with torch.no_grad():
        for row in rows[:2]:  # warm-up
            generate_one(model, processor, row, budget)
        common.sync()
        common.reset_peak()
        start = time.perf_counter()
        for row in rows:
            generate_one(model, processor, row, budget)
        common.sync()
    seconds = time.perf_counter() - start
    return {
        "way": "model.generate(max_new_tokens=2), one sample at a time",
        "rows": len(rows),
        "seconds": seconds,
        "rows_per_s": len(rows) / seconds,
        "peak_gib": common.peak_gib(),
    }


# -- TRL --------------------------------------------------------------------------------------------------------------


def trl_dataset(df, budget: helpers.PixelBudget):
    """Prompt-completion rows with their images (TRL's VLM format): the loss then covers the completion only."""
    from datasets import Dataset

    records = []
    for row in df.to_dict("records"):
        prompt = helpers.build_messages(row)
        completion = [{"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]}]
        records.append(
            {"prompt": prompt, "completion": completion, "images": [helpers.load_image(row["image_path"], budget)]}
        )
    return Dataset.from_list(records)


def load_for_trl(args):
    """The model as TRL's notebook loads it (NF4, double quantization), in the precision compared."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    dtype = helpers.compute_dtype(args.precision)
    kwargs = {"dtype": dtype}
    if torch.cuda.is_available():  # bitsandbytes' 4 bits need CUDA; the CPU check trains unquantized
        kwargs["device_map"] = "auto"
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4",
        )
    model = AutoModelForImageTextToText.from_pretrained(args.checkpoint, **kwargs)
    processor = AutoProcessor.from_pretrained(args.checkpoint)
    budget = helpers.set_pixel_budget(processor, args.image_size)  # the same vision tokens per image as the project
    return model, processor, budget


def run_trl(args, df, result: dict, save) -> None:
    from peft import LoraConfig
    from trl import SFTTrainer

    cfg = project_config(args)
    micro_batch = args.micro_batch
    start = time.perf_counter()
    model, processor, budget = load_for_trl(args)
    result.update(load_s=time.perf_counter() - start, weights_gib=common.allocated_gib())
    common.cap_gpu_memory(args.cap)
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=helpers.lora_target_regex(cfg.lora_targets)
    )
    result["settings"] = {
        "lora": {"r": lora.r, "alpha": lora.lora_alpha, "dropout": lora.lora_dropout, "targets": cfg.lora_targets},
        "image_size": args.image_size,
        "loss": "completion only (prompt-completion dataset)",
        "vision_attention": "transformers' own (one SDPA call per image)",
    }
    timer = step_timer(warmup_steps=1, profiled_step=1 + args.steps if args.profile else None)
    trainer = SFTTrainer(
        model=model,
        args=peer_sft_config(args, micro_batch, max_length=None),
        train_dataset=trl_dataset(df.head(EFFECTIVE_BATCH * (1 + args.steps + args.profile)), budget),
        processing_class=processor,
        peft_config=lora,
        callbacks=[timer],
    )
    result["settings"]["optimizer"] = trainer.args.optim.value
    result["settings"]["trainable_params"] = common.trainable_params(trainer.model)
    if args.precision == "fp16":
        # TRL 1.16 casts QLoRA adapters to bf16 whatever the precision, and fp16's GradScaler cannot unscale bf16
        # gradients ("_amp_foreach_non_finite_check_and_unscale_cuda" not implemented for 'BFloat16'): a T4 user
        # has to cast them back, as here, to train at all.
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        result["settings"]["adapter_dtype"] = "fp32 (cast back from TRL's bf16, which fp16 training cannot unscale)"
    common.log(f"trl {args.precision}: training at micro-batch {micro_batch}, {args.steps} timed step(s)")
    result["train"] = train_with_trainer(trainer, timer, micro_batch)
    save()
    common.log(f"trl {args.precision}: generate() on {args.generate_rows} rows")
    result["score"] = score_by_generate(trainer.model, processor, df.head(args.generate_rows), budget)


# -- Unsloth ----------------------------------------------------------------------------------------------------------


def run_unsloth(args, df, result: dict, save) -> None:
    from unsloth import FastVisionModel  # first: it patches transformers, peft and trl when imported
    from unsloth.trainer import UnslothVisionDataCollator

    # isort: split
    from trl import SFTTrainer

    cfg = project_config(args)
    micro_batch = args.micro_batch
    start = time.perf_counter()
    model, processor = FastVisionModel.from_pretrained(
        args.checkpoint,
        load_in_4bit=True,
        use_gradient_checkpointing="unsloth",
        dtype=helpers.compute_dtype(args.precision),
    )
    budget = helpers.set_pixel_budget(processor, args.image_size)
    result.update(load_s=time.perf_counter() - start, weights_gib=common.allocated_gib())
    common.cap_gpu_memory(args.cap)
    model = FastVisionModel.get_peft_model(
        model,
        finetune_vision_layers=False,  # the project's targets: the language model's attention projections
        finetune_language_layers=True,
        finetune_attention_modules=True,
        finetune_mlp_modules=False,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0,
        bias="none",
        random_state=3407,
    )
    result["settings"] = {
        "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": 0, "targets": "language attention (q/k/v/o)"},
        "image_size": args.image_size,
        "loss": "responses only (UnslothVisionDataCollator train_on_responses_only)",
        "gradient_checkpointing": "unsloth",
    }
    FastVisionModel.for_training(model)
    rows = df.head(EFFECTIVE_BATCH * (1 + args.steps + args.profile)).to_dict("records")
    dataset = [{"messages": messages_with_image(row, budget, answer=row["answer"])} for row in rows]
    collator = UnslothVisionDataCollator(
        model,
        processor,
        train_on_responses_only=True,
        instruction_part="<|im_start|>user\n",
        response_part="<|im_start|>assistant\n",
    )
    timer = step_timer(warmup_steps=1, profiled_step=1 + args.steps if args.profile else None)
    config = peer_sft_config(
        args,
        micro_batch,
        remove_unused_columns=False,  # the notebook: "You MUST put the below items for vision finetuning"
        dataset_text_field="",
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=2048,
        weight_decay=0.001,
        lr_scheduler_type="linear",
    )
    trainer = SFTTrainer(
        model=model, tokenizer=processor, data_collator=collator, train_dataset=dataset, args=config, callbacks=[timer]
    )
    result["settings"]["optimizer"] = trainer.args.optim.value
    result["settings"]["trainable_params"] = common.trainable_params(trainer.model)
    common.log(f"unsloth {args.precision}: training at micro-batch {micro_batch}, {args.steps} timed step(s)")
    result["train"] = train_with_trainer(trainer, timer, micro_batch)
    save()
    FastVisionModel.for_inference(model)
    common.log(f"unsloth {args.precision}: generate() on {args.generate_rows} rows")
    result["score"] = score_by_generate(model, processor, df.head(args.generate_rows), budget)


RUNNERS = {"project": run_project, "trl": run_trl, "unsloth": run_unsloth}


def worker(args) -> None:
    """One tool in one precision, in this process; writes its result to --out after each phase."""
    result = {"tool": args.worker, "precision": args.precision, "micro_batch": args.micro_batch}

    def save():
        common.write_json(args.out, result)

    helpers.seed_everything(0)
    df = common.synthetic_rows(args.rows, Path(args.workdir))  # the parent made the images: same rows, no work
    try:
        RUNNERS[args.worker](args, df, result, save)
        result["status"] = "ok"
    except Exception as error:
        traceback.print_exc()
        result["status"] = f"error: {type(error).__name__}: {str(error)[:500]}"
    result["env"] = versions()  # after the run: Unsloth's versions only show once it imported
    save()
    if result["status"] != "ok":
        raise SystemExit(1)


# -- The parent: one process per tool and precision ------------------------------------------------------------------


def worker_command(args, tool: str, precision: str, micro_batch: int, way: str, out: Path, checkpoint: Path) -> list:
    shared = ["--model", args.model, "--workdir", args.workdir, "--rows", args.rows, "--steps", args.steps]
    shared += ["--image-size", args.image_size, "--cap", args.cap, "--score-rows", args.score_rows]
    shared += ["--generate-rows", args.generate_rows, "--micro-batches", ",".join(map(str, args.micro_batches))]
    own = ["--worker", tool, "--precision", precision, "--micro-batch", micro_batch, "--out", out]
    own += ["--project-way", way, "--checkpoint", checkpoint] + (["--loader"] if args.loader else [])
    own += ["--profile"] if args.profile else []
    return [sys.executable, __file__, *map(str, shared + own)]


def run_worker(args, tool: str, precision: str, micro_batch: int, checkpoint: Path, way: str = "default") -> dict:
    env = None
    if tool == "unsloth":
        if args.unsloth_site:  # its own packages first, and the machine's transformers rather than ours
            if not (Path(args.unsloth_site) / "unsloth").is_dir():
                return {"status": f"not run: no unsloth in {args.unsloth_site}; {UNSLOTH_NOT_INSTALLED}"}
            env = os.environ | {"PYTHONPATH": args.unsloth_site}
        elif importlib.util.find_spec("unsloth") is None:
            return {"status": f"not run: {UNSLOTH_NOT_INSTALLED}"}
    result = Path(args.workdir) / "peers" / f"{tool}-{precision}-mb{micro_batch}-{way}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    command = worker_command(args, tool, precision, micro_batch, way, result, checkpoint)
    common.log(
        f"== {tool} {precision} (micro-batch {micro_batch}): a process of its own, timeout {args.worker_timeout} s"
    )
    try:
        rc = subprocess.run(command, timeout=args.worker_timeout, env=env).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    recorded = json.loads(result.read_text()) if result.exists() else {}
    if rc == "timeout":
        recorded["status"] = f"timed out after {args.worker_timeout} s"
    elif "status" not in recorded:  # killed before it could write (out of host memory, a crash in native code)
        recorded["status"] = f"failed with exit code {rc} before recording a result (see the log)"
    return recorded


def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    if not a or not b or a.get(key) is None or b.get(key) is None:
        return None
    return a[key] / b[key]


def per_step_ratio(a: dict | None, b: dict | None) -> float | None:
    """b's median timed step over a's: a's speed over b's once both have compiled (Unsloth recompiles in its first
    steps, which its samples/s over a short run counts; over a fold of hundreds of steps the median decides)."""
    if not a or not b or not a.get("step_s") or not b.get("step_s"):
        return None
    return statistics.median(b["step_s"]) / statistics.median(a["step_s"])


def gpu_work_ratio(a: dict | None, b: dict | None) -> float | None:
    """b's GPU busy time in its profiled step over a's (--profile): a's speed over b's where the GPU's work bounds the
    step, as on a T4, whose fp16 throughput and bandwidth are both 1/15 of an H200's (experiments/README)."""
    busy = [(t or {}).get("profile", {}).get("gpu_busy_s") for t in (a, b)]
    return busy[1] / busy[0] if all(busy) else None


def ratios(runs: dict) -> dict:
    """Project / peer within this run: training samples/s at the project's micro-batch and at the peer's (equal
    memory), per step (medians), by GPU work (profiled), scoring rows/s, and peak training memory (below 1: the project
    uses less)."""
    project = runs.get("project", {})
    out = {}
    for name, peer in runs.items():
        if name.startswith("project") or "train" not in peer:
            continue
        same_micro = project.get(f"train_mb{peer['micro_batch']}")
        out[name] = {
            "train_speed": ratio(project.get("train"), peer["train"], "samples_per_s"),
            "train_speed_per_step": per_step_ratio(project.get("train"), peer["train"]),
            "train_gpu_work": gpu_work_ratio(project.get("train"), peer["train"]),
            "train_speed_at_peer_micro_batch": ratio(same_micro, peer["train"], "samples_per_s"),
            "train_peak_memory": ratio(project.get("train"), peer["train"], "peak_gib"),
            "train_peak_memory_at_peer_micro_batch": ratio(same_micro, peer["train"], "peak_gib"),
            "score_speed": ratio(project.get("score"), peer.get("score"), "rows_per_s"),
        }
    for name, other in runs.items():  # the project's default way / its other ways: below 1, the other way is faster
        if name.startswith("project,") and "train" in other:
            out[name] = {
                "train_speed": ratio(project.get("train"), other["train"], "samples_per_s"),
                "train_speed_per_step": per_step_ratio(project.get("train"), other["train"]),
                "train_gpu_work": gpu_work_ratio(project.get("train"), other["train"]),
                "train_peak_memory": ratio(project.get("train"), other["train"], "peak_gib"),
            }
    return out


def table(results: dict) -> list[dict]:
    rows = []
    for precision, runs in results["runs"].items():
        for name, run in runs.items():
            trainings = [(k, v) for k, v in run.items() if k.startswith("train") and isinstance(v, dict)]
            trainings = [(k, v) for k, v in trainings if k == "train" or v != run["train"]]  # each measurement once
            if not trainings:
                rows.append({"precision": precision, "tool": name, "status": run.get("status", "")[:100]})
            for key, train in trainings:
                row = {"precision": precision, "tool": name, "micro": train["micro_batch"]}
                row.update({"train samples/s": train["samples_per_s"], "train peak GiB": train["peak_gib"]})
                if key == "train" and "score" in run:
                    row.update({"score rows/s": run["score"]["rows_per_s"], "score peak GiB": run["score"]["peak_gib"]})
                if train.get("step_s"):
                    row["median step s"] = statistics.median(train["step_s"])
                if "profile" in train:  # the profiled step's kernel time, against the median timed step
                    row["GPU busy s"] = train["profile"]["gpu_busy_s"]
                row["status"] = run.get("status")
                rows.append(row)
    return rows


def parent(args) -> None:
    workdir = Path(args.workdir)
    started = time.perf_counter()
    helpers.seed_everything(0)
    common.synthetic_rows(args.rows, workdir)  # the images, written once for every worker
    checkpoint, info = common.random_checkpoint(args.model, workdir)
    helpers.release_memory()
    results = {"benchmark": "peers", "env": versions(), "checkpoint": info, "runs": {}, "ratios": {}}
    results["config"] = {
        "model": args.model,
        "rows": args.rows,
        "effective_batch": EFFECTIVE_BATCH,
        "image_size": args.image_size,
        "lora": "the safe level's: r 8, alpha 16, on the language model's q/k/v/o (Qwen3.5: and in_proj_qkv, "
        "in_proj_z, out_proj of its DeltaNet layers)",
        "warmup_steps": 1,
        "steps": args.steps,
        "peer_micro_batches": args.micro_batches,
        "project_ways": {way: PROJECT_WAYS[way] for way in args.project_ways},
        "project_dataloader_workers": "every way" if args.loader else "the ways with 'loader'",
        "gpu_memory_cap_gib": args.cap if torch.cuda.is_available() else None,
        "cap_scope": "torch.cuda.set_per_process_memory_fraction after loading, in every worker",
        "score_rows": {"project": args.score_rows, "generate": args.generate_rows},
        "precisions": args.precisions,
        "processes": "one per tool, precision and micro-batch (this script with --worker); the parent builds the "
        "checkpoint and the images, and computes the ratios",
        "train_throughput": "samples/s = 16 x timed optimizer steps / their summed wall time (CUDA synchronised), "
        "after one warm-up step; data preparation included in every tool's step time (the project: collation in "
        "the main process, as bench_train.py, unless --loader or the way says 'DataLoader workers'; TRL and "
        "Unsloth: their Trainer's DataLoader, 0 workers by default)",
        "score_throughput": "project: rows / one timed letter_log_probs pass after a warm-up batch; peers: rows / "
        "summed generate() time after 2 warm-up rows",
        "peak_gib": "torch.cuda.max_memory_allocated over the timed steps or pass, weights included",
        "trl_notebook": "huggingface/trl examples/notebooks/sft_qwen_vl.ipynb",
        "unsloth_notebook": "unslothai/notebooks nb/Kaggle-Qwen3_VL_(8B)-Vision.ipynb",
    }

    def save():
        results["total_s"] = time.perf_counter() - started
        common.write_json(args.out, results)

    for precision in args.precisions:
        runs = results["runs"].setdefault(precision, {})
        for tool in args.tools:
            if tool == "project":  # 0: it finds its own micro-batch, in each way asked
                workers = [(PROJECT_WAYS[way][0], 0, way) for way in args.project_ways]
            else:
                workers = [(f"{tool} mb{m}", m, "default") for m in args.micro_batches]
            for name, micro_batch, way in workers:
                runs[name] = run_worker(args, tool, precision, micro_batch, checkpoint, way)
                common.log(f"{name} {precision}: {runs[name]['status']}")
                results["ratios"][precision] = ratios(runs)
                save()
    save()
    print()
    common.print_table(table(results))
    print(json.dumps(results["ratios"], indent=2))
    print(f"\nresults in {args.out} ({results['total_s']:.0f} s in all)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="results JSON (a worker's own result, for a worker)")
    models = [*common.SIZES, "qwen3.5-tiny", "qwen3.5-2b", "qwen3.5-4b", "qwen3.5-9b"]
    parser.add_argument("--model", default="8b", choices=models, help="random checkpoint at this size")
    parser.add_argument("--workdir", default="/tmp/qwen-vqa-bench", help="random checkpoints and images (GBs)")
    parser.add_argument("--rows", type=int, default=256, help="synthetic rows, the same for every tool")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps of 16 samples, after 1 warm-up")
    parser.add_argument("--image-size", type=int, default=384, help="the safe level's image size")
    parser.add_argument("--cap", type=float, default=common.T4_CAP_GIB, help="GPU memory cap in GiB (T4 stand-in)")
    parser.add_argument("--precisions", default="fp16,bf16", help="comma-separated, of fp16, bf16, fp32 (CPU)")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, of {TOOLS}")
    parser.add_argument("--micro-batches", default="2", help="the peers' micro-batches (their notebooks': 2)")
    parser.add_argument("--score-rows", type=int, default=256, help="rows the project scores (letter_log_probs)")
    parser.add_argument("--generate-rows", type=int, default=32, help="rows each peer scores with generate()")
    parser.add_argument("--worker-timeout", type=int, default=180, help="seconds for each tool's process")
    parser.add_argument(
        "--unsloth-site", help="a --target folder holding Unsloth and its requirements: the Unsloth worker's PYTHONPATH"
    )
    parser.add_argument(
        "--project-ways", default="default", help=f"comma-separated, of {tuple(PROJECT_WAYS)}; default first"
    )
    parser.add_argument(
        "--loader", action="store_true", help="every project way fed by DataLoader workers, as helpers.fit feeds it"
    )
    parser.add_argument(
        "--profile", action="store_true", help="one more step after the timed ones, under torch.profiler (not timed)"
    )
    # Set by the parent for a worker process
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--micro-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--project-way", default="default", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    args.micro_batches = [int(m) for m in args.micro_batches.split(",") if m.strip()]
    args.project_ways = [w.strip() for w in args.project_ways.split(",") if w.strip()]
    problems = [f"unknown precision {p!r}" for p in args.precisions if p not in ("fp16", "bf16", "fp32")]
    problems += [f"unknown tool {t!r}" for t in args.tools if t not in TOOLS]
    problems += [f"unknown project way {w!r}" for w in args.project_ways if w not in PROJECT_WAYS]
    if "project" in args.tools and args.project_ways[:1] != ["default"]:
        problems.append("--project-ways must start with default: the other ways are measured against it")
    problems += [
        f"micro-batch {m} does not divide {EFFECTIVE_BATCH}" for m in args.micro_batches if EFFECTIVE_BATCH % m
    ]
    needed = EFFECTIVE_BATCH * (1 + args.steps + args.profile)
    if args.rows < max(needed, args.score_rows, args.generate_rows):
        problems.append(f"--rows must cover the warm-up, timed and profiled steps ({needed}) and the scored rows")
    if problems:
        raise SystemExit("bench_peers.py: " + "; ".join(problems))
    if args.worker:
        worker(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()

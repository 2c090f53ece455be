"""The language model's attention alone, at Qwen3-VL-8B's shapes: the masked call of left-padded batches against
the unmasked causal call of right-padded ones, forward and backward, with each one's error against an fp32 reference.

The profiles of one training step (results/peers_unsloth_profile_bf16.json) show Unsloth's text attention at about a
third of the project's GPU time. With its batches padded on the left, the project hands SDPA a boolean padding mask:
transformers then repeats the 8 key/value heads to 32 (`repeat_kv`) and, cuDNN's attention being off in the project
(helpers.load_model_and_processor), SDPA runs its memory-efficient kernel: the `..., efficient` row. Padded on the
right, causal attention alone keeps every real token from seeing a pad, so no mask is needed: transformers then asks
SDPA for grouped-query attention (no repeat). This times, through transformers' own `sdpa_attention_forward` (what
the model calls), on a batch of the benchmark's lengths, each call with SDPA choosing its kernel (torch's defaults,
cuDNN on: torch 2.11 chose cuDNN's on an H200, by the times) and held to one kernel; `kv repeated` repeats the
key/value heads first, as a GPU without flash attention would need (SDPA's memory-efficient kernel, a T4's only fused
one, takes no grouped-query attention). The project, cuDNN off, runs the unmasked call on the flash kernel.

The error is the largest difference, on real tokens only, from the same call in fp32 on the math kernel, of the
output and of the gradients of q, k and v. A training step runs each layer's attention forward twice (gradient
checkpointing recomputes it) and backward once: `step_ms` = layers x (forward + forward-and-backward).

    python3 experiments/bench_attention.py --out experiments/results/bench_attention.json
"""

from __future__ import annotations

import argparse
import contextlib
import types

import common
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

# Qwen3-VL-8B's language model
LAYERS, HEADS, KV_HEADS, HEAD_DIM = 36, 32, 8, 128

# way: (padding side, the one SDPA kernel allowed or None for SDPA's choice, key/value heads repeated first)
WAYS = {
    "left-padded, mask": ("left", None, False),
    "left-padded, mask, cuDNN": ("left", SDPBackend.CUDNN_ATTENTION, False),
    "left-padded, mask, efficient": ("left", SDPBackend.EFFICIENT_ATTENTION, False),
    "right-padded, causal": ("right", None, False),
    "right-padded, causal, cuDNN": ("right", SDPBackend.CUDNN_ATTENTION, False),
    "right-padded, causal, flash": ("right", SDPBackend.FLASH_ATTENTION, False),  # the project's (cuDNN off), not run
    "right-padded, causal, efficient": ("right", SDPBackend.EFFICIENT_ATTENTION, False),
    "right-padded, causal, efficient, kv repeated": ("right", SDPBackend.EFFICIENT_ATTENTION, True),
    "right-padded, causal, kv repeated": ("right", None, True),
}


def batch_lengths(rows: int, mean: int, spread: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return (mean - spread + torch.randint(0, 2 * spread + 1, (rows,), generator=generator)).tolist()


def padded(x: torch.Tensor, lengths: list[int], side: str) -> torch.Tensor:
    """Rows of `x` (rows, heads, width, dim; real tokens first) laid out with their padding on `side`."""
    out = torch.zeros_like(x)
    width = x.shape[2]
    for row, n in enumerate(lengths):
        where = slice(width - n, width) if side == "left" else slice(0, n)
        out[row, :, where] = x[row, :, :n]
    return out


def real_tokens(x: torch.Tensor, lengths: list[int], side: str) -> torch.Tensor:
    width = x.shape[2]
    return torch.cat([x[row, :, width - n :] if side == "left" else x[row, :, :n] for row, n in enumerate(lengths)], 1)


def left_padding_mask(lengths: list[int], width: int, device) -> torch.Tensor:
    """The boolean mask transformers builds for SDPA (True: attend): causal, and no pad key for any query."""
    first_real = torch.tensor([width - n for n in lengths], device=device)
    keep = torch.arange(width, device=device)[None] >= first_real[:, None]
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    return (causal[None] & keep[:, None, :])[:, None]


def attention(q, k, v, mask, repeat_kv: bool = False):
    """transformers' SDPA call; `repeat_kv` repeats the key/value heads first, as it does for a masked call: SDPA's
    memory-efficient kernel (a T4's only fused one) takes no `enable_gqa`, which transformers passes when unmasked."""
    groups = HEADS // KV_HEADS
    if repeat_kv:
        k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))
        groups = 1
    module = types.SimpleNamespace(num_key_value_groups=groups, is_causal=True, training=True)
    out, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=HEAD_DIM**-0.5)
    return out  # (rows, width, heads, dim)


def run_way(
    inputs: dict, lengths: list[int], side: str, backend, repeat_kv: bool, dtype, reference: dict | None
) -> dict:
    width = inputs["q"].shape[2]
    device = inputs["q"].device
    q, k, v = (padded(inputs[n], lengths, side).to(dtype).requires_grad_() for n in "qkv")
    grad_out = padded(inputs["grad"], lengths, side).to(dtype).transpose(1, 2)
    mask = left_padding_mask(lengths, width, device) if side == "left" else None

    def kernels():  # a context manager is used once
        return sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()

    def forward():
        with kernels():
            return attention(q, k, v, mask, repeat_kv)

    def forward_backward():
        with kernels():
            out = attention(q, k, v, mask, repeat_kv)
            torch.autograd.grad(out, (q, k, v), grad_out)

    try:
        out = forward()  # the first call, outside the timing
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    except RuntimeError as error:  # a kernel that refuses these inputs
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    results = {"out": real_tokens(out.transpose(1, 2), lengths, side).detach()}
    results |= {f"d{n}": real_tokens(g, lengths, side).detach() for n, g in zip("qkv", (dq, dk, dv), strict=True)}
    if reference is None:
        return results
    row = {"forward_ms": time_ms(forward), "forward_backward_ms": time_ms(forward_backward)}
    row["step_ms"] = LAYERS * (row["forward_ms"] + row["forward_backward_ms"])
    for name, value in results.items():
        row[f"max_err_{name}"] = float((value.float() - reference[name]).abs().max())
    return row


def time_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return common.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=16, help="a micro-batch")
    parser.add_argument("--mean-length", type=int, default=315, help="tokens a row (the peers benchmark's 315)")
    parser.add_argument("--spread", type=int, default=20, help="lengths are mean +- spread (length-grouped batches)")
    parser.add_argument("--precisions", default="bf16,fp16")
    args = parser.parse_args()
    device = torch.device("cuda")
    lengths = batch_lengths(args.rows, args.mean_length, args.spread, seed=0)
    width = max(lengths)
    generator = torch.Generator(device=device).manual_seed(0)

    def random(heads):
        return torch.randn(args.rows, heads, width, HEAD_DIM, device=device, generator=generator)

    inputs = {"q": random(HEADS), "k": random(KV_HEADS), "v": random(KV_HEADS), "grad": random(HEADS)}
    with sdpa_kernel([SDPBackend.MATH]):
        reference = run_way(inputs, lengths, "left", SDPBackend.MATH, False, torch.float32, None)
    results = {"benchmark": "attention", "env": common.environment(), "args": vars(args), "lengths": lengths}
    table = []
    for precision in args.precisions.split(","):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        for way, (side, backend, repeat_kv) in WAYS.items():
            row = {"precision": precision, "way": way}
            row |= run_way(inputs, lengths, side, backend, repeat_kv, dtype, reference)
            common.log(f"{precision} {way}: {row}")
            table.append(row)
            results["runs"] = table
            common.write_json(args.out, results)
    common.print_table(table)


if __name__ == "__main__":
    main()

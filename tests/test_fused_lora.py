"""experiments/bench_peers.fuse_lora_products, the prototype of Unsloth's LoRA forward (one addmm for the base output
plus the scaled LoRA product): the same gradient as peft's forward, LoRA dropout included, on every adapted layer.
Whether it is faster is for the GPU (run_gpu.sh peers_fused_lora)."""

import sys

import pytest
import torch
from conftest import ROOT
from peft.tuners.lora import LoraLayer
from test_model import backward_on_cpu, cfg_for, flat_grad, one_batch, trainable_lora_model

sys.path.insert(0, str(ROOT / "experiments"))
import bench_peers  # noqa: E402


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_5"])
def test_fused_lora_keeps_the_loss_and_the_gradient(arch, tiny_model_dirs, tmp_path, sample_data):
    losses, grads = [], []
    for fused in (False, True):
        peft_model, processor = trainable_lora_model(cfg_for(arch, tiny_model_dirs, tmp_path))
        if fused:
            adapted = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
            assert bench_peers.fuse_lora_products(peft_model) == len(adapted) > 0
        batch = one_batch(processor, sample_data[0].head(4))
        torch.manual_seed(1)  # the dropout masks, drawn in the same order both ways
        losses.append(backward_on_cpu(peft_model, batch, 2))
        grads.append(flat_grad(peft_model))
    assert peft_model.peft_config["default"].lora_dropout > 0
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)

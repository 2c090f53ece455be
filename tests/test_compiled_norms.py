"""helpers.compile_norms (Config.compile_norms, on GPUs): the language model's RMSNorms and rotary embedding compiled
give the same loss, gradient and letter scores as eager ones; the vision encoder's norms stay eager; a model loaded
later without it gets transformers' eager rotary embedding back; where torch.compile cannot run, nothing changes.
On the CPU, where helpers compiles nothing by itself, the tests call compile_norms directly (inductor's C++ kernels)."""

import sys

import numpy as np
import pytest
import torch
from test_model import backward_on_cpu, cfg_for, flat_grad, one_batch, trainable_lora_model
from test_offloaded_checkpointing import two_gpu_device_map

import helpers

pytestmark = pytest.mark.usefixtures("transformers_functions_afterwards")
# The first three tests load the tiny model on the CPU, in fp32 (on a GPU helpers would load it in 4 bits and compile)
on_the_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's path; the GPU's is the last test")


def compiled_modules(model) -> dict[str, bool]:
    """Each RMSNorm's name: whether it is compiled."""
    norms = {n: m for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")}
    return {name: norm._compiled_call_impl is not None for name, norm in norms.items()}


@pytest.fixture
def recompile_limit_fails():
    """Dynamo fails where it would run a graph past its recompile limit eager. Set with torch's own config.patch: pytest
    9.2's monkeypatch deletes a torch config entry on undo, and the next test found it missing."""
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield


@on_the_cpu
@pytest.mark.usefixtures("recompile_limit_fails")
@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])  # Qwen2.5-VL's vision encoder has RMSNorms
def test_compiled_norms_keep_the_loss_the_gradient_and_the_scores(arch, tiny_model_dirs, tmp_path, sample_data):
    """Training at micro-batches 2 and 1 (as out-of-memory halving goes) and scoring 4 rows and 1: every graph the norms
    need stays compiled (dynamo would otherwise run the ones past its limit eager, with a warning)."""
    cfg = cfg_for(arch, tiny_model_dirs, tmp_path)
    rows = sample_data[0].head(4)
    losses, grads, scores = [], [], []
    for compiled in (False, True):
        peft_model, processor = trainable_lora_model(cfg)
        base = peft_model.get_base_model()
        modeling = sys.modules[type(base).__module__]
        norms = helpers.compile_norms(base, compiled)
        modules = compiled_modules(base)
        language = {n: c for n, c in modules.items() if helpers.VISION_ENCODER not in n}
        vision = {n: c for n, c in modules.items() if helpers.VISION_ENCODER in n}
        assert norms == (len(language) if compiled else 0) and language
        assert all(language.values()) == compiled and not any(vision.values())
        eager = helpers.TRANSFORMERS_FUNCTIONS[modeling.__name__, "apply_rotary_pos_emb"]
        assert (modeling.apply_rotary_pos_emb is eager) != compiled
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # compiler_works' own included
        torch.manual_seed(1)  # the LoRA dropout masks, drawn in the same order both ways
        losses.append([backward_on_cpu(peft_model, one_batch(processor, rows), size) for size in (2, 1)])
        grads.append(flat_grad(peft_model))
        scores.append([helpers.letter_log_probs(peft_model.eval(), processor, rows.head(n), cfg) for n in (4, 1)])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # the norms' and rotary's graphs ran
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    for compiled, eager in zip(scores[1], scores[0], strict=True):
        np.testing.assert_allclose(compiled, eager, atol=1e-5)


@on_the_cpu
def test_a_later_model_without_it_gets_the_eager_rotary_embedding(tiny_model_dirs, tmp_path):
    """transformers' attention looks apply_rotary_pos_emb up in its modeling module, shared by every model of the
    family in the process: a model loaded with compile_norms off must not run the one compiled for an earlier one."""
    model, _ = helpers.load_model_and_processor(cfg_for("qwen3_vl", tiny_model_dirs, tmp_path))
    modeling = sys.modules[type(model).__module__]
    eager = modeling.apply_rotary_pos_emb
    helpers.compile_norms(model)
    assert modeling.apply_rotary_pos_emb is not eager
    helpers.compile_norms(model)  # again (the next fold's model): compiled from transformers' function, not twice
    assert helpers.TRANSFORMERS_FUNCTIONS[modeling.__name__, "apply_rotary_pos_emb"] is eager
    helpers.load_model_and_processor(cfg_for("qwen3_vl", tiny_model_dirs, tmp_path))  # on a CPU: not compiled
    assert modeling.apply_rotary_pos_emb is eager


@on_the_cpu
def test_norms_are_compiled_only_when_asked_and_never_on_a_cpu(tiny_model_dirs, tmp_path, monkeypatch):
    """Off by default (the whole notebook took longer compiled, on Qwen3-VL-8B and Qwen3.5-4B); asked for on a CPU,
    where compiling would take longer than it saves, the model loads eager all the same."""
    asked = []
    monkeypatch.setattr(helpers, "compile_norms", lambda model, compiled=True: asked.append(compiled) or 0)
    for setting in ({}, {"compile_norms": True, "liger_kernels": False}):
        helpers.load_model_and_processor(cfg_for("qwen3_vl", tiny_model_dirs, tmp_path, **setting))
    assert helpers.Config().compile_norms is False
    assert asked == [False, False]


@on_the_cpu
def test_nothing_is_compiled_where_torch_compile_fails(tiny_model_dirs, tmp_path, monkeypatch, capsys):
    model, _ = helpers.load_model_and_processor(cfg_for("qwen3_vl", tiny_model_dirs, tmp_path))
    modeling = sys.modules[type(model).__module__]
    eager = modeling.apply_rotary_pos_emb

    def no_triton(*args, **kwargs):
        raise RuntimeError("Cannot find a working triton installation")

    helpers.compiler_works.cache_clear()
    monkeypatch.setattr(torch, "compile", no_triton)
    assert helpers.compile_norms(model) == 0
    assert modeling.apply_rotary_pos_emb is eager and not any(compiled_modules(model).values())
    assert "torch.compile does not work here (RuntimeError: Cannot find a working triton" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: helpers compiles only there")
@pytest.mark.parametrize("gpus", [1, 2])
def test_compiled_norms_on_gpus(gpus, tiny_model_dirs, tmp_path, sample_data, monkeypatch):
    """Config.compile_norms through the user's path, with 4-bit weights in fp16 (a T4's precision), on one GPU and
    with the layers split over two (each GPU's kernels compiled for it): the same gradient and scores as eager."""
    if gpus > torch.cuda.device_count():
        pytest.skip(f"needs {gpus} GPUs")
    if gpus == 2:
        monkeypatch.setattr(helpers, "plan_device_map", lambda path, *args: two_gpu_device_map(path))
    rows = sample_data[0].head(4)
    grads, scores = [], []
    for compiled in (False, True):
        cfg = cfg_for(
            "qwen3_vl", tiny_model_dirs, tmp_path, compile_norms=compiled, liger_kernels=False, precision="fp16"
        )
        peft_model, processor = trainable_lora_model(cfg)
        assert all(compiled_modules(peft_model.get_base_model().model.language_model).values()) == compiled
        autocast = helpers.autocast_context(torch.device("cuda"), torch.float16)
        torch.manual_seed(1)
        helpers.accumulate_gradients(
            peft_model, one_batch(processor, rows), 2, torch.amp.GradScaler("cuda", enabled=False), autocast
        )
        grads.append(flat_grad(peft_model))
        scores.append(helpers.letter_log_probs(peft_model.eval(), processor, rows, cfg))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-2, atol=1e-4)
    np.testing.assert_allclose(scores[1], scores[0], atol=1e-2)

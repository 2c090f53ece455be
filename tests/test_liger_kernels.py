"""helpers.use_liger_kernels (Config.liger_kernels, on by default on a GPU): Liger's Triton kernels bound to the
language model's RMSNorms, rotary embedding and SwiGLU MLPs, with each family's own norm arithmetic, never to the
vision encoder; a model loaded later without them gets transformers' rotary embedding back; where they cannot serve
(a CPU, a model spread over GPUs, liger-kernel missing, a GPU where they fail their check against transformers'
modules) the model loads eager and the loader says why. Triton kernels run on a GPU only (Triton's CPU interpreter
fails on Liger's RMSNorm), so on the CPU the tests check what is bound and the check's comparison (with PyTorch
stand-ins), and the last tests, on GPUs, that training and scoring give the same gradient and scores as without, and
that a model split over two GPUs stays eager."""

import logging
import sys

import numpy as np
import pytest
import torch
from test_model import cfg_for, flat_grad, one_batch, trainable_lora_model
from test_offloaded_checkpointing import two_gpu_device_map

import helpers

pytestmark = pytest.mark.usefixtures("transformers_functions_afterwards")
liger_rms_norm = pytest.importorskip("liger_kernel.transformers.rms_norm")
liger_rope = pytest.importorskip("liger_kernel.transformers.rope")
liger_swiglu = pytest.importorskip("liger_kernel.transformers.swiglu")

on_the_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's path; the GPU's is the last test")


def bound_to(module, liger_class) -> bool:
    return getattr(module.forward, "__func__", None) is liger_class.forward


def language_and_vision(model, predicate) -> tuple[list, list]:
    """The modules for which `predicate` holds, in the language model and in the vision encoder."""
    modules = [(n, m) for n, m in model.named_modules() if predicate(m)]
    language = [m for n, m in modules if helpers.VISION_ENCODER not in n]
    vision = [m for n, m in modules if helpers.VISION_ENCODER in n]
    return language, vision


@on_the_cpu
@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"])
def test_liger_kernels_are_bound_to_the_language_model_only(arch, tiny_model_dirs, tmp_path):
    model, _ = helpers.load_model_and_processor(cfg_for(arch, tiny_model_dirs, tmp_path))
    modeling = sys.modules[type(model).__module__]
    eager_rotary = modeling.apply_rotary_pos_emb
    norms, vision_norms = language_and_vision(model, lambda m: type(m).__name__.endswith("RMSNorm"))
    mlps, vision_mlps = language_and_vision(model, lambda m: hasattr(m, "gate_proj"))

    said = helpers.use_liger_kernels(model)

    assert norms and all(bound_to(norm, liger_rms_norm.LigerRMSNorm) for norm in norms)
    qwen3_5 = arch.startswith("qwen3_5")  # its norms scale by 1 + weight, computed in fp32 (Liger's "gemma" casting)
    assert {(norm.offset, norm.casting_mode) for norm in norms} == {(1.0, "gemma") if qwen3_5 else (0.0, "llama")}
    assert all(norm.variance_epsilon == model.config.get_text_config().rms_norm_eps for norm in norms)
    assert all(bound_to(mlp, liger_swiglu.LigerSwiGLUMLP) for mlp in mlps)
    assert len(mlps) > 0 or arch == "qwen3_vl_moe"  # its experts are fused 3-D weights, not MLP modules
    assert not any(bound_to(m, liger_rms_norm.LigerRMSNorm) for m in vision_norms)
    assert not any(bound_to(m, liger_swiglu.LigerSwiGLUMLP) for m in vision_mlps)
    assert vision_norms or arch != "qwen2_5_vl"  # Qwen2.5-VL's vision encoder has RMSNorms and SwiGLU MLPs of its own
    rotary = arch in ("qwen3_vl", "qwen3_vl_moe")  # the others apply a partial or multimodal rotary of their own
    assert (modeling.apply_rotary_pos_emb is liger_rope.liger_rotary_pos_emb) == rotary
    assert said == f"Liger's kernels: {len(norms)} RMSNorms, {len(mlps)} SwiGLU MLPs" + (
        ", the rotary embedding" if rotary else ""
    )

    helpers.load_model_and_processor(cfg_for(arch, tiny_model_dirs, tmp_path))  # the next model, without them
    assert modeling.apply_rotary_pos_emb is eager_rotary


def test_liger_kernels_do_not_warn_of_the_kernels_for_other_hardware(tiny_model_dirs, tmp_path, caplog):
    """liger-kernel's warnings that its CuTe DSL and Ascend kernels are absent, logged when its rotary kernel is first
    looked up, are silenced (helpers does it on import): a Kaggle user would otherwise read them in the model-load
    cell."""
    from liger_kernel.backends.registry import list_registered

    model, _ = helpers.load_model_and_processor(cfg_for("qwen3_vl", tiny_model_dirs, tmp_path, liger_kernels=False))
    helpers.use_liger_kernels(model)
    with caplog.at_level(logging.WARNING):
        assert any(impl.impl_name == "nvidia-triton" for impl in list_registered("rope"))  # looks for the others
    assert not [record for record in caplog.records if record.name.startswith("liger_kernel")]
    assert not logging.getLogger("liger_kernel.backends.registry").isEnabledFor(logging.WARNING)


@on_the_cpu
def test_liger_kernels_by_default_eager_on_a_cpu_and_not_with_compiled_norms(
    tiny_model_dirs, tmp_path, monkeypatch, capsys
):
    asked = []
    monkeypatch.setattr(helpers, "use_liger_kernels", lambda model: asked.append(model) or "bound")
    assert helpers.Config().liger_kernels is True
    helpers.load_model_and_processor(cfg_for("qwen3_vl", tiny_model_dirs, tmp_path))
    assert asked == [] and "liger_kernels: not on a GPU; norms eager" in capsys.readouterr().out
    helpers.load_model_and_processor(cfg_for("qwen3_vl", tiny_model_dirs, tmp_path, liger_kernels=False))
    assert "liger" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="fuse the same norms: set liger_kernels=False to compile"):
        helpers.Config(profile="smoke", compile_norms=True)
    assert helpers.Config(profile="smoke", compile_norms=True, liger_kernels=False).compile_norms


def test_liger_kernels_serve_an_installed_liger_kernel_and_a_model_on_one_gpu_only(monkeypatch):
    """Triton launches on the current GPU, and liger-kernel 0.8.5's rotary kernel does not switch to its input's
    (Liger-Kernel#1303): a model whose layers are on two devices stays eager."""
    spread = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, device="meta"))
    assert helpers.why_no_liger_kernels(spread) == "the model is spread over 2 devices"
    assert helpers.why_no_liger_kernels(torch.nn.Linear(2, 2)) == "not on a GPU"
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # as if not installed: find_spec finds nothing
    assert helpers.why_no_liger_kernels(spread) == "liger-kernel is not installed (pip install liger-kernel)"


class EagerRMSNormFunction:
    """Liger's RMSNorm arithmetic in PyTorch, so that the check can run on the CPU."""

    @staticmethod
    def apply(x, weight, eps, offset, casting_mode, in_place, row_mode):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        return (normed * (offset + weight.float())).to(x.dtype)


def silu_mul_off_by(factor):
    class SiLUMulFunction:
        @staticmethod
        def apply(a, b, *multipliers):
            return torch.nn.functional.silu(a) * b * factor

    return SiLUMulFunction


@on_the_cpu
def test_liger_kernels_are_checked_against_transformers_before_they_are_bound(
    tiny_model_dirs, tmp_path, monkeypatch, capsys
):
    """liger_kernels_work runs a copy of a norm, an MLP and the rotary embedding with Liger's kernels and without. On
    the CPU the Triton kernels cannot run, which it reports; with PyTorch stand-ins for them it compares, and a stand-in
    1.5% off or NaN fails, naming the kernel."""
    model, _ = helpers.load_model_and_processor(cfg_for("qwen3_vl", tiny_model_dirs, tmp_path, liger_kernels=False))
    assert helpers.liger_kernels_work(model) is False
    assert "liger_kernels: Liger's kernels do not run here (" in capsys.readouterr().out

    modeling = sys.modules[type(model).__module__]
    monkeypatch.setattr(liger_rms_norm, "LigerRMSNormFunction", EagerRMSNormFunction)
    monkeypatch.setattr(liger_rope, "liger_rotary_pos_emb", modeling.apply_rotary_pos_emb)
    monkeypatch.setattr(liger_swiglu, "LigerSiLUMulFunction", silu_mul_off_by(1.0))
    assert helpers.liger_kernels_work(model) is True
    for factor in (1.015, float("nan")):
        monkeypatch.setattr(liger_swiglu, "LigerSiLUMulFunction", silu_mul_off_by(factor))
        assert helpers.liger_kernels_work(model) is False
        said = capsys.readouterr().out
        assert "liger_kernels: Liger's SwiGLU MLP differs from transformers' here by" in said
        assert ("1.5%" if factor == 1.015 else "nan%") in said
    assert not any(bound_to(m, liger_rms_norm.LigerRMSNorm) for m in model.modules())  # the checks ran on copies


def test_without_liger_kernel_installed_the_model_loads_eager_and_says_how_to_install_it(
    tiny_model_dirs, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    model, _ = helpers.load_model_and_processor(cfg_for("qwen3_vl", tiny_model_dirs, tmp_path))
    out = capsys.readouterr().out
    assert "liger_kernels: liger-kernel is not installed (pip install liger-kernel); norms eager" in out
    assert not any(bound_to(m, liger_rms_norm.LigerRMSNorm) for m in model.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: Triton's kernels run there")
@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_liger_kernels_keep_the_gradient_and_the_scores_on_this_gpu(arch, tiny_model_dirs, tmp_path, sample_data):
    """Config.liger_kernels through the user's path, with 4-bit weights in fp16 under the GradScaler's autocast (a
    T4's precision): the same LoRA gradient and letter scores as transformers' own norms, rotary and MLPs."""
    rows = sample_data[0].head(4)
    grads, scores = [], []
    for liger in (False, True):
        cfg = cfg_for(arch, tiny_model_dirs, tmp_path, liger_kernels=liger, precision="fp16")
        peft_model, processor = trainable_lora_model(cfg)
        norms, _ = language_and_vision(peft_model, lambda m: type(m).__name__.endswith("RMSNorm"))
        assert all(bound_to(norm, liger_rms_norm.LigerRMSNorm) for norm in norms) == liger
        autocast = helpers.autocast_context(torch.device("cuda"), torch.float16)
        torch.manual_seed(1)  # the LoRA dropout masks, drawn in the same order both ways
        helpers.accumulate_gradients(
            peft_model, one_batch(processor, rows), 2, torch.amp.GradScaler("cuda", enabled=False), autocast
        )
        grads.append(flat_grad(peft_model))
        scores.append(helpers.letter_log_probs(peft_model.eval(), processor, rows, cfg))
    assert grads[0].abs().sum() > 0 and torch.isfinite(grads[1]).all()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-2, atol=1e-4)
    np.testing.assert_allclose(scores[1], scores[0], atol=1e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_a_model_split_over_two_gpus_or_off_the_current_one_keeps_its_norms_eager(
    tiny_model_dirs, tmp_path, monkeypatch, capsys
):
    model, _ = helpers.load_model_and_processor(cfg_for("qwen3_vl", tiny_model_dirs, tmp_path, gpu=1))
    assert torch.cuda.current_device() == 0
    assert "liger_kernels: the model is on cuda:1, not the current GPU" in capsys.readouterr().out
    monkeypatch.setattr(helpers, "plan_device_map", lambda path, *args: two_gpu_device_map(path))
    model, _ = helpers.load_model_and_processor(cfg_for("qwen3_vl", tiny_model_dirs, tmp_path, precision="fp16"))
    assert "liger_kernels: the model is spread over 2 devices; norms eager" in capsys.readouterr().out
    assert not any(bound_to(m, liger_rms_norm.LigerRMSNorm) for m in model.modules())

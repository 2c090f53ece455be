"""helpers.use_liger_kernels (Config.liger_kernels, on GPUs): Liger's Triton kernels bound to the language model's
RMSNorms, rotary embedding and SwiGLU MLPs, with each family's own norm arithmetic, never to the vision encoder; a
model loaded later without them gets transformers' rotary embedding back. Triton kernels run on a GPU only (Triton's
CPU interpreter fails on Liger's RMSNorm), so on the CPU the tests check what is bound, and the last test, on a GPU,
that training and scoring give the same gradient and scores as without."""

import sys

import numpy as np
import pytest
import torch
from test_model import cfg_for, flat_grad, one_batch, trainable_lora_model

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


@on_the_cpu
def test_liger_kernels_only_when_asked_never_on_a_cpu_and_not_with_compiled_norms(
    tiny_model_dirs, tmp_path, monkeypatch, capsys
):
    asked = []
    monkeypatch.setattr(helpers, "use_liger_kernels", lambda model: asked.append(model) or "bound")
    helpers.load_model_and_processor(cfg_for("qwen3_vl", tiny_model_dirs, tmp_path))
    assert "liger" not in capsys.readouterr().out
    helpers.load_model_and_processor(cfg_for("qwen3_vl", tiny_model_dirs, tmp_path, liger_kernels=True))
    assert asked == [] and "liger_kernels: not on a CPU, norms eager" in capsys.readouterr().out
    assert helpers.Config().liger_kernels is False
    with pytest.raises(ValueError, match="compile_norms and liger_kernels fuse the same norms: choose one"):
        helpers.Config(profile="smoke", compile_norms=True, liger_kernels=True)


def test_without_liger_kernel_installed_the_error_says_how_to_install_it(tiny_model_dirs, tmp_path, monkeypatch):
    model, _ = helpers.load_model_and_processor(cfg_for("qwen3_vl", tiny_model_dirs, tmp_path))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"Config.liger_kernels needs liger-kernel \(pip install liger-kernel\)"):
        helpers.use_liger_kernels(model)


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

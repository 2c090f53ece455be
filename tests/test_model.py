"""Loading through from_pretrained, LoRA placement, and what a training step may and may not change."""

import json
import types
from pathlib import Path

import make_tiny_model
import numpy as np
import pytest
import torch
from conftest import ARCHS, ROOT
from PIL import Image
from safetensors.torch import load_file
from transformers.modeling_layers import GradientCheckpointingLayer

import helpers

CLASSES = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
}


def cfg_for(arch, tiny_model_dirs, tmp_path, **overrides):
    return helpers.Config(profile="smoke", model_id=str(tiny_model_dirs[arch]), output_dir=str(tmp_path), **overrides)


def one_batch(processor, rows, train=True):
    dataset = helpers.VQADataset(rows, helpers.pixel_budget(processor), train=train)
    return helpers.VQACollator(processor, train=train)([dataset[i] for i in range(len(rows))])


def trainable_lora_model(cfg):
    """The model with LoRA adapters in training mode (checkpointing runs in training mode only, as helpers.fit
    trains), their B weights non-zero so that every LoRA weight gets a gradient; the same weights for the same cfg."""
    model, processor = helpers.load_model_and_processor(cfg)
    torch.manual_seed(0)
    peft_model = helpers.attach_lora(model, cfg)
    for p in peft_model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    return peft_model.train(), processor


def flat_grad(peft_model) -> torch.Tensor:
    """Every trained weight's gradient in one fp32 vector on the CPU (a model may span two GPUs)."""
    return torch.cat([p.grad.float().flatten().cpu() for p in peft_model.parameters() if p.requires_grad])


def backward_on_cpu(peft_model, batch, micro_batch: int) -> float:
    """helpers.accumulate_gradients as helpers.fit runs it on a CPU: fp32, the GradScaler off."""
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    autocast = helpers.autocast_context(torch.device("cpu"), torch.float32)
    return helpers.accumulate_gradients(peft_model, batch, micro_batch, scaler, autocast)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_loads_back_through_the_user_path(arch, tiny_model_dirs, tmp_path, sample_data):
    model, processor = helpers.load_model_and_processor(cfg_for(arch, tiny_model_dirs, tmp_path))
    assert type(model).__name__ == CLASSES[arch]
    assert model.is_activation_checkpointing and not any(p.requires_grad for p in model.parameters())
    loss = helpers.answer_loss_sum(model, one_batch(processor, sample_data[0].head(3)))
    assert torch.isfinite(loss) and loss > 0


def test_loading_turns_off_cudnn_attention(tiny_model_dirs, tmp_path):
    # cuDNN's SDPA backward gave NaN gradients on padded bf16 batches (experiments/replay_nonfinite.py)
    torch.backends.cuda.enable_cudnn_sdp(True)  # torch's default
    helpers.load_model_and_processor(cfg_for("qwen3_vl", tiny_model_dirs, tmp_path))
    assert not torch.backends.cuda.cudnn_sdp_enabled()


def test_build_tiny_model_is_idempotent(tiny_model_dirs):
    path = tiny_model_dirs["qwen3_vl"]
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert make_tiny_model.build_tiny_model(path, "qwen3_vl") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_committed_smoke_model_is_what_the_script_builds(tmp_path):
    """data/tiny-qwen3-vl is made by its script: a change to the builder that is not rebuilt there fails here."""
    committed = ROOT / helpers.SMOKE_MODEL
    built = make_tiny_model.build_tiny_model(tmp_path / "built", "qwen3_vl", seed=42)
    assert sorted(p.name for p in committed.iterdir()) == sorted(p.name for p in built.iterdir())
    for name in ("config.json", "generation_config.json", "processor_config.json", "tokenizer.json"):
        assert (committed / name).read_text() == (built / name).read_text(), name
    weights, expected = load_file(committed / "model.safetensors"), load_file(built / "model.safetensors")
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_lora_sits_on_the_language_model_only(arch, tiny_model_dirs, tmp_path):
    cfg = cfg_for(arch, tiny_model_dirs, tmp_path)  # smoke targets include gate/up/down, shared with the vision MLP
    model, _ = helpers.load_model_and_processor(cfg)
    peft_model = helpers.attach_lora(model, cfg)
    lora = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n and "language_model" in n for n in lora)
    assert any("mlp.gate_proj" in n for n in lora)


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_5"])
def test_training_step_moves_lora_and_nothing_else(arch, tiny_model_dirs, tmp_path, sample_data):
    cfg = cfg_for(arch, tiny_model_dirs, tmp_path)
    model, processor = helpers.load_model_and_processor(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = helpers.attach_lora(model, cfg)
    peft_model.train()  # as helpers.fit trains: dropout and gradient checkpointing on
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = one_batch(processor, sample_data[0].head(4))
    backward_on_cpu(peft_model, batch, 2)
    optimizer.step()
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero; the step moved it (through DeltaNet too)

    base = helpers.detach_lora(peft_model)
    after = dict(base.named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_moe"])
def test_default_lora_reaches_both_layer_types_of_qwen3_5(arch, tiny_model_dirs, tmp_path):
    """With the GPU default targets every layer gets adapters: q/k/v/o_proj in the full-attention layers, in_proj_qkv,
    in_proj_z and out_proj in the Gated DeltaNet layers; nothing in the vision tower, the MLPs or the experts."""
    cfg = cfg_for(arch, tiny_model_dirs, tmp_path, lora_targets=helpers.GPU_DEFAULTS["lora_targets"])
    model, _ = helpers.load_model_and_processor(cfg)
    layer_types = model.config.text_config.layer_types
    assert set(layer_types) == {"linear_attention", "full_attention"}
    expected = set()
    for i, kind in enumerate(layer_types):
        if kind == "linear_attention":
            expected |= {f"{i}.linear_attn.{name}" for name in ("in_proj_qkv", "in_proj_z", "out_proj")}
        else:
            expected |= {f"{i}.self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    peft_model = helpers.attach_lora(model, cfg)
    adapted = [n.removesuffix(".lora_A.default.weight") for n, _ in peft_model.named_parameters() if "lora_A" in n]
    assert all(".language_model.layers." in n for n in adapted)
    assert {n.split(".language_model.layers.")[1] for n in adapted} == expected


def test_micro_batches_give_the_full_batch_gradient(tiny_model_dirs, tmp_path, sample_data):
    cfg = cfg_for("qwen3_vl", tiny_model_dirs, tmp_path, lora_dropout=0.0)
    peft_model, processor = trainable_lora_model(cfg)
    batch = one_batch(processor, sample_data[0].head(6))
    grads = []
    for micro in (6, 1, 4):
        peft_model.zero_grad()
        backward_on_cpu(peft_model, batch, micro)
        grads.append(flat_grad(peft_model))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-4, atol=1e-6)


def test_reentrant_checkpointing_is_the_default():
    assert helpers.Config().reentrant_checkpointing and not helpers.Config().offload_activations


@pytest.mark.parametrize("arch", ARCHS)
def test_both_checkpointing_ways_give_the_same_gradient(arch, tiny_model_dirs, tmp_path, sample_data):
    """Reentrant checkpointing changes how the forward is replayed, not the gradient: the same LoRA weights and batch
    give the same gradient both ways, LoRA dropout included (the replay draws the same masks). Offloading the layer
    inputs: tests/test_offloaded_checkpointing.py."""
    grads = []
    for reentrant in (True, False):  # the default first
        cfg = cfg_for(arch, tiny_model_dirs, tmp_path, reentrant_checkpointing=reentrant)
        peft_model, processor = trainable_lora_model(cfg)
        layers = [m for m in peft_model.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert layers and all(m.gradient_checkpointing for m in layers)
        assert {m._gradient_checkpointing_func.keywords["use_reentrant"] for m in layers} == {reentrant}
        batch = one_batch(processor, sample_data[0].head(4))
        torch.manual_seed(1)  # the dropout masks
        backward_on_cpu(peft_model, batch, 2)
        grads.append(flat_grad(peft_model))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_a_weight_without_a_gradient_stops_training(tiny_model_dirs, tmp_path, sample_data):
    """Under reentrant checkpointing (the default) a trained weight in the vision encoder, whose blocks' inputs require
    no gradient, gets none, with only a warning that helpers silences: train_step's check names it instead."""
    cfg = cfg_for("qwen3_vl", tiny_model_dirs, tmp_path)
    model, processor = helpers.load_model_and_processor(cfg)
    peft_model = helpers.attach_lora(model, cfg)
    peft_model.train()
    batch = one_batch(processor, sample_data[0].head(2))
    params, _ = helpers.make_optimizer(peft_model, cfg)
    backward_on_cpu(peft_model, batch, 2)
    helpers.check_every_weight_has_a_gradient(peft_model, params)  # the notebook's adapters: every one has a gradient

    peft_model.zero_grad(set_to_none=True)
    model.model.visual.blocks[0].mlp.linear_fc1.weight.requires_grad_(True)  # as a LoRA on the vision encoder would
    params, _ = helpers.make_optimizer(peft_model, cfg)
    backward_on_cpu(peft_model, batch, 2)
    with pytest.raises(RuntimeError, match=r"no gradient reached 1 of the \d+ trained weights \(the first: .*visual"):
        helpers.check_every_weight_has_a_gradient(peft_model, params)


def test_answer_loss_equals_full_logits_loss(tiny_model_dirs, tmp_path, sample_data):
    """Computing logits at the labelled positions only, without the padding mask, gives the loss of the full
    sequence's logits with the mask."""
    model, processor = helpers.load_model_and_processor(cfg_for("qwen3_vl", tiny_model_dirs, tmp_path))
    batch = one_batch(processor, sample_data[0].head(3))
    with torch.no_grad():
        ours = helpers.answer_loss_sum(model, batch)
        logits = model(**helpers.model_inputs(batch, helpers.input_device(model))).logits
        labels = batch["labels"]
        full = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
        )
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True], ids=["no mask (flash GPUs, CPU)", "mask (T4)"])
@pytest.mark.parametrize("arch", ARCHS)
def test_padding_changes_no_answer_loss(arch, masked, tiny_model_dirs, tmp_path, sample_data, monkeypatch):
    """A right-padded batch's loss, with or without the padding mask, is the sum of its rows' losses each alone:
    in every family (Qwen3.5's DeltaNet layers and the MoEs' routers included), nothing flows back from the pads."""
    monkeypatch.setattr(helpers, "padding_mask_needed", lambda model: masked)
    model, processor = helpers.load_model_and_processor(cfg_for(arch, tiny_model_dirs, tmp_path))
    rows = sample_data[0].head(4)
    batch = one_batch(processor, rows)
    assert not batch["attention_mask"].all() and batch["attention_mask"][:, 0].all()  # padded, on the right
    with torch.no_grad():
        together = helpers.answer_loss_sum(model, batch)
        alone = sum(helpers.answer_loss_sum(model, one_batch(processor, rows.iloc[[i]])) for i in range(len(rows)))
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def fake_gpu_model(dtype, text):
    """What unmasked_attention and padding_mask_needed read of a model: its embeddings' device and dtype, its text
    config."""
    weight = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype)
    return types.SimpleNamespace(
        get_input_embeddings=lambda: types.SimpleNamespace(weight=weight),
        config=types.SimpleNamespace(get_text_config=lambda: text),
    )


def test_the_unmasked_attention_is_the_one_a_fused_kernel_takes(monkeypatch, tiny_model_dirs):
    """Asked of torch for the model's device, dtype and heads: grouped-query (flash) first, then the heads repeated
    (memory-efficient), else none, and then the mask stays; a model whose attention is not the named one keeps it."""
    asked = []

    def fused(device, dtype, heads, kv_heads, head_dim):
        asked.append((device.type, dtype, heads, kv_heads, head_dim))
        if dtype == torch.bfloat16:  # an H200: flash takes grouped-query attention in 16 bits
            return True
        return dtype == torch.float16 and heads == kv_heads  # a T4: only the memory-efficient kernel, heads repeated

    monkeypatch.setattr(helpers, "fused_unmasked_attention", fused)
    qwen3_vl_8b = types.SimpleNamespace(num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    qwen2_5_vl_7b = types.SimpleNamespace(num_attention_heads=28, num_key_value_heads=4, hidden_size=3584)
    for dtype, attention, questions in (
        (torch.bfloat16, "sdpa", 1),
        (torch.float16, helpers.SDPA_KV_REPEATED, 2),
        (torch.float32, None, 2),
    ):
        for text, head_dim in ((qwen3_vl_8b, 128), (qwen2_5_vl_7b, 128)):
            asked.clear()
            model = fake_gpu_model(dtype, text)
            assert helpers.unmasked_attention(model) == attention
            heads = text.num_attention_heads
            assert (
                asked
                == [
                    ("cuda", dtype, heads, text.num_key_value_heads, head_dim),
                    ("cuda", dtype, heads, heads, head_dim),
                ][:questions]
            )
            for runs in ("sdpa", helpers.SDPA_KV_REPEATED):
                text._attn_implementation = runs
                assert helpers.padding_mask_needed(model) is (runs != attention)
    asked.clear()
    cpu_model, _ = helpers.load_model_and_processor(cfg_for("qwen3_vl", tiny_model_dirs, Path("/tmp")))
    assert cpu_model.config.get_text_config()._attn_implementation == "sdpa"
    assert not helpers.padding_mask_needed(cpu_model) and not asked  # a CPU takes either call: nothing asked


@pytest.mark.parametrize("arch", ARCHS)
def test_the_repeated_heads_attention_gives_sdpa_s_losses_and_scores(
    arch, tiny_model_dirs, tmp_path, sample_data, monkeypatch
):
    """Where the loader picks the attention with the key/value heads repeated (a T4), the language model runs it, the
    vision encoder keeps SDPA, and a right-padded batch without the mask has transformers' SDPA loss and gradient;
    scoring's masked, left-padded batches score the same."""
    cfg = cfg_for(arch, tiny_model_dirs, tmp_path)
    reference, processor = trainable_lora_model(cfg)
    monkeypatch.setattr(helpers, "unmasked_attention", lambda model: helpers.SDPA_KV_REPEATED)
    repeated, _ = trainable_lora_model(cfg)
    assert repeated.config.get_text_config()._attn_implementation == helpers.SDPA_KV_REPEATED
    assert repeated.config.vision_config._attn_implementation == "sdpa"
    assert not helpers.padding_mask_needed(repeated)
    rows = sample_data[0].head(4)
    batch = one_batch(processor, rows)
    assert not batch["attention_mask"].all()  # padded: the pads stay out by causality alone
    losses, grads = [], []
    for model in (reference, repeated):
        model.zero_grad()
        torch.manual_seed(0)  # the same LoRA dropout
        loss = helpers.answer_loss_sum(model, batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append(flat_grad(model))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    scores = [helpers.letter_log_probs(model.eval(), processor, rows, cfg) for model in (reference, repeated)]
    np.testing.assert_allclose(scores[1], scores[0], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch answers for a GPU's kernels")
def test_sdpa_trains_the_unmasked_call_of_every_family_in_16_bits_on_this_gpu():
    """On the GPU machine (sm90): flash takes Qwen3-VL's heads (128) and Qwen3.5's (256) grouped-query in both 16-bit
    dtypes; fp32 has no fused kernel for that, but the memory-efficient one takes it with the heads repeated; and with
    flash off, as on a T4, so does fp16."""
    cuda = torch.device("cuda", 0)
    for dtype in (torch.float16, torch.bfloat16):
        assert helpers.fused_unmasked_attention(cuda, dtype, 32, 8, 128)  # Qwen3-VL-8B
        assert helpers.fused_unmasked_attention(cuda, dtype, 16, 4, 256)  # Qwen3.5-4B
    assert not helpers.fused_unmasked_attention(cuda, torch.float32, 32, 8, 128)
    assert helpers.fused_unmasked_attention(cuda, torch.float32, 32, 32, 128)
    helpers.fused_unmasked_attention.cache_clear()
    try:
        torch.backends.cuda.enable_flash_sdp(False)
        for heads, kv_heads, head_dim in ((32, 8, 128), (16, 4, 256)):
            assert not helpers.fused_unmasked_attention(cuda, torch.float16, heads, kv_heads, head_dim)
            assert helpers.fused_unmasked_attention(cuda, torch.float16, heads, heads, head_dim)
    finally:
        torch.backends.cuda.enable_flash_sdp(True)
        helpers.fused_unmasked_attention.cache_clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a GPU's SDPA kernels")
def test_on_a_t4_s_kernels_the_repeated_heads_train_as_the_masked_call(
    tiny_model_dirs, tmp_path, sample_data, monkeypatch
):
    """With SDPA's flash off (a T4 has none), the loader gives the language model the repeated heads, and a right-padded
    fp16 batch trains on the memory-efficient kernel alone (no fallback to math allowed) to the masked call's loss and
    gradient."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.backends.cuda.enable_flash_sdp(False)
    helpers.fused_unmasked_attention.cache_clear()
    try:
        model, processor = trainable_lora_model(cfg_for("qwen3_vl", tiny_model_dirs, tmp_path, precision="fp16"))
        assert model.config.get_text_config()._attn_implementation == helpers.SDPA_KV_REPEATED
        assert not helpers.padding_mask_needed(model)
        batch = one_batch(processor, sample_data[0].head(4))
        autocast = helpers.autocast_context(torch.device("cuda"), torch.float16)
        losses, grads = [], []
        for masked in (True, False):
            monkeypatch.setattr(helpers, "padding_mask_needed", lambda model, masked=masked: masked)
            model.zero_grad()
            torch.manual_seed(0)  # the same LoRA dropout
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]), autocast():
                loss = helpers.answer_loss_sum(model, batch)
            loss.backward()
            losses.append(loss.detach())
            grads.append(flat_grad(model))
    finally:
        torch.backends.cuda.enable_flash_sdp(True)
        helpers.fused_unmasked_attention.cache_clear()
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_vision_attention_equals_image_by_image(arch, tiny_model_dirs, tmp_path):
    model, processor = helpers.load_model_and_processor(cfg_for(arch, tiny_model_dirs, tmp_path))
    modules = helpers.vision_attention_modules(model)
    assert modules and all("forward" in vars(m) for m in modules)  # load_model_and_processor batched them all
    # Images of several shapes, so that some attention groups hold one image and some several (and, in Qwen2.5-VL,
    # windows of several sizes).
    rng = np.random.default_rng(0)
    shapes = [(128, 128), (64, 64), (128, 128), (96, 64), (64, 128), (64, 64)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]
    processor.image_processor.size = {"shortest_edge": 32 * 32, "longest_edge": 128 * 128}
    inputs = processor.image_processor(images=images, return_tensors="pt")
    assert len(set(inputs["image_grid_thw"].prod(-1).tolist())) > 2
    with torch.no_grad():
        batched = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        for module in modules:
            del module.forward  # back to transformers' own forward: one attention call per image
        stock = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    torch.testing.assert_close(batched.last_hidden_state, stock.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched.pooler_output, stock.pooler_output, rtol=1e-5, atol=1e-5)


def test_a_vision_attention_class_that_is_not_found_is_an_error(tiny_model_dirs, tmp_path, monkeypatch):
    """A transformers release that renames the class must not silently leave the slow image-by-image path on."""
    model, _ = helpers.load_model_and_processor(cfg_for("qwen3_vl", tiny_model_dirs, tmp_path))
    renamed = helpers.ModelFamily("Qwen3VLForConditionalGeneration", "Qwen3VLVisionAttentionV2")
    monkeypatch.setitem(helpers.MODEL_FAMILIES, "qwen3_vl", renamed)
    with pytest.raises(RuntimeError, match="no Qwen3VLVisionAttentionV2 module in this qwen3_vl model"):
        helpers.batch_vision_attention(model)


def test_an_unsupported_model_stops_before_loading(tiny_model_dirs, tmp_path):
    config = json.loads((tiny_model_dirs["qwen3_vl"] / "config.json").read_text())
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    cfg = helpers.Config(profile="smoke", model_id=str(tmp_path / "model"), output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="model_type 'llava' is not supported; supported: .*qwen3_vl"):
        helpers.load_model_and_processor(cfg)


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_moe"])
def test_deltanet_computes_in_fp32_inside_an_fp16_model(arch, tiny_model_dirs, tmp_path):
    """Under fp16 autocast the DeltaNet's own fp32 casts are undone (its matmuls go back to fp16); wrapped by
    compute_in_fp32 it runs with autocast off and in fp32, equal to an fp32 forward, and hands fp16 back."""
    model, _ = helpers.load_model_and_processor(cfg_for(arch, tiny_model_dirs, tmp_path))
    deltanets = [m for name, m in model.named_modules() if name.endswith("linear_attn")]
    deltanet = deltanets[0]
    seen = []
    deltanet.norm.register_forward_pre_hook(
        lambda _, args: seen.append((torch.is_autocast_enabled("cpu"), args[0].dtype))
    )
    x = (torch.randn(2, 12, model.config.text_config.hidden_size) * 4).half()
    with torch.no_grad():
        reference = deltanet(x.float())
        with torch.autocast("cpu", dtype=torch.float16):
            plain = deltanet(x)
        assert seen[-1] == (True, torch.float16)  # what an fp16 model does without the island

        assert (
            helpers.compute_in_fp32(model, ("linear_attn",))
            == len(deltanets)
            == 3 * model.config.text_config.num_hidden_layers // 4
        )
        with torch.autocast("cpu", dtype=torch.float16):
            island = deltanet(x)
    assert seen[-1] == (False, torch.float32)
    assert island.dtype == plain.dtype == torch.float16
    assert torch.allclose(island.float(), reference, atol=1e-3, rtol=1e-3)
    assert (island.float() - reference).abs().max() < (plain.float() - reference).abs().max()

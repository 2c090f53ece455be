"""helpers.bucket_short_convolutions: Qwen3.5's Gated DeltaNet convolutions run on lengths padded to a multiple of
CONV_BUCKET (so that cuDNN meets few shapes) and give transformers' own convolution's loss, gradient and scores; other
families are left as they are."""

import sys

import numpy as np
import pytest
import torch
from test_model import backward_on_cpu, cfg_for, flat_grad, one_batch, trainable_lora_model

import helpers

pytestmark = pytest.mark.usefixtures("transformers_functions_afterwards")


def recording(conv, lengths: list):
    """`conv`, noting the length of every input it is given."""

    def recorded(hidden_states, *args, **kwargs):
        lengths.append(hidden_states.shape[-1])
        return conv(hidden_states, *args, **kwargs)

    return recorded


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_moe"])
def test_bucketed_convolutions_keep_the_loss_the_gradient_and_the_scores(arch, tiny_model_dirs, tmp_path, sample_data):
    cfg = cfg_for(arch, tiny_model_dirs, tmp_path)
    rows = sample_data[0].head(4)
    lengths, losses, grads, scores = {True: [], False: []}, [], [], []
    for bucketed in (True, False):
        peft_model, processor = trainable_lora_model(cfg)
        modeling = sys.modules[type(peft_model.get_base_model()).__module__]
        eager = helpers.TRANSFORMERS_FUNCTIONS[modeling.__name__, "causal_conv1d_fn"]
        assert modeling.causal_conv1d_fn is not eager and modeling.causal_conv1d_fn.__wrapped__ is eager
        recorded = recording(eager, lengths[bucketed])
        modeling.causal_conv1d_fn = helpers.bucketed_causal_conv1d(recorded) if bucketed else recorded
        torch.manual_seed(1)  # the LoRA dropout masks, drawn in the same order both ways
        losses.append([backward_on_cpu(peft_model, one_batch(processor, rows), size) for size in (4, 1)])
        grads.append(flat_grad(peft_model))
        scores.append(helpers.letter_log_probs(peft_model.eval(), processor, rows, cfg))
    assert lengths[True] and all(n % helpers.CONV_BUCKET == 0 for n in lengths[True])
    assert any(n % helpers.CONV_BUCKET for n in lengths[False])  # the batches' own lengths, which the buckets replace
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-5)


def test_loading_again_wraps_transformers_convolution_not_the_wrapper(tiny_model_dirs, tmp_path, monkeypatch):
    model, _ = helpers.load_model_and_processor(cfg_for("qwen3_5", tiny_model_dirs, tmp_path))
    modeling = sys.modules[type(model).__module__]
    key = modeling.__name__, "causal_conv1d_fn"
    original = helpers.TRANSFORMERS_FUNCTIONS[key]
    monkeypatch.setitem(helpers.TRANSFORMERS_FUNCTIONS, key, lambda *args, **kwargs: original(*args, **kwargs))
    helpers.load_model_and_processor(cfg_for("qwen3_5", tiny_model_dirs, tmp_path))  # the next fold's model
    assert modeling.causal_conv1d_fn.__wrapped__ is helpers.TRANSFORMERS_FUNCTIONS[key]
    qwen3_vl, _ = helpers.load_model_and_processor(cfg_for("qwen3_vl", tiny_model_dirs, tmp_path))
    assert helpers.bucket_short_convolutions(qwen3_vl) is False


def test_a_packed_call_passes_through_unpadded():
    calls = []

    def conv(hidden_states, weight, bias=None, activation=None, **kwargs):
        calls.append((hidden_states.shape[-1], kwargs))
        return hidden_states

    x = torch.zeros(1, 3, 10)
    helpers.bucketed_causal_conv1d(conv)(x, None, None, None, seq_idx=torch.zeros(1, 10))
    helpers.bucketed_causal_conv1d(conv)(x, None, use_cache=False)  # what the layers pass on: not by token
    assert [n for n, _ in calls] == [10, helpers.CONV_BUCKET]
    assert "seq_idx" in calls[0][1] and calls[1][1] == {"use_cache": False}

"""Letter scoring: batching and length sorting never change a row's probabilities or its place."""

import dataclasses

import numpy as np
import pytest
import torch

import helpers


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs, tmp_path_factory):
    """Shared by the module: tests change cfg with dataclasses.replace, never in place, so their order cannot matter."""
    cfg = helpers.Config(
        profile="smoke", model_id=str(tiny_model_dirs["qwen3_vl"]), output_dir=str(tmp_path_factory.mktemp("o"))
    )
    model, processor = helpers.load_model_and_processor(cfg)
    return model, processor, cfg


def test_batched_equals_one_by_one_and_order_is_restored(tiny, sample_data):
    model, processor, cfg = tiny
    rows = sample_data[0].iloc[[0, 80, 160, 240, 1, 81, 161]].reset_index(drop=True)  # mixed lengths
    orders = helpers.cyclic_orders(cfg.tta_rotations)  # the smoke profile's four rotations, as predict_folds scores

    def option_probs():
        return helpers.tta_proba(helpers.score_orders(model, processor, rows, cfg, orders), orders)

    cfg = dataclasses.replace(cfg, eval_batch_size=7)
    batched = option_probs()
    cfg = dataclasses.replace(cfg, eval_batch_size=1)
    single = option_probs()
    assert batched.shape == (7, 4)
    np.testing.assert_allclose(batched.sum(1), 1, rtol=1e-5)
    np.testing.assert_allclose(batched, single, atol=1e-4)


def test_option_order_is_mapped_back(tiny, sample_data):
    """Scoring options presented as (b, c, d, a) and mapping back equals scoring each row's permuted copy."""
    model, processor, cfg = tiny
    rows = sample_data[0].head(4).reset_index(drop=True)
    order = (1, 2, 3, 0)
    mapped = helpers.letter_log_probs(model, processor, rows, cfg, order=order)
    permuted = rows.copy()
    for shown, original in enumerate(order):
        permuted[helpers.LETTERS[shown]] = rows[helpers.LETTERS[original]]
    direct = helpers.letter_log_probs(model, processor, permuted, cfg)
    np.testing.assert_allclose(mapped[:, list(order)], direct, atol=1e-5)


def test_qwen3_5_letter_scores_equal_a_manual_forward_of_each_row(tiny_model_dirs, tmp_path, sample_data):
    """Scoring left-padded batches equals the model's own next-token distribution after each prompt alone: padding
    reaches neither the Gated DeltaNet state nor the letter, which comes right after the closed thinking block."""
    cfg = helpers.Config(profile="smoke", model_id=str(tiny_model_dirs["qwen3_5"]), output_dir=str(tmp_path))
    model, processor = helpers.load_model_and_processor(cfg)
    rows = sample_data[0].iloc[[0, 80, 160]].reset_index(drop=True)  # different lengths: one batch, padded
    cfg.eval_batch_size = 3
    scored = helpers.position_log_probs(model, processor, rows, cfg)

    dataset = helpers.VQADataset(rows, helpers.pixel_budget(processor), train=False)
    collator = helpers.VQACollator(processor, train=False)
    assert not collator([dataset[i] for i in range(len(rows))])["attention_mask"].all()  # the batch is padded
    letters = helpers.letter_token_ids(processor.tokenizer)
    manual = []
    with torch.no_grad():
        for i in range(len(rows)):
            batch = collator([dataset[i]])
            assert batch["attention_mask"].all()  # one row: no padding
            logits = model(**helpers.model_inputs(batch, helpers.input_device(model))).logits[0, -1]
            manual.append(logits.log_softmax(-1)[letters].numpy())
    np.testing.assert_allclose(scored, np.stack(manual), atol=1e-5)


def test_tokenizer_that_splits_letters_is_rejected():
    class Splitter:
        def encode(self, text, add_special_tokens=False):
            return [1, 2]

    with pytest.raises(ValueError, match="splits the option letters"):
        helpers.letter_token_ids(Splitter())


def test_validation_metrics():
    log_probs = np.log(np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.2, 0.6, 0.1]]))
    metrics = helpers.validation_metrics(log_probs, helpers.pd.Series(["a", "b"]))
    assert metrics["val_acc"] == 0.5
    assert metrics["val_loss"] == pytest.approx(-(np.log(0.7) + np.log(0.2)) / 2)


def test_out_of_memory_halves_the_inference_batch_and_keeps_it(tiny, sample_data, monkeypatch, capsys):
    model, processor, cfg = tiny
    rows = sample_data[0].head(12).reset_index(drop=True)
    cfg = dataclasses.replace(cfg, eval_batch_size=4)
    expected = helpers.letter_log_probs(model, processor, rows, cfg)
    real, sizes = helpers.model_inputs, []

    def inputs(batch, device):
        sizes.append(len(batch["index"]))
        if len(batch["index"]) > 1:
            raise helpers.torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(batch, device)

    monkeypatch.setattr(helpers, "model_inputs", inputs)
    np.testing.assert_allclose(helpers.letter_log_probs(model, processor, rows, cfg), expected, atol=1e-5)
    assert sizes == [4, 2] + [1] * 12  # the smaller batch is kept: no out-of-memory again on later batches
    assert "batch size now 1" in capsys.readouterr().out
    sizes.clear()
    np.testing.assert_allclose(helpers.letter_log_probs(model, processor, rows, cfg), expected, atol=1e-5)
    assert sizes == [1] * 12  # and on later passes: each validation, rotation and member starts where it fitted
    assert "out of memory" not in capsys.readouterr().out

    monkeypatch.setattr(helpers, "model_inputs", lambda batch, device: inputs({"index": [0, 1]}, device))
    with pytest.raises(RuntimeError, match="inference at batch size 1.*profile to"):
        helpers.letter_log_probs(model, processor, rows, cfg)


def test_non_finite_scores_raise_and_name_the_rows(tiny, sample_data):
    """An overflowing model (here: NaN logits for the first row of each batch) must not silently answer "a"."""
    model, processor, cfg = tiny
    rows = sample_data[0].head(5).reset_index(drop=True)
    cfg = dataclasses.replace(cfg, eval_batch_size=8)
    first = rows["id"][np.argsort(helpers.prompt_lengths(rows), kind="stable")[0]]  # batch row 0 after sorting

    def overflow(module, inputs, output):
        output[0] = float("nan")

    hook = model.lm_head.register_forward_hook(overflow)
    try:
        with pytest.raises(FloatingPointError, match=rf"1 of 5 rows got non-finite .*\['{first}'\]"):
            helpers.letter_log_probs(model, processor, rows, cfg)
    finally:
        hook.remove()

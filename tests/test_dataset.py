"""Prompts, answer-only labels and batching, for the tokenization of every supported architecture."""

import hashlib

import make_tiny_model
import pytest
import torch
from conftest import ARCHS, SMOKE_BUDGET
from transformers import AutoProcessor

import helpers


@pytest.fixture(scope="module")
def rows(sample_data):
    return sample_data[0].head(6)


@pytest.mark.parametrize("arch", ARCHS)
def test_labels_cover_exactly_the_answer_and_im_end(arch, tiny_model_dirs, rows):
    processor = AutoProcessor.from_pretrained(tiny_model_dirs[arch])
    cfg = helpers.Config(profile="smoke")
    decoded = helpers.labelled_text(processor, rows, cfg)
    assert decoded == [f"{a}<|im_end|>" for a in rows["answer"]]

    # the newline after <|im_end|> is the last token, and it is not labelled
    dataset = helpers.VQADataset(rows, helpers.pixel_budget(processor), train=True)
    batch = helpers.VQACollator(processor, train=True)([dataset[0]])
    newline = processor.tokenizer.encode("\n", add_special_tokens=False)
    assert batch["input_ids"][0, -1].item() == newline[-1] and batch["labels"][0, -1].item() == -100
    assert (batch["labels"] != -100).sum().item() == 2


@pytest.mark.parametrize("arch", ARCHS)
def test_inference_batch_is_left_padded_and_ends_with_the_generation_prompt(arch, tiny_model_dirs, rows):
    processor = AutoProcessor.from_pretrained(tiny_model_dirs[arch])
    dataset = helpers.VQADataset(rows, helpers.pixel_budget(processor), train=False)
    collator = helpers.VQACollator(processor, train=False)
    batch = collator([dataset[i] for i in range(len(rows))])
    header = collator.header_ids
    assert (batch["input_ids"][:, -len(header) :] == torch.tensor(header)).all()
    assert batch["attention_mask"][:, -1].all()  # left padding: every row ends at the last column
    assert "labels" not in batch


@pytest.mark.parametrize("arch", ARCHS)
def test_training_text_is_the_inference_prompt_then_the_answer(arch, tiny_model_dirs, rows):
    """The letter is trained exactly where inference scores it: after the same prompt, token for token."""
    processor = AutoProcessor.from_pretrained(tiny_model_dirs[arch])
    row = rows.iloc[0].to_dict()
    train, prompt = (
        processor.apply_chat_template(
            helpers.build_messages(row, answer=answer),
            tokenize=False,
            add_generation_prompt=answer is None,
            **helpers.chat_template_kwargs(processor),
        )
        for answer in (row["answer"], None)
    )
    assert train == f"{prompt}{row['answer']}<|im_end|>\n"
    assert prompt.endswith(helpers.answer_header(processor))


def test_qwen3_5_prompt_closes_the_thinking_block(tiny_model_dirs, rows):
    """Qwen3.5's template opens a thinking block by default; the prompt must end with an empty, closed one."""
    processor = AutoProcessor.from_pretrained(tiny_model_dirs["qwen3_5"])
    messages = helpers.build_messages(rows.iloc[0].to_dict())
    default = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert default.endswith("<|im_start|>assistant\n<think>\n")
    assert helpers.answer_header(processor) == "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    header = processor.tokenizer.convert_ids_to_tokens(helpers.VQACollator(processor, train=False).header_ids)
    assert "<think>" in header and "</think>" in header  # single tokens, as in the real vocabulary


def test_qwen3_5_chat_template_is_the_published_one():
    """Verbatim: the SHA-256 of mlx-community/Qwen3.5-35B-A3B-4bit's chat_template.jinja."""
    digest = hashlib.sha256(make_tiny_model.QWEN3_5_CHAT_TEMPLATE.encode()).hexdigest()
    assert digest == "a4aee8afcf2e0711942cf848899be66016f8d14a889ff9ede07bca099c28f715"


def test_prompt_has_question_options_hint_and_instruction(rows):
    row = rows.iloc[0].to_dict() | {"question": "Ｗhat colour?", "task_hint": "Look closely."}
    text = helpers.prompt_text(row)
    assert text.startswith("What colour?\nHint: Look closely.\n(a) ")  # NFKC folds the full-width W
    assert "(d) " in text and text.endswith(helpers.INSTRUCTION)


def test_shuffled_options_remap_the_answer(rows):
    dataset = helpers.VQADataset(rows, SMOKE_BUDGET, train=True, shuffle_options=True, seed=3)
    for i, row in enumerate(rows.to_dict("records")):
        messages = dataset[i]["messages"]
        answer = messages[-1]["content"][0]["text"]
        shown = messages[1]["content"][1]["text"]
        right_option = row[row["answer"]]
        assert f"({answer}) {right_option}\n" in shown


def test_split_batch_slices_rows_patches_and_padding(tiny_model_dirs, rows):
    processor = AutoProcessor.from_pretrained(tiny_model_dirs["qwen3_vl"])
    dataset = helpers.VQADataset(rows, helpers.pixel_budget(processor), train=True)
    batch = helpers.VQACollator(processor, train=True)([dataset[i] for i in range(len(rows))])
    chunks = helpers.split_batch(batch, 4)
    assert [len(c["index"]) for c in chunks] == [4, 2]
    assert sum(len(c["pixel_values"]) for c in chunks) == len(batch["pixel_values"])
    for chunk in chunks:
        assert chunk["attention_mask"][:, 0].any() and chunk["attention_mask"][:, -1].any()  # no column of padding only
        assert chunk["pixel_values"].shape[0] == chunk["image_grid_thw"].prod(-1).sum()


@pytest.mark.parametrize("train", [True, False])
def test_training_batches_are_padded_right_and_inference_batches_left(train, tiny_model_dirs, rows):
    processor = AutoProcessor.from_pretrained(tiny_model_dirs["qwen3_vl"])
    dataset = helpers.VQADataset(rows, helpers.pixel_budget(processor), train=train)
    mask = helpers.VQACollator(processor, train=train)([dataset[i] for i in range(len(rows))])["attention_mask"]
    assert not mask.all()
    assert mask[:, 0 if train else -1].all()  # every row starts (training) or ends (inference) in the same column


def test_answer_labels_rejects_a_row_without_an_answer():
    with pytest.raises(ValueError, match="row 0: no assistant header"):
        helpers.answer_labels(torch.tensor([[1, 2, 3]]), [7, 8], im_end_id=9)


def test_length_grouped_batches_cover_every_row_once():
    lengths = [5, 50, 7, 60, 3, 55, 4, 52, 6, 58, 8, 57]
    batches = helpers.length_grouped_batches(lengths, 2, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(12))
    assert all(abs(lengths[a] - lengths[b]) < 10 for a, b in batches)  # similar lengths together
    assert batches == helpers.length_grouped_batches(lengths, 2, seed=0)

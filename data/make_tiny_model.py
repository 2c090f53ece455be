"""Build a tiny random Qwen-VL checkpoint folder, offline: the smoke profile's model and the tests' models.

Real weights cannot be downloaded everywhere (CI, air-gapped machines), so this writes a complete checkpoint folder
(config, safetensors weights, tokenizer, processors, the real chat template) that loads through the same
from_pretrained calls as Qwen's. Each model has about a million parameters; a build takes a few seconds. One builder
per family of helpers.MODEL_FAMILIES (--arch is its model_type).

    python data/make_tiny_model.py --arch qwen3_vl --seed 42 --out data/tiny-qwen3-vl   # the smoke profile's model

The tests build every family with it (tests/conftest.py), and the benchmarks take their configs and processors
from it: `make_tiny_model.build_tiny_model(out_dir, arch, seed)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import helpers  # noqa: E402 (MODEL_FAMILIES: the architectures and their model classes)

TINY_ARCHS = tuple(helpers.MODEL_FAMILIES)  # by config.json's model_type

# Special tokens of the real Qwen2.5-VL / Qwen3-VL vocabularies, in their real
# order. The processors read <|image_pad|>, <|video_pad|>, <|vision_start|> and
# <|vision_end|>; the others keep the vocabulary shaped like the real one.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Chat template of Qwen/Qwen2.5-VL-*-Instruct (chat_template.json). Copied from
# the public template as quoted by several projects (e.g. xorbitsai/inference's
# llm_family_modelscope.json). It adds a default system prompt when the first
# message is not a system message.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Chat template of Qwen/Qwen3-VL-*-Instruct (also used by the Qwen3-VL MoE
# Instruct models), verbatim: 5292 UTF-8 bytes, SHA-256 3636d0f0bd6bef02...,
# the hash pinned for the Qwen/Qwen3-VL-8B-Instruct GGUF template in a public
# test suite. Unlike Qwen2.5-VL it adds no default system prompt.
QWEN3_VL_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501 (verbatim template)

# Chat template of Qwen/Qwen3.5-* (dense and MoE), verbatim: 7756 UTF-8 bytes, SHA-256 a4aee8afcf2e0711..., the hash
# pinned for mlx-community/Qwen3.5-35B-A3B-4bit's chat_template.jinja in a public test suite; the same text is quoted
# as Qwen/Qwen3.5-27B's tokenizer_config.json template elsewhere. Unlike Qwen3-VL it opens a thinking block after the
# assistant header ("<think>\n", or an empty one with enable_thinking=False: see CHAT_TEMPLATE_KWARGS) and writes the
# last assistant turn after an empty thinking block.
QWEN3_5_CHAT_TEMPLATE = """{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- macro render_content(content, do_vision_count, is_system_content=false) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is iterable and content is not mapping %}
        {%- for item in content %}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain images.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set image_count.value = image_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Picture ' ~ image_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif 'video' in item or item.type == 'video' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain videos.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set video_count.value = video_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Video ' ~ video_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- else %}
                {{- raise_exception('Unexpected item type in content.') }}
            {%- endif %}
        {%- endfor %}
    {%- elif content is none or content is undefined %}
        {{- '' }}
    {%- else %}
        {{- raise_exception('Unexpected content type.') }}
    {%- endif %}
{%- endmacro %}
{%- if not messages %}
    {{- raise_exception('No messages provided.') }}
{%- endif %}
{%- if tools and tools is iterable and tools is not mapping %}
    {{- '<|im_start|>system\\n' }}
    {{- "# Tools\\n\\nYou have access to the following functions:\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>" }}
    {{- '\\n\\nIf you choose to call a function ONLY reply in the following format with NO suffix:\\n\\n<tool_call>\\n<function=example_function_name>\\n<parameter=example_parameter_1>\\nvalue_1\\n</parameter>\\n<parameter=example_parameter_2>\\nThis is the value for the second parameter\\nthat can span\\nmultiple lines\\n</parameter>\\n</function>\\n</tool_call>\\n\\n<IMPORTANT>\\nReminder:\\n- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\\n- Required parameters MUST be specified\\n- You may provide optional reasoning for your function call in natural language BEFORE the function call, but NOT after\\n- If there is no function call available, answer the question like normal with your current knowledge and do not tell the user about function calls\\n</IMPORTANT>' }}
    {%- if messages[0].role == 'system' %}
        {%- set content = render_content(messages[0].content, false, true)|trim %}
        {%- if content %}
            {{- '\\n\\n' + content }}
        {%- endif %}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {%- set content = render_content(messages[0].content, false, true)|trim %}
        {{- '<|im_start|>system\\n' + content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" %}
        {%- set content = render_content(message.content, false)|trim %}
        {%- if not(content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}
            {%- set ns.multi_step_tool = false %}
            {%- set ns.last_query_index = index %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if ns.multi_step_tool %}
    {{- raise_exception('No user query found in messages.') }}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content, true)|trim %}
    {%- if message.role == "system" %}
        {%- if not loop.first %}
            {{- raise_exception('System message must be at the beginning.') }}
        {%- endif %}
    {%- elif message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- set reasoning_content = reasoning_content|trim %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content + '\\n</think>\\n\\n' + content }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls and message.tool_calls is iterable and message.tool_calls is not mapping %}
            {%- for tool_call in message.tool_calls %}
                {%- if tool_call.function is defined %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {%- if loop.first %}
                    {%- if content|trim %}
                        {{- '\\n\\n<tool_call>\\n<function=' + tool_call.name + '>\\n' }}
                    {%- else %}
                        {{- '<tool_call>\\n<function=' + tool_call.name + '>\\n' }}
                    {%- endif %}
                {%- else %}
                    {{- '\\n<tool_call>\\n<function=' + tool_call.name + '>\\n' }}
                {%- endif %}
                {%- if tool_call.arguments is defined %}
                    {%- for args_name, args_value in tool_call.arguments|items %}
                        {{- '<parameter=' + args_name + '>\\n' }}
                        {%- set args_value = args_value | tojson | safe if args_value is mapping or (args_value is sequence and args_value is not string) else args_value | string %}
                        {{- args_value }}
                        {{- '\\n</parameter>\\n' }}
                    {%- endfor %}
                {%- endif %}
                {{- '</function>\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.previtem and loop.previtem.role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if not loop.last and loop.nextitem.role != "tool" %}
            {{- '<|im_end|>\\n' }}
        {%- elif loop.last %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Unexpected message role.') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- else %}
        {{- '<think>\\n' }}
    {%- endif %}
{%- endif %}"""  # noqa: E501 (verbatim template)

# Training text for the BPE: chat-template words plus English and Korean
# multiple-choice VQA phrasing, so merges resemble the text the tests feed in.
BASE_SENTENCES = [
    "You are a helpful assistant.",
    "system user assistant",
    "What colour is the shape?",
    "What color is the object in the picture?",
    "How many objects are there?",
    "How many shapes can you see in the image?",
    "Which shape is the largest?",
    "Where is the circle?",
    "Is the square to the left of the triangle?",
    "Answer with one lowercase letter.",
    "Answer with the letter of the correct option.",
    "Choose the best answer from the options below.",
    "Look at the image and answer the question.",
    "The answer is (a).",
    "Question: What is shown in the image?",
    "Options:",
    "(a) red\n(b) green\n(c) blue\n(d) yellow",
    "(a) one\n(b) two\n(c) three\n(d) four",
    "(a) circle\n(b) square\n(c) triangle\n(d) star",
    "(a) left\n(b) right\n(c) top\n(d) bottom",
    "a b c d",
    "Which option best describes the scene?",
    "Count the number of red circles and pick the matching option.",
    "What is the relationship between the two objects?",
    "Is there anything unusual about this picture?",
    "Select the correct answer; reply with a, b, c or d only.",
    "The correct option is b because the triangle is smaller.",
    "Read the text in the image and answer the question below.",
    "What is the person holding in their hand?",
    "그림 속 사람은 무엇을 들고 있습니까?",
    "두 물체 사이의 관계는 무엇입니까?",
    "장면을 가장 잘 설명하는 선택지는 무엇입니까?",
    "삼각형이 더 작기 때문에 정답은 b입니다.",
    "도형의 색깔은 무엇입니까?",
    "이미지에 물체가 몇 개 있습니까?",
    "가장 큰 도형은 무엇입니까?",
    "원은 어디에 있습니까?",
    "소문자 한 글자로 답하세요.",
    "정답을 고르세요.",
    "이미지를 보고 질문에 답하세요.",
    "당신은 도움이 되는 조수입니다.",
    "(a) 빨간색\n(b) 초록색\n(c) 파란색\n(d) 노란색",
    "(a) 원\n(b) 사각형\n(c) 삼각형\n(d) 별",
    "(a) 하나\n(b) 둘\n(c) 셋\n(d) 넷",
]
# (English, Korean) word pairs expanded into templated sentences below.
COLOURS = [
    ("red", "빨간색"),
    ("green", "초록색"),
    ("blue", "파란색"),
    ("yellow", "노란색"),
    ("black", "검은색"),
    ("white", "흰색"),
    ("purple", "보라색"),
    ("orange", "주황색"),
]
SHAPES = [
    ("circle", "원"),
    ("square", "사각형"),
    ("triangle", "삼각형"),
    ("star", "별"),
    ("rectangle", "직사각형"),
    ("hexagon", "육각형"),
]
COUNTS = [("one", "하나"), ("two", "둘"), ("three", "셋"), ("four", "넷"), ("five", "다섯"), ("six", "여섯")]
POSITIONS = [("left", "왼쪽"), ("right", "오른쪽"), ("top", "위쪽"), ("bottom", "아래쪽"), ("center", "가운데")]
BPE_VOCAB_SIZE = 1024

# Merged image patches side (pixels) = patch_size * merge_size: 28 for Qwen2.5-VL,
# 32 for Qwen3-VL. Small pixel budgets keep image token counts tiny (4-20).
MIN_PIXELS = 32 * 32
MAX_PIXELS = 128 * 128
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2

# Tiny dimensions shared by all archs. head_dim = 128 / 4 = 32, so the
# multimodal rope section [t, h, w] must sum to head_dim / 2 = 16.
TEXT_DIMS = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
}
HEAD_DIM = 32
MROPE_SECTION = [8, 4, 4]
# Qwen3.5: a hybrid language model, three Gated DeltaNet (linear attention) layers to each full-attention layer as in
# the real models, so 4 layers hold both kinds. Its attention heads are 64 wide, a quarter of each rotated (the real
# partial_rotary_factor), so the multimodal rope section sums to 64 / 4 / 2 = 8: [3, 3, 2] like the real [11, 11, 10].
# DeltaNet: 2 key heads and 4 value heads of 32 (the real ratio of 1:2).
QWEN3_5_ARCHS = ("qwen3_5", "qwen3_5_moe")
QWEN3_5_TEXT_DIMS = {
    "num_hidden_layers": 4,
    "layer_types": ["linear_attention"] * 3 + ["full_attention"],
    "head_dim": 64,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 1e7,
        "partial_rotary_factor": 0.25,
        "mrope_section": [3, 3, 2],
        "mrope_interleaved": True,
    },
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 32,
    "linear_value_head_dim": 32,
}
VISION_DIMS = {
    "depth": 2,
    "hidden_size": 64,
    "num_heads": 4,
    "intermediate_size": 128,
    "out_hidden_size": TEXT_DIMS["hidden_size"],
    "spatial_merge_size": MERGE_SIZE,
    "temporal_patch_size": TEMPORAL_PATCH_SIZE,
}


def training_corpus() -> list[str]:
    """Base sentences plus templated scene descriptions and option lists in both languages."""
    corpus = list(BASE_SENTENCES)
    for colour, colour_ko in COLOURS:
        for shape, shape_ko in SHAPES:
            corpus.append(f"There is a {colour} {shape} in the image.")
            corpus.append(f"이미지에 {colour_ko} {shape_ko}이 있습니다.")
    for (count, count_ko), (shape, shape_ko) in zip(COUNTS, SHAPES, strict=True):
        corpus.append(f"There are {count} {shape}s in the picture.")
        corpus.append(f"그림에 {shape_ko}이 {count_ko} 개 있습니다.")
    for position, position_ko in POSITIONS:
        for shape, shape_ko in SHAPES:
            corpus.append(f"The {shape} is at the {position} of the image.")
            corpus.append(f"{shape_ko}은 이미지의 {position_ko}에 있습니다.")
    # Rotated multiple-choice option lists, e.g. "(a) red\n(b) green\n...".
    for words in (COLOURS, SHAPES, COUNTS, POSITIONS):
        for shift in range(4):
            rotated = (words[shift:] + words[:shift])[:4]
            for lang in (0, 1):
                options = [f"({letter}) {pair[lang]}" for letter, pair in zip("abcd", rotated, strict=True)]
                corpus.append("\n".join(options))
    return corpus


def build_tokenizer(extra_tokens: tuple[str, ...] = ()):
    """Train a tiny byte-level BPE with the Qwen2 pre-tokenisation and wrap it as a Qwen2 tokenizer.

    `extra_tokens` become single tokens after the special ones, not special themselves (Qwen3.5's <think> and
    </think>, as in its real vocabulary). A Qwen3.5 folder reloads it as Qwen3_5Tokenizer, with Qwen3.5's own
    pre-tokenisation, as transformers does for the real one."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    backend = Tokenizer(models.BPE())
    # Same normalizer / pre-tokenizer / decoder as transformers' Qwen2Tokenizer,
    # which rebuilds exactly this pipeline around vocab + merges on reload.
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        # Merge even once-seen pairs: the corpus is tiny, and whole-word tokens
        # ("Ġcolour") look more like the real Qwen vocabulary than fragments.
        min_frequency=0,
        # Every byte is a token, so any text (and every single letter) encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(training_corpus(), trainer=trainer)
    # Added after training, so (as in the real vocab) they sit after the BPE ids.
    backend.add_special_tokens(SPECIAL_TOKENS)
    backend.add_tokens(list(extra_tokens))

    # Settings mirror the real Qwen2.5-VL / Qwen3-VL tokenizer_config.json.
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=TEXT_DIMS["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
        add_prefix_space=False,
    )

    # Callers score option letters by a single token id: make sure that holds,
    # including right after the assistant header of the chat template.
    letter_ids = {}
    for letter in "abcd":
        ids = tokenizer.encode(letter, add_special_tokens=False)
        assert len(ids) == 1, f"{letter!r} encodes to {ids}, expected one token"
        letter_ids[letter] = ids[0]
    chat = "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
    chat_ids = tokenizer.encode(chat, add_special_tokens=False)
    assert letter_ids["a"] in chat_ids, "the answer letter tokenises differently after the assistant header"
    return tokenizer


def build_processor(arch: str, tokenizer):
    from transformers import (
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    common = {"merge_size": MERGE_SIZE, "temporal_patch_size": TEMPORAL_PATCH_SIZE}
    if arch == "qwen2_5_vl":
        # Qwen2.5-VL: 14-px patches, CLIP mean/std (the image processor default).
        image_processor = Qwen2VLImageProcessor(size=size, patch_size=14, **common)
        video_processor = Qwen2VLVideoProcessor(size=size, patch_size=14, **common)
        return Qwen2_5_VLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
        )
    # Qwen3-VL and Qwen3.5 (dense and MoE): 16-px patches, mean/std 0.5 as in their preprocessor_config.json.
    image_processor = Qwen2VLImageProcessor(
        size=size, patch_size=16, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], **common
    )
    # The video budget counts pixels over all frames, hence the larger maximum.
    video_size = {"shortest_edge": MIN_PIXELS, "longest_edge": 8 * MAX_PIXELS}
    video_processor = Qwen3VLVideoProcessor(size=video_size, patch_size=16, **common)
    # Qwen3.5 (dense and MoE) uses Qwen3-VL's processor, image and video settings; only its chat template differs.
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN3_5_CHAT_TEMPLATE if arch in QWEN3_5_ARCHS else QWEN3_VL_CHAT_TEMPLATE,
    )


def build_config(arch: str, tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen3_5Config, Qwen3_5MoeConfig, Qwen3VLConfig, Qwen3VLMoeConfig

    ids = tokenizer.convert_tokens_to_ids
    token_ids = {
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<|endoftext|>"),
    }
    text = {**TEXT_DIMS, **token_ids, "vocab_size": len(tokenizer)}
    top = {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
        "tie_word_embeddings": False,
    }
    if arch == "qwen2_5_vl":
        # Qwen2.5-VL has no head_dim field (hidden / heads = 32) and plain mrope.
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": MROPE_SECTION}
        vision = {
            **VISION_DIMS,
            "patch_size": 14,
            "window_size": 112,
            # Layer 0 uses windowed attention, layer 1 full attention: both paths run.
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
        }
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **top)
    if arch in QWEN3_5_ARCHS:
        vision = {**VISION_DIMS, "patch_size": 16, "num_position_embeddings": 256}  # Qwen3-VL's, without deepstack
        text.update(QWEN3_5_TEXT_DIMS)
        if arch == "qwen3_5":
            return Qwen3_5Config(text_config=text, vision_config=vision, **top)
        del text["intermediate_size"]  # every layer is MoE: routed experts and one shared expert
        # Expert width 192 as in Qwen3-VL-MoE below: a multiple of 64 for bitsandbytes' CPU dequantize.
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=192)
        text.update(shared_expert_intermediate_size=192)
        return Qwen3_5MoeConfig(text_config=text, vision_config=vision, **top)

    text["head_dim"] = HEAD_DIM
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 5e6,
        "mrope_section": MROPE_SECTION,
        "mrope_interleaved": True,
    }
    vision = {
        **VISION_DIMS,
        "patch_size": 16,
        # Learned position grid of 16 x 16 (must be a square number), interpolated per image.
        "num_position_embeddings": 256,
        # Deepstack features from both vision layers feed the first two text layers.
        "deepstack_visual_indexes": [0, 1],
    }
    if arch == "qwen3_vl":
        return Qwen3VLConfig(text_config=text, vision_config=vision, **top)
    text.update(
        num_experts=4,
        num_experts_per_tok=2,
        # 192, not 64: with hidden 128 a 64-wide expert makes gate_up_proj square
        # (4, 128, 128). transformers' qwen3_vl_moe loader transposes expert
        # weights only when their shape differs from the model's, so a square
        # tensor saved in the original (E, H, 2I) layout would load untransposed.
        # A multiple of 64 because bitsandbytes' CPU dequantize (tests store the
        # experts in 4 bits on CPU) is wrong when the last dim is not.
        moe_intermediate_size=192,
        decoder_sparse_step=1,
    )
    return Qwen3VLMoeConfig(text_config=text, vision_config=vision, **top)


def is_built(out_dir: Path, arch: str) -> bool:
    config_file = out_dir / "config.json"
    if not config_file.is_file():
        return False
    with config_file.open(encoding="utf-8") as handle:
        model_type = json.load(handle).get("model_type")
    # The weights are written last, so their presence means the build finished.
    return model_type == arch and (out_dir / "model.safetensors").is_file()


def build_tiny_model(out_dir, arch: str = "qwen3_vl", seed: int = 0) -> Path:
    """Build a tiny random ``arch`` checkpoint with its processor into ``out_dir``.

    Returns ``out_dir``; a directory already holding a finished build of the same
    arch is returned as is.
    """
    import transformers

    if arch not in TINY_ARCHS:
        raise ValueError(f"arch must be one of {TINY_ARCHS}, got {arch!r}")
    out_dir = Path(out_dir)
    if is_built(out_dir, arch):
        return out_dir

    tokenizer = build_tokenizer(("<think>", "</think>") if arch in QWEN3_5_ARCHS else ())
    processor = build_processor(arch, tokenizer)
    config = build_config(arch, tokenizer)

    torch.manual_seed(seed)  # weights are initialised in the constructor
    model = getattr(transformers, helpers.MODEL_FAMILIES[arch].model_class)(config).to(torch.float32).eval()
    model.config.dtype = torch.float32  # recorded in config.json
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[config.text_config.eos_token_id, config.text_config.pad_token_id],
        pad_token_id=config.text_config.pad_token_id,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=TINY_ARCHS, default="qwen3_vl", help="config.json's model_type")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (the smoke model: 42)")
    args = parser.parse_args(argv)
    print(f"{args.arch} in {build_tiny_model(args.out, args.arch, args.seed)}")


if __name__ == "__main__":
    main()

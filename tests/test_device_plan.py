"""Where the 4-bit weights go, planned on an empty (meta-device) model at the real sizes: no GPU, no weights."""

import dataclasses
import sys
from collections import Counter
from types import SimpleNamespace

import make_tiny_model
import pytest
import torch
from conftest import ROOT
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

import helpers

sys.path.insert(0, str(ROOT / "experiments"))
import bench_moe  # noqa: E402 (the real Qwen3-VL-30B-A3B sizes)
import bench_qwen35_fp16  # noqa: E402 (the real Qwen3.5 and Qwen3.6 sizes)
import common  # noqa: E402 (the real Qwen3-VL-2B/8B and Qwen2.5-VL-3B/7B sizes)

T4_X2 = {0: 15.0, 1: 15.0}  # GiB, as Kaggle's two T4s


def nf4(dtype=torch.float16):
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )


@pytest.fixture(scope="module")
def qwen3_vl_30b(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("30b")
    template = make_tiny_model.build_tiny_model(root / "template", "qwen3_vl_moe")
    bench_moe.moe_config(template, bench_moe.REAL_LAYERS, tiny=False).save_pretrained(root / "config")
    return str(root / "config")


def test_the_30b_moe_is_split_over_two_t4s(qwen3_vl_30b):
    quantization = helpers.quantization_kwargs(qwen3_vl_30b, torch.float16, on_gpu=True)
    device_map = helpers.plan_device_map(qwen3_vl_30b, quantization["quantization_config"], torch.float16, T4_X2)
    placed = Counter(device_map.values())
    assert set(placed) == {0, 1}  # both GPUs, never the CPU or the disk
    layers = [k for k in device_map if k.startswith("model.language_model.layers.")]
    assert len(layers) == bench_moe.REAL_LAYERS  # one entry per decoder layer: layers are not split
    assert min(placed.values()) >= 10  # spread, not one GPU filled to the brim


def test_a_model_too_large_stops_before_loading_and_says_why(qwen3_vl_30b):
    quantization = helpers.quantization_kwargs(qwen3_vl_30b, torch.float16, on_gpu=True)
    with pytest.raises(ValueError, match=r"30b.*does not fit: its 4-bit weights take 1\d\.\d GiB.*cuda:0 15\.0 GiB"):
        helpers.plan_device_map(qwen3_vl_30b, quantization["quantization_config"], torch.float16, {0: 15.0})


def test_a_model_that_fits_one_gpu_goes_on_one(tmp_path, tiny_model_dirs):
    config = common.real_size_config("8b", tiny_model_dirs["qwen3_vl"])
    config.save_pretrained(tmp_path)
    assert helpers.plan_device_map(str(tmp_path), nf4(), torch.float16, T4_X2) == {"": 0}
    assert helpers.plan_device_map(str(tmp_path), nf4(), torch.float16, {1: 15.0}) == {"": 1}  # a fold's process


@pytest.mark.parametrize("size, billions", [("3b", 3.75), ("7b", 8.29)])
def test_qwen25_vl_at_its_published_size_goes_on_one_t4(size, billions, tmp_path, tiny_model_dirs):
    """The real-size Qwen2.5-VL the rehearsal builds (common.qwen25_config) has the published parameter count, and the
    plan puts its 4-bit weights on one T4."""
    config = common.qwen25_config(size, tiny_model_dirs["qwen2_5_vl"])
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)
    config.save_pretrained(tmp_path)
    assert helpers.plan_device_map(str(tmp_path), nf4(), torch.float16, T4_X2) == {"": 0}


@pytest.fixture(scope="module", params=["27b", "35b-a3b"])
def qwen35_large(request, tmp_path_factory, tiny_model_dirs) -> str:
    """Qwen3.5-27B (dense; Qwen3.6-27B's architecture) or Qwen3.6-35B-A3B (MoE; Qwen3.5-35B-A3B's), config only."""
    arch = "qwen3_5_moe" if bench_qwen35_fp16.SIZES[request.param].get("moe") else "qwen3_5"
    folder = tmp_path_factory.mktemp(request.param)
    bench_qwen35_fp16.real_size_config(request.param, tiny_model_dirs[arch]).save_pretrained(folder)
    return str(folder)


def test_a_qwen35_model_too_large_for_one_t4_is_split_evenly_over_two(qwen35_large):
    quantization = helpers.quantization_kwargs(qwen35_large, torch.float16, on_gpu=True)["quantization_config"]
    with pytest.raises(ValueError, match=r"does not fit: its 4-bit weights take (1[6-9]|2\d)\.\d GiB"):
        helpers.plan_device_map(qwen35_large, quantization, torch.float16, {0: 15.0})
    device_map = helpers.plan_device_map(qwen35_large, quantization, torch.float16, T4_X2)
    sizes = helpers.quantized_module_sizes(qwen35_large, quantization, torch.float16)[2]
    per_gpu = [helpers.weights_per_gpu(device_map, sizes).get(gpu, 0) / 2**30 for gpu in (0, 1)]
    assert set(device_map.values()) == {0, 1}
    assert sum(per_gpu) == pytest.approx(sizes[""] / 2**30)  # every module placed once
    # Even: accelerate's room for offloading on the first GPU (Qwen3.5-27B's 2.4 GiB embeddings) is given back;
    # before, 27B went 5.8 + 10.5 GiB, leaving the last GPU, which holds lm_head, 4 GiB for activations.
    assert abs(per_gpu[0] - per_gpu[1]) < 1.0


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"])
def test_quantize_vision_false_keeps_the_vision_encoder_in_16_bits(arch, tiny_model_dirs):
    """As transformers' quantizer converts the modules: every Linear of the vision encoder stays nn.Linear, the
    language model's become Linear4bit, and lm_head stays as it was."""
    path = str(tiny_model_dirs[arch])

    def is_vision(name: str) -> bool:
        return name.startswith(helpers.VISION_ENCODER + ".")

    def load_plan(quantize_vision: bool) -> tuple[dict, int, int]:
        config = helpers.quantization_kwargs(path, torch.float16, on_gpu=True, quantize_vision=quantize_vision)
        model, _, sizes = helpers.quantized_module_sizes(path, config["quantization_config"], torch.float16)
        kinds = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        linear_fp16 = sum(2 * model.get_submodule(name).weight.numel() for name in kinds if is_vision(name))
        return kinds, sizes[helpers.VISION_ENCODER], linear_fp16

    (kinds_16, vision_16, linear_fp16), (kinds_4, vision_4, _) = load_plan(False), load_plan(True)
    vision = [name for name in kinds_16 if is_vision(name)]
    language = [name for name in kinds_16 if name.startswith("model.language_model.")]
    assert vision and language
    assert {kinds_16[name] for name in vision} == {"Linear"}
    assert {kinds_4[name] for name in vision} == {"Linear4bit"}  # the default, as measured so far
    assert {kinds_16[name] for name in language} == {kinds_4[name] for name in language} == {"Linear4bit"}
    assert kinds_16.get("lm_head", "Linear") == kinds_4.get("lm_head", "Linear") == "Linear"
    # the planner counts the difference: the vision Linears at 2 bytes a weight, against about half a byte in NF4
    assert 0.6 * linear_fp16 < vision_16 - vision_4 < linear_fp16


def test_a_fold_trained_before_quantize_vision_existed_is_still_reused():
    """An older fingerprint lacks quantize_vision; it was made with the vision encoder in 4 bits, the default."""
    expected = {"model_id": "m", "quantize_vision": True}
    assert helpers.fingerprint_changes({"model_id": "m"}, expected) == []
    assert helpers.fingerprint_changes({"model_id": "m"}, expected | {"quantize_vision": False}) == [
        "quantize_vision: True -> False"
    ]


class WeightsOn(torch.nn.Module):
    """A model whose weights are on these devices; only their device is read (a CPU cannot hold a CUDA tensor)."""

    def __init__(self, *devices: str):
        super().__init__()
        self.devices = [torch.device(d) for d in devices]

    def parameters(self, recurse: bool = True):
        return iter(SimpleNamespace(device=d) for d in self.devices)


def test_folds_go_side_by_side_by_default_when_the_model_is_on_one_gpu(monkeypatch):
    """parallel_folds=None on two GPUs: one fold per GPU for a model the plan put on one GPU, in turn otherwise. The
    decision reads where the weights are: transformers sets hf_device_map only for a model spread over several
    devices, and reading it sent every default run on T4 x2 into folds in turn (found by the two-GPU rehearsal)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = helpers.Config(n_folds=2)
    assert helpers.use_parallel_folds(cfg, WeightsOn("cuda:0", "cuda:0"))
    assert not helpers.use_parallel_folds(cfg, WeightsOn("cuda:0", "cuda:1"))  # split: no GPU holds a copy
    assert not helpers.use_parallel_folds(cfg, WeightsOn("cpu"))
    assert not helpers.use_parallel_folds(dataclasses.replace(cfg, train_folds=[1]), WeightsOn("cuda:0"))
    assert not helpers.use_parallel_folds(dataclasses.replace(cfg, parallel_folds=False), WeightsOn("cuda:0"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert not helpers.use_parallel_folds(cfg, WeightsOn("cuda:0"))

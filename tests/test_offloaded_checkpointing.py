"""helpers.OffloadedCheckpointing (Config.offload_activations): each checkpointed layer's input waits for the backward
in CPU memory, copied on a side stream. On the CPU, with its CUDA streams and pinned memory stubbed, it must leave the
gradient as it is and fetch each saved input once, ahead of its use; on a GPU (skipped in CI) the copies must not race
the computing, on one GPU or with the layers split over two."""

import contextlib
import gc
import weakref

import pytest
import torch
from test_model import backward_on_cpu, cfg_for, flat_grad, one_batch, trainable_lora_model
from transformers import AutoConfig
from transformers.modeling_layers import GradientCheckpointingLayer

import helpers


class NoStream:
    def __init__(self, device=None):
        pass

    def wait_stream(self, other):
        pass


class RecordedOffload(helpers.OffloadedCheckpointing):
    """Logs each saved input's pack, fetch and unpack, by the order of its pack. The saved inputs are held weakly,
    as the class holds them (a freed one's id() may come back for the next)."""

    def __init__(self, use_reentrant):
        super().__init__(use_reentrant)
        self.log = []
        self.order = weakref.WeakKeyDictionary()
        self.packed = 0

    def pack(self, tensor):
        saved = super().pack(tensor)
        self.order[saved] = self.packed
        self.packed += 1
        self.log.append(("pack", self.order[saved]))
        return saved

    def fetch(self, saved):
        self.log.append(("fetch", self.order[saved]))
        super().fetch(saved)

    def unpack(self, saved):
        self.log.append(("unpack", self.order[saved]))
        return super().unpack(saved)


@pytest.fixture
def cpu_streams(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Stream", NoStream)
    monkeypatch.setattr(torch.cuda, "current_stream", NoStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: None)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *args, pin_memory=False, **kwargs: empty(*args, **kwargs))


# The stubbed streams stand in for a GPU's on a machine without one; with one, the tests at the end run the real ones.
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's stand-in streams; a GPU has real ones")


@cpu_only
@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_5"])
def test_offloading_keeps_the_gradient_and_fetches_ahead(
    arch, reentrant, cpu_streams, tiny_model_dirs, tmp_path, sample_data
):
    grads, offload = [], None
    for offloaded in (False, True):
        cfg = cfg_for(arch, tiny_model_dirs, tmp_path, reentrant_checkpointing=reentrant)
        peft_model, processor = trainable_lora_model(cfg)
        if offloaded:
            offload = RecordedOffload(reentrant)
            assert offload.install(peft_model) > 0
        batch = one_batch(processor, sample_data[0].head(4))
        torch.manual_seed(1)  # the dropout masks
        backward_on_cpu(peft_model, batch, 2)  # two micro-batches: two forwards and backwards
        grads.append(flat_grad(peft_model))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)

    # Only the decoder layers' inputs are saved (the frozen vision encoder's need no backward), each fetched once.
    layers = len(peft_model.get_base_model().model.language_model.layers)
    packs = [i for event, i in offload.log if event == "pack"]
    assert packs == list(range(2 * layers))
    assert sorted(i for event, i in offload.log if event == "fetch") == packs
    assert sorted(i for event, i in offload.log if event == "unpack") == packs
    for micro in range(2):  # each backward takes the inputs in reverse, each fetched while the one after recomputes
        first, last = micro * layers, (micro + 1) * layers - 1
        expected = [("unpack", last), ("fetch", last)]
        for i in range(last - 1, first - 1, -1):
            expected += [("fetch", i), ("unpack", i)]
        start = offload.log.index(("unpack", last))
        assert offload.log[start : start + 2 * layers] == expected


@cpu_only
def test_a_forward_cut_short_leaves_nothing_behind(cpu_streams, tiny_model_dirs, tmp_path, sample_data):
    """A forward that fails (as one out of memory does) drops its saved inputs with its graph: the next forward's
    chain starts afresh, and its backward fetches none of the failed one's."""
    cfg = cfg_for("qwen3_vl", tiny_model_dirs, tmp_path)
    peft_model, processor = trainable_lora_model(cfg)
    offload = RecordedOffload(use_reentrant=True)
    offload.install(peft_model)
    batch = one_batch(processor, sample_data[0].head(2))
    layers = [m for m in peft_model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    last = layers[-1]
    original = last.forward

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    last.forward = out_of_memory
    with pytest.raises(torch.OutOfMemoryError):
        backward_on_cpu(peft_model, batch, 2)
    gc.collect()
    assert offload.last is not None and offload.last() is None  # the failed forward's inputs are gone
    last.forward = original
    failed = offload.packed
    offload.log.clear()
    backward_on_cpu(peft_model, batch, 2)
    assert all(i >= failed for _, i in offload.log)
    assert sorted(i for event, i in offload.log if event == "fetch") == sorted(
        i for event, i in offload.log if event == "pack"
    )


@cpu_only
def test_offloading_is_installed_on_a_gpu_only(tiny_model_dirs, tmp_path):
    """On a CPU the layer inputs are in CPU memory already: offload_activations leaves checkpointing as it is."""
    model, _ = helpers.load_model_and_processor(
        cfg_for("qwen3_vl", tiny_model_dirs, tmp_path, offload_activations=True)
    )
    funcs = {m._gradient_checkpointing_func.func for m in model.modules() if isinstance(m, GradientCheckpointingLayer)}
    assert funcs == {torch.utils.checkpoint.checkpoint}


def two_gpu_device_map(model_path):
    """The tiny model's language layers split over two GPUs, as a model too large for one T4 is split."""
    config = AutoConfig.from_pretrained(model_path)
    layers = config.text_config.num_hidden_layers
    device_map = {"model.visual": 0, "model.language_model.embed_tokens": 0, "model.language_model.rotary_emb": 0}
    device_map |= {f"model.language_model.layers.{i}": int(i >= layers // 2) for i in range(layers)}
    return device_map | {"model.language_model.norm": 1, "lm_head": 1}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: its streams and pinned memory")
@pytest.mark.parametrize("gpus", [1, 2])
def test_offloading_on_gpus(gpus, tiny_model_dirs, tmp_path, sample_data, monkeypatch):
    """Config(offload_activations=True) through the user's path, with real streams, 4-bit weights and the GPU's
    precision: the same gradient as without, on one GPU and with the layers split over two."""
    if gpus > torch.cuda.device_count():
        pytest.skip(f"needs {gpus} GPUs")
    if gpus == 2:
        monkeypatch.setattr(helpers, "plan_device_map", lambda path, *args: two_gpu_device_map(path))
    packed = []  # the inputs offloaded: one per decoder layer and micro-batch (none of the frozen vision encoder's)
    pack = helpers.OffloadedCheckpointing.pack
    monkeypatch.setattr(helpers.OffloadedCheckpointing, "pack", lambda self, t: packed.append(t.shape) or pack(self, t))
    grads = []
    for offloaded in (False, True):
        cfg = cfg_for("qwen3_vl", tiny_model_dirs, tmp_path, offload_activations=offloaded)
        peft_model, processor = trainable_lora_model(cfg)
        funcs = {
            type(getattr(m._gradient_checkpointing_func, "__self__", None))
            for m in peft_model.modules()
            if isinstance(m, GradientCheckpointingLayer)
        }
        assert funcs == ({helpers.OffloadedCheckpointing} if offloaded else {type(None)})
        layer_devices = {p.device for p in peft_model.get_base_model().model.language_model.layers.parameters()}
        assert len(layer_devices) == gpus
        batch = one_batch(processor, sample_data[0].head(4))
        autocast = helpers.autocast_context(torch.device("cuda"), helpers.compute_dtype(cfg.precision))
        torch.manual_seed(1)
        helpers.accumulate_gradients(peft_model, batch, 2, torch.amp.GradScaler("cuda", enabled=False), autocast)
        grads.append(flat_grad(peft_model))
    assert len(packed) == 2 * len(peft_model.get_base_model().model.language_model.layers), packed
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-2, atol=1e-4)

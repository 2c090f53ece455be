"""experiments/bench_peers.SideStreamOffload, the prototype of Unsloth's offloading, on the CPU with its CUDA streams
and pinned memory stubbed: it must leave the gradient as it is and fetch each saved layer input once, ahead of its
use. Whether the copies really overlap the computing is for the GPU run (run_gpu.sh peers_unsloth_offload_bf16)."""

import contextlib
import sys

import pytest
import torch
from conftest import ROOT
from test_model import backward_on_cpu, cfg_for, one_batch, trainable_lora_model

import helpers

sys.path.insert(0, str(ROOT / "experiments"))
import bench_peers  # noqa: E402


class NoStream:
    def wait_stream(self, other):
        pass


class RecordedOffload(bench_peers.SideStreamOffload):
    """Logs each saved input's pack, fetch and unpack, by the order of its pack."""

    def __init__(self):
        super().__init__()
        self.log = []
        self.order = {}

    def pack(self, tensor):
        saved = super().pack(tensor)
        self.order[id(saved)] = len(self.order)
        self.log.append(("pack", self.order[id(saved)]))
        return saved

    def fetch(self, saved):
        self.log.append(("fetch", self.order[id(saved)]))
        super().fetch(saved)

    def unpack(self, saved):
        self.log.append(("unpack", self.order[id(saved)]))
        return super().unpack(saved)


@pytest.fixture
def cpu_streams(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Stream", NoStream)
    monkeypatch.setattr(torch.cuda, "current_stream", NoStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: None)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *args, pin_memory=False, **kwargs: empty(*args, **kwargs))


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_5"])
def test_side_stream_offload_keeps_the_gradient_and_fetches_ahead(
    arch, cpu_streams, tiny_model_dirs, tmp_path, sample_data
):
    grads, offload = [], None
    for side_stream in (False, True):
        cfg = cfg_for(arch, tiny_model_dirs, tmp_path)  # reentrant checkpointing, as the prototype runs
        peft_model, processor = trainable_lora_model(cfg)
        if side_stream:
            offload = RecordedOffload()
            assert offload.install(peft_model) > 0
        batch = one_batch(processor, sample_data[0].head(4))
        torch.manual_seed(1)  # the dropout masks
        backward_on_cpu(peft_model, batch, 2)  # two micro-batches: two forwards and backwards
        grads.append(torch.cat([p.grad.flatten() for p in peft_model.parameters() if p.requires_grad]))
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: its streams and pinned memory")
def test_side_stream_offload_on_a_gpu(tiny_model_dirs, tmp_path, sample_data):
    """The same with real streams, 4-bit weights and the GPU's precision: the copies must not race the computing."""
    grads = []
    for side_stream in (False, True):
        cfg = cfg_for("qwen3_vl", tiny_model_dirs, tmp_path)
        peft_model, processor = trainable_lora_model(cfg)
        if side_stream:
            bench_peers.SideStreamOffload().install(peft_model)
        batch = one_batch(processor, sample_data[0].head(4))
        autocast = helpers.autocast_context(torch.device("cuda"), helpers.compute_dtype(cfg.precision))
        torch.manual_seed(1)
        helpers.accumulate_gradients(peft_model, batch, 2, torch.amp.GradScaler("cuda", enabled=False), autocast)
        grads.append(torch.cat([p.grad.float().flatten() for p in peft_model.parameters() if p.requires_grad]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-2, atol=1e-4)

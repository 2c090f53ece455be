"""Where one training step would wait for the GPU: the calls that copy a GPU value to the host, counted by call site.

On a GPU, `.item()`, `.tolist()`, a tensor's truth value, `nonzero`, boolean indexing and the like wait until every
kernel queued before them has run; a step full of them leaves the GPU idle while the CPU launches the next kernels
(the profiles in results/peers_profile_*.json count 261 `cudaStreamSynchronize` a step of Qwen3-VL-8B). The calls
are the same on a CPU, so this counts them there: one optimizer step of helpers' training path (accumulate_gradients
and optimizer_step) on the tiny Qwen3-VL model, after a warm-up step, under a TorchFunctionMode that sees every torch
call. Counts scale with the rows of a step and the layers of the model, which the output gives. Some reads are of
tensors that stay on the CPU on a GPU machine too, and do not wait: the `item` calls in optimizer_step are AdamW's
step counts (torch keeps them on the CPU).

    python3 experiments/count_syncs.py --out experiments/results/count_syncs.json
"""

from __future__ import annotations

import argparse
import collections
import traceback

import bench_train
import common
import torch
from common import helpers
from torch.overrides import TorchFunctionMode

HOST_READS = {"item", "tolist", "__bool__", "__int__", "__index__", "__float__", "nonzero", "cpu", "numpy"}
HOST_READS |= {"masked_select", "unique", "unique_consecutive", "argwhere", "equal", "allclose"}


def host_read(name: str, args: tuple, kwargs: dict) -> str | None:
    """The kind of host read a torch call is, or None: one whose result size or value the host must know."""
    if name in HOST_READS:
        return name
    if name == "__getitem__" and len(args) > 1:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
            return "boolean indexing"
    if name == "repeat_interleave" and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return None if "output_size" in kwargs else "repeat_interleave by a tensor"
    if name == "where" and len(args) == 1:
        return "where(condition)"
    return None


class HostReads(TorchFunctionMode):
    """Counts host reads by (kind, the first caller outside torch)."""

    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = host_read(getattr(func, "__name__", ""), args, kwargs)
        if kind:
            caller = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename][-1]
            path = caller.filename.split("site-packages/")[-1].removeprefix(str(common.ROOT) + "/")
            site = f"{path}:{caller.lineno} {caller.name}"
            self.sites[(kind, site)] += 1
        return func(*args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--rows", type=int, default=4, help="rows in the step")
    args = parser.parse_args()

    cfg = helpers.Config(profile="smoke", output_dir="/tmp/count-syncs")
    model, processor = helpers.load_model_and_processor(cfg)
    model = helpers.attach_lora(model, cfg)
    train, _, _ = helpers.load_competition_data(helpers.find_data_dir(), cfg.image_size)
    rows = train.head(args.rows)
    dataset = helpers.VQADataset(rows, helpers.pixel_budget(processor), train=True)
    batch = helpers.VQACollator(processor, train=True)([dataset[i] for i in range(len(rows))])
    opt = bench_train.Optimizer(model, cfg)
    model.train()

    def step() -> None:
        helpers.accumulate_gradients(model, batch, args.rows, opt.scaler, opt.autocast)
        opt.step()

    step()  # warm-up: what runs once (lazy initialisation) is not a step's
    counter = HostReads()
    with counter:
        step()
    sites = [{"kind": kind, "site": site, "calls": n} for (kind, site), n in counter.sites.most_common()]
    results = {
        "benchmark": "count_syncs",
        "env": common.environment(),
        "model": cfg.model_id,
        "rows": args.rows,
        "text_layers": model.config.text_config.num_hidden_layers,
        "vision_layers": model.config.vision_config.depth,
        "host_reads": sum(s["calls"] for s in sites),
        "sites": sites,
    }
    common.write_json(args.out, results)
    common.print_table(sites)


if __name__ == "__main__":
    main()

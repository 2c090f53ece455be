"""Run the notebook's code cells on a GPU machine that has no Jupyter: the smoke profile end to end through the CUDA
path (4-bit load, autocast, GradScaler), once in the GPU's own precision and once forced to fp16 as on a T4.

    python experiments/run_notebook_gpu.py --out /tmp/nb          # writes <out>/<precision>/ and a summary JSON
    python experiments/run_notebook_gpu.py --out /tmp/nb --precision native   # one of the two only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "Kaggle_Qwen_VQA_AllInOne.ipynb"


def run_cells(output_dir: Path, precision: str) -> dict:
    """Execute every code cell in order in one namespace, as "Run all" does; `display` prints. After the Config cell,
    cfg.precision is set to `precision`."""
    os.environ.update(VQA_PROFILE="smoke", VQA_OUTPUT_DIR=str(output_dir))
    namespace = {"display": print, "__name__": "__main__"}
    cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    for cell in cells:
        exec("".join(cell["source"]), namespace)  # noqa: S102 (the notebook's own code)
        if "cfg = helpers.Config(" in "".join(cell["source"]):
            namespace["cfg"].precision = precision
    results = [json.loads(p.read_text()) for p in sorted(output_dir.glob("fold*/result.json"))]
    return {
        "best_val_acc": [r["best_val_acc"] for r in results],
        "skipped_steps": [r["skipped_steps"] for r in results],
        "submission_rows": len((output_dir / "submission_ensemble.csv").read_text().splitlines()) - 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--precision", choices=("both", "native", "fp16"), default="both")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    import helpers

    summary = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    # native: the GPU's own precision ("auto"); fp16: what a T4 (no bf16) computes in, with the GradScaler on
    for precision, config_value in (("native", "auto"), ("fp16", "fp16")):
        if args.precision not in ("both", precision):
            continue
        start = time.perf_counter()
        summary[precision] = run_cells(Path(args.out) / precision, config_value)
        summary[precision].update(dtype=str(helpers.compute_dtype(config_value)), seconds=time.perf_counter() - start)
        print(precision, summary[precision], flush=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

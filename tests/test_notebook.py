"""The notebook itself: it parses, it is committed clean, and it runs end to end on the smoke profile."""

import ast
import json
import shutil
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from conftest import ROOT

NOTEBOOK = ROOT / "Kaggle_Qwen_VQA_AllInOne.ipynb"
SECTIONS = [
    "Setup",
    "Config",
    "Data",
    "EDA",
    "Stratified K-fold",
    "Dataset",
    "Model",
    "Train",
    "Inference",
    "Ensemble",
]


@pytest.fixture(scope="module")
def notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_every_code_cell_parses(notebook):
    for cell in notebook.cells:
        if cell.cell_type == "code":
            ast.parse(cell.source)


def test_committed_without_outputs(notebook):
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_sections_in_the_product_order(notebook):
    headers = [c.source.splitlines()[0] for c in notebook.cells if c.cell_type == "markdown"]
    numbered = [h for h in headers if h.startswith("## ")]
    assert [h.split(". ", 1)[1].split(":")[0] for h in numbered] == SECTIONS


def test_papermill_parameters_cell(notebook):
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for name in ("PROFILE", "DATA_DIR", "OUTPUT_DIR"):
        assert name in tagged[0].source


def run_notebook(out_dir):
    import papermill

    papermill.execute_notebook(
        str(NOTEBOOK),
        str(out_dir / "run.ipynb"),
        # Both folders explicit: on a machine with /kaggle/input (Kaggle itself) the notebook would otherwise find the
        # competition data attached there.
        parameters={"PROFILE": "smoke", "DATA_DIR": str(ROOT / "data"), "OUTPUT_DIR": str(out_dir)},
        cwd=str(ROOT),
        progress_bar=False,
    )
    return nbformat.read(out_dir / "run.ipynb", as_version=4)


@pytest.mark.slow
def test_notebook_runs_end_to_end_and_twice_without_retraining(tmp_path, sample_data):
    """The README's main job. The second run resumes: no training, identical submissions."""
    _, test, sample = sample_data
    saved = run_notebook(tmp_path)
    # The saved notebook is what people read on Kaggle: progress in a few lines, no warnings, under 100 KB.
    assert (tmp_path / "run.ipynb").stat().st_size < 100_000
    outputs = [o for c in saved.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o.text for o in outputs if o.get("name") == "stderr"]
    files = ["submission_ensemble.csv", "submission_soft.csv", "submission_single.csv"]
    first = {name: (tmp_path / name).read_text() for name in files}
    for name in files:
        submission = pd.read_csv(tmp_path / name, dtype=str)
        assert submission["id"].tolist() == sample["id"].tolist()
        assert submission["answer"].isin(list("abcd")).all()
    for fold in (0, 1):
        result = json.loads((tmp_path / f"fold{fold}" / "result.json").read_text())
        assert result["best_val_acc"] >= 0.6, result  # chance is 0.25
        assert (tmp_path / f"fold{fold}" / "test_probs.npy").exists()
    assert (tmp_path / "folds.csv").exists() and (tmp_path / "eda" / "answers.png").exists()
    # The submitted variant (plain, TTA or debiased, chosen out of fold) is as good as the folds: the smoke model
    # learned the options' positions, so four-way rotation TTA would bring it back to chance.
    folds = pd.read_csv(tmp_path / "folds.csv", dtype={"id": str}).merge(sample_data[0][["id", "answer"]], on="id")
    correct = [
        np.load(tmp_path / f"fold{k}" / "oof_probs.npy").argmax(1)
        == folds.loc[folds["fold"] == k, "answer"].map("abcd".index)
        for k in (0, 1)
    ]
    assert np.concatenate(correct).mean() >= 0.6

    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("fold*/best_adapter/*")}
    rerun = run_notebook(tmp_path)
    log = "".join(o.get("text", "") for c in rerun.cells if c.cell_type == "code" for o in c.outputs)
    assert "folds [0, 1]: already trained, skipped" in log
    assert stamps == {p: p.stat().st_mtime_ns for p in tmp_path.glob("fold*/best_adapter/*")}
    assert first == {name: (tmp_path / name).read_text() for name in files}


def setup_search(notebook, root: Path) -> str:
    """The setup cell's search for helpers.py, up to its import, with /kaggle and /content moved under `root`."""
    source = next(c.source for c in notebook.cells if c.cell_type == "code" and "PLACES" in c.source)
    search = source[: source.index("if helpers.on_hosted_notebook()")]
    return search.replace('"/kaggle/', f'"{root}/kaggle/').replace('"/content/', f'"{root}/content/')


def test_setup_cell_finds_helpers_in_any_attached_input(notebook, tmp_path, monkeypatch, capsys):
    """A Kaggle utility script of any name wins over an uploaded dataset's copy, and the cell says so."""
    script = tmp_path / "kaggle" / "usr" / "lib" / "qwen_vqa_tools" / "qwen_vqa_tools.py"
    upload = tmp_path / "kaggle" / "input" / "my-upload" / "helpers.py"
    for path in (script, upload):
        path.parent.mkdir(parents=True)
        shutil.copy(ROOT / "helpers.py", path)
    (tmp_path / "kaggle" / "working").mkdir()
    monkeypatch.chdir(tmp_path / "kaggle" / "working")  # where Kaggle runs a notebook
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "helpers")  # the tests' own import must not answer for the cell's

    namespace = {}
    exec(setup_search(notebook, tmp_path), namespace)
    assert capsys.readouterr().out == f"imported {script} (also found, not used: {upload})\n"
    assert namespace["helpers"].__file__ == str(script)

    script.unlink()
    exec(setup_search(notebook, tmp_path), namespace)
    assert capsys.readouterr().out == f"imported {upload}\n"
    assert namespace["helpers"].__file__ == str(upload)

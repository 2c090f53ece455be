"""Two sessions: train into one folder, then predict with its adapters (cfg.adapters_from) into another, read-only."""

import dataclasses
import hashlib
import os
import shutil
import stat

import numpy as np
import pandas as pd
import pytest

import helpers


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, tiny_model_dirs, sample_data):
    """The first session: fold 0 of 2 trained for one epoch on 24 rows and scored, in <earlier>/outputs (the layout of
    a Kaggle notebook's output attached as a dataset)."""
    train, test, sample = sample_data[0].head(24), sample_data[1].head(6), sample_data[2].head(6)
    out = tmp_path_factory.mktemp("earlier") / "outputs"
    cfg = helpers.Config(
        profile="smoke",
        model_id=str(tiny_model_dirs["qwen3_vl"]),
        output_dir=str(out),
        train_folds=(0,),
        epochs=1,
        batch_size=4,
        grad_accum=2,
    )
    helpers.prepare_run_folder(cfg, train)
    folds = helpers.make_folds(train, cfg.n_folds, cfg.seed)
    helpers.save_folds(folds, cfg)
    model, processor = helpers.load_model_and_processor(cfg)
    results = helpers.train_folds(model, processor, folds, test, cfg)
    helpers.predict_folds(model, processor, folds, test, cfg)
    return dict(
        cfg=cfg, train=train, test=test, sample=sample, folds=folds, model=model, processor=processor, results=results
    )


def later(earlier, out, **changes):
    """The second session's Config: the first one's, predicting from it into `out`."""
    changes = {"output_dir": str(out), "adapters_from": str(earlier["cfg"].out), **changes}
    return dataclasses.replace(earlier["cfg"], **changes)


def predict_with_earlier_adapters(earlier, cfg):
    """The notebook's path with adapters_from set: data cell, folds, training cell (trains nothing), inference,
    submissions."""
    helpers.prepare_run_folder(cfg, earlier["train"])
    folds = helpers.run_folds(earlier["train"], cfg)
    helpers.save_folds(folds, cfg)
    fold_results = helpers.earlier_fold_results(cfg, folds)
    helpers.plot_training_curves(cfg)
    predictions = helpers.predict_folds(earlier["model"], earlier["processor"], folds, earlier["test"], cfg)
    helpers.write_submissions(predictions, fold_results, earlier["test"], earlier["sample"], cfg)
    return folds, fold_results


def snapshot(folder):
    """Every file and folder under `folder`: content hash and modification time (files), or None (folders)."""
    return {
        path: (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns) if path.is_file() else None
        for path in sorted(folder.rglob("*"))
    }


def set_writable(folder, writable: bool) -> None:
    write = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
    for path in [folder, *folder.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode | stat.S_IWUSR if writable else mode & ~write)


def test_predicts_into_a_new_folder_and_never_writes_into_the_earlier_one(earlier, tmp_path, capsys):
    """As root (the CI machine) chmod does not stop a write: the snapshot of every file before and after does."""
    a, b = earlier["cfg"].out, tmp_path / "outputs"
    before = snapshot(a)
    set_writable(a, False)
    try:
        # adapters_from one level above the run, as Kaggle attaches it: /kaggle/input/<name>/outputs
        cfg = later(earlier, b, adapters_from=str(a.parent), train_folds=None)  # every fold: 1 was not trained
        folds, fold_results = predict_with_earlier_adapters(earlier, cfg)
    finally:
        set_writable(a, True)
    assert snapshot(a) == before

    assert f"folds [0]: adapters from {a}; folds [1] not trained there" in capsys.readouterr().out
    pd.testing.assert_frame_equal(folds, earlier["folds"])
    assert (b / "folds.csv").read_text() == (a / "folds.csv").read_text()
    pd.testing.assert_frame_equal(fold_results, earlier["results"])
    assert not (b / "fold0" / "best_adapter").exists()  # read where it is, not copied
    for name in ("submission_ensemble.csv", "fold0/scores.npz", "fold0/oof_probs.npy", "plots/training_curves.png"):
        assert (b / name).exists(), name
    with np.load(b / "fold0" / "scores.npz") as new, np.load(a / "fold0" / "scores.npz") as old:
        for key in ("oof", "test", "prior", "fingerprint"):
            np.testing.assert_array_equal(new[key], old[key])  # scored afresh, as in the first session
    np.testing.assert_array_equal(np.load(b / "fold0" / "test_probs.npy"), np.load(a / "fold0" / "test_probs.npy"))


def test_a_rerun_into_the_new_folder_reuses_its_scores(earlier, tmp_path, monkeypatch):
    cfg = later(earlier, tmp_path / "outputs")
    predict_with_earlier_adapters(earlier, cfg)
    first = (cfg.out / "submission_ensemble.csv").read_text()
    monkeypatch.setattr(helpers, "score_orders", None)  # nothing may be scored again
    predict_with_earlier_adapters(earlier, cfg)  # prepare_run_folder finds this folder bound to the same adapters
    assert (cfg.out / "submission_ensemble.csv").read_text() == first


@pytest.mark.parametrize(
    "change, listed",
    [
        (dict(image_size=96), ["fold0/fingerprint.json: image_size: 64 -> 96"]),
        (dict(model_id="tiny:qwen2_5_vl"), ["fold0/fingerprint.json: model_id: '", "' -> 'tiny:qwen2_5_vl'"]),
        (dict(lora_r=8), ["fold0/fingerprint.json: lora_r: 16 -> 8"]),
        (dict(seed=7), ["outputs/fingerprint.json: seed: 42 -> 7", "fold0/fingerprint.json: seed: 42 -> 7"]),
    ],
)
def test_adapters_of_another_config_are_refused_with_the_fields_named(earlier, tmp_path, change, listed):
    cfg = later(earlier, tmp_path / "new", **change)
    with pytest.raises(helpers.StaleRunError) as error:
        helpers.prepare_run_folder(cfg, earlier["train"])
    message = str(error.value).replace(os.sep, "/")
    assert f"adapters_from: {earlier['cfg'].out} was made from another config or data" in message
    for text in listed:
        assert text in message
    assert not cfg.out.exists()  # refused before anything is written


def test_adapters_of_other_data_are_refused(earlier, tmp_path):
    changed = earlier["train"].copy()
    changed.loc[0, "question"] += " (edited)"
    with pytest.raises(helpers.StaleRunError, match=r"fingerprint.json: train data: '[0-9a-f]+' -> '[0-9a-f]+'"):
        helpers.prepare_run_folder(later(earlier, tmp_path / "new"), changed)


def test_a_missing_folder_or_one_without_a_run_is_named(earlier, tmp_path):
    train = earlier["train"]
    with pytest.raises(FileNotFoundError, match=f"adapters_from: {tmp_path / 'nowhere'} is not a folder"):
        helpers.prepare_run_folder(later(earlier, tmp_path / "new", adapters_from=str(tmp_path / "nowhere")), train)
    with pytest.raises(FileNotFoundError, match=f"adapters_from: {tmp_path} holds no earlier run: no folds.csv"):
        helpers.prepare_run_folder(later(earlier, tmp_path / "new", adapters_from=str(tmp_path)), train)
    for name in ("run-1", "run-2"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "folds.csv").write_text("id,fold\n")
    with pytest.raises(ValueError, match="holds several runs .*run-1.*run-2.*: set it to one of them"):
        helpers.prepare_run_folder(later(earlier, tmp_path / "new", adapters_from=str(tmp_path / "runs")), train)


def test_a_run_without_trained_folds_is_named(earlier, tmp_path):
    """Folds and fingerprint but no finished fold (a session that ended in fold 0's first epoch)."""
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    for name in ("folds.csv", "fingerprint.json"):
        shutil.copy(earlier["cfg"].out / name, untrained / name)
    cfg = later(earlier, tmp_path / "new", adapters_from=str(untrained), train_folds=None)
    with pytest.raises(FileNotFoundError, match=rf"{untrained} holds no trained fold of \[0, 1\]"):
        helpers.prepare_run_folder(cfg, earlier["train"])
    with pytest.raises(FileNotFoundError, match=r"holds no trained fold of \[1\]"):  # fold 1 was never trained
        helpers.prepare_run_folder(later(earlier, tmp_path / "new", train_folds=(1,)), earlier["train"])


@pytest.fixture
def copied(earlier, tmp_path):
    """A writable copy of the earlier run, to damage."""
    copy = tmp_path / "copy"
    shutil.copytree(earlier["cfg"].out, copy)
    return copy


def test_a_result_without_its_adapter_is_named(earlier, copied, tmp_path):
    shutil.rmtree(copied / "fold0" / "best_adapter")
    cfg = later(earlier, tmp_path / "new", adapters_from=str(copied))
    with pytest.raises(FileNotFoundError, match=r"folds \[0\] have a result.json but no best_adapter/"):
        helpers.prepare_run_folder(cfg, earlier["train"])


def test_an_unreadable_result_is_named_and_left_as_it_is(earlier, copied, tmp_path):
    result = copied / "fold0" / "result.json"
    result.write_text('{"fold": 0, "best_val_acc"')
    cfg = later(earlier, tmp_path / "new", adapters_from=str(copied))
    with pytest.raises(ValueError, match=f"{result} is unreadable .*: leave fold 0 out with train_folds"):
        helpers.prepare_run_folder(cfg, earlier["train"])
    assert result.read_text() == '{"fold": 0, "best_val_acc"'  # not moved aside: it is not this run's to move


def test_an_adapter_from_before_fingerprints_is_refused(earlier, copied, tmp_path):
    (copied / "fold0" / "fingerprint.json").unlink()
    cfg = later(earlier, tmp_path / "new", adapters_from=str(copied))
    with pytest.raises(helpers.StaleRunError, match="fold0.fingerprint.json: no fingerprint.json"):
        helpers.prepare_run_folder(cfg, earlier["train"])


def test_a_folds_csv_of_other_rows_is_named(earlier, copied, tmp_path):
    """The fingerprint guards the data; folds.csv itself is checked against it too (a hand-edited copy)."""
    folds = pd.read_csv(copied / "folds.csv", dtype=str)
    folds.iloc[1:].to_csv(copied / "folds.csv", index=False)
    cfg = later(earlier, tmp_path / "new", adapters_from=str(copied))
    helpers.prepare_run_folder(cfg, earlier["train"])
    missing = folds["id"].iloc[0]
    with pytest.raises(ValueError, match=f"folds.csv does not match train.csv: ids without a fold \\['{missing}'\\]"):
        helpers.run_folds(earlier["train"], cfg)


def test_the_earlier_run_cannot_be_the_output_folder(earlier):
    cfg = later(earlier, earlier["cfg"].out)
    with pytest.raises(ValueError, match="adapters_from and output_dir are both"):
        helpers.prepare_run_folder(cfg, earlier["train"])


def test_adapters_from_and_zero_shot_exclude_each_other(tmp_path):
    with pytest.raises(ValueError, match="adapters_from .* and zero_shot exclude each other"):
        helpers.Config(profile="smoke", adapters_from=str(tmp_path), zero_shot=True)


def test_the_summary_says_nothing_is_trained(earlier, tmp_path):
    assert f"(no training: the adapters of {earlier['cfg'].out})" in later(earlier, tmp_path).summary()

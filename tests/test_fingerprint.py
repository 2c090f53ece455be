"""A run folder bound to its config and data: fingerprints checked before reuse, and damaged run files made again."""

import json

import numpy as np
import pytest
import torch

import helpers


def finished_run(cfg, train):
    """What a finished run leaves in cfg.out, as far as the fingerprints go: folds, and per fold its fingerprint, a
    checkpoint and a result."""
    helpers.prepare_run_folder(cfg, train)
    folds = helpers.make_folds(train, cfg.n_folds, cfg.seed)
    helpers.save_folds(folds, cfg)
    folds_print = helpers.folds_fingerprint(cfg, folds)
    for fold in range(cfg.n_folds):
        helpers.bind_fold(cfg, folds_print, fold)
        (cfg.fold_dir(fold) / "checkpoint-4").mkdir()
        (cfg.fold_dir(fold) / "result.json").write_text(json.dumps({"fold": fold, "best_val_acc": 0.7}))
    return folds


def smoke(tmp_path, **changes):
    return helpers.Config(profile="smoke", output_dir=str(tmp_path / "outputs"), **changes)


@pytest.fixture
def train(sample_data):
    return sample_data[0]


def test_nothing_changed_resumes(tmp_path, train):
    finished_run(smoke(tmp_path), train)
    helpers.prepare_run_folder(smoke(tmp_path), train)  # no error
    assert helpers.fold_is_trained(smoke(tmp_path), 0)


def test_settings_that_leave_the_results_alone_may_change(tmp_path, train):
    finished_run(smoke(tmp_path), train)
    same_results = dict(train_folds=(1,), batch_size=2, grad_accum=4, eval_batch_size=4, num_workers=2)
    same_results.update(parallel_folds=True, save_every_steps=7, tta_rotations=1, debias_samples=0)
    helpers.prepare_run_folder(smoke(tmp_path, **same_results), train)  # effective batch still 8: no error


def test_another_seed_stops_before_any_work_and_lists_the_change(tmp_path, train):
    """The issue's first case: the old folds were skipped as trained and scored against the new folds.csv."""
    finished_run(smoke(tmp_path), train)
    out = tmp_path / "outputs"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(helpers.StaleRunError) as error:
        helpers.prepare_run_folder(smoke(tmp_path, seed=7), train)
    message = str(error.value)
    for path in (out / "fingerprint.json", out / "fold0" / "fingerprint.json", out / "fold1" / "fingerprint.json"):
        assert f"{path}: seed: 42 -> 7" in message
    assert "set OUTPUT_DIR to a new folder" in message and "move_stale_run_aside=True" in message
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*")}  # config.json not even rewritten


def test_another_fold_count_stops(tmp_path, train):
    """The issue's second case: the old folds were reused, then shapes (160,) and (107,) failed to broadcast."""
    finished_run(smoke(tmp_path), train)
    with pytest.raises(helpers.StaleRunError, match="fingerprint.json: n_folds: 2 -> 3"):
        helpers.prepare_run_folder(smoke(tmp_path, n_folds=3), train)


@pytest.mark.parametrize(
    "change, listed",
    [
        (dict(image_size=96), "image_size: 64 -> 96"),
        (dict(model_id="Qwen/Qwen3-VL-2B-Instruct"), "model_id: 'data/tiny-qwen3-vl' -> 'Qwen/Qwen3-VL-2B-Instruct'"),
        (dict(lr=1e-3), "lr: 0.002 -> 0.001"),
        (dict(lora_r=8), "lora_r: 16 -> 8; lora_alpha: 32 -> 16"),
        (dict(lora_targets=("q_proj", "v_proj")), "lora_targets: ['q_proj', 'k_proj'"),
        (dict(epochs=3), "epochs: 20 -> 3"),
        (dict(shuffle_options=True), "shuffle_options: False -> True"),
        (dict(batch_size=4), "effective_batch: 8 -> 4"),
        (dict(precision="fp16"), "precision: 'auto' -> 'fp16'"),
        (dict(early_stopping_patience=2), "early_stopping_patience: 0 -> 2"),
    ],
)
def test_another_adapter_setting_stops_at_the_fold_folders(tmp_path, train, change, listed):
    finished_run(smoke(tmp_path), train)
    with pytest.raises(helpers.StaleRunError) as error:
        helpers.prepare_run_folder(smoke(tmp_path, **change), train)
    message = str(error.value)
    assert f"fold0{helpers.os.sep}fingerprint.json: {listed}" in message
    assert f"outputs{helpers.os.sep}fingerprint.json" not in message  # the folds themselves are still right


def test_other_data_stops(tmp_path, train):
    finished_run(smoke(tmp_path), train)
    changed = train.copy()
    changed.loc[0, "answer"] = "b" if train.loc[0, "answer"] != "b" else "c"
    with pytest.raises(helpers.StaleRunError, match="fingerprint.json: train data: '[0-9a-f]+' -> '[0-9a-f]+'"):
        helpers.prepare_run_folder(smoke(tmp_path), changed)
    moved = train.assign(image_path="/elsewhere/" + train["image_path"])  # the same data found on another machine
    helpers.prepare_run_folder(smoke(tmp_path), moved)


def test_a_folder_from_before_fingerprints_is_not_trusted(tmp_path, train):
    cfg = smoke(tmp_path)
    finished_run(cfg, train)
    (cfg.fold_dir(1) / "fingerprint.json").unlink()
    with pytest.raises(helpers.StaleRunError, match="fold1.fingerprint.json: no fingerprint.json"):
        helpers.prepare_run_folder(cfg, train)


def test_move_stale_run_aside_renames_the_old_folder_and_starts_afresh(tmp_path, train):
    finished_run(smoke(tmp_path), train)
    helpers.prepare_run_folder(smoke(tmp_path, seed=7, move_stale_run_aside=True), train)
    [aside] = tmp_path.glob("outputs-*")
    assert json.loads((aside / "fold0" / "result.json").read_text())["best_val_acc"] == 0.7  # nothing deleted
    assert json.loads((aside / "config.json").read_text())["seed"] == 42
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["config.json"]
    assert json.loads((tmp_path / "outputs" / "config.json").read_text())["seed"] == 7
    helpers.prepare_run_folder(smoke(tmp_path, seed=7, move_stale_run_aside=True), train)  # nothing stale: stays
    assert len(list(tmp_path.glob("outputs-*"))) == 1


def test_train_folds_checks_each_fold_before_touching_the_model(tmp_path, train):
    """Called without the notebook's prepare_run_folder (a script, a train_folds_on_gpus worker), it stops too."""
    folds = finished_run(smoke(tmp_path), train)
    with pytest.raises(helpers.StaleRunError, match="fold0.fingerprint.json: lr: 0.002 -> 0.001"):
        helpers.train_folds(None, None, folds, None, smoke(tmp_path, lr=1e-3))


def test_every_fingerprint_field_is_a_config_field(tmp_path):
    cfg = smoke(tmp_path)
    for name in {*helpers.FOLD_FIELDS, *helpers.ADAPTER_FIELDS, *helpers.SCORE_FIELDS}:
        assert hasattr(cfg, name), name


# -- scores.npz --------------------------------------------------------------------------------------------------------


@pytest.fixture
def scorer(tmp_path, sample_data, monkeypatch):
    """score_member on a fold with a fake adapter and fake scoring: counts how often it scores."""
    cfg = smoke(tmp_path)
    folds = helpers.make_folds(sample_data[0], cfg.n_folds, cfg.seed)
    adapter = cfg.fold_dir(0) / "best_adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"weights after epoch 3")
    scored = []

    def score_orders(model, processor, df, cfg, orders, known=None):
        known = known or {}
        scored.extend(len(df) for order in orders if order not in known)
        return np.stack([known[o] if o in known else np.zeros((len(df), 4)) for o in orders])

    monkeypatch.setattr(helpers, "load_adapter", lambda base, path: "model with adapter")
    monkeypatch.setattr(helpers, "detach_lora", lambda model: "base model")
    monkeypatch.setattr(helpers, "fit_prior", lambda model, processor, df, cfg: np.full(4, 0.25))
    monkeypatch.setattr(helpers, "score_orders", score_orders)

    def score(cfg=cfg, test=sample_data[1]):
        before = len(scored)
        saved = helpers.score_member(None, None, "fold0", folds, test, cfg)
        assert saved["oof"].shape == (cfg.tta_rotations, (folds["fold"] == 0).sum(), 4)
        score.passes = scored[before:]  # the rows of each pass it made
        score.saved = saved
        return len(scored) > before

    return cfg, score


def test_scores_are_reused_while_nothing_changed(scorer):
    cfg, score = scorer
    assert score()
    assert not score()


def test_scores_of_other_inference_settings_are_made_again(scorer, capsys):
    cfg, score = scorer
    score()
    cfg.tta_rotations = 2
    assert score()
    assert "was made from other inputs (tta_rotations: 4 -> 2): scoring fold0 again" in capsys.readouterr().out
    assert not score()


def test_scores_of_a_new_adapter_are_made_again(scorer, capsys):
    """The issue's third case: an adapter trained again (other image_size) was judged by the old adapter's scores."""
    cfg, score = scorer
    score()
    (cfg.fold_dir(0) / "best_adapter" / "adapter_model.safetensors").write_bytes(b"other weights")
    assert score()
    assert "(adapter: '" in capsys.readouterr().out


def test_scores_of_another_test_set_are_made_again(scorer, sample_data, capsys):
    cfg, score = scorer
    score()
    assert score(test=sample_data[1].head(10))
    assert "test data: '" in capsys.readouterr().out


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b""])
def test_an_unreadable_scores_file_is_made_again(scorer, capsys, damage):
    cfg, score = scorer
    score()
    path = cfg.fold_dir(0) / "scores.npz"
    path.write_bytes(damage(path.read_bytes()))
    assert score()
    assert f"{path} is unreadable" in capsys.readouterr().out
    assert not score()  # and readable again


def test_scores_from_before_fingerprints_are_made_again(scorer, capsys):
    cfg, score = scorer
    score()
    path = cfg.fold_dir(0) / "scores.npz"
    with np.load(path) as stored:
        old = {k: v for k, v in stored.items() if k != "fingerprint"}
    np.savez(path, **old)
    assert score()
    assert "no fingerprint" in capsys.readouterr().out


def save_validation_scores(cfg, rows, scores, fingerprint=None):
    """What validate saves beside a best adapter: the validation pass's scores of `rows` and their fingerprint."""
    fingerprint = fingerprint or helpers.val_scores_fingerprint(cfg, rows)
    path = cfg.fold_dir(0) / "best_adapter" / helpers.VAL_SCORES
    np.savez(path, log_probs=scores, fingerprint=json.dumps(fingerprint))
    return path


def test_the_validation_pass_s_scores_stand_for_the_original_order(scorer, sample_data):
    """The out-of-fold rows' scores in their original order come from the validation pass saved with the adapter:
    of the smoke profile's four orders, three are scored for them (and four for the test rows)."""
    cfg, score = scorer
    folds = helpers.make_folds(sample_data[0], cfg.n_folds, cfg.seed)
    rows = folds[folds["fold"] == 0]
    validated = np.random.default_rng(0).normal(size=(len(rows), 4)).astype(np.float32)
    save_validation_scores(cfg, rows.reset_index(drop=True), validated)  # as validate has them: index reset
    assert score()
    assert score.passes == [len(rows)] * 3 + [len(sample_data[1])] * 4
    np.testing.assert_array_equal(score.saved["oof"][0], validated)


@pytest.mark.parametrize(
    "change",
    [
        lambda cfg, rows: {"rows": rows.head(len(rows) - 1)},  # other rows (a fold made otherwise)
        lambda cfg, rows: {"fingerprint": {**helpers.val_scores_fingerprint(cfg, rows), "image_size": 999}},
        lambda cfg, rows: {"fingerprint": {**helpers.val_scores_fingerprint(cfg, rows), "compute dtype": "fp16"}},
    ],
    ids=["other rows", "other image size", "other compute dtype"],
)
def test_validation_scores_of_other_rows_or_settings_are_not_taken(scorer, sample_data, change):
    cfg, score = scorer
    folds = helpers.make_folds(sample_data[0], cfg.n_folds, cfg.seed)
    rows = folds[folds["fold"] == 0]
    changed = change(cfg, rows)
    saved_rows = changed.get("rows", rows)
    save_validation_scores(cfg, saved_rows, np.ones((len(saved_rows), 4)), changed.get("fingerprint"))
    assert score()
    assert score.passes == [len(rows)] * 4 + [len(sample_data[1])] * 4


def test_unreadable_validation_scores_are_scored_again(scorer, sample_data, capsys):
    cfg, score = scorer
    folds = helpers.make_folds(sample_data[0], cfg.n_folds, cfg.seed)
    rows = folds[folds["fold"] == 0]
    path = save_validation_scores(cfg, rows, np.ones((len(rows), 4)))
    path.write_bytes(path.read_bytes()[:100])
    assert score()
    assert score.passes == [len(rows)] * 4 + [len(sample_data[1])] * 4
    assert f"{path} is unreadable" in capsys.readouterr().out


# -- checkpoints and result.json ---------------------------------------------------------------------------------------


def test_an_unreadable_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    model = torch.nn.Linear(2, 2)
    for step in (2, 4):
        torch.nn.init.constant_(model.weight, step)
        helpers.save_checkpoint(tmp_path, {"global_step": step}, model)
    newest = tmp_path / "checkpoint-4" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated: PytorchStreamReader failed reading zip archive

    assert helpers.load_checkpoint(tmp_path, model)["global_step"] == 2
    assert (model.weight == 2).all()
    assert f"warning: {newest} is unreadable" in capsys.readouterr().out
    assert [p.name for p in helpers.checkpoint_paths(tmp_path)] == ["checkpoint-2"]
    assert (tmp_path / "unreadable-checkpoint-4" / "state.pt").exists()  # kept, out of the way


def test_no_readable_checkpoint_starts_the_fold_over(tmp_path, capsys):
    model = torch.nn.Linear(2, 2)
    helpers.save_checkpoint(tmp_path, {"global_step": 2}, model)
    (tmp_path / "checkpoint-2" / "state.pt").write_bytes(b"")
    assert helpers.load_checkpoint(tmp_path, model) is None
    assert "from the start if there is none" in capsys.readouterr().out


def test_an_unreadable_result_json_makes_the_fold_run_again(tmp_path, capsys):
    cfg = smoke(tmp_path)
    path = cfg.fold_dir(0) / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"fold": 0, "best_val_acc": 0.7')  # truncated
    assert not helpers.fold_is_trained(cfg, 0)
    assert f"{path} is unreadable" in capsys.readouterr().out
    assert (cfg.fold_dir(0) / "unreadable-result.json").exists() and not path.exists()
    assert helpers.fold_result(cfg, 0) is None and capsys.readouterr().out == ""  # said once

import dataclasses
import json

import pytest
from conftest import ROOT

import helpers


def test_memory_levels_fill_unset_fields():
    cfg = helpers.Config(profile="balanced")
    assert (cfg.image_size, cfg.lora_r, cfg.batch_size, cfg.grad_accum) == (448, 12, 1, 12)
    assert cfg.lora_alpha == 24 and cfg.effective_batch == 12


def test_explicit_values_beat_the_level():
    cfg = helpers.Config(profile="high", image_size=640, lora_r=4)
    assert (cfg.image_size, cfg.lora_r, cfg.batch_size) == (640, 4, 2)


def test_smoke_profile_uses_the_tiny_model_on_cpu_settings():
    cfg = helpers.Config(profile="smoke")
    assert cfg.model_id == "data/tiny-qwen3-vl" and cfg.n_folds == 2 and cfg.image_size == 64
    assert helpers.Config(profile="smoke", epochs=2, n_folds=5).epochs == 2  # explicit values still win


def test_gpu_levels_default_to_qwen3_5_4b_in_four_folds():
    cfg = helpers.Config(profile="safe")
    assert cfg.model_id == "Qwen/Qwen3.5-4B" and cfg.n_folds == 4 and cfg.lr == 1e-4


def test_validation_lists_every_problem_at_once():
    with pytest.raises(ValueError) as err:
        helpers.Config(profile="safe", n_folds=1, lr=3.0, train_folds=(7,), image_size=16, gpu_memory_cap_gib=0)
    message = str(err.value)
    culprits = ("n_folds must be at least 2", "lr must be in", "train_folds (7,)", "image_size must be at least")
    for culprit in (*culprits, "gpu_memory_cap_gib must be positive (or None: the whole GPU), got 0"):
        assert culprit in message
    with pytest.raises(ValueError, match="profile 'huge' is not one of"):
        helpers.Config(profile="huge")


def test_auto_profile_picks_smoke_without_gpu(monkeypatch):
    monkeypatch.setattr(helpers.torch.cuda, "is_available", lambda: False)
    assert helpers.resolve_profile("auto") == "smoke"
    monkeypatch.setattr(helpers.torch.cuda, "is_available", lambda: True)
    assert helpers.resolve_profile("auto") == "safe"
    assert helpers.resolve_profile("high") == "high"


def test_config_round_trips_through_json(tmp_path):
    """config.json holds every field with its value: a Config built from the file equals the one saved (JSON has no
    tuples, so lists are read back as the tuples they were; time_budget_hours may be Infinity)."""
    cfg = helpers.Config(
        profile="balanced", output_dir=str(tmp_path), train_folds=(0, 2), lora_r=4, precision="fp16", report_to="wandb"
    )
    cfg.save(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert set(saved) == {field.name for field in dataclasses.fields(helpers.Config)}
    loaded = helpers.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    assert loaded == cfg


def test_find_data_dir_prefers_explicit_then_local(tmp_path, sample_dir):
    assert helpers.find_data_dir(sample_dir) == sample_dir
    with pytest.raises(ValueError, match="holds no train.csv"):
        helpers.find_data_dir(tmp_path)


def test_find_local_model_matches_kaggle_layout(tmp_path):
    folder = tmp_path / "qwen3-vl" / "transformers" / "qwen3-vl-8b-instruct" / "1"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert helpers.find_local_model("Qwen/Qwen3-VL-8B-Instruct", roots=(str(tmp_path),)) == str(folder)
    other = "Qwen/Qwen2.5-VL-7B-Instruct"
    assert helpers.find_local_model(other, roots=(str(tmp_path),)) == other


def test_find_local_model_reads_kaggle_model_and_variation_slugs(tmp_path):
    def attach(*parts):
        folder = tmp_path.joinpath(*parts)
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        return str(folder)

    base = attach("qwen3.5", "transformers", "4b-base", "1")  # listed first: it must not be taken for Qwen3.5-4B
    post_trained = attach("qwen3.5", "transformers", "4b", "1")
    vl = attach("models", "qwen-lm", "qwen-3-vl", "transformers", "8b-instruct", "2")
    roots = (str(tmp_path),)
    assert helpers.find_local_model("Qwen/Qwen3.5-4B", roots=roots) == post_trained
    assert helpers.find_local_model("Qwen/Qwen3.5-4B-Base", roots=roots) == base
    assert helpers.find_local_model("Qwen/Qwen3-VL-8B-Instruct", roots=roots) == vl
    assert helpers.find_local_model("Qwen/Qwen3.5-9B", roots=roots) == "Qwen/Qwen3.5-9B"  # not attached: the Hub


def test_smoke_model_is_found_beside_helpers_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # papermill or Kaggle: the working directory is not the repository
    found = helpers.find_local_model(helpers.SMOKE_MODEL, roots=())
    assert found == str(ROOT / "data" / "tiny-qwen3-vl")


def test_missing_smoke_model_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(helpers, "__file__", str(tmp_path / "lib" / "helpers.py"))  # helpers attached without data/
    with pytest.raises(FileNotFoundError, match=r"python data/make_tiny_model.py --arch qwen3_vl --seed 42 --out"):
        helpers.find_local_model(helpers.SMOKE_MODEL, roots=(str(tmp_path),))

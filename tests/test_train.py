"""The training loop: a fold end to end, out-of-memory back-off, non-finite losses, and exact resume."""

import contextlib
import json
import math
import os
import subprocess
import sys
import textwrap
import time
import types

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT

import helpers


@pytest.fixture
def small(tmp_path, tiny_model_dirs, sample_data):
    """24 training rows in 2 folds, micro-batch 4 x accumulation 2 (the last step of an epoch is partial)."""
    cfg = helpers.Config(
        profile="smoke",
        model_id=str(tiny_model_dirs["qwen3_vl"]),
        output_dir=str(tmp_path),
        batch_size=4,
        grad_accum=2,
        epochs=2,
        save_every_steps=2,
    )
    folds = helpers.make_folds(sample_data[0].head(24), cfg.n_folds, cfg.seed)
    model, processor = helpers.load_model_and_processor(cfg)
    return cfg, folds, model, processor


def test_fit_trains_validates_and_keeps_the_best_adapter(small):
    cfg, folds, model, processor = small
    started = time.time()
    result = helpers.fit(helpers.attach_lora(model, cfg), processor, folds, 0, cfg)
    # Where the fold's time went: training steps and validation passes, apart, within the fold's own time
    assert result["train_seconds"] > 0 and result["val_seconds"] > 0
    assert result["train_seconds"] + result["val_seconds"] <= time.time() - started
    fold_dir = cfg.fold_dir(0)
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert result["history"][-1]["step"] == 4  # 12 rows / 8 per step = 2 steps per epoch, partial one included
    assert (fold_dir / "best_adapter" / "adapter_model.safetensors").exists()
    assert json.loads((fold_dir / "result.json").read_text())["best_val_acc"] == result["best_val_acc"]
    assert [p.name for p in helpers.checkpoint_paths(fold_dir)] == ["checkpoint-2", "checkpoint-4"]


def test_the_out_of_fold_scores_are_the_best_adapter_s_validation_pass(small, sample_data, monkeypatch):
    """The best adapter's folder holds its validation pass's scores, which predict_folds takes for the out-of-fold
    rows in their original order: the same numbers as scoring them again with that adapter, one pass fewer."""
    cfg, folds, model, processor = small
    cfg.tta_rotations = 1
    test = sample_data[1].head(6)
    helpers.train_folds(model, processor, folds, test, cfg)
    rescored = {}
    for fold in (0, 1):
        adapted = helpers.load_adapter(model, cfg.fold_dir(fold) / "best_adapter")
        rescored[fold] = helpers.position_log_probs(adapted, processor, folds[folds["fold"] == fold], cfg)
        helpers.detach_lora(adapted)
    passes = []
    real = helpers.position_log_probs
    monkeypatch.setattr(
        helpers, "position_log_probs", lambda m, p, df, *a, **k: passes.append(len(df)) or real(m, p, df, *a, **k)
    )
    predictions = helpers.predict_folds(model, processor, folds, test, cfg)
    assert passes and set(passes) == {len(test)}  # the test rows and the prior's (drawn from them), no fold's rows
    for fold in (0, 1):
        np.testing.assert_allclose(predictions[f"fold{fold}"]["oof_scores"][0], rescored[fold], atol=1e-5)


def test_train_folds_skips_finished_folds(small, sample_data, capsys, monkeypatch):
    cfg, folds, model, processor = small
    cfg.epochs = 1
    first = helpers.train_folds(model, processor, folds, sample_data[1].head(6), cfg)
    second = helpers.train_folds(model, processor, folds, sample_data[1].head(6), cfg)
    assert "folds [0, 1]: already trained, skipped" in capsys.readouterr().out
    assert first.equals(second)
    # A truncated result.json: the fold runs again, from its last checkpoint, which holds the whole result.
    (cfg.fold_dir(1) / "result.json").write_text('{"fold": 1, "best_val_acc"')
    monkeypatch.setattr(helpers, "accumulate_gradients", None)  # no training step needed
    third = helpers.train_folds(model, processor, folds, sample_data[1].head(6), cfg)
    assert f"{cfg.fold_dir(1) / 'result.json'} is unreadable" in capsys.readouterr().out
    assert first.equals(third)


def fake_oom_above(limit, monkeypatch):
    real = helpers.answer_loss_sum
    sizes = []

    def loss(model, batch):
        sizes.append(len(batch["index"]))
        if len(batch["index"]) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, batch)

    monkeypatch.setattr(helpers, "answer_loss_sum", loss)
    return sizes


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(small, monkeypatch, capsys):
    cfg, folds, model, processor = small
    cfg.epochs, cfg.auto_micro_batch = 1, False
    sizes = fake_oom_above(1, monkeypatch)
    helpers.fit(helpers.attach_lora(model, cfg), processor, folds, 0, cfg)
    assert sizes[:3] == [4, 2, 1]  # batch_size 4 fails, 2 fails, 1 fits
    assert sum(s for s in sizes if s == 1) == 12  # every training row still seen once per epoch
    assert "micro-batch now 1" in capsys.readouterr().out


def test_auto_micro_batch_finds_the_largest_that_fits(small, monkeypatch):
    cfg, folds, model, processor = small
    cfg.epochs = 1
    sizes = fake_oom_above(2, monkeypatch)
    helpers.fit(helpers.attach_lora(model, cfg), processor, folds, 0, cfg)
    # starts at the effective batch (4 x 2): 8 fails, 4 fails, then micro-batches of 2 for the rest of the fold
    assert sizes[:3] == [8, 4, 2] and set(sizes[2:]) == {2}
    assert sum(sizes[2:]) == 12


def test_out_of_memory_at_micro_batch_one_names_the_next_level(small, monkeypatch):
    cfg, folds, model, processor = small
    cfg.profile = "balanced"
    fake_oom_above(0, monkeypatch)
    with pytest.raises(RuntimeError, match="profile to 'safe'"):
        helpers.fit(helpers.attach_lora(model, cfg), processor, folds, 0, cfg)


def test_one_out_of_memory_policy_halves_down_to_one_then_names_the_level():
    """halve_on_out_of_memory, which training, inference and the benchmarks share: a cuBLAS allocation failure counts
    as out-of-memory too; each failure is cleaned up before the next try; any other error is not retried."""
    cfg = helpers.Config(profile="high")
    tried, cleaned = [], []

    def attempt(size):
        tried.append(size)
        if size > 2:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return f"ran at {size}"

    def clean_up():
        cleaned.append(tried[-1])

    result = helpers.halve_on_out_of_memory(attempt, 16, cfg, "in training", "micro-batch", clean_up=clean_up)
    assert result == ("ran at 2", 2) and tried == [16, 8, 4, 2] and cleaned == [16, 8, 4]

    def always(size):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(RuntimeError, match=r"in inference at batch size 1 \(image_size 512\).*profile to 'balanced'"):
        helpers.halve_on_out_of_memory(always, 4, cfg, "in inference", "batch size", clean_up=clean_up)
    with pytest.raises(RuntimeError, match=r"\(image_size 384\): lower image_size \(320, 256\) or take a smaller"):
        helpers.halve_on_out_of_memory(always, 4, helpers.Config(profile="safe"), "in training", "micro-batch")
    tried.clear()

    def broken(size):
        tried.append(size)
        raise RuntimeError("CUDA error: device-side assert triggered")

    with pytest.raises(RuntimeError, match="device-side assert"):
        helpers.halve_on_out_of_memory(broken, 4, cfg, "in training", "micro-batch", clean_up=clean_up)
    assert tried == [4]  # tried once


def test_a_non_finite_loss_is_skipped_and_counted(small, monkeypatch):
    cfg, folds, model, processor = small
    cfg.epochs = 1
    real = helpers.answer_loss_sum
    calls = []

    def loss(model, batch):
        calls.append(1)
        value = real(model, batch)
        return value * float("inf") if len(calls) == 1 else value

    monkeypatch.setattr(helpers, "answer_loss_sum", loss)
    peft_model = helpers.attach_lora(model, cfg)
    result = helpers.fit(peft_model, processor, folds, 0, cfg)
    assert result["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in peft_model.parameters())


def test_a_run_of_non_finite_losses_stops_the_fold_with_advice(small, monkeypatch):
    cfg, folds, model, processor = small
    cfg.max_bad_steps, cfg.epochs = 3, 2
    real = helpers.answer_loss_sum
    monkeypatch.setattr(helpers, "answer_loss_sum", lambda m, b: real(m, b) * float("nan"))
    with pytest.raises(helpers.NonFiniteLossError, match="3 non-finite steps in a row.*last good checkpoint.*Lower lr"):
        helpers.fit(helpers.attach_lora(model, cfg), processor, folds, 0, cfg)


def test_a_non_finite_gradient_never_reaches_the_weights_without_a_scaler(small, monkeypatch):
    """bf16 and fp32 train without a GradScaler: a NaN gradient with a finite loss must still be skipped."""
    cfg, folds, model, processor = small
    cfg.epochs = 1
    assert cfg.precision == "auto" and helpers.compute_dtype(cfg.precision) == torch.float32  # CPU: no scaler
    real = helpers.accumulate_gradients
    calls = []

    def poisoned(model, batch, micro_batch, scaler, autocast):
        loss = real(model, batch, micro_batch, scaler, autocast)
        calls.append(1)
        if len(calls) == 2:  # the second step's gradient: inf in one LoRA weight, the loss itself finite
            next(p for p in model.parameters() if p.requires_grad).grad[0, 0] = float("inf")
        return loss

    monkeypatch.setattr(helpers, "accumulate_gradients", poisoned)
    peft_model = helpers.attach_lora(model, cfg)
    result = helpers.fit(peft_model, processor, folds, 0, cfg)
    assert result["skipped_steps"] == 1
    [record] = result["nonfinite_steps"]
    assert record["step"] == 1 and math.isinf(record["grad_norm"]) and record["nonfinite_grad_count"] == 1
    assert set(record["ids"]) <= set(folds.loc[folds["fold"] != 0, "id"])  # the rows of that batch, by id
    assert all(torch.isfinite(p).all() for p in peft_model.parameters())
    assert result["optimizer_steps"] == math.ceil((folds["fold"] != 0).sum() / cfg.effective_batch)


def test_in_fp16_a_nan_gradient_that_no_scale_fixes_stops_the_fold(small, monkeypatch):
    """In fp16 a skipped step is the GradScaler's overflow until its scale has halved below 1; after that the
    gradient is non-finite unscaled too, and a run of such steps stops the fold (it skipped every step silently,
    finishing untrained, the scale halving towards 0)."""
    cfg, folds, model, processor = small
    cfg.max_bad_steps, cfg.epochs = 3, 3  # 6 steps: overflows at scales 2 and 1, then 3 non-finite ones in a row
    real = helpers.mixed_precision
    monkeypatch.setattr(  # a T4's enabled GradScaler (its CPU twin), starting at 4 instead of 65536
        helpers, "mixed_precision", lambda m, c: (torch.amp.GradScaler("cpu", init_scale=4.0), real(m, c)[1])
    )
    peft_model = helpers.attach_lora(model, cfg)
    poisoned = next(p for p in peft_model.parameters() if p.requires_grad)
    poisoned.register_hook(lambda grad: grad * float("nan"))  # as 0 * inf in a backward: NaN at any scale
    with pytest.raises(helpers.NonFiniteLossError, match="fold 0: 3 non-finite steps in a row at step 4"):
        helpers.fit(peft_model, processor, folds, 0, cfg)


def test_non_finite_weights_are_never_written(small, tmp_path):
    cfg, folds, model, processor = small
    peft_model = helpers.attach_lora(model, cfg)
    with torch.no_grad():
        next(p for p in peft_model.parameters() if p.requires_grad)[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not writing.*non-finite"):
        helpers.save_adapter(peft_model, tmp_path / "adapter")
    with pytest.raises(FloatingPointError, match="not writing.*non-finite"):
        helpers.save_checkpoint(tmp_path, {"global_step": 1}, peft_model)
    assert not list(tmp_path.glob("adapter*")) and not helpers.checkpoint_paths(tmp_path)
    helpers.detach_lora(peft_model)


def test_early_stopping_keeps_the_best_adapter_and_resumes_stopped(small, monkeypatch):
    cfg, folds, model, processor = small
    cfg.epochs, cfg.early_stopping_patience = 5, 1
    accuracies = iter([0.5, 0.4, 0.9, 0.9, 0.9])  # epoch 2 is worse: the fold stops there, keeping epoch 1's adapter
    monkeypatch.setattr(
        helpers, "validation_metrics", lambda log_probs, answers: {"val_acc": next(accuracies), "val_loss": 1.0}
    )
    peft_model = helpers.attach_lora(model, cfg)
    result = helpers.fit(peft_model, processor, folds, 0, cfg)
    assert result["stopped_early"] and result["epochs_trained"] == 2 and result["best_val_acc"] == 0.5
    assert len(result["losses"]) == result["optimizer_steps"] == 2 * 2  # 12 rows, effective batch 8: 2 steps an epoch
    base = helpers.detach_lora(peft_model)
    again = helpers.fit(helpers.attach_lora(base, cfg), processor, folds, 0, cfg)  # from its last checkpoint
    assert again["epochs_trained"] == 2 and again["optimizer_steps"] == 4  # stopped stays stopped


def test_a_fold_begun_in_one_precision_goes_on_in_another(small, monkeypatch, capsys):
    """precision="auto" resolves per GPU: a fold checkpointed on a GPU with bf16 and resumed on a T4 (fp16), or the
    other way, goes on with a fresh GradScaler and says so (the bf16 checkpoint's empty scaler state stopped fp16's
    GradScaler with a cryptic error; fp16's state went silently into bf16)."""
    cfg, folds, model, processor = small
    real_step, steps = helpers.accumulate_gradients, []

    def dies_at_step_3(*args, **kwargs):
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt  # the session ends after the checkpoint of step 2
        return real_step(*args, **kwargs)

    monkeypatch.setattr(helpers, "accumulate_gradients", dies_at_step_3)
    monkeypatch.setattr(helpers, "autocast_context", lambda device, dtype: contextlib.nullcontext)  # fp32 compute
    monkeypatch.setattr(helpers, "compute_dtype", lambda precision="auto": torch.bfloat16)  # "auto" on an A100
    peft_model = helpers.attach_lora(model, cfg)
    with pytest.raises(KeyboardInterrupt):
        helpers.fit(peft_model, processor, folds, 0, cfg)
    state = helpers.newest_readable_checkpoint(cfg.fold_dir(0))
    assert state["compute_dtype"] == "torch.bfloat16" and state["scaler"] == {}  # bf16 needs no GradScaler

    monkeypatch.setattr(helpers, "accumulate_gradients", real_step)
    monkeypatch.setattr(helpers, "compute_dtype", lambda precision="auto": torch.float16)  # "auto" on a T4
    base = helpers.detach_lora(peft_model)
    result = helpers.fit(helpers.attach_lora(base, cfg), processor, folds, 0, cfg)
    out = capsys.readouterr().out
    assert "fold 0: resuming at epoch 1 step 0" in out
    assert "trained in torch.bfloat16 and this GPU trains in torch.float16: it goes on in torch.float16" in out
    assert result["optimizer_steps"] == 4


def test_epochs_without_improvement():
    assert helpers.epochs_without_improvement([]) == 0
    history = [{"val_acc": a} for a in (0.5, 0.7, 0.6, 0.7)]
    assert helpers.epochs_without_improvement(history) == 2  # a tie does not count as better


RESUME_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {root!r})
    import helpers

    crash_at = int(os.environ.get("CRASH_AT_STEP", "0"))
    steps = []
    real = helpers.accumulate_gradients

    def counting(*args, **kwargs):
        steps.append(1)
        if len(steps) == crash_at:
            os._exit(17)  # the kernel dies mid-epoch, after the checkpoint of step 2
        return real(*args, **kwargs)

    helpers.accumulate_gradients = counting
    cfg = helpers.Config(profile="smoke", model_id={model!r}, output_dir=sys.argv[1], batch_size=2, grad_accum=2,
                         epochs=2, save_every_steps=2)
    train = helpers.load_competition_data({data!r})[0].head(24)
    folds = helpers.make_folds(train, cfg.n_folds, cfg.seed)
    model, processor = helpers.load_model_and_processor(cfg)
    helpers.fit(helpers.attach_lora(model, cfg), processor, folds, 0, cfg)
    """
)


def test_resume_after_a_crash_ends_with_the_uninterrupted_weights(tmp_path, tiny_model_dirs, sample_dir):
    script = tmp_path / "train.py"
    model = str(tiny_model_dirs["qwen3_vl"])
    script.write_text(RESUME_SCRIPT.format(root=str(ROOT), model=model, data=str(sample_dir)))

    def run(out, crash_at=0):
        env = {**os.environ, "CRASH_AT_STEP": str(crash_at)}
        return subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True)

    straight = run(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    # 3 steps an epoch, a checkpoint every 2 steps and at epoch ends: dies in step 5, mid-epoch 2
    crashed = run(tmp_path / "resumed", crash_at=5)
    assert crashed.returncode == 17
    checkpoints = [p.name for p in helpers.checkpoint_paths(tmp_path / "resumed" / "fold0")]
    assert checkpoints == ["checkpoint-3", "checkpoint-4"]  # the last two kept
    resumed = run(tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at epoch 1 step 1" in resumed.stdout

    def final_weights(out):
        return torch.load(out / "fold0" / "checkpoint-6" / "state.pt", weights_only=False)["trainable"]

    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:  # same data order, dropout RNG and optimizer state: equal up to float rounding
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_folds_trained_side_by_side_equal_folds_trained_in_turn(small, sample_data, tmp_path, monkeypatch):
    """train_folds_on_gpus (one process per GPU; here two processes on the CPU) trains and scores each fold exactly
    as train_folds and predict_folds do one after the other: same metrics, adapter weights and scores."""
    from safetensors.torch import load_file

    cfg, folds, model, processor = small
    cfg.epochs, cfg.tta_rotations, cfg.debias_samples = 1, 2, 4
    test = sample_data[1].head(6)
    # Each of the two processes runs on its share of the cores (_train_share); the same thread count here keeps the
    # floating-point summation order, and so the weights, identical.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // 2))
    in_turn = helpers.train_folds(model, processor, folds, test, cfg)
    in_turn_predictions = helpers.predict_folds(model, processor, folds, test, cfg)
    torch.set_num_threads(threads)
    side_cfg = helpers.Config(**{**vars(cfg), "output_dir": str(tmp_path / "side_by_side")})
    side_by_side = helpers.train_folds_on_gpus(folds, test, side_cfg, processes=2)
    timings = ["train_seconds", "data_wait_seconds", "val_seconds"]
    pd.testing.assert_frame_equal(side_by_side.drop(columns=timings), in_turn.drop(columns=timings))

    monkeypatch.setattr(helpers, "score_orders", None)  # predict_folds must find every score already saved
    side_predictions = helpers.predict_folds(model, processor, folds, test, side_cfg)
    for fold in (0, 1):
        a = load_file(cfg.fold_dir(fold) / "best_adapter" / "adapter_model.safetensors")
        b = load_file(side_cfg.fold_dir(fold) / "best_adapter" / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
        for key in ("oof_scores", "test_scores"):
            np.testing.assert_allclose(
                side_predictions[f"fold{fold}"][key], in_turn_predictions[f"fold{fold}"][key], atol=1e-5
            )


def test_a_side_by_side_process_scores_only_the_folds_it_trained(small, sample_data, capsys):
    """A train_folds_on_gpus process whose folds the time budget leaves unstarted has no adapter to score: it ends
    without an error (it crashed the training cell before), and the notebook's submission uses the folds trained."""
    cfg, folds, _, _ = small
    cfg.time_budget_hours = 1e-6
    threads = torch.get_num_threads()
    helpers._train_share(0, 1, folds, sample_data[1].head(6), cfg)  # what each process of train_folds_on_gpus runs
    torch.set_num_threads(threads)
    assert "not trained: one epoch would not leave time to score" in capsys.readouterr().out
    assert not any(helpers.fold_is_trained(cfg, fold) for fold in cfg.folds_to_train)
    assert not list(cfg.out.glob("fold*/scores.npz"))


def test_fold_shares_deal_out_the_folds_still_to_train_first(tmp_path):
    cfg = helpers.Config(profile="smoke", output_dir=str(tmp_path), n_folds=5)
    assert helpers.fold_shares(cfg, 2) == [(0, 2, 4), (1, 3)]
    for fold in (0, 2):  # a resumed run: folds 0 and 2 finished before the restart
        cfg.fold_dir(fold).mkdir(parents=True)
        (cfg.fold_dir(fold) / "result.json").write_text("{}")
    # Without the reordering one process would train 4 while the other trained 1 and 3.
    assert helpers.fold_shares(cfg, 2) == [(1, 4, 2), (3, 0)]


class FakeClock:
    """The session clock of a run whose every training step takes 100 s and every scored row 1 s."""

    def __init__(self, monkeypatch):
        self.t = helpers.SESSION_START
        monkeypatch.setattr(helpers, "now", lambda: self.t)
        # Scoring already timed at 1 row/s, as the zero-shot baseline does before training
        measured = {"train_samples": 0, "train_seconds": 0, "score_rows": 1, "score_seconds": 1}
        monkeypatch.setattr(helpers, "MEASURED", measured)
        real_step, real_score = helpers.accumulate_gradients, helpers.position_log_probs

        def step(*args, **kwargs):
            self.t += 100
            return real_step(*args, **kwargs)

        def score(model, processor, df, *args, **kwargs):
            scores = real_score(model, processor, df, *args, **kwargs)
            self.t += len(df)
            helpers.MEASURED["score_seconds"] += len(df)  # the real function saw the fake clock stand still
            return scores

        monkeypatch.setattr(helpers, "accumulate_gradients", step)
        monkeypatch.setattr(helpers, "position_log_probs", score)


@pytest.mark.parametrize(
    ("budget_s", "fold1_steps"),
    [
        (1000, 3),  # fold 1 starts, and stops after 3 of its 4 steps: one more would eat into the scoring time
        (700, None),  # fold 1 is not started: one epoch of it would not leave the time to score both folds
        (730, None),  # the same: one epoch of fold 1 fits only without its own scoring (it started, and stopped at
        # step 0: an untrained member of the ensemble, counted as trained)
    ],
)
def test_the_time_budget_always_leaves_a_submission(
    small, sample_data, tmp_path, monkeypatch, capsys, budget_s, fold1_steps
):
    """2 folds x 2 epochs x 2 steps of 100 s; validation 12 rows, scoring 76 rows per fold at 1 s a row
    (its validation rows in their original order come from its last validation pass)."""
    cfg, folds, model, processor = small
    cfg.debias_samples, cfg.time_budget_hours = 4, budget_s / 3600
    test = sample_data[1].head(6)
    clock = FakeClock(monkeypatch)
    results = helpers.train_folds(model, processor, folds, test, cfg)
    assert "time estimate: 2 fold(s) to train" in capsys.readouterr().out
    fold0 = helpers.fold_result(cfg, 0)
    assert fold0["epochs_trained"] == 2 and not fold0["stopped_for_time"]
    if fold1_steps is None:
        assert list(results["fold"]) == [0] and not helpers.fold_is_trained(cfg, 1)
    else:
        fold1 = helpers.fold_result(cfg, 1)
        assert fold1["stopped_for_time"] and fold1["optimizer_steps"] == fold1_steps
    predictions = helpers.predict_folds(model, processor, folds, test, cfg)
    assert set(predictions) == {f"fold{k}" for k in results["fold"]}
    sample = pd.DataFrame({"id": test["id"], "answer": "a"})
    helpers.write_submissions(predictions, results, test, sample, cfg)
    assert (tmp_path / "submission_ensemble.csv").exists()
    assert clock.t <= helpers.SESSION_START + budget_s  # scoring done inside the budget


def test_a_fold_resumed_in_the_same_session_goes_on_as_time_allows(small, sample_data, monkeypatch, capsys):
    """The notebook re-run after an interrupt, in the same session (its clock goes on): a fold with an epoch done
    resumes if scoring it fits, where it was refused for want of a whole epoch's time and left out of the
    submission. 2 folds x 2 epochs x 2 steps of 100 s, scoring 76 rows a fold at 1 s a row; 250 s left."""
    cfg, folds, model, processor = small
    cfg.debias_samples, cfg.time_budget_hours = 4, 10_000 / 3600
    test = sample_data[1].head(6)
    clock = FakeClock(monkeypatch)
    timed_step, steps = helpers.accumulate_gradients, []

    def interrupted_in_fold_1_epoch_2(*args, **kwargs):
        steps.append(1)
        if len(steps) == 4 + 3:  # fold 0's 4 steps, then fold 1's third: its first epoch is done and validated
            raise KeyboardInterrupt
        return timed_step(*args, **kwargs)

    monkeypatch.setattr(helpers, "accumulate_gradients", interrupted_in_fold_1_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        helpers.train_folds(model, processor, folds, test, cfg)
    assert (cfg.fold_dir(1) / "best_adapter").is_dir() and not helpers.fold_is_trained(cfg, 1)

    monkeypatch.setattr(helpers, "accumulate_gradients", timed_step)
    clock.t = helpers.SESSION_START + 10_000 - 250  # enough to score both folds (152 s), not for an epoch more
    results = helpers.train_folds(model, processor, folds, test, cfg)
    assert "resuming at epoch 1" in capsys.readouterr().out
    assert list(results["fold"]) == [0, 1] and results.set_index("fold").loc[1, "stopped_for_time"]


def test_curves_go_to_the_tracker_asked_for(small, monkeypatch):
    """report_to="wandb" logs through wandb's own API (a stand-in module here: wandb is not a dependency)."""
    cfg, folds, model, processor = small
    cfg.report_to, cfg.epochs = "wandb", 1
    logged, finished = [], []
    run = types.SimpleNamespace(
        log=lambda metrics, step: logged.append((step, metrics)), finish=lambda: finished.append(1)
    )
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kwargs: run))
    helpers.fit(helpers.attach_lora(model, cfg), processor, folds, 0, cfg)
    assert [step for step, m in logged if "train/loss" in m] == [1, 2]
    assert [step for step, m in logged if "val/accuracy" in m] == [2] and finished == [1]
    with pytest.raises(ValueError, match="report_to must be"):
        helpers.Config(profile="smoke", report_to="mlflow")

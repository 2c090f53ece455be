"""Letter-bias-free inference and ensembles: cyclic TTA, PriDe debiasing, option shuffling, weighted soft vote."""

import numpy as np
import pandas as pd
import pytest
from conftest import SMOKE_BUDGET

import helpers


def biased_scores(content: np.ndarray, prior: np.ndarray, orders) -> np.ndarray:
    """Letter-position log-probabilities of a model with a letter prior: PriDe's model, exactly."""
    scores = []
    for order in orders:
        shown = content[:, list(order)]  # position j shows option order[j]
        scores.append(np.log(helpers.softmax4(np.log(shown) + np.log(prior))))
    return np.stack(scores)


@pytest.fixture
def planted():
    rng = np.random.default_rng(0)
    content = rng.dirichlet(np.ones(4), size=200)  # the model's real belief in each option
    prior = np.array([0.55, 0.2, 0.15, 0.1])  # a strong preference for the letter "a"
    return content, prior


def test_cyclic_orders_put_every_option_under_every_letter():
    assert helpers.cyclic_orders(1) == [(0, 1, 2, 3)]
    assert helpers.cyclic_orders(2) == [(0, 1, 2, 3), (2, 3, 0, 1)]
    orders = helpers.cyclic_orders(4)
    assert all(sorted(column) == [0, 1, 2, 3] for column in zip(*orders, strict=True))


def test_estimate_prior_recovers_a_planted_letter_prior(planted):
    content, prior = planted
    orders = helpers.cyclic_orders(4)
    estimated = helpers.estimate_prior(biased_scores(content, prior, orders), orders)
    # Exact only when each row's content is uniform; the mean over 200 random rows lands within a few points.
    np.testing.assert_allclose(estimated, prior, atol=0.05)
    with pytest.raises(ValueError, match="every option once at every position"):
        helpers.estimate_prior(biased_scores(content, prior, orders[:2]), orders[:2])


def test_debiasing_and_full_tta_beat_the_biased_answer(planted):
    content, prior = planted
    truth = content.argmax(1)
    orders = helpers.cyclic_orders(4)
    scores = biased_scores(content, prior, orders)
    plain = helpers.tta_proba(scores[:1], orders[:1])
    debiased = helpers.tta_proba(scores[:1], orders[:1], prior)
    tta = helpers.tta_proba(scores, orders)
    plain_acc, tta_acc = (plain.argmax(1) == truth).mean(), (tta.argmax(1) == truth).mean()
    assert plain_acc < 0.8  # the prior flips many answers to "a"
    np.testing.assert_allclose(debiased, content, atol=1e-6)  # dividing out the exact prior restores the content
    assert tta_acc > plain_acc + 0.1  # every option seen under every letter: the bias mostly cancels
    np.testing.assert_allclose(tta.sum(1), 1, rtol=1e-6)


def test_variant_probs_names_every_variant(planted):
    content, prior = planted
    orders = helpers.cyclic_orders(2)
    variants = helpers.variant_probs(biased_scores(content, prior, orders), orders, prior)
    assert list(variants) == ["plain", "tta x2", "debias", "tta x2 + debias"]
    cfg = helpers.Config(profile="smoke", tta_rotations=2)
    assert helpers.variant_name(cfg) == "tta x2 + debias" and cfg.debias_samples > 0


def test_variant_report_scores_each_row_by_its_own_fold(planted):
    content, prior = planted
    folds = pd.DataFrame({"answer": [helpers.LETTERS[i] for i in content.argmax(1)], "fold": np.arange(200) % 2})
    orders = helpers.cyclic_orders(4)
    predictions = {}
    for k in (0, 1):
        rows = content[folds["fold"] == k]
        scores = biased_scores(rows, prior, orders)
        predictions[f"fold{k}"] = {"oof_scores": scores, "orders": orders, "prior": prior}
    report = helpers.variant_report(predictions, folds)
    assert report.loc["debias", "all (out-of-fold)"] == 1.0  # exact prior, exact content
    assert report.loc["plain", "all (out-of-fold)"] < report.loc["tta x4", "all (out-of-fold)"]
    assert "selected" not in report
    # the best out-of-fold variant wins; of equal ones the simplest ("tta x4 + debias" is as exact as "debias")
    assert report.loc["tta x4 + debias", "all (out-of-fold)"] == 1.0
    assert helpers.choose_variant(predictions, folds) == "debias"
    for pred in predictions.values():
        pred["variant"] = "debias"
    report = helpers.variant_report(predictions, folds)
    assert report["selected"].sum() == 1 and report.loc["debias", "selected"]


def test_shuffled_options_keep_the_answer_on_the_same_text(sample_data):
    train = sample_data[0].head(40).reset_index(drop=True)
    dataset = helpers.VQADataset(train, SMOKE_BUDGET, train=True, shuffle_options=True, seed=3)
    moved = 0
    for i in range(len(train)):
        item = dataset[i]
        prompt = item["messages"][1]["content"][1]["text"]
        answer = item["messages"][2]["content"][0]["text"]
        correct_text = helpers.normalize_text(train.loc[i, train.loc[i, "answer"]])
        assert f"({answer}) {correct_text}\n" in prompt
        moved += answer != train.loc[i, "answer"]
        assert dataset[i]["messages"] == item["messages"]  # seeded per row: a resumed run sees the same permutation
    assert moved > 10


def test_weighted_soft_vote_follows_the_stronger_member():
    weak = np.array([[0.6, 0.4, 0, 0]])
    strong = np.array([[0.3, 0.7, 0, 0]])
    assert helpers.weighted_soft_vote([weak, strong], [1, 1]).tolist() == helpers.soft_vote([weak, strong]).tolist()
    assert helpers.weighted_soft_vote([weak, strong], [0.9, 0.1]).tolist() == [0]
    assert helpers.weighted_soft_vote([weak, strong], [0.1, 0.9]).tolist() == [1]
    with pytest.raises(ValueError, match="one non-negative weight per member"):
        helpers.weighted_soft_vote([weak, strong], [1.0])

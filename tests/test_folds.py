import pandas as pd

import helpers


def test_folds_are_stratified_and_deterministic(sample_data):
    train = sample_data[0]
    folds = helpers.make_folds(train, 5, seed=1)
    again = helpers.make_folds(train, 5, seed=1)
    assert (folds["fold"] == again["fold"]).all()
    assert set(folds["fold"]) == set(range(5))
    counts = pd.crosstab(folds["fold"], [folds["task_type"], folds["answer"]])
    assert (counts.max() - counts.min()).max() <= 1  # every stratum spread evenly
    assert not (folds["fold"] == helpers.make_folds(train, 5, seed=2)["fold"]).all()


def test_rare_strata_are_merged():
    train = pd.DataFrame(
        {
            "id": [str(i) for i in range(40)],
            "answer": list("abcd") * 10,
            "task_type": ["common"] * 38 + ["rare", "rare"],
        }
    )
    folds = helpers.make_folds(train, 5, seed=0)
    assert folds["fold"].value_counts().tolist() == [8] * 5


def test_works_without_task_type(sample_data):
    train = sample_data[0].drop(columns=["task_type", "task_hint"])
    folds = helpers.make_folds(train, 4, seed=0)
    assert pd.crosstab(folds["fold"], folds["answer"]).nunique().max() == 1

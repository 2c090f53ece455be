import numpy as np
import pandas as pd
import pytest

import helpers


def test_majority_vote_breaks_ties_by_summed_probability():
    fold0 = np.array([[0.6, 0.4, 0, 0], [0.9, 0.1, 0, 0]])
    fold1 = np.array([[0.1, 0.9, 0, 0], [0.6, 0.4, 0, 0]])
    fold2 = np.array([[0.6, 0.4, 0, 0], [0.1, 0.0, 0.0, 0.9]])
    # row 0: a has 2 votes of 3 -> a, even though b's summed probability is higher
    # row 1: a 2 votes -> a
    assert helpers.majority_vote([fold0, fold1, fold2]).tolist() == [0, 0]
    # two members disagree: 1 vote each, summed probability decides
    assert helpers.majority_vote([fold0[:1], fold1[:1]]).tolist() == [1]


def test_soft_vote_is_mean_probability():
    assert helpers.soft_vote([np.array([[0.6, 0.4, 0, 0]]), np.array([[0.1, 0.9, 0, 0]])]).tolist() == [1]


@pytest.fixture
def ids():
    test = pd.DataFrame({"id": ["t2", "t1", "t3"]})
    sample = pd.DataFrame({"id": ["t1", "t2", "t3"], "answer": "a"})
    return test, sample


def test_submission_follows_sample_order(ids, tmp_path):
    test, sample = ids
    submission = helpers.write_submission(np.array([1, 2, 3]), test, sample, tmp_path / "s.csv")
    assert submission["answer"].tolist() == ["c", "b", "d"]
    assert pd.read_csv(tmp_path / "s.csv").equals(submission)
    assert not list(tmp_path.glob("*.tmp"))


def test_invalid_submission_is_refused_and_nothing_written(ids, tmp_path):
    test, sample = ids
    sample = pd.concat([sample, pd.DataFrame({"id": ["t4"], "answer": "a"})], ignore_index=True)
    with pytest.raises(ValueError, match=r"answers not in a-d for ids \['t4'\]"):
        helpers.write_submission(np.array([1, 2, 3]), test, sample, tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()


def test_oof_report_per_member_and_overall():
    folds = pd.DataFrame({"id": list("wxyz"), "answer": list("abcd"), "fold": [0, 0, 1, 1]})
    onehot = np.eye(4)
    predictions = {"fold0": {"oof": onehot[[0, 0]]}, "fold1": {"oof": onehot[[2, 3]]}}
    report = helpers.oof_report(predictions, folds)
    assert report["accuracy"].tolist() == [0.5, 1.0, 0.75]

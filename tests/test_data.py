"""Loading and validating the competition files: benign variations are accepted, errors name their culprits."""

import shutil

import pandas as pd
import pytest
from PIL import Image

import helpers


def test_sample_data_loads(sample_data):
    train, test, sample = sample_data
    assert len(train) == 320 and len(test) == 80 and len(sample) == 80
    assert set(train["answer"]) == set(helpers.LETTERS)
    assert all(p.endswith(".jpg") for p in train["image_path"])


@pytest.fixture
def data_copy(tmp_path, sample_dir):
    """A small writable copy of the sample set: 12 train rows, 4 test rows."""
    for split, n in (("train", 12), ("test", 4)):
        df = pd.read_csv(sample_dir / f"{split}.csv", dtype=str).head(n)
        (tmp_path / split).mkdir()
        for p in df["path"]:
            shutil.copy(sample_dir / p, tmp_path / p)
        df.to_csv(tmp_path / f"{split}.csv", index=False)
    pd.DataFrame({"id": df["id"], "answer": "a"}).to_csv(tmp_path / "sample_submission.csv", index=False)
    return tmp_path


def edit_csv(path, change):
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df = change(df)
    df.to_csv(path, index=False)


def test_benign_variations_are_accepted_and_normalized(data_copy):
    def vary(df):
        df["answer"] = [f" {a.upper()} " for a in df["answer"]]  # uppercase with spaces
        df["question"] = df["question"] + " 한국어 질문"  # Korean text
        df["extra"] = "ignored"  # extra column
        df["path"] = [p.split("/")[1] for p in df["path"]]  # relative to the split folder
        df["id"] = [str(1000 + i) for i in range(len(df))]  # numeric ids
        return df

    edit_csv(data_copy / "train.csv", vary)
    test_csv = data_copy / "test.csv"
    edit_csv(test_csv, lambda df: df.assign(path=["./" + p for p in df["path"]]))
    test_csv.write_bytes(b"\xef\xbb\xbf" + test_csv.read_bytes())  # UTF-8 byte-order mark

    train, test, _ = helpers.load_competition_data(data_copy)
    assert set(train["answer"]) <= set(helpers.LETTERS)
    assert train["id"].iloc[0] == "1000" and test.columns[0] == "id"
    assert train["question"].str.contains("한국어").all()


BAD_CASES = {
    "missing column": ("train.csv", lambda df: df.drop(columns="c"), ["train.csv", "missing columns ['c']"]),
    "answer outside a-d": ("train.csv", lambda df: df.assign(answer=["e"] + list(df["answer"][1:])), ["'e'"]),
    "duplicate id": ("train.csv", lambda df: df.assign(id=[df["id"][1]] + list(df["id"][1:])), ["duplicate ids"]),
    "empty question": ("train.csv", lambda df: df.assign(question=[""] + list(df["question"][1:])), ["empty"]),
    "missing image": ("test.csv", lambda df: df.assign(path=["test/nope.jpg"] + list(df["path"][1:])), ["nope.jpg"]),
    "sample ids differ": ("sample_submission.csv", lambda df: df.assign(id=["X"] + list(df["id"][1:])), ["'X'"]),
    "id in train and test": ("test.csv", lambda df: df.assign(id=["TRAIN_0001"] + list(df["id"][1:])), ["both"]),
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_invalid_input_names_file_and_culprit(data_copy, case):
    name, change, expected = BAD_CASES[case]
    edit_csv(data_copy / name, change)
    with pytest.raises(ValueError) as err:
        helpers.load_competition_data(data_copy)
    message = str(err.value)
    assert name.split(".")[0] in message or "sample_submission" in message
    for text in expected:
        assert text in message


def test_broken_image_is_an_error_not_a_blank(data_copy):
    first = pd.read_csv(data_copy / "train.csv")["path"][0]
    (data_copy / first).write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="unreadable.*TRAIN_"):
        helpers.load_competition_data(data_copy)


def test_every_problem_is_reported_together(data_copy):
    edit_csv(data_copy / "train.csv", lambda df: df.assign(answer="z"))
    (data_copy / "test" / pd.read_csv(data_copy / "test.csv")["path"][0].split("/")[1]).unlink()
    with pytest.raises(ValueError) as err:
        helpers.load_competition_data(data_copy)
    assert "answers not in a-d" in str(err.value) and "images not found" in str(err.value)
    assert "(12 in all)" in str(err.value)


def test_missing_file_is_named(data_copy):
    (data_copy / "test.csv").unlink()
    with pytest.raises(ValueError, match="test.csv: file not found"):
        helpers.load_competition_data(data_copy)


def test_eda_saves_one_png_per_plot(sample_data, tmp_path):
    train, test, _ = sample_data
    figures = helpers.plot_eda(train, test, tmp_path)
    assert set(figures) == {"answers", "task_types", "question_length", "image_sizes"}
    for name in figures:
        with Image.open(tmp_path / f"{name}.png") as image:
            assert image.size[0] > 100

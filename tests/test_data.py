"""Loading and validating the competition files: benign variations are accepted, errors name their culprits."""

import shutil

import numpy as np
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


def test_the_submission_is_spelt_as_the_competition_spells_it(data_copy):
    """Answers A-D in train.csv and a header `ID,Answer` in sample_submission.csv are read as a-d and id/answer, and
    the submission is written back as the competition spells them (it was `id,answer` and a-d, which a case-sensitive
    grader would score as all wrong)."""
    edit_csv(data_copy / "train.csv", lambda df: df.assign(answer=df["answer"].str.upper()))
    edit_csv(data_copy / "sample_submission.csv", lambda df: df.rename(columns={"id": "ID", "answer": "Answer"}))
    train, test, sample = helpers.load_competition_data(data_copy)
    assert set(train["answer"]) <= set(helpers.LETTERS) and list(sample.columns) == ["id", "answer"]
    submission = helpers.write_submission(np.arange(len(test)) % 4, test, sample, data_copy / "submission.csv")
    written = pd.read_csv(data_copy / "submission.csv", dtype=str)
    assert list(written.columns) == ["ID", "Answer"]
    assert written["ID"].tolist() == sample["id"].tolist()
    assert written["Answer"].tolist() == submission["answer"].str.upper().tolist()
    assert set(written["Answer"]) <= set("ABCD")

    edit_csv(data_copy / "train.csv", lambda df: df.assign(answer=df["answer"].str.lower()))  # the format's a-d
    train, test, sample = helpers.load_competition_data(data_copy)
    helpers.write_submission(np.arange(len(test)) % 4, test, sample, data_copy / "submission.csv")
    assert set(pd.read_csv(data_copy / "submission.csv", dtype=str)["Answer"]) <= set(helpers.LETTERS)


BAD_CASES = {
    "missing column": ("train.csv", lambda df: df.drop(columns="c"), ["train.csv", "missing columns ['c']"]),
    "answer outside a-d": ("train.csv", lambda df: df.assign(answer=["e"] + list(df["answer"][1:])), ["'e'"]),
    "duplicate id": ("train.csv", lambda df: df.assign(id=[df["id"][1]] + list(df["id"][1:])), ["duplicate ids"]),
    "empty question": ("train.csv", lambda df: df.assign(question=[""] + list(df["question"][1:])), ["empty"]),
    "empty id": ("train.csv", lambda df: df.assign(id=[*df["id"][:10], "", *df["id"][11:]]), ["lines [12]"]),
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


def test_truncated_image_is_caught_by_the_check_not_at_inference(data_copy):
    """Image.verify() passes a truncated JPEG; only decoding it (as load_image does) finds the missing end."""
    test = pd.read_csv(data_copy / "test.csv")
    image = data_copy / test["path"][2]
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (384, 512, 3), dtype=np.uint8)).save(image)
    image.write_bytes(image.read_bytes()[:20_000])
    with pytest.raises(ValueError) as err:
        helpers.load_competition_data(data_copy)
    message = str(err.value)
    assert "test.csv: images unreadable" in message and test["id"][2] in message
    assert "image file is truncated" in message


def test_huge_image_is_refused_with_its_row(data_copy, monkeypatch):
    first = pd.read_csv(data_copy / "train.csv")["path"][0]
    Image.new("RGB", (100, 100)).save(data_copy / first, format="JPEG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8000)  # every other sample image is 64 x 64
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ValueError) as err:
        helpers.load_competition_data(data_copy)
    assert "TRAIN_0000" in str(err.value) and "decompression-bomb limit" in str(err.value)


def test_awkward_images_pass_the_check(data_copy):
    """A 3000 x 10 strip, a 16-bit PNG and an EXIF-rotated JPEG load (load_image pads, scales and rotates them)."""
    paths = pd.read_csv(data_copy / "train.csv")["path"]
    Image.new("RGB", (3000, 10), "red").save(data_copy / paths[0], format="PNG")
    Image.fromarray(np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)).save(data_copy / paths[1], "PNG")
    image = Image.new("RGB", (64, 32))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(data_copy / paths[2], exif=exif)
    train = helpers.load_competition_data(data_copy, image_size=512)[0]
    budget = helpers.data_check_budget(512)  # the check's: 28-pixel patches (qwen-vl-utils' default)
    assert helpers.load_image(train["image_path"][0], budget).size == (2996, 28)  # padded to 3000 x 30, one patch high
    assert 120 < np.asarray(helpers.load_image(train["image_path"][1], budget)).mean() < 135  # not all white
    assert helpers.load_image(train["image_path"][2], budget).size == (56, 84)  # upright 32 x 64, up to 4 patches


def test_utf16_csvs_are_read(data_copy):
    for name, encoding in (("train.csv", "utf-16"), ("test.csv", "utf-16-le"), ("sample_submission.csv", "utf-16-be")):
        path = data_copy / name
        path.write_bytes(path.read_text(encoding="utf-8").encode(encoding))  # utf-16: with its byte-order mark
    train, test, sample = helpers.load_competition_data(data_copy)
    assert len(train) == 12 and len(test) == 4 and list(sample["id"]) == list(test["id"])


@pytest.mark.parametrize(
    "encoding, text, likely",
    [
        ("cp949", "한국어 질문", "cp949 / EUC-KR (Korean Excel)"),
        ("cp1252", "café", "a Windows code page such as cp1252"),
    ],
)
def test_other_encodings_name_the_file_and_the_likely_encoding(data_copy, encoding, text, likely):
    path = data_copy / "train.csv"

    def add_text(df):
        df = df[df["task_type"] != "color_ko"]  # rows already in Korean: cp1252 cannot encode them
        return df.assign(question=df["question"] + " " + text)

    edit_csv(path, add_text)
    path.write_bytes(path.read_text(encoding="utf-8").encode(encoding))  # as Excel saves it on such a Windows
    with pytest.raises(ValueError) as err:
        helpers.load_competition_data(data_copy)
    assert f"{path}: not UTF-8 or UTF-16" in str(err.value) and f"likely {likely}" in str(err.value)


@pytest.mark.parametrize("name", ["train.csv", "test.csv"])
def test_a_table_without_rows_is_an_error(data_copy, name):
    edit_csv(data_copy / name, lambda df: df.head(0))
    with pytest.raises(ValueError, match=f"{name}: no rows, only a header"):
        helpers.load_competition_data(data_copy)


def test_an_empty_file_is_an_error(data_copy):
    (data_copy / "test.csv").write_bytes(b"")
    with pytest.raises(ValueError, match="test.csv: empty file"):
        helpers.load_competition_data(data_copy)


def test_blank_sample_answers_are_accepted(data_copy):
    edit_csv(data_copy / "sample_submission.csv", lambda df: df.assign(answer=""))
    sample = helpers.load_competition_data(data_copy)[2]
    assert (sample["answer"] == "").all() and len(sample) == 4


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

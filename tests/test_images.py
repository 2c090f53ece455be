"""load_image, which the data check, training and inference share: every image reaches the model upright, in RGB,
with its contrast, in a shape Qwen-VL's processors accept, or fails with the reason."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from transformers import AutoProcessor

import helpers


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def test_truncated_jpeg_fails_to_load(tmp_path):
    path = tmp_path / "truncated.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (384, 512, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:20_000])
    with Image.open(path) as image:
        image.verify()  # what the data check used to do: it passes
    with pytest.raises(OSError, match="image file is truncated"):
        helpers.load_image(str(path), 64)


def test_exif_rotated_jpeg_is_upright(tmp_path):
    """Orientation 6: stored 200 x 100 with a white left band, shown rotated 90 degrees clockwise: band on top."""
    stored = np.zeros((100, 200, 3), np.uint8)
    stored[:, :50] = 255
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)

    loaded = pixels(helpers.load_image(str(path), 64))
    assert loaded.shape == (64, 32, 3)
    assert loaded[:12].mean() > 240 and loaded[20:].mean() < 15
    row = {"image_path": str(path), "question": "q", "a": "1", "b": "2", "c": "3", "d": "4", "answer": "a"}
    for train in (True, False):  # the Dataset, for training and for scoring, reads through the same function
        assert helpers.VQADataset(pd.DataFrame([row]), 64, train=train)[0]["image"].size == (32, 64)


def test_16_bit_png_keeps_its_contrast(tmp_path):
    path = tmp_path / "16bit.png"
    Image.fromarray(np.linspace(0, 65535, 100 * 200).reshape(100, 200).astype(np.uint16)).save(path)
    with Image.open(path) as image:
        assert image.mode == "I;16" and pixels(image.convert("RGB")).mean() > 250  # PIL's own convert: all white
    loaded = helpers.load_image(str(path), 64)
    assert loaded.mode == "RGB"
    values = pixels(loaded)
    assert values.min() < 5 and values.max() > 250 and 120 < values.mean() < 135  # black to white, as stored


def test_32_bit_image_with_8_bit_values_is_not_brightened():
    image = Image.fromarray(np.full((8, 8), 100, np.int32))
    assert image.mode == "I"
    assert pixels(helpers.upright_rgb(image)).mean() == 100


@pytest.mark.parametrize("mode", ["CMYK", "P", "L", "1"])
def test_other_modes_become_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8).repeat(8, 0).repeat(8, 1))
    path = tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
    rgb.convert(mode).save(path)
    loaded = pixels(helpers.load_image(str(path), 64))
    assert loaded.shape == (8, 16, 3)
    assert loaded[:, :6].max() < 40 and loaded[:, 10:].min() > 215  # black stays black, white stays white


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_shown_on_white(tmp_path, mode):
    """The left half is transparent black (how many PNGs store it), the right half opaque black."""
    rgba = np.zeros((8, 16, 4), np.uint8)
    rgba[:, 8:, 3] = 255
    image = Image.fromarray(rgba)
    if mode == "P":
        image = image.convert("P")  # a palette with a transparent entry: info["transparency"]
    else:
        image = image.convert(mode)
    path = tmp_path / f"{mode}.png"
    image.save(path)
    loaded = pixels(helpers.load_image(str(path), 64))
    assert loaded[:, :6].min() > 250 and loaded[:, 10:].max() < 5


def test_extreme_aspect_ratio_is_padded_to_what_the_processor_accepts(tmp_path, tiny_model_dirs):
    path = tmp_path / "strip.png"
    Image.new("RGB", (3000, 10), "red").save(path)
    processor = AutoProcessor.from_pretrained(tiny_model_dirs["qwen3_vl"]).image_processor
    with Image.open(path) as image:
        with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
            processor(images=[image.convert("RGB")])

    loaded = helpers.load_image(str(path), 384)
    assert loaded.size == (384, 4)  # 384 x 1 after shrinking, padded to a ratio of 96
    assert loaded.getpixel((0, 0)) == helpers.PAD_COLOUR and loaded.getpixel((0, 1)) == (255, 0, 0)
    processor(images=[loaded])


def test_ordinary_images_are_not_padded():
    image = Image.new("RGB", (300, 3))
    assert helpers.pad_to_aspect_ratio(image) is image


def test_huge_image_is_refused_with_the_reason(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8000)  # stands in for 89 megapixels; PIL only warns below 2x
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ValueError) as err:
        helpers.load_image(str(path), 64)
    assert "100 x 100 pixels, over PIL's decompression-bomb limit of 8,000 pixels" in str(err.value)


def test_large_image_is_reduced(tmp_path):
    path = tmp_path / "large.jpg"
    Image.new("RGB", (4000, 3000), "blue").save(path)
    assert helpers.load_image(str(path), 384).size == (384, 288)

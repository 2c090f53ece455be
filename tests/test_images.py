"""load_image, which the data check, training and inference share: every image reaches the model upright, in RGB,
with its contrast, sized by the level's pixel budget exactly as the model's processor sizes it, or fails with the
reason."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SMOKE_BUDGET
from PIL import Image
from qwen_vl_utils import smart_resize
from transformers import AutoProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as transformers_smart_resize

import helpers

# The `safe` level (384 x 384 pixels at most) for the two vision towers, with their real processors' minimum.
QWEN3_VL_SAFE = helpers.PixelBudget(max_pixels=384 * 384, min_pixels=65536, factor=32)
QWEN2_5_VL_SAFE = helpers.PixelBudget(max_pixels=384 * 384, min_pixels=3136, factor=28)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def test_truncated_jpeg_fails_to_load(tmp_path):
    path = tmp_path / "truncated.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (384, 512, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:20_000])
    with Image.open(path) as image:
        image.verify()  # what the data check used to do: it passes
    with pytest.raises(OSError, match="image file is truncated"):
        helpers.load_image(str(path), SMOKE_BUDGET)


def test_exif_rotated_jpeg_is_upright(tmp_path):
    """Orientation 6: stored 200 x 100 with a white left band, shown rotated 90 degrees clockwise: band on top."""
    stored = np.zeros((100, 200, 3), np.uint8)
    stored[:, :50] = 255
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)

    loaded = pixels(helpers.load_image(str(path), SMOKE_BUDGET))
    assert loaded.shape == (64, 32, 3)
    assert loaded[:12].mean() > 240 and loaded[20:].mean() < 15
    row = {"image_path": str(path), "question": "q", "a": "1", "b": "2", "c": "3", "d": "4", "answer": "a"}
    for train in (True, False):  # the Dataset, for training and for scoring, reads through the same function
        assert helpers.VQADataset(pd.DataFrame([row]), SMOKE_BUDGET, train=train)[0]["image"].size == (32, 64)


def test_16_bit_png_keeps_its_contrast(tmp_path):
    path = tmp_path / "16bit.png"
    Image.fromarray(np.linspace(0, 65535, 100 * 200).reshape(100, 200).astype(np.uint16)).save(path)
    with Image.open(path) as image:
        assert image.mode == "I;16" and pixels(image.convert("RGB")).mean() > 250  # PIL's own convert: all white
    loaded = helpers.load_image(str(path), SMOKE_BUDGET)
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
    loaded = pixels(helpers.load_image(str(path), SMOKE_BUDGET))
    assert loaded.shape == (32, 32, 3)  # 16 x 8 brought up to the minimum of one 32 x 32 patch
    assert loaded[:, :12].max() < 40 and loaded[:, 20:].min() > 215  # black stays black, white stays white


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
    loaded = pixels(helpers.load_image(str(path), SMOKE_BUDGET))
    assert loaded[:, :12].min() > 250 and loaded[:, 20:].max() < 5


def test_extreme_aspect_ratio_is_padded_to_what_the_processor_accepts(tmp_path, tiny_model_dirs):
    path = tmp_path / "strip.png"
    Image.new("RGB", (3000, 10), "red").save(path)
    processor = AutoProcessor.from_pretrained(tiny_model_dirs["qwen3_vl"])
    with Image.open(path) as image:
        with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
            processor.image_processor(images=[image.convert("RGB")])

    loaded = helpers.load_image(str(path), helpers.set_pixel_budget(processor, 384))
    assert loaded.size == (3008, 32)  # padded to 3000 x 30 (a ratio of 100), one 32-pixel patch high
    assert loaded.getpixel((0, 0)) == helpers.PAD_COLOUR and loaded.getpixel((0, 16)) == (255, 0, 0)
    processor.image_processor(images=[loaded])
    # At the smoke level a strip this long would not fit 64 x 64 pixels one patch high: padded to a ratio of 4
    assert helpers.load_image(str(path), SMOKE_BUDGET).size == (128, 32)


def test_ordinary_images_are_not_padded():
    image = Image.new("RGB", (300, 3))
    assert helpers.pad_to_aspect_ratio(image) is image


def test_huge_image_is_refused_with_the_reason(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8000)  # stands in for 89 megapixels; PIL only warns below 2x
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ValueError) as err:
        helpers.load_image(str(path), SMOKE_BUDGET)
    assert "100 x 100 pixels, over PIL's decompression-bomb limit of 8,000 pixels" in str(err.value)


def test_large_image_is_reduced(tmp_path):
    path = tmp_path / "large.jpg"
    Image.new("RGB", (4000, 3000), "blue").save(path)
    assert helpers.load_image(str(path), QWEN3_VL_SAFE).size == (416, 320)  # 90% of 384 x 384; was 384 x 288


def save_image(path, width: int, height: int) -> str:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("budget", [QWEN3_VL_SAFE, QWEN2_5_VL_SAFE])
def test_a_16_9_photo_uses_nearly_all_of_the_pixel_budget(tmp_path, budget):
    """Shrunk by its longest side it was 384 x 216 at `safe`: 56% of the 384 x 384 pixels the level allows."""
    width, height = helpers.load_image(save_image(tmp_path / "photo.jpg", 1920, 1080), budget).size
    assert width * height >= 0.9 * budget.max_pixels
    assert width % budget.factor == 0 and height % budget.factor == 0
    assert width / height == pytest.approx(16 / 9, rel=0.05)


@pytest.mark.parametrize("budget", [QWEN3_VL_SAFE, QWEN2_5_VL_SAFE])
def test_a_tiny_image_is_brought_up_to_the_model_minimum(tmp_path, budget):
    width, height = helpers.load_image(save_image(tmp_path / "icon.png", 40, 30), budget).size
    assert budget.min_pixels <= width * height <= budget.max_pixels  # was 40 x 30: below any Qwen-VL's minimum
    assert width % budget.factor == 0 and height % budget.factor == 0 and width > height


@pytest.mark.parametrize("side", [300, 384, 512, 4000])
@pytest.mark.parametrize("factor", [32, 28])
def test_a_square_image_keeps_the_size_it_had(tmp_path, side, factor):
    """Before: shrunk to 384 px at most, then resized by the processor (its own smart_resize, bounds 32 x 32 to
    384 x 384 pixels). A square image gets the same size now."""
    shrunk = min(side, 384)
    before = transformers_smart_resize(shrunk, shrunk, factor=factor, min_pixels=32 * 32, max_pixels=384 * 384)
    budget = QWEN3_VL_SAFE if factor == 32 else QWEN2_5_VL_SAFE
    assert helpers.load_image(save_image(tmp_path / "square.png", side, side), budget).size == before[::-1]


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_the_processor_keeps_each_image_as_sized_and_counts_the_tokens_smart_resize_predicts(
    tmp_path, tiny_model_dirs, arch
):
    processor = AutoProcessor.from_pretrained(tiny_model_dirs[arch])
    budget = helpers.set_pixel_budget(processor, 384)
    assert budget.factor == {"qwen3_vl": 32, "qwen2_5_vl": 28}[arch]  # read off the processor: 16 or 14 px x 2 x 2
    image_processor = processor.image_processor
    for width, height in [(1920, 1080), (40, 30), (512, 512), (300, 900), (777, 333)]:
        image = helpers.load_image(save_image(tmp_path / f"{width}x{height}.png", width, height), budget)
        predicted_height, predicted_width = smart_resize(height, width, budget.factor, 1024, 384 * 384)
        assert image.size == (predicted_width, predicted_height)
        inputs = image_processor(images=[image], return_tensors="pt")
        tokens = int(inputs["image_grid_thw"].prod()) // image_processor.merge_size**2
        assert tokens == predicted_width * predicted_height // budget.factor**2
        unresized = image_processor(images=[image], do_resize=False, return_tensors="pt")  # not resized a second time
        assert torch.equal(inputs["pixel_values"], unresized["pixel_values"])


def test_an_image_size_below_the_model_minimum_is_a_clear_error(tiny_model_dirs):
    processor = AutoProcessor.from_pretrained(tiny_model_dirs["qwen3_vl"])
    processor.image_processor.size = {"shortest_edge": 65536, "longest_edge": 16777216}  # the real Qwen3-VL's
    with pytest.raises(ValueError, match="image_size 224 is below this model's smallest image .*256 px square"):
        helpers.set_pixel_budget(processor, 224)

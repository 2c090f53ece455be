"""Shared fixtures: the sample data and tiny random Qwen-VL models built offline once per test session."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))

import make_tiny_model  # noqa: E402 (data/make_tiny_model.py)

import helpers  # noqa: E402

ARCHS = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
# How the smoke profile sizes images with the tiny Qwen3-VL (helpers.set_pixel_budget): at most 64 x 64 pixels, at
# least its processor's 32 x 32, sides multiples of its 16-pixel patches merged 2 x 2.
SMOKE_BUDGET = helpers.PixelBudget(max_pixels=64 * 64, min_pixels=32 * 32, factor=32)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return ROOT / "data"


@pytest.fixture(scope="session")
def sample_data(sample_dir):
    return helpers.load_competition_data(sample_dir)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model.build_tiny_model(root / arch, arch) for arch in ARCHS}


@pytest.fixture
def smoke_cfg(tmp_path, tiny_model_dirs) -> helpers.Config:
    """The smoke profile writing into a temporary folder, with the tiny Qwen3-VL already built."""
    return helpers.Config(profile="smoke", model_id=str(tiny_model_dirs["qwen3_vl"]), output_dir=str(tmp_path))


@pytest.fixture
def transformers_functions_afterwards():
    """transformers' own functions back in its modeling modules after the test (helpers.replace_modeling_function
    replaces them for the whole process: the rotary embedding, the Gated DeltaNet's convolution), and compiler_works
    asked afresh."""
    yield
    for (module, name), original in helpers.TRANSFORMERS_FUNCTIONS.items():
        setattr(sys.modules[module], name, original)
    helpers.compiler_works.cache_clear()

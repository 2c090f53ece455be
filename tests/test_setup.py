"""The setup cell's route on Kaggle and Colab: version bounds, the internet-off install, progress that reads saved."""

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT
from packaging.requirements import Requirement

import helpers


def test_hosted_packages_have_requirements_txt_bounds():
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    listed = {r.name: r.specifier for r in map(Requirement, filter(None, lines))}
    for line in helpers.HOSTED_PACKAGES:
        requirement = Requirement(line)
        assert listed[requirement.name] == requirement.specifier, requirement.name
        assert any(spec.operator == "<" for spec in requirement.specifier), f"{line}: no upper bound"


def test_outdated_packages_names_unmet_and_missing_ones():
    requirements = ("pytest>=1", "pytest<1", "no-such-package-here>=1")
    assert helpers.outdated_packages(requirements) == ["pytest<1", "no-such-package-here>=1"]


def test_index_unreachable_when_pip_points_at_nothing(monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # port 9 (discard): nothing listens
    assert not helpers.index_reachable(timeout=1)


def test_importing_helpers_turns_on_expandable_segments_unless_the_user_chose():
    """The allocator setting that kept Qwen3.5-9B's second fold at micro-batch 16 under a T4's memory (rehearsal,
    experiments/README.md) is on for whoever imports helpers first; a value the user set is left alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    code = "import os, helpers; print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))"

    def conf_after_import(env):
        done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert conf_after_import(env) == "expandable_segments:True"
    assert conf_after_import(env | {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}) == "max_split_size_mb:512"
    assert conf_after_import(env | {"PYTORCH_ALLOC_CONF": "max_split_size_mb:512"}) == "None"  # torch 2.9's name


def test_wheels_folder_found_in_an_attached_dataset(tmp_path):
    assert helpers.find_wheels_dir((str(tmp_path),)) is None
    wheels = tmp_path / "my-wheels" / "kaggle-wheels"
    wheels.mkdir(parents=True)
    (wheels / "transformers-5.24.0-py3-none-any.whl").touch()
    assert helpers.find_wheels_dir((str(tmp_path),)) == wheels


def make_wheel(folder: Path, name: str, version: str) -> None:
    """A minimal pure-Python wheel: enough for pip to install and for importlib.metadata to report its version."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"__version__ = {version!r}\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{dist}/RECORD"])
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


def test_offline_install_from_an_attached_wheels_folder(tmp_path):
    """Internet off, an older transformers installed: install_packages takes the newer one from the attached folder.
    In a virtual environment of its own (this Python's packages visible beneath it), with pip pointed at nothing.
    The wheels are stand-ins; kaggle/check_offline_install.sh does the same with the real wheel set."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    offline = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    offline |= {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple"}
    make_wheel(tmp_path / "old", "transformers", "4.57.1")
    pip = [python, "-m", "pip", "install", "-q", "--no-index", "--find-links", tmp_path / "old", "transformers==4.57.1"]
    subprocess.run(pip, check=True, env=offline)
    attached = tmp_path / "input" / "wheels-dataset" / "wheels"
    make_wheel(attached, "transformers", "5.24.0")

    script = (
        "import helpers, importlib.metadata as md\n"
        "helpers.OPTIONAL_PACKAGES = ('no-such-speedup',)  # its wheel absent, as liger-kernel's from an old folder\n"
        "requirements = ('transformers>=5.21,<6', 'no-such-speedup>=1')\n"
        f"print(helpers.install_packages(requirements, wheel_roots=({str(tmp_path / 'input')!r},)))\n"
        "print(md.version('transformers'))\n"
    )
    run = subprocess.run([python, "-c", script], env=offline, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    said, version = run.stdout.strip().splitlines()[-2:]
    assert said == (
        f"installed transformers>=5.21,<6 from {attached} (no internet); without no-such-speedup>=1 (no internet, "
        "no wheel attached): it only speeds things up"
    )
    assert version == "5.24.0"


def test_offline_without_wheels_only_the_packages_that_speed_things_up_may_be_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(helpers, "index_reachable", lambda: False)
    monkeypatch.setattr(helpers, "OPTIONAL_PACKAGES", ("no-such-speedup",))
    said = helpers.install_packages(("pytest>=1", "no-such-speedup>=1"), wheel_roots=(str(tmp_path),))
    assert said == (
        "packages: nothing to install; without no-such-speedup>=1 (no internet, no wheel attached): it only speeds "
        "things up"
    )
    with pytest.raises(RuntimeError, match=r"no internet, and these need installing: no-such-package>=1\. Turn"):
        helpers.install_packages(("no-such-package>=1", "no-such-speedup>=1"), wheel_roots=(str(tmp_path),))


def test_bars_write_rare_plain_lines_when_nobody_watches(monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")  # a saved Kaggle version
    assert not helpers.live_progress()
    for _ in helpers.progress_bar(range(1000), desc="short"):  # ends within the delay: writes nothing
        pass
    bar = helpers.progress_bar(total=3, desc="fold 0")
    for step in range(3):
        bar.update(1)
        bar.set_postfix(loss=step)  # waits for the next line, which a short bar never writes
    bar.close()
    helpers.tqdm.write("fold 0 epoch 1: val_acc 0.5")
    assert capsys.readouterr().out == "fold 0 epoch 1: val_acc 0.5\n"
    bar = helpers.progress_bar(total=4, desc="fold 0")  # a bar with lines, and tqdm.write between them (fit's epochs)
    bar.delay = bar.mininterval = 0
    bar.fp.file = lines = io.StringIO()
    bar.update(2)
    helpers.tqdm.write("fold 0 epoch 1: val_acc 0.5", file=lines)
    bar.update(2)
    bar.close()
    text = lines.getvalue().splitlines()
    assert "\r" not in lines.getvalue() and text[1] == "fold 0 epoch 1: val_acc 0.5", text
    assert text[0].startswith("fold 0:  50%") and text[2].startswith("fold 0: 100%"), text

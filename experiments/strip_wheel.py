"""Write a copy of a wheel without the files the GPU machine never loads, so that the wheels a device call carries
fit its 64 MiB.

    python3 experiments/strip_wheel.py .whl/bitsandbytes-0.50.2-*.whl --keep-only '_(cpu|cuda130|cuda132)\\.so'
    python3 experiments/strip_wheel.py .whl-unsloth/unsloth-2026.10.9-*.whl --drop '^studio/'

--keep-only: of the native libraries (*.so), keep those whose name matches (bitsandbytes ships one per CUDA and ROCm
version: 34 of its 41 MiB; the GPU machine's torch is built for CUDA 13.0). --drop: leave out every file whose path
matches. The copy replaces the wheel; its RECORD loses the lines of the files left out (pip checks the rest).
"""

from __future__ import annotations

import argparse
import re
import zipfile
from pathlib import Path


def left_out(name: str, keep_only: str | None, drop: str | None) -> bool:
    if keep_only and name.endswith(".so") and not re.search(keep_only, Path(name).name):
        return True
    return bool(drop and re.search(drop, name))


def strip(wheel: Path, keep_only: str | None, drop: str | None) -> list[str]:
    with zipfile.ZipFile(wheel) as source:
        names = source.namelist()
        gone = [n for n in names if left_out(n, keep_only, drop)]
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        stripped = wheel.with_suffix(".stripped")
        with zipfile.ZipFile(stripped, "w", zipfile.ZIP_DEFLATED) as target:
            for name in names:
                if name in gone:
                    continue
                data = source.read(name)
                if name == record:
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(line for line in lines if line.split(",", 1)[0] not in gone).encode()
                target.writestr(source.getinfo(name), data)
    stripped.replace(wheel)
    return gone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--keep-only", help="regular expression: the native libraries (*.so) to keep")
    parser.add_argument("--drop", help="regular expression: the paths to leave out")
    args = parser.parse_args()
    before = args.wheel.stat().st_size
    gone = strip(args.wheel, args.keep_only, args.drop)
    after = args.wheel.stat().st_size
    print(f"{args.wheel.name}: {len(gone)} files left out, {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()

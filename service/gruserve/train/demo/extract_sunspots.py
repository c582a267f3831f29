"""Copy statsmodels' yearly sunspot series into ``sunspots.csv`` beside this script.

Run once, by hand; nothing downloads data at training time. statsmodels is
not a dependency of gruserve: the script reads the CSV straight out of a
statsmodels wheel (``pip download statsmodels --no-deps``) or out of an
installed copy, without importing the package.

    python service/gruserve/train/demo/extract_sunspots.py [statsmodels-*.whl]
"""

from __future__ import annotations

import importlib.util
import sys
import zipfile
from pathlib import Path

MEMBER = "statsmodels/datasets/sunspots/sunspots.csv"
TARGET = Path(__file__).with_name("sunspots.csv")


def read_source(argv: list[str]) -> bytes:
    if argv:
        with zipfile.ZipFile(argv[0]) as wheel:
            return wheel.read(MEMBER)
    spec = importlib.util.find_spec("statsmodels")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("give a statsmodels wheel, or install statsmodels somewhere first")
    root = Path(next(iter(spec.submodule_search_locations))).parent
    return (root / MEMBER).read_bytes()


def main(argv: list[str]) -> None:
    data = read_source(argv).replace(b"\r\n", b"\n")
    lines = data.decode("ascii").strip().splitlines()
    if lines[0] != '"YEAR","SUNACTIVITY"' or len(lines) != 310:
        raise SystemExit(f"unexpected content: {lines[0]!r}, {len(lines)} lines")
    TARGET.write_text("YEAR,SUNACTIVITY\n" + "\n".join(lines[1:]) + "\n", encoding="ascii")
    print(f"wrote {TARGET} ({len(lines) - 1} years)")


if __name__ == "__main__":
    main(sys.argv[1:])

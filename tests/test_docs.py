"""The documentation against the code: docs/training.md's table of keys has the dataclass defaults.

The dataclasses in hybrid_accel/config.py are the one source of the defaults; the table's `default`
column must give the same values, and its `paper` column those of configs/polyp-paper.yaml. A cell
holds one value per key of its row, in order, separated by commas (one value for all keys when the
row has several keys and one value; `same` in the paper column: as the default column). Each value
is read as the trainer reads an override (`key=value`), so `3e-4`, `[0, 1]` and `null` work as typed.
"""

import functools
import re
from pathlib import Path

import pytest

from hybrid_accel.config import Config, load_config, valid_keys

REPO = Path(__file__).resolve().parents[1]
HEADER = "| key | default | paper (configs/polyp-paper.yaml) | meaning |"


def _table(text: str, header: str) -> list[list[str]]:
    """The cells of each body row of the markdown table under ``header``."""
    lines = text.splitlines()
    start = lines.index(header) + 2  # skip the |---| line
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _values(cell: str) -> list[str]:
    """``a, [b, c], d`` -> ``["a", "[b, c]", "d"]`` (commas inside brackets stay)."""
    out, depth, cur = [], 0, ""
    for ch in cell:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + [cur.strip()]


def _get(cfg: Config, key: str):
    return functools.reduce(getattr, key.split("."), cfg)


def _documented(keys: list[str], cell: str) -> dict[str, object]:
    """key -> the value the cell gives it, parsed and typed as a command-line override."""
    vals = _values(cell.replace("`", ""))
    if len(vals) == 1:
        vals = vals * len(keys)
    assert len(vals) == len(keys), f"{keys}: {cell!r} has {len(vals)} values for {len(keys)} keys"
    return {k: _get(load_config(None, [f"{k}={v}"]), k) for k, v in zip(keys, vals)}


ROWS = _table((REPO / "docs" / "training.md").read_text(), HEADER)


def test_the_table_is_found_and_names_real_keys():
    assert len(ROWS) >= 20
    known = set(valid_keys())
    for row in ROWS:
        keys = re.findall(r"`([\w.]+)`", row[0])
        assert keys, f"no key in {row[0]!r}"
        assert set(keys) <= known, f"{row[0]}: not a config key: {set(keys) - known}"


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r[0].replace("`", ""))
def test_training_md_defaults_are_the_dataclass_defaults(row):
    keys = re.findall(r"`([\w.]+)`", row[0])
    defaults, paper = Config(), load_config(REPO / "configs" / "polyp-paper.yaml")
    for key, value in _documented(keys, row[1]).items():
        assert value == _get(defaults, key), f"docs/training.md says {key} defaults to {value!r}; " \
                                             f"hybrid_accel/config.py has {_get(defaults, key)!r}"
    for key, value in _documented(keys, row[1] if row[2] == "same" else row[2]).items():
        assert value == _get(paper, key), f"docs/training.md says {key} is {value!r} in the paper's setting; " \
                                          f"configs/polyp-paper.yaml has {_get(paper, key)!r}"


def test_a_wrong_default_is_caught():
    assert _documented(["dii.tau"], "10") == {"dii.tau": 10} == {"dii.tau": Config().dii.tau}
    assert _documented(["dii.tau"], "11")["dii.tau"] != Config().dii.tau
    assert _documented(["dii.clip", "dii.init"], "[0, 1], 0.1") == {"dii.clip": [0.0, 1.0], "dii.init": 0.1}
    assert _documented(["optim.lr"], "3e-4") == {"optim.lr": 3e-4}

"""The compatibility table in docs/model-format.md names tests that exist: every `file.py::test_name`
it cites is a test function in that file, and every parametrisation id it cites is one of its cells."""

from __future__ import annotations

import re
from pathlib import Path

from tests.models.test_compatibility import CELLS

REPO = Path(__file__).resolve().parent.parent
CITED = re.compile(r"`((?:models/)?test_\w+\.py)::(test_\w+)")


def _table() -> str:
    text = (REPO / "docs" / "model-format.md").read_text()
    start = text.index("## Compatibility")
    return text[start : text.index("\n## ", start + 1)]


def test_every_cited_test_exists() -> None:
    cited = CITED.findall(_table())
    assert len(cited) >= 10
    for path, name in cited:
        source = (REPO / "tests" / path).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), f"docs/model-format.md cites {path}::{name}, which does not exist"


def test_every_cell_of_the_convert_load_scan_test_is_in_the_table() -> None:
    table = _table()
    for cell in CELLS:
        assert f"`[{cell}-...]`" in table, f"the table has no cell for {cell}"

"""docs/api.md is generated from the docstrings by docs/gen_api.py and must be up to date."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_api_reference_matches_docstrings():
    spec = importlib.util.spec_from_file_location("gen_api", ROOT / "docs" / "gen_api.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = gen.generate()
    assert (ROOT / "docs" / "api.md").read_text() == text, (
        "docs/api.md is out of date: run `python docs/gen_api.py`")
    assert "### `SVAEGuide(" in text and "### `impute(" in text

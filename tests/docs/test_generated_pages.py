"""docs/faq.md and docs/compare.md match the commands they show (issue 17, item 8):
`python scripts/gen_docs.py` regenerates them."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = load_generator()


@pytest.mark.parametrize("page", GEN.PAGES)
def test_page_matches_its_commands(page: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", str(GEN.COLUMNS))
    text = (ROOT / page).read_text()
    assert GEN.regenerate(text) == text, f"{page} is stale: run python scripts/gen_docs.py"


def test_every_block_is_an_nvfree_command() -> None:
    for page in GEN.PAGES:
        for match in GEN.BLOCK.finditer((ROOT / page).read_text()):
            groups = GEN.split_commands(match.group(2))
            assert groups, f"{page}: a console block without a command"
            for command, _ in groups:
                GEN.argv_of(command)

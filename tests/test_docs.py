"""The docs that are generated from the code are up to date."""
from pathlib import Path

from falcon_qlora.config import reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_generated_from_the_schema():
    """docs/config.md is exactly what `python -m falcon_qlora.config` prints: regenerate it after changing a key."""
    assert (ROOT / "docs" / "config.md").read_text(encoding="utf-8") == reference_markdown()

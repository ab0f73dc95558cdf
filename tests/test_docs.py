"""The docs that are generated from the code are up to date."""
from pathlib import Path

from falcon_qlora.config import reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_generated_from_the_schema():
    """docs/config.md is exactly what `python -m falcon_qlora.config` prints: regenerate it after changing a key."""
    assert (ROOT / "docs" / "config.md").read_text(encoding="utf-8") == reference_markdown()


def test_the_readme_test_command_runs_the_slow_tests_too():
    """`slow` marks long end-to-end runs so that one can skip them; nothing deselects them by default, so the
    README's `python -m pytest -q` (what CI runs) runs every test."""
    import tomllib
    pytest_ini = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["pytest"]["ini_options"]
    assert [m.split(":")[0] for m in pytest_ini["markers"]] == ["slow"]
    assert "slow" not in str(pytest_ini.get("addopts", ""))
    assert "python -m pytest -q\n" in (ROOT / "README.md").read_text(encoding="utf-8")

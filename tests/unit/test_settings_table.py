"""docs/operations.md's settings table is the one scripts/settings_table.py generates from the Settings class."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from rankserve.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "settings_table.py"
DOC = ROOT / "docs" / "operations.md"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("settings_table", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(document: str, script: ModuleType) -> list[list[str]]:
    body = document[document.index(script.BEGIN) + len(script.BEGIN) : document.index(script.END)]
    lines = body.strip().splitlines()[2:]
    return [[cell.strip() for cell in ln.strip("|").split(" | ")] for ln in lines]


def test_operations_doc_table_is_current(script: ModuleType) -> None:
    document = DOC.read_text(encoding="utf-8")
    assert script.replace_table(document, script.table()) == document, (
        "docs/operations.md's settings table is out of date: run "
        "`python scripts/settings_table.py --write docs/operations.md`"
    )


def test_table_has_every_setting_with_its_env_default_and_meaning(script: ModuleType) -> None:
    rows = table_rows(DOC.read_text(encoding="utf-8"), script)
    assert [r[0] for r in rows] == [f"`--{name.replace('_', '-')}`" for name in Settings.model_fields]
    for flag, env, default, values, meaning in rows:
        assert env != "–" and all(e.strip("`").isupper() for e in env.split(", ")), flag
        assert default and values, flag
        assert meaning, f"{flag}: give the setting a description= in settings.py"
    port = next(r for r in rows if r[0] == "`--port`")
    assert port[1] == "`NIM_HTTP_API_PORT`, `RANKSERVE_PORT`" and port[2] == "`8000`"
    assert "(≥ 1, ≤ 65535)" in port[3]


def test_env_names_in_the_table_configure_the_server(script: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = {r[0]: r for r in table_rows(DOC.read_text(encoding="utf-8"), script)}
    for env in rows["`--max-batch-size`"][1].split(", "):
        monkeypatch.setenv(env.strip("`"), "17")
        assert Settings().max_batch_size == 17, env
        monkeypatch.delenv(env.strip("`"))


def test_check_detects_a_stale_table(script: ModuleType, tmp_path: Path) -> None:
    stale = tmp_path / "operations.md"
    document = DOC.read_text(encoding="utf-8")
    stale.write_text(document.replace("| `--warmup` |", "| `--warm-up` |"), encoding="utf-8")
    check = [sys.executable, str(SCRIPT), "--check", str(stale)]
    result = subprocess.run(check, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 1 and "out of date" in result.stdout
    assert script.main(["--write", str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == document
    assert subprocess.run(check, capture_output=True, cwd=ROOT, timeout=60).returncode == 0

"""The layers hold: the core imports no amqtt (nor websockets), the feeds nothing of the broker,
the plugins no amqtt (they attach to the core's named hooks)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = sorted((ROOT / "bridge" / "core").glob("*.py"))
FEEDS = sorted((ROOT / "feeds").glob("*.py"))
PLUGINS = sorted((ROOT / "broker_plugins").glob("*.py"))
EDGE = ("amqtt", "websockets", "paho")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", CORE, ids=[p.name for p in CORE])
def test_core_modules_import_nothing_of_the_edge(path: Path) -> None:
    assert not {name for name in _imports(path) if name.split(".")[0] in EDGE}


def _loaded_edge(modules: list[str]) -> str:
    """Which edge packages a fresh interpreter has loaded after importing ``modules``."""
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({EDGE!r})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    return result.stdout.strip()


def test_importing_the_whole_core_loads_nothing_of_the_edge() -> None:
    """Transitively too: a fresh interpreter imports every core module."""
    assert _loaded_edge([f"bridge.core.{p.stem}" for p in CORE if p.stem != "__init__"]) == "[]"


def test_the_feeds_load_no_broker() -> None:
    """A feed is an MQTT client (paho) or an in-process producer, never part of the broker."""
    loaded = _loaded_edge([f"feeds.{p.stem}" for p in FEEDS if p.stem != "__init__"])
    assert loaded in ("[]", "['paho']")


@pytest.mark.parametrize("path", FEEDS, ids=[p.name for p in FEEDS])
def test_feeds_use_only_the_core_and_the_error_root(path: Path) -> None:
    ours = {name for name in _imports(path) if name.split(".")[0] == "bridge"}
    assert all(name.startswith("bridge.core") or name == "bridge.errors" for name in ours), ours


OUTSIDE_EDGE = sorted(
    p
    for p in [*(ROOT / "bridge").rglob("*.py"), *(ROOT / "feeds").glob("*.py"), *PLUGINS]
    if "edge" not in p.relative_to(ROOT / "bridge" if p.is_relative_to(ROOT / "bridge") else ROOT).parts
)


@pytest.mark.parametrize("path", OUTSIDE_EDGE, ids=[str(p.relative_to(ROOT)) for p in OUTSIDE_EDGE])
def test_only_the_edge_package_imports_amqtt(path: Path) -> None:
    """amqtt is confined to ``bridge.edge``: nothing else names it."""
    assert not {name for name in _imports(path) if name.split(".")[0] == "amqtt"}


def test_the_plugins_load_no_amqtt() -> None:
    """Transitively too: a plugin is a thin adapter over pure code on the core's hooks."""
    assert PLUGINS
    loaded = _loaded_edge([f"broker_plugins.{p.stem}" for p in PLUGINS if p.stem != "__init__"])
    assert "amqtt" not in loaded, loaded

"""Every config in examples/ loads, validates and (with the compiled core) compiles."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastroute.config import compile_config, load_config

EXAMPLES = Path(__file__).resolve().parents[1] / 'examples'
CONFIGS = sorted(p for p in EXAMPLES.iterdir() if p.suffix in ('.yaml', '.yml', '.toml'))


def test_the_three_deployments_and_a_toml_are_there() -> None:
    names = {p.name for p in CONFIGS}
    assert {'saas.yaml', 'agency.yaml', 'ab-test.yaml'} <= names
    assert any(p.suffix == '.toml' for p in CONFIGS)


@pytest.mark.parametrize('path', CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_loads_and_validates(path: Path) -> None:
    cfg = load_config(path, environ={})  # the examples need no environment variables
    assert cfg.models


def test_examples_say_what_they_contain() -> None:
    saas = load_config(EXAMPLES / 'saas.yaml', environ={})
    assert [r.name for r in saas.routes][:2] == ['classify', 'summarize']
    assert saas.routes[-1].classify == 'complexity'
    agency = load_config(EXAMPLES / 'agency.yaml', environ={})
    adapters = [t.adapter for t in agency.tenants.values() if t.adapter]
    assert len(adapters) == len(set(adapters)) >= 3
    assert all(t.keys_sha256 for t in agency.tenants.values())  # keys_file resolved too
    ab = load_config(EXAMPLES / 'ab-test.yaml', environ={})
    assert any(r.split for r in ab.routes)
    assert all(s.sticky for s in ab.splits.values())


# -- compile (needs fastroute._core.Router) -------------------------------------------------------


@pytest.mark.parametrize('path', CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_compiles(path: Path) -> None:
    cfg = load_config(path, environ={})
    router = compile_config(cfg, file=str(path))
    assert router.route_count == len(cfg.routes)


@pytest.mark.parametrize('path', CONFIGS, ids=[p.name for p in CONFIGS])
def test_fastroute_check_passes_on_each_example(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI compiles with the route's classifier model files loaded (as `serve` does), not the bare spec."""
    from fastroute.cli import main

    assert main(['check', str(path)]) == 0, capsys.readouterr().err
    assert str(path) in capsys.readouterr().out

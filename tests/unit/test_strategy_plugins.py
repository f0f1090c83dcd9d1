"""Third-party strategies: entry points in ``brickyard.strategies``, their settings, and what is refused.

The documented example (docs/routing.md, "A strategy in 20 lines") is built from the page itself with
pip, offline, installed into a temporary directory, and routed with by a gateway and the simulator.
"""

from __future__ import annotations

import importlib
import logging
import random
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from brickyard_core.typed_config import load
from emulator.profile import load_profile
from emulator.simulator import FleetSimulator, FleetSpec
from emulator.workloads import WorkloadSpec, generate
from gateway_plugins.app import Gateway
from gateway_plugins.config import GatewaySettings, GpuTypeSettings, RoutingSettings
from gateway_plugins.discovery.registry import PodInfo, PodRegistry
from gateway_plugins.errors import GatewayError
from gateway_plugins.routing.router import Router
from gateway_plugins.routing.strategies import (
    Registration,
    Stateless,
    StrategyContext,
    build_strategies,
    installed_plugins,
)
from gateway_plugins.routing.strategies.prefix import PrefixIndex
from gateway_plugins.routing.types import PodState, RoutingRequest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on the import path, so on the entry-point search path; forgotten afterwards."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    installed_plugins.cache_clear()
    yield site
    installed_plugins.cache_clear()
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(site)):
            del sys.modules[name]


def documented_example() -> dict[str, str]:
    """The fenced blocks of docs/routing.md's "A strategy in 20 lines", by language."""
    doc = (REPO / "docs" / "routing.md").read_text()
    section = doc.split("### A strategy in 20 lines", 1)[1].split("\n### ", 1)[0]
    return {lang: code for lang, code in re.findall(r"```(\w+)\n(.*?)```", section, re.DOTALL)}


def test_the_documented_plugin_installs_and_routes_in_a_gateway_and_the_simulator(
    tmp_path: Path, site: Path
) -> None:
    blocks = documented_example()
    assert len(blocks["python"].strip().splitlines()) <= 22  # "in 20 lines", give or take the docstring
    package = tmp_path / "brickyard-prefer-label"
    package.mkdir()
    (package / "pyproject.toml").write_text(blocks["toml"])
    entry = tomllib.loads(blocks["toml"])["project"]["entry-points"]["brickyard.strategies"]
    assert entry == {"prefer-label": "brickyard_prefer_label:PreferLabel"}
    (package / "brickyard_prefer_label.py").write_text(blocks["python"])
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run(
        [*pip, "--disable-pip-version-check", "--quiet", "--target", str(site), str(package)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    importlib.invalidate_caches()
    config = tmp_path / "gateway.yaml"
    config.write_text(blocks["yaml"])  # routing.plugins.prefer-label: {label: capacity, value: reserved, ...}

    # A gateway: the header path picks it by name, with its settings.
    gateway = Gateway(load(GatewaySettings, config))
    router = gateway.router
    router.registry.replace_all(
        PodInfo(f"p{i}", f"10.0.0.{i}:8000", "m", labels={"capacity": "reserved" if i == 0 else "spot"})
        for i in range(3)
    )
    plugin = router.strategy("prefer-label")
    assert (plugin.slack, plugin.label, plugin.value) == (8, "capacity", "reserved")  # type: ignore[attr-defined]
    decisions = [router.route(RoutingRequest("m"), plugin) for _ in range(12)]
    assert [d.pod.name for d in decisions[:8]] == ["p0"] * 8  # reserved, until 8 requests busier
    assert {d.pod.name for d in decisions[8:]} & {"p1", "p2"}  # then the spot pods too
    assert {(d.strategy, d.label) for d in decisions} == {("prefer-label", "prefer-label")}
    assert router.strategy("prefer-label:2,least-request").parts[0][0] is plugin  # type: ignore[attr-defined]

    # The simulator: every request on the engines of the preferred GPU type.
    l4 = load_profile("llama-3.1-8b_l4").gpu
    routing = RoutingSettings(
        plugins={"prefer-label": {"label": GpuTypeSettings().label, "value": l4, "slack": 1000}}
    )
    fleet = {"llama-3.1-8b_h100": 1, "llama-3.1-8b_l4": 2}
    workload = WorkloadSpec(rate=20.0, duration=2.0, seed=1, prompt_tokens=128, output_tokens=8)
    requests = list(generate("no-sharing", workload))
    result = FleetSimulator(FleetSpec(fleet=fleet, strategy="prefer-label", routing=routing)).run(requests)
    assert len(result.outcomes) == len(requests)
    assert set(result.routed) == {"engine-1", "engine-2"}


class Good(Stateless):
    name = "works"

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        return [0.0] * len(pods)


class Raises(Good):
    name = "raises"

    @classmethod
    def from_settings(cls, context: StrategyContext) -> Raises:
        raise KeyError(context.options["zone"])  # a required setting missing


class NoScore:
    name = "no-score"
    uses_metrics = False

    @classmethod
    def from_settings(cls, context: StrategyContext) -> NoScore:
        return cls()


class WrongName(Good):
    name = "another-name"


NUMBER = 3


def install(site: Path, dist: str, entry_points: dict[str, str]) -> None:
    """A distribution as pip would leave it, with entry points into this test module."""
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = [f"{name} = {target}" for name, target in entry_points.items()]
    (info / "entry_points.txt").write_text("[brickyard.strategies]\n" + "\n".join(lines) + "\n")


def test_broken_plugins_are_logged_and_skipped_and_the_gateway_serves(
    site: Path, caplog: pytest.LogCaptureFixture
) -> None:
    here = __name__
    install(
        site,
        "broken-strategies",
        {
            "missing-module": "no_such_module_anywhere:Strategy",
            "not-a-factory": f"{here}:NUMBER",
            "raises": f"{here}:Raises",
            "no-score": f"{here}:NoScore",
            "wrong-name": f"{here}:WrongName",
            "bad,name": f"{here}:Good",
            "works": f"{here}:Good",
        },
    )
    settings = RoutingSettings(plugins={"works": {}, "typo": {"x": 1}})
    with caplog.at_level(logging.WARNING):
        strategies = build_strategies(settings)
    assert isinstance(strategies["works"], Good)
    skipped = ("missing-module", "not-a-factory", "raises", "no-score", "wrong-name", "bad,name")
    assert not set(skipped) & strategies.keys()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    for name in skipped:  # each names the entry point and its package
        assert any(f"'{name} = " in e and "of broken-strategies 0.1" in e for e in errors), name
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("routing.plugins.typo" in w for w in warnings)
    assert not any("routing.plugins.works" in w for w in warnings)
    registry = PodRegistry()
    registry.replace_all([PodInfo("p0", "10.0.0.0:8000", "m")])
    router = Router(registry, strategies, default_strategy="works")
    assert router.route(RoutingRequest("m")).strategy == "works"
    with pytest.raises(GatewayError) as info:
        router.strategy("raises")
    assert info.value.status == 400


@pytest.mark.parametrize("name", ["least-request", "least-gpu-cache", "inference-extension", "works"])
def test_a_plugin_taking_a_registered_name_stops_start_up(site: Path, name: str) -> None:
    install(site, "first", {"works": f"{__name__}:Good"})
    install(site, "impostor", {name: f"{__name__}:Good"})
    with pytest.raises(ValueError, match=f"takes the name '{name}', which is already registered: refused"):
        build_strategies()


class Custom(Good):
    name = "custom"


def test_a_plugin_gets_its_own_settings_the_shared_index_and_the_random_source() -> None:
    seen: dict[str, object] = {}

    def factory(context: StrategyContext) -> Custom:  # a function of the context is a factory too
        seen.update(options=context.options, index=PrefixIndex.shared(context), rng=context.rng)
        return Custom()

    settings = RoutingSettings(plugins={"custom": {"weights": [1, 2]}})
    rng = random.Random(3)
    strategies = build_strategies(settings, rng=rng, plugins=[Registration("custom", factory)])
    assert strategies["custom"].name == "custom"
    assert seen["options"] == {"weights": [1, 2]}
    with pytest.raises(TypeError):
        seen["options"]["weights"] = []  # type: ignore[index]
    assert seen["index"] is strategies["prefix-cache"].index  # type: ignore[attr-defined]
    assert seen["rng"] is rng is strategies["random"].rng  # type: ignore[attr-defined]

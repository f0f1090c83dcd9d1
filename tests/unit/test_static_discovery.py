import asyncio
import os
from pathlib import Path

import pytest

from brickyard_core.typed_config import ConfigError
from gateway_plugins.discovery.registry import PodRegistry
from gateway_plugins.discovery.static import StaticDiscovery, load_endpoints


def write(path: Path, text: str, bump: float) -> None:
    path.write_text(text)
    os.utime(path, (bump, bump))  # mtime granularity must not hide a quick second write


def test_load_endpoints(tmp_path: Path) -> None:
    path = tmp_path / "e.yaml"
    path.write_text(
        "pods:\n- {name: a, address: '10.0.0.1:8000', model: m, labels: {gpu: l4}}\n"
        "- {name: b, address: '10.0.0.2:8000', model: m, ready: false}\n"
    )
    pods = load_endpoints(path)
    assert [(p.name, p.ready, dict(p.labels)) for p in pods] == [("a", True, {"gpu": "l4"}), ("b", False, {})]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pods:\n- {name: a, address: nope, model: m}\n", "address must be ip:port"),
        ("pods:\n- {name: a, address: '1.1.1.1:x', model: m}\n", "address must be ip:port"),
        ("pods:\n- {name: a, model: m}\n", "pods\\[0\\].address: required setting missing"),
        (
            "pods:\n- {name: a, address: '1.1.1.1:1', model: m}\n"
            "- {name: a, address: '1.1.1.2:1', model: m}\n",
            "unique",
        ),
    ],
)
def test_bad_endpoint_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "e.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_endpoints(path)


async def test_reload_on_change_and_keep_last_good_set(tmp_path: Path) -> None:
    path = tmp_path / "e.yaml"
    write(path, "pods:\n- {name: a, address: '10.0.0.1:8000', model: m}\n", 1000)
    registry = PodRegistry()
    discovery = StaticDiscovery(path, registry, reload_seconds=0.01)
    discovery.load()
    task = asyncio.create_task(discovery.run())
    try:
        write(
            path,
            "pods:\n- {name: a, address: '10.0.0.1:8000', model: m}\n"
            "- {name: b, address: '10.0.0.2:8000', model: m}\n",
            2000,
        )
        await _until(lambda: len(registry.ready_pods("m")) == 2)
        write(path, "pods: [{{{", 3000)  # a broken edit
        await asyncio.sleep(0.1)
        assert len(registry.ready_pods("m")) == 2
        write(path, "pods: []\n", 4000)
        await _until(lambda: not registry.ready_pods("m"))
    finally:
        task.cancel()


async def _until(condition: object, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.01)

"""The Grafana dashboard in deploy/grafana: well formed, and every metric and grouping label it queries
is one a real gateway (tenancy on, a sidecar publishing pod metrics) actually exposes."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from brickyard.stack import Engine, Stack
from tests.conftest import MODEL

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "brickyard-gateway.json"
METRIC = re.compile(r"brickyard_[a-z_]+")
BY = re.compile(r"\bby\s*\(([^)]*)\)")
#: Labels Prometheus adds to every scraped series; the gateway does not expose them itself.
TARGET_LABELS = {"instance", "job"}
USER = "grafana-user"


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # inside collapsed rows


def variable_queries(board: dict[str, Any]) -> list[str]:
    queries = []
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def expressions(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression: the panels' targets and the template variables' queries."""
    exprs = [t["expr"] for p in panels(board) for t in p.get("targets", []) if t.get("expr")]
    return exprs + variable_queries(board)


def groupings(expr: str) -> Iterator[tuple[list[str], set[str]]]:
    """(labels of a ``by (...)`` clause, the metrics in the expression it aggregates); best effort."""
    for match in BY.finditer(expr):
        labels = [label.strip() for label in match.group(1).split(",") if label.strip()]
        start = expr.find("(", match.end())
        depth, end = 0, start
        for end in range(start, len(expr)):
            depth += {"(": 1, ")": -1}.get(expr[end], 0)
            if depth == 0:
                break
        yield labels, set(METRIC.findall(expr[start : end + 1]))


# -- the file itself -----------------------------------------------------------------------------


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] == "brickyard-gateway"
    assert board["title"] == "Brickyard gateway"
    assert board["schemaVersion"] == 39
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        name = f"panel {panel['id']} ({panel.get('title')!r})"
        assert panel.get("title"), f"{name} has no title"
        assert panel.get("description"), f"{name} has no description"
        assert [t for t in panel.get("targets", []) if t.get("expr")], f"{name} has no query"
        assert panel["datasource"]["uid"] == "${datasource}", f"{name} ignores the datasource variable"


def test_panels_fit_the_grid_without_overlapping() -> None:
    cells: dict[tuple[int, int], int] = {}
    for panel in panels(dashboard()):
        grid = panel["gridPos"]
        inside = grid["x"] >= 0 and grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24
        assert inside, f"panel {panel['id']} does not fit the 24-column grid: {grid}"
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {panel['id']} overlap at {(x, y)}"
                cells[(x, y)] = panel["id"]


def test_template_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"model", "instance"} <= variables.keys()
    model = variables["model"]["query"]
    model = model["query"] if isinstance(model, dict) else model
    assert model.startswith("label_values(brickyard_requests_total") and model.endswith(", model)")


def test_rates_use_the_rate_interval() -> None:
    for expr in expressions(dashboard()):
        for window in re.findall(r"\[([^\]]*)\]", expr):
            assert window == "$__rate_interval", expr


def test_groupings_are_found() -> None:
    """The label check below relies on ``groupings``; make sure it sees through nesting."""
    expr = (
        'topk(3, sum by (user) (rate(brickyard_a_total{x="y"}[1m]))'
        " + sum by (le, model) (rate(brickyard_b_bucket[1m])))"
    )
    found = list(groupings(expr))
    assert found == [(["user"], {"brickyard_a_total"}), (["le", "model"], {"brickyard_b_bucket"})]


# -- against a running gateway -------------------------------------------------------------------


def scrape(port: int) -> dict[str, set[str]]:
    """Sample name (``_total``, ``_bucket``... included) -> the label names it carries."""
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(httpx.get(f"http://127.0.0.1:{port}/metrics").text):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


@pytest.fixture(scope="module")
def exposed(
    stack: Stack, redis_port: int, engines: list[Engine], endpoints_file: Path
) -> dict[str, set[str]]:
    """What a gateway with tenancy on exposes once it has served some traffic, read and streamed, for a
    user; one extra pod has a sidecar publishing its metrics, so the pod metrics age has series too."""
    metered = stack.start_engine("grafana-engine", MODEL)
    stack.start_sidecar(metered, redis_port)
    endpoints = yaml.safe_load(endpoints_file.read_text())
    endpoints["pods"].append({"name": metered.name, "address": metered.address, "model": MODEL})
    path = stack.workdir / "grafana-endpoints.yaml"
    path.write_text(yaml.safe_dump(endpoints))
    config = stack.workdir / "grafana-gateway.yaml"
    config.write_text(yaml.safe_dump({"tenancy": {"enabled": True}}))
    gateway = stack.start_gateway(
        "aibrix", path, "--config", str(config), redis_port=redis_port, name="gateway-grafana"
    )
    port, _ = stack.start_envoy("aibrix", gateway.grpc, [*engines, metered], name="envoy-grafana")

    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    # A stream long enough to reach the gateway in several body chunks (inter-token latency needs two).
    for extra in ({}, {}, {"stream": True, "max_tokens": 32}):
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", json={**body, **extra}, headers={"user": USER}
        )
        assert response.status_code == 200, response.text

    wanted = {name for expr in expressions(dashboard()) for name in METRIC.findall(expr)}
    deadline = time.monotonic() + 10  # the sidecar's first record, usage counted at the stream's end
    while True:
        samples = scrape(gateway.metrics)
        if wanted <= samples.keys() or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


@pytest.mark.slow
def test_every_metric_the_dashboard_queries_is_exposed(exposed: dict[str, set[str]]) -> None:
    used = {name for expr in expressions(dashboard()) for name in METRIC.findall(expr)}
    assert used, "no brickyard_ metric found in the dashboard"
    missing = sorted(used - exposed.keys())
    assert not missing, f"the dashboard queries metrics the gateway does not expose: {missing}"


@pytest.mark.slow
def test_every_grouping_label_exists_on_its_metrics(exposed: dict[str, set[str]]) -> None:
    wrong = []
    for expr in expressions(dashboard()):
        for labels, metrics in groupings(expr):
            available = TARGET_LABELS.union(*(exposed.get(m, set()) for m in metrics))
            wrong += [f"{label} on {sorted(metrics)}" for label in labels if label not in available]
    assert not wrong, f"grouping by labels the metrics do not carry: {wrong}"

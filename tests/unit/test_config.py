import dataclasses
from pathlib import Path

import pytest
import yaml

from brickyard.cli import build_parser
from brickyard_core import defaults
from brickyard_core.typed_config import ConfigError, load
from gateway_plugins.config import GatewaySettings

REPO = Path(__file__).resolve().parents[2]


def test_defaults() -> None:
    settings = load(GatewaySettings)
    assert (settings.contract, settings.grpc_port, settings.default_strategy) == (
        "aibrix",
        9002,
        "least-request",
    )
    assert settings.discovery.source == "static"


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        "contract: epp\nmax-body-bytes: 1024\nmodels:\n  llama: {routing_strategy: random}\n"
        "discovery: {source: kubernetes, namespace: llm}\ndrain_seconds: 3\n"
    )
    settings = load(GatewaySettings, path, {"discovery.namespace": "other", "grpc_port": 50052})
    assert settings.contract == "epp"
    assert settings.max_body_bytes == 1024
    assert settings.models["llama"].routing_strategy == "random"
    assert (settings.discovery.source, settings.discovery.namespace) == ("kubernetes", "other")
    assert settings.grpc_port == 50052
    assert settings.drain_seconds == 3.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("contract: envoy\n", "contract: 'envoy' is not one of"),
        ("grpc_port: '9002'\n", "grpc_port: expected int"),
        ("grpc_port: true\n", "grpc_port: expected int"),
        ("discovery: {sauce: static}\n", "discovery.sauce: unknown setting"),
        ("models: {m: {routing_strategy: 3}}\n", "models.m.routing_strategy"),
        ("- a\n", "expected a mapping"),
        ("contract: [\n", "cannot read configuration"),
    ],
)
def test_bad_settings_name_the_setting(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load(GatewaySettings, path)


def _setting_names(settings: object, prefix: str = "") -> list[str]:
    """Dotted names of every setting, descending into nested settings objects."""
    names = []
    for name, value in vars(settings).items():
        if dataclasses.is_dataclass(value):
            names += _setting_names(value, f"{prefix}{name}.")
        else:
            names.append(f"`{prefix}{name}`")
    return names


def test_every_setting_is_documented() -> None:
    """docs/configuration.md has a row for every gateway and sidecar setting, nested ones included."""
    doc = (REPO / "docs" / "configuration.md").read_text()
    from runtime_sidecar.config import SidecarSettings

    names = _setting_names(GatewaySettings()) + _setting_names(SidecarSettings())
    missing = [name for name in names if name not in doc]
    assert not missing, f"undocumented settings: {missing}"


# --- layers: several files, directories, overrides --------------------------------------------------------


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_later_files_override_earlier_ones(tmp_path: Path) -> None:
    base = write(tmp_path, "base.yaml", "contract: epp\ngrpc_port: 50052\nlog_level: debug\n")
    overlay = write(tmp_path, "overlay.yaml", "grpc_port: 50053\n")
    settings = load(GatewaySettings, [base, overlay])
    assert (settings.contract, settings.grpc_port, settings.log_level) == ("epp", 50053, "debug")
    assert load(GatewaySettings, [overlay, base]).grpc_port == 50052


def test_mappings_merge_recursively(tmp_path: Path) -> None:
    base = write(
        tmp_path,
        "base.yaml",
        "discovery: {source: kubernetes, namespace: llm}\n"
        "models: {a: {routing_strategy: random}}\n"
        "routing: {gpu_type: {profiles: {A10G: {cost: 1.0, max_inflight: 31}}}}\n",
    )
    overlay = write(
        tmp_path,
        "overlay.yaml",
        "discovery: {namespace: other}\n"
        "models: {b: {routing_strategy: prefix-cache}}\n"
        "routing: {gpu_type: {profiles: {A10G: {cost: 2.0}}}}\n",
    )
    settings = load(GatewaySettings, [base, overlay])
    assert (settings.discovery.source, settings.discovery.namespace) == ("kubernetes", "other")
    assert {m: s.routing_strategy for m, s in settings.models.items()} == {"a": "random", "b": "prefix-cache"}
    profile = settings.routing.gpu_type.profiles["A10G"]
    assert (profile.cost, profile.max_inflight) == (2.0, 31)


def test_lists_and_scalars_are_replaced(tmp_path: Path) -> None:
    base = write(tmp_path, "base.yaml", "engine_credentials: {strip_headers: [authorization, x-api-key]}\n")
    overlay = write(tmp_path, "overlay.yaml", "engine_credentials: {strip_headers: [x-token]}\n")
    assert load(GatewaySettings, [base, overlay]).engine_credentials.strip_headers == ["x-token"]
    # A mapping laid over a scalar replaces it (a scalar over a mapping: test_a_bad_setting_names_its_file).
    scalar = write(tmp_path, "scalar.yaml", "discovery: 3\n")
    mapping = write(tmp_path, "mapping.yaml", "discovery: {source: kubernetes}\n")
    assert load(GatewaySettings, [scalar, mapping]).discovery.source == "kubernetes"


def test_a_directory_is_its_yaml_files_in_name_order(tmp_path: Path) -> None:
    """Laid out as the kubelet mounts a ConfigMap: each key a link into a hidden, timestamped directory."""
    mount, data = tmp_path / "etc", tmp_path / "etc" / "..2025_01_01_00_00_00.000000001"
    data.mkdir(parents=True)
    (mount / "..data").symlink_to(data.name)
    files = {
        "50-overlay.yml": "grpc_port: 50053\nlog_level: debug\n",
        "00-base.yaml": "grpc_port: 50052\ncontract: epp\n",
        "60-empty.yaml": "",
        "99-notes.txt": "log_level: warning\n",  # not YAML by its name
        ".99-hidden.yaml": "log_level: warning\n",  # hidden, as from a shell's *.yaml
    }
    for name, text in files.items():
        write(data, name, text)
        (mount / name).symlink_to(f"..data/{name}")
    settings = load(GatewaySettings, [mount])
    assert (settings.contract, settings.grpc_port, settings.log_level) == ("epp", 50053, "debug")
    later = write(tmp_path, "later.yaml", "log_level: error\n")
    assert load(GatewaySettings, [mount, later]).log_level == "error"


def test_flags_override_every_file(tmp_path: Path) -> None:
    base = write(tmp_path, "base.yaml", "grpc_port: 50052\ndiscovery: {source: kubernetes, namespace: a}\n")
    settings = load(GatewaySettings, [base], {"grpc_port": 1, "discovery.namespace": "b"})
    assert (settings.grpc_port, settings.discovery.source, settings.discovery.namespace) == (
        1,
        "kubernetes",
        "b",
    )


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_an_empty_file_changes_nothing(tmp_path: Path, text: str) -> None:
    base = write(tmp_path, "base.yaml", "grpc_port: 50052\n")
    assert load(GatewaySettings, [base, write(tmp_path, "empty.yaml", text)]).grpc_port == 50052


@pytest.mark.parametrize(
    ("files", "culprit", "message"),
    [
        # An unknown key or a wrong type names the file that set it, wherever it is in the order.
        (
            {"a.yaml": "discovery: {sauce: 1}\n", "b.yaml": "grpc_port: 1\n"},
            "a.yaml",
            "discovery.sauce: unknown",
        ),
        (
            {"a.yaml": "grpc_port: 1\n", "b.yaml": "discovery: {sauce: 1}\n"},
            "b.yaml",
            "discovery.sauce: unknown",
        ),
        ({"a.yaml": "models: {m: {}}\n", "b.yaml": "models: {m: {route: x}}\n"}, "b.yaml", "models.m.route"),
        ({"a.yaml": "grpc_port: 1\n", "b.yaml": "grpc_port: x\n"}, "b.yaml", "grpc_port: expected int"),
        (
            {"a.yaml": "discovery: {source: static}\n", "b.yaml": "discovery: []\n"},
            "b.yaml",
            "discovery: expected",
        ),
        # `-` and `_` are one key: spelled both ways in two files, neither silently wins.
        ({"a.yaml": "max-body-bytes: 1\n", "b.yaml": "max_body_bytes: 2\n"}, "b.yaml", "given twice"),
    ],
)
def test_a_bad_setting_names_its_file(
    tmp_path: Path, files: dict[str, str], culprit: str, message: str
) -> None:
    paths = [write(tmp_path, name, text) for name, text in files.items()]
    with pytest.raises(ConfigError, match=message) as caught:
        load(GatewaySettings, paths)
    assert str(caught.value).startswith(f"{tmp_path / culprit}: ")


def test_a_bad_flag_names_no_file(tmp_path: Path) -> None:
    base = write(tmp_path, "base.yaml", "grpc_port: 50052\n")
    with pytest.raises(ConfigError, match=r"^grpc_port: expected int"):
        load(GatewaySettings, [base], {"grpc_port": "x"})


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing.yaml", r"cannot read configuration .*missing\.yaml"),
        ("empty-dir", r"empty-dir: no \*\.yaml or \*\.yml file"),
    ],
)
def test_a_missing_file_or_an_empty_directory_stops_the_load(tmp_path: Path, name: str, message: str) -> None:
    (tmp_path / "empty-dir").mkdir()
    base = write(tmp_path, "base.yaml", "grpc_port: 50052\n")
    with pytest.raises(ConfigError, match=message):
        load(GatewaySettings, [base, tmp_path / name])


def test_config_is_repeatable_on_every_component() -> None:
    parser = build_parser()
    for command in ("gateway", "sidecar", "controllers"):
        args = parser.parse_args([command, "--config", "/etc/brickyard/", "--config", "local.yaml"])
        assert args.config == ["/etc/brickyard/", "local.yaml"]


@pytest.mark.parametrize("contract", ["aibrix", "epp"])
def test_envoy_configs_reach_the_gateway_on_its_default_port(contract: str) -> None:
    """envoy/*.yaml name the gateway's port in YAML: it must stay the one brickyard_core.defaults states."""
    config = yaml.safe_load((REPO / "envoy" / f"{contract}.yaml").read_text())
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "brickyard_gateway"]
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"]["port_value"] == defaults.GRPC_PORT

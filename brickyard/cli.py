"""``brickyard``: one command line for every component.

brickyard up          the local stack: Redis, emulated engines, gateway, Envoy
brickyard gateway     the ext_proc gateway
brickyard emulator    one emulated vLLM engine
brickyard controllers the Kubernetes controllers (ModelAdapter, PodAutoscaler, model routes)
brickyard users       users and API keys, through the gateway's admin API
brickyard secrets     generated credentials of a cluster deployment (Redis password, sidecar token)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import uvloop

from brickyard import users_cli
from brickyard_core import logs, typed_config

T = TypeVar("T")


def _gateway(args: argparse.Namespace) -> None:
    from gateway_plugins.app import serve
    from gateway_plugins.config import GatewaySettings

    flags: dict[str, Any] = {
        "contract": args.contract,
        "listen_host": args.listen_host,
        "grpc_port": args.grpc_port,
        "health_port": args.health_port,
        "metrics_port": args.metrics_port,
        "default_strategy": args.default_strategy,
        "log_level": args.log_level,
        "discovery.endpoints_file": args.endpoints,
        "redis_url": args.redis_url,
    }
    if args.endpoints:
        flags["discovery.source"] = "static"
    if args.kubernetes:
        flags["discovery.source"] = "kubernetes"
        flags["discovery.namespace"] = args.namespace or None
    settings = _settings("gateway", GatewaySettings, args.config, flags)
    uvloop.run(serve(settings))


def _emulator(args: argparse.Namespace) -> None:
    from aiohttp import web

    from emulator.backend import Backend, InstantBackend
    from emulator.server import EmulatorApp

    logs.setup("emulator", args.log_level)
    uvloop.install()
    backend: Backend
    publisher = None
    if args.kv_events_config is not None:
        import zmq

        from emulator.kv_events import KVEventsConfig, KVEventsConfigError, create_publisher

        try:
            kv_events_config = KVEventsConfig.from_json(args.kv_events_config)
            if kv_events_config.enabled and args.profile == "instant":
                sys.exit(
                    "brickyard emulator: --kv-events-config needs an engine model, not --profile instant"
                )
            publisher = create_publisher(kv_events_config)
        except KVEventsConfigError as exc:
            sys.exit(f"brickyard emulator: {exc}")
        except zmq.ZMQError as exc:  # the endpoint is in use or cannot be bound
            sys.exit(f"brickyard emulator: cannot open the KV-event sockets: {exc}")
    if args.profile == "instant":
        backend = InstantBackend(
            ttft=args.ttft_ms / 1000, inter_token=args.itl_ms / 1000, max_loras=args.max_loras
        )
        max_model_len = args.max_model_len or 8192
    else:
        from emulator.engine import EngineCore
        from emulator.live import LiveEngine
        from emulator.profile import load_profile

        try:
            profile = load_profile(args.profile)
        except (OSError, ValueError) as exc:
            sys.exit(f"brickyard emulator: {exc}")
        core = EngineCore(
            profile,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len,
            max_loras=args.max_loras or None,
            num_blocks=args.num_blocks,
        )
        backend = LiveEngine(core, speed=args.speed, kv_events=publisher)
        max_model_len = core.max_model_len
    app = EmulatorApp(
        backend,
        model=args.model,
        pod_name=args.name,
        max_model_len=max_model_len,
        enable_lora=args.enable_lora,
        kv_events=publisher,
        prompt_tokens_details=args.enable_prompt_tokens_details,
    )
    web.run_app(app.build(), host=args.host, port=args.port, access_log=None, print=None)


def _sidecar(args: argparse.Namespace) -> None:
    from runtime_sidecar.app import serve
    from runtime_sidecar.config import SidecarSettings

    flags = {
        "engine_url": args.engine_url,
        "engine": args.engine,
        "pod": args.pod,
        "namespace": args.namespace,
        "model": args.model,
        "gpu_type": args.gpu_type,
        "redis_url": args.redis_url,
        "interval_seconds": args.interval,
        "listen_host": args.listen_host,
        "port": args.port,
        "adapter_dir": args.adapter_dir,
        "max_adapters": args.max_adapters,
        "api_token_file": args.api_token_file,
        "metrics_port": args.metrics_port,
        "artifacts.schemes": args.artifact_scheme,
        "artifacts.hosts": args.artifact_host,
        "artifacts.allow_private_networks": args.allow_private_networks or None,
        "artifacts.local_roots": args.adapter_root,
        "log_level": args.log_level,
    }
    settings = _settings("sidecar", SidecarSettings, args.config, flags, no_redis=args.no_redis)
    try:
        uvloop.run(_until_signal(serve(settings)))
    except typed_config.ConfigError as exc:
        sys.exit(f"brickyard sidecar: {exc}")


def _controllers(args: argparse.Namespace) -> None:
    from controllers.app import serve
    from controllers.config import ControllerSettings

    flags = {
        "namespace": args.namespace,
        "redis_url": args.redis_url,
        "controllers": args.controller,
        "resync_seconds": args.resync_seconds,
        "model_adapter.retry_base_seconds": args.retry_base_seconds,
        "model_routes.gateway_name": args.gateway_name,
        "log_level": args.log_level,
    }
    settings = _settings("controllers", ControllerSettings, args.config, flags, no_redis=args.no_redis)
    uvloop.run(_until_signal(serve(settings)))


def _secrets_ensure(args: argparse.Namespace) -> None:
    from brickyard_core.kube.client import ApiError
    from controllers.secrets import run

    try:
        uvloop.run(run(args.namespace, args.name, args.key, args.copy_to))
    except ApiError as exc:
        sys.exit(f"brickyard secrets ensure: {exc}")


def _settings(
    component: str, cls: type[T], paths: list[str] | None, flags: dict[str, Any], *, no_redis: bool = False
) -> T:
    """A component's settings: its YAML files in order (``--config``, repeatable), overridden by the flags
    given (unset flags keep the files' values; ``no_redis`` clears ``redis_url``); exits with the file and
    the setting's name on bad input; sets up logs."""
    overrides = {key: value for key, value in flags.items() if value is not None}
    if no_redis:
        overrides["redis_url"] = None
    try:
        settings = typed_config.load(cls, paths, overrides)
    except typed_config.ConfigError as exc:
        sys.exit(f"brickyard {component}: {exc}")
    logs.setup(component, settings.log_level)  # type: ignore[attr-defined]
    return settings


async def _until_signal(main: Awaitable[None]) -> None:
    """Run ``main`` until SIGTERM or SIGINT, then cancel it and let it clean up."""
    task = asyncio.ensure_future(main)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _up(args: argparse.Namespace) -> None:
    from brickyard.stack import run_stack

    logs.setup("stack", args.log_level)
    run_stack(
        engines=args.engines, port=args.port, contract=args.contract, model=args.model, profile=args.profile
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brickyard", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run: Callable[[argparse.Namespace], None], help_: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_, description=help_)
        sub.set_defaults(run=run)
        sub.add_argument(
            "--log-level", default=None if name in ("gateway", "sidecar", "controllers") else "info"
        )
        return sub

    def config_option(sub: argparse.ArgumentParser, reference: str) -> None:
        sub.add_argument(
            "--config",
            action="append",
            metavar="PATH",
            help="YAML settings file, or a directory of them (applied in name order); repeatable, each over "
            f"the ones before it, flags over all (see {reference})",
        )

    up = command("up", _up, "Run the local stack until Ctrl-C: Redis, engines, gateway, Envoy.")
    up.add_argument("--engines", type=int, default=3, help="emulated engines to start (default 3)")
    up.add_argument("--port", type=int, default=8888, help="Envoy listener port (default 8888)")
    up.add_argument("--contract", choices=["aibrix", "epp"], default="aibrix")
    up.add_argument("--model", default="llama-3.1-8b-instruct", help="model the engines serve")
    up.add_argument("--profile", default="llama-3.1-8b_h100", help="engine profile of the emulated engines")

    gw = command("gateway", _gateway, "Run the ext_proc gateway.")
    config_option(gw, "docs/configuration.md")
    gw.add_argument("--contract", choices=["aibrix", "epp"])
    gw.add_argument("--listen-host")
    gw.add_argument("--grpc-port", type=int)
    gw.add_argument("--health-port", type=int)
    gw.add_argument("--metrics-port", type=int)
    gw.add_argument("--default-strategy")
    gw.add_argument("--endpoints", help="static endpoints file (YAML); implies discovery.source=static")
    gw.add_argument("--redis-url", help="Redis with the sidecars' pod metrics (and the other gateways' load)")
    gw.add_argument(
        "--kubernetes", action="store_true", help="discover engine pods through the Kubernetes API"
    )
    gw.add_argument("--namespace", help="with --kubernetes: namespace to watch (default: all)")

    em = command("emulator", _emulator, "Run one emulated vLLM engine.")
    em.add_argument("--host", default="127.0.0.1")
    em.add_argument("--port", type=int, default=8000)
    em.add_argument("--model", default="llama-3.1-8b-instruct", help="model name served")
    em.add_argument(
        "--profile",
        default="llama-3.1-8b_h100",
        help="engine profile (emulator/profiles/NAME.yaml), or 'instant' for a zero-cost engine",
    )
    em.add_argument("--speed", type=float, default=1.0, help="virtual seconds per wall second")
    em.add_argument("--name", default="", help="pod name, echoed in the x-emulator-pod response header")
    em.add_argument("--enable-lora", action="store_true", help="accept runtime LoRA adapter loading")
    em.add_argument("--max-loras", type=int, default=0, help="adapters per batch (default: the profile's)")
    em.add_argument("--max-model-len", type=int, default=None)
    em.add_argument("--max-num-seqs", type=int, default=None)
    em.add_argument("--max-num-batched-tokens", type=int, default=None)
    em.add_argument(
        "--num-blocks", type=int, default=None, help="KV cache blocks (default: from the profile)"
    )
    em.add_argument("--ttft-ms", type=float, default=0.0, help="instant profile: time to first token")
    em.add_argument("--itl-ms", type=float, default=0.0, help="instant profile: time between output tokens")
    em.add_argument(
        "--kv-events-config",
        metavar="JSON",
        help="publish KV-cache events over ZMQ, as vLLM's option of the same name "
        """(e.g. '{"enable_kv_cache_events": true, "endpoint": "tcp://*:5557", "topic": "kv"}')""",
    )
    em.add_argument(
        "--enable-prompt-tokens-details",
        action="store_true",
        help="report usage.prompt_tokens_details.cached_tokens, as vLLM's option of the same name",
    )
    sc = command("sidecar", _sidecar, "Run the runtime sidecar beside one engine.")
    config_option(sc, "docs/configuration.md")
    sc.add_argument("--engine-url")
    sc.add_argument("--engine", choices=["auto", "vllm", "sglang"])
    sc.add_argument("--pod", help="pod name (default: $POD_NAME, else the host name)")
    sc.add_argument("--namespace", help="pod namespace (default: $POD_NAMESPACE, else default)")
    sc.add_argument("--model")
    sc.add_argument("--gpu-type")
    sc.add_argument("--redis-url")
    sc.add_argument("--no-redis", action="store_true", help="do not publish (local /metrics only)")
    sc.add_argument("--interval", type=float, help="seconds between scrapes (default 0.05)")
    sc.add_argument("--listen-host")
    sc.add_argument("--port", type=int)
    sc.add_argument("--adapter-dir")
    sc.add_argument("--max-adapters", type=int)
    sc.add_argument("--api-token-file", help="the adapter API's token (default: $BRICKYARD_SIDECAR_TOKEN)")
    sc.add_argument("--metrics-port", type=int, help="serve /metrics on this port instead of --port")
    sc.add_argument(
        "--artifact-scheme", action="append", help="URL scheme adapters may come from; repeatable"
    )
    sc.add_argument("--artifact-host", action="append", help="host adapters may come from; repeatable")
    sc.add_argument(
        "--allow-private-networks",
        action="store_true",
        help="fetch adapters from private, loopback and link-local addresses",
    )
    sc.add_argument(
        "--adapter-root", action="append", help="directory adapters may be loaded from in place; repeatable"
    )

    ctl = command("controllers", _controllers, "Run the Kubernetes controllers (docs/controllers.md).")
    config_option(ctl, "docs/controllers.md")
    ctl.add_argument("--namespace", help="namespace to watch and act in (default: all)")
    ctl.add_argument("--redis-url", help="Redis with the sidecars' pod-metrics records")
    ctl.add_argument("--no-redis", action="store_true", help="run without pod-metrics records")
    ctl.add_argument(
        "--controller",
        action="append",
        choices=["model-adapter", "pod-autoscaler", "model-routes"],
        help="a controller to run; repeatable (default: all)",
    )
    ctl.add_argument("--resync-seconds", type=float, help="level-triggered resync period (default 10)")
    ctl.add_argument(
        "--retry-base-seconds", type=float, help="ModelAdapter: first load retry delay (default 5)"
    )
    ctl.add_argument("--gateway-name", help="model routes: the Gateway every HTTPRoute attaches to")

    secrets_help = "The deployment's generated credentials (a Kubernetes Secret)."
    secrets = commands.add_parser("secrets", help=secrets_help, description=secrets_help)
    ensure_help = (
        "Create the Secret with a random value for each key it lacks (existing values are kept), then copy "
        "those keys into other namespaces. Prints what it did to each Secret, never a value."
    )
    ensure = secrets.add_subparsers(dest="action", required=True).add_parser(
        "ensure", help=ensure_help, description=ensure_help
    )
    ensure.set_defaults(run=_secrets_ensure)
    ensure.add_argument("--namespace", required=True, help="namespace of the Secret")
    ensure.add_argument("--name", default="brickyard-credentials", help="default: brickyard-credentials")
    ensure.add_argument("--key", action="append", required=True, help="a key of the Secret; repeatable")
    ensure.add_argument(
        "--copy-to", action="append", default=[], metavar="NAMESPACE", help="copy the keys there; repeatable"
    )

    users_cli.add_parser(commands)

    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)

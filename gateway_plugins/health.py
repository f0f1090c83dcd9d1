"""gRPC health checking (grpc.health.v1) on its own port, as Kubernetes probes and EPP expect.

Liveness stays SERVING while the process runs; readiness (and the ext_proc
service name) turn NOT_SERVING when the gateway starts draining, so that load
balancers stop sending new streams before the listener closes.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

LIVENESS = ("liveness",)
READINESS = ("", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor", "inference-extension")


class HealthServer:
    def __init__(self) -> None:
        self._servicer = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, self._server)
        bound = self._server.add_insecure_port(f"{host}:{port}")
        await self._server.start()
        for service in LIVENESS + READINESS:
            await self._servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        return bound

    async def set_ready(self, ready: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in READINESS:
            await self._servicer.set(service, status)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=0.5)

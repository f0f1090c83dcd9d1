"""The baseline the gateway is measured against: an ext_proc server written the obvious way.

grpc.aio servicer from the generated stubs, an async-generator handler,
``json.loads`` of the body, a random pod, ``target-pod`` set on the body reply
(AIBrix contract, BUFFERED body). It speaks the same contract as Brickyard's
gateway behind the same Envoy config, so the two can be compared one to one.

    python -m bench.overhead.obvious_extproc --port 9002 --endpoints endpoints.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
from collections.abc import AsyncIterator

import grpc
import yaml

from brickyard_core.api.envoy.config.core.v3 import base_pb2 as core
from brickyard_core.api.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from brickyard_core.api.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc


class ObviousProcessor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    async def Process(  # noqa: N802 (the gRPC method name)
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        async for request in request_iterator:
            if request.HasField("request_headers"):
                yield pb.ProcessingResponse(request_headers=pb.HeadersResponse())
            elif request.HasField("request_body"):
                body = json.loads(request.request_body.body)
                assert body["model"]
                pod = random.choice(self.addresses)
                header = core.HeaderValueOption(
                    header=core.HeaderValue(key="target-pod", raw_value=pod.encode())
                )
                mutation = pb.HeaderMutation(set_headers=[header])
                yield pb.ProcessingResponse(
                    request_body=pb.BodyResponse(response=pb.CommonResponse(header_mutation=mutation))
                )
            elif request.HasField("response_headers"):
                yield pb.ProcessingResponse(response_headers=pb.HeadersResponse())


async def serve(port: int, addresses: list[str]) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(ObviousProcessor(addresses), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--endpoints", required=True)
    args = parser.parse_args()
    with open(args.endpoints) as endpoints:
        addresses = [pod["address"] for pod in yaml.safe_load(endpoints)["pods"]]
    asyncio.run(serve(args.port, addresses))


if __name__ == "__main__":
    main()

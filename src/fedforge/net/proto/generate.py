"""Regenerate the checked-in protobuf and gRPC modules: ``python -m fedforge.net.proto.generate``.

Needs ``grpcio-tools`` (a development dependency only).
"""

from __future__ import annotations

from pathlib import Path


def main() -> None:
    from grpc_tools import protoc

    here = Path(__file__).resolve().parent
    src = here.parents[2]  # .../src
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{src}",
            f"--python_out={src}",
            f"--pyi_out={src}",
            f"--grpc_python_out={src}",
            str(here / "fedforge.proto"),
        ]
    )
    if code != 0:
        raise SystemExit(code)


if __name__ == "__main__":
    main()

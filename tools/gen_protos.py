#!/usr/bin/env python3
"""Regenerate the Python stubs of the daqif IDL.

    .venv/bin/python tools/gen_protos.py            # write src/daqif/v1/*_pb2*.py(i)
    .venv/bin/python tools/gen_protos.py --out DIR  # write them under DIR instead (the staleness test)

Uses grpcio-tools for messages (`.py` + `.pyi`) and services, and mypy-protobuf's
`protoc-gen-mypy_grpc` plugin for typed service stubs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
DEFAULT_OUT = ROOT / "src"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "daqif" / "v1").glob("*.proto"))


def mypy_grpc_plugin() -> str:
    """The `protoc-gen-mypy_grpc` script of the interpreter running this, else the one on PATH.

    pip installs console scripts beside `sys.executable` (`.venv/bin/`), which is not on PATH unless the
    venv is activated; look there first so `.venv/bin/python tools/gen_protos.py` works on a plain PATH.
    """
    beside = Path(sys.executable).parent / "protoc-gen-mypy_grpc"
    if beside.exists():
        return str(beside)
    found = shutil.which("protoc-gen-mypy_grpc")
    if found is None:
        raise SystemExit(
            f"protoc-gen-mypy_grpc not found beside {sys.executable} nor on PATH: pip install mypy-protobuf"
        )
    return found


def generate(out: Path) -> list[Path]:
    """Generate the stubs of every `.proto` under proto/daqif/v1 into `out`; return the files."""
    out.mkdir(parents=True, exist_ok=True)
    plugin = mypy_grpc_plugin()
    well_known = str(resources.files("grpc_tools") / "_proto")
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy_grpc={plugin}",
        f"--mypy_grpc_out={out}",
        *files,
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    pkg = out / "daqif" / "v1"
    return sorted(p for p in pkg.iterdir() if "_pb2" in p.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="root to write daqif/v1/ under")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

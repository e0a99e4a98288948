"""The `mcp` SDK's client half, loaded without its server half.

`import mcp` runs the package's `__init__`, which imports the SDK's servers too:
`mcp.server` with starlette, uvicorn, sse-starlette, cryptography, click and
python-multipart, ~19 MB of a Pi's memory that a client never uses (`mcp.client`'s
`__init__` pulls them in again through its in-memory test transport). So the two
packages are registered here without running their `__init__`s, and only the client
modules speakerd uses are imported; each still imports what it needs itself. Where
the SDK was already imported whole (tests, which run servers), it is used as it is.
"""

from __future__ import annotations

import importlib.util
import sys


def _packages_without_init(*names: str) -> None:
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError(f"{name} is not an installed package", name=name)
        sys.modules[name] = importlib.util.module_from_spec(spec)  # a namespace, not run


_packages_without_init("mcp", "mcp.client")

from mcp import types  # the wire types (mcp_types)
from mcp.client.session import ClientSession
from mcp.client.sse import sse_client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

__all__ = ["ClientSession", "StdioServerParameters", "create_mcp_http_client", "sse_client",
           "stdio_client", "streamable_http_client", "types"]

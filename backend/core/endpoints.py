"""Addresses of RPC workers as users write them (`HOST:PORT`, llama.cpp's comma-separated lists).

Pure parsing, here on the ground floor because the environment knob `LLAMACPP_GRPC_SERVERS` (read in
`constants`) is parsed with it, as are the `--rpc` options and the `rpc_servers` model option.
"""

from __future__ import annotations

import ipaddress

from .errors import InvalidRequestError


def parse_endpoint(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`[v6]:PORT` for IPv6) -> (host, port).

    Raises:
        InvalidRequestError: not HOST:PORT with a port in 1..65535.
    """
    host, sep, port = text.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidRequestError(f"RPC worker address {text!r} is not HOST:PORT")
    return host, int(port)


def parse_endpoints(text: str) -> tuple[str, ...]:
    """`"h1:p1,h2:p2"` -> normalised endpoints, in order, without duplicates (llama.cpp's list syntax)."""
    out: list[str] = []
    for item in text.split(","):
        if item.strip():
            host, port = parse_endpoint(item)
            endpoint = f"{host}:{port}"
            if endpoint not in out:
                out.append(endpoint)
    return tuple(out)


def is_loopback(host: str) -> bool:
    """True when `host` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

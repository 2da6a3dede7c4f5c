"""The one rule set for a TCP address tuner listens on (``tuner proxy --listen``, ``--prometheus``).

``HOST:PORT``; an IPv6 address in brackets (``[::1]:8100``: without them the port cannot be told apart);
``:PORT`` means 127.0.0.1.  The port is decimal ASCII digits.  The host must be loopback — a loopback
address or the name ``localhost`` — unless the user opted in with the command's public flag: what these
servers show (prompts' timings, process names, memory figures) is for this machine only by default.  Any
other name counts as public without a lookup: what it resolves to may change between this check and the
bind, and a lookup may hang on an unreachable DNS server.  Every refusal is one line naming the option
(``tuner.errors.UserError``).
"""

from __future__ import annotations

import ipaddress

from tuner.errors import UserError


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, or ``localhost``) is one only this machine can reach."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_v6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def parse_listen(
    text: str,
    public: bool,
    *,
    option: str,
    public_flag: str,
    public_means: str,
    port_zero: bool = False,
    example_port: int = 8100,
) -> tuple[str, int]:
    """``text`` -> ``(host, port)`` by the rules above.  ``port_zero``: port 0 (any free port, which the
    server then prints) is allowed.  ``public_means`` ends the refusal of a non-loopback host:
    "add ``public_flag`` to <public_means>"."""
    s = text.strip()
    if s.startswith("["):
        host, sep, rest = s[1:].partition("]")
        if not sep or not rest.startswith(":") or not _is_v6(host):
            raise UserError(f"{option} {text!r}: expected [IPV6]:PORT, e.g. [::1]:{example_port}")
        port_s = rest[1:]
    else:
        host, sep, port_s = s.rpartition(":")
        if not sep:
            raise UserError(f"{option} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:{example_port}")
        if ":" in host:
            raise UserError(f"{option} {text!r}: put an IPv6 address in brackets, e.g. [::1]:{example_port}")
    low = 0 if port_zero else 1
    if not (port_s.isascii() and port_s.isdigit()) or not low <= int(port_s) <= 65535:
        raise UserError(f"{option} {text!r}: port must be a number from {low} to 65535")
    host = host or "127.0.0.1"
    if not public and not is_loopback(host):
        raise UserError(f"{option} {text!r}: {host} is not a loopback address; add {public_flag} to {public_means}")
    return host, int(port_s)

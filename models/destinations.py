"""Where the server may send webhooks: no server-side request forgery into the internal network.

A destination is allowed when
- its host matches the operator's allowlist (GROVE_WEBHOOK_ALLOWED_HOSTS: names, "*.suffix" wildcards,
  IP addresses or CIDR networks), which may name internal hosts and is the only way to use plain http; or
- GROVE_WEBHOOK_ALLOW_PUBLIC is on, the URL is https, and every address the host resolves to is globally
  routable (no loopback, private, link-local such as 169.254.169.254, CGNAT, multicast or reserved).
  An IPv6 address that embeds an IPv4 one (IPv4-mapped, NAT64, 6to4, Teredo) is judged by that IPv4
  address too: 64:ff9b::7f00:1 is 127.0.0.1 through a translator.

The check runs at registration and again before every delivery, on the addresses actually connected to
(`resolve_destination` returns them, and the sender connects to that address, not to the name again), so
a DNS answer that changes between the check and the request cannot redirect a delivery.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from models.config import get_settings
from models.errors import InvalidRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UnsafeDestination(InvalidRequest):
    def __init__(self, message: str):
        super().__init__(message, param="url", code="invalid_url")


@dataclass(frozen=True)
class Destination:
    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent
    address: IPAddress  # the address to connect to

    def request_url(self) -> str:
        """The URL with the checked address in place of the host name (the Host header carries the name)."""
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{self.scheme}://{host}:{self.port}{self.path}"

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        name = f"[{self.host}]" if ":" in self.host else self.host
        return name if self.port == default else f"{name}:{self.port}"


def _allowlist() -> tuple[list[str], list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    names, networks = [], []
    for entry in (e.strip().lower() for e in get_settings().webhook_allowed_hosts.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
        except ValueError:
            names.append(entry)
    return names, networks


def _name_allowed(host: str, names: list[str]) -> bool:
    for pattern in names:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and host != pattern[2:]:
                return True
        elif host == pattern:
            return True
    return False


# NAT64's well-known prefix carries the IPv4 address in its last 32 bits, and so does the deprecated
# IPv4-compatible form (::a.b.c.d). A site's own translator (RFC 8215's local-use prefix) only ever leads
# inside that site.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses a translator or tunnel (6to4, Teredo, NAT64) would carry this address to."""
    if address.sixtofour is not None:
        return [address.sixtofour]
    if address.teredo is not None:
        return list(address.teredo)  # the Teredo server and the client behind it
    if address in _NAT64 or address in _IPV4_COMPATIBLE:
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    return []


def _is_public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return _is_public(address.ipv4_mapped)
        if address.sixtofour is not None:
            # The relay delivers to the embedded IPv4, which alone decides; 2002::/16 itself is judged
            # differently by Pythons before 3.11.4 (it was listed as private), so it must not decide.
            return _is_public(address.sixtofour)
        if address in _LOCAL_NAT64 or not all(_is_public(v4) for v4 in _embedded_ipv4(address)):
            return False
    return address.is_global and not address.is_multicast


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeDestination(f"Webhook host {host!r} does not resolve: {exc}.") from None
    # Strip an IPv6 zone ("fe80::1%eth0"): the address decides, not the interface.
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))


def resolve_destination(url: str) -> Destination:
    """Parse, resolve and check `url`; raise UnsafeDestination (a 400 naming `url`) if it is not allowed."""
    if len(url) > 2048:
        raise UnsafeDestination("Webhook URL is longer than 2048 characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeDestination(f"Webhook URL is not valid: {exc}.") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UnsafeDestination("Webhook URL must use https (or http for an allowlisted host).")
    if parts.username or parts.password:
        raise UnsafeDestination("Webhook URL must not carry credentials.")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise UnsafeDestination("Webhook URL has no host.")
    port = port or (443 if scheme == "https" else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    names, networks = _allowlist()
    addresses = _resolve(host, port)
    if not addresses:
        raise UnsafeDestination(f"Webhook host {host!r} does not resolve.")
    listed_by_name = _name_allowed(host, names)
    listed = listed_by_name or all(any(a in net for net in networks) for a in addresses)
    if not listed:
        if scheme != "https":
            raise UnsafeDestination("Webhook URL must use https; plain http is only allowed for allowlisted hosts.")
        if not get_settings().webhook_allow_public:
            raise UnsafeDestination(f"Webhook host {host!r} is not on the operator's allowlist.")
        private = [str(a) for a in addresses if not _is_public(a)]
        if private:
            raise UnsafeDestination(
                f"Webhook host {host!r} resolves to a non-public address ({private[0]}); "
                "an operator must allowlist internal destinations."
            )
    return Destination(scheme=scheme, host=host, port=port, path=path, address=addresses[0])

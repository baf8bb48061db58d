"""Issue 16, webhook destinations: an IPv6 address that carries a private IPv4 one through a translator or a
tunnel (NAT64, 6to4, Teredo, the IPv4-mapped and IPv4-compatible forms) is the private address, and refused.

The URLs are literal addresses, so no DNS answer is involved: the check alone decides.
"""

from __future__ import annotations

import pytest

from models.destinations import UnsafeDestination, resolve_destination
from models.webhook import WebhookEndpoint
from tests.security.conftest import assert_refused

REFUSED = [
    pytest.param("https://[64:ff9b::7f00:1]/hook", id="nat64-loopback"),
    pytest.param("https://[64:ff9b::a9fe:a9fe]/latest/meta-data", id="nat64-cloud-metadata"),
    pytest.param("https://[64:ff9b::a00:1]:8443/", id="nat64-10/8"),
    pytest.param("https://[64:ff9b::c0a8:101]/", id="nat64-192.168/16"),
    pytest.param("https://[64:ff9b:1::808:808]/", id="local-use-nat64"),
    pytest.param("https://[2002:7f00:1::1]/", id="6to4-loopback"),
    pytest.param("https://[2002:a9fe:a9fe::]/", id="6to4-cloud-metadata"),
    pytest.param("https://[2002:ac10:1::1]/", id="6to4-172.16/12"),
    pytest.param("https://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", id="teredo-client-loopback"),
    pytest.param("https://[2001:0:4136:e378:8000:63bf:f5ff:fffe]/", id="teredo-client-10/8"),
    pytest.param("https://[::ffff:127.0.0.1]/", id="ipv4-mapped-loopback"),
    pytest.param("https://[::127.0.0.1]/", id="ipv4-compatible-loopback"),
    pytest.param("https://[::a00:1]/", id="ipv4-compatible-10/8"),
]

ALLOWED = [
    pytest.param("https://[64:ff9b::808:808]/hook", id="nat64-public"),
    pytest.param("https://[2002:808:808::1]/hook", id="6to4-public"),
    pytest.param("https://[2001:4860:4860::8888]/hook", id="plain-public-ipv6"),
]


@pytest.mark.parametrize("url", REFUSED)
def test_an_embedded_private_ipv4_is_refused(url):
    with pytest.raises(UnsafeDestination) as caught:
        resolve_destination(url)
    assert caught.value.param == "url" and "non-public address" in caught.value.message


@pytest.mark.parametrize("url", ALLOWED)
def test_an_embedded_public_ipv4_is_allowed(url):
    assert resolve_destination(url).request_url().startswith("https://[")


@pytest.mark.parametrize("url", REFUSED)
def test_registering_or_moving_an_endpoint_there_gets_400_and_stores_nothing(tenant, url):
    before = tenant.count(WebhookEndpoint)
    body = {"name": "attack", "url": url, "event_types": ["fine_tuning.job.succeeded"]}
    assert_refused(tenant.post("/v1/webhook_endpoints", body), 400, "url")
    assert tenant.count(WebhookEndpoint) == before

    ok = tenant.post("/v1/webhook_endpoints", body | {"url": "https://[2001:4860:4860::8888]/hook"})
    assert ok.status_code == 200, ok.text
    endpoint = ok.json()["id"]
    assert_refused(tenant.post(f"/v1/webhook_endpoints/{endpoint}", {"url": url}), 400, "url")
    stored = tenant.client.get(f"/v1/webhook_endpoints/{endpoint}", headers=tenant.headers).json()
    assert stored["url"] == "https://[2001:4860:4860::8888]/hook"
    assert tenant.client.delete(f"/v1/webhook_endpoints/{endpoint}", headers=tenant.headers).status_code == 200

"""Issue 16, rate limits: they count the right thing, and are on by default.

Before, the limit was keyed on the presented bearer string, unverified, and off: a client that made up a new
key for each request was never limited. Now a valid key is counted per key (under its sha256); a request
without a valid key (none, unknown, revoked, malformed) per client address, X-Forwarded-For read only from
a trusted proxy; and failed authentications per address more tightly, past which they get 429 instead of 401
while valid keys from that address keep working (api/limits.py).

Each test speaks from an address of its own (TestClient's `client`), so the counters of one never reach another.
"""

from __future__ import annotations

import random
import uuid

import pytest

from api import limits
from models.config import Settings, get_settings
from models.project import generate_key
from tests.conftest import new_key
from tests.security.conftest import assert_refused


def _address() -> str:
    return f"198.18.{random.randrange(256)}.{random.randrange(1, 255)}"


@pytest.fixture
def caller(app):
    """A TestClient whose requests come from a fresh address, and a way to set the three rates."""
    from fastapi.testclient import TestClient

    with TestClient(app, client=(_address(), 50000)) as client:
        yield client


@pytest.fixture
def rates(monkeypatch):
    def set_rates(key="off", address="off", failures="off", proxies=""):
        settings = get_settings()
        monkeypatch.setattr(settings, "rate_limit", key)
        monkeypatch.setattr(settings, "address_rate_limit", address)
        monkeypatch.setattr(settings, "auth_failure_rate_limit", failures)
        monkeypatch.setattr(settings, "trusted_proxies", proxies)

    return set_rates


def _revoked_key() -> str:
    from api.services.keys import issue, revoke
    from models.db import session_scope
    from models.project import Project

    with session_scope() as session:
        project = Project(name=f"revoked-{uuid.uuid4().hex[:8]}")
        session.add(project)
        session.flush()
        row, key = issue(session, project)
        revoke(session, row.id)
    return key


# One row per way of calling without a valid key. Each attack sends three requests (all within the
# address's allowance of 3/minute), then a fourth that is refused; a valid key from the address still works.
ATTACKS = {
    "no key": lambda: {},
    "a new made-up key each time": lambda: {"Authorization": f"Bearer {generate_key()}"},
    "a revoked key": lambda: {"Authorization": f"Bearer {_revoked_key()}"},
    "a malformed key": lambda: {"Authorization": "Bearer ' OR 1=1 --"},
    "another scheme": lambda: {"Authorization": f"Basic {uuid.uuid4().hex}"},
}


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/files"), ("POST", "/v1/fine_tuning/jobs")])
def test_requests_without_a_valid_key_share_their_address_allowance(caller, rates, attack, method, path):
    rates(key="100/minute", address="3/minute")
    body = {"model": "tiny-llama-test", "training_file": "file-x"} if method == "POST" else None
    for _ in range(3):
        assert_refused(caller.request(method, path, headers=ATTACKS[attack](), json=body), 401, None)
    refused = caller.request(method, path, headers=ATTACKS[attack](), json=body)
    error = assert_refused(refused, 429, None)
    assert error["code"] == "rate_limit_exceeded" and "GROVE_ADDRESS_RATE_LIMIT" in error["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    # Nothing was stored, and a valid key from the same address is not held to the address's allowance.
    headers = {"Authorization": f"Bearer {new_key()}"}
    assert caller.get("/v1/fine_tuning/jobs", headers=headers).json()["data"] == []
    assert [caller.get("/v1/models", headers=headers).status_code for _ in range(5)] == [200] * 5


@pytest.mark.parametrize("attack", ["a new made-up key each time", "a revoked key", "a malformed key"])
def test_failed_authentication_is_throttled_and_valid_keys_keep_working(caller, rates, attack):
    rates(key="100/minute", address="100/minute", failures="2/minute")
    codes = [caller.get("/v1/files", headers=ATTACKS[attack]()).status_code for _ in range(2)]
    assert codes == [401, 401]
    refused = caller.get("/v1/files", headers=ATTACKS[attack]())
    error = assert_refused(refused, 429, None)
    assert "GROVE_AUTH_FAILURE_RATE_LIMIT" in error["message"] and int(refused.headers["retry-after"]) >= 1
    # A key this process has never seen, from the same address, is answered, as is an anonymous request.
    assert caller.get("/v1/files", headers={"Authorization": f"Bearer {new_key()}"}).status_code == 200
    assert caller.get("/v1/files").status_code == 401  # no key: not a failed attempt, the address allows it


def test_a_refused_upload_without_a_key_reads_no_body_and_closes(caller, rates):
    rates(address="1/minute")
    files = {"file": ("train.jsonl", b'{"text": "x", "label": "y"}\n' * 1000)}
    assert_refused(caller.post("/v1/files", files=files, data={"purpose": "fine-tune"}), 401, None)
    refused = caller.post("/v1/files", files=files, data={"purpose": "fine-tune"})
    assert_refused(refused, 429, None)
    assert refused.headers["connection"] == "close"


def test_a_valid_key_is_counted_per_key_not_per_address(caller, rates):
    rates(key="4/minute", address="1/minute")
    mine, other = ({"Authorization": f"Bearer {new_key()}"} for _ in range(2))
    assert [caller.get("/v1/models", headers=mine).status_code for _ in range(4)] == [200] * 4
    error = assert_refused(caller.get("/v1/models", headers=mine), 429, None)
    assert "GROVE_RATE_LIMIT" in error["message"] and "4/minute" in error["message"]
    assert caller.get("/v1/models", headers=other).status_code == 200  # its own allowance


def test_each_request_is_counted_once(caller, rates, monkeypatch):
    """The polling fast path costs one counter round trip; a failed attempt two (its address, its failure)."""
    rates(key="100/minute", address="100/minute", failures="100/minute")
    counted: list[str] = []
    original = limits._Limiter.retry_after

    async def spy(self, rate, identity):
        counted.append(identity.partition(":")[0])
        return await original(self, rate, identity)

    monkeypatch.setattr(limits._Limiter, "retry_after", spy)
    headers = {"Authorization": f"Bearer {new_key()}"}
    for _ in range(3):  # the first is counted as its answer starts, the others before their route runs
        assert caller.get("/v1/models", headers=headers).status_code == 200
    assert counted == ["key"] * 3
    counted.clear()
    caller.get("/v1/models")
    caller.get("/v1/models", headers={"Authorization": f"Bearer {generate_key()}"})
    assert counted == ["address", "address", "auth-failure"]


@pytest.mark.parametrize(
    ("peer", "forwarded", "proxies", "counted_as"),
    [
        ("203.0.113.9", None, "", "203.0.113.9"),
        ("203.0.113.9", "198.51.100.1", "", "203.0.113.9"),  # an untrusted peer's header is ignored
        ("10.0.0.2", "198.51.100.1", "10.0.0.0/8", "198.51.100.1"),
        ("10.0.0.2", "6.6.6.6, 198.51.100.1, 10.0.0.7", "10.0.0.0/8", "198.51.100.1"),  # forged hops left of it
        ("10.0.0.2", "not-an-address, 10.0.0.7", "10.0.0.0/8", "10.0.0.7"),
        ("10.0.0.2", None, "10.0.0.0/8", "10.0.0.2"),
        ("2001:db8:1:2:aaaa::1", None, "", "2001:db8:1:2::/64"),  # a host holds its whole /64
        ("::ffff:203.0.113.9", None, "", "203.0.113.9"),
        ("testclient", None, "", "testclient"),
    ],
)
def test_the_client_address(peer, forwarded, proxies, counted_as):
    headers = {b"x-forwarded-for": forwarded.encode()} if forwarded else {}
    assert limits.client_address({"client": (peer, 1)}, headers, proxies) == counted_as


def test_a_forged_forwarded_for_buys_no_fresh_allowance(caller, rates):
    rates(address="2/minute")
    for n in range(2):
        assert caller.get("/v1/files", headers={"X-Forwarded-For": f"198.51.100.{n}"}).status_code == 401
    assert_refused(caller.get("/v1/files", headers={"X-Forwarded-For": "198.51.100.99"}), 429, None)


def test_behind_a_trusted_proxy_each_client_has_its_own_allowance(app, rates):
    from fastapi.testclient import TestClient

    rates(address="2/minute", proxies="10.0.0.0/8")
    first, second = _address(), _address()
    with TestClient(app, client=("10.1.2.3", 50000)) as proxy:
        for _ in range(2):
            assert proxy.get("/v1/files", headers={"X-Forwarded-For": first}).status_code == 401
        assert_refused(proxy.get("/v1/files", headers={"X-Forwarded-For": first}), 429, None)
        assert proxy.get("/v1/files", headers={"X-Forwarded-For": second}).status_code == 401


def test_limits_are_on_by_default_and_can_be_turned_off(caller, rates):
    defaults = {name: Settings.model_fields[name].default for name in Settings.model_fields}
    assert defaults["rate_limit"] == "1200/minute"
    assert defaults["address_rate_limit"] == "600/minute"
    assert defaults["auth_failure_rate_limit"] == "120/minute"
    assert defaults["trusted_proxies"] == ""
    assert all(limits.configured(off) is None for off in (None, "", "off", "OFF", "none"))
    rates()  # all three off
    assert [caller.get("/v1/files").status_code for _ in range(5)] == [401] * 5

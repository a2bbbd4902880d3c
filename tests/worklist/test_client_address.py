"""Which client address an audit row records, with and without a trusted proxy in front."""

import ipaddress

import pytest
from django.test import RequestFactory

from worklist.services import client_address

PROXY = ipaddress.ip_network("10.0.0.0/24")


def _address(remote: str, forwarded: str | None = None) -> str | None:
    meta = {"REMOTE_ADDR": remote}
    if forwarded is not None:
        meta["HTTP_X_FORWARDED_FOR"] = forwarded
    return client_address(RequestFactory().get("/", **meta))


def test_without_a_trusted_proxy_the_forwarded_header_is_ignored(settings) -> None:
    settings.ICH_TRUSTED_PROXIES = ()
    assert _address("10.0.0.5", "192.0.2.7") == "10.0.0.5"


@pytest.mark.parametrize(
    ("remote", "forwarded", "recorded"),
    [
        ("10.0.0.5", "192.0.2.7", "192.0.2.7"),  # the proxy's client
        ("10.0.0.5", "198.51.100.1, 192.0.2.7", "192.0.2.7"),  # a forged left part is ignored
        ("10.0.0.5", "192.0.2.7, 10.0.0.9", "192.0.2.7"),  # two proxies of ours
        ("10.0.0.5", "", "10.0.0.5"),
        ("10.0.0.5", "not-an-address", "10.0.0.5"),
        ("203.0.113.4", "192.0.2.7", "203.0.113.4"),  # not from the proxy: header not believed
    ],
)
def test_behind_a_trusted_proxy_the_client_it_saw_is_recorded(
    settings, remote: str, forwarded: str, recorded: str
) -> None:
    settings.ICH_TRUSTED_PROXIES = (PROXY,)
    assert _address(remote, forwarded) == recorded


def test_a_bad_trusted_proxy_setting_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    from django.core.exceptions import ImproperlyConfigured

    from ichweb.settings import _trusted_proxies

    monkeypatch.setenv("ICH_TRUSTED_PROXIES", "10.0.0.0/24, proxy.example")
    with pytest.raises(ImproperlyConfigured, match=r"'proxy\.example' is not an IP address"):
        _trusted_proxies()
    monkeypatch.setenv("ICH_TRUSTED_PROXIES", "10.0.0.0/24, 2001:db8::1")
    assert [str(n) for n in _trusted_proxies()] == ["10.0.0.0/24", "2001:db8::1/128"]

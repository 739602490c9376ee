"""The Ray connection helper: an address is checked (form, then one TCP connection) before ``ray.init`` waits on it."""

from __future__ import annotations

import socket
import sys

import pytest

from strataprune.contract.errors import ConfigError
from strataprune.runtime.ray_cluster import check_address, import_ray


@pytest.mark.parametrize("address", ["nonsense", "host:", ":6379", "host:port", "host:0", "host:70000", "ray://"])
def test_malformed_addresses_name_the_allowed_forms(address):
    with pytest.raises(ConfigError, match="allowed: auto .*HOST:PORT.*ray://HOST:PORT") as caught:
        check_address(address)
    assert repr(address) in str(caught.value)


def test_an_address_where_nothing_listens_is_refused_at_once():
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(ConfigError, match="nothing answers there"):
            check_address(address, timeout=2)


def test_an_address_that_listens_passes_and_auto_is_left_to_ray():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        check_address(f"127.0.0.1:{server.getsockname()[1]}")
        check_address(f"ray://[127.0.0.1]:{server.getsockname()[1]}")
    check_address("auto")  # ray.init itself finds (or not) the cluster running here


def test_a_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed (ray.serve too: another test may have loaded it)
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    with pytest.raises(ConfigError, match=r"--executor ray needs ray: pip install 'strataprune\[ray\]'"):
        import_ray("--executor ray")
    with pytest.raises(ConfigError, match=r"pip install 'strataprune\[ray-serve\]'"):
        import_ray("`strataprune serve --ray`", "ray.serve", extra="ray-serve")

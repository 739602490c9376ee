"""Connecting to Ray: a cluster at ``--ray-address``, or a local instance started (and later stopped) by us.

    strataprune leaderboard grid.yaml --executor ray --ray-address auto
    strataprune serve DIR --ray --replicas 2 --ray-address 10.0.0.5:6379

Ray's own ``ray.init(address=...)`` waits a long time (and retries) when nothing answers at the address, so
an address is first checked with one TCP connection of a few seconds: a typo gives one error line at once.
"""

from __future__ import annotations

import socket
from typing import Any

from strataprune.contract.errors import ConfigError

ADDRESS_FORMS = "auto (the Ray cluster running on this machine), HOST:PORT of a Ray head node, or ray://HOST:PORT"


def import_ray(feature: str, module: str = "ray", extra: str = "ray") -> Any:
    """``import ray`` (or ``ray.serve``), or a ConfigError naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"{feature} needs {exc.name or module}: pip install 'strataprune[{extra}]'") from None


def check_address(address: str, timeout: float = 3.0) -> None:
    """Refuse an address that is not of a Ray form, or where nothing accepts a TCP connection."""
    if address == "auto":
        return
    rest = address.removeprefix("ray://")
    host, sep, port_text = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"--ray-address {address!r}; allowed: {ADDRESS_FORMS}")
    try:
        with socket.create_connection((host, int(port_text)), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"--ray-address {address!r}: nothing answers there ({reason}); allowed: {ADDRESS_FORMS}") from None


def connect_ray(address: str | None, init_options: dict[str, Any] | None = None, **local_options: Any) -> str:
    """Join the cluster at ``address``, or start a local Ray instance with ``local_options`` when it is None.

    Call ``import_ray`` first. ``init_options`` go to ``ray.init`` either way. Returns ``"started"`` (a local
    instance this process owns: ``ray.shutdown()`` stops it), ``"joined"`` (``ray.shutdown()`` only disconnects;
    the cluster keeps running) or ``"already"`` (Ray was initialised before: leave it to whoever did).
    """
    import ray

    if ray.is_initialized():
        return "already"
    options = {"include_dashboard": False, "log_to_driver": False, **(init_options or {})}
    if address is not None:
        check_address(address)
        try:
            ray.init(address=address, **options)
        except ConnectionError as exc:  # "auto" with no cluster running here, or a port that is not a Ray head
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"--ray-address {address!r}: {first}; allowed: {ADDRESS_FORMS}") from None
        return "joined"
    ray.init(address="local", **options, **local_options)  # "local": a new instance even when RAY_ADDRESS is set
    return "started"

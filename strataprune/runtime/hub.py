"""The host's hub check: the same fail-fast test dataset plugins get from ``strataprune.contract.hub``."""

from strataprune.contract.hub import HUB_HOST, hub_reachable, require_hub

__all__ = ["HUB_HOST", "hub_reachable", "require_hub"]

"""Fail fast and clearly when the Hugging Face hub is needed but unreachable (no 20 s retry loops).

The host checks before it downloads a model; a plugin (e.g. a hub dataset) before it downloads its data.
"""

from __future__ import annotations

import os
import socket
import threading
from functools import lru_cache

from strataprune.contract.errors import DataError

HUB_HOST = "huggingface.co"


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((os.environ.get("STRATAPRUNE_HUB_HOST", HUB_HOST), 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def require_hub(what: str, instead: str = "a local folder or a .gguf file (the embedded default: --model smollm2-135m)") -> None:
    if not hub_reachable():
        raise DataError(
            f"{what} must be downloaded from the Hugging Face hub, which is unreachable from this machine "
            f"(or HF_HUB_OFFLINE is set); pass {instead} instead"
        )

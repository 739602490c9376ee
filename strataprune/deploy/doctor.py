"""``strataprune doctor``: every registered backend, its version, and whether and why it cannot run here.

    strataprune doctor            # a table
    strataprune doctor --json

Never raises for a broken engine: a backend whose ``available()`` fails is reported with the error
as its reason (a missing engine is a line in this table, not a traceback).
"""

from __future__ import annotations

import platform
from typing import Any


def doctor() -> dict[str, Any]:
    import torch

    from strataprune.contract.backend import BACKEND_CONTRACT
    from strataprune.contract.registry import get_registry

    registry = get_registry()
    rows = []
    for name in registry.names("backend"):
        info = registry.info("backend", name)
        try:
            backend = info.cls()
            state = backend.available()
            ok, reason, version = state.ok, state.reason, state.version
        except Exception as exc:  # noqa: BLE001 - a third-party backend may fail in any way; report it
            ok, reason, version = False, f"available() failed: {type(exc).__name__}: {exc}", ""
        contract = getattr(info.cls, "contract", 1)
        if ok and contract != BACKEND_CONTRACT:
            ok, reason = False, f"implements Backend contract {contract}; this strataprune speaks {BACKEND_CONTRACT}"
        rows.append(
            {
                "backend": name,
                "available": ok,
                "version": version,
                "reason": reason,
                "provided_by": info.provided_by,
                "devices": list(getattr(info.cls, "devices", ())),
                "sparse_formats": list(getattr(info.cls, "sparse_formats", ())),
                "contract": contract,
            }
        )
    flags = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    machine = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "cpu_features": sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")),
    }
    return {"backends": rows, "machine": machine}


def format_doctor(report: dict[str, Any]) -> str:
    from strataprune.runtime.reports import table

    rows = [
        [
            r["backend"],
            "yes" if r["available"] else "no",
            r["version"] or "-",
            ",".join(r["sparse_formats"]) or "dense",
            r["provided_by"],
            r["reason"] or "-",
        ]
        for r in report["backends"]
    ]
    m = report["machine"]
    head = (
        f"python {m['python']}, torch {m['torch']}, CUDA {'yes' if m['cuda'] else 'no'}, CPU {' '.join(m['cpu_features']) or '-'}"
    )
    return head + "\n" + table(rows, ["backend", "runs here", "version", "exploits", "provided by", "why not / note"])

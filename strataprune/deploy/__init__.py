"""From a ``strataprune run`` folder to a running engine, with parity and an honest latency verdict.

    from strataprune.deploy import benchmark, deploy, doctor
    deploy("run/", "onnxruntime", "deployed/")                     # sparse checkpoint + model.onnx, parity-checked
    report = benchmark("run/")                                     # dense vs pruned on every engine, verdicts
    doctor()["backends"]                                           # what runs here, and why not

Modules: storage (sparse-bitmask checkpoints), onnx_export (KV-cache export), int4 (MatMulNBits
packing), parity, bench, deployment, doctor, rundir, engine_env (DeepSparse's venv). Engines are in
strataprune/backends/, one per file. Nothing heavy is imported here.
"""

from __future__ import annotations

from typing import Any


def deploy(*args: Any, **kwargs: Any) -> dict[str, Any]:
    from .deployment import deploy as _deploy

    return _deploy(*args, **kwargs)


def benchmark(*args: Any, **kwargs: Any) -> dict[str, Any]:
    from .bench import benchmark as _benchmark

    return _benchmark(*args, **kwargs)


def doctor() -> dict[str, Any]:
    from .doctor import doctor as _doctor

    return _doctor()


__all__ = ["benchmark", "deploy", "doctor"]

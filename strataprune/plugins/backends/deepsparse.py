"""DeepSparse backend: Neural Magic's sparse CPU engine, out of process in its own venv.

    strataprune backends install deepsparse          # once (Python <= 3.11, numpy < 2, onnx 1.14)
    strataprune bench RUN_DIR --backends onnxruntime,deepsparse

DeepSparse 1.8.0 skips the zeros of unstructured-sparse fp32 weights on AVX-512 CPUs. It reached end
of life on 2025-06-02, its licence allows evaluation only, and it cannot share strataprune's
environment, so it is never a dependency: ``strataprune backends install deepsparse`` builds a venv
in the cache (strataprune/deploy/engine_env.py) and this backend starts
strataprune/deploy/deepsparse_worker.py there and exchanges ``.onnx`` and ``.npz`` files with it.

Its input limits are handled by the export, not left to crash the worker: ONNX IR version <= 9
(the export's IR 10 is rewritten to 8); fixed input shapes with the batch first (the graphs are
exported with dynamic shapes and compiled with ``input_shapes``: a prefill graph without past inputs
for ``[batch, prompt_len]``, and a decode graph compiled once per past length it meets; a graph
exported with fixed shapes bakes them into constants and cannot be recompiled); no ``position_ids``
input (positions are computed inside the graph). Timing happens
inside the worker. Decode is timed at a fixed past length (the prompt length): a fixed-shape engine
has one compiled graph per past length; greedy parity compiles one per step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from strataprune.contract.backend import Backend, BackendAvailability, CompiledModel, DeploySettings
from strataprune.contract.errors import ConfigError, DataError

IR_VERSION = 8
WORKER = Path(__file__).resolve().parent.parent / "deploy" / "deepsparse_worker.py"


@dataclass
class DeepSparseConfig:
    keep_decode_engines: int = 1  # compiled decode graphs kept alive besides the one at the prompt length


class Worker:
    """The DeepSparse process: one JSON request per line, one answer per line."""

    def __init__(self, python: Path, folder: Path) -> None:
        self.folder = folder
        self.stderr = deque(maxlen=20)
        env = {**os.environ, "NM_DISABLE_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [str(python), "-I", str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(folder),
        )
        import threading

        threading.Thread(target=self._drain, daemon=True).start()
        self.counter = 0

    def _drain(self) -> None:
        for line in self.proc.stderr:  # type: ignore[union-attr]
            self.stderr.append(line.rstrip())

    def call(self, **request: Any) -> dict[str, Any]:
        if self.proc.poll() is not None:
            raise DataError(f"the deepsparse worker has exited (status {self.proc.returncode}): {self._last()}")
        self.proc.stdin.write(json.dumps(request) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            self.proc.wait()
            raise DataError(
                f"the deepsparse worker died during '{request.get('cmd')}' (status {self.proc.returncode}): {self._last()}"
            )
        answer = json.loads(line)
        if not answer.get("ok"):
            raise DataError(f"deepsparse {request.get('cmd')} failed: {answer.get('error')}")
        return answer

    def _last(self) -> str:
        lines = [line for line in self.stderr if line.strip()]
        return lines[-1] if lines else "(no output)"

    def arrays(self, arrays: list[np.ndarray]) -> str:
        self.counter += 1
        path = self.folder / f"io-{self.counter}.npz"
        np.savez(path, *arrays)
        return str(path)

    def run(self, key: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
        inputs = self.arrays(arrays)
        outputs = str(self.folder / f"out-{self.counter}.npz")
        self.call(cmd="run", key=key, inputs=inputs, outputs=outputs)
        with np.load(outputs) as data:
            result = [data[f"arr_{i}"] for i in range(len(data.files))]
        os.unlink(inputs)
        os.unlink(outputs)
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call(cmd="quit")
            except DataError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class DeepSparseModel(CompiledModel):
    """Prefill and decode graphs compiled in the worker; the state is (present arrays, past length)."""

    def __init__(
        self,
        worker: Worker,
        settings: DeploySettings,
        kv: tuple[int, int, int],
        paths: dict[str, Path],
        meta: dict[str, Any],
        keep: int,
    ) -> None:
        super().__init__("deepsparse", paths["prefill"], meta)
        self.worker, self.settings, self.paths, self.keep = worker, settings, paths, keep
        self.layers, self.kv_heads, self.head_dim = kv
        self.decode_keys: deque[str] = deque()

    def _check(self, ids: np.ndarray, length: int) -> None:
        if ids.shape != (self.settings.batch, length):
            raise ConfigError(f"deepsparse was compiled for input shape {(self.settings.batch, length)}, got {ids.shape}")

    def prefill(self, input_ids: Any) -> tuple[np.ndarray, Any]:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        self._check(ids, self.settings.prompt_len)
        out = self.worker.run("prefill", [ids])
        return out[0], (out[1:], ids.shape[1])

    def _decode_engine(self, past: int) -> str:
        key = f"decode{past}"
        if key not in self.decode_keys:
            b = self.settings.batch
            shapes = [[b, 1]] + [[b, self.kv_heads, past, self.head_dim]] * (2 * self.layers)
            self.worker.call(
                cmd="compile", key=key, path=str(self.paths["decode"]), batch=b, threads=self.settings.threads, shapes=shapes
            )
            self.decode_keys.append(key)
            while len(self.decode_keys) > self.keep + 1:  # free graphs of earlier steps (each holds the weights)
                old = self.decode_keys.popleft()
                if old == f"decode{self.settings.prompt_len}":
                    self.decode_keys.append(old)
                    continue
                self.worker.call(cmd="free", key=old)
        return key

    def decode(self, token_ids: Any, state: Any) -> tuple[np.ndarray, Any]:
        past, length = state
        ids = np.ascontiguousarray(token_ids, dtype=np.int64)
        self._check(ids, 1)
        out = self.worker.run(self._decode_engine(length), [ids, *past])
        return out[0], (out[1:], length + 1)

    def time_prefill(self, input_ids: Any, warmup: int, repeats: int) -> list[float]:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        self._check(ids, self.settings.prompt_len)
        return self.worker.call(cmd="time", key="prefill", inputs=self.worker.arrays([ids]), warmup=warmup, repeats=repeats)[
            "times"
        ]

    def time_decode(self, input_ids: Any, tokens: int, warmup: int, repeats: int) -> list[float]:
        """Per-token time of a decode step at past length = the prompt length (one compiled graph)."""
        logits, (past, length) = self.prefill(input_ids)
        token = logits[:, -1, :].argmax(-1).astype(np.int64)[:, None]
        key = self._decode_engine(length)
        inputs = self.worker.arrays([token, *past])
        times = self.worker.call(cmd="time", key=key, inputs=inputs, warmup=warmup, repeats=repeats * tokens)["times"]
        return [float(np.mean(times[i * tokens : (i + 1) * tokens])) for i in range(repeats)]

    def close(self) -> None:
        self.worker.close()


class DeepSparseBackend(Backend):
    name = "deepsparse"
    version = "2"
    summary = "DeepSparse 1.8 sparse CPU engine (AVX-512), out of process in its own venv; evaluation licence"
    Config = DeepSparseConfig
    devices = ("cpu",)
    sparse_formats = ("unstructured",)
    fixed_shapes = True

    def available(self) -> BackendAvailability:
        from strataprune.deploy.engine_env import ENVS

        env = ENVS["deepsparse"]
        if not env.installed():
            return BackendAvailability(
                False,
                "not installed: run `strataprune backends install deepsparse` (a venv with "
                "deepsparse==1.8.0, Python <= 3.11, evaluation-only licence)",
            )
        version = (env.folder / ".complete").read_text().strip()
        if sys.platform != "linux":
            return BackendAvailability(False, "DeepSparse runs on Linux only", version)
        flags = _cpu_flags()
        if flags and "avx512f" not in flags and "avx2" not in flags:
            return BackendAvailability(False, "DeepSparse needs an x86-64 CPU with AVX2 or AVX-512", version)
        note = "" if "avx512f" in flags else " (no AVX-512 here: sparse speedups need it)"
        return BackendAvailability(True, note.strip(), version)

    def prepare(self, model_dir: Path, workdir: Path, settings: DeploySettings) -> CompiledModel:
        from strataprune.deploy.engine_env import ENVS
        from strataprune.deploy.onnx_export import artifact_bytes, export_decoder
        from strataprune.deploy.rundir import load_causal_lm

        available = self.available()
        if not available.ok:
            raise ConfigError(f"backend deepsparse is not available here: {available.reason}")
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        model = load_causal_lm(model_dir)
        b, p = settings.batch, settings.prompt_len
        paths = {"prefill": workdir / "prefill.onnx", "decode": workdir / "decode.onnx"}
        # dynamic exports, fixed at compile time through input_shapes: a graph exported with fixed shapes bakes
        # them into Expand/Reshape constants and cannot be recompiled for another past length
        info = export_decoder(model, paths["prefill"], past=False, ir_version=IR_VERSION)
        export_decoder(model, paths["decode"], past=True, ir_version=IR_VERSION)
        del model
        worker = Worker(ENVS["deepsparse"].python, workdir)
        try:
            hello = worker.call(cmd="hello")
            compiled = worker.call(
                cmd="compile", key="prefill", path=str(paths["prefill"]), batch=b, threads=settings.threads, shapes=[[b, p]]
            )
        except BaseException:
            worker.close()
            raise
        meta = {
            "format": "onnx fp32 (IR 8, shapes fixed at compile)",
            "artifact_bytes": artifact_bytes(paths["prefill"]),
            "engine": hello.get("version"),
            "fraction_supported_ops": compiled.get("fraction_supported"),
            "compile_s": compiled.get("seconds"),
            "threads": settings.threads,
            "decode_timing": f"one decode step at a fixed past length of {p} tokens (fixed-shape engine)",
        }
        return DeepSparseModel(
            worker, settings, (info["layers"], info["kv_heads"], info["head_dim"]), paths, meta, self.config.keep_decode_engines
        )


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()

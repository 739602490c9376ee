"""The folder a server serves: a ``strataprune deploy`` output, a run folder or a saved model, on one backend.

``inspect_folder`` does the cheap checks before the server starts (a bad folder is an error line and
exit status 2); ``load_served_model`` prepares the model on the backend (the default is the backend
that ``deploy.json`` names, else ``torch``) into a scratch folder, opens the tokenizer and chooses
how the scheduler drives it (:mod:`strataprune.serve.runners`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from strataprune.contract.errors import ConfigError, DataError
from strataprune.contract.tokenizer import load_tokenizer


@dataclass
class FolderInfo:
    path: Path
    config: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)
    deploy: dict[str, Any] = field(default_factory=dict)

    @property
    def text_config(self) -> dict[str, Any]:
        return self.config.get("text_config", self.config)

    @property
    def context_length(self) -> int:
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            if isinstance(self.text_config.get(key), int):
                return int(self.text_config[key])
        return 2048

    def kv_bytes_per_token(self, element_bytes: int = 4) -> int:
        """Bytes of keys and values one position takes in every layer."""
        cfg = self.text_config
        layers = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0)
        heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or 1)
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or int(cfg.get("hidden_size") or cfg.get("n_embd") or 0) // heads)
        return 2 * layers * kv_heads * head_dim * element_bytes

    def facts(self) -> dict[str, Any]:
        sparsity = self.report.get("sparsity") or {}
        return {
            "sparsity_target": sparsity.get("target"),
            "realised_sparsity": sparsity.get("realised_prunable"),
            "source_model": ((self.report.get("recipe") or {}).get("model") or {}).get("source"),
            "deployed_backend": self.deploy.get("backend"),
        }


def _read_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"'{path}' is corrupt: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"'{path}' is corrupt: expected a JSON object")
    return data


def inspect_folder(path: str | Path) -> FolderInfo:
    """Check that ``path`` holds a causal LM with its tokenizer; read deploy.json/report.json when present."""
    from strataprune.deploy.rundir import weight_files

    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"DIR '{path}' is not a folder; pass the output folder of `strataprune deploy` or `strataprune run`")
    if not (folder / "config.json").is_file():
        raise DataError(f"'{path}' has no config.json: not a deploy output, run folder or saved model")
    weight_files(folder)  # DataError when the weights are missing
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise DataError(f"'{path}' has no tokenizer (tokenizer.json or tokenizer_config.json); the server needs one")
    info = FolderInfo(folder, _read_object(folder / "config.json"))
    if (folder / "report.json").is_file():
        info.report = _read_object(folder / "report.json")
    if (folder / "deploy.json").is_file():
        info.deploy = _read_object(folder / "deploy.json")
    return info


def choose_backend(info: FolderInfo, spec: str | None) -> Any:
    """The Backend instance for ``spec`` (default: deploy.json's backend, else torch), checked to run here."""
    from strataprune.deploy.bench import resolve_backends

    spec = spec or str(info.deploy.get("backend") or "torch")
    (backend,), _ = resolve_backends([spec])
    return backend


@dataclass
class ServedModel:
    info: FolderInfo
    model_id: str
    backend: str
    tokenizer: Any
    runner: Any
    eos_ids: set[int]
    vocab_size: int
    batching_note: str
    kv_bytes_per_token: int
    meta: dict[str, Any]
    context_limit: int | None = None  # an engine's own bound below the model's context (the native decoder's slots)

    @property
    def context_length(self) -> int:
        return min(self.info.context_length, self.context_limit or self.info.context_length)

    def close(self) -> None:
        self.runner.compiled.close()


def load_served_model(
    info: FolderInfo,
    backend: Any,
    workdir: Path,
    prefill_chunk: int,
    threads: int | None,
    model_id: str | None = None,
    max_running: int = 8,
) -> ServedModel:
    from transformers import GenerationConfig

    from strataprune.contract.backend import DeploySettings
    from strataprune.kernels.decoder import DEFAULT_MAX_CONTEXT
    from strataprune.serve.kvcache import layer_tensors  # noqa: F401 -- fail early if transformers lacks the cache API
    from strataprune.serve.runners import BatchedRunner, NativeRunner, SequentialRunner, can_batch

    tokenizer = load_tokenizer(info.path)
    settings = DeploySettings(batch=1, prompt_len=min(128, info.context_length // 2), new_tokens=32, threads=threads)
    compiled = backend.prepare(info.path, workdir, settings)
    layer_types = set(info.text_config.get("layer_types") or ["full_attention"])
    context_limit = None
    if compiled.meta.get("engine") == "native":  # sparse-cpu on a model the C++ decoder runs (engine=auto or native)
        context_limit = min(info.context_length, DEFAULT_MAX_CONTEXT)
        runner: Any = NativeRunner(compiled, max_running, context_limit, prefill_chunk)
        note = (
            f"continuous batching on the native C++ decoder ({max_running} KV-cache slots of {context_limit} positions; "
            "one decode call for all running sequences, chunked prefill)"
        )
    elif can_batch(compiled) and layer_types == {"full_attention"}:
        runner = BatchedRunner(compiled, prefill_chunk)
        note = "continuous batching (one batched decode forward for all running sequences, chunked prefill)"
    else:
        runner = SequentialRunner(compiled)
        why = (
            f"backend '{backend.label()}' runs a prepared engine through prefill/decode at batch 1"
            if not can_batch(compiled)
            else f"layer types {sorted(layer_types)} need a cache this server does not pad"
        )
        note = f"one sequence at a time: {why}"
    eos = set()
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    try:
        generation = GenerationConfig.from_pretrained(info.path)
        ids = generation.eos_token_id
        eos.update(int(i) for i in (ids if isinstance(ids, list) else [ids]) if i is not None)
    except OSError:
        pass
    dtype = str(compiled.meta.get("dtype") or "float32")
    element = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 4)
    return ServedModel(
        info=info,
        model_id=model_id or info.path.resolve().name,
        backend=backend.label(),
        tokenizer=tokenizer,
        runner=runner,
        eos_ids=eos,
        vocab_size=int(info.text_config.get("vocab_size") or len(tokenizer)),
        batching_note=note,
        kv_bytes_per_token=info.kv_bytes_per_token(element),
        meta={k: v for k, v in compiled.meta.items() if isinstance(v, (str, int, float, bool)) or v is None},
        context_limit=context_limit,
    )

"""``strataprune deploy``: a run folder -> a compressed sparse checkpoint + an engine artifact, parity-checked.

    from strataprune.deploy import deploy
    info = deploy("strataprune-runs/smollm2-135m-wanda-uniform-0.7", "onnxruntime", "deployed/")

The output folder (written atomically: a failure leaves nothing, and an earlier output intact):

- ``config.json`` + ``model.safetensors`` + ``strataprune.json``: the model in strataprune's checkpoint format
  (``strataprune-sparse``, strataprune/deploy/format.py, docs/format.md): pruned Linears as ``bitmask16-fp32``
  (the CPU kernels' layout, memory-mapped at load), the rest dense; checked to load back to exactly the run's
  weights. ``strataprune export`` turns it into a plain transformers checkpoint or a GGUF file;
- tokenizer files, ``report.json``, ``allocation.json``, ``recipe.yaml`` and (INT4 runs)
  ``quantization.json``/``quantization.safetensors`` copied from the run, so the output is itself a
  run folder that ``bench`` and ``deploy`` accept;
- ``<backend>/``: what the engine runs (``model.onnx`` ...), prepared from the compressed checkpoint;
- ``deploy.json``: backend and engine version, sizes and bytes per weight, parity figures, settings.

Parity is checked before anything is committed: the engine, fed from the compressed checkpoint, must
reproduce PyTorch on the run's original weights (real text windows, stated tolerance, greedy tokens;
``parity_steps`` >= 1, so a passed parity always compared something).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from strataprune.contract.backend import DeploySettings
from strataprune.contract.errors import ConfigError, PluginError
from strataprune.runtime.reports import atomic_output_dir, check_output_dir, write_json
from strataprune.runtime.run_folder import REPORT, RunFolder

from . import format as checkpoint
from .bench import resolve_backends
from .parity import check_parity, reference_backend, reference_outputs
from .rundir import load_causal_lm, open_run, text_windows, weight_files

#: run-folder files that the compressed checkpoint replaces (everything else is copied)
REPLACED = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    checkpoint.MANIFEST,
    checkpoint.LEGACY_SPARSE_CPU_MANIFEST,
    REPORT,
)


def deploy(
    run_dir: str | Path,
    backend: str,
    output: str | Path,
    *,
    overwrite: bool = False,
    settings: DeploySettings | None = None,
    parity_windows: int = 2,
    parity_steps: int = 8,
    text: str | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Write ``output`` (see the module docstring); returns what ``deploy.json`` holds."""
    say = log or (lambda message: None)
    from strataprune.engine.preflight import check_output_name, note_output_size

    if not isinstance(parity_steps, int) or isinstance(parity_steps, bool) or parity_steps < 1:
        # with none, nothing would be compared and "parity passed" would mean nothing
        raise ConfigError(f"--parity-steps {parity_steps} must be >= 1: parity compares the greedy tokens of both engines")
    check_output_name(output)
    run = open_run(run_dir)
    output = Path(output)
    run.check_causal_lm(f"backend '{backend}'")  # whatever the backend: every one deploys causal LMs
    (engine,), _ = resolve_backends([backend])  # the backend's spec and parameters, before anything is locked or loaded
    if text is not None:  # the parity text, before the model loads
        from strataprune.data.textfile import TextFile, looks_like_path

        if looks_like_path(text):
            TextFile(Path(text).expanduser())
    # the compressed checkpoint is at most the dense weights; the engine's artifact about as much again
    note_output_size(output, 2 * sum(f.stat().st_size for f in weight_files(run.path)))
    check_output_dir(output, overwrite, inputs={"the run": run.path, "the parity text (--text)": text})
    settings = settings or DeploySettings(prompt_len=min(128, run.context_length // 2), new_tokens=parity_steps)
    if settings.prompt_len < 1 or settings.prompt_len + parity_steps > run.context_length:
        raise ConfigError(
            f"--prompt-len {settings.prompt_len} + {parity_steps} parity steps must fit the model's context of "
            f"{run.context_length} tokens (and be >= 1)"
        )
    windows = text_windows(run, max(parity_windows, settings.batch), settings.prompt_len, text).numpy()
    with atomic_output_dir(output, overwrite) as tmp:
        say(f"writing the {checkpoint.FORMAT} checkpoint")
        model = load_causal_lm(run.path)
        manifest = checkpoint.write_folder(
            model, tmp, pack_linears=True, provenance={"command": "strataprune deploy", "run": str(run.path.resolve())}
        )
        sizes = {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, **manifest["sizes"]}
        _check_round_trip(model, tmp)
        del model
        for item in sorted(run.path.iterdir()):
            if item.is_file() and item.name not in REPLACED and not item.name.startswith("model-"):
                shutil.copy2(item, tmp / item.name)
        RunFolder(tmp).save_report(run.report)
        say(f"preparing {engine.label()}")
        compiled = engine.prepare(tmp, tmp / engine.name.replace(":", "-"), settings)
        try:
            reference = reference_backend(engine)
            if reference is None:
                parity: dict[str, Any] = {"reference": "itself (the checkpoint round trip is checked tensor by tensor)"}
            else:
                say(f"checking parity against {reference.label()}")
                ref_model = reference.prepare(run.path, tmp / ".reference", settings)
                try:
                    ref = reference_outputs(ref_model, windows, parity_steps, settings.batch)
                finally:
                    ref_model.close()
                shutil.rmtree(tmp / ".reference", ignore_errors=True)
                parity = {**check_parity(compiled, ref, engine.parity_tolerance, engine.label()), "reference": reference.label()}
            artifact_bytes = compiled.meta.get("artifact_bytes")
            meta = {k: v for k, v in compiled.meta.items() if k != "artifact_bytes"}
        finally:
            compiled.close()
        state = engine.available()
        info = {
            "format_version": 1,
            "run_dir": str(run.path.resolve()),
            "backend": engine.label(),
            "engine_version": state.version,
            "artifact": str(compiled.artifact.relative_to(tmp))
            if compiled.artifact and compiled.artifact.is_relative_to(tmp)
            else None,
            "artifact_bytes": artifact_bytes,
            "engine": meta,
            "storage": sizes,
            "original_weight_bytes": sum(f.stat().st_size for f in weight_files(run.path)),
            "parity": parity,
            "settings": {
                "batch": settings.batch,
                "prompt_len": settings.prompt_len,
                "new_tokens": settings.new_tokens,
                "threads": settings.threads,
            },
            "readers": f"strataprune ({checkpoint.FORMAT} version {checkpoint.VERSION}, docs/format.md); "
            "`strataprune export --to hf|gguf` for transformers and llama.cpp",
        }
        write_json(tmp / "deploy.json", info)
    return info


def _check_round_trip(model: torch.nn.Module, folder: Path) -> None:
    """The written checkpoint must hold exactly the model's tensors (tied copies aside)."""
    state = checkpoint.read_state_dict(folder)
    for name, tensor in model.state_dict().items():
        if name not in state:
            if name.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False):
                continue
            raise PluginError(f"sparse checkpoint lacks '{name}'")
        if not torch.equal(state[name], tensor.detach().cpu()):
            raise PluginError(f"sparse checkpoint: '{name}' does not load back to the same values")

"""Models the speed benchmarks build for themselves (deploy.py, cpu_bar.py): the random ~1B Llama, pruned runs.

The ~1B Llama stands in where no 1B checkpoint can be downloaded.

TinyLlama-1.1B's decoder shapes (22 layers, hidden 2048, MLP 5632, 32 heads, 4 KV heads) with SmolLM2's vocabulary
and tokenizer (49152, tied embeddings), so the BBC text and SmolLM2's tokenizer serve as inputs: 1.07B parameters,
4.3 GB fp32, random N(0, 0.02) weights with a fixed seed, saved once as a local model folder. Latency depends on the
shapes and the zero pattern, not on the values, so these weights time a real 1B model; its perplexity and outputs are
meaningless and no benchmark reports them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

#: TinyLlama-1.1B's decoder shapes with SmolLM2's vocabulary (so its tokenizer and the BBC text serve as inputs)
LLAMA_1B = dict(
    model_type="llama",
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=49152,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
)


def ensure_llama1b(out: Path, shapes: dict | None = None) -> Path:
    """The dense random Llama (``shapes``, default ``LLAMA_1B``) as a model folder ``out`` (config, safetensors,
    SmolLM2's tokenizer), built once: an existing ``out/model.safetensors`` is reused, a half-written build never is."""
    out = Path(out)
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from strataprune.models.loading import resolve_model

    params = dict(shapes or LLAMA_1B)
    print(f"[llama1b] building a random {params['num_hidden_layers']}-layer Llama in {out}", file=sys.stderr, flush=True)
    config = AutoConfig.for_model(params.pop("model_type"), **params)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    smollm2, _ = resolve_model("smollm2-135m")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    del model
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(tmp)
    tmp.rename(out)
    return out


def prune_run(model: str | Path, out: Path, recipe: list[str], nsamples: int = 8, tag: str = "bench") -> Path:
    """``strataprune run`` of ``model`` with ``recipe`` (pruner, sparsity, ...) into ``out``, reused when its report.json
    exists. Latency depends on the sparsity pattern, not on how well the weights were chosen: a small calibration
    (``nsamples`` x 128 tokens) and a one-window evaluation keep it cheap; the dense model is not evaluated."""
    from strataprune.runtime.run_folder import REPORT

    out = Path(out)
    if (out / REPORT).is_file():
        return out
    cmd = [sys.executable, "-m", "strataprune", "run", "--model", str(model), "--nsamples", str(nsamples), *recipe]
    cmd += ["--seqlen", "128", "--eval-seqlen", "256", "--eval-windows", "1", "--output", str(out), "--overwrite", "--quiet"]
    cmd += ["--set", "evaluation.dense=false"]
    print(f"[{tag}] pruning: {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "STRATAPRUNE_PROGRESS": "0"})
    if done.returncode:
        raise SystemExit(f"pruning {out.name} failed:\n{done.stderr[-2000:]}")
    return out

"""Dense exports of a pruned model for other tools (``strataprune export``): a plain transformers checkpoint, or a
GGUF file for llama.cpp (f32, f16, Q8_0, Q4_0).

    from strataprune.deploy.export import export
    export("deployed/", "hf", "smollm2-70-hf/")                       # AutoModelForCausalLM.from_pretrained, no strataprune
    export("deployed/", "gguf", "smollm2-70-gguf/", gguf_type="q4_0")  # smollm2-70-gguf/model-q4_0.gguf for llama.cpp

The source is any folder strataprune writes a model into: a run folder (dense safetensors), a ``deploy`` output
(``strataprune-sparse``), an older ``sparse-bitmask`` deploy output, or a sparse-cpu prepared folder (fp32, int8 or
int4 values: exported as the weights the codes stand for). The weights are exported dense, zeros included: neither
format has a sparse layout these tools read, so the export is about portability, not size (Q4_0 is ~0.14 of fp32).

GGUF follows llama.cpp's ``llama`` architecture: its tensor names, its metadata keys, and the row order it expects
for the query and key projections (each head's rotary pairs interleaved, the inverse of the order transformers
uses), a GPT-2 byte-level BPE vocabulary taken from the model's tokenizer. Other architectures are refused.
Q8_0: blocks of 32 weights, an fp16 scale ``max|x| / 127`` and 32 int8 values; Q4_0: blocks of 32, an fp16 scale
``d = m / -8`` where ``m`` is the block's value of largest magnitude (sign kept) and 32 4-bit ``q = min(15,
floor(x / d + 8.5))`` (weight ``j`` in the low nibble of byte ``j``, weight ``j + 16`` in its high nibble). Both keep
a zero weight exactly zero. A matrix whose rows are not a multiple of 32 wide is written as f16 instead.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from strataprune.contract.errors import ConfigError, DataError
from strataprune.contract.tokenizer import load_tokenizer
from strataprune.runtime.reports import atomic_output_dir, check_output_dir, write_json

TARGETS = ("hf", "gguf")
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
GGUF_ARCHITECTURES = ("llama",)  #: model_type values the GGUF export writes
#: tokenizer and generation files copied beside the exported weights
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)
QUANT_BLOCK = 32


def export(
    source: str | Path,
    to: str,
    output: str | Path,
    *,
    gguf_type: str = "f16",
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write ``output`` (see the module docstring); returns what ``export.json`` in it holds."""
    from strataprune.engine.preflight import check_output_name

    say = log or (lambda message: None)
    if to not in TARGETS:
        raise ConfigError(f"--to {to!r}; allowed: {', '.join(TARGETS)}")
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"--gguf-type {gguf_type!r}; allowed: {', '.join(GGUF_TYPES)}")
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"'{source}' is not a folder (a run folder, a deploy output or a sparse-cpu folder)")
    if not (source / "config.json").is_file():
        raise DataError(f"'{source}' has no config.json: not a saved model")
    config = _read_config(source)
    if to == "gguf":
        check_gguf_architecture(config)
    check_output_name(output)
    check_output_dir(output, overwrite, inputs={"the source": source})
    with atomic_output_dir(output, overwrite) as tmp:
        from .rundir import load_causal_lm

        say(f"loading {source}")
        model = load_causal_lm(source)
        sparsity = _linear_sparsity(model)
        info: dict[str, Any] = {
            "format_version": 1,
            "source": str(source.resolve()),
            "to": to,
            "linear_sparsity": sparsity,
        }
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        if to == "hf":
            say("writing the transformers checkpoint")
            model.config.use_cache = True
            model.save_pretrained(tmp, safe_serialization=True)
            saved = json.loads((tmp / "config.json").read_text())
            if "quantization_config" in saved:  # the export is plain: nothing for a reader to decompress
                saved.pop("quantization_config")
                (tmp / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
            info["files"] = sorted(p.name for p in tmp.iterdir())
            info["load_with"] = f"AutoModelForCausalLM.from_pretrained('{output}')"
        else:
            name = f"model-{gguf_type}.gguf"
            say(f"writing {name}")
            try:
                tokenizer = load_tokenizer(source)
            except (OSError, ValueError) as exc:
                raise DataError(f"'{source}': no usable tokenizer for the GGUF vocabulary: {str(exc).splitlines()[0]}") from None
            info["gguf"] = write_gguf(model, tokenizer, tmp / name, gguf_type)
            info["file"] = name
            info["load_with"] = f"llama.cpp: llama-cli -m {output}/{name}; transformers: gguf_file='{name}'"
        write_json(tmp / "export.json", info)
    return info


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"'{folder / 'config.json'}' is corrupt: {exc}") from None
    if not isinstance(config, dict):
        raise DataError(f"'{folder / 'config.json'}' is corrupt: expected a JSON object")
    return config


def check_gguf_architecture(config: dict[str, Any]) -> None:
    """ConfigError unless the GGUF export can write this model exactly (llama.cpp's ``llama`` architecture)."""
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCHITECTURES:
        raise ConfigError(
            f"--to gguf writes Llama-architecture models (model_type {', '.join(GGUF_ARCHITECTURES)}: Llama, SmolLM2, ...); "
            f"this model is {model_type!r} ({', '.join(config.get('architectures') or ['?'])}); use --to hf"
        )
    scaling = config.get("rope_scaling")
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        raise ConfigError(f"--to gguf: rope_scaling {scaling} is not written by this export (plain RoPE only); use --to hf")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ConfigError(f"--to gguf: {flag}=true is not written by this export (Llama without biases); use --to hf")


def _linear_sparsity(model: torch.nn.Module) -> float:
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return round(zeros / total, 6) if total else 0.0


# --------------------------------------------------------------------------- GGUF
def rope_interleave(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a query/key projection in llama.cpp's order: transformers keeps each head's rotary halves apart
    (rows ``i`` and ``i + d/2`` form a pair); llama.cpp rotates adjacent rows (``2i``, ``2i + 1``)."""
    rows = weight.shape[0]
    head_dim = rows // heads
    return weight.reshape(heads, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensor_names(layers: int) -> dict[str, str]:
    """transformers Llama parameter name -> llama.cpp tensor name."""
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
    }
    for i in range(layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{gg}"
    return names


def write_gguf(model: torch.nn.Module, tokenizer: Any, path: Path, gguf_type: str) -> dict[str, Any]:
    """Write a Llama model as one GGUF file; returns a summary (tensor types, fallbacks, bytes)."""
    import gguf

    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    names = gguf_tensor_names(config.num_hidden_layers)
    qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
    }[gguf_type]
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[gguf_type]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(str(getattr(config, "_name_or_path", "") or "strataprune export"))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(kv_heads))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(int(file_type))
    _add_vocabulary(writer, tokenizer, config)
    types: dict[str, int] = {}
    fallbacks: list[str] = []
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = model.state_dict()
    unknown = [k for k in state if k not in names and not k.endswith("rotary_emb.inv_freq")]
    if unknown:
        raise ConfigError(f"--to gguf: this Llama model has tensors the llama architecture lacks: {', '.join(unknown[:4])}")
    for hf_name, tensor in state.items():
        if hf_name not in names or (hf_name == "lm_head.weight" and tied):
            continue  # tied: llama.cpp uses token_embd for the output when output.weight is absent
        data = tensor.detach().to(torch.float32).numpy()
        if hf_name.endswith("q_proj.weight"):
            data = rope_interleave(data, heads)
        elif hf_name.endswith("k_proj.weight"):
            data = rope_interleave(data, kv_heads)
        data = np.ascontiguousarray(data)
        want = qtype if data.ndim == 2 else gguf.GGMLQuantizationType.F32  # norms stay f32, as llama.cpp expects
        if want in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0) and data.shape[-1] % QUANT_BLOCK:
            want = gguf.GGMLQuantizationType.F16
            fallbacks.append(names[hf_name])
        if want == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(names[hf_name], data)
        elif want == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(names[hf_name], data.astype(np.float16))
        else:
            writer.add_tensor(names[hf_name], gguf.quants.quantize(data, want), raw_dtype=want)
        types[want.name] = types.get(want.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "type": gguf_type,
        "architecture": "llama",
        "tensor_types": types,
        "f16_fallbacks": fallbacks,
        "bytes": path.stat().st_size,
        "gguf_version": _gguf_version(),
    }


def _gguf_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _add_vocabulary(writer: Any, tokenizer: Any, config: Any) -> None:
    """GPT-2 byte-level BPE vocabulary (tokens by id, their types, merges, special ids) from a fast tokenizer."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError("--to gguf needs a fast (tokenizer.json) byte-level BPE tokenizer; this model has a slow one")
    spec = json.loads(backend.to_str())
    model_spec = spec.get("model") or {}
    if model_spec.get("type") != "BPE":
        raise DataError(f"--to gguf writes byte-level BPE vocabularies; this tokenizer is {model_spec.get('type')!r}")
    vocab = tokenizer.get_vocab()
    size = max(int(config.vocab_size), max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    for token, index in vocab.items():
        tokens[index] = token
    special = {int(index) for index in tokenizer.all_special_ids}
    added = {int(t["id"]): bool(t.get("special")) for t in spec.get("added_tokens") or []}
    types = []
    for index, token in enumerate(tokens):
        if index in special or added.get(index):
            types.append(gguf.TokenType.CONTROL)
        elif index in added:
            types.append(gguf.TokenType.USER_DEFINED)
        elif token.startswith("[PAD") and token not in vocab:
            types.append(gguf.TokenType.UNUSED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model_spec.get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, value in (
        (writer.add_bos_token_id, tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if isinstance(value, int):
            setter(value)
    probe = tokenizer("a")["input_ids"]  # what the tokenizer does, whatever its config says: llama.cpp must do the same
    writer.add_add_bos_token(bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)


def _pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer: SmolLM's (single digits, then GPT-2's byte-level split), GPT-2's, else
    llama.cpp's default."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts or []]
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    return "default"

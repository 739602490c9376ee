"""A native decoder engine: the whole forward pass of a Llama-family model in C++ (csrc/decoder.cpp), with slots.

The eager ``sparse-cpu`` path runs a transformers model whose Linears are :class:`SparseLinear` /
:class:`QuantizedSparseLinear`: every decode step is ~200 PyTorch module calls plus the attention glue, ~10 us each.
:class:`NativeDecoder` takes the same loaded model and runs embedding, RMSNorm, RoPE, grouped-query attention over a
KV cache held in C++, the SiLU-gated MLP and the lm_head in one library call per step, on the same kernels (fp32
bitmask, int8/int4 bitmask, dense fp32 for Linears left dense) and on the model's own buffers (no copies).

    from strataprune.plugins.backends.sparse_cpu import load_packed_model
    from strataprune.kernels.decoder import NativeDecoder
    model = load_packed_model("deployed/sparse-cpu")
    engine = NativeDecoder(model, max_slots=4, max_context=1024)      # lm_head="int8": a 4x smaller head
    last = engine.prefill(0, prompt_ids)             # logits of the prompt's last token, [vocab]
    logits = engine.decode([0, 2], [token_a, token_b])   # one step for slots 0 and 2: [2, vocab]
    engine.reset(0)
    engine.generate(prompt_ids, max_new_tokens=32)   # greedy, on slot 0

Slots: each of ``max_slots`` sequences has its own fp32 KV cache of ``max_context`` positions
(``kv_bytes`` in all, allocated when a slot is first used). ``decode`` runs one step for several slots at once:
every Linear is one multi-token GEMV, so the weights stream from memory once per step whatever the batch.

Supported: ``LlamaForCausalLM`` (SmolLM2, TinyLlama, Llama 2/3 ...) with SiLU MLP, RoPE types default, linear
and llama3 (static frequencies, taken from the model), any GQA ratio, optional attention/MLP biases. Anything
else is a ``ConfigError`` naming the architecture; the eager path stays available for it.

Not thread-safe across calls from several Python threads at once: a lock serialises them. Threads and kernel
paths follow ``strataprune.kernels.set_num_threads`` / ``use_isa`` / ``use_quantized_isa`` at each call.

Threads: with 2 or more, a decode step or a prefill chunk runs on the engine's own worker threads, woken once per step
(1 thread calls the kernels in order): the step is a list of phases (per layer q/k/v, attention, o, gate/up, down;
then the head), each cut into blocks that the threads claim, and a thread waits only where the next phase needs all
of this one. A waiting thread sleeps until woken, after a spin of up to 50 us only while its recent waits were
short (the others are running; under load it sleeps at once, so that it neither burns CPU time nor delays the
neighbours or its own team; docs/kernels.md); ``set_spin_us`` or ``STRATAPRUNE_KERNELS_SPIN_US`` fix the spin,
``wait_stats`` counts what the waits did.
The result does not depend on the thread count. (One
OpenMP region per kernel call, ``thread_team=False``, spins at its barriers and collapses under load: docs/kernels.md.)
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence
from typing import Any

import torch

from strataprune.contract.errors import ConfigError

from ._library import KernelInputError, get_num_threads, isa_index, library

#: model classes the native engine runs (anything else: the eager path)
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
#: RoPE variants with position-independent frequencies (what the engine implements)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
LM_HEADS = ("fp32", "int8")
DEFAULT_MAX_CONTEXT = 2048
DEFAULT_MAX_KV_BYTES = 8 << 30
#: overrides the team threads' spin before sleeping (microseconds, or ``auto``), read when the library is first bound
SPIN_ENV = "STRATAPRUNE_KERNELS_SPIN_US"
_STATUS = {
    -1: "the CPU or this build lacks the instruction set",
    -2: "a bad size",
    -3: "out of memory (KV cache or scratch)",
    -5: "bad quantization group size",
    -6: "slot out of range",
    -7: "context overflow",
    -8: "token id out of range",
    -9: "the engine is missing weights",
    -10: "a slot appears twice in one decode step",
}
_LINEARS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
            ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))  # fmt: skip
_bound: dict[str, bool] = {}


def _lib() -> ctypes.CDLL:
    lib = library()
    if not _bound:
        i64, i32, ptr, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
        lib.sd_create.argtypes = [i64, i64, i64, i64, i64, i64, i64, f32, ptr, f32, i64, i64, i64]
        lib.sd_create.restype = ptr
        lib.sd_destroy.argtypes = [ptr]
        lib.sd_destroy.restype = None
        lib.sd_kv_bytes_per_slot.argtypes = [ptr]
        lib.sd_kv_bytes_per_slot.restype = i64
        lib.sd_set_embedding.argtypes = [ptr, ptr]
        lib.sd_set_norm.argtypes = [ptr, i64, i32, ptr]
        lib.sd_set_linear.argtypes = [ptr, i64, i32, i32, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, i32, i64]
        lib.sd_check.argtypes = [ptr]
        lib.sd_length.argtypes = [ptr, i64]
        lib.sd_length.restype = i64
        lib.sd_reset.argtypes = [ptr, i64]
        lib.sd_release.argtypes = [ptr, i64]
        lib.sd_prefill.argtypes = [ptr, i64, ptr, i64, ptr, i32, i32, i32, i32]
        lib.sd_decode.argtypes = [ptr, ptr, ptr, i64, ptr, i32, i32, i32]
        lib.sd_set_team.argtypes = [ptr, i32]
        lib.sd_block_linears.argtypes = [ptr]
        lib.sd_block_linears.restype = i64
        lib.sd_set_spin_us.argtypes = [i32]
        lib.sd_get_spin_us.argtypes = []
        lib.sd_wait_stats.argtypes = [ptr, i32, i32]
        lib.sd_set_test_phase_delay_us.argtypes = [i32]
        for name in ("sd_set_embedding", "sd_set_norm", "sd_set_linear", "sd_check", "sd_reset", "sd_release",
                     "sd_prefill", "sd_decode", "sd_set_team", "sd_set_spin_us", "sd_get_spin_us", "sd_wait_stats",
                     "sd_set_test_phase_delay_us"):  # fmt: skip
            getattr(lib, name).restype = i32
        spin = os.environ.get(SPIN_ENV)
        if spin is not None:  # checked before the library counts as bound, so a bad value is refused on every call
            set_spin_us(_spin_value(spin, SPIN_ENV, text=True), lib)
        _bound["ok"] = True
    return lib


ADAPTIVE = "auto"  #: the spin setting that adapts to each thread's recent waits
_ADAPTIVE_CODE = -2  # sd_set_spin_us's code for it


def _spin_value(value: Any, label: str, text: bool = False) -> int | str:
    """``value`` as microseconds in [0, 1000000] (an int from Python, a decimal string from the environment) or
    ``"auto"``."""
    number = -1
    if isinstance(value, str) and value.strip() == ADAPTIVE:
        return ADAPTIVE
    if text and isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        number = int(value.strip())
    elif not text and isinstance(value, int) and not isinstance(value, bool):
        number = value
    if not 0 <= number <= 1_000_000:
        raise KernelInputError(f"{label}={value!r}; allowed: an integer from 0 to 1000000 (microseconds) or 'auto'")
    return number


def _spin_in_force(code: int) -> int | str:
    return ADAPTIVE if code == _ADAPTIVE_CODE else code


def set_spin_us(microseconds: int | str | None, lib: ctypes.CDLL | None = None) -> int | str:
    """How long (microseconds) a decode thread spins on an unfinished phase (or, between steps, for the next step)
    before it sleeps until woken: ``"auto"`` (the default, which ``None`` restores): each thread spins up to 50 us
    while its recent phase waits were shorter than that and sleeps at once while they were longer; an integer fixes
    the spin (0: sleep at once; docs/kernels.md). Applies to every engine of the process; returns the setting in
    force."""
    lib = lib or _lib()
    value = None if microseconds is None else _spin_value(microseconds, "spin_us")
    code = -1 if value is None else _ADAPTIVE_CODE if value == ADAPTIVE else value
    return _spin_in_force(int(lib.sd_set_spin_us(code)))


def spin_us() -> int | str:
    """The spin setting in force (microseconds, or ``"auto"``)."""
    return _spin_in_force(int(_lib().sd_get_spin_us()))


#: what a team thread's phase wait did, in sd_wait_stats's order (``waits`` is their sum, less ``probes``)
WAIT_KINDS = ("ready", "spun", "spun_then_slept", "slept_at_once", "probes")


def wait_stats(reset: bool = False) -> dict[str, int]:
    """The process's counts of the team threads' phase waits (every thread at every phase of a step or prefill chunk
    on 2+ threads; all engines, since the library was loaded or last reset): ``ready`` (the phase was done on
    arrival), ``spun`` (it finished during the spin), ``spun_then_slept`` (the spin ran out, the thread slept until
    woken), ``slept_at_once`` (no spin), ``probes`` (adaptive waits that spun only because they were the every-64th
    probe; also counted as ``spun`` or ``spun_then_slept``) and ``waits`` (all of them). A step adds its counts when
    it is over. ``reset=True`` zeroes the counts after reading them (docs/kernels.md)."""
    counts = (ctypes.c_int64 * len(WAIT_KINDS))()
    _lib().sd_wait_stats(counts, len(WAIT_KINDS), int(bool(reset)))
    stats = dict(zip(WAIT_KINDS, (int(c) for c in counts)))
    stats["waits"] = sum(stats[kind] for kind in WAIT_KINDS if kind != "probes")
    return stats


def set_test_phase_delay_us(microseconds: int) -> int:
    """Test hook: the team thread that claims a phase's first block sleeps ``microseconds`` (0 to 1000000; 0, the
    default, turns it off) before running it, so that the other threads' waits for the phase last about that long.
    For tests of the waiting policy only: it slows every step on 2 or more threads. Returns the setting in force."""
    if isinstance(microseconds, bool) or not isinstance(microseconds, int) or not 0 <= microseconds <= 1_000_000:
        raise KernelInputError(f"phase delay={microseconds!r}; allowed: an integer from 0 to 1000000 (microseconds)")
    return int(_lib().sd_set_test_phase_delay_us(microseconds))


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why :class:`NativeDecoder` cannot run ``model`` (None when it can)."""
    name = type(model).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        return f"architecture {name} is not supported by the native engine (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
    config = model.config
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        return f"hidden_act {act!r} is not supported by the native engine (supported: silu)"
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    rope_type = getattr(rotary, "rope_type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        supported = ", ".join(SUPPORTED_ROPE_TYPES)
        return f"rope_scaling type {rope_type!r} is not supported by the native engine (supported: {supported})"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return f"pretraining_tp={config.pretraining_tp} is not supported by the native engine (supported: 1)"
    return None


def _float_buffer(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.dtype != torch.float32 or tensor.device.type != "cpu" or tuple(tensor.shape) != shape:
        raise ConfigError(
            f"native engine: {name} must be float32 on the CPU with shape {shape}, got {tensor.dtype} {tuple(tensor.shape)} "
            f"on {tensor.device}"
        )
    return tensor.contiguous()


class NativeDecoder:
    """The model's forward pass in C++ with ``max_slots`` KV-cache slots (see the module docstring).

    ``lm_head``: ``"fp32"`` (exact, the default) or ``"int8"`` (the head quantized per row to int8, run on the
    quantized kernels with int8 activations: 4x fewer bytes per token; a small logit error, see docs/kernels.md).
    ``prefill_chunk``: prompt tokens per forward pass (bounds the activation memory). ``max_kv_bytes``: refuse a
    configuration whose KV caches would need more. ``thread_team``: decode steps and prefill chunks at 2+ threads on
    the engine's thread team (the default; see the module docstring); False opens one OpenMP region per kernel call
    (the same results; kept to compare against).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_slots: int = 1,
        max_context: int | None = None,
        lm_head: str = "fp32",
        prefill_chunk: int = 128,
        max_kv_bytes: int = DEFAULT_MAX_KV_BYTES,
        thread_team: bool = True,
    ) -> None:
        reason = unsupported_reason(model)
        if reason:
            raise ConfigError(reason + "; use the eager engine (sparse-cpu engine=eager)")
        for label, value, low in (("max_slots", max_slots, 1), ("prefill_chunk", prefill_chunk, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"native engine: {label}={value!r}; allowed: an integer >= {low}")
        if lm_head not in LM_HEADS:
            raise ConfigError(f"native engine: lm_head={lm_head!r}; allowed: {', '.join(LM_HEADS)}")
        if not isinstance(thread_team, bool):
            raise ConfigError(f"native engine: thread_team={thread_team!r}; allowed: True or False")
        config = model.config
        limit = int(getattr(config, "max_position_embeddings", DEFAULT_MAX_CONTEXT) or DEFAULT_MAX_CONTEXT)
        if max_context is None:
            max_context = min(limit, DEFAULT_MAX_CONTEXT)
        if isinstance(max_context, bool) or not isinstance(max_context, int) or not 1 <= max_context <= limit:
            raise ConfigError(f"native engine: max_context={max_context!r}; allowed: 1 to {limit} (max_position_embeddings)")
        self.hidden = int(config.hidden_size)
        self.layers = int(config.num_hidden_layers)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or self.hidden // self.heads)
        self.inter = int(config.intermediate_size)
        self.vocab_size = int(config.vocab_size)
        self.max_slots, self.max_context, self.lm_head = max_slots, max_context, lm_head
        self._keep: list[Any] = []  # every tensor whose pointer the engine holds
        self._lock = threading.Lock()
        rotary = model.model.rotary_emb
        inv_freq = _float_buffer("rotary inv_freq", rotary.inv_freq.float(), (self.head_dim // 2,))
        kv_per_slot = 4 * self.layers * 2 * self.kv_heads * max_context * self.head_dim
        if kv_per_slot * max_slots > max_kv_bytes:
            raise ConfigError(
                f"native engine: KV caches of {max_slots} slot(s) x {max_context} positions need "
                f"{kv_per_slot * max_slots / 2**20:.0f} MiB > max_kv_bytes {max_kv_bytes / 2**20:.0f} MiB; "
                "lower max_slots or max_context"
            )
        lib = _lib()
        self._lib = lib
        handle = lib.sd_create(self.layers, self.hidden, self.heads, self.kv_heads, self.head_dim, self.inter, self.vocab_size,
                               float(config.rms_norm_eps), inv_freq.data_ptr(), float(getattr(rotary, "attention_scaling", 1.0)),
                               max_slots, max_context, prefill_chunk)  # fmt: skip
        if not handle:
            raise ConfigError("native engine: cannot create the engine (out of memory or an inconsistent config)")
        self._handle = handle
        self._keep.append(inv_freq)
        lib.sd_set_team(handle, int(thread_team))
        try:
            self._wire(model)
        except BaseException:
            self.close()
            raise
        self.kv_bytes = int(lib.sd_kv_bytes_per_slot(handle)) * max_slots
        #: quantized Linears whose mask is 1x4 blocked: their decode GEMVs walk the derived block index (quantized.py)
        self.block_linears = int(lib.sd_block_linears(handle))

    # ------------------------------------------------------------------ building
    def _wire(self, model: torch.nn.Module) -> None:
        lib, h, H = self._lib, self._handle, self.hidden
        embed = _float_buffer("embed_tokens.weight", model.model.embed_tokens.weight, (self.vocab_size, H))
        self._keep.append(embed)
        lib.sd_set_embedding(h, embed.data_ptr())
        for index, block in enumerate(model.model.layers):
            for which, norm in enumerate((block.input_layernorm, block.post_attention_layernorm)):
                w = _float_buffer(f"layers.{index} norm", norm.weight, (H,))
                self._keep.append(w)
                lib.sd_set_norm(h, index, which, w.data_ptr())
            for which, (part, name) in enumerate(_LINEARS):
                self._set_linear(index, which, getattr(getattr(block, part), name), f"model.layers.{index}.{part}.{name}")
        norm = _float_buffer("model.norm.weight", model.model.norm.weight, (H,))
        self._keep.append(norm)
        lib.sd_set_norm(h, -1, 0, norm.data_ptr())
        head = model.lm_head
        if self.lm_head == "int8":
            if type(head) is not torch.nn.Linear:
                raise ConfigError(f"native engine: lm_head=int8 quantizes a dense lm_head; this one is {type(head).__name__}")
            from .quantized import QuantizedSparseLinear, pack_int8

            weight = _float_buffer("lm_head.weight", head.weight, (self.vocab_size, H))
            # every weight kept (all mask bits set), so the codes are the dense row-major int8 matrix
            packed = pack_int8(weight, torch.ones_like(weight, dtype=torch.bool), group_size=None)
            QuantizedSparseLinear.from_packed(packed).packed.validate()
            codes = packed.codes[: self.vocab_size * H].view(torch.int8).view(self.vocab_size, H)
            blocks = -(-H // 128)
            padded = torch.nn.functional.pad(codes.to(torch.int32), (0, blocks * 128 - H))
            wsum = padded.view(self.vocab_size, blocks, 128).sum(-1, dtype=torch.int32).contiguous()
            bias = None if head.bias is None else _float_buffer("lm_head.bias", head.bias, (self.vocab_size,))
            self._keep.extend([packed.codes, packed.scales, packed.masks, packed.offsets, wsum, bias])
            code = lib.sd_set_linear(h, -1, 0, 3, self.vocab_size, H, packed.codes.data_ptr(), packed.scales.data_ptr(),
                                     wsum.data_ptr(), packed.masks.data_ptr(), packed.offsets.data_ptr(),
                                     None if bias is None else bias.data_ptr(), 8, H)  # fmt: skip
            if code:
                raise ConfigError(f"native engine: lm_head: {self._message(code)}")
        else:
            self._set_linear(-1, 0, head, "lm_head")
        code = lib.sd_check(h)
        if code:
            raise ConfigError(f"native engine: the model's weights do not match its config ({self._message(code)})")

    def _set_linear(self, layer: int, which: int, module: torch.nn.Module, name: str) -> None:
        from .modules import SparseLinear
        from .ops import check_weight
        from .quantized import QuantizedSparseLinear

        bias = getattr(module, "bias", None)
        if bias is not None:
            bias = _float_buffer(f"{name}.bias", bias, (module.out_features,))
        rows, cols = module.out_features, module.in_features
        if isinstance(module, SparseLinear):
            check_weight(module.masks, module.values, module.offsets, bias, cols)
            kind, bits, group, parts = 1, 0, 0, [module.masks, module.values, module.offsets]
        elif isinstance(module, QuantizedSparseLinear):
            module.packed.validate()
            parts = [module.masks, module.offsets, module.codes, module.scales, module.zeros]
            kind, bits, group = 2, module.bits, module.group_size
        elif type(module) is torch.nn.Linear:
            kind, bits, group, parts = 0, 0, 0, [_float_buffer(f"{name}.weight", module.weight, (rows, cols))]
        else:
            raise ConfigError(
                f"native engine: {name} is a {type(module).__name__}; supported: SparseLinear, QuantizedSparseLinear, nn.Linear"
            )
        self._keep.extend([p for p in parts if p is not None] + [bias])
        pointers = [None if p is None else p.data_ptr() for p in parts] + [None] * (5 - len(parts))
        code = self._lib.sd_set_linear(self._handle, layer, which, kind, rows, cols, *pointers,
                                       None if bias is None else bias.data_ptr(), bits, group)  # fmt: skip
        if code:
            raise ConfigError(f"native engine: {name}: {self._message(code)}")

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _message(code: int) -> str:
        return _STATUS.get(code, f"error code {code}")

    def _check_slot(self, slot: object) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.max_slots:
            raise KernelInputError(f"slot {slot!r} out of range; allowed: 0 to {self.max_slots - 1}")
        return slot

    def _token_tensor(self, token_ids: object, what: str) -> torch.Tensor:
        if isinstance(token_ids, torch.Tensor):
            tokens = token_ids.detach().cpu()
        else:
            try:
                import numpy as np

                array = np.asarray(token_ids)
            except (TypeError, ValueError) as exc:
                raise KernelInputError(f"{what} must be integer token ids, got {type(token_ids).__name__}: {exc}") from None
            if array.size == 0:
                raise KernelInputError(f"{what} is empty")
            if array.dtype == object or array.dtype.kind not in "iu":
                raise KernelInputError(f"{what} must be integer token ids, got dtype {array.dtype}")
            tokens = torch.from_numpy(array.astype(np.int64, copy=False))
        if tokens.dtype in (torch.bool,) or tokens.dtype.is_floating_point or tokens.dtype.is_complex:
            raise KernelInputError(f"{what} must be integer token ids, got dtype {tokens.dtype}")
        tokens = tokens.reshape(-1).to(torch.int64).contiguous()
        if tokens.numel() == 0:
            raise KernelInputError(f"{what} is empty")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise KernelInputError(f"{what}: token id {bad} out of range; allowed: 0 to {self.vocab_size - 1}")
        return tokens

    def _handle_or_raise(self) -> int:
        if not self._handle:
            raise KernelInputError("the native engine is closed")
        return self._handle

    def _call_isas(self) -> tuple[int, int, int]:
        from .quantized import quantized_isa_index

        return isa_index(), quantized_isa_index(), get_num_threads()

    # ------------------------------------------------------------------ the slot API
    def length(self, slot: int) -> int:
        """Tokens held in ``slot``'s KV cache."""
        self._check_slot(slot)
        return int(self._lib.sd_length(self._handle_or_raise(), slot))

    def reset(self, slot: int) -> None:
        """Empty ``slot`` (its cache memory is kept for the next sequence)."""
        self._check_slot(slot)
        with self._lock:
            self._lib.sd_reset(self._handle_or_raise(), slot)

    def prefill(self, slot: int, token_ids: Any, all_logits: bool = False) -> torch.Tensor:
        """Append ``token_ids`` to ``slot`` (in chunks of ``prefill_chunk``); the logits of the last token
        ``[vocab]``, or of every token ``[n, vocab]`` with ``all_logits``."""
        self._check_slot(slot)
        tokens = self._token_tensor(token_ids, "token_ids")
        with self._lock:
            handle = self._handle_or_raise()
            used = int(self._lib.sd_length(handle, slot))
            if used + tokens.numel() > self.max_context:
                raise KernelInputError(
                    f"context overflow: slot {slot} holds {used} tokens, {tokens.numel()} more exceed max_context "
                    f"{self.max_context}; reset the slot or build the engine with a larger max_context"
                )
            logits = torch.empty(tokens.numel() if all_logits else 1, self.vocab_size, dtype=torch.float32)
            isa, qisa, threads = self._call_isas()
            code = self._lib.sd_prefill(handle, slot, tokens.data_ptr(), tokens.numel(), logits.data_ptr(), int(all_logits),
                                        isa, qisa, threads)  # fmt: skip
        if code:
            raise KernelInputError(f"native prefill failed: {self._message(code)}")
        return logits if all_logits else logits[0]

    def decode(self, slots: Sequence[int], token_ids: Any) -> torch.Tensor:
        """One step: ``token_ids[i]`` is appended to ``slots[i]`` (distinct slots); logits ``[len(slots), vocab]``."""
        if isinstance(slots, int) and not isinstance(slots, bool):
            slots = [slots]
        slot_list = [self._check_slot(s) for s in slots]
        if not slot_list:
            raise KernelInputError("decode needs at least one slot")
        if len(set(slot_list)) != len(slot_list):
            raise KernelInputError(f"slots {slot_list} repeat a slot; one token per slot per step")
        tokens = self._token_tensor(token_ids, "token_ids")
        if tokens.numel() != len(slot_list):
            raise KernelInputError(f"{len(slot_list)} slot(s) but {tokens.numel()} token id(s); one token per slot")
        slot_tensor = torch.tensor(slot_list, dtype=torch.int64)
        with self._lock:
            handle = self._handle_or_raise()
            for s in slot_list:
                if int(self._lib.sd_length(handle, s)) >= self.max_context:
                    raise KernelInputError(
                        f"context overflow: slot {s} is full (max_context {self.max_context}); reset it or raise max_context"
                    )
            logits = torch.empty(len(slot_list), self.vocab_size, dtype=torch.float32)
            isa, qisa, threads = self._call_isas()
            code = self._lib.sd_decode(handle, slot_tensor.data_ptr(), tokens.data_ptr(), len(slot_list), logits.data_ptr(),
                                       isa, qisa, threads)  # fmt: skip
        if code:
            raise KernelInputError(f"native decode failed: {self._message(code)}")
        return logits

    def generate(self, token_ids: Any, max_new_tokens: int, slot: int = 0) -> list[int]:
        """Greedy generation on ``slot`` (reset first): the ``max_new_tokens`` new token ids."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise KernelInputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        self.reset(slot)
        if max_new_tokens == 0:
            return []
        logits = self.prefill(slot, token_ids)
        out = [int(logits.argmax())]
        while len(out) < max_new_tokens:
            out.append(int(self.decode([slot], [out[-1]])[0].argmax()))
        return out

    def close(self) -> None:
        """Free the KV caches and the engine (the model's tensors stay with the model)."""
        handle, self._handle = getattr(self, "_handle", None), None
        if handle:
            self._lib.sd_destroy(handle)
        self._keep = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- interpreter shutdown: the library may be gone
            pass

    def __repr__(self) -> str:
        return (
            f"NativeDecoder(layers={self.layers}, hidden={self.hidden}, heads={self.heads}/{self.kv_heads}, "
            f"max_slots={self.max_slots}, max_context={self.max_context}, lm_head={self.lm_head}, "
            f"kv_bytes={self.kv_bytes / 2**20:.1f} MiB, 1x4-block Linears={self.block_linears})"
        )

"""The native decoder (strataprune/kernels/decoder.py, csrc/decoder.cpp) on tiny random Llamas.

References: (1) the eager transformers model with the same packed modules (SparseLinear / QuantizedSparseLinear: the
same kernels), prefill and decode through its KV cache; (2) an independent forward pass written here from the
definitions (RMSNorm, rotate-half RoPE, causal grouped-query attention with explicit loops over heads and positions,
SiLU-gated MLP) in float64 numpy on the dense (unpacked) weights.
"""

from __future__ import annotations

import math
import os
import threading

import numpy as np
import pytest
import torch

from strataprune import kernels
from strataprune.contract.errors import ConfigError

pytestmark = [
    pytest.mark.skipif(not kernels.available(), reason=f"kernels not built: {kernels.available().reason}"),
    pytest.mark.usefixtures("one_thread"),
]

FP32_TOLERANCE = 1e-4  # max |native - reference| / max |reference|


def tiny_llama(kv_heads: int = 2, seed: int = 0, tied: bool = True, bias: bool = False, rope_scaling: dict | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=128, tie_word_embeddings=tied, rope_theta=5000.0,
        attention_bias=bias, mlp_bias=bias, rope_scaling=rope_scaling, rms_norm_eps=1e-5,
    )  # fmt: skip
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "proj" in name and param.dim() == 2:
                param.mul_(torch.rand(param.shape, generator=gen) > 0.7)
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=gen))  # not all ones: a wrong norm shows
    return model


def packed(model, bits: int):
    """``model`` with its pruned Linears packed: fp32 bitmask (bits 32) or int8 / int4 codes."""
    from strataprune.kernels import sparsify_model
    from strataprune.plugins.backends.sparse_cpu import quantize_linears

    if bits == 32:
        sparsify_model(model, 0.5)
    else:
        quantize_linears(model, bits, 32 if bits == 4 else None, 0.5)
    return model


def eager_steps(model, prompt: torch.Tensor, steps: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Eager transformers: prompt logits [n, vocab] and the logits of each decode step with the KV cache."""
    with torch.inference_mode():
        out = model(prompt[None], use_cache=True)
        cache, logits = out.past_key_values, [out.logits[0]]
        for token in steps:
            out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[0, -1])
    return logits[0], logits[1:]


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


PROMPT = torch.tensor([3, 17, 250, 42, 42, 7, 199, 1, 64, 128, 5, 6, 280, 90, 33, 12, 11, 3, 77, 101])
STEPS = [9, 250, 4, 131]


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_fp32_prefill_and_decode_match_eager(kv_heads):
    from strataprune.kernels.decoder import NativeDecoder

    model = packed(tiny_llama(kv_heads, tied=kv_heads != 1), 32)
    want_prompt, want_steps = eager_steps(model, PROMPT, STEPS)
    engine = NativeDecoder(model, max_slots=2, max_context=64)
    assert relative(engine.prefill(1, PROMPT, all_logits=True), want_prompt) < FP32_TOLERANCE
    for token, want in zip(STEPS, want_steps):
        assert relative(engine.decode([1], [token])[0], want) < FP32_TOLERANCE
    assert engine.length(1) == len(PROMPT) + len(STEPS) and engine.length(0) == 0


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_models_match_eager_on_the_same_kernels(bits):
    from strataprune.kernels.decoder import NativeDecoder
    from strataprune.kernels.quantized import QuantizedSparseLinear

    model = packed(tiny_llama(2, seed=1, bias=True), bits)
    assert sum(isinstance(m, QuantizedSparseLinear) for m in model.modules()) == 14
    want_prompt, want_steps = eager_steps(model, PROMPT, STEPS)
    engine = NativeDecoder(model, max_context=64)
    assert engine.block_linears == 0  # unstructured masks: the bitmask path
    # the same int8 activation rounding on both sides: only fp32 summation order differs (attention, norms), which
    # can move an activation across a rounding boundary; measured <= 2e-6 here, bound 1e-4
    assert relative(engine.prefill(0, PROMPT, all_logits=True), want_prompt) < FP32_TOLERANCE
    for token, want in zip(STEPS, want_steps):
        assert relative(engine.decode([0], [token])[0], want) < FP32_TOLERANCE


@pytest.mark.parametrize("bits", [8, 4])
def test_block_path_decodes_the_same_logits(bits):
    """1x4-blocked masks: the engine derives block indexes (block_linears) and its decode GEMVs walk them; with the
    block path off (the bitmask path) every decode step's logits are bit-identical, one slot and two slots per step,
    on each quantized path, at one thread (a kernel call per Linear) and two (the thread team)."""
    from strataprune.kernels.decoder import NativeDecoder
    from strataprune.kernels.quantized import block_path_calls, quantized_isas, use_block_path, use_quantized_isa

    model = tiny_llama(2, seed=3)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "proj" in name and param.dim() == 2:
                keep = torch.rand(param.shape[0], param.shape[1] // 4, generator=gen) > 0.65
                param.copy_(torch.randn(param.shape, generator=gen) * keep.repeat_interleave(4, dim=1))
    model = packed(model, bits)
    engine = NativeDecoder(model, max_slots=2, max_context=64)
    assert engine.block_linears == 14 and "1x4-block Linears=14" in repr(engine)
    paths = [p for p in ("avx2", "avx2-novnni", "avx512") if p in quantized_isas()]
    if not paths:
        pytest.skip(f"no vector quantized path on this CPU ({quantized_isas()})")
    for path in paths:
        for threads in (1, 2):
            kernels.set_num_threads(threads)
            steps, calls = {}, {}
            for blocks in (True, False):
                with use_quantized_isa(path), use_block_path(blocks):
                    for slot in (0, 1):
                        engine.reset(slot)
                        engine.prefill(slot, PROMPT[: 8 + slot])
                    before = block_path_calls()
                    steps[blocks] = [engine.decode([0], [token])[0] for token in STEPS[:2]]
                    steps[blocks] += [engine.decode([0, 1], [token, token]) for token in STEPS[2:]]
                    calls[blocks] = block_path_calls() - before
            assert all(torch.equal(a, b) for a, b in zip(steps[True], steps[False])), f"{path}, {threads} thread(s)"
            # the decode steps really took the block path (at least one call per blocked Linear and step), and not when off
            assert calls[True] >= 14 * len(STEPS) and calls[False] == 0, (path, threads, calls)


@pytest.mark.parametrize("path", ["portable", "avx2", "avx512"])
def test_every_instruction_set_path(path):
    from strataprune.kernels.decoder import NativeDecoder
    from strataprune.kernels.quantized import quantized_isas, use_quantized_isa

    if path not in kernels.isas() or path not in quantized_isas():
        pytest.skip(f"{path} is not supported on this CPU")
    for bits in (32, 4):
        model = packed(tiny_llama(2, seed=2, tied=False), bits)
        want_prompt, want_steps = eager_steps(model, PROMPT, STEPS[:2])
        with kernels.use_isa(path), use_quantized_isa(path):
            engine = NativeDecoder(model, max_context=64)
            assert relative(engine.prefill(0, PROMPT, all_logits=True), want_prompt) < FP32_TOLERANCE
            for token, want in zip(STEPS[:2], want_steps):
                assert relative(engine.decode([0], [token])[0], want) < FP32_TOLERANCE


def test_two_threads_and_chunked_prefill_give_the_same_logits():
    from strataprune.kernels.decoder import NativeDecoder

    model = packed(tiny_llama(2, seed=3), 32)
    one = NativeDecoder(model, max_context=64).prefill(0, PROMPT, all_logits=True)
    chunked = NativeDecoder(model, max_context=64, prefill_chunk=7).prefill(0, PROMPT, all_logits=True)
    kernels.set_num_threads(2)
    two = NativeDecoder(model, max_context=64).prefill(0, PROMPT, all_logits=True)
    assert relative(chunked, one) < FP32_TOLERANCE and relative(two, one) < FP32_TOLERANCE


@pytest.mark.parametrize("bits", [32, 4])
def test_batched_decode_equals_each_slot_alone(bits):
    from strataprune.kernels.decoder import NativeDecoder

    model = packed(tiny_llama(2, seed=4), bits)
    prompts = [PROMPT[:5], PROMPT[:13], PROMPT]  # different lengths
    alone = []
    for prompt in prompts:
        engine = NativeDecoder(model, max_context=64)
        engine.prefill(0, prompt)
        alone.append([engine.decode([0], [t])[0] for t in STEPS])
    batched = NativeDecoder(model, max_slots=4, max_context=64)
    slots = [2, 0, 3]  # any slots, any order
    for slot, prompt in zip(slots, prompts):
        batched.prefill(slot, prompt)
    for step, token in enumerate(STEPS):
        logits = batched.decode(slots, [token] * 3)
        for i in range(3):
            assert relative(logits[i], alone[i][step]) < 1e-6
    assert [batched.length(s) for s in slots] == [len(p) + len(STEPS) for p in prompts]


def test_reset_gives_a_fresh_sequence():
    from strataprune.kernels.decoder import NativeDecoder

    model = packed(tiny_llama(2, seed=5), 32)
    engine = NativeDecoder(model, max_context=64)
    first = engine.prefill(0, PROMPT)
    engine.decode([0], [1])
    engine.reset(0)
    assert engine.length(0) == 0
    assert torch.equal(engine.prefill(0, PROMPT), first)
    assert engine.generate(PROMPT, 5) == engine.generate(PROMPT, 5)


def test_context_overflow_and_bad_input_are_clear_errors():
    from strataprune.kernels.decoder import NativeDecoder

    engine = NativeDecoder(packed(tiny_llama(2, seed=6), 32), max_slots=2, max_context=24)
    engine.prefill(0, PROMPT)  # 20 of 24
    with pytest.raises(kernels.KernelInputError, match="context overflow"):
        engine.prefill(0, PROMPT[:5])
    assert engine.length(0) == 20  # a refused call changes nothing
    for _ in range(4):
        engine.decode([0], [1])
    with pytest.raises(kernels.KernelInputError, match="context overflow"):
        engine.decode([0], [1])
    bad = [
        (lambda: engine.prefill(2, PROMPT), "slot 2 out of range"),
        (lambda: engine.prefill(-1, PROMPT), "slot -1 out of range"),
        (lambda: engine.prefill(True, PROMPT), "slot True"),
        (lambda: engine.prefill(1, PROMPT.float()), "integer token ids"),
        (lambda: engine.prefill(1, [1.5, 2.0]), "integer token ids"),
        (lambda: engine.prefill(1, ["a"]), "integer token ids"),
        (lambda: engine.prefill(1, []), "empty"),
        (lambda: engine.prefill(1, [300]), "token id 300 out of range"),
        (lambda: engine.decode([1, 1], [2, 3]), "repeat a slot"),
        (lambda: engine.decode([1], [2, 3]), "one token per slot"),
        (lambda: engine.decode([], []), "at least one slot"),
        (lambda: engine.decode([1], [-4]), "token id -4"),
        (lambda: engine.generate(PROMPT, -1), "max_new_tokens"),
    ]
    for call, match in bad:
        with pytest.raises(kernels.KernelInputError, match=match):
            call()
    with pytest.raises(ConfigError, match="max_context"):
        NativeDecoder(packed(tiny_llama(2, seed=6), 32), max_context=129)  # > max_position_embeddings
    with pytest.raises(ConfigError, match="max_kv_bytes"):
        NativeDecoder(packed(tiny_llama(2, seed=6), 32), max_slots=100, max_context=128, max_kv_bytes=1 << 20)
    engine.close()
    with pytest.raises(kernels.KernelInputError, match="closed"):
        engine.decode([0], [1])


def test_kv_bytes_follow_the_layout():
    from strataprune.kernels.decoder import NativeDecoder

    engine = NativeDecoder(packed(tiny_llama(2), 32), max_slots=3, max_context=40)
    # slots x layers x (K, V) x kv heads x positions x head_dim x 4 bytes
    assert engine.kv_bytes == 3 * 2 * 2 * 2 * 40 * 16 * 4
    assert (engine.max_slots, engine.max_context, engine.vocab_size) == (3, 40, 300)


def test_unsupported_architectures_and_rope_types_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    from strataprune.kernels.decoder import NativeDecoder

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=32))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel is not supported.*LlamaForCausalLM.*engine=eager"):
        NativeDecoder(gpt2)
    dynamic = tiny_llama(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ConfigError, match="rope_scaling type 'dynamic'"):
        NativeDecoder(dynamic)


def test_linear_rope_scaling_matches_eager():
    from strataprune.kernels.decoder import NativeDecoder

    model = packed(tiny_llama(rope_scaling={"rope_type": "linear", "factor": 4.0}), 32)
    want, _ = eager_steps(model, PROMPT, [])
    assert relative(NativeDecoder(model, max_context=64).prefill(0, PROMPT, all_logits=True), want) < FP32_TOLERANCE


# ----------------------------------------------------------------------------- independent reference
def reference_forward(model, tokens: list[int]) -> np.ndarray:
    """Logits of every position, written from the definitions with explicit loops (float64, dense weights)."""
    c = model.config
    H, nh, nkv = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    d = H // nh
    sd = {k: v.double().numpy() for k, v in dense_state(model).items()}
    inv_freq = [c.rope_theta ** (-(2 * i) / d) for i in range(d // 2)]

    def rms(x, w):
        return w * x / math.sqrt(sum(v * v for v in x) / len(x) + c.rms_norm_eps)

    def rope(v, pos):
        out = v.copy()
        for i in range(d // 2):
            cos, sin = math.cos(pos * inv_freq[i]), math.sin(pos * inv_freq[i])
            out[i] = v[i] * cos - v[i + d // 2] * sin
            out[i + d // 2] = v[i + d // 2] * cos + v[i] * sin
        return out

    xs = [sd["model.embed_tokens.weight"][t].copy() for t in tokens]
    for layer in range(c.num_hidden_layers):
        p = f"model.layers.{layer}."
        keys, values, outs = [], [], []
        for pos, x in enumerate(xs):
            h = rms(x, sd[p + "input_layernorm.weight"])
            q, k, v = (sd[p + f"self_attn.{n}_proj.weight"] @ h for n in "qkv")
            keys.append([rope(k[g * d : (g + 1) * d], pos) for g in range(nkv)])
            values.append([v[g * d : (g + 1) * d] for g in range(nkv)])
            heads = []
            for head in range(nh):
                g = head // (nh // nkv)
                qh = rope(q[head * d : (head + 1) * d], pos)
                scores = [float(qh @ keys[j][g]) / math.sqrt(d) for j in range(pos + 1)]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                heads.append(sum(w / total * values[j][g] for j, w in enumerate(weights)))
            outs.append(x + sd[p + "self_attn.o_proj.weight"] @ np.concatenate(heads))
        xs = []
        for x in outs:
            h = rms(x, sd[p + "post_attention_layernorm.weight"])
            gate, up = sd[p + "mlp.gate_proj.weight"] @ h, sd[p + "mlp.up_proj.weight"] @ h
            xs.append(x + sd[p + "mlp.down_proj.weight"] @ (gate / (1 + np.exp(-gate)) * up))
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return np.stack([head @ rms(x, sd["model.norm.weight"]) for x in xs])


def dense_state(model) -> dict[str, torch.Tensor]:
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, kernels.SparseLinear):
            state[name + ".weight"] = module.packed.unpack()
        elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) or "norm" in name.split(".")[-1]:
            state[name + ".weight"] = module.weight.detach()
    return state


def test_against_a_forward_pass_written_from_the_definitions():
    from strataprune.kernels.decoder import NativeDecoder

    model = packed(tiny_llama(2, seed=7, tied=False), 32)
    tokens = [5, 77, 123, 9, 250, 31]
    want = reference_forward(model, tokens)
    engine = NativeDecoder(model, max_context=16)
    got = [engine.prefill(0, tokens[:4], all_logits=True)] + [engine.decode([0], [t]) for t in tokens[4:]]
    got = torch.cat(got).double().numpy()
    assert np.abs(got - want).max() / np.abs(want).max() < FP32_TOLERANCE
    # the RoPE frequencies the engine took from the model are rope_theta's
    d = model.config.hidden_size // model.config.num_attention_heads
    theta = torch.tensor([5000.0 ** (-(2 * i) / d) for i in range(d // 2)])
    assert torch.allclose(model.model.rotary_emb.inv_freq.double(), theta.double(), rtol=1e-6)


def greedy_decode(engine, prompt: torch.Tensor, steps: int, slots: list[int]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Every slot prefilled with a prefix of ``prompt`` (different lengths), then ``steps`` greedy steps of all slots
    at once: the tokens chosen per slot and each step's logits."""
    nxt = []
    for i, slot in enumerate(slots):
        nxt.append(int(engine.prefill(slot, prompt[: len(prompt) - 3 * i]).argmax()))
    chosen, logits = [[t] for t in nxt], []
    for _ in range(steps):
        out = engine.decode(slots, nxt)
        logits.append(out)
        nxt = [int(i) for i in out.argmax(-1)]
        for row, token in zip(chosen, nxt):
            row.append(token)
    return chosen, logits


@pytest.mark.parametrize(("bits", "lm_head"), [(32, "fp32"), (8, "int8"), (4, "fp32"), (4, "int8")])
def test_two_threads_decode_the_same_tokens_and_logits_as_one(bits, lm_head):
    """Decode runs on the thread team (woken once per step, blocks of rows and heads claimed by any thread);
    every row is computed by the same kernel whichever thread runs it, so 1, 2 and 3 threads decode the same tokens
    and logits (bound 1e-6: the kernels may group rows differently, never sum a row differently), batched and not,
    equally with the team off (one region per kernel call, as before it) and with no spinning before the sleep."""
    from strataprune.kernels.decoder import NativeDecoder, set_spin_us

    model = packed(tiny_llama(2, seed=11, tied=False, bias=bits == 4), bits)
    for slots in ([0], [2, 0, 1]):
        want_tokens, want_logits = greedy_decode(NativeDecoder(model, max_slots=3, max_context=64, lm_head=lm_head),
                                                 PROMPT, 6, slots)  # fmt: skip
        for threads, team, spin in ((1, False, None), (2, True, None), (3, True, 0), (2, True, 30), (2, False, None)):
            kernels.set_num_threads(threads)
            set_spin_us(spin)
            try:
                engine = NativeDecoder(model, max_slots=3, max_context=64, lm_head=lm_head, thread_team=team)
                got_tokens, got_logits = greedy_decode(engine, PROMPT, 6, slots)
            finally:
                kernels.set_num_threads(1)
                set_spin_us(None)
            assert got_tokens == want_tokens, (threads, team, slots)
            for got, want in zip(got_logits, want_logits):
                assert relative(got, want) < 1e-6, (threads, team, slots)


@pytest.mark.parametrize(("bits", "lm_head"), [(32, "fp32"), (4, "int8"), (8, "fp32")])
def test_two_threads_decode_wide_batches_on_the_team_as_one(bits, lm_head):
    """A step of 10 slots takes the GEMM kernels (above 4 tokens quantized, 8 fp32), on the team as at 1 thread."""
    from strataprune.kernels.decoder import NativeDecoder

    model = packed(tiny_llama(2, seed=17, tied=False), bits)
    prompt, slots = torch.cat([PROMPT, PROMPT]), list(range(10))
    want_tokens, want_logits = greedy_decode(NativeDecoder(model, max_slots=10, max_context=64, lm_head=lm_head),
                                             prompt, 3, slots)  # fmt: skip
    kernels.set_num_threads(2)
    got_tokens, got_logits = greedy_decode(NativeDecoder(model, max_slots=10, max_context=64, lm_head=lm_head),
                                           prompt, 3, slots)  # fmt: skip
    assert got_tokens == want_tokens
    for got, want in zip(got_logits, want_logits):
        assert relative(got, want) < 1e-6


@pytest.mark.parametrize("path", ["portable", "avx2", "avx2-novnni", "avx512"])
def test_two_threads_on_every_quantized_path_and_int8_head_kernel(path):
    """The team picks each Linear's kernel (and the int8 head's dense kernel, or the bitmask one on portable) as the
    per-call path does: the team at 2 threads decodes what the per-call path decodes at 1, on every quantized path."""
    from strataprune.kernels.decoder import NativeDecoder
    from strataprune.kernels.quantized import quantized_isas, use_quantized_isa

    if path not in quantized_isas():
        pytest.skip(f"{path} is not supported on this CPU")
    model = packed(tiny_llama(2, seed=14), 8)
    with use_quantized_isa(path):
        per_call = NativeDecoder(model, max_slots=2, max_context=64, lm_head="int8", thread_team=False)
        want_tokens, want_logits = greedy_decode(per_call, PROMPT, 4, [1, 0])  # run_int8_head and sq_linear, 1 thread
        kernels.set_num_threads(2)
        got_tokens, got_logits = greedy_decode(NativeDecoder(model, max_slots=2, max_context=64, lm_head="int8"),
                                               PROMPT, 4, [1, 0])  # fmt: skip
    assert got_tokens == want_tokens
    for got, want in zip(got_logits, want_logits):
        assert relative(got, want) < 1e-6


@pytest.mark.parametrize(("bits", "lm_head"), [(32, "fp32"), (8, "int8"), (8, "fp32"), (4, "int8"), (4, "fp32")])
def test_two_threads_prefill_the_same_logits_as_one(bits, lm_head):
    """A prefill at 2+ threads runs on the thread team (blocks of rows of the fp32 / quantized GEMMs and (token, head)
    pairs of attention, claimed by any thread): every row by the same kernel as at 1 thread, so the logits agree to
    1e-6, for every token and for the last one only,
    in one chunk and in chunks of 7 (a chunk with no logits, a last chunk of 6) and of 3 (GEMV kernels), with the team
    off and on; the KV cache it leaves decodes the same next token."""
    from strataprune.kernels.decoder import NativeDecoder

    model = packed(tiny_llama(2, seed=15, tied=False, bias=bits == 4), bits)
    for chunk in (128, 7, 3):
        for all_logits in (True, False):
            one = NativeDecoder(model, max_context=64, lm_head=lm_head, prefill_chunk=chunk)
            want = one.prefill(0, PROMPT, all_logits=all_logits)
            want_next = one.decode([0], [9])[0]
            for threads, team in ((2, True), (3, True), (2, False)):
                kernels.set_num_threads(threads)
                try:
                    engine = NativeDecoder(model, max_context=64, lm_head=lm_head, prefill_chunk=chunk, thread_team=team)
                    got = engine.prefill(0, PROMPT, all_logits=all_logits)
                    got_next = engine.decode([0], [9])[0]
                finally:
                    kernels.set_num_threads(1)
                assert got.shape == want.shape
                assert relative(got, want) < 1e-6, (chunk, all_logits, threads, team)
                assert relative(got_next, want_next) < 1e-6, (chunk, all_logits, threads, team)


@pytest.mark.parametrize("path", ["portable", "avx2", "avx2-novnni", "avx512"])
def test_two_threads_prefill_on_every_quantized_path(path):
    """The team's prefill picks the quantized GEMM kernel of each path (and the int8 head's kernel) as sq_linear and
    run_int8_head do at 1 thread."""
    from strataprune.kernels.decoder import NativeDecoder
    from strataprune.kernels.quantized import quantized_isas, use_quantized_isa

    if path not in quantized_isas():
        pytest.skip(f"{path} is not supported on this CPU")
    model = packed(tiny_llama(2, seed=16), 4)
    with use_quantized_isa(path):
        want = NativeDecoder(model, max_context=64, lm_head="int8").prefill(0, PROMPT, all_logits=True)
        kernels.set_num_threads(2)
        got = NativeDecoder(model, max_context=64, lm_head="int8").prefill(0, PROMPT, all_logits=True)
    assert relative(got, want) < 1e-6


def test_thread_team_matches_the_forward_pass_written_from_the_definitions():
    """The team's row-range entries (a head of q/k/v, 32 rows of o/down, 64 of gate/up, 512 of the head, each run
    by whichever thread claims it) against the float64 forward pass from the definitions, on every ISA path."""
    from strataprune.kernels.decoder import NativeDecoder

    model = packed(tiny_llama(2, seed=12, tied=False), 32)
    tokens = [5, 77, 123, 9, 250, 31, 8, 140]
    want = reference_forward(model, tokens)
    kernels.set_num_threads(3)
    for path in kernels.isas():
        with kernels.use_isa(path):
            engine = NativeDecoder(model, max_context=16)
            got = [engine.prefill(0, tokens[:2], all_logits=True)] + [engine.decode([0], [t]) for t in tokens[2:]]
        got = torch.cat(got).double().numpy()
        assert np.abs(got - want).max() / np.abs(want).max() < FP32_TOLERANCE, path


def test_a_forked_child_decodes_on_its_own_team():
    """The team's workers are threads of the process that started them; a child forked after a 2-thread step has
    none, so it must start its own rather than wait for them (a hang, caught here by the timeout)."""
    import multiprocessing

    from strataprune.kernels.decoder import NativeDecoder

    model = packed(tiny_llama(2, seed=13), 32)
    kernels.set_num_threads(2)
    engine = NativeDecoder(model, max_context=64)
    engine.prefill(0, PROMPT)
    want = engine.decode([0], [9])[0]
    engine.reset(0)
    engine.prefill(0, PROMPT)

    def child(queue):
        queue.put(engine.decode([0], [9])[0].tolist())

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    try:
        got = torch.tensor(queue.get(timeout=60))
        process.join(30)
    finally:
        if process.is_alive():  # a hung child must not outlive the test
            process.kill()
    assert process.exitcode == 0
    assert relative(got, want) < 1e-6


def test_one_engine_follows_a_changing_thread_count():
    """The team grows and shrinks between steps (3, 2, 3, 1, 4 threads on one engine): workers that sat out a step
    or were just started join the next with that step's member count, so every step ends with every row computed."""
    from strataprune.kernels.decoder import NativeDecoder

    model = packed(tiny_llama(2, seed=17), 8)
    want_tokens, want_logits = greedy_decode(NativeDecoder(model, max_slots=2, max_context=64), PROMPT, 10, [0, 1])
    engine = NativeDecoder(model, max_slots=2, max_context=64)
    counts = iter([3, 2, 3, 1, 4, 2, 3, 2, 1, 3, 2])
    original = engine.decode

    def decode_on_changing_threads(slots, tokens):
        kernels.set_num_threads(next(counts))
        return original(slots, tokens)

    engine.decode = decode_on_changing_threads
    try:
        got_tokens, got_logits = greedy_decode(engine, PROMPT, 10, [0, 1])
    finally:
        kernels.set_num_threads(1)
    assert got_tokens == want_tokens
    for got, want in zip(got_logits, want_logits):
        assert relative(got, want) < 1e-6


def test_spin_setting_is_checked():
    from strataprune.kernels._library import KernelInputError
    from strataprune.kernels.decoder import set_spin_us

    assert set_spin_us(250) == 250
    assert set_spin_us(0) == 0
    assert set_spin_us(None) == "auto"  # the adaptive default
    for bad in (-1, -2, "x", "5", "Auto", 2.7, float("inf"), True, 10**7):
        with pytest.raises(KernelInputError, match="spin_us"):
            set_spin_us(bad)
    with pytest.raises(KernelInputError, match="threads"):
        kernels.set_num_threads(10**5)


def test_a_bad_spin_environment_value_is_refused_every_time(monkeypatch):
    from strataprune.kernels import decoder
    from strataprune.kernels._library import KernelInputError

    model = packed(tiny_llama(2, seed=19), 32)
    monkeypatch.delitem(decoder._bound, "ok", raising=False)  # bind again, reading the environment
    monkeypatch.setenv(decoder.SPIN_ENV, "abc")
    for _ in range(2):
        with pytest.raises(KernelInputError, match=decoder.SPIN_ENV):
            decoder.NativeDecoder(model, max_context=64)
    monkeypatch.setenv(decoder.SPIN_ENV, "40")
    decoder.NativeDecoder(model, max_context=64)
    assert decoder.spin_us() == 40
    monkeypatch.delitem(decoder._bound, "ok", raising=False)
    monkeypatch.setenv(decoder.SPIN_ENV, "auto")
    decoder.NativeDecoder(model, max_context=64)
    assert decoder.spin_us() == "auto"
    assert decoder.set_spin_us(None) == "auto" and decoder.spin_us() == "auto"
    with pytest.raises(ConfigError, match="thread_team"):
        decoder.NativeDecoder(model, max_context=64, thread_team="no")


def test_int8_lm_head_is_close_to_the_fp32_head():
    from strataprune.kernels.decoder import NativeDecoder

    model = packed(tiny_llama(2, seed=8), 32)
    exact = NativeDecoder(model, max_context=64).prefill(0, PROMPT, all_logits=True)
    int8 = NativeDecoder(model, max_context=64, lm_head="int8").prefill(0, PROMPT, all_logits=True)
    error = relative(int8, exact)
    assert 0 < error < 0.03  # int8 weights per row + int8 activations per 128 columns: ~1% of the largest logit
    from strataprune.kernels.quantized import quantized_isas, use_quantized_isa

    for path in ("avx2", "portable"):  # the quantized bitmask kernel over the same codes: the same numbers
        if path in quantized_isas():
            with use_quantized_isa(path):
                other = NativeDecoder(model, max_context=64, lm_head="int8").prefill(0, PROMPT, all_logits=True)
            assert relative(other, int8) < 1e-5
    with pytest.raises(ConfigError, match="lm_head"):
        NativeDecoder(model, lm_head="int4")


@pytest.mark.parametrize("path", ["avx512", "avx2", "avx2-novnni"])
def test_each_dense_int8_head_kernel_matches_the_plain_loop(path):
    """Every dense int8 head kernel (AVX-512 VNNI; AVX2 with AVX-VNNI; AVX2 with vpmaddubsw) against the portable
    path, which runs the plain loop of the quantized kernels over the same codes: the same integer sums, so only the
    fp32 scaling order differs. A width that is not a multiple of 32 or 128 and a vocabulary that is not a multiple
    of 4 reach the kernels' tails; 6 prompt tokens then 1 decode token reach both token counts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from strataprune.kernels.decoder import NativeDecoder
    from strataprune.kernels.quantized import quantized_isas, use_quantized_isa

    if path not in quantized_isas():
        pytest.skip(f"{path}: not available on this CPU (quantized paths here: {quantized_isas()})")
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=301, hidden_size=200, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    prompt, step = [3, 17, 250, 42, 7, 199], [300]

    def run(isa: str) -> torch.Tensor:
        with use_quantized_isa(isa):
            engine = NativeDecoder(model, max_context=16, lm_head="int8")
            return torch.cat([engine.prefill(0, prompt, all_logits=True), engine.decode([0], step)])

    want, got = run("portable"), run(path)
    assert relative(got, want) < 1e-5
    # and the int8 head is still the fp32 head within int8 rounding
    exact = NativeDecoder(model, max_context=16)
    assert relative(got, torch.cat([exact.prefill(0, prompt, all_logits=True), exact.decode([0], step)])) < 0.03


@pytest.mark.real_model
def test_smollm2_native_matches_eager(smollm2):
    import copy

    from strataprune.kernels.decoder import NativeDecoder

    model = packed(copy.deepcopy(smollm2.model).float().eval(), 4)  # dense weights: every Linear stays nn.Linear
    model.config._attn_implementation = "eager"
    prompt = torch.tensor(smollm2.tokenizer("The capital of France is").input_ids)
    want_prompt, want_steps = eager_steps(model, prompt, [11, 2])
    engine = NativeDecoder(model, max_context=64)
    assert relative(engine.prefill(0, prompt, all_logits=True), want_prompt) < FP32_TOLERANCE
    for token, want in zip([11, 2], want_steps):
        assert relative(engine.decode([0], [token])[0], want) < FP32_TOLERANCE


# ---- The waits at a step's barriers: what the spin policy did (wait_stats), on waits made long by a test hook ----
# The policy (docs/kernels.md, "Threads and paths"): with spin "auto" a thread spins up to ADAPTIVE_SPIN_US only while
# the running mean (weight 1/8) of its recent waits is below that, sleeps at once while it is above, and still spins
# on every PROBE_EVERY-th of those waits; with a fixed spin it spins that long, then sleeps.
ADAPTIVE_SPIN_US = 50
PROBE_EVERY = 64
LONG_WAIT_US = 300  # the test hook's delay: waits ~6x the adaptive threshold
WAIT_STEPS = 80  # decode steps per setting: up to 880 unfinished phases (one thread waits at each), ~13 probe periods
PHASES = 2 * 5 + 1  # tiny_llama's 2 layers x (q/k/v, attention, o, gate/up, down), then the head


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity outside Linux
        return os.cpu_count() or 1


needs_two_cpus = pytest.mark.skipif(
    usable_cpus() < 2, reason="needs 2 usable CPUs: with one, a team thread's waits are its partner's whole time slice"
)


def decode_on_a_new_thread(model, threads: int, spin, delay_us: int) -> tuple[torch.Tensor, dict[str, int]]:
    """Prefill PROMPT and decode WAIT_STEPS greedy tokens at ``threads`` threads, spin setting ``spin`` and the test
    hook's phase delay ``delay_us``, on a new Python thread and a new engine (new workers), so that every team thread's
    wait history starts empty. Returns the decode steps' logits [WAIT_STEPS, vocab] and the wait counts of those steps
    (the prefill's are dropped)."""
    from strataprune.kernels.decoder import NativeDecoder, set_spin_us, set_test_phase_delay_us, wait_stats

    result: dict = {}

    def work() -> None:
        try:
            kernels.set_num_threads(threads)
            set_spin_us(spin)
            assert set_test_phase_delay_us(delay_us) == delay_us
            engine = NativeDecoder(model, max_context=128)
            token = int(engine.prefill(0, PROMPT).argmax())
            wait_stats(reset=True)
            rows = []
            for _ in range(WAIT_STEPS):
                rows.append(engine.decode([0], [token])[0])
                token = int(rows[-1].argmax())
            result["stats"] = wait_stats(reset=True)
            result["logits"] = torch.stack(rows)
            engine.close()
        except BaseException as error:  # re-raised on the test's thread
            result["error"] = error
        finally:
            kernels.set_num_threads(1)
            set_spin_us(None)
            set_test_phase_delay_us(0)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    stats = result["stats"]
    # every team thread waits at every phase (one thread runs the kernels in order, without a team or its phases)
    assert stats["waits"] == (WAIT_STEPS * threads * PHASES if threads > 1 else 0), stats
    assert stats["probes"] <= stats["spun"] + stats["spun_then_slept"], stats
    return result["logits"], stats


def not_ready(stats: dict[str, int]) -> int:
    return stats["spun"] + stats["spun_then_slept"] + stats["slept_at_once"]


@pytest.fixture(scope="module")
def wait_model():
    return packed(tiny_llama(2, seed=23), 8)


@pytest.fixture(scope="module")
def team_logits(wait_model):
    """2 threads, spin 0, no hook: the logits every setting below must reproduce bit for bit (each row is computed
    by the same kernel whichever thread runs it, whatever the waits did); within 1e-6 of one thread's."""
    logits = decode_on_a_new_thread(wait_model, 2, 0, 0)[0]
    assert relative(logits, decode_on_a_new_thread(wait_model, 1, None, 0)[0]) < 1e-6
    return logits


@needs_two_cpus
def test_no_wait_spins_with_spin_0(wait_model, team_logits):
    """spin 0: every wait that finds its phase unfinished sleeps at once (the hook makes such waits certain); no
    wait is satisfied by spinning, none probes."""
    logits, stats = decode_on_a_new_thread(wait_model, 2, 0, LONG_WAIT_US)
    assert stats["spun"] == stats["spun_then_slept"] == stats["probes"] == 0, stats
    assert stats["slept_at_once"] >= WAIT_STEPS * PHASES // 4, stats
    assert torch.equal(logits, team_logits)


@needs_two_cpus
def test_a_fixed_spin_spins_before_every_sleep(wait_model, team_logits):
    """A fixed spin (1000 us, longer than the hook's 300 us waits) spins at every unfinished phase, never sleeps at
    once and never probes (probing is the adaptive policy's). Fewer phases find a thread waiting than with spin 0: a
    spinner keeps its core, so the hook's sleeper, woken, may preempt it and finish the phase alone."""
    logits, stats = decode_on_a_new_thread(wait_model, 2, 1000, LONG_WAIT_US)
    assert stats["slept_at_once"] == stats["probes"] == 0, stats
    assert not_ready(stats) >= WAIT_STEPS, stats
    assert torch.equal(logits, team_logits)


@needs_two_cpus
def test_adaptive_waits_spin_while_waits_are_short(wait_model, team_logits):
    """auto, no hook: the phases are tiny, so the partner is usually done within the spin. Strict: a thread with an
    empty history (mean 0 < 50 us) spins at its first unfinished phase, so some wait spun if any was unfinished.
    Loose (a loaded machine may deschedule the partner for whole time slices): waits were satisfied while spinning,
    or most were ready on arrival."""
    logits, stats = decode_on_a_new_thread(wait_model, 2, "auto", 0)
    if not_ready(stats):
        assert stats["spun"] + stats["spun_then_slept"] >= 1, stats
    assert stats["spun"] > 0 or stats["ready"] >= stats["waits"] // 2, stats
    assert torch.equal(logits, team_logits)


@needs_two_cpus
def test_adaptive_waits_sleep_at_once_while_waits_are_long(wait_model, team_logits):
    """auto, the hook holding every phase ~300 us: a history fed waits of >= 250 us passes the 50 us threshold
    within 2 waits (250 * (1 - (7/8)^2) = 59; the prefill's waits have done that before counting starts), and from
    then on the thread sleeps at once except on every 64th wait, which probes (spins, fails, sleeps). So nearly all
    unfinished waits slept at once, the probes are 1/64 of the waits decided above the threshold (the policy counts
    every 64th of those; within 1 per thread, whose count runs on from any value), and other spins are a handful."""
    logits, stats = decode_on_a_new_thread(wait_model, 2, "auto", LONG_WAIT_US)
    waited = not_ready(stats)
    assert stats["slept_at_once"] >= 0.9 * waited, stats
    above_threshold = stats["slept_at_once"] + stats["probes"]  # adaptive waits that found the mean >= 50 us
    assert above_threshold >= 3 * PROBE_EVERY, stats  # the hook made enough long waits to show the period
    # the thread's probe count also runs on through its uncounted adaptive waits (the caller waiting for the workers
    # to leave a step), whose 64th waits are probes nobody counts: so the counted probes may fall short of 1/64 of the
    # counted waits by that share (about 1 in 6 of the caller's waits here, none of the worker's), and never exceed it
    # by more than 1 per thread. A period of 32 or 128 fails either bound.
    expected = above_threshold / PROBE_EVERY
    assert 0.75 * expected - 2 < stats["probes"] < expected + 2, stats
    # waits before a thread's empty history passes the threshold, the hook's waits taken as >= 5/6 of its delay
    warm_up = next(w for w in range(1, 100) if LONG_WAIT_US * 5 / 6 * (1 - (7 / 8) ** w) >= ADAPTIVE_SPIN_US)
    assert stats["spun"] + stats["spun_then_slept"] - stats["probes"] <= 2 * warm_up + waited // 50, stats
    assert torch.equal(logits, team_logits)


def test_wait_stats_reset_and_the_phase_delay_is_checked():
    from strataprune.kernels._library import KernelInputError
    from strataprune.kernels.decoder import WAIT_KINDS, set_test_phase_delay_us, wait_stats

    wait_stats(reset=True)
    assert wait_stats() == dict.fromkeys((*WAIT_KINDS, "waits"), 0)
    for bad in (-1, 10**7, 2.5, "300", True, None):
        with pytest.raises(KernelInputError, match="phase delay"):
            set_test_phase_delay_us(bad)
    assert set_test_phase_delay_us(0) == 0

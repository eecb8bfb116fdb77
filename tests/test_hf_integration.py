"""ckpt_attn.integrations.transformers: tiny Llama, Mistral and Qwen2 models built from
configs (no downloads) run with attn_implementation set to ckpt_attn and to "sdpa" on the
same weights.

Accuracy follows the team's rule: the error of ckpt_attn's model (float32) against the
float64 SDPA model is at most 2x (3x for gradients) that of the float32 SDPA model, plus
float32's atol. Tokens generated greedily must be equal.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from reference import ATOL, FORWARD_FACTOR, GRADIENT_FACTOR, assert_within_rule
from torch._dynamo.utils import counters
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    DataCollatorWithFlattening,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    masking_utils,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import and_masks, causal_mask_function, sdpa_mask

from ckpt_attn import ops
from ckpt_attn.integrations import transformers as hf

NAME = hf.register("ckpt_attn_cpu", backend="torch")
VOCAB = 100
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, pad_token_id=0, max_position_embeddings=128)
# Mistral: every layer slides (window 4, shorter than the sequences); Qwen2: layer 0 full,
# layer 1 slides (max_window_layers=1). GQA: 4 query heads on 2 (Llama, Qwen2) or 1 (MQA).
FAMILIES = {
    "llama": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=2)),
    "mistral": (MistralForCausalLM, MistralConfig, dict(num_key_value_heads=1, sliding_window=4)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config,
              dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                   max_window_layers=1)),
}


def build(family: str, **overrides):
    """(ckpt_attn model fp32, sdpa model fp32, sdpa model fp64) with the same weights, in
    eval mode."""
    model_class, config_class, extra = FAMILIES[family]
    config = config_class(**{**COMMON, **extra, **overrides})
    torch.manual_seed(0)
    sdpa = model_class._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    ours = model_class._from_config(copy.deepcopy(config), attn_implementation=NAME).eval()
    ours.load_state_dict(sdpa.state_dict())
    reference = copy.deepcopy(sdpa).double()
    return ours, sdpa, reference


# The loss is a fixed random projection of the selected logits, so every logit matters;
# row r of the selection (in row-major order) is weighted by LOSS_WEIGHTS[first_row + r].
LOSS_WEIGHTS = torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64)


def logits_and_grads(model, rows, first_row=0, **inputs):
    """Logits at `rows` (a bool (B, S) selection) and the parameters' gradients of the
    loss on them."""
    model.zero_grad()
    picked = model(**inputs).logits[rows]
    weights = LOSS_WEIGHTS[first_row:first_row + picked.shape[0]].to(picked.dtype)
    (picked * weights).sum().backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return picked.detach(), grads


def one_by_one(lengths, **models):
    """Random sequences of these lengths, and each model's logits and summed gradients
    when the sequences run one at a time: {name: (logits, grads)}."""
    sequences = [torch.randint(1, VOCAB, (n,)) for n in lengths]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    separate = {}
    for name, model in models.items():
        logits, grads = zip(*(logits_and_grads(model, torch.ones(1, n, dtype=torch.bool),
                                               start, input_ids=s[None], use_cache=False)
                              for n, s, start in zip(lengths, sequences, starts, strict=True)),
                            strict=True)
        separate[name] = torch.cat(logits), torch.stack(grads).sum(0)
    return sequences, separate


def assert_models_agree(ours, sdpa, reference, rows, label, **inputs):
    """Logits and gradients of ours against the float64 reference, under the rule with the
    float32 SDPA model as baseline."""
    (our_logits, our_grads), (sdpa_logits, sdpa_grads), (ref_logits, ref_grads) = (
        logits_and_grads(model, rows, **inputs) for model in (ours, sdpa, reference))
    assert_within_rule(our_logits, sdpa_logits, ref_logits, factor=FORWARD_FACTOR,
                       atol=ATOL[torch.float32], what=f"hf {label} logits")
    assert_within_rule(our_grads, sdpa_grads, ref_grads, factor=GRADIENT_FACTOR,
                       atol=ATOL[torch.float32], what=f"hf {label} grads")


class OpSpy:
    """Records the arguments ckpt_attn's op receives from the integration, and counts the
    masks the integration had to build as SDPA builds them (S_q x S_k)."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.full_masks = 0
        real_attention, real_varlen = ops.attention, ops.attention_varlen
        real_sdpa_mask = masking_utils.sdpa_mask

        def attention(q, k, v, attn_mask=None, dropout_p=0.0, causal=False, **kwargs):
            self.calls.append(dict(op="attention", q=q.shape, k=k.shape, dropout_p=dropout_p,
                                   mask=None if attn_mask is None else attn_mask.shape,
                                   causal=causal, window=kwargs.get("window")))
            return real_attention(q, k, v, attn_mask, dropout_p, causal, **kwargs)

        def attention_varlen(q, k, v, *args, **kwargs):
            self.calls.append(dict(op="varlen", q=q.shape, k=k.shape,
                                   dropout_p=kwargs.get("dropout_p", 0.0)))
            return real_varlen(q, k, v, *args, **kwargs)

        def sdpa_mask(*args, **kwargs):
            self.full_masks += 1
            return real_sdpa_mask(*args, **kwargs)

        monkeypatch.setattr(ops, "attention", attention)
        monkeypatch.setattr(ops, "attention_varlen", attention_varlen)
        # the SDPA models reach sdpa_mask through transformers' registry, not this name
        monkeypatch.setattr(masking_utils, "sdpa_mask", sdpa_mask)


def padded_batch(side: str, batch: int = 3, length: int = 10):
    """Random token ids with an attention mask padding rows 0 and 1 by 3 and 6 tokens on
    `side` (row 2 unpadded)."""
    ids = torch.randint(1, VOCAB, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in ((0, 3), (1, 6)):
        if side == "left":
            mask[row, :pad] = 0
        else:
            mask[row, length - pad:] = 0
    ids[mask == 0] = 0
    return ids, mask


def test_register_is_idempotent_and_serves_the_name():
    assert hf.register() == "ckpt_attn"
    entry = AttentionInterface._global_mapping["ckpt_attn"]
    assert hf.register() == "ckpt_attn"
    assert AttentionInterface._global_mapping["ckpt_attn"] is entry
    assert AttentionMaskInterface._global_mapping["ckpt_attn"] is hf.key_padding_mask
    config = LlamaConfig(**COMMON, num_key_value_heads=2)
    model = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="ckpt_attn")
    assert model.config._attn_implementation == "ckpt_attn"
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("ckpt_attn")
    assert model.config._attn_implementation == "ckpt_attn"
    with pytest.raises(ValueError, match="backend"):
        hf.register(backend="cuda")
    with pytest.raises(ValueError, match="sdpa"):
        hf.register("sdpa")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_padded_batch_matches_sdpa(family, side, monkeypatch):
    ours, sdpa, reference = build(family)
    ids, mask = padded_batch(side)
    spy = OpSpy(monkeypatch)
    assert_models_agree(ours, sdpa, reference, mask.bool(), f"{family} {side}-padded",
                        input_ids=ids, attention_mask=mask)
    # the padding reached the op as a (B, 1, 1, S_k) key mask, GQA's k with its own heads
    config = ours.config
    assert spy.calls and all(call["op"] == "attention" for call in spy.calls)
    assert spy.full_masks == 0
    for call in spy.calls:
        assert call["mask"] == (3, 1, 1, 10)
        assert call["k"][1] == config.num_key_value_heads < config.num_attention_heads
    windows = [call["window"] for call in spy.calls]
    expected = {"llama": [None, None], "mistral": [(3, -1), (3, -1)],
                "qwen2": [None, (3, -1)]}[family]
    assert windows == expected


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_batch_matches_separate_sequences(family, monkeypatch):
    """Three sequences packed into one row (DataCollatorWithFlattening) give the logits and
    gradients of the three run one by one, whichever way the packing reaches attention:
    the model's own mask (no cache), position_ids with a cache kept, flash-attention's
    cu_seq_lens keyword arguments."""
    ours, sdpa, reference = build(family)
    lengths = (5, 7, 4)
    sequences, separate = one_by_one(lengths, sdpa=sdpa, reference=reference)
    features = [{"input_ids": s.tolist()} for s in sequences]
    rows = torch.ones(1, sum(lengths), dtype=torch.bool)
    ways = {"mask": (dict(), False), "positions": (dict(), True),
            "flash kwargs": (dict(return_flash_attn_kwargs=True), True)}
    for way, (options, use_cache) in ways.items():
        batch = DataCollatorWithFlattening(**options)(features)
        batch.pop("labels")
        spy = OpSpy(monkeypatch)
        logits, grads = logits_and_grads(ours, rows, use_cache=use_cache, **batch)
        assert [call["op"] for call in spy.calls] == ["varlen"] * 2, way
        assert spy.full_masks == 0
        assert_within_rule(logits, separate["sdpa"][0], separate["reference"][0],
                           factor=FORWARD_FACTOR, atol=ATOL[torch.float32],
                           what=f"hf {family} packed logits")
        assert_within_rule(grads, separate["sdpa"][1], separate["reference"][1],
                           factor=GRADIENT_FACTOR, atol=ATOL[torch.float32],
                           what=f"hf {family} packed grads")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_left_padded_gives_sdpa_tokens(family, monkeypatch):
    """Greedy decoding past the sliding window: the same tokens, and the same per-step
    logits within float32 rounding; decode steps run bottom-right causal with a key mask."""
    ours, sdpa, _ = build(family)
    ids, mask = padded_batch("left", length=8)
    outputs = {}
    spy = OpSpy(monkeypatch)
    for name, model in (("ours", ours), ("sdpa", sdpa)):
        outputs[name] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                       do_sample=False, output_logits=True,
                                       return_dict_in_generate=True)
    assert torch.equal(outputs["ours"].sequences, outputs["sdpa"].sequences)
    for step, (a, b) in enumerate(zip(outputs["ours"].logits, outputs["sdpa"].logits,
                                      strict=True)):
        assert (a - b).abs().max().item() < 1e-5, step
    # decode steps: one query, the padding as a key mask (None once no padding is in view)
    assert spy.full_masks == 0
    decode = [call for call in spy.calls if call["q"][2] == 1]
    assert all(call["mask"] in (None, (3, 1, 1, call["k"][2])) for call in decode)
    assert any(call["mask"] is not None for call in decode)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chunked_prefill_matches_one_pass(family, monkeypatch):
    """A left-padded prompt fed in two chunks through a DynamicCache: the second chunk's
    queries are the last 4 of 10 positions (bottom-right causal, past the window). The
    cache is built without the config, so sliding layers keep every key too: the keys
    left of every query's window are cut off before the op."""
    ours, sdpa, reference = build(family)
    ids, mask = padded_batch("left")
    rows = mask[:, 6:].bool()
    spy = OpSpy(monkeypatch)
    results = {}
    for name, model in (("ours", ours), ("sdpa", sdpa), ("reference", reference)):
        with torch.no_grad():
            cache = DynamicCache()
            model(input_ids=ids[:, :6], attention_mask=mask[:, :6], cache=cache,
                  use_cache=True)
            logits = model(input_ids=ids[:, 6:], attention_mask=mask, cache=cache,
                           use_cache=True).logits
        results[name] = logits[rows]
    with torch.no_grad():
        one_pass = sdpa(input_ids=ids, attention_mask=mask).logits[:, 6:][rows]
    assert (results["sdpa"] - one_pass).abs().max().item() < 1e-5  # the scenario is sound
    assert spy.full_masks == 0 and not any(call["causal"] for call in spy.calls[2:])
    key_lengths = {"llama": [10, 10], "mistral": [7, 7], "qwen2": [10, 7]}[family]
    assert [call["k"][2] for call in spy.calls[2:]] == key_lengths
    assert_within_rule(results["ours"], results["sdpa"], results["reference"],
                       factor=FORWARD_FACTOR, atol=ATOL[torch.float32],
                       what=f"hf {family} chunked prefill logits")


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_static_cache_generate_gives_sdpa_tokens(family, monkeypatch):
    """Static caches: generate() builds the masks ahead and hands them back to the model;
    Llama's query offset arrives as a tensor and its key buffer is longer than what was
    written (the unwritten keys stay invisible); Mistral's window rolls."""
    ours, sdpa, _ = build(family)
    ids, mask = padded_batch("left", length=8)
    spy = OpSpy(monkeypatch)
    tokens = [model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                             do_sample=False, cache_implementation="static")
              for model in (ours, sdpa)]
    assert torch.equal(*tokens)
    assert spy.calls and spy.full_masks == 0
    assert all(call["mask"] in (None, (3, 1, 1, call["k"][2])) for call in spy.calls)
    assert any(call["mask"] is not None for call in spy.calls if call["q"][2] == 1)


def test_inductor_compiles_a_padded_model_in_one_graph():
    """torch.compile(fullgraph=True) with inductor over a left-padded GQA Llama: one graph,
    logits and gradients under the rule against the float64 SDPA model."""
    ours, sdpa, reference = build("llama")
    ids, mask = padded_batch("left")
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = torch.compile(ours, backend="inductor", fullgraph=True)
        rows = mask.bool()
        inputs = dict(input_ids=ids, attention_mask=mask, use_cache=False)
        (our_logits, our_grads), (sdpa_logits, sdpa_grads), (ref_logits, ref_grads) = (
            logits_and_grads(model, rows, **inputs) for model in (compiled, sdpa, reference))
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()
    assert_within_rule(our_logits, sdpa_logits, ref_logits, factor=FORWARD_FACTOR,
                       atol=ATOL[torch.float32], what="hf llama compiled logits")
    assert_within_rule(our_grads, sdpa_grads, ref_grads, factor=GRADIENT_FACTOR,
                       atol=ATOL[torch.float32], what="hf llama compiled grads")


def test_dropout_follows_the_module(monkeypatch):
    ours, sdpa, _ = build("llama", attention_dropout=0.25)
    ids, mask = padded_batch("right")
    spy = OpSpy(monkeypatch)
    with torch.no_grad():
        evaluated = ours(input_ids=ids, attention_mask=mask).logits
        assert {call["dropout_p"] for call in spy.calls} == {0.0}
        ours.train()
        spy.calls.clear()
        torch.manual_seed(3)
        trained = ours(input_ids=ids, attention_mask=mask).logits
        torch.manual_seed(3)
        again = ours(input_ids=ids, attention_mask=mask).logits
    assert {call["dropout_p"] for call in spy.calls} == {0.25}
    assert torch.equal(trained, again)
    assert (trained - evaluated)[mask.bool()].abs().max().item() > 1e-3
    assert torch.allclose(evaluated, sdpa(input_ids=ids, attention_mask=mask).logits,
                          atol=1e-5)


def test_unknown_mask_pattern_is_built_as_sdpa_builds_it(monkeypatch):
    """A mask function the integration does not recognise becomes SDPA's full bool mask
    (carried as the layout's full_mask), which the op reads as is."""

    def even_keys(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx % 2 == 0

    pattern = and_masks(causal_mask_function, even_keys)
    padding = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    arguments = dict(batch_size=2, q_length=6, kv_length=6, mask_function=pattern,
                     attention_mask=padding)
    expected = sdpa_mask(**arguments, allow_is_causal_skip=False)
    spy = OpSpy(monkeypatch)
    ours = hf.key_padding_mask(**arguments)
    assert spy.full_masks == 1
    assert torch.equal(ours.mask_layout.full_mask, expected)
    # the recognised pattern, by contrast, is a key mask with the causal flag
    recognised = hf.key_padding_mask(**{**arguments, "mask_function": causal_mask_function})
    assert isinstance(recognised, hf.KeyPaddingMask) and recognised.mask_layout.causal
    assert spy.full_masks == 1
    assert torch.equal(recognised.as_subclass(torch.Tensor), padding[:, None, None, :])


def test_masks_not_made_by_the_mask_function_are_read_as_sdpa_reads_them():
    """Called directly: None is causal (top-left) for several queries and open for one;
    a caller's 4-D mask is used as given; a sliding window with no mask is refused."""
    ours, _, _ = build("llama")
    module = ours.model.layers[0].self_attn
    cases = [(6, 6, None), (1, 6, None),
             (5, 5, torch.rand(2, 1, 5, 5) > 0.3),
             (5, 5, torch.randn(2, 1, 5, 5))]
    for q_len, k_len, mask in cases:
        q = torch.randn(2, 4, q_len, 16)
        k, v = torch.randn(2, 2, k_len, 16), torch.randn(2, 2, k_len, 16)
        expected, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
        got, weights = hf.attention_forward(module, q, k, v, mask, scaling=0.3,
                                            backend="torch")
        assert weights is None and got.shape == expected.shape == (2, q_len, 4, 16)
        assert (got - expected).abs().max().item() < 1e-5, (q_len, k_len)
    q, k = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16)
    with pytest.raises(ValueError, match="sliding_window"):
        hf.attention_forward(module, q, k, k, None, sliding_window=3, backend="torch")


@pytest.mark.parametrize("argument, value", [("softcap", 30.0), ("s_aux", torch.zeros(4)),
                                             ("position_bias", torch.zeros(1, 4, 3, 3))])
def test_unsupported_features_are_refused_by_name(argument, value):
    ours, _, _ = build("llama")
    module = ours.model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 16)
    k = v = torch.randn(1, 2, 3, 16)
    with pytest.raises(ValueError, match=argument):
        hf.attention_forward(module, q, k, v, None, **{argument: value})


def test_output_attentions_follows_sdpa(caplog):
    """output_attentions=True: sdpa's answer (its logits, no weights) and one warning, not
    an error."""
    ours, sdpa, _ = build("llama")
    ids, mask = padded_batch("left")
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask, output_attentions=True)
        again = ours(input_ids=ids, attention_mask=mask, output_attentions=True)
        expected = sdpa(input_ids=ids, attention_mask=mask, output_attentions=True)
    warnings = [record for record in caplog.records if record.name == hf.__name__
                and "output_attentions=True" in record.getMessage()]
    assert len(warnings) == 1
    assert (got.logits - expected.logits)[mask.bool()].abs().max().item() < 1e-5
    assert torch.equal(got.logits, again.logits)
    assert got.attentions == expected.attentions


def test_library_imports_without_transformers():
    """`import ckpt_attn` (and its integrations package) never imports transformers."""
    code = ("import sys, ckpt_attn, ckpt_attn.integrations; "
            "sys.exit(1 if 'transformers' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


def compiled(model):
    """model under torch.compile with inductor (the compiler users run)."""
    return torch.compile(model, backend="inductor")


def logits_of(model, **inputs):
    """The model's logits, no gradients."""
    with torch.no_grad():
        return model(**inputs).logits


# position_ids that do not step by 1 within a row: a restart mid-row (two sequences by
# position, one by the attention_mask), and stride 2 (position interpolation)
LENGTH = 12
RESTARTING = torch.cat([torch.arange(6), torch.arange(6)])[None]
STRIDE_TWO = torch.arange(0, 2 * LENGTH, 2)[None]


@pytest.mark.parametrize("positions", ["restarting", "stride two"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_position_ids_with_an_attention_mask_attend_as_sdpa(family, positions):
    """Given an attention_mask (here all ones), position_ids never split a row into packed
    sequences: each row attends as sdpa attends, logits and gradients under the rule."""
    ours, sdpa, reference = build(family)
    ids = torch.randint(1, VOCAB, (2, LENGTH))
    position_ids = {"restarting": RESTARTING, "stride two": STRIDE_TWO}[positions]
    rows = torch.ones(2, LENGTH, dtype=torch.bool)
    assert_models_agree(ours, sdpa, reference, rows, f"{family} {positions} positions",
                        input_ids=ids, attention_mask=torch.ones_like(ids),
                        position_ids=position_ids.expand(2, -1), use_cache=False)


def test_eager_and_compiled_read_position_ids_alike():
    """Eager and inductor-compiled code give the same logits for every way position_ids and
    the attention_mask combine: with a mask, sdpa's whole-row attention; without one and
    with a cache kept (flash-attention's reading), the packed sequences; without one and
    without a cache, masking_utils' packing (sdpa's answer)."""
    ours, sdpa, _ = build("llama")
    model = compiled(ours)
    ids = torch.randint(1, VOCAB, (1, LENGTH))
    one_by_one = torch.cat([logits_of(sdpa, input_ids=ids[:, :6]),
                            logits_of(sdpa, input_ids=ids[:, 6:])], dim=1)
    cases = {
        "mask, restarting": (dict(attention_mask=torch.ones_like(ids), position_ids=RESTARTING),
                             None),
        "mask, stride two": (dict(attention_mask=torch.ones_like(ids), position_ids=STRIDE_TWO),
                             None),
        "no mask, cache": (dict(position_ids=RESTARTING, use_cache=True), one_by_one),
        "no mask, no cache": (dict(position_ids=RESTARTING, use_cache=False), None),
    }
    try:
        for case, (inputs, expected) in cases.items():
            eager = logits_of(ours, input_ids=ids, **inputs)
            if expected is None:
                expected = logits_of(sdpa, input_ids=ids, **inputs)
            assert (eager - expected).abs().max().item() < 1e-5, case
            assert (logits_of(model, input_ids=ids, **inputs) - eager).abs().max().item() < 1e-5, \
                case
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("use_cache", [False, True])
def test_flash_kwargs_batch_compiles(use_cache):
    """A padding-free batch from DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    under torch.compile: the logits and gradients of the sequences run one by one."""
    ours, sdpa, reference = build("qwen2")
    lengths = (5, 7, 4)
    sequences, separate = one_by_one(lengths, sdpa=sdpa, reference=reference)
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": s.tolist()} for s in sequences])
    batch.pop("labels")
    try:
        logits, grads = logits_and_grads(compiled(ours), torch.ones(1, sum(lengths), dtype=bool),
                                         use_cache=use_cache, **batch)
    finally:
        torch._dynamo.reset()
    assert_within_rule(logits, separate["sdpa"][0], separate["reference"][0],
                       factor=FORWARD_FACTOR, atol=ATOL[torch.float32],
                       what="hf compiled flash kwargs logits")
    assert_within_rule(grads, separate["sdpa"][1], separate["reference"][1],
                       factor=GRADIENT_FACTOR, atol=ATOL[torch.float32],
                       what="hf compiled flash kwargs grads")


@pytest.mark.parametrize("padded", [False, True])
def test_readme_budget_example_trains(padded):
    """The README's example: attn_implementation set to ckpt_attn, then the budget policy
    (which plans on fake tensors of the decoder layers, the mask among their arguments),
    then a training step: the loss and gradients of the unchecked model exactly."""
    import ckpt_attn

    ours, _, _ = build("llama")
    plain = copy.deepcopy(ours)
    ckpt_attn.apply_checkpointing(ours, "budget", budget_bytes=2**30)
    ids, mask = padded_batch("right")
    inputs = dict(input_ids=ids, labels=ids, use_cache=False,
                  attention_mask=mask if padded else None)
    results = []
    for model in (ours, plain):
        model.train()
        model.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss, grads), (plain_loss, plain_grads) = results
    assert torch.equal(loss, plain_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads, strict=True))


@pytest.mark.parametrize("padded", [False, True])
def test_measure_on_fake_and_meta_tensors(padded):
    """memory.measure of a model served by ckpt_attn on fake tensors counts the FLOPs of the
    real run (no tensor value is read on the way), and on the meta device with a padded
    batch keeps the real run's bytes. (Without an attention_mask, transformers' own
    masking_utils reads position_ids, which meta tensors cannot answer, for sdpa too.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ckpt_attn.memory import measure

    ours, _, _ = build("llama")
    ids, mask = padded_batch("left")
    inputs = dict(input_ids=ids, use_cache=False, attention_mask=mask if padded else None)
    real = measure(ours, **inputs)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = measure(ours, **inputs)
    assert fake.forward_flops == real.forward_flops
    assert fake.backward_flops == real.backward_flops
    if padded:
        on_meta = copy.deepcopy(ours).to("meta")
        meta = measure(on_meta, input_ids=ids.to("meta"), attention_mask=mask.to("meta"),
                       use_cache=False)
        assert meta.kept_bytes == real.kept_bytes
        assert meta.forward_flops == real.forward_flops


def custom_masks(batch: int, length: int) -> dict:
    """4-D masks a caller prepares: bool (causal and random), float, and bool with fully
    masked query rows (rows 3 and 7 of sample 0 see no key)."""
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    generator = torch.Generator().manual_seed(5)
    random = torch.rand(batch, 1, length, length, generator=generator) > 0.3
    bool_mask = causal & (random | torch.eye(length, dtype=torch.bool))
    float_mask = torch.where(bool_mask, torch.randn(bool_mask.shape, generator=generator), -1e9)
    empty_rows = bool_mask.clone()
    empty_rows[0, :, [3, 7]] = False
    return {"4-D bool": bool_mask, "4-D float": float_mask, "4-D empty rows": empty_rows}


@pytest.mark.parametrize("form", ["4-D bool", "4-D float", "4-D empty rows",
                                  "padded, 1-row positions", "all ones, 1-row positions",
                                  "padded, batch positions", "no mask, batch positions, cache",
                                  "no mask, no positions"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_input_forms_match_sdpa_eager_and_compiled(family, form):
    """Each input form transformers accepts gives sdpa's logits, eager and compiled: under the
    rule against float64 and within 1e-5 of eager when compiled. position_ids of shape
    (1, S) or (B, S) never pack a batch of several rows (transformers packs one row only)."""
    ours, sdpa, reference = build(family)
    ids, mask = padded_batch("left", length=LENGTH)
    rows = torch.ones_like(mask, dtype=torch.bool)  # fully masked 4-D rows too: 0, as in sdpa
    cast = {}
    if form.startswith("4-D"):
        masks = custom_masks(3, LENGTH)
        inputs = dict(attention_mask=masks[form], use_cache=False)
        if form == "4-D float":
            cast = {torch.float64: dict(attention_mask=masks[form].double())}
    else:
        restarting = RESTARTING.expand(3, -1)
        inputs = {"padded, 1-row positions": dict(attention_mask=mask, position_ids=RESTARTING),
                  "all ones, 1-row positions": dict(attention_mask=torch.ones_like(mask),
                                                    position_ids=RESTARTING),
                  "padded, batch positions": dict(attention_mask=mask,
                                                  position_ids=STRIDE_TWO.expand(3, -1)),
                  "no mask, batch positions, cache": dict(position_ids=restarting),
                  "no mask, no positions": dict()}[form]
        inputs["use_cache"] = form.endswith("cache")
        if form.startswith("padded"):
            rows = mask.bool()
    results = {}
    for name, model in (("ours", ours), ("sdpa", sdpa), ("reference", reference)):
        dtype = next(model.parameters()).dtype
        results[name] = logits_of(model, input_ids=ids, **{**inputs, **cast.get(dtype, {})})
    assert_within_rule(results["ours"][rows], results["sdpa"][rows], results["reference"][rows],
                       factor=FORWARD_FACTOR, atol=ATOL[torch.float32],
                       what=f"hf {family} {form} logits")
    try:
        again = logits_of(compiled(ours), input_ids=ids, **inputs)
    finally:
        torch._dynamo.reset()
    assert (again - results["ours"])[rows].abs().max().item() < 1e-5

"""The unsteered bottom layers run once per prompt (steerkern.trunk) and the sweeps that use it
(steerkern.prefill mode A): equal to whole per-row passes on every tiny architecture, with the
bottom layers seeing only the distinct prompts."""

from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig

from steerkern.models import decoder_layers, hidden_size
from steerkern.prefill import forward_rest, shared_prefill
from steerkern.sweep import _forward_logits, _steering, sweep_generate
from steerkern.trunk import bottom_layers, lowest_steered_layer, run_bottom, skip_bottom
from steerkern.vectors import SteeringPart, SteeringVector
from tests.test_more_architectures import MORE, build
from tests.tiny_models import (
    ARCHITECTURES,
    build_tiny_model,
    skip_if_rows_couple,
    skip_unless_rows_can_share_a_cache,
)


def _left_pad(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _prompts(seed=0):
    """Three prompts with a 6-token common prefix and suffixes of 4, 6 and 3 tokens."""
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, 100, (6,), generator=generator).tolist()
    return _left_pad([prefix + torch.randint(3, 100, (n,), generator=generator).tolist()
                      for n in (4, 6, 3)])


def _vector(model, parts: dict, seed=1):
    """Residual parts at the given layers (``{layer: scale}``), plus any ``(layer, target)``."""
    generator = torch.Generator().manual_seed(seed)
    width = hidden_size(model)
    built = {}
    for key, scale in parts.items():
        layer, target = key if isinstance(key, tuple) else (key, "residual")
        module_width = width
        if target != "residual":
            from steerkern.models import resolve_module
            module_width = resolve_module(model, layer, target).weight.shape[0]
        built[(layer, target)] = SteeringPart(bias=scale * torch.randn(module_width, generator=generator))
    return SteeringVector(built)


def _prefill(model, ids, mask, index, vectors, slots, coeffs, depth, **share):
    """``shared_prefill`` in mode A: every row its own arm, prompts steered, with the bottom
    ``depth`` layers shared unless ``share`` overrides the arguments."""
    def steer_prefix(rows):
        return _steering(model, vectors, [slots[r] for r in rows], [coeffs[r] for r in rows], "all")

    arguments = dict(groups=list(zip(slots, coeffs)), steer_prefix=steer_prefix,
                     unsteered_layers=depth, steer_rows=lambda: steer_prefix(list(range(len(slots)))))
    arguments.update(share)
    with torch.no_grad():
        return shared_prefill(model, ids, mask, index, pad_id=0, **arguments)


def _answer_logits(model, shared, ids, mask, index, vectors, slots, coeffs):
    """``(shared, whole, unsteered)`` logits at the answer position ``[R, V]``: from the shared
    prefill, from whole per-row passes (both steered), and unsteered."""
    with torch.no_grad():
        with _steering(model, vectors, slots, coeffs, "all"):
            got = forward_rest(model, shared, shared.ids, shared.mask, keep=1)[:, -1]
            want = _forward_logits(model, ids[index], mask[index], keep=1)[:, -1]
        unsteered = _forward_logits(model, ids[index], mask[index], keep=1)[:, -1]
    return got, want, unsteered


def test_lowest_steered_layer_counts_only_steered_rows():
    a = SteeringVector({(3, "residual"): SteeringPart(bias=torch.ones(8)),
                        (2, "mlp.down_proj"): SteeringPart(bias=torch.ones(8))})
    b = SteeringVector({(1, "residual"): SteeringPart(bias=torch.ones(8))})
    assert lowest_steered_layer([a, b], [0, -1, 0]) == 2
    assert lowest_steered_layer([a, b], [0, 1]) == 1
    assert lowest_steered_layer([a, b], [-1, -1]) == 0


def test_skip_bottom_reproduces_whole_passes_and_restores_the_layers():
    model = build_tiny_model("llama")
    ids, mask = _prompts()
    rows = torch.tensor([2, 0, 1, 0, 2])
    layers = bottom_layers(model, 2)
    assert layers is not None and len(layers) == 2
    with torch.no_grad():
        want = _forward_logits(model, ids[rows], mask[rows], keep=ids.shape[1])
        hidden, layout = run_bottom(model, layers, lambda: _forward_logits(model, ids, mask, keep=1))
        assert hidden.shape == (3, ids.shape[1], 64)
        with skip_bottom(layers, hidden[rows], layout):
            got = _forward_logits(model, ids[rows], mask[rows], keep=ids.shape[1])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="skip_bottom"):  # a pass of another shape
            with skip_bottom(layers, hidden[rows], layout):
                _forward_logits(model, ids, mask, keep=1)
    assert all("forward" not in layer.__dict__ for layer in layers)
    with torch.no_grad():
        torch.testing.assert_close(_forward_logits(model, ids[rows], mask[rows], keep=ids.shape[1]), want)


def test_layer_outputs_that_carry_more_than_hidden_states_are_not_reproduced():
    from steerkern.trunk import _as_layout, _layout

    hidden = torch.zeros(2, 3, 4)
    assert _layout(hidden) == 0 and _as_layout(hidden, 0) is hidden
    assert _layout((hidden, None)) == 2 and _as_layout(hidden, 2) == (hidden, None)
    assert _layout((hidden, torch.ones(1))) is None  # attention weights, a present cache, ...
    assert _layout(None) is None and _layout(()) is None


def test_bottom_layers_refuse_hooked_or_missing_layers():
    model = build_tiny_model("llama")
    assert bottom_layers(model, 0) is None
    assert bottom_layers(model, 5) is None  # deeper than the model
    handle = decoder_layers(model)[1].mlp.register_forward_hook(lambda *args: None)
    try:
        assert bottom_layers(model, 1) is not None
        assert bottom_layers(model, 2) is None  # someone watches layer 1
    finally:
        handle.remove()


ALL = [("tiny", arch) for arch in ARCHITECTURES] + [("more", name) for name in sorted(MORE)]


def _model(kind, name):
    return build_tiny_model(name) if kind == "tiny" else build(name)


@pytest.mark.parametrize("kind,name", ALL, ids=[name for _, name in ALL])
def test_steered_prompt_sweeps_share_the_bottom_layers(kind, name, monkeypatch):
    """Mode A with the bottom shared: layers [0, 2) run the 3 prompts, the rest the 6 rows; the
    answer logits and greedy sweeps equal whole per-row passes (vectors at layers 2 and 3)."""
    model = _model(kind, name)
    skip_unless_rows_can_share_a_cache(model, 32, models_own=True)
    skip_if_rows_couple(model, name)  # shared and plain passes batch the rows differently
    ids, mask = _prompts()
    index = torch.tensor([0, 1, 2, 0, 1, 2])
    vectors = [_vector(model, {2: 4.0, 3: 2.0})]
    slots, coeffs = [0] * 6, [-2.0] * 3 + [3.0] * 3

    # rows each layer computes (hooks on the bottom layers would turn the sharing off)
    layers = decoder_layers(model)
    rows_seen = {0: [], 2: []}
    layer_class, forward = type(layers[0]), type(layers[0]).forward

    def counting(self, *args, **kwargs):
        for i in rows_seen:
            if self is layers[i]:
                # the batch axis: third from last (Gemma 3n's residual copies come first)
                rows_seen[i].append((args[0] if args else kwargs["hidden_states"]).shape[-3])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(layer_class, "forward", counting)
    shared = _prefill(model, ids, mask, index, vectors, slots, coeffs, depth=2)
    monkeypatch.undo()
    assert shared is not None and shared.cached == ids.shape[1] - 1
    if _layer_returns_only_hidden_states(model):
        # layer 0 runs the common prefix once, then the 3 prompts' suffixes; layer 2 runs the
        # prefix for the 2 arms, then the suffixes for the 6 rows
        assert rows_seen[0] == [1, 3] and rows_seen[2] == [2, 6]
    else:  # e.g. GPT-J before transformers 4.56 returns its cache too: tried, then whole rows
        assert rows_seen[0] == [1, 2, 3, 6] and rows_seen[2] == [2, 6]
    got, want, unsteered = _answer_logits(model, shared, ids, mask, index, vectors, slots, coeffs)
    assert (want - unsteered).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    config = GenerationConfig(do_sample=False, max_new_tokens=4, min_new_tokens=4, pad_token_id=0,
                              eos_token_id=2)
    tokenizer = SimpleNamespace(pad_token_id=0)
    for positions in ("all", "prompt"):
        with torch.no_grad():
            plain, fast = (sweep_generate(model, tokenizer, vectors, ids, mask, index, slots, coeffs,
                                          config=config, positions=positions, share_prefill=share)
                           for share in (False, True))
        assert torch.equal(plain, fast), positions


def _layer_returns_only_hidden_states(model) -> bool:
    from steerkern.trunk import _layout

    seen = []
    handle = decoder_layers(model)[0].register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            model(torch.ones(1, 3, dtype=torch.long), use_cache=True)
    finally:
        handle.remove()
    return _layout(seen[0]) is not None


def test_sub_module_parts_keep_their_layer_computed():
    """A part on layer 2's mlp.down_proj: only layers [0, 2) are shared, and the scores equal
    whole per-row passes."""
    model = build_tiny_model("llama")
    ids, mask = _prompts(seed=3)
    index = torch.tensor([0, 1, 2, 1])
    vectors = [_vector(model, {(2, "mlp.down_proj"): 5.0}), _vector(model, {3: 4.0}, seed=2)]
    slots, coeffs = [0, 0, 1, 1], [2.0, 2.0, -3.0, -3.0]
    depth = lowest_steered_layer(vectors, slots)
    assert depth == 2
    shared = _prefill(model, ids, mask, index, vectors, slots, coeffs, depth)
    assert shared is not None and shared.cached == ids.shape[1] - 1
    got, want, unsteered = _answer_logits(model, shared, ids, mask, index, vectors, slots, coeffs)
    assert (want - unsteered).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_prompts_without_a_common_prefix_still_share_the_bottom():
    """No common prefix (k = 0): nothing for stage A, but the bottom layers still run each prompt
    once; the scores equal whole per-row passes."""
    model = build_tiny_model("qwen2")
    ids, mask = _left_pad([[5, 9, 17, 4], [33, 8, 2, 71, 6, 12], [40, 41]])
    index = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    vectors = [_vector(model, {1: 3.0})]
    slots, coeffs = [0] * 7, [1.0, 1.0, 1.0, -4.0, -4.0, -4.0, 2.0]
    shared = _prefill(model, ids, mask, index, vectors, slots, coeffs, depth=1)
    assert shared is not None and shared.prefix == 0 and shared.cached == ids.shape[1] - 1
    # without the bottom there is nothing to share
    assert _prefill(model, ids, mask, index, vectors, slots, coeffs, depth=1, steer_rows=None) is None
    got, want, unsteered = _answer_logits(model, shared, ids, mask, index, vectors, slots, coeffs)
    assert (want - unsteered).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_low_rank_parts_above_the_shared_bottom():
    """Low-rank parts on top of the shared bottom: a weight delta on layer 2's mlp.down_proj
    (reading its input, computed from the gathered output of layer 1) and a residual part at
    layer 3 reading its output: the scores equal whole per-row passes."""
    model = build_tiny_model("mistral")
    ids, mask = _prompts(seed=5)
    index = torch.tensor([0, 1, 2, 0, 1, 2])
    generator = torch.Generator().manual_seed(7)
    A, B = torch.randn(64, 2, generator=generator), torch.randn(64, 2, generator=generator)
    delta = SteeringPart(A=0.3 * torch.randn(96, 2, generator=generator), B=0.3 * B, source="input")
    vectors = [SteeringVector({(2, "mlp.down_proj"): delta,
                               (3, "residual"): SteeringPart(bias=torch.randn(64, generator=generator),
                                                             A=0.2 * B, B=0.2 * A)})]
    slots, coeffs = [0] * 6, [1.5] * 3 + [-2.5] * 3
    shared = _prefill(model, ids, mask, index, vectors, slots, coeffs, depth=2)
    assert shared is not None and shared.cached == ids.shape[1] - 1
    got, want, unsteered = _answer_logits(model, shared, ids, mask, index, vectors, slots, coeffs)
    assert (want - unsteered).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_residual_stream_kept_in_copies_is_gathered_along_its_batch_axis():
    """Gemma 3n keeps the residual stream as ``[S, B, L, D]`` (AltUp copies): the bottom's
    output is gathered per row along B, not along the copies; the answer logits equal whole
    per-row passes."""
    import contextlib

    import transformers

    if not hasattr(transformers, "Gemma3nForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no Gemma 3n")
    config = transformers.Gemma3nTextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, vocab_size_per_layer_input=128,
        hidden_size_per_layer_input=16, sliding_window=64, laurel_rank=8, altup_num_inputs=2,
        activation_sparsity_pattern=[0.0] * 4, num_kv_shared_layers=0,
        layer_types=["sliding_attention", "full_attention"] * 2)
    torch.manual_seed(0)
    model = transformers.Gemma3nForCausalLM(config).eval()
    skip_unless_rows_can_share_a_cache(model, 32, models_own=True)
    ids, mask = _prompts(seed=2)
    index = torch.tensor([0, 1, 2, 0, 1, 2])
    unsteered = lambda *rows: contextlib.nullcontext()  # noqa: E731
    with torch.no_grad():
        shared = shared_prefill(model, ids, mask, index, pad_id=0, groups=list(range(6)),
                                steer_prefix=unsteered, steer_rows=unsteered, unsteered_layers=2)
        assert shared is not None and shared.cached == ids.shape[1] - 1
        got = forward_rest(model, shared, shared.ids, shared.mask, keep=1)[:, -1]
        want = _forward_logits(model, ids[index], mask[index], keep=1)[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_model_with_a_cache_class_of_its_own_is_not_handed_a_dynamic_cache(monkeypatch):
    """LFM2 before transformers 5 defines ``Lfm2HybridConvCache`` in its modeling module and
    fails on a ``DynamicCache`` ("no attribute 'conv_cache'"): such models build their own."""
    import sys

    from steerkern.kvcache import empty_model_cache

    model = build_tiny_model("llama")
    assert empty_model_cache(model, 16) is not None
    module = sys.modules[type(model).__module__]
    own = type("LlamaHybridCache", (), {"__module__": module.__name__})
    monkeypatch.setattr(module, "LlamaHybridCache", own, raising=False)
    assert empty_model_cache(model, 16) is None

"""steerkern.memory: rows per pass when a sweep would not fit, and sweeps split that way."""

import numpy as np
import pytest
import torch

from steerkern import memory
from steerkern.eval import evaluate
from steerkern.vectors import SteeringVector
from tests.test_eval import TINY_PROMPTS, word_tokenizer


def test_row_bytes_reads_the_architecture(tiny_model_factory):
    """The KV term follows the config's key/value heads (grouped-query Llama vs GPT-2's one
    head per query head): its growth per token is ``layers * 2 * kv_heads * head_dim * elem``,
    the attention term is quadratic in the tokens, the logits term linear in ``keep``."""
    for arch in ("llama", "gpt2"):
        model = tiny_model_factory(arch)
        config = model.config
        heads = getattr(config, "num_attention_heads", None) or config.n_head
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        width = getattr(config, "hidden_size", None) or config.n_embd
        layers = getattr(config, "num_hidden_layers", None) or config.n_layer
        inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * width
        per_token_kv = 2 * layers * 2 * kv_heads * (width // heads) * 4
        one, two, three = (memory.row_bytes(model, t, keep=1) for t in (1, 2, 3))
        # second difference: the quadratic attention term alone
        assert (three - two) - (two - one) == 2 * heads * 4
        assert two - one == per_token_kv + 3 * heads * 4 + 3 * inner * 4
        vocab = model.get_output_embeddings().weight.shape[0]
        assert memory.row_bytes(model, 5, keep=4) - memory.row_bytes(model, 5, keep=1) == 3 * 3 * vocab * 4
    llama = tiny_model_factory("llama")
    if llama.config.num_key_value_heads < llama.config.num_attention_heads:
        assert memory.row_bytes(llama, 64, 1) < memory.row_bytes(tiny_model_factory("gpt2"), 64, 1) * 4


def test_rows_that_fit_divides_the_budget(monkeypatch, tiny_model_factory):
    model = tiny_model_factory("llama")
    per_row = memory.row_bytes(model, 10, 1)
    monkeypatch.setattr(memory, "free_bytes", lambda device: int(3.5 * per_row / memory.MEMORY_FRACTION))
    assert memory.rows_that_fit(model, 10) == 3
    assert memory.rows_that_fit(model, 40) < 3  # longer rows, fewer of them
    monkeypatch.setattr(memory, "free_bytes", lambda device: 0)
    assert memory.rows_that_fit(model, 10) == 1  # never zero rows


def test_free_bytes_of_the_host_is_positive():
    assert memory.free_bytes(torch.device("cpu")) > 0


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_evaluate_splits_a_sweep_that_does_not_fit(monkeypatch, tiny_model_factory, positions):
    """With a budget of a few rows, evaluate runs the sweep in several passes (counted on the
    model's forward) and reports what one batch reports."""
    model = tiny_model_factory("llama")
    vector = SteeringVector.from_directions({1: torch.randn(64, generator=torch.Generator().manual_seed(0))})
    tokenizer = word_tokenizer("left")
    kwargs = dict(coeffs=(-4.0, 0.0, 4.0), prompts=TINY_PROMPTS, max_new_tokens=3,
                  gen_prompts=["Tell me about your weekend", "Hello !"], positions=positions)
    whole = evaluate(model, tokenizer, vector, **kwargs)

    calls = []
    hook = model.register_forward_pre_hook(lambda module, args, kw: calls.append(1), with_kwargs=True)
    try:
        one_batch = len(calls)
        evaluate(model, tokenizer, vector, **kwargs)
        one_batch = len(calls) - one_batch
        per_row = memory.row_bytes(model, 16, 1)
        monkeypatch.setattr(memory, "free_bytes", lambda device: int(2 * per_row / memory.MEMORY_FRACTION))
        calls.clear()
        split = evaluate(model, tokenizer, vector, **kwargs)
    finally:
        hook.remove()
    assert len(calls) > one_batch  # more passes
    np.testing.assert_allclose(split.prompt_scores, whole.prompt_scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(split.nll, whole.nll, rtol=1e-5, atol=1e-5)
    assert split.samples == whole.samples

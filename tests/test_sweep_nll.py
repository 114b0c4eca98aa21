"""The NLL of a sweep's generations (``steerkern.sweep.generate_rows``) against an independent
reference: each row alone, unpadded, through the model's own logits and ``log_softmax``."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from steerkern import sweep
from steerkern.items import render
from steerkern.tokens import text_token_ids
from steerkern.vectors import SteeringVector
from tests.test_eval import word_tokenizer

PROMPTS = ["Are you happy ?", "Tell me about your weekend , I like cats", "Hello !"]
ARMS = [(0, -2.0), (-1, 0.0), (0, 2.0)]
NEW = 5


def build(arch):
    if arch in ("llama", "gpt2", "gemma2"):
        from tests.tiny_models import build_tiny_model

        return build_tiny_model(arch)
    from tests.test_more_architectures import build as build_more

    model = build_more(arch)
    if arch == "gptj":
        with torch.no_grad():
            model.lm_head.bias.normal_(0, 2.0)
    return model


def flagging(run, flags):
    """``run`` that keeps a True in ``flags`` while it runs."""
    def wrapped(*args, **kwargs):
        flags.append(True)
        try:
            return run(*args, **kwargs)
        finally:
            flags.pop()
    return wrapped


def tokens_for(prompt_ids, coeff):
    """The fixed "generation" of a row: a function of its prompt and coefficient; rows at
    coefficient 2 end with an EOS (2) at their third token."""
    tokens = [(sum(prompt_ids) + 7 * int(coeff + 2) + 13 * k) % 117 + 3 for k in range(NEW)]
    if coeff == 2.0:
        tokens[2] = 2
    return tokens


def reference_nll(model, prompt_ids, new, eos=2):
    """Mean -log p of ``new`` through its first ``eos``, the row alone and unpadded."""
    stop = new.index(eos) + 1 if eos in new else len(new)
    tokens = torch.tensor([prompt_ids + new[:stop]])
    with torch.no_grad():
        logits = model(input_ids=tokens).logits[0].double()
    logp = torch.log_softmax(logits[len(prompt_ids) - 1:-1], -1)
    return float(-logp.gather(-1, tokens[0, len(prompt_ids):, None]).mean())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gptj", "cohere", "granite", "gemma2"])
@pytest.mark.parametrize("share_prefill", [True, False])
def test_generation_nll_matches_each_row_alone(monkeypatch, arch, share_prefill):
    """Fixed generated tokens (one row ending at an EOS mid-way): the NLL equals each row's own
    under the unsteered model, for a plain head (Llama), a tied one (GPT-2), one with a bias
    (GPT-J), logits scaled after the head (Cohere, Granite) and soft-capped (Gemma 2, its head
    scaled up and its cap lowered so that the cap bends most logits). The NLL pass never runs the
    head: the fused log-probs model all of these."""
    model = build(arch)
    if arch == "granite":
        model.config.logits_scaling = 4.0
    if arch == "gemma2":
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(20.0)
        model.config.final_logit_softcapping = 2.0
    tokenizer = word_tokenizer("left")
    width = model.get_input_embeddings().weight.shape[1]
    vector = SteeringVector.from_directions({1: torch.randn(width, generator=torch.Generator().manual_seed(0))})
    rows = len(PROMPTS) * len(ARMS)

    def fake_generate(model, tokenizer, vectors, ids, mask, index, slots, coeffs, **kwargs):
        assert len(slots) == rows  # one pass
        out = [tokens_for(ids[p][mask[p].bool()].tolist(), c) for p, c in zip(index.tolist(), coeffs)]
        return torch.tensor(out)

    monkeypatch.setattr(sweep, "sweep_generate", fake_generate)
    in_nll_pass, wide_logits = [], []  # generate is faked: these forwards are the NLL pass's
    for name in ("forward_rest", "_forward_logits"):
        monkeypatch.setattr(sweep, name, flagging(getattr(sweep, name), in_nll_pass))
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: wide_logits.append(bool(in_nll_pass)))
    try:
        _, nll = sweep.generate_rows(model, tokenizer, [vector], PROMPTS, ARMS, max_new_tokens=NEW,
                                     share_prefill=share_prefill)
    finally:
        handle.remove()
    prompt_ids = text_token_ids(tokenizer, [render(tokenizer, p, answer=False) for p in PROMPTS])
    for g, ids in enumerate(prompt_ids):
        for a, (_, coeff) in enumerate(ARMS):
            want = reference_nll(model, ids, tokens_for(ids, coeff))
            np.testing.assert_allclose(nll[a, g], want, rtol=1e-4, atol=1e-4)
    assert not any(wide_logits)


class FlatHeadModel(torch.nn.Module):
    """A toy causal LM that hands its head the states flattened to ``[B * T, D]``."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(128, 16)
        self.lm_head = torch.nn.Linear(16, 128, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, **kwargs):
        rows, width = input_ids.shape
        logits = self.lm_head(self.embed(input_ids).reshape(rows * width, -1)).view(rows, width, -1)
        return SimpleNamespace(logits=logits)


class SaturatedCapModel(torch.nn.Module):
    """A toy causal LM whose every logit sits far past its soft-cap ``c`` (``|u| >= 100 c``), so
    that no logit lies where the cap can be inverted; ``wrong_cap`` applies another cap than the
    config says."""

    def __init__(self, cap=0.5, wrong_cap=None):
        super().__init__()
        self.config = SimpleNamespace(final_logit_softcapping=cap)
        self.embed = torch.nn.Embedding(128, 16)
        self.lm_head = torch.nn.Linear(16, 128, bias=False)
        self.applied = wrong_cap or cap
        with torch.no_grad():
            self.embed.weight.fill_(1.0)
            signs = torch.where(torch.arange(128) % 2 == 0, 1.0, -1.0)
            self.lm_head.weight.copy_(signs[:, None].expand(128, 16) * (10.0 + torch.arange(128)[:, None]))

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, **kwargs):
        u = self.lm_head(self.embed(input_ids))
        return SimpleNamespace(logits=self.applied * torch.tanh(u / self.applied))


def test_a_soft_cap_whose_logits_are_all_saturated_is_measured_or_refused():
    """Every logit beyond 0.9 c: nothing to fit the factor on, so it is taken as 1 and checked
    (the fit gave a = 0 and refused the model, naming a factor it never had); a cap the config
    does not name is still refused."""
    from steerkern.head import logit_scale

    ids = torch.tensor([[3, 4, 5]])
    mask = torch.ones_like(ids)
    model = SaturatedCapModel()
    assert logit_scale(model, model.lm_head, ids, mask, mask.cumsum(-1) - 1, softcap=0.5) == 1.0
    wrong = SaturatedCapModel(wrong_cap=0.25)
    with pytest.raises(ValueError, match="soft-cap 0.5 of its config"):
        logit_scale(wrong, wrong.lm_head, ids, mask, mask.cumsum(-1) - 1, softcap=0.5)


def test_a_head_fed_other_than_batch_states_reads_full_logits():
    """The fused log-probs read the head's input as ``[B, T, D]``: a model that feeds it other
    shapes is refused by the logit-factor measurement, and its sweep NLL reads full logits."""
    from steerkern.head import logit_scale

    model = FlatHeadModel()
    ids = torch.tensor([[3, 4, 5]])
    mask = torch.ones_like(ids)
    with pytest.raises(ValueError, match="batch, tokens, hidden"):
        logit_scale(model, model.lm_head, ids, mask, mask.cumsum(-1) - 1)
    assert sweep._fused_head(model, ids, mask) is None


def test_offloaded_head_gives_the_plain_models_texts_and_nll():
    """accelerate's CPU offload keeps the head's weight on 'meta' between calls: the fused NLL
    read it there ("Tensor.item() cannot be called on meta tensors"); it equals the plain run."""
    from accelerate import cpu_offload

    from tests.tiny_models import build_tiny_model

    plain = build_tiny_model("llama")
    offloaded = cpu_offload(build_tiny_model("llama"), execution_device=torch.device("cpu"))
    assert offloaded.lm_head.weight.device.type == "meta"
    direction = torch.randn(64, generator=torch.Generator().manual_seed(0))
    vector = SteeringVector.from_directions({1: direction})
    tokenizer = word_tokenizer("left")
    got = sweep.generate_rows(offloaded, tokenizer, [vector], PROMPTS, ARMS, max_new_tokens=3)
    want = sweep.generate_rows(plain, tokenizer, [vector], PROMPTS, ARMS, max_new_tokens=3)
    assert got[0] == want[0]
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert offloaded.lm_head.weight.device.type == "meta"

"""train_adapter: the loss goes down, the result steers, the model is left exactly as it was."""

import pytest
import torch

from steerkern import train as train_mod
from steerkern.control import steer
from steerkern.head import HeadLogits
from steerkern.models import decoder_layers
from steerkern.train import train_adapter
from tests.hooks import steerkern_hook_count
from tests.tiny_models import MergesOnEval


class ToyTokenizer:
    """Characters -> ids 3..122 with a BOS (1); pad 0. Enough for the tiny models (vocab 128)."""

    bos_token = None
    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + (ord(ch) % 120) for ch in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


WORDS = ["good", "glad", "kind", "warm", "nice", "fine"]
BADS = ["vile", "grim", "cold", "mean", "sour", "dull"]
PAIRS = [(f"it was {g} and the sky", f"it was {b} and the sky") for g, b in zip(WORDS, BADS)] + [
    (f"a {g} day for us", f"a {b} day for us") for g, b in zip(WORDS, BADS)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: one intra-op thread is ~10x faster than two on a shared, busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def snapshot(model):
    return ({name: p.detach().clone() for name, p in model.named_parameters()},
            {name: p.requires_grad for name, p in model.named_parameters()},
            [m.training for m in model.modules()])


def assert_unchanged(model, before):
    weights, flags, training = before
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[name]), name
        assert p.requires_grad == flags[name], name
    assert [m.training for m in model.modules()] == training
    assert steerkern_hook_count(model) == 0


def separation(model, tokenizer, vector, coeff, loss_layer, u, n_last=4):
    """Mean over pairs of (h_cho - h_rej) . u at the loss layer's last n_last positions."""
    seen = {}
    handle = decoder_layers(model)[loss_layer].register_forward_hook(
        lambda m, a, out: seen.__setitem__("h", (out[0] if isinstance(out, tuple) else out)))
    scores = []
    try:
        for cho, rej in PAIRS:
            states = []
            for text in (cho, rej):
                ids = torch.tensor([tokenizer(text)["input_ids"]])
                with torch.no_grad(), steer(model, vector, coeff=coeff):
                    model(input_ids=ids)
                states.append(seen["h"][0, -n_last:].float())
            scores.append(((states[0] - states[1]) @ u).mean())
    finally:
        handle.remove()
    return float(torch.stack(scores).mean())


@pytest.fixture(scope="module")
def trained(tiny_model_factory):
    model = tiny_model_factory("llama")
    before = snapshot(model)
    vector = train_adapter(model, ToyTokenizer(), PAIRS, layers=[1], loss_layer=2, rank=2,
                           steps=40, lr=3e-2, batch_size=4, progress=False, seed=0)
    return model, vector, before


def test_loss_decreases(trained):
    _, vector, _ = trained
    history = vector.metadata["loss_history"]
    assert len(history) == 40
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert vector.metadata["method"] == "trained_adapter"
    assert vector.metadata["loss_layer"] == 2 and vector.layers == [1]
    assert vector.metadata["final_loss"] == pytest.approx(sum(history[-10:]) / 10)


def test_model_left_unchanged(trained):
    model, _, before = trained
    assert_unchanged(model, before)


def reference_diffs(model, loss_layer=2, n_last=4):
    """Unsteered ``h_cho - h_rej`` at the loss layer's last n_last positions, ``[pairs, n_last, D]``."""
    diffs, seen = [], {}
    handle = decoder_layers(model)[loss_layer].register_forward_hook(
        lambda m, a, out: seen.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    try:
        for cho, rej in PAIRS:
            hs = []
            for text in (cho, rej):
                with torch.no_grad():
                    model(input_ids=torch.tensor([ToyTokenizer()(text)["input_ids"]]))
                hs.append(seen["h"][0, -n_last:].float())
            diffs.append(hs[0] - hs[1])
    finally:
        handle.remove()
    return torch.stack(diffs)


def test_vector_steers_toward_chosen(trained):
    model, vector, _ = trained
    part = vector.parts[(1, "residual")]
    assert part.A.shape == (64, 2) and part.B.shape == (64, 2) and part.bias.shape == (64,)
    assert part.B.abs().max() > 0  # the low-rank map was trained away from its zero init
    # u as train_adapter defines it: the normalised mean chosen - rejected difference, unsteered
    u = reference_diffs(model).reshape(-1, 64).mean(0)
    u = u / u.norm()
    tok = ToyTokenizer()
    s_plus = separation(model, tok, vector, 1.0, 2, u)
    s_zero = separation(model, tok, vector, 0.0, 2, u)
    s_minus = separation(model, tok, vector, -1.0, 2, u)
    assert s_plus > s_zero + 0.1 * abs(s_zero), (s_minus, s_zero, s_plus)
    assert s_minus < s_zero - 0.1 * abs(s_zero), (s_minus, s_zero, s_plus)
    assert steerkern_hook_count(model) == 0


def test_default_loss_is_bounded_with_data_scale(trained):
    """Defaults: tanh projection and shift terms (each of the two signs > -saturation, coherence
    >= 0, so every step's loss > -2 m (1 + shift_weight)) divided by the data-level scale
    mean_b |s_ref[b]|."""
    model, vector, _ = trained
    meta = vector.metadata
    assert meta["projection"] == "tanh" and meta["saturation"] == 2.0
    assert min(meta["loss_history"]) > -2 * meta["saturation"] * (1 + meta["shift_weight"])
    diffs = reference_diffs(model)
    u = diffs.reshape(-1, 64).mean(0)
    s_ref = (diffs @ (u / u.norm())).mean(1)
    assert meta["scale"] == pytest.approx(float(s_ref.abs().mean()), rel=1e-4)


def test_terms_history_sums_to_the_loss(trained):
    """Per-step terms are recorded and add up to the logged loss (the order term is off)."""
    _, vector, _ = trained
    meta = vector.metadata
    terms = meta["terms_history"]
    assert all(v == 0.0 for v in terms["order"])
    for step, value in enumerate(meta["loss_history"]):
        total = sum(terms[k][step] for k in ("proj_pos", "proj_neg", "coh_pos", "coh_neg"))
        total += meta["shift_weight"] * terms["shift"][step]
        assert total == pytest.approx(value, abs=1e-4)
    assert terms["proj_pos"][-1] < 0 and terms["proj_neg"][-1] < 0


def test_shift_term_moves_both_texts(tiny_model_factory):
    """With shift_weight > 0 the adapter also moves the chosen *and* the rejected text along
    c * u: at coefficient +1 the mean projection of every text on u goes up, at -1 down."""
    model = tiny_model_factory("llama")
    vector = train_adapter(model, ToyTokenizer(), PAIRS, layers=[1], loss_layer=2, rank=2,
                           steps=20, lr=3e-2, batch_size=4, progress=False, seed=0,
                           shift_weight=1.0)
    terms = vector.metadata["terms_history"]
    assert terms["shift"][0] == pytest.approx(0.0, abs=1e-5) and terms["shift"][-1] < -1.0
    diffs = reference_diffs(model)
    u = diffs.reshape(-1, 64).mean(0)
    u = u / u.norm()
    seen = {}
    handle = decoder_layers(model)[2].register_forward_hook(
        lambda m, a, out: seen.__setitem__("h", out[0] if isinstance(out, tuple) else out))

    def mean_projection(coeff):
        values = []
        for text in [t for pair in PAIRS for t in pair]:
            with torch.no_grad(), steer(model, vector, coeff=coeff):
                model(input_ids=torch.tensor([ToyTokenizer()(text)["input_ids"]]))
            values.append(float((seen["h"][0, -4:].float() @ u).mean()))
        return sum(values) / len(values)

    try:
        plus, zero, minus = mean_projection(1.0), mean_projection(0.0), mean_projection(-1.0)
    finally:
        handle.remove()
    scale = vector.metadata["scale"]
    assert plus > zero + 0.5 * scale and minus < zero - 0.5 * scale, (minus, zero, plus, scale)
    assert steerkern_hook_count(model) == 0


def test_spec_linear_projection_is_available_and_unbounded(tiny_model_factory):
    """projection="linear", scale="pair" is SPEC section 3 as written: on the same data and
    settings as the default run its loss falls far below the bounded form's floor (-2 m)."""
    model = tiny_model_factory("llama")
    vector = train_adapter(model, ToyTokenizer(), PAIRS, layers=[1], loss_layer=2, rank=2,
                           steps=40, lr=3e-2, batch_size=4, progress=False, seed=0,
                           projection="linear", scale="pair", shift_weight=0.0)
    meta = vector.metadata
    assert meta["projection"] == "linear" and meta["scale"] == "pair"
    assert abs(meta["loss_history"][0]) < 1e-4  # zero adapter: -s_ref/|s_ref| + s_ref/|s_ref|
    assert min(meta["loss_history"]) < -4 * meta["saturation"]


def test_error_mid_training_restores_model(tiny_model_factory, monkeypatch):
    model = tiny_model_factory("qwen2")
    model.model.embed_tokens.weight.requires_grad_(False)  # a mixed set of flags to restore
    model.train()
    model.model.layers[0].eval()  # mixed train/eval modes must come back as they were
    before = snapshot(model)
    calls = {"n": 0}
    real = train_mod.inner_contrastive_loss

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "inner_contrastive_loss", failing)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            train_adapter(model, ToyTokenizer(), PAIRS, layers=[1], loss_layer=2, steps=5,
                          progress=False)
        assert calls["n"] == 3
        assert_unchanged(model, before)
    finally:
        model.model.embed_tokens.weight.requires_grad_(True)
        model.eval()


def test_a_module_whose_train_does_more_than_set_its_flag_is_left_alone(tiny_model_factory):
    """train_adapter runs the model in eval mode by setting the flags, as it restores them:
    calling ``eval()`` would merge such a layer's update and leave it merged."""
    model = tiny_model_factory("qwen2")
    old = model.model.layers[0].mlp.down_proj
    merging = MergesOnEval(old.in_features, old.out_features, bias=False)
    merging.weight.data.copy_(old.weight.data)
    model.model.layers[0].mlp.down_proj = merging
    model.train()
    before = snapshot(model)
    try:
        train_adapter(model, ToyTokenizer(), PAIRS, layers=[1], loss_layer=2, steps=2, progress=False)
        assert_unchanged(model, before)
    finally:
        model.model.layers[0].mlp.down_proj = old
        model.eval()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(rank=0), ValueError, "rank"),
        (dict(rank=65), ValueError, "rank"),
        (dict(pairs=[]), ValueError, "pairs is empty"),
        (dict(pairs=[("ok text here", "")]), TypeError, "pairs"),
        (dict(pairs=[("ab", "cd")], n_last=8), ValueError, "n_last"),
        (dict(layers=[2], loss_layer=1), ValueError, "loss_layer"),
        (dict(layers=[9]), ValueError, "layers"),
        (dict(steps=0), ValueError, "steps"),
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(kind="cubic"), ValueError, "kind"),
        (dict(projection="cubic"), ValueError, "projection"),
        (dict(scale="mean"), ValueError, "scale"),
        (dict(saturation=0.0), ValueError, "saturation"),
        (dict(shift_weight=-0.5), ValueError, "shift_weight"),
        (dict(target="mlp.nonexistent"), ValueError, "target"),
        (dict(target="mlp.act_fn"), ValueError, "target 'mlp.act_fn': .* holds no parameters"),
        (dict(seed=1.5), ValueError, "seed must be an int"),  # was RuntimeError from manual_seed
        (dict(seed=None), ValueError, "seed must be an int"),
        (dict(seed=2**64), ValueError, "seed must be an int in"),  # was torch's "Overflow when unpacking
        (dict(seed=-2**63 - 1), ValueError, "seed must be an int in"),  # long long" after the reference pass
        (dict(accelerator="cpu"), TypeError, "accelerator must be an accelerate.Accelerator"),
        (dict(progress="no"), TypeError, "progress must be True or False, got 'no'"),
    ],
)
def test_bad_arguments(tiny_model_factory, kwargs, error, match):
    model = tiny_model_factory("llama")
    before = snapshot(model)
    args = dict(pairs=PAIRS, layers=[1], loss_layer=2, steps=1, progress=False)
    args.update(kwargs)
    pairs = args.pop("pairs")
    with pytest.raises(error, match=match):
        train_adapter(model, ToyTokenizer(), pairs, **args)
    assert_unchanged(model, before)


def test_a_seed_beyond_the_generators_range_is_refused_before_any_pass(tiny_model_factory, monkeypatch):
    """A seed torch.Generator cannot take (a 256-bit hash, say) is refused by name before the
    reference pass; every seed it can take (negative ones and those up to 2**64 - 1) trains."""
    model = tiny_model_factory("llama")
    monkeypatch.setattr(train_mod, "_reference", lambda *a, **k: pytest.fail("reference pass ran"))
    with pytest.raises(ValueError, match=r"seed must be an int in \[-2\*\*63, 2\*\*64\)"):
        train_adapter(model, ToyTokenizer(), PAIRS, layers=[1], loss_layer=2, steps=1,
                      progress=False, seed=2**64 + 5)
    monkeypatch.undo()
    for seed in (-2**63, 2**64 - 1):
        vector = train_adapter(model, ToyTokenizer(), PAIRS[:2], layers=[1], loss_layer=2, steps=1,
                               batch_size=1, progress=False, seed=seed)
        assert vector.layers == [1]


def test_gpt2_and_default_padding(tiny_model_factory):
    """Another architecture (GPT-2: Conv1D, transformer.h) trains a couple of steps."""
    model = tiny_model_factory("gpt2")
    before = snapshot(model)
    vector = train_adapter(model, ToyTokenizer(), PAIRS[:4], layers=[0, 1], loss_layer=3,
                           rank=1, steps=2, batch_size=2, progress=False)
    assert vector.layers == [0, 1] and len(vector.metadata["loss_history"]) == 2
    assert_unchanged(model, before)


def test_first_step_matches_reference(tiny_model_factory):
    """At the zero-initialised adapter the policy pass (4B rows, one padded batch) reproduces the
    cached reference: the projection terms cancel (s_pi = s_ref at c = +1 and -1) and, with
    tau = 0 and the hinge, any misaligned reference log-prob would show as a positive penalty."""
    model = tiny_model_factory("llama")
    vector = train_adapter(model, ToyTokenizer(), PAIRS, layers=[1], loss_layer=3, steps=1,
                           batch_size=5, tau=0.0, kind="hinge", progress=False)
    assert abs(vector.metadata["loss_history"][0]) < 1e-4


def test_output_head_bias_is_part_of_the_log_probs():
    """GPT-J's head has a bias: the fused log-probs see ``[h, 1] @ [W | b]^T = W h + b``."""
    from tests.test_more_architectures import build

    model = build("gptj")
    with torch.no_grad():
        model.lm_head.bias.normal_(0, 2.0)
    ids = torch.tensor([ToyTokenizer()(PAIRS[0][0])["input_ids"]])
    mask = torch.ones_like(ids)
    logits = HeadLogits.measure(model, model.lm_head, ids, mask, mask.cumsum(-1) - 1)
    assert logits.W.shape == (128, 65) and logits.softcap is None
    h = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(1))
    labels[1, 0] = train_mod.IGNORE
    got = logits.logprobs(h, labels)
    with torch.no_grad():
        logp = torch.log_softmax(model.lm_head(h[:, :-1]), -1)
    want = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0].masked_fill(labels < 0, 0.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    before = snapshot(model)
    vector = train_adapter(model, ToyTokenizer(), PAIRS[:4], layers=[1], loss_layer=3, steps=2,
                           batch_size=2, tau=0.0, kind="hinge", progress=False)
    assert abs(vector.metadata["loss_history"][0]) < 1e-4  # reference and policy agree at step 0
    assert_unchanged(model, before)


@pytest.mark.parametrize("name, factor", [("cohere", 0.0625), ("granite", 0.25)])
def test_coherence_log_probs_include_the_models_logit_factor(monkeypatch, name, factor):
    """Cohere multiplies the head's output by ``logit_scale``, Granite divides it by
    ``logits_scaling``: the reference log-probs of the coherence term are the model's own."""
    from tests.test_more_architectures import build

    model = build(name)
    if name == "granite":
        model.config.logits_scaling = 1 / factor
    assert getattr(model.config, "logit_scale", factor) == factor
    for got, want, _ in _reference_logprobs_of_a_training_run(monkeypatch, model):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _reference_logprobs_of_a_training_run(monkeypatch, model, head_output=None):
    """``(got, want, ids)`` per text of a one-step ``train_adapter`` run on ``model`` (left as
    it was): the coherence term's reference log-probs, the model's own ``log_softmax`` of its
    logits at the same tokens and the text's ``[1, T]`` ids. ``head_output``: a list that collects the output head's outputs of those passes."""
    seen = {}
    real = train_mod._reference

    def spy(*args, **kwargs):
        seen["h_ref"], seen["logp_ref"] = real(*args, **kwargs)
        return seen["h_ref"], seen["logp_ref"]

    monkeypatch.setattr(train_mod, "_reference", spy)
    before = snapshot(model)
    train_adapter(model, ToyTokenizer(), PAIRS[:2], layers=[1], loss_layer=3, steps=1,
                  batch_size=2, progress=False)
    assert_unchanged(model, before)
    texts = [text for pair in PAIRS[:2] for text in pair]
    pairs, heads = [], []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: heads.append(output[0, :-1]))
    try:
        for text, got in zip(texts, seen["logp_ref"]):
            ids = torch.tensor([ToyTokenizer()(text)["input_ids"]])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1].float()
            want = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
            pairs.append((got, want, ids))
    finally:
        handle.remove()
    if head_output is not None:
        head_output.extend(heads)
    return pairs


def test_coherence_log_probs_of_a_soft_capped_model(monkeypatch, tiny_model_factory):
    """Gemma 2 soft-caps its logits (``c tanh(u / c)``, ``config.final_logit_softcapping``):
    it trains, and the coherence term's reference log-probs are the model's own, with a cap
    small enough that dropping it would change them."""
    model = tiny_model_factory("gemma2")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    model.config.final_logit_softcapping = 2.0
    heads = []
    pairs = _reference_logprobs_of_a_training_run(monkeypatch, model, heads)
    assert max(float(u.abs().max()) for u in heads) > 4.0  # logits well into the cap's bend
    drops = []
    for (got, want, ids), u in zip(pairs, heads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        uncapped = torch.log_softmax(u.float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        drops.append(float((uncapped - want).abs().max()))
    assert max(drops) > 0.5


def test_gemma3n_trains_on_its_active_residual_copy(monkeypatch):
    """Gemma 3n's layers return the residual stream as ``[S, B, T, D]`` copies (AltUp) and
    soft-cap the logits: the reference loss-layer states are the active copy's last ``n_last``
    positions of each text run alone (the loss layer's output was sliced as if ``[B, T, D]``: an
    IndexError, or the wrong states), its coherence log-probs are the model's own, and it trains
    with the model left as it was."""
    from tests.test_more_architectures import build

    model = build("gemma3n")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    model.config.final_logit_softcapping = 3.0
    stream = model.config.altup_active_idx
    seen = {}
    real = train_mod._reference

    def spy(*args, **kwargs):
        seen["ref"] = real(*args, **kwargs)
        return seen["ref"]

    monkeypatch.setattr(train_mod, "_reference", spy)
    before = snapshot(model)
    vector = train_adapter(model, ToyTokenizer(), PAIRS[:2], layers=[1], loss_layer=2, rank=2,
                           steps=2, n_last=3, batch_size=2, progress=False)
    assert_unchanged(model, before)
    assert len(vector.metadata["loss_history"]) == 2
    out = {}
    handle = decoder_layers(model)[2].register_forward_hook(
        lambda module, args, output: out.__setitem__(  # a tuple before transformers 5
            "h", output[0] if isinstance(output, tuple) else output))
    try:
        for i, text in enumerate(text for pair in PAIRS[:2] for text in pair):
            ids = torch.tensor([ToyTokenizer()(text)["input_ids"]])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1].double()
            assert out["h"].dim() == 4 and out["h"].shape[1:3] == ids.shape
            h_ref, logp_ref = seen["ref"][0][i], seen["ref"][1][i]
            torch.testing.assert_close(h_ref, out["h"][stream, 0, -3:].float(), atol=1e-5, rtol=1e-5)
            want = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0].float()
            torch.testing.assert_close(logp_ref, want, atol=1e-4, rtol=1e-4)
    finally:
        handle.remove()


def test_logits_transformed_beyond_a_factor_are_refused(tiny_model_factory):
    """Soft-capping (tanh) after the head is not a constant factor: refused, model intact."""
    model = tiny_model_factory("llama")

    def softcap(module, args, output):
        output.logits = 0.5 * torch.tanh(output.logits / 0.5)
        return output

    handle = model.register_forward_hook(softcap)
    try:
        before = snapshot(model)
        with pytest.raises(ValueError, match="constant factor"):
            train_adapter(model, ToyTokenizer(), PAIRS[:2], layers=[1], loss_layer=3, steps=1,
                          batch_size=2, progress=False)
        assert_unchanged(model, before)
    finally:
        handle.remove()


def test_a_callers_accelerator_keeps_only_its_own_optimizers(tmp_path, tiny_model_factory):
    """The adapter's optimizer is prepared with the caller's accelerator for the run only: left
    on it, ``save_state`` saved it beside the caller's own optimizer (``optimizer_1.bin``) and
    every run added one more, holding the adapter and its AdamW state."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    accelerator.prepare(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1))
    for _ in range(2):
        train_adapter(tiny_model_factory("llama"), ToyTokenizer(), PAIRS, layers=[1], loss_layer=2,
                      steps=1, progress=False, accelerator=accelerator)
    accelerator.save_state(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("optimizer")) == ["optimizer.bin"]


def test_gradient_accumulation_is_refused_and_no_grad_is_no_obstacle(tiny_model_factory):
    """train_adapter steps its optimizer every batch: an accelerator set to accumulate would be
    silently ignored, so it is refused (raise batch_size instead). Called under no_grad() or
    inference_mode() it trains as usual."""
    from accelerate import Accelerator

    model = tiny_model_factory("llama")
    before = snapshot(model)
    args = dict(layers=[1], loss_layer=2, steps=2, progress=False)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4.*raise batch_size"):
        train_adapter(model, ToyTokenizer(), PAIRS, accelerator=Accelerator(gradient_accumulation_steps=4), **args)
    assert_unchanged(model, before)
    expected = train_adapter(model, ToyTokenizer(), PAIRS, **args)
    with torch.no_grad():
        got = train_adapter(model, ToyTokenizer(), PAIRS, **args)
    history = lambda vector: vector.metadata["loss_history"]  # noqa: E731
    assert history(got) == pytest.approx(history(expected)) and len(history(got)) == 2
    with torch.inference_mode():
        got = train_adapter(model, ToyTokenizer(), PAIRS, **args)
    assert history(got) == pytest.approx(history(expected))
    assert_unchanged(model, before)


def _record_batches(monkeypatch) -> list[list[int]]:
    """A list that collects each training step's pair indices, in the order drawn."""
    seen = []
    step = train_mod._step

    def counting_step(reader, bank, ids_list, h_ref, logp_ref, mine, *args, **kwargs):
        seen.append(list(mine))
        return step(reader, bank, ids_list, h_ref, logp_ref, mine, *args, **kwargs)

    monkeypatch.setattr(train_mod, "_step", counting_step)
    return seen


def test_a_batch_larger_than_the_pairs_is_the_pairs(tiny_model_factory, monkeypatch):
    """3 pairs with batch_size 10 drew 10 pairs a step, some twice (weights 4, 3, 3): each step
    now takes each pair once, and the metadata says so."""
    seen = _record_batches(monkeypatch)
    vector = train_adapter(tiny_model_factory("llama"), ToyTokenizer(), PAIRS[:3], layers=[1], loss_layer=2,
                           steps=2, batch_size=10, n_last=2, progress=False)
    assert [sorted(b) for b in seen] == [[0, 1, 2], [0, 1, 2]] and vector.metadata["batch_size"] == 3


def test_a_batch_never_holds_a_pair_twice(tiny_model_factory, monkeypatch):
    """5 pairs, batch 3: a batch that crosses into the next shuffled pass over the pairs took
    the new pass's first pairs whatever they were, so about one step in six trained on a pair
    twice (weight 2) and one pair fewer. Each pass still visits every pair once."""
    seen = _record_batches(monkeypatch)
    train_adapter(tiny_model_factory("llama"), ToyTokenizer(), PAIRS[:5], layers=[1], loss_layer=2,
                  steps=10, batch_size=3, n_last=2, progress=False)
    assert all(len(set(batch)) == 3 for batch in seen), seen
    drawn = [index for batch in seen for index in batch]
    assert all(sorted(drawn[i:i + 5]) == list(range(5)) for i in range(0, 30, 5)), drawn


def test_offloaded_model_trains_as_the_plain_one(tiny_model_factory):
    """accelerate's CPU offload (as ``device_map`` entries "cpu"/"disk" beside a GPU): the head's
    weight sits on 'meta' between calls, and the coherence term's fused log-probs read it
    ("Tensor.item() cannot be called on meta tensors"). The run equals the plain model's, and
    every parameter's ``requires_grad`` is restored (38 of 39 were left False)."""
    from accelerate import cpu_offload

    from tests.tiny_models import build_tiny_model

    args = dict(layers=[1], loss_layer=2, rank=2, steps=3, lr=3e-2, batch_size=4, progress=False,
                tau=0.0, kind="hinge")
    offloaded = cpu_offload(build_tiny_model("llama"), execution_device=torch.device("cpu"))
    assert offloaded.lm_head.weight.device.type == "meta"
    offloaded.model.embed_tokens.weight.requires_grad_(False)  # a mixed set of flags to restore
    flags = {name: p.requires_grad for name, p in offloaded.named_parameters()}
    got = train_adapter(offloaded, ToyTokenizer(), PAIRS, **args)
    # the offload hooks replace the Parameter objects at every forward: flags restored by name
    assert {name: p.requires_grad for name, p in offloaded.named_parameters()} == flags
    want = train_adapter(tiny_model_factory("llama"), ToyTokenizer(), PAIRS, **args)
    assert got.metadata["loss_history"] == pytest.approx(want.metadata["loss_history"], abs=1e-5)
    for key, part in want.parts.items():
        torch.testing.assert_close(got.parts[key].B, part.B, atol=1e-5, rtol=1e-4)
    assert offloaded.lm_head.weight.device.type == "meta"  # offloaded again afterwards
    assert steerkern_hook_count(offloaded) == 0


# --- distributed ------------------------------------------------------------------------------

TWO_PROCESS_ARGS = dict(layers=[1], loss_layer=2, rank=2, steps=3, lr=3e-2, progress=False)


def _two_process_worker(rank, world, out_dir, kwargs):
    """Trains under an ``accelerate.Accelerator`` of ``world`` CPU processes (over a file store,
    as tests/test_extract.py's two-process test, so no port is picked) and saves the result."""
    import os

    from accelerate import Accelerator

    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank, world_size=world)
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world))
        accelerator = Accelerator(cpu=True)  # joins the initialised group
        assert (accelerator.num_processes, accelerator.process_index) == (world, rank)
        from tests.tiny_models import build_tiny_model

        vector = train_adapter(build_tiny_model("llama"), ToyTokenizer(), PAIRS, accelerator=accelerator,
                               **TWO_PROCESS_ARGS, **kwargs)
        vector.save(os.path.join(out_dir, f"adapter-{rank}.safetensors"))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _bare_group_worker(rank, world, out_dir):
    """Calls ``train_adapter`` without an accelerator inside a bare gloo group (no launcher
    environment) and records the warnings it gave."""
    import os
    import warnings

    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank, world_size=world)
    try:
        from tests.tiny_models import build_tiny_model

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_adapter(build_tiny_model("llama"), ToyTokenizer(), PAIRS[:4], layers=[1], loss_layer=2,
                          rank=1, steps=1, n_last=2, progress=False)
        with open(os.path.join(out_dir, f"warnings-{rank}.txt"), "w") as handle:
            handle.write("\n".join(str(w.message) for w in caught))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.multiproc
def test_a_bare_process_group_is_named_when_every_process_trains_alone(tmp_path):
    """Under a ``torch.distributed`` group started without accelerate's environment the default
    ``Accelerator`` sees one process, so each process silently trained on every pair by itself
    (extract splits the pairs under the same group): it now says so."""
    import torch.multiprocessing as mp

    mp.spawn(_bare_group_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        text = (tmp_path / f"warnings-{rank}.txt").read_text()
        assert "torch.distributed has 2 processes but the default Accelerator sees 1" in text


@pytest.mark.multiproc
def test_two_processes_train_as_one_process_on_the_same_global_batch(tmp_path, tiny_model_factory):
    """Two processes at ``batch_size=2`` draw the same global batch of 4 pairs as one process at
    ``batch_size=4`` and average their gradients: the same losses and adapter, on every process.
    ``scale="batch"`` divides by the mean ``|s_ref|`` of that global batch (each process used its
    own slice's mean: the adapters differed by 0.1). The metadata records the number of
    processes, without which a step's batch cannot be told from ``batch_size``."""
    import torch.multiprocessing as mp

    from steerkern.vectors import SteeringVector

    kwargs = dict(scale="batch")
    mp.spawn(_two_process_worker, args=(2, str(tmp_path), dict(kwargs, batch_size=2)), nprocs=2, join=True)
    want = train_adapter(tiny_model_factory("llama"), ToyTokenizer(), PAIRS, batch_size=4,
                         **TWO_PROCESS_ARGS, **kwargs)
    assert (want.metadata["batch_size"], want.metadata["num_processes"]) == (4, 1)
    for rank in (0, 1):
        got = SteeringVector.load(tmp_path / f"adapter-{rank}.safetensors")
        assert (got.metadata["batch_size"], got.metadata["num_processes"]) == (2, 2)
        assert got.metadata["loss_history"] == pytest.approx(want.metadata["loss_history"], abs=1e-5)
        for key, part in want.parts.items():
            for name in ("bias", "A", "B"):
                torch.testing.assert_close(getattr(got.parts[key], name), getattr(part, name),
                                           atol=1e-5, rtol=1e-4)

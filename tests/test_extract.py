"""Extraction: method maths on planted directions, capture correctness, padding, distributed
extraction, bad input, and a real steering effect on the default model."""

import os

import pytest
import torch

from steerkern import directions as maths
from steerkern.capture import capture, last_positions
from steerkern.data import concept_pairs, render_prompt
from steerkern.extract import extract
from steerkern.models import decoder_layers, resolve_module

# --- helpers ----------------------------------------------------------------------------------


class CharTokenizer:
    """A tiny deterministic tokenizer for the tiny models (vocabulary 128): one id per char."""

    bos_token = None
    pad_token_id = 0
    eos_token_id = 2
    chat_template = None

    def __init__(self, padding_side="left"):
        self.padding_side = padding_side

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + (ord(ch) % 120) for ch in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


PAIRS = [
    ("I love cheese; let me tell you", "I hate cheese; let me tell you"),
    ("a wonderful day", "a terrible, awful day"),
    ("great", "bad news everywhere today"),
    ("so happy to see you here", "so sad"),
    ("the joy of it all", "the pain of it all"),
]


def cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def planted(n=64, dim=48, seed=0, shift=2.0, spread=0.0, noise=0.05):
    """Chosen/rejected activations whose differences are ``(shift + spread * s_i) * u + noise``
    on top of a shared random per-pair context."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(dim, generator=g, dtype=torch.float64)
    u /= u.norm()
    context = torch.randn(n, dim, generator=g, dtype=torch.float64) * 3 + 5
    s = torch.rand(n, generator=g, dtype=torch.float64) * spread
    diffs = (shift + s)[:, None] * u + noise * torch.randn(n, dim, generator=g, dtype=torch.float64)
    rej = context
    return rej + diffs, rej, u


# --- method maths on planted directions ---------------------------------------------------------


@pytest.mark.parametrize("method", ["mean_diff", "pca_center"])
def test_additive_methods_recover_planted_direction(method):
    cho, rej, u = planted()
    bias = maths.additive(method, cho, rej)
    assert cosine(bias, u) >= 0.99
    # shared scale: coefficient 1 shifts the projection by the mean separation (2.0 here)
    assert float(bias.norm()) == pytest.approx(float(((cho - rej) @ u).mean()), rel=1e-3)


def test_pca_diff_recovers_planted_direction_with_varying_separation():
    cho, rej, u = planted(shift=0.5, spread=3.0)
    bias = maths.pca_diff(cho, rej)
    assert cosine(bias, u) >= 0.99
    unit = bias / bias.norm()
    assert float(bias.norm()) == pytest.approx(float(((cho - rej) @ unit).mean()), rel=1e-6)


def test_pca_center_and_pca_diff_differ_where_they_should():
    """Differences = constant shift along u + large pair-to-pair variation along w (no mean):
    pca_center (uncentred second moment) follows the consistent shift u, while pca_diff
    (centred PCA of the differences) follows the variation w."""
    g = torch.Generator().manual_seed(1)
    dim, n = 32, 200
    u, w = torch.linalg.qr(torch.randn(dim, 2, generator=g, dtype=torch.float64))[0].T
    rej = torch.randn(n, dim, generator=g, dtype=torch.float64)
    diffs = 3.0 * u + torch.randn(n, 1, generator=g, dtype=torch.float64) * 1.5 * w
    cho = rej + diffs
    center = maths.pca_center(cho, rej)
    diff = maths.pca_diff(cho, rej)
    assert abs(cosine(center, u)) >= 0.99
    assert abs(cosine(diff, w)) >= 0.99
    assert abs(cosine(center, diff)) < 0.1


def test_lowrank_recovers_planted_subspace_and_moves_toward_chosen():
    cho, rej, u = planted()
    bias, A, B = maths.lowrank(cho, rej, rank=1)
    assert abs(cosine(A[:, 0], u)) >= 0.99
    assert cosine(bias, u) >= 0.99
    # at the rejected mean, coefficient 1 shifts by the mean separation along u
    h = rej.mean(0)
    delta = bias + B @ (A.T @ h)
    assert float(delta @ u) == pytest.approx(float(((cho - rej) @ u).mean()), rel=1e-3)
    # rank 2 on a planted 2-D subspace
    g = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(40, 2, generator=g, dtype=torch.float64))[0]
    rej2 = torch.randn(100, 40, generator=g, dtype=torch.float64)
    coef = torch.randn(100, 2, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0]) + 1.0
    cho2 = rej2 + coef @ basis.T
    _, A2, _ = maths.lowrank(cho2, rej2, rank=2)
    overlap = torch.linalg.svdvals(basis.T @ A2)
    assert float(overlap.min()) >= 0.99


def test_lowrank_fits_a_contraction_not_a_reflection():
    """Pairs whose chosen and rejected activations swap sides along u (CAA A/B answers) fit
    K = -2 by least squares; the fitted map is clipped to a clamp (K = -1) that sends every
    rejected activation to the chosen mean along u, and never past it."""
    g = torch.Generator().manual_seed(5)
    u = torch.nn.functional.normalize(torch.randn(30, generator=g, dtype=torch.float64), dim=0)
    side = torch.randn(80, generator=g, dtype=torch.float64) * 3 + 0.5
    base = torch.randn(80, 30, generator=g, dtype=torch.float64)
    base = base - (base @ u)[:, None] * u
    rej = base + side[:, None] * u
    cho = base - side[:, None] * u + 1.0 * u  # mirrored along u, then shifted by 1
    bias, A, B = maths.lowrank(cho, rej, rank=1)
    K = float(A[:, 0] @ B[:, 0])
    assert K == pytest.approx(-1.0, abs=1e-9)
    steered = rej + (bias + (rej @ A) @ B.T)
    along = steered @ u
    torch.testing.assert_close(along, torch.full_like(along, float((cho @ u).mean())))
    # at the rejected mean the step is still the mean separation (the shared scale)
    delta = bias + B @ (A.T @ rej.mean(0))
    assert float(delta @ u) == pytest.approx(float(((cho - rej) @ u).mean()), rel=1e-6)


def test_weight_svd_recovers_planted_singular_component():
    g = torch.Generator().manual_seed(4)
    out_f, in_f = 24, 40
    U = torch.linalg.qr(torch.randn(out_f, out_f, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(in_f, out_f, generator=g, dtype=torch.float64))[0]
    S = torch.linspace(5, 1, out_f, dtype=torch.float64)
    W = U @ torch.diag(S) @ V.T
    x = torch.randn(200, in_f, generator=g, dtype=torch.float64) + 2 * V[:, 7]  # inputs
    diffs = 1.5 * U[:, 7] + 0.01 * torch.randn(100, out_f, generator=g, dtype=torch.float64)
    A, B = maths.weight_svd(diffs, x, W, rank=1)
    assert abs(cosine(A[:, 0], V[:, 7])) >= 0.99
    assert abs(cosine(B[:, 0], U[:, 7])) >= 0.99
    # dS is the least-squares fit of per-input shifts along u_7 to the mean separation (1.5)
    shifts = (x @ A @ B.T) @ U[:, 7]  # = dS * (v_7 . x_i)
    p = (x @ V[:, 7])[:, None]
    m = float(diffs.mean(0) @ U[:, 7])
    best = torch.linalg.lstsq(p, torch.full((len(x), 1), m, dtype=torch.float64)).solution
    torch.testing.assert_close(shifts, (p * best)[:, 0], rtol=1e-6, atol=1e-8)


def test_weight_svd_keeps_the_component_it_can_steer():
    """The largest separation on a component whose inputs average to 0 cannot be produced by
    changing that singular value (the shift is dS * (v . x), mean ~0 at any coefficient): the
    kept component is the one with the largest achievable mean shift. (On the default model's
    honesty pairs the old |m_j| ranking gave 4 % of m_j at coefficient 1 and no measurable
    effect up to coefficient 64.)"""
    g = torch.Generator().manual_seed(6)
    out_f, in_f, n = 24, 40, 400
    U = torch.linalg.qr(torch.randn(out_f, out_f, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(in_f, out_f, generator=g, dtype=torch.float64))[0]
    W = U @ torch.diag(torch.linspace(5, 1, out_f, dtype=torch.float64)) @ V.T
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(torch.float64)
    # inputs: zero-mean (+-1) on v_3, consistently 2 on v_9, small noise elsewhere
    x = 0.05 * torch.randn(n, in_f, generator=g, dtype=torch.float64)
    x = x + sign[:, None] * V[:, 3] + 2 * V[:, 9]
    diffs = 1.5 * U[:, 3] + 0.6 * U[:, 9] + 0.01 * torch.randn(n // 2, out_f, generator=g,
                                                              dtype=torch.float64)
    A, B = maths.weight_svd(diffs, x, W, rank=1)
    assert abs(cosine(A[:, 0], V[:, 9])) >= 0.99
    assert abs(cosine(B[:, 0], U[:, 9])) >= 0.99
    shift = (x @ A @ B.T).mean(0)  # mean output shift at coefficient 1
    assert float(shift @ U[:, 9]) == pytest.approx(0.6, rel=0.02)  # delivers the separation
    assert float(shift @ diffs.mean(0)) > 0  # toward chosen
    # the component with the largest separation (u_3) could deliver ~none of it at coefficient 1
    p3 = x @ V[:, 3]
    assert abs(float(p3.mean() ** 2 / (p3 * p3).mean())) < 1e-3


def test_grad_direction_and_fisher_preconditioning():
    g = torch.Generator().manual_seed(5)
    n, dim = 12, 30
    grads = torch.randn(n, dim, generator=g, dtype=torch.float64)
    diffs = grads.mean(0)[None] + 0.1 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    assert cosine(maths.grad_direction(grads, diffs), grads.mean(0)) >= 0.999
    def explicit(grads, lam):  # (F + λI)^{-1} mean(G), a D x D solve in float64
        G = grads.double()
        return torch.linalg.solve(G.T @ G / n + lam * torch.eye(dim, dtype=torch.float64), G.mean(0))

    torch.testing.assert_close(maths.fisher_preconditioned_mean(grads, 0.3), explicit(grads, 0.3),
                               rtol=1e-9, atol=1e-9)
    pre = maths.grad_direction(grads, diffs, fisher_lambda=0.3)
    assert abs(cosine(pre, explicit(grads, 0.3))) >= 0.999999
    # float32 gradients and a small λ (n < D: F is singular): Woodbury's form divided the float32
    # mean's rounding by λ and was 15% off at λ = 1e-3
    grads32 = grads.float() * 30
    for lam in (1e-3, 1e-2, 1.0):
        got = maths.fisher_preconditioned_mean(grads32, lam)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), explicit(grads32, lam), rtol=1e-5, atol=0, msg=str(lam))
    with pytest.raises(ValueError, match="fisher_lambda"):
        maths.fisher_preconditioned_mean(grads, 0.0)


@pytest.mark.parametrize("method", ["mean_diff", "pca_diff", "pca_center"])
def test_sign_convention_positive_moves_toward_chosen(method):
    cho, rej, u = planted(shift=1.0, spread=2.0)
    forward = maths.additive(method, cho, rej)
    backward = maths.additive(method, rej, cho)
    assert float(((cho - rej) @ forward).mean()) > 0
    torch.testing.assert_close(forward, -backward, rtol=1e-6, atol=1e-8)
    bias, A, B = maths.lowrank(cho, rej)
    assert float(((cho - rej) @ A[:, 0]).mean()) > 0



@pytest.mark.parametrize("method", ["mean_diff", "pca_diff", "pca_center", "logistic", "lowrank", "weight_svd"])
def test_identical_pairs_are_a_clear_error_not_a_zero_vector(method):
    """Chosen == rejected has no direction: every method must say so (pca_center, lowrank and
    weight_svd used to return an all-zero vector silently)."""
    rej = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="identical"):
        if method == "weight_svd":
            maths.weight_svd(rej - rej, torch.randn(12, 20), torch.randn(16, 20))
        elif method == "lowrank":
            maths.lowrank(rej.clone(), rej)
        else:
            maths.additive(method, rej.clone(), rej)


def test_duplicate_pairs_pca_diff_errors_and_lowrank_is_mean_diff():
    """Every pair differing the same way (duplicates of one pair): pca_diff's centred differences
    are zero, so its direction used to be an arbitrary singular vector; lowrank's K used to be a
    ratio of rounding errors (here -0.99, a clamp), not the documented K = 0."""
    g = torch.Generator().manual_seed(1)
    rej = torch.randn(1, 32, generator=g).repeat(4, 1)
    cho = rej + torch.randn(1, 32, generator=g)
    with pytest.raises(ValueError, match="pca_diff: every pair differs in the same way"):
        maths.pca_diff(cho, rej)
    torch.testing.assert_close(maths.pca_center(cho, rej), (cho - rej).mean(0), rtol=1e-5, atol=1e-6)


def test_lowrank_of_duplicate_pairs_on_a_model_is_mean_diff(tiny_model_factory):
    """Three copies of one pair read from a model: the mean of equal float32 coordinates is off
    by an ulp, and the fitted K used to be the ratio of two such rounding errors (-0.99, a
    clamp that doubled the bias) instead of the documented K = 0."""
    model = tiny_model_factory("llama")
    vector = extract(model, CharTokenizer(), [PAIRS[0]] * 3, layers=[1], method="lowrank",
                     progress=False)
    reference = extract(model, CharTokenizer(), [PAIRS[0]], layers=[1], method="mean_diff",
                        progress=False)
    part = vector.parts[(1, "residual")]
    assert float(part.B.norm()) < 1e-4
    torch.testing.assert_close(part.bias, reference.parts[(1, "residual")].bias, rtol=1e-4, atol=1e-6)


def test_direction_orthogonal_to_the_mean_difference_is_an_error():
    """pca_diff of differences (1, 1) and (1, -1): the varying axis (0, 1) is orthogonal to the
    mean (1, 0), so no sign toward chosen exists (it used to return a zero vector)."""
    rej = torch.zeros(2, 2, dtype=torch.float64)
    cho = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="orthogonal to the mean pair difference"):
        maths.pca_diff(cho, rej)


def test_extract_names_the_layer_of_identical_pairs(tiny_model_factory):
    """Texts that are equal are refused before any pass, exactly, whatever the model's dtype (in
    bfloat16 two copies of a text in batches of different widths differed by rounding and gave a
    noise vector); texts that differ but read the same activations are refused per layer."""
    model = tiny_model_factory("llama")
    with pytest.raises(ValueError, match="pairs: every chosen text is its rejected text"):
        extract(model, CharTokenizer(), [("same text", "same text")] * 2, layers=[1], progress=False)
    alias = "same tex" + chr(ord("t") + 120)  # CharTokenizer reads it as "same text"
    with pytest.raises(ValueError, match=r"method='pca_center'\) at layer 1: .*identical"):
        extract(model, CharTokenizer(), [("same text", alias)] * 2, layers=[1], method="pca_center", progress=False)


# --- capture -------------------------------------------------------------------------------------


def test_last_positions_left_right_and_mixed_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 0, 0]])
    assert last_positions(mask, 1).tolist() == [[4], [2], [2]]
    assert last_positions(mask, 2).tolist() == [[3, 4], [1, 2], [1, 2]]
    with pytest.raises(ValueError, match="last_n_tokens"):
        last_positions(mask, 3)


def test_capture_matches_hidden_states_and_stops_early(tiny_model_factory):
    model = tiny_model_factory("llama")
    tok = CharTokenizer("left")
    texts = [t for pair in PAIRS for t in pair]
    calls = []
    handle = decoder_layers(model)[3].register_forward_hook(lambda *a: calls.append(1))
    try:
        got = capture(model, tok, texts, [1, 2], last_n_tokens=2, batch_size=3, progress=False)
    finally:
        handle.remove()
    assert not calls, "the forward pass must stop after the deepest requested layer"
    for i, text in enumerate(texts):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            states = model(ids, output_hidden_states=True).hidden_states
        for layer in (1, 2):
            torch.testing.assert_close(got[layer][i], states[layer + 1][0, -2:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma2", "qwen3"])
def test_left_and_right_padding_give_the_same_vector(tiny_model_factory, arch):
    model = tiny_model_factory(arch)
    left = extract(model, CharTokenizer("left"), PAIRS, layers=[1, 2], method="pca_center",
                   batch_size=4, progress=False)
    right = extract(model, CharTokenizer("right"), PAIRS, layers=[1, 2], method="pca_center",
                    batch_size=4, progress=False)
    for key in left.parts:
        torch.testing.assert_close(left.parts[key].bias, right.parts[key].bias, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3", "mixtral", "qwen2_moe", "gemma3", "gpt2"])
def test_every_method_on_tiny_models(tiny_model_factory, arch):
    model = tiny_model_factory(arch)
    tok = CharTokenizer()
    for method in ("mean_diff", "pca_diff", "pca_center", "logistic", "lowrank", "grad"):
        vector = extract(model, tok, PAIRS, layers=[1, 2], method=method, progress=False)
        vector.validate(model)
        assert vector.layers == [1, 2] and vector.metadata["method"] == method
        assert vector.is_additive == (method != "lowrank")
    svd = extract(model, tok, PAIRS, layers=[1], method="weight_svd", target="self_attn.o_proj",
                  rank=2, progress=False)
    part = svd.parts[(1, "self_attn.o_proj")]
    assert part.source == "input" and part.rank == 2
    svd.validate(model)


def test_grad_matches_explicit_bias_gradient(tiny_model_factory):
    """The hook-based VJP equals d(d·h_L'[last]) / d(bias added to every position of layer L),
    computed independently with output_hidden_states and an explicit bias parameter."""
    model = tiny_model_factory("llama")
    tok = CharTokenizer()
    layer, readout = 0, 2  # hidden_states[-1] is normed: keep the read-out off the last layer
    vector = extract(model, tok, PAIRS, layers=[layer], method="grad", readout_layer=readout,
                     batch_size=3, progress=False)
    texts = [t for pair in PAIRS for t in pair]
    tops = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]])
            tops.append(model(ids, output_hidden_states=True).hidden_states[readout + 1][0, -1])
    tops = torch.stack(tops)
    d = (tops[0::2] - tops[1::2]).mean(0)
    grads = []
    for text in texts:
        bias = torch.zeros(model.config.hidden_size, requires_grad=True)

        def add(module, args, output, bias=bias):
            return (output[0] + bias,) + tuple(output[1:]) if isinstance(output, tuple) else output + bias

        handle = decoder_layers(model)[layer].register_forward_hook(add)
        try:
            ids = torch.tensor([tok(text)["input_ids"]])
            top = model(ids, output_hidden_states=True).hidden_states[readout + 1][0, -1]
            (grad,) = torch.autograd.grad(top @ d, bias)
        finally:
            handle.remove()
        grads.append(grad)
    grads = torch.stack(grads)
    assert cosine(vector.parts[(layer, "residual")].bias, grads.mean(0)) >= 0.999
    assert not any(p.grad is not None for p in model.parameters()), "no parameter gradients"
    fisher = extract(model, tok, PAIRS, layers=[layer], method="grad", readout_layer=readout,
                     fisher_lambda=0.5, progress=False)
    assert fisher.metadata["fisher_lambda"] == 0.5


def test_a_float64_model_is_extracted_in_float64():
    """A float64 model's states are read, solved and stored in float64: mean_diff equals the
    float64 ``output_hidden_states`` mean difference to 1e-12 and grad the float64 bias
    gradients (float32 arithmetic would be 1e-7 off), and every method returns float64 parts."""
    from tests.tiny_models import build_tiny_model

    model = build_tiny_model("llama").double()
    tok = CharTokenizer()
    texts = [t for pair in PAIRS for t in pair]
    with torch.no_grad():
        tops = torch.stack([model(torch.tensor([tok(t)["input_ids"]]), output_hidden_states=True)
                            .hidden_states[2][0, -1] for t in texts])
    vector = extract(model, tok, PAIRS, layers=[1], method="mean_diff", batch_size=3, progress=False)
    bias = vector.parts[(1, "residual")].bias
    assert bias.dtype == torch.float64
    torch.testing.assert_close(bias, (tops[0::2] - tops[1::2]).mean(0), rtol=1e-12, atol=1e-12)

    readout = 2
    grad = extract(model, tok, PAIRS, layers=[0], method="grad", readout_layer=readout,
                   batch_size=3, progress=False).parts[(0, "residual")].bias
    reads = capture(model, tok, texts, [readout], progress=False)[readout][:, -1]
    assert reads.dtype == torch.float64
    d = (reads[0::2] - reads[1::2]).mean(0)
    at_0 = capture(model, tok, texts, [0], progress=False)[0][:, -1]
    expected = maths.signed_scaled(_bias_gradients(model, tok, texts, 0, "residual", readout, d, 1).mean(0),
                                   at_0[0::2] - at_0[1::2])
    assert grad.dtype == torch.float64
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    for method in ("pca_diff", "pca_center", "logistic", "lowrank"):
        part = extract(model, tok, PAIRS, layers=[1], method=method, progress=False).parts[(1, "residual")]
        assert all(t.dtype == torch.float64 for t in (part.bias, part.A, part.B) if t is not None), method


def _bias_gradients(model, tok, texts, layer, target, readout, d, n):
    """Reference for ``vjp_gradients``: per text, d(sum of d·h_readout over the last n tokens) /
    d(bias added to the output of ``target`` at ``layer``), one text at a time."""
    grads = []
    for text in texts:
        bias = torch.zeros(d.shape[0], dtype=d.dtype, requires_grad=True)
        top = {}

        def add(module, args, output, bias=bias):
            if isinstance(output, tuple):
                return (output[0] + bias,) + tuple(output[1:])
            return output + bias

        def read(module, args, output, top=top):
            top["h"] = output[0] if isinstance(output, tuple) else output

        handles = [resolve_module(model, layer, target).register_forward_hook(add),
                   resolve_module(model, readout, "residual").register_forward_hook(read)]
        try:
            model(torch.tensor([tok(text)["input_ids"]]))
        finally:
            for handle in handles:
                handle.remove()
        (grad,) = torch.autograd.grad((top["h"][0, -n:] @ d).sum(), bias)
        grads.append(grad)
    return torch.stack(grads)


def test_grad_through_a_module_the_model_updates_in_place():
    """Falcon adds the attention output into its MLP output in place (``mlp_output +=``): the
    VJP must not hand the model a leaf tensor there, and must differentiate the module's own
    output."""
    from steerkern.capture import vjp_gradients
    from tests.test_more_architectures import build

    model = build("falcon")
    texts = ["hello world", "hi", "a longer text than the others"]
    d = torch.randn(64, generator=torch.Generator().manual_seed(0))
    got = vjp_gradients(model, CharTokenizer(), texts, [1, 2], 3, d, target="mlp.down_proj",
                        last_n_tokens=2, batch_size=3, progress=False)
    for layer in (1, 2):
        want = _bias_gradients(model, CharTokenizer(), texts, layer, "mlp.down_proj", 3, d, 2)
        torch.testing.assert_close(got[layer], want, rtol=1e-4, atol=1e-5)


def test_grad_inside_inference_mode(tiny_model_factory):
    """extract(method='grad') under torch.inference_mode() gives the same vector as outside it;
    a model whose weights are inference tensors is a clear error."""
    model = tiny_model_factory("llama")
    options = dict(layers=[1], method="grad", readout_layer=3, progress=False)
    want = extract(model, CharTokenizer(), PAIRS, **options).parts[(1, "residual")].bias
    with torch.inference_mode():
        got = extract(model, CharTokenizer(), PAIRS, **options).parts[(1, "residual")].bias
    torch.testing.assert_close(got, want)
    from tests.tiny_models import build_tiny_model

    with torch.inference_mode():
        frozen = build_tiny_model("llama")
    with pytest.raises(ValueError, match="inference tensors"):
        extract(frozen, CharTokenizer(), PAIRS, **options)


class _NoBosTokenizer(CharTokenizer):
    """Adds no special tokens: an empty string has no tokens."""

    def __call__(self, text, add_special_tokens=True):
        return super().__call__(text, add_special_tokens=False)


def test_capture_checks_texts_layers_and_sizes(tiny_model_factory):
    model = tiny_model_factory("llama")
    tok = CharTokenizer()
    with pytest.raises(TypeError, match="single str"):  # not one text per character
        capture(model, tok, "hello", [1], progress=False)
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        capture(model, tok, ["hello", None], [1], progress=False)
    with pytest.raises(ValueError, match=r"texts\[1\]='' has no tokens"):
        capture(model, _NoBosTokenizer(), ["hello", ""], [1], progress=False)
    with pytest.raises(ValueError, match=r"last_n_tokens=3 but texts\[1\] has only 2 tokens"):
        capture(model, tok, ["hello", "h"], [1], last_n_tokens=3, progress=False)
    for bad in (dict(last_n_tokens=0), dict(batch_size=0), dict(batch_size=0, share_prefixes=False)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a positive int"):
            capture(model, tok, ["hello", "hello there"], [1], progress=False, **bad)
    with pytest.raises(ValueError, match="layers must be"):
        capture(model, tok, ["hello"], [], progress=False)
    # a negative index names a deeper layer than it compares as: the pass must reach it
    texts = [t for pair in PAIRS for t in pair]
    want = capture(model, tok, texts, [1, 3], last_n_tokens=2, progress=False)
    for share in (True, False):
        got = capture(model, tok, texts, [1, -1], last_n_tokens=2, progress=False, share_prefixes=share)
        assert sorted(got) == [-1, 1]
        torch.testing.assert_close(got[-1], want[3])
        torch.testing.assert_close(got[1], want[1])
    assert sorted(capture(model, tok, texts, 2, progress=False)) == [2]


def test_a_target_missing_from_one_layer_leaves_no_hooks():
    """Qwen2-MoE with ``mlp_only_layers=[0]``: only layer 0 has ``mlp.down_proj``. Asking for
    layers 0 and 1 is an error, and the hook already placed on layer 0 must not stay behind
    (it would break every later forward pass)."""
    import transformers

    from steerkern.capture import vjp_gradients
    from tests.hooks import steerkern_hook_count
    from tests.tiny_models import COMMON

    config = transformers.Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=48, shared_expert_intermediate_size=48,
                                         mlp_only_layers=[0])
    model = transformers.Qwen2MoeForCausalLM(config).eval()
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="not a sub-module of layer 1"):
        capture(model, tok, ["hello there"], [0, 1], target="mlp.down_proj", progress=False)
    with pytest.raises(ValueError, match="not a sub-module of layer 1"):
        vjp_gradients(model, tok, ["hello there"], [0, 1], 2, torch.ones(64),
                      target="mlp.down_proj", progress=False)
    assert steerkern_hook_count(model) == 0
    with torch.no_grad():
        model(torch.tensor([tok("hello")["input_ids"]]))


# --- bad input ---------------------------------------------------------------------------------


def test_bad_input_names_the_argument(tiny_model_factory):
    model = tiny_model_factory("llama")
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="pairs is empty"):
        extract(model, tok, [], progress=False)
    with pytest.raises(ValueError, match="3 chosen texts but 2 rejected"):
        extract(model, tok, (["a", "b", "c"], ["d", "e"]), progress=False)
    with pytest.raises(ValueError, match="layers=7 is out of range"):
        extract(model, tok, PAIRS, layers=[1, 7], progress=False)
    with pytest.raises(ValueError, match="target='mlp.nope'"):
        extract(model, tok, PAIRS, layers=[1], target="mlp.nope", progress=False)
    with pytest.raises(ValueError, match="method='pca'"):
        extract(model, tok, PAIRS, layers=[1], method="pca", progress=False)
    with pytest.raises(ValueError, match="linear target"):
        extract(model, tok, PAIRS, layers=[1], method="weight_svd", progress=False)
    with pytest.raises(ValueError, match="readout_layer=1 must be deeper"):
        extract(model, tok, PAIRS, layers=[1], method="grad", readout_layer=1, progress=False)
    with pytest.raises(ValueError, match="layers includes 3, the model's last.*steer layers below 3"):
        extract(model, tok, PAIRS, layers=[3], method="grad", progress=False)
    with pytest.raises(ValueError, match=r"last_n_tokens=3 but pairs\[2\] \(chosen\) has only 2 tokens"):
        extract(model, _NoBosTokenizer(), PAIRS[:2] + [("hi", "a longer text")], layers=[1],
                last_n_tokens=3, progress=False)
    with pytest.raises(ValueError, match="last_n_tokens=50"):
        extract(model, tok, PAIRS, layers=[1], last_n_tokens=50, progress=False)
    with pytest.raises(TypeError, match="pairs\\[0\\]"):
        extract(model, tok, [("ok", 3)], progress=False)
    for bad in (float("inf"), "a", 0.0, True):
        with pytest.raises(ValueError, match="fisher_lambda must be None or a finite number > 0"):
            extract(model, tok, PAIRS, layers=[1], method="grad", fisher_lambda=bad, progress=False)
    with pytest.raises(ValueError, match="layers must be an int or a non-empty list"):
        extract(model, tok, PAIRS, layers=[1.0], progress=False)
    with pytest.raises(TypeError, match="accelerator must be an accelerate.Accelerator"):
        extract(model, tok, PAIRS, layers=[1], accelerator=object(), progress=False)


def test_layers_as_numpy_or_tensor_indices(tiny_model_factory):
    np = pytest.importorskip("numpy")
    model = tiny_model_factory("llama")
    expected = extract(model, CharTokenizer(), PAIRS, layers=[1, 3], method="mean_diff", progress=False)
    for layers in (np.array([1, 3]), torch.tensor([1, -1]), (np.int64(1), 3)):
        got = extract(model, CharTokenizer(), PAIRS, layers=layers, method="mean_diff", progress=False)
        assert got.layers == [1, 3]
        for key, part in expected.parts.items():
            torch.testing.assert_close(got.parts[key].bias, part.bias)
    assert list(capture(model, CharTokenizer(), ["abc", "de"], np.int64(2), progress=False)) == [2]


@pytest.mark.parametrize("method", ["mean_diff", "grad"])
def test_a_model_in_training_mode_is_read_without_dropout(method):
    """Dropout would make every extraction random; the model is read in eval mode and every
    module's training flag is restored."""
    from tests.tiny_models import build_tiny_model

    model = build_tiny_model("gpt2")  # GPT-2's dropout defaults to 0.1
    model.transformer.h[1].eval()  # a mixed state, restored as it was
    expected = extract(model.eval(), CharTokenizer(), PAIRS, layers=[1], method=method, progress=False)
    model.train()
    model.transformer.h[1].eval()
    flags = [m.training for m in model.modules()]
    for _ in range(2):
        got = extract(model, CharTokenizer(), PAIRS, layers=[1], method=method, progress=False)
        torch.testing.assert_close(got.parts[(1, "residual")].bias, expected.parts[(1, "residual")].bias)
    assert [m.training for m in model.modules()] == flags


# --- distributed ------------------------------------------------------------------------------


def _distributed_worker(rank, world, out_dir):
    # a file store: no TCP store server thread in rank 0 to race the other rank's teardown
    # (rank 0 once aborted, "terminate called without an active exception", on CI) and no
    # port picked here that another process can take before the store binds it
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank, world_size=world)
    try:
        from tests.tiny_models import build_tiny_model

        model = build_tiny_model("llama")
        for method in ("pca_center", "grad"):
            vector = extract(model, CharTokenizer(), PAIRS, layers=[1, 2], method=method,
                             batch_size=2, progress=False)
            vector.save(os.path.join(out_dir, f"{method}-{rank}.safetensors"))
        torch.distributed.barrier()  # neither rank tears down while the other still talks
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.multiproc
def test_two_process_extraction_equals_one_process(tmp_path, tiny_model_factory):
    import torch.multiprocessing as mp

    from steerkern.vectors import SteeringVector

    mp.spawn(_distributed_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    model = tiny_model_factory("llama")
    for method in ("pca_center", "grad"):
        single = extract(model, CharTokenizer(), PAIRS, layers=[1, 2], method=method, progress=False)
        for rank in (0, 1):
            got = SteeringVector.load(tmp_path / f"{method}-{rank}.safetensors")
            for key, part in single.parts.items():
                torch.testing.assert_close(got.parts[key].bias, part.bias, rtol=1e-4, atol=1e-6)


def _one_rank_fails_worker(rank, world, out_dir, method):
    import datetime

    # a short timeout: without the fix, rank 0 waits in a gather that rank 1 never joins
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=20))
    try:
        from tests.tiny_models import build_tiny_model

        # pairs[1], in rank 1's share only, is shorter than last_n_tokens
        pairs = [PAIRS[0], ("ab", "cd"), PAIRS[1]]
        try:
            extract(build_tiny_model("llama"), CharTokenizer(), pairs, layers=[1], method=method,
                    last_n_tokens=4, progress=False)
            outcome = "returned"
        except Exception as error:  # noqa: BLE001 -- reported to the test
            outcome = f"{type(error).__name__}: {error}"
        with open(os.path.join(out_dir, f"{method}-{rank}.txt"), "w") as f:
            f.write(outcome)
        torch.distributed.barrier()  # a program that goes on after the error: the next collective
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.multiproc
def test_an_error_on_one_process_stops_every_process(tmp_path, method="mean_diff"):
    """A bad text in one process's share raises there, before its gather: every process must
    raise (naming the process and its error), not wait for it in the gather or pair that gather
    with the failed process's next collective."""
    import torch.multiprocessing as mp

    mp.spawn(_one_rank_fails_worker, args=(2, str(tmp_path), method), nprocs=2, join=True)
    failed = (tmp_path / f"{method}-1.txt").read_text()
    others = (tmp_path / f"{method}-0.txt").read_text()
    assert failed.startswith("ValueError: last_n_tokens=4 but pairs[1] (chosen) has only 3 tokens")
    assert others.startswith("RuntimeError: extract failed on process 1 of 2 (ValueError: last_n_tokens=4")


# --- the default model ------------------------------------------------------------------------

HELD_PROMPTS = [
    "The weather today is",
    "My week at work has been",
    "I think this movie is",
    "The food at the party was",
    "Going to school this morning felt",
    "Honestly, my neighbours are",
]
POSITIVE = [" great", " wonderful", " happy", " amazing", " good", " beautiful"]
NEGATIVE = [" terrible", " awful", " sad", " horrible", " bad", " miserable"]


def _steered_scores(model, tokenizer, vector, coefficients, use_control=False):
    """Mean over held prompts of log p(positive words) - log p(negative words) at the next
    token, with the vector applied by a minimal forward hook (additive parts), or by
    ``steerkern.control.steer`` when ``use_control``."""
    pos = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in POSITIVE]
    neg = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in NEGATIVE]
    texts = [render_prompt(tokenizer, "Finish the sentence.") + p for p in HELD_PROMPTS]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    scores = []
    for coeff in coefficients:
        if use_control:
            from steerkern.control import steer

            with steer(model, vector, coeff=float(coeff)), torch.no_grad():
                logp = model(**enc).logits[:, -1].float().log_softmax(-1)
            scores.append(float((logp[:, pos].logsumexp(-1) - logp[:, neg].logsumexp(-1)).mean()))
            continue
        handles = []
        for (layer, target), part in vector.parts.items():
            def hook(module, args, output, bias=part.bias, coeff=coeff):
                if isinstance(output, tuple):
                    return (output[0] + coeff * bias,) + tuple(output[1:])
                return output + coeff * bias
            handles.append(resolve_module(model, layer, target).register_forward_hook(hook))
        try:
            with torch.no_grad():
                logp = model(**enc).logits[:, -1].float().log_softmax(-1)
        finally:
            for handle in handles:
                handle.remove()
        scores.append(float((logp[:, pos].logsumexp(-1) - logp[:, neg].logsumexp(-1)).mean()))
    return scores


def test_sentiment_vector_steers_the_default_model(default_model):
    model, tokenizer = default_model
    pairs = concept_pairs("sentiment", tokenizer, max_suffixes=10, cuts=2)
    vector = extract(model, tokenizer, pairs, layers=[8, 10, 12], method="mean_diff", progress=False)
    assert vector.metadata["concept"] == "sentiment"
    vector.validate(model)
    scores = _steered_scores(model, tokenizer, vector, [-2, -1, 0, 1, 2])
    assert all(b > a for a, b in zip(scores, scores[1:])), scores
    assert scores[-1] - scores[0] > 1.0, scores
    # the package's own steering applies the same vector the same way
    via_control = _steered_scores(model, tokenizer, vector, [-2, 0, 2], use_control=True)
    assert via_control == pytest.approx([scores[0], scores[2], scores[4]], abs=1e-3)


def overflowing_model():
    """A tiny llama whose layer 0 overflows: one MLP output weight is infinite, so every
    activation from layer 0's output on holds Inf or NaN (what a float16 copy of a checkpoint
    trained in bfloat16 can do)."""
    from tests.tiny_models import build_tiny_model

    model = build_tiny_model("llama")
    with torch.no_grad():
        decoder_layers(model)[0].mlp.down_proj.weight[0, 0] = float("inf")
    return model


@pytest.mark.parametrize("method", ["mean_diff", "pca_diff", "pca_center", "logistic", "lowrank", "grad",
                                    "weight_svd"])
def test_activations_that_overflow_are_named_as_such(method):
    """Non-finite activations once gave a solver's LinAlgError, 'are chosen and rejected
    identical?' or 'every output difference is zero'."""
    options = dict(target="mlp.down_proj") if method == "weight_svd" else {}
    with pytest.raises(ValueError, match=r"at layer 2: the .* hold Inf or NaN: the model overflowed"):
        extract(overflowing_model(), CharTokenizer(), PAIRS, layers=[2], method=method, progress=False, **options)


def test_captured_activations_are_ordinary_tensors(tiny_model_factory):
    """They were inference tensors: centring them in place or training a probe on them raised."""
    model = tiny_model_factory("llama")
    acts, ins = capture(model, CharTokenizer(), ["some text", "more text here"], [1], inputs=True, progress=False)
    for tensor in (acts[1], ins[1]):
        assert not tensor.is_inference()
        tensor.sub_(tensor.mean(0))
    probe = torch.zeros(acts[1].shape[-1], requires_grad=True)
    (acts[1] @ probe).sum().backward()
    assert probe.grad is not None


def test_a_target_that_never_runs_or_is_discarded_is_named(tiny_model_factory):
    """GPT-2's attention dropout module is not called under SDPA attention (a bare KeyError); a
    module whose output the model discards (Mixtral's router under transformers 5) gave 'are
    chosen and rejected identical?' from grad and 'does not require grad' from train_adapter."""
    from steerkern.train import train_adapter
    from tests.tiny_models import build_tiny_model

    gpt2 = tiny_model_factory("gpt2")
    if gpt2.config._attn_implementation == "eager":
        pytest.skip("GPT-2's eager attention calls its dropout module")
    with pytest.raises(ValueError, match=r"target 'attn.attn_dropout' at layer 1 never ran in the forward pass"):
        extract(gpt2, CharTokenizer(), PAIRS, layers=[1], target="attn.attn_dropout", method="mean_diff",
                progress=False)
    model = build_tiny_model("llama")
    mlp = decoder_layers(model)[1].mlp
    mlp.discarded = torch.nn.Linear(64, 8)
    forward = mlp.forward
    mlp.forward = lambda x: (mlp.discarded(x), forward(x))[1]  # runs, and its output goes nowhere
    with pytest.raises(ValueError, match=r"target 'mlp.discarded' at layer 1: the read-out at layer \d+ does not depend on"):
        extract(model, CharTokenizer(), PAIRS, layers=[1], target="mlp.discarded", method="grad", progress=False)
    with pytest.raises(ValueError, match=r"target 'mlp.discarded': the loss at layer \d+ does not depend on the steered"):
        train_adapter(model, CharTokenizer(), PAIRS, layers=[1], target="mlp.discarded", steps=1, n_last=1,
                      progress=False)


def test_extraction_inside_a_positional_steer_context_does_not_depend_on_batching(tiny_model_factory):
    """A whole-text pass that repeats the previous one plus a token (a suffix cut one token
    longer) was taken for the decode step of a model without cache, so under positions="prompt"
    or "generated" the vector changed with batch_size."""
    from steerkern.control import steer
    from steerkern.vectors import SteeringVector

    model = tiny_model_factory("llama")
    steering = SteeringVector.from_directions({0: 3 * torch.ones(64)})
    pairs = [("a terrible day", "a terrible day?"), ("so happy", "so sad")]  # passes by length: 6, 8, 14, 15
    for positions in ("prompt", "generated"):
        with steer(model, steering, positions=positions):
            together = extract(model, CharTokenizer(), pairs, layers=[2], method="mean_diff", progress=False,
                               share_prefixes=False)
            one_by_one = extract(model, CharTokenizer(), pairs, layers=[2], method="mean_diff", progress=False,
                                 share_prefixes=False, batch_size=1)
        torch.testing.assert_close(one_by_one.parts[(2, "residual")].bias, together.parts[(2, "residual")].bias,
                                   rtol=1e-5, atol=1e-6, msg=positions)


def test_layer_indices_of_any_integral_type(tiny_model_factory):
    """train_adapter refused numpy and torch layer indices that extract takes."""
    import numpy as np

    from steerkern.models import check_layer
    from steerkern.train import train_adapter

    model = tiny_model_factory("llama")
    for layers in (np.int64(1), np.array([1, 2]), torch.tensor([1])):
        vector = train_adapter(model, CharTokenizer(), PAIRS[:2], layers=layers, steps=1, n_last=1, progress=False)
        assert sorted({layer for layer, _ in vector.parts}) == sorted(np.atleast_1d(np.asarray(layers)).tolist())
    assert check_layer(model, torch.tensor(-1)) == 3
    for bad in (torch.tensor(1.0), torch.tensor(True), torch.tensor([1])):
        with pytest.raises(TypeError, match="must be an int layer index"):
            check_layer(model, bad)


def test_small_arguments_are_checked(tiny_model_factory):
    mask = torch.ones(2, 5, dtype=torch.long)
    assert last_positions(mask, 2).tolist() == [[3, 4], [3, 4]]
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="last_n_tokens must be a positive int"):
            last_positions(mask, bad)
    with pytest.raises(ValueError, match=r"attention_mask must be a \[batch, tokens\] tensor, got \(5,\)"):
        last_positions(torch.ones(5), 1)
    model = tiny_model_factory("llama")
    with pytest.raises(TypeError, match="share_prefixes must be True or False, got 'no'"):
        extract(model, CharTokenizer(), PAIRS, layers=[1], share_prefixes="no", progress=False)
    with pytest.raises(TypeError, match="concept must be a name"):
        extract(model, CharTokenizer(), PAIRS, layers=[1], concept=5, progress=False)
    with pytest.raises(TypeError, match="progress must be True or False, got 'no'"):
        extract(model, CharTokenizer(), PAIRS, layers=[1], progress="no")


def test_what_the_pair_count_rules_out_is_refused_before_any_pass(tiny_model_factory):
    model = tiny_model_factory("llama")
    calls = []
    handle = model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        for options, message in [
                (dict(method="pca_diff", pairs=PAIRS[:1]), "pca_diff.*at least 2 difference rows"),
                (dict(method="lowrank", rank=3, pairs=PAIRS[:1], last_n_tokens=2), "rank=3 exceeds the 2 difference rows"),
                (dict(method="weight_svd", rank=65, target="mlp.down_proj", pairs=PAIRS),
                 "at layer 1: rank=65 must be between 1 and the weight's rank bound 64")]:
            pairs = options.pop("pairs")
            with pytest.raises(ValueError, match=message):
                extract(model, CharTokenizer(), pairs, layers=[1], progress=False, **options)
    finally:
        handle.remove()
    assert not calls
    extract(model, CharTokenizer(), PAIRS[:1], layers=[1], method="pca_diff", last_n_tokens=2, progress=False)


def test_on_off_options_and_the_tokenizer_of_capture_are_checked(tiny_model_factory):
    """``inputs="no"`` returned the ``(outputs, inputs)`` tuple, ``minimal="no"`` added the
    minimal pairs (truthy strings); capture with ``tokenizer=None`` failed with
    "'NoneType' object is not callable"."""
    model = tiny_model_factory("llama")
    for kwargs, error, message in ((dict(inputs="no"), TypeError, "inputs must be True or False"),
                                   (dict(share_prefixes=1), TypeError, "share_prefixes must be True or False"),
                                   (dict(progress="no"), TypeError, "progress must be True or False"),
                                   (dict(tokenizer=None), TypeError, "tokenizer must be the model's tokenizer")):
        args = dict(tokenizer=CharTokenizer(), progress=False)
        args.update(kwargs)
        with pytest.raises(error, match=message):
            capture(model, args.pop("tokenizer"), ["some text"], [1], **args)
    with pytest.raises(TypeError, match="minimal must be True or False"):
        concept_pairs("sentiment", None, minimal="no")


# --- read positions, custom methods, recording (what steering-vectors users port) -------------

SHARED = "Pretend you are a person who is " # a long common prefix, so capture shares it
SHARED_TEXTS = [SHARED + tail for tail in ("kind (A)", "cruel and mean (B)", "calm", "angry at all (A)")]


def _hidden_at(model, tok, text, layer, positions):
    """Reference: ``output_hidden_states`` of ``text`` alone at token ``positions``."""
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
    return states[layer + 1][0, positions]


def test_capture_reads_at_a_token_index(tiny_model_factory):
    """``read_token_index`` as an int (from either end), a callable and a per-text list, with
    ``last_n_tokens`` ending there, equal the hidden states of each text alone, with and
    without prefix sharing."""
    model = tiny_model_factory("llama")
    tok = CharTokenizer()
    n_ids = [len(tok(t)["input_ids"]) for t in SHARED_TEXTS]
    by_text = {t: 1 + t.index(" a") for t in SHARED_TEXTS}  # the token of the space before "a"
    from steerkern.capture import _prefix_plan

    spans = [[n - 2] for n in n_ids]
    assert _prefix_plan(model, [tok(t)["input_ids"] for t in SHARED_TEXTS], spans) is not None  # shared
    cases = [(-2, [n - 2 for n in n_ids]), (5, [5] * 4), (by_text.get, list(by_text.values())),
             ([3, -1, 7, -4], [3, n_ids[1] - 1, 7, n_ids[3] - 4])]
    for index, ends in cases:
        for share in (True, False):
            got = capture(model, tok, SHARED_TEXTS, [1, 2], last_n_tokens=2, read_token_index=index,
                          progress=False, share_prefixes=share, batch_size=3)
            for i, (text, end) in enumerate(zip(SHARED_TEXTS, ends)):
                for layer in (1, 2):
                    torch.testing.assert_close(got[layer][i], _hidden_at(model, tok, text, layer, [end - 1, end]),
                                               rtol=1e-4, atol=1e-5)


def test_read_token_index_is_checked_by_name(tiny_model_factory):
    model = tiny_model_factory("llama")
    tok = CharTokenizer()
    texts = ["hello", "hi"]  # 6 and 3 tokens with the BOS
    with pytest.raises(ValueError, match=r"read_token_index=3 for texts\[1\], which has 3 tokens"):
        capture(model, tok, texts, [1], read_token_index=3, progress=False)
    with pytest.raises(ValueError, match=r"read_token_index=-4 for texts\[1\]"):
        capture(model, tok, texts, [1], read_token_index=-4, progress=False)
    with pytest.raises(ValueError, match=r"last_n_tokens=2 tokens ending at token 0 of texts\[0\]"):
        capture(model, tok, texts, [1], read_token_index=0, last_n_tokens=2, progress=False)
    with pytest.raises(TypeError, match=r"read_token_index\(texts\[0\]\) must return an int"):
        capture(model, tok, texts, [1], read_token_index=lambda text: "last", progress=False)
    with pytest.raises(ValueError, match="one int per text"):
        capture(model, tok, texts, [1], read_token_index=[1, 2, 3], progress=False)
    for bad in (1.0, True, "last"):
        with pytest.raises(TypeError, match="read_token_index must be"):
            capture(model, tok, texts, [1], read_token_index=bad, progress=False)
    with pytest.raises(TypeError, match="read_token_index must be an int, a callable"):
        extract(model, tok, PAIRS, layers=[1], read_token_index=[1] * 10, progress=False)
    with pytest.raises(ValueError, match=r"read_token_index=40 for pairs\[0\] \(chosen\)"):
        extract(model, tok, PAIRS, layers=[1], read_token_index=40, progress=False)


@pytest.mark.parametrize("method", ["mean_diff", "pca_center", "grad"])
def test_extract_at_a_token_index_equals_extracting_the_cut_texts(tiny_model_factory, method):
    """A causal model's state at token ``p`` does not see the tokens after it, so reading at
    ``p`` equals reading the last token of the text cut after ``p`` (``grad`` included: its
    read-out moves to ``p`` too, and the bias after ``p`` cannot reach it)."""
    model = tiny_model_factory("llama")
    tok = CharTokenizer()
    options = dict(layers=[1], method=method, progress=False, last_n_tokens=2)
    cut = [(c[:-2], r[:-2]) for c, r in PAIRS]  # one char per token: -3 becomes the last
    want = extract(model, tok, cut, **options)
    got = extract(model, tok, PAIRS, read_token_index=-3, **options)
    torch.testing.assert_close(got.parts[(1, "residual")].bias, want.parts[(1, "residual")].bias,
                               rtol=1e-4, atol=1e-5)
    assert got.metadata["read_token_index"] == -3
    # a callable: each text read at its own token (its first space, or its last token)
    def first_space(text):
        return text.index(" ") + 1 if " " in text else -1
    cut = [tuple(t[:first_space(t)] if " " in t else t for t in pair) for pair in PAIRS]
    want = extract(model, tok, cut, **{**options, "last_n_tokens": 1})
    got = extract(model, tok, PAIRS, read_token_index=first_space, **{**options, "last_n_tokens": 1})
    torch.testing.assert_close(got.parts[(1, "residual")].bias, want.parts[(1, "residual")].bias,
                               rtol=1e-4, atol=1e-5)
    assert got.metadata["read_token_index"] == "callable:first_space"


def test_extract_with_a_custom_method(tiny_model_factory):
    """A callable method gets the reads as capture gives them (chosen and rejected rows of the
    same pair and token aligned) and its direction is the vector's part, unchanged."""
    model = tiny_model_factory("llama")
    tok = CharTokenizer()
    seen = []

    def unit_mean(chosen, rejected):
        seen.append((chosen.shape, chosen.dtype))
        d = (chosen - rejected).mean(0)
        chosen.zero_()  # in place: must not change what another layer or the caller reads
        return d / d.norm()

    vector = extract(model, tok, PAIRS, layers=[1, 2], method=unit_mean, last_n_tokens=2, progress=False)
    texts = [t for pair in PAIRS for t in pair]
    acts = capture(model, tok, texts, [1, 2], last_n_tokens=2, progress=False)
    for layer in (1, 2):
        d = (acts[layer][0::2] - acts[layer][1::2]).reshape(-1, 64).double().mean(0)
        torch.testing.assert_close(vector.parts[(layer, "residual")].bias.double(), d / d.norm(),
                                   rtol=1e-4, atol=1e-5)
    assert seen == [(torch.Size([10, 64]), torch.float32)] * 2
    assert vector.metadata["method"] == "custom:unit_mean"
    assert vector.metadata["scale"] == "as the custom method returned it"
    with pytest.raises(ValueError, match=r"custom:<lambda>'\) at layer 1: method \(a callable\) must return .* \[64\]"):
        extract(model, tok, PAIRS, layers=[1], method=lambda c, r: c - r, progress=False)
    with pytest.raises(ValueError, match=r"at layer 1: method \(a callable\) returned NaN or Inf"):
        extract(model, tok, PAIRS, layers=[1], method=lambda c, r: c[0] * float("nan"), progress=False)
    with pytest.raises(TypeError, match=r"method \(a callable\) must return a tensor"):
        extract(model, tok, PAIRS, layers=[1], method=lambda c, r: object(), progress=False)
    with pytest.raises(ValueError, match="or a callable"):
        extract(model, tok, PAIRS, layers=[1], method="svm", progress=False)


def test_record_gives_every_pass_and_sees_steering_entered_before_it(tiny_model_factory):
    from steerkern import SteeringVector, steer
    from steerkern.capture import record
    from tests.hooks import steerkern_hook_count

    model = tiny_model_factory("llama")
    ids = torch.tensor([[0, 0, 5, 6, 7], [4, 5, 6, 7, 8]])
    mask = (ids != 0).long()
    with torch.no_grad():
        states = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with torch.no_grad(), record(model, [1, -2]) as acts:
        model(input_ids=ids, attention_mask=mask)
        model(ids[:1, 2:])
    assert sorted(acts) == [-2, 1] and [a.shape for a in acts[1]] == [(2, 5, 64), (1, 3, 64)]
    torch.testing.assert_close(acts[1][0], states[2])  # hidden_states[i + 1]: layer i's output
    torch.testing.assert_close(acts[-2][0], states[3])
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before
    bias = torch.randn(64, generator=torch.Generator().manual_seed(0))
    vector = SteeringVector.from_directions({1: bias})
    with torch.no_grad(), steer(model, vector, coeff=2.0), record(model, 1, to_cpu=True) as acts:
        model(input_ids=ids, attention_mask=mask)
    want = states[2] + 2.0 * bias * mask[..., None]  # pads are never steered
    torch.testing.assert_close(acts[1][0], want, rtol=1e-5, atol=1e-5)
    assert steerkern_hook_count(model) == 0
    with record(model, [2], target="mlp") as acts:  # generate: the prompt pass, then one per step
        model.generate(ids[1:], attention_mask=mask[1:], max_new_tokens=3, do_sample=False)
    assert [tuple(a.shape) for a in acts[2]] == [(1, 5, 64), (1, 1, 64), (1, 1, 64)]
    with pytest.raises(ValueError, match="layers=9 is out of range"):
        with record(model, [1, 9]):
            pass
    with pytest.raises(TypeError, match="to_cpu"):
        with record(model, 1, to_cpu="yes"):
            pass
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before

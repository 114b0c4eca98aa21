"""coherence_penalty, margin_loss and inner_contrastive_loss against plain float64 references."""

import math

import pytest
import torch

from csrc_triton import logprobs_ref as R
from steerkern import ops
from steerkern.loss import (
    CoherenceInputs,
    coherence_penalty,
    inner_contrastive_loss,
    margin_loss,
    projection_scores,
    sequence_penalty,
)

KINDS = ["log_barrier", "hinge", "squared_hinge"]
TAU, KAPPA = 0.5, 1.7


def _plain_penalty(d: float, kind: str) -> float:
    x = max(d - TAU, 0.0)
    return {"log_barrier": KAPPA * math.log1p(x), "hinge": x, "squared_hinge": x * x}[kind]


def _plain_slope(d: float, kind: str) -> float:
    if d <= TAU:
        return 0.0
    x = d - TAU
    return {"log_barrier": KAPPA / (1 + x), "hinge": 1.0, "squared_hinge": 2 * x}[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_penalty_at_and_around_the_margin(kind):
    ds = [TAU - 1e-3, TAU, TAU + 1e-3, TAU + 2.0, -3.0]
    d = torch.tensor(ds, dtype=torch.float64, requires_grad=True)
    p = coherence_penalty(d, kind, TAU, KAPPA)
    p.sum().backward()
    for i, x in enumerate(ds):
        assert p[i].item() == pytest.approx(_plain_penalty(x, kind), rel=1e-12, abs=1e-15)
        assert d.grad[i].item() == pytest.approx(_plain_slope(x, kind), rel=1e-9, abs=1e-15)
    # at d = tau exactly: zero value and zero gradient (inactive)
    assert p[1].item() == 0.0 and d.grad[1].item() == 0.0


def test_penalty_rejects_bad_arguments():
    d = torch.zeros(3)
    with pytest.raises(ValueError, match="kind"):
        coherence_penalty(d, "abs")
    with pytest.raises(ValueError, match="tau"):
        coherence_penalty(d, tau=-1.0)
    with pytest.raises(ValueError, match="kappa"):
        coherence_penalty(d, kappa=0.0)


def _data(B=3, T=7, D=12, V=40, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, dtype=dtype)
    W = torch.randn(V, D, generator=g, dtype=dtype) * 0.5
    y = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        base = R.token_logprobs_naive(h.reshape(-1, D), W, y.reshape(-1)).reshape(B, T)
    # reference log-probs around the policy's: about half the tokens beyond the margin
    shift = torch.rand(B, T, generator=g, dtype=torch.float64) * 2.0
    logp_ref = (base + shift).to(dtype)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    return h, W, y, logp_ref, mask


def _plain_margin(h, W, y, logp_ref, mask, kind, reduction, softcap=None):
    """Obvious float64 reference: full logits (soft-capped by ``softcap``), loops over sequences."""
    B, T, D = h.shape
    logits = h.double() @ W.double().T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits, -1).gather(-1, y[..., None])[..., 0]
    d = logp_ref.double() - logp
    x = torch.relu(d - TAU)
    pen = {"log_barrier": KAPPA * torch.log1p(x), "hinge": x, "squared_hinge": x * x}[kind]
    pen = pen * mask
    if reduction == "none":
        return pen
    return torch.stack([pen[b].sum() / mask[b].sum() for b in range(B)]).mean()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_margin_loss_value_and_gradients(kind, reduction):
    h, W, y, logp_ref, mask = _data()
    hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
    got = margin_loss(
        hh, WW, y, logp_ref, mask, tau=TAU, kind=kind, kappa=KAPPA, reduction=reduction
    )
    hr, Wr = h.clone().requires_grad_(), W.clone().requires_grad_()
    want = _plain_margin(hr, Wr, y, logp_ref, mask, kind, reduction)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    w = (
        torch.randn(want.shape, dtype=torch.float64)
        if reduction == "none"
        else torch.tensor(1.0, dtype=torch.float64)
    )
    (got * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(hh.grad, hr.grad, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(WW.grad, Wr.grad, atol=1e-12, rtol=1e-9)


def test_margin_loss_of_a_soft_capped_model():
    """Logits ``c tanh(W h / c)`` (Gemma 2): value and gradients against the full-logits form."""
    h, W, y, logp_ref, mask = _data()
    W = W * 4
    hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
    got = margin_loss(hh, WW, y, logp_ref - 2.0, mask, tau=TAU, kind="hinge", softcap=1.5)
    hr, Wr = h.clone().requires_grad_(), W.clone().requires_grad_()
    want = _plain_margin(hr, Wr, y, logp_ref - 2.0, mask, "hinge", "mean", softcap=1.5)
    uncapped = _plain_margin(h, W, y, logp_ref - 2.0, mask, "hinge", "mean")
    assert abs(float(want - uncapped)) > 0.1
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    got.backward()
    want.backward()
    torch.testing.assert_close(hh.grad, hr.grad, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(WW.grad, Wr.grad, atol=1e-12, rtol=1e-9)


def test_margin_loss_flat_is_one_sequence():
    h, W, y, logp_ref, mask = _data(B=1)
    flat = margin_loss(h[0], W, y[0], logp_ref[0], mask[0], tau=TAU, kappa=KAPPA)
    batched = margin_loss(h, W, y, logp_ref, mask, tau=TAU, kappa=KAPPA)
    want = _plain_margin(h, W, y, logp_ref, mask, "log_barrier", "mean")
    torch.testing.assert_close(flat, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(batched, want, atol=1e-12, rtol=1e-10)


def test_batched_mean_is_mean_of_sequence_means():
    lp = torch.zeros(2, 4, dtype=torch.float64)
    ref = torch.tensor([[2.5, 0.0, 0.0, 0.0], [1.5, 1.5, 1.5, 1.5]], dtype=torch.float64)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    got = sequence_penalty(lp, ref, mask, tau=0.5, kind="hinge")
    # sequence 0: mean over its 1 token = 2.0; sequence 1: 1.0 -> batch mean 1.5
    assert got.item() == pytest.approx(1.5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masked_token_changes_nothing(backend):
    h, W, y, logp_ref, mask = _data(dtype=torch.float32)
    b, t = 1, 3
    mask[b, t] = False

    def run(h_in, ref_in):
        hh = h_in.clone().requires_grad_()
        with ops.use_backend(backend):
            loss = margin_loss(hh, W, y, ref_in, mask, tau=TAU, kappa=KAPPA)
            loss.backward()
        return loss.detach(), hh.grad

    loss0, g0 = run(h, logp_ref)
    h2, ref2 = h.clone(), logp_ref.clone()
    h2[b, t] += 100.0  # wildly different state at the masked token
    ref2[b, t] = float("nan")  # and a poisoned reference
    loss1, g1 = run(h2, ref2)
    assert torch.equal(loss0, loss1)
    assert torch.equal(g0, g1)
    assert torch.equal(g0[b, t], torch.zeros_like(g0[b, t]))


def test_inactive_tokens_get_exactly_zero_gradient():
    h, W, y, logp_ref, mask = _data()
    with torch.no_grad():
        logp = R.token_logprobs_naive(h.reshape(-1, h.shape[-1]), W, y.reshape(-1)).reshape(y.shape)
    logp_ref = logp + 0.1  # d = 0.1 < tau: nothing active
    logp_ref[0, 2] = logp[0, 2] + 2.0  # except one token
    hh = h.clone().requires_grad_()
    margin_loss(hh, W, y, logp_ref, None, tau=TAU, kind="hinge").backward()
    nonzero = (hh.grad.abs().sum(-1) != 0).nonzero().tolist()
    assert nonzero == [[0, 2]]


def test_gradcheck_margin_loss():
    h, W, y, logp_ref, mask = _data(B=2, T=4, D=5, V=17)
    h.requires_grad_()
    W.requires_grad_()
    for kind in KINDS:
        f = lambda h, W, kind=kind: margin_loss(
            h, W, y, logp_ref, mask, tau=TAU, kind=kind, kappa=KAPPA
        )
        assert torch.autograd.gradcheck(f, (h, W), eps=1e-6, atol=1e-7, fast_mode=True)


def test_margin_loss_rejects_bad_shapes():
    h, W, y, logp_ref, mask = _data()
    with pytest.raises(ValueError, match="labels"):
        margin_loss(h, W, y[:, :-1], logp_ref, mask)
    with pytest.raises(ValueError, match="logp_ref"):
        margin_loss(h, W, y, logp_ref[:, :-1], mask)
    with pytest.raises(ValueError, match="mask"):
        margin_loss(h, W, y, logp_ref, mask[:, :-1])
    with pytest.raises(ValueError, match="reduction"):
        margin_loss(h, W, y, logp_ref, mask, reduction="avg")
    for weights in (2 * mask.long(), 2.0 * mask.float()):  # a mask selects tokens, it does not weight them
        with pytest.raises(ValueError, match="only 0 and 1"):
            margin_loss(h, W, y, logp_ref, weights)


def test_margin_loss_empty_batch_is_zero_not_nan():
    """B = 0 sequences (e.g. a filtered-out micro-batch): 0 with a zero gradient, not NaN."""
    h, W, y, logp_ref, mask = _data()
    hh = h[:0].clone().requires_grad_()
    loss = margin_loss(hh, W, y[:0], logp_ref[:0], mask[:0], tau=TAU, kappa=KAPPA)
    assert loss.shape == () and loss.item() == 0.0
    loss.backward()
    assert hh.grad.shape == (0,) + tuple(h.shape[1:])
    assert sequence_penalty(torch.zeros(0, 3), torch.zeros(0, 3)).item() == 0.0


def test_margin_loss_and_sequence_penalty_reject_non_tensors():
    h, W, y, logp_ref, mask = _data()
    with pytest.raises(ValueError, match="h_pi"):
        margin_loss(h.tolist(), W, y, logp_ref, mask)
    with pytest.raises(TypeError, match="logp_ref"):
        sequence_penalty(logp_ref[0], logp_ref[0].tolist())
    with pytest.raises(TypeError, match="logp_pi"):
        sequence_penalty(y[0], logp_ref[0])


# --- inner contrastive loss -------------------------------------------------------------------

B, T_CHO, T_REJ, D, N_LAST, L = 4, 6, 5, 8, 3, 5
EPS = 1e-6


def _contrastive_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    states = {k: (r(B, T_CHO, D), r(B, T_REJ, D)) for k in ("pos", "neg", "ref")}
    u = r(D)
    u = u / u.norm()
    coh = {
        k: (
            r(B, L) - 1.0,
            r(B, L) - 1.0 + torch.rand(B, L, generator=g, dtype=torch.float64) * 2,
            torch.rand(B, L, generator=g) > 0.2,
        )
        for k in ("pos", "neg")
    }
    for k in coh:
        coh[k][2][:, 0] = True
    return states, u, coh


def _plain_contrastive(states, u, coh, kind, order_weight, order_margin, projection="linear",
                       scale="pair", saturation=2.0, shift_weight=0.0):
    """SPEC section 3 (and its bounded variant) written out with loops over the batch, float64."""

    def s(pair, b):
        cho, rej = pair
        total = 0.0
        for k in range(1, N_LAST + 1):
            total = total + (cho[b, -k] - rej[b, -k]) @ u
        return total / N_LAST

    def coh_term(triple, b):
        lp_pi, lp_ref, mask = triple
        vals = [
            coherence_penalty(lp_ref[b, t] - lp_pi[b, t], kind, TAU, KAPPA)
            for t in range(L)
            if mask[b, t]
        ]
        return sum(vals) / len(vals)

    def S(b):
        if scale == "pair":
            return abs(s(states["ref"], b)) + EPS
        if scale == "batch":
            return sum(abs(s(states["ref"], k)) for k in range(B)) / B + EPS
        return scale

    def proj(c, key, b):
        if projection == "linear":
            return -c * s(states[key], b) / S(b)
        z = c * (s(states[key], b) - s(states["ref"], b)) / S(b)
        return -saturation * torch.tanh(z / saturation)

    total = 0.0
    for c, key in ((+1, "pos"), (-1, "neg")):
        terms = []
        for b in range(B):
            terms.append(proj(c, key, b) + coh_term(coh[key], b))
        total = total + sum(terms) / B
    order = 0.0
    for b in range(B):
        s_ref = s(states["ref"], b)
        order = (
            order
            + torch.relu(order_margin - (s(states["pos"], b) - s_ref) / S(b))
            + torch.relu(order_margin - (s_ref - s(states["neg"], b)) / S(b))
        )
    shift = 0.0
    for c, key in ((+1, "pos"), (-1, "neg")):
        for b in range(B):
            e = 0.0
            for side in (0, 1):
                for k in range(1, N_LAST + 1):
                    e = e + (states[key][side][b, -k] - states["ref"][side][b, -k]) @ u
            e = e / (2 * N_LAST)
            if projection == "linear":
                shift = shift - c * e / S(b)
            else:
                shift = shift - saturation * torch.tanh(c * e / (saturation * S(b)))
    return total + order_weight * order / B + shift_weight * shift / B


def _leaves(states, u, coh):
    st = {k: tuple(x.clone().requires_grad_() for x in v) for k, v in states.items()}
    ch = {
        k: (v[0].clone().requires_grad_(), v[1].clone().requires_grad_(), v[2])
        for k, v in coh.items()
    }
    return st, u.clone().requires_grad_(), ch


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("order_weight", [0.0, 0.7])
@pytest.mark.parametrize(
    "projection, scale, shift_weight",
    [("linear", "pair", 0.0), ("tanh", "pair", 0.0), ("linear", "batch", 0.0),
     ("tanh", "batch", 0.0), ("tanh", 0.37, 0.0), ("tanh", 0.37, 0.9), ("linear", "pair", 0.9)],
)
def test_inner_contrastive_every_gradient_matches_plain_reference(kind, order_weight, projection,
                                                                  scale, shift_weight):
    """Every term (SPEC linear/pair and the bounded tanh with batch / data scales) against autograd
    of the loop reference, float64, for every input's gradient."""
    states, u, coh = _contrastive_inputs()
    margin = 0.3
    saturation = 0.8  # small enough that the inputs' z reach the curved part of tanh
    st1, u1, ch1 = _leaves(states, u, coh)
    out = inner_contrastive_loss(
        st1["pos"],
        st1["neg"],
        st1["ref"],
        u1,
        coherence_pos=CoherenceInputs(*ch1["pos"]),
        coherence_neg=CoherenceInputs(*ch1["neg"]),
        n_last=N_LAST,
        eps=EPS,
        tau=TAU,
        kind=kind,
        kappa=KAPPA,
        order_weight=order_weight,
        order_margin=margin,
        projection=projection,
        scale=scale,
        saturation=saturation,
        shift_weight=shift_weight,
    )
    st2, u2, ch2 = _leaves(states, u, coh)
    want = _plain_contrastive(st2, u2, ch2, kind, order_weight, margin, projection, scale,
                              saturation, shift_weight)
    torch.testing.assert_close(out.loss, want, atol=1e-12, rtol=1e-10)
    out.loss.backward()
    want.backward()
    for k in st1:
        for a, b in zip(st1[k], st2[k]):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(u1.grad, u2.grad, atol=1e-12, rtol=1e-9)
    for k in ch1:
        torch.testing.assert_close(ch1[k][0].grad, ch2[k][0].grad, atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(ch1[k][1].grad, ch2[k][1].grad, atol=1e-12, rtol=1e-9)
    if order_weight == 0:
        assert out.order.item() == 0.0
    if shift_weight == 0:
        assert out.shift.item() == 0.0
    else:
        assert out.shift.item() != 0.0


def test_inner_contrastive_terms_are_reported():
    states, u, coh = _contrastive_inputs(1)
    out = inner_contrastive_loss(
        states["pos"],
        states["neg"],
        states["ref"],
        u,
        coherence_pos=CoherenceInputs(*coh["pos"]),
        coherence_neg=CoherenceInputs(*coh["neg"]),
        n_last=N_LAST,
        order_weight=0.5,
        order_margin=0.2,
    )
    total = out.proj_pos + out.coh_pos + out.proj_neg + out.coh_neg + 0.5 * out.order
    torch.testing.assert_close(out.loss, total)
    assert out.coh_pos.item() > 0 and out.coh_neg.item() > 0


def test_sign_is_fixed_by_c_swap_flips_projection_terms():
    """Swapping chosen and rejected flips the sign of L_proj: no abs, no flip to the easier side."""
    states, u, _ = _contrastive_inputs(2)
    out = inner_contrastive_loss(states["pos"], states["neg"], states["ref"], u, n_last=N_LAST)
    swap = {k: (v[1], v[0]) for k, v in states.items()}
    flipped = inner_contrastive_loss(swap["pos"], swap["neg"], swap["ref"], u, n_last=N_LAST)
    assert out.proj_pos.item() != 0
    torch.testing.assert_close(flipped.proj_pos, -out.proj_pos, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(flipped.proj_neg, -out.proj_neg, atol=1e-12, rtol=1e-12)


def test_c_plus_one_rewards_moving_toward_chosen_whatever_s_ref_sign():
    """Adding +u to the chosen policy state under c=+1 lowers the loss, also when the reference
    separation is negative (a flipping loss would then push the other way)."""
    states, u, _ = _contrastive_inputs(3)
    for ref_sign in (+1, -1):
        ref = states["ref"] if ref_sign > 0 else (states["ref"][1], states["ref"][0])
        base = inner_contrastive_loss(states["pos"], states["neg"], ref, u, n_last=N_LAST)
        moved_pos = (states["pos"][0] + u, states["pos"][1])
        moved_neg = (states["neg"][0] + u, states["neg"][1])
        up = inner_contrastive_loss(moved_pos, states["neg"], ref, u, n_last=N_LAST)
        down = inner_contrastive_loss(states["pos"], moved_neg, ref, u, n_last=N_LAST)
        assert up.proj_pos.item() < base.proj_pos.item()  # c=+1 wants s_pi up
        assert down.proj_neg.item() > base.proj_neg.item()  # c=-1 wants s_pi down


def test_inner_contrastive_reads_only_the_last_n_tokens_and_checks_padding():
    states, u, _ = _contrastive_inputs(4)
    base = inner_contrastive_loss(states["pos"], states["neg"], states["ref"], u, n_last=N_LAST)
    cho, rej = states["pos"]
    cho2 = cho.clone()
    cho2[:, : T_CHO - N_LAST] = 1e6  # left positions (padding) are never read
    again = inner_contrastive_loss((cho2, rej), states["neg"], states["ref"], u, n_last=N_LAST)
    torch.testing.assert_close(again.loss, base.loss)
    am_cho = torch.ones(B, T_CHO, dtype=torch.long)
    am_rej = torch.ones(B, T_REJ, dtype=torch.long)
    am_rej[0, -1] = 0  # right padding
    with pytest.raises(ValueError, match="padding"):
        inner_contrastive_loss(
            states["pos"],
            states["neg"],
            states["ref"],
            u,
            n_last=N_LAST,
            attention_mask=(am_cho, am_rej),
        )
    with pytest.raises(ValueError, match="u must be"):
        inner_contrastive_loss(states["pos"], states["neg"], states["ref"], u[:-1])
    with pytest.raises(ValueError, match="n_last"):
        inner_contrastive_loss(states["pos"], states["neg"], states["ref"], u, n_last=0)


# --- the bounded projection -----------------------------------------------------------------


def _scores(B_=5, seed=7):
    g = torch.Generator().manual_seed(seed)
    s_ref = torch.randn(B_, generator=g, dtype=torch.float64)
    s_pi = s_ref + torch.randn(B_, generator=g, dtype=torch.float64)
    return s_pi, s_ref


@pytest.mark.parametrize("c", [1, -1])
@pytest.mark.parametrize("scale", ["pair", "batch", 0.6])
def test_tanh_projection_value_and_gradient_formula(c, scale):
    """L = -m tanh(z/m), z = c (s_pi - s_ref)/S; dL/ds_pi[b] = -(c/S[b]) sech^2(z[b]/m) / B."""
    from steerkern.loss import projection_loss

    s_pi, s_ref = _scores()
    m = 1.3
    if scale == "pair":
        S = s_ref.abs() + EPS
    elif scale == "batch":
        S = torch.full_like(s_ref, float(s_ref.abs().mean()) + EPS)
    else:
        S = torch.full_like(s_ref, scale)
    x = s_pi.clone().requires_grad_()
    out = projection_loss(x, s_ref, c, EPS, projection="tanh", scale=scale, saturation=m)
    out.backward()
    z = c * (s_pi - s_ref) / S
    want = [(-m * math.tanh(float(zb) / m)) for zb in z]
    assert out.item() == pytest.approx(sum(want) / len(want), rel=1e-12)
    slope = [-(c / float(S[b])) / math.cosh(float(z[b]) / m) ** 2 / len(z) for b in range(len(z))]
    torch.testing.assert_close(x.grad, torch.tensor(slope, dtype=torch.float64), rtol=1e-10,
                               atol=1e-14)


def test_tanh_projection_is_bounded_and_matches_linear_slope_at_reference():
    """However far s_pi moves toward the asked side, L_proj(tanh) stays above -saturation, while
    the SPEC linear form falls without bound; at s_pi = s_ref both have the same gradient."""
    from steerkern.loss import projection_loss

    _, s_ref = _scores()
    m = 2.0
    for c in (1, -1):
        for gain in (1.0, 10.0, 1e3, 1e6):
            s_pi = s_ref + c * gain * s_ref.abs()
            bounded = projection_loss(s_pi, s_ref, c, projection="tanh", scale="batch",
                                      saturation=m)
            linear = projection_loss(s_pi, s_ref, c, projection="linear", scale="batch")
            assert -m <= bounded.item() < 0
            if gain >= 1e3:
                assert linear.item() < -100 * m
        grads = []
        for projection in ("linear", "tanh"):
            x = s_ref.clone().requires_grad_()
            projection_loss(x, s_ref, c, projection=projection, scale="batch").backward()
            grads.append(x.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=0)
        assert float(grads[1][0]) * c < 0  # c = +1 rewards raising s_pi, c = -1 lowering it


def test_shared_scale_bounds_the_weight_of_a_pair_with_zero_reference_separation():
    """Per pair, a pair with s_ref ~ 0 gets weight 1/eps; with the batch scale every pair's
    gradient is 1/(B mean|s_ref|)."""
    from steerkern.loss import projection_loss

    s_ref = torch.tensor([1.0, -2.0, 0.0, 3.0], dtype=torch.float64)
    grads = {}
    for scale in ("pair", "batch"):
        x = s_ref.clone().requires_grad_()
        projection_loss(x, s_ref, 1, EPS, scale=scale).backward()
        grads[scale] = x.grad
    assert abs(float(grads["pair"][2])) == pytest.approx(1 / (4 * EPS))
    want = -1 / (4 * (float(s_ref.abs().mean()) + EPS))
    torch.testing.assert_close(grads["batch"], torch.full_like(s_ref, want), rtol=1e-12, atol=0)


def test_data_scale_equals_batch_scale_when_given_its_value():
    states, u, coh = _contrastive_inputs(5)
    batch = inner_contrastive_loss(states["pos"], states["neg"], states["ref"], u, n_last=N_LAST,
                                   projection="tanh", scale="batch", order_weight=0.4,
                                   order_margin=0.5)
    from steerkern.loss import projection_scores

    s_ref = projection_scores(*states["ref"], u, N_LAST)
    data = inner_contrastive_loss(states["pos"], states["neg"], states["ref"], u, n_last=N_LAST,
                                  projection="tanh", scale=float(s_ref.abs().mean()) + EPS,
                                  order_weight=0.4, order_margin=0.5)
    torch.testing.assert_close(data.loss, batch.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(data.order, batch.order, rtol=1e-12, atol=1e-14)
    assert data.order.item() > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(projection="cubic"), "projection"),
        (dict(scale="mean"), "scale"),
        (dict(scale=0.0), "scale"),
        (dict(scale=float("inf")), "scale"),
        (dict(scale=True), "scale"),
        (dict(projection="tanh", saturation=0.0), "saturation"),
        (dict(projection="tanh", saturation=float("nan")), "saturation"),
        (dict(shift_weight=-1.0), "shift_weight"),
    ],
)
def test_bounded_projection_rejects_bad_arguments(kwargs, match):
    states, u, _ = _contrastive_inputs(6)
    with pytest.raises(ValueError, match=match):
        inner_contrastive_loss(states["pos"], states["neg"], states["ref"], u, n_last=N_LAST,
                               **kwargs)


def test_shift_term_rewards_moving_both_texts_along_c_u_and_ignores_the_difference_term():
    """Adding the same +u to chosen and rejected under c=+1 leaves L_proj unchanged (a shared
    shift cancels in the difference) but lowers L_shift; under c=-1 it raises L_shift. Bounded:
    however far both move, the shift term stays above -2m (two signs)."""
    states, u, _ = _contrastive_inputs(8)
    kw = dict(n_last=N_LAST, projection="tanh", scale=0.5, saturation=1.5, shift_weight=1.0)
    base = inner_contrastive_loss(states["pos"], states["neg"], states["ref"], u, **kw)
    for c, key in ((1, "pos"), (-1, "neg")):
        moved = dict(states)
        moved[key] = (states[key][0] + u, states[key][1] + u)
        out = inner_contrastive_loss(moved["pos"], moved["neg"], moved["ref"], u, **kw)
        torch.testing.assert_close(out.proj_pos, base.proj_pos, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.proj_neg, base.proj_neg, rtol=1e-12, atol=1e-12)
        if c == 1:
            assert out.shift.item() < base.shift.item()
        else:
            assert out.shift.item() > base.shift.item()
    far = {k: (v[0] + 1e6 * u, v[1] + 1e6 * u) if k == "pos" else
           ((v[0] - 1e6 * u, v[1] - 1e6 * u) if k == "neg" else v) for k, v in states.items()}
    out = inner_contrastive_loss(far["pos"], far["neg"], far["ref"], u, **kw)
    assert -2 * 1.5 <= out.shift.item() < -2 * 1.5 + 1e-6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eps=float("nan")), "eps"),
        (dict(order_weight=float("nan")), "order_weight"),
        (dict(shift_weight=float("inf")), "shift_weight"),
        (dict(order_weight=1.0, order_margin=float("nan")), "order_margin"),
        (dict(kind="cubic"), "kind"),  # checked even without coherence inputs
        (dict(tau=-1.0), "tau"),
        (dict(u=[1.0] * D), "u must be"),
    ],
)
def test_inner_contrastive_rejects_non_finite_and_unused_bad_arguments(kwargs, match):
    """A NaN weight or eps used to give a NaN loss, and a bad penalty kind passed silently
    when no coherence term was given."""
    states, u, _ = _contrastive_inputs()
    kwargs = dict(kwargs)
    u = kwargs.pop("u", u)
    with pytest.raises(ValueError, match=match):
        inner_contrastive_loss(states["pos"], states["neg"], states["ref"], u, n_last=N_LAST,
                               **kwargs)


def _far_states_shifted_slightly():
    """float64 ``{"ref", "pos", "neg"}: (h_cho, h_rej)`` whose chosen states sit ~30 from the
    rejected along ``u = e_0``, the policy's shifted by +-1.5 (0.05 of that separation): a shift
    that low precision rounds away. Returns ``(states, u)``."""
    g = torch.Generator().manual_seed(3)
    u = torch.zeros(D, dtype=torch.float64)
    u[0] = 1.0
    ref_cho = 30.0 + torch.randn(B, T_CHO, D, generator=g, dtype=torch.float64)
    ref_rej = torch.randn(B, T_REJ, D, generator=g, dtype=torch.float64)
    step = 1.5 * u
    return {"ref": (ref_cho, ref_rej), "pos": (ref_cho + step, ref_rej),
            "neg": (ref_cho - step, ref_rej)}, u


def test_inner_contrastive_bf16_states_accumulate_in_fp32():
    """bf16 hidden states (a bf16 model): the scores s = mean_t (h_cho - h_rej) . u and the
    shift s_pi - s_ref are computed in fp32, not rounded to bf16 (8 bits: at |s| ~ 30 a shift
    of 0.05 reference separations vanished)."""
    states, u = _far_states_shifted_slightly()
    bf16 = {k: tuple(t.bfloat16() for t in v) for k, v in states.items()}
    exact = {k: tuple(t.double() for t in v) for k, v in bf16.items()}  # same rounded inputs
    args = dict(n_last=N_LAST, projection="tanh", scale="batch")
    got = inner_contrastive_loss(bf16["pos"], bf16["neg"], bf16["ref"], u.bfloat16(), **args)
    want = inner_contrastive_loss(exact["pos"], exact["neg"], exact["ref"], u, **args)
    assert got.loss.dtype == torch.float32
    for name in ("loss", "proj_pos", "proj_neg"):
        torch.testing.assert_close(getattr(got, name).double(), getattr(want, name),
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("projection, scale",
                         [("linear", "pair"), ("tanh", "batch"), ("tanh", 0.37)])
def test_inner_contrastive_empty_batch_is_zero_not_nan(projection, scale):
    """B = 0 pairs (e.g. a filtered-out micro-batch, as margin_loss allows): every term is 0 with
    a zero gradient, not the NaN of an empty mean."""
    states, u, coh = _contrastive_inputs()
    st, u, ch = _leaves({k: (v[0][:0], v[1][:0]) for k, v in states.items()}, u,
                        {k: (v[0][:0], v[1][:0], v[2][:0]) for k, v in coh.items()})
    out = inner_contrastive_loss(
        st["pos"], st["neg"], st["ref"], u, n_last=N_LAST,
        coherence_pos=CoherenceInputs(*ch["pos"]), coherence_neg=CoherenceInputs(*ch["neg"]),
        order_weight=0.5, shift_weight=0.5, projection=projection, scale=scale)
    for name, value in out._asdict().items():
        assert value.shape == () and value.item() == 0.0, name
    out.loss.backward()
    assert st["pos"][0].grad.shape == (0, T_CHO, D) and not u.grad.isnan().any()


def test_inner_contrastive_scores_stay_fp32_under_autocast():
    """fp32 states with the loss computed inside ``torch.autocast`` (bf16): the scores'
    ``(h_cho - h_rej) . u`` product ran in bf16 there (loss 3e-3 off, and a bf16 loss)."""
    exact, u = _far_states_shifted_slightly()
    fp32 = {k: tuple(t.float() for t in v) for k, v in exact.items()}
    args = dict(n_last=N_LAST, projection="tanh", scale="batch", shift_weight=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = inner_contrastive_loss(fp32["pos"], fp32["neg"], fp32["ref"], u.float(), **args)
    want = inner_contrastive_loss(exact["pos"], exact["neg"], exact["ref"], u, **args)
    assert got.loss.dtype == torch.float32
    for name in ("loss", "proj_pos", "proj_neg", "shift"):
        torch.testing.assert_close(getattr(got, name).double(), getattr(want, name),
                                   atol=1e-5, rtol=1e-4)


def test_sequence_penalty_subtracts_in_fp32_for_bf16_log_probs():
    """``d = logp_ref - logp_pi`` in fp32 at least: with a bf16 policy, an fp32 reference was
    rounded to bf16 first (spacing 0.125 near -20), so a 0.03-nat drop scored 0."""
    logp_pi = torch.full((2, 3), -20.0, dtype=torch.bfloat16)
    logp_ref = torch.full((2, 3), -19.97)
    got = sequence_penalty(logp_pi, logp_ref, tau=0.0, kind="hinge")
    assert float(got) == pytest.approx(0.03, abs=1e-5)
    assert got.dtype == torch.float32


def test_projection_scores_refuses_a_read_of_no_positions():
    """``n_last=0`` read every position (``h[:, -0:]``) instead of being refused."""
    h = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="n_last must be a positive int, got 0"):
        projection_scores(h, h, torch.ones(4), n_last=0)


def test_projection_loss_refuses_scores_of_different_shapes():
    """An ``s_ref`` of ``[B, 1]`` broadcast against ``s_pi [B]`` into a ``[B, B]`` mean."""
    from steerkern.loss import projection_loss

    with pytest.raises(ValueError, match=r"s_pi and s_ref must both be \[B\], got \(3,\) and \(3, 1\)"):
        projection_loss(torch.ones(3), torch.ones(3, 1), +1)


def test_numbers_given_as_0d_tensors_or_numpy_scalars_are_numbers():
    """``tau=torch.tensor(0.5)`` (what ``x.mean()`` gives) or ``np.float32(0.5)`` is the number
    it holds; a bool, a 1-element tensor or a tensor on the meta device is refused by name."""
    import numpy as np

    d = torch.linspace(-1.0, 3.0, 9)
    expected = coherence_penalty(d, tau=0.5, kappa=2.0)
    for tau, kappa in ((torch.tensor(0.5), torch.tensor(2.0)), (np.float32(0.5), np.array(2.0)),
                       (torch.tensor(0.5, dtype=torch.float64), torch.tensor(2))):
        torch.testing.assert_close(coherence_penalty(d, tau=tau, kappa=kappa), expected)
    for bad in (torch.tensor(True), torch.tensor([0.5]), np.bool_(True), torch.tensor(0.5, device="meta")):
        with pytest.raises(ValueError, match="tau"):
            coherence_penalty(d, tau=bad)


def test_tensors_on_the_meta_device_are_refused_by_name():
    h, W, y = torch.randn(4, 8), torch.randn(16, 8), torch.tensor([1, 2, 3, 4])
    with pytest.raises(ValueError, match="token_logprobs: h .*meta"):
        ops.token_logprobs(h.to("meta"), W.to("meta"), y.to("meta"))
    with pytest.raises(ValueError, match="logp_ref .*meta"):
        margin_loss(h, W, y, torch.zeros(4, device="meta"))
    with pytest.raises(ValueError, match="mask .*meta"):
        sequence_penalty(torch.zeros(4), torch.zeros(4), torch.ones(4, dtype=torch.bool, device="meta"))

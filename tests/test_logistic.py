"""method='logistic': the linear-probe direction against an independent primal solver, its
edge cases (separable classes, one pair, float32), the shared sign and scale, and extraction."""

import pytest
import torch

from steerkern import directions as maths
from steerkern.extract import extract
from tests.test_extract import PAIRS, CharTokenizer, cosine, planted


def probe_features(cho, rej):
    """The probe's problem, written out independently: rows centred on their mean, divided by
    their RMS norm, labels +1 / -1, λ = 1 / rows."""
    rows = torch.cat([cho, rej]).double()
    x = rows - rows.mean(0)
    x = x / x.pow(2).sum(1).mean().sqrt()
    y = torch.cat([torch.ones(len(cho)), -torch.ones(len(rej))]).double()
    return x, y, 1.0 / len(rows)


def primal_reference(x, y, lam):
    """``argmin mean softplus(-y (x w + b)) + lam/2 |w|^2`` by LBFGS on the primal in float64."""
    theta = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=10000, tolerance_grad=1e-14, tolerance_change=1e-18,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        w, b = theta[:-1], theta[-1]
        loss = torch.nn.functional.softplus(-y * (x @ w + b)).mean() + lam / 2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()[:-1], float(theta.detach()[-1])


@pytest.mark.parametrize(("n", "dim"), [(10, 48), (60, 8), (40, 40)])  # D > 2n, D < 2n, D < 2n < 2D
def test_probe_matches_a_primal_lbfgs_reference(n, dim):
    cho, rej, _ = planted(n=n, dim=dim, seed=n, shift=0.3, spread=1.0, noise=1.0)
    x, y, lam = probe_features(cho, rej)
    w, b = maths.probe_weights(x, y, lam)
    w_ref, b_ref = primal_reference(x, y, lam)
    assert cosine(w, w_ref) > 0.9999
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
    assert b == pytest.approx(b_ref, abs=1e-5)
    # the method's direction is the probe's normal, signed and scaled like every method
    bias = maths.logistic(cho, rej)
    assert cosine(bias, w_ref) > 0.9999
    assert cosine(maths.additive("logistic", cho, rej), w_ref) > 0.9999


def test_separable_classes_keep_a_finite_probe_and_recover_the_planted_direction():
    """Chosen and rejected far apart along u (and 2n < D: separable anyway): the L2 term keeps
    w finite; float32 and float64 reads both give finite vectors of their own dtype."""
    cho, rej, u = planted(n=16, dim=64, shift=50.0, noise=0.01)
    x, y, lam = probe_features(cho, rej)
    w, b = maths.probe_weights(x, y, lam)
    assert torch.isfinite(w).all() and abs(b) < 1e3
    assert float(w.norm()) <= (2 * torch.log(torch.tensor(2.0)) / lam).sqrt()  # L(w) <= L(0) = log 2
    assert (y * (x @ w + b) > 0).all()  # it separates them
    for dtype in (torch.float64, torch.float32):
        bias = maths.logistic(cho.to(dtype), rej.to(dtype))
        assert bias.dtype == dtype and torch.isfinite(bias).all()
        assert cosine(bias, u) > 0.999


def test_sign_and_scale_are_the_shared_convention():
    cho, rej, _ = planted(shift=1.0, spread=2.0, noise=0.5)
    forward = maths.logistic(cho, rej)
    m = (cho - rej).mean(0)
    unit = forward / forward.norm()
    assert float(m @ forward) > 0  # a positive coefficient moves toward chosen
    torch.testing.assert_close(forward, unit * (m @ unit), rtol=1e-12, atol=0)  # bias = u (m . u)
    torch.testing.assert_close(maths.logistic(rej, cho), -forward, rtol=1e-8, atol=1e-10)


def test_a_vector_added_to_every_row_changes_nothing():
    cho, rej, _ = planted(n=20, dim=32, noise=0.5)
    offset = 100 * torch.randn(32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(maths.logistic(cho + offset, rej + offset), maths.logistic(cho, rej),
                               rtol=1e-8, atol=1e-10)
    # and one global scale of the activations changes only the scale of the result
    torch.testing.assert_close(maths.logistic(7 * cho, 7 * rej), 7 * maths.logistic(cho, rej),
                               rtol=1e-8, atol=1e-10)


def test_one_pair_is_mean_diff_and_identical_pairs_are_refused():
    """One pair: the centred rows are +-Δ/2, so the probe's normal is Δ (mean_diff); duplicates
    of one pair likewise. Identical chosen and rejected have no direction."""
    g = torch.Generator().manual_seed(2)
    rej = torch.randn(1, 24, generator=g)
    cho = rej + torch.randn(1, 24, generator=g)
    torch.testing.assert_close(maths.logistic(cho, rej), maths.mean_diff(cho, rej), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maths.logistic(cho.repeat(3, 1), rej.repeat(3, 1)), maths.mean_diff(cho, rej),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="identical"):
        maths.logistic(rej.clone(), rej)
    with pytest.raises(ValueError, match="lam must be"):
        maths.logistic(cho, rej, lam=0.0)


def test_lambda_interpolates_between_max_margin_and_mean_diff():
    """Strong regularisation gives mean_diff's direction (w -> sum y_i x_i ∝ m)."""
    cho, rej, _ = planted(n=30, dim=16, shift=0.5, spread=1.0, noise=1.0)
    assert cosine(maths.logistic(cho, rej, lam=1e6), maths.mean_diff(cho, rej)) > 0.99999
    assert cosine(maths.logistic(cho, rej), maths.mean_diff(cho, rej)) < 0.99


def test_extract_logistic_on_a_tiny_model(tiny_model_factory):
    model = tiny_model_factory("llama")
    tok = CharTokenizer()
    vector = extract(model, tok, PAIRS, layers=[1, 2], method="logistic", progress=False)
    vector.validate(model)
    assert vector.is_additive and vector.metadata["method"] == "logistic"
    assert vector.metadata["probe_lambda"] == pytest.approx(1 / (2 * len(PAIRS)))
    from steerkern.capture import capture

    reads = capture(model, tok, [t for pair in PAIRS for t in pair], [1], progress=False)[1][:, -1]
    bias = vector.parts[(1, "residual")].bias
    assert torch.isfinite(bias).all()
    torch.testing.assert_close(bias, maths.logistic(reads[0::2], reads[1::2]), rtol=1e-4, atol=1e-6)
    x, y, lam = probe_features(reads[0::2], reads[1::2])
    assert cosine(bias, primal_reference(x, y, lam)[0]) > 0.9999
    one = extract(model, tok, PAIRS[:1], layers=[1], method="logistic", progress=False).parts[(1, "residual")]
    mean = extract(model, tok, PAIRS[:1], layers=[1], method="mean_diff", progress=False).parts[(1, "residual")]
    torch.testing.assert_close(one.bias, mean.bias, rtol=1e-4, atol=1e-6)

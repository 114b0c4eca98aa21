"""The maths of every extraction method, as pure functions on activation tensors.

Notation (one steered layer): ``cho``, ``rej`` are ``[n, D]`` activations of the chosen and
rejected member of each pair (one row per pair and read position), ``Δ = cho - rej`` ``[n, D]``,
``m = mean(Δ)``.

**Sign and scale, the same for every method.** Each method first finds a unit direction ``u``
(or a basis). The sign is chosen so that ``m · u > 0`` (a positive coefficient moves toward
*chosen*), and an additive vector is ``bias = u * (m · u)``: **coefficient 1 shifts the
activations' projection on u by the mean projected pair separation**. (For ``mean_diff`` that is
``bias = m``.) The low-rank methods keep this scale: applied at coefficient 1 to the rejected
activations they shift the subspace projection by the mean separation (see each function).

Methods:

- ``mean_diff``: ``u ∝ m``.
- ``pca_diff``: first principal component of ``Δ`` (centred PCA, as repeng's ``pca_diff``): the
  direction along which the differences *vary* most.
- ``pca_center``: PCA of the ``2n`` rows ``{cho_i - mid_i, rej_i - mid_i}`` with ``mid_i =
  (cho_i + rej_i) / 2``. These rows are ``±Δ_i / 2``, so this finds the top eigenvector of the
  *uncentred* second moment ``Δ^T Δ``: dominated by the consistent mean shift ``m``, where
  ``pca_diff`` removes ``m`` first.
- ``logistic``: the normal of a linear probe (as steering-vectors' ``logistic_aggregator``,
  without sklearn): L2-regularised logistic regression separating the ``2n`` rows ``{cho_i}``
  (label ``+1``) from ``{rej_i}`` (label ``-1``), pairing ignored, on features centred on the
  mean of all ``2n`` rows and divided by one global scale (their RMS norm);
  ``u ∝ w`` (see :func:`logistic`).
- ``lowrank``: ``V_r``, the top-r right singular vectors of ``Δ`` (uncentred), and in those
  coordinates the affine map fitted (ridge least squares) to carry each rejected activation to
  its chosen partner: ``delta(h) = c * V_r (t + K V_r^T h)``, i.e. ``bias = V_r t``,
  ``A = V_r``, ``B = V_r K``. At the rejected mean, coefficient 1 shifts by exactly the mean
  separation in the subspace; the input-dependent term ``K`` pushes less where an activation is
  already chosen-like. (A clamp ``K = -I`` would be the other natural choice, but it reflects
  for ``|c| > 1`` and oscillates when applied at several layers.)
- ``weight_svd``: the steered module is a Linear with weight ``W = U_w S V_w^T`` ``[out, in]``.
  Differences are measured at its output, ``Δ`` ``[n, out]``, and expressed in ``U_w``:
  ``m_j = u_j · m``. A change ``dS_j`` of one singular value shifts the output along ``u_j`` by
  ``dS_j (v_j · x)``, so on average it can deliver at most ``|m_j| * reach_j`` of the separation,
  ``reach_j = mean(v_j·x)^2 / mean((v_j·x)^2)`` (in [0, 1]); the ``r`` components with the
  largest ``|m_j| * reach_j`` are kept (ranking by ``|m_j|`` alone picked components whose
  inputs average to ~0, which no coefficient can steer). Steering is the
  weight delta ``ΔW = U_k diag(dS) V_k^T`` (``A = V_k``, ``B = U_k diag(dS)``, ``src`` = the
  module input ``x``), i.e. a change of the kept singular values. ``dS_j`` is the least-squares
  solution of ``dS_j * (v_j · x_i) ≈ m_j`` over the inputs ``x_i`` of both members of every pair:
  ``dS_j = m_j * mean_i(v_j·x_i) / mean_i((v_j·x_i)^2)``, so coefficient 1 shifts the output's
  coordinate on ``u_j`` by the mean separation ``m_j`` (in the least-squares sense).
- ``grad``: ``g_x = J_{L->L'}(x)^T d`` per example (both members), ``d = mean(Δ_{L'})`` at a
  deeper read-out layer; direction ``mean_x g_x``, optionally preconditioned by the empirical
  Fisher ``F = G^T G / n`` of the per-example gradients ``G [n, D]``:
  ``(F + λI)^{-1} ḡ``, solved with the Woodbury identity through an ``n x n`` system.
"""

from __future__ import annotations

import torch

ADDITIVE_METHODS = ("mean_diff", "pca_diff", "pca_center", "logistic", "grad")
METHODS = ("mean_diff", "pca_diff", "pca_center", "logistic", "lowrank", "weight_svd", "grad")


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype extraction reads, solves and stores in: float64 for a float64 model's states,
    float32 for every narrower dtype."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# Relative size below which a difference is float rounding, not signal: ``ROUNDING * eps`` of
# the working dtype (about 1e-5 in float32), relative to the activations' magnitude.
ROUNDING = 64


def _negligible(small: torch.Tensor, scale: torch.Tensor) -> bool:
    """True when ``|small|`` is zero up to float rounding relative to ``|scale|``."""
    eps = torch.finfo(work_dtype(small)).eps
    return bool(small.abs().max() <= ROUNDING * eps * scale.abs().max())


def check_finite(what: str, *tensors: torch.Tensor) -> None:
    """Raise when a captured tensor holds Inf or NaN: the model overflowed on the texts, and
    every method would return NaN or fail inside a solver with a message about the solver."""
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise ValueError(
            f"the {what} hold Inf or NaN: the model overflowed on these texts (float16 weights of a "
            "checkpoint trained in bfloat16 often do); load the model in bfloat16 or float32"
        )


def check_pairs(cho: torch.Tensor, rej: torch.Tensor) -> None:
    """Shapes ``[n, D]`` each, at least one row, finite, and pairs that actually differ.

    Identical chosen and rejected activations (the same text twice, or pairs that differ only
    after the read positions) have no direction: every method would return a zero or arbitrary
    vector, so this raises instead."""
    if cho.dim() != 2 or cho.shape != rej.shape:
        raise ValueError(
            f"chosen and rejected activations must both be [n, D] with the same shape, got "
            f"{tuple(cho.shape)} and {tuple(rej.shape)}"
        )
    if cho.shape[0] == 0:
        raise ValueError("no activations: give at least one pair")
    check_finite("activations", cho, rej)
    dtype = work_dtype(cho)
    if _negligible(cho.to(dtype) - rej.to(dtype), torch.cat([cho, rej]).to(dtype)):
        raise ValueError(
            "chosen and rejected activations are identical (every pair difference is zero up to "
            "float rounding), so there is no direction to extract: the pairs must differ at or "
            "before the read tokens (are chosen and rejected the same texts?)"
        )


def signed_scaled(u: torch.Tensor, diffs: torch.Tensor) -> torch.Tensor:
    """The shared sign and scale: ``u`` (any norm) -> ``û * (m · û)`` with the sign of ``û``
    chosen so that ``m · û >= 0``, ``m = mean(diffs)``. Returns ``[D]``."""
    u = u.to(work_dtype(diffs))
    norm = torch.linalg.vector_norm(u)
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("the extracted direction is zero or not finite: are chosen and rejected identical?")
    u = u / norm
    m = diffs.to(u.dtype).mean(0)
    projection = m @ u
    if _negligible(projection.reshape(1), m):
        raise ValueError(
            "the extracted direction is orthogonal to the mean pair difference, so its sign "
            "(toward chosen) and scale are undefined: use method='mean_diff' or more varied pairs"
        )
    if projection < 0:
        u, projection = -u, -projection
    return u * projection


def top_right_singular(x: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Top-``k`` right singular vectors of ``x`` ``[n, D]`` as columns ``[D, k]``."""
    _, _, vh = torch.linalg.svd(x.to(work_dtype(x)), full_matrices=False)
    return vh[:k].T


def mean_diff(cho: torch.Tensor, rej: torch.Tensor) -> torch.Tensor:
    """``bias = mean(cho - rej)`` ``[D]``."""
    check_pairs(cho, rej)
    diffs = cho.to(work_dtype(cho)) - rej.to(work_dtype(cho))
    return signed_scaled(diffs.mean(0), diffs)


def pca_diff(cho: torch.Tensor, rej: torch.Tensor) -> torch.Tensor:
    """First principal component of the differences (centred), signed and scaled. ``[D]``."""
    check_pairs(cho, rej)
    diffs = cho.to(work_dtype(cho)) - rej.to(work_dtype(cho))
    if diffs.shape[0] < 2:
        raise ValueError("pca_diff needs at least 2 pairs (a principal component of one row is undefined)")
    centred = diffs - diffs.mean(0)
    if _negligible(centred, diffs):
        raise ValueError(
            "pca_diff: every pair differs in the same way (duplicate pairs?), so the centred "
            "differences are zero and have no principal component: use method='mean_diff' or "
            "'pca_center', or give varied pairs"
        )
    u = top_right_singular(centred, 1)[:, 0]
    return signed_scaled(u, diffs)


def pca_center(cho: torch.Tensor, rej: torch.Tensor) -> torch.Tensor:
    """PCA of both members after subtracting each pair's midpoint, signed and scaled. ``[D]``."""
    check_pairs(cho, rej)
    dtype = work_dtype(cho)
    cho, rej = cho.to(dtype), rej.to(dtype)
    mid = (cho + rej) / 2
    rows = torch.cat([cho - mid, rej - mid])  # [2n, D], mean exactly zero
    u = top_right_singular(rows - rows.mean(0), 1)[:, 0]
    return signed_scaled(u, cho - rej)


def logistic(cho: torch.Tensor, rej: torch.Tensor, lam: float | None = None) -> torch.Tensor:
    """Linear-probe direction: the weight vector of an L2-regularised logistic regression that
    tells chosen from rejected activations, signed and scaled. ``[D]``.

    Features: the ``N = 2n`` rows ``r_i`` of ``cat(cho, rej)``, centred on their mean ``μ`` and
    divided by their RMS norm ``s = sqrt(mean_i |r_i - μ|^2)``: ``x_i = (r_i - μ) / s``, labels
    ``y_i = +1`` (chosen) and ``-1`` (rejected). The probe minimises

        ``L(w, b) = mean_i softplus(-y_i (w · x_i + b)) + (λ/2) |w|^2``   (``b`` unpenalised)

    and ``u = w / |w|`` (``w / s`` in activation units points the same way), with the shared
    sign and scale (``m · u > 0``, ``bias = u (m · u)``). Centring makes the direction
    invariant to a vector added to every row; the one global scale (not per-feature
    standardisation, which would reweight the directions) makes ``λ`` mean the same at every
    layer and model, whatever the activations' magnitude.

    ``λ`` (default ``1 / N``): ``(1/N)`` times sklearn's default objective
    ``½|w|^2 + C Σ_i loss_i`` with ``C = 1``, the setting steering-vectors'
    ``logistic_aggregator`` trains with, i.e. a unit Gaussian prior on ``w`` in units where a
    typical row has norm 1. (Applied to raw activations, as there, its strength depends on
    the layer's activation norm.) Large ``λ`` tends to ``mean_diff`` (``w ∝ Σ y_i x_i ∝ m``);
    small ``λ`` on separable data (generically so when ``D >= N``) to the max-margin direction.
    The penalty keeps ``w`` finite when the classes are separable.

    Solver (:func:`probe_weights`): float64 on CPU. By the representer theorem ``w`` lies in
    the row space of ``X``: when ``D > N`` the thin SVD ``X = U S V^T`` (``V^T`` is
    ``[N, D]``; never a ``D x D`` matrix) gives ``w = V β``, and the problem is the same
    logistic regression on the ``N``-dimensional coordinates ``Z = U S`` with ``|w| = |β|``
    (the dual / kernel form, in an orthonormal basis). When ``D <= N`` it runs on ``X`` itself.
    Either way Newton's method on ``(β, b)`` from zero, damped by Armijo backtracking, then
    full steps once the promised decrease is below the objective's rounding:
    ``(k+1) x (k+1)`` systems, ``k = min(N, D)``, converged to float64 precision.
    One pair (``n = 1``) is well defined: the rows are ``±Δ/2``, so ``w ∝ Δ`` (``mean_diff``).
    """
    check_pairs(cho, rej)
    dtype = work_dtype(cho)
    diffs = cho.to(dtype) - rej.to(dtype)
    rows = torch.cat([cho, rej]).detach().to("cpu", torch.float64)
    n_rows = rows.shape[0]
    lam = 1.0 / n_rows if lam is None else float(lam)
    if not 0 < lam < float("inf"):
        raise ValueError(f"logistic: the regularisation lam must be a finite number > 0, got {lam}")
    x = rows - rows.mean(0)
    scale = torch.sqrt((x * x).sum() / n_rows)
    if not scale > 0:
        raise ValueError("logistic: every chosen and rejected activation is the same vector")
    labels = torch.ones(n_rows, dtype=torch.float64)
    labels[cho.shape[0]:] = -1.0
    w, _ = probe_weights(x / scale, labels, lam)
    return signed_scaled(w.to(diffs.device), diffs)


def probe_weights(x: torch.Tensor, y: torch.Tensor, lam: float, max_iter: int = 200):
    """``argmin_{w, b} mean_i softplus(-y_i (w · x_i + b)) + (λ/2)|w|^2`` for ``x [N, D]`` and
    labels ``y [N]`` in ``{+1, -1}``, in float64: returns ``(w [D], b)``. Damped Newton in the
    row space of ``x`` (see :func:`logistic`), so the work is ``O(N D min(N, D))`` for the SVD
    and ``O(N k^2 + k^3)`` per Newton step, ``k = min(N, D)``."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    n_rows = x.shape[0]
    if x.shape[1] > n_rows:  # the row space: thin SVD X = U S V^T, V^T [N, D] (no D x D matrix)
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        coords, basis = u * s, vh.T  # Z = U S [N, N], V [D, N]
    else:
        coords, basis = x, None  # D <= N: the features themselves (V = I)
    k = coords.shape[1]
    design = torch.cat([coords, torch.ones(n_rows, 1, dtype=torch.float64)], 1)  # [N, k + 1]
    penalty = torch.full((k + 1,), lam, dtype=torch.float64)
    # b is unpenalised; a negligible diagonal keeps its Newton system solvable where every
    # probability saturates (it changes the search direction only, not the minimum).
    penalty[-1] = lam * 1e-10

    def objective(theta):
        margins = y * (design @ theta)
        return torch.nn.functional.softplus(-margins).mean() + lam / 2 * (theta[:k] @ theta[:k])

    # Damped Newton while the decrease it promises (half the Newton decrement ``g^T H^-1 g``)
    # is visible in the objective (about 1e-16 here); below that, full Newton steps (the
    # quadratically convergent phase) until the decrement stops shrinking, at float64 rounding.
    theta = torch.zeros(k + 1, dtype=torch.float64)
    value, previous = objective(theta), float("inf")
    for _ in range(max_iter):
        z = design @ theta
        grad = design.T @ (-y * torch.sigmoid(-y * z)) / n_rows
        grad[:k] += lam * theta[:k]
        curvature = torch.sigmoid(z) * torch.sigmoid(-z)
        hessian = (design.T * curvature) @ design / n_rows + torch.diag(penalty)
        step = torch.linalg.solve(hessian, grad)
        decrement = float(grad @ step)
        if decrement < 1e-13:
            if decrement == 0 or decrement > previous / 4:
                break  # converged: the decrement no longer shrinks quadratically
            theta, previous = theta - step, decrement
            value = objective(theta)
            continue
        t = 1.0
        while t > 1e-12:
            candidate = theta - t * step
            new_value = objective(candidate)
            if new_value <= value - 1e-4 * t * decrement:
                break
            t /= 2
        else:
            raise RuntimeError("logistic: Newton's line search found no decrease (a NaN in the features?)")
        theta, value = candidate, new_value
    else:
        raise RuntimeError(f"logistic: Newton's method did not converge in {max_iter} steps")
    beta = theta[:k]
    return (beta if basis is None else basis @ beta), float(theta[k])


def lowrank(cho: torch.Tensor, rej: torch.Tensor, rank: int = 1, ridge: float = 1e-2):
    """Rank-r affine transport from rejected to chosen. Returns ``(bias [D], A [D, r], B [D, r])``.

    ``V_r`` = top-r right singular vectors of ``Δ`` (uncentred), each signed so that
    ``m · v >= 0``. In those coordinates, ``a_i = V_r^T rej_i`` and ``y_i = V_r^T Δ_i``, fit
    ``y_i ≈ t + K a_i`` by ridge least squares (``K`` is ``r x r``; the ridge, ``ridge`` times
    the mean variance of ``a``, keeps ``K`` small when few pairs are given). Then
    ``bias = V_r t``, ``A = V_r``, ``B = V_r K`` and
    ``delta(h) = c * V_r (t + K V_r^T h)``: coefficient 1 carries each rejected activation to
    its fitted chosen partner inside the subspace; at the rejected mean the shift is exactly the
    mean separation ``V_r V_r^T m`` (an intercept makes the mean residual zero), so the shared
    scale holds. With constant differences ``K = 0`` and this is ``mean_diff`` in the subspace.
    ``K`` is kept a contraction toward the chosen side (symmetric, eigenvalues in ``[-1, 0]``;
    see ``_contraction``): pairs that swap sides along the axis (CAA A/B items) otherwise fit a
    reflection, ``K = -2``, whose steps off the training pairs are 20-400x the shared scale.
    """
    check_pairs(cho, rej)
    dtype = work_dtype(cho)
    cho, rej = cho.to(dtype), rej.to(dtype)
    diffs = cho - rej
    if not 1 <= rank <= min(diffs.shape):
        raise ValueError(f"rank={rank} must be between 1 and {min(diffs.shape)}, the smaller of the "
                         f"{diffs.shape[0]} difference rows (one per pair and token read) and the "
                         f"width {diffs.shape[1]}")
    basis = top_right_singular(diffs, rank)
    signs = torch.where(diffs.mean(0) @ basis < 0, -1.0, 1.0).to(dtype)
    basis = basis * signs
    a = rej @ basis  # [n, r]
    y = diffs @ basis  # [n, r]
    a_mean, y_mean = a.mean(0), y.mean(0)
    ac, yc = a - a_mean, y - y_mean
    n = a.shape[0]
    # The ridge is relative to the spread of ``a``; its floor is the variance float rounding
    # alone puts into ``a`` (``(ROUNDING eps)^2 mean |rej_i|^2``), so that pairs whose rejected
    # activations do not vary along V_r (duplicates, one distinct pair) fit K = 0 instead of a
    # ratio of rounding errors.
    floor = (ROUNDING * torch.finfo(dtype).eps) ** 2 * float((rej * rej).sum() / n)
    reg = ridge * float((ac * ac).sum() / (n * rank)) + floor + torch.finfo(dtype).tiny
    gram = ac.T @ ac / n + reg * torch.eye(rank, dtype=dtype, device=a.device)
    K = torch.linalg.solve(gram, ac.T @ yc / n).T  # [r, r]: y ≈ y_mean + K (a - a_mean)
    K = _contraction(K)
    t = y_mean - K @ a_mean
    return basis @ t, basis, basis @ K


def _contraction(K: torch.Tensor) -> torch.Tensor:
    """The symmetric part of ``K`` with its eigenvalues clipped to ``[-1, 0]``.

    At coefficient 1 a coordinate ``a`` becomes ``a + t + K a = t + (I + K) a``: eigenvalues in
    ``[-1, 0]`` move every activation part of the way (0: a pure shift; -1: all the way, a clamp
    to ``t``) toward the fitted chosen value. Outside that range the map overshoots
    (``K = -2``: a reflection, which is what pairs whose chosen and rejected answers swap sides
    along the axis, as CAA A/B pairs do, fit) or expands the spread (``K > 0``); on activations
    off the training pairs both give steps far larger than the shared scale.
    """
    values, vectors = torch.linalg.eigh((K + K.T) / 2)
    return vectors @ torch.diag(values.clamp(-1.0, 0.0)) @ vectors.T


def weight_svd(out_diffs: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor, rank: int = 1):
    """SVD-weight steering of a Linear. Returns ``(A = V_k [in, r], B = U_k diag(dS) [out, r])``.

    Args:
        out_diffs: ``[n, out]`` differences of the module's output (chosen - rejected).
        inputs: ``[N, in]`` the module's inputs for both members of every pair.
        weight: ``[out, in]`` the module's weight.
        rank: number of singular components kept (those with the largest achievable mean shift
            ``|u_j · m| * mean(v_j·x)^2 / mean((v_j·x)^2)``).
    """
    check_finite("module's inputs", inputs)
    dtype = work_dtype(out_diffs)
    weight = weight.detach().to(out_diffs.device, dtype)
    out_diffs, inputs = out_diffs.to(dtype), inputs.to(dtype)
    if weight.dim() != 2 or out_diffs.shape[1] != weight.shape[0] or inputs.shape[1] != weight.shape[1]:
        raise ValueError(
            f"weight {tuple(weight.shape)} must be [out, in] matching out_diffs "
            f"{tuple(out_diffs.shape)} and inputs {tuple(inputs.shape)}"
        )
    if not bool(out_diffs.abs().max() > 0):
        raise ValueError(
            "weight_svd: every output difference is zero (chosen and rejected give identical "
            "activations), so there is no separation to steer toward"
        )
    u_w, _, vh_w = torch.linalg.svd(weight, full_matrices=False)  # [out, q], [q, in]
    if not 1 <= rank <= u_w.shape[1]:
        raise ValueError(f"rank={rank} must be between 1 and the weight's rank bound {u_w.shape[1]}")
    m = out_diffs.mean(0) @ u_w  # [q] mean separation per left singular component
    p_all = inputs @ vh_w.T  # [N, q] input coordinates on every right singular vector
    second = (p_all * p_all).mean(0)
    # Fraction of m_j a change of s_j can deliver on average: mean(p)^2 / mean(p^2) in [0, 1].
    # Components are ranked by the mean shift they can actually produce, |m_j| * reach_j, not by
    # |m_j| alone: a component whose inputs average to ~0 cannot move the mean output at any
    # coefficient, however large its separation.
    reach = torch.where(second > 0, p_all.mean(0) ** 2 / second.clamp_min(torch.finfo(dtype).tiny),
                        torch.zeros_like(second))
    keep = torch.argsort(m.abs() * reach, descending=True)[:rank]
    u_k, v_k, m_k = u_w[:, keep], vh_w[keep].T, m[keep]
    p = p_all[:, keep]  # [N, r] input coordinates on the kept right singular vectors
    denom = second[keep]
    if bool((denom == 0).any()):
        raise ValueError("weight_svd: the inputs have no component on a kept singular vector")
    ds = m_k * p.mean(0) / denom
    return v_k, u_k * ds


def fisher_preconditioned_mean(grads: torch.Tensor, lam: float) -> torch.Tensor:
    """``(F + λI)^{-1} g`` for ``g = mean(G)``, ``F = G^T G / n`` (``G = grads [n, D]``), in
    float64 on every device, as ``G^T (nλ I_n + G G^T)^{-1} 1``: since ``(λI + G^T G / n) G^T =
    G^T (λI + G G^T / n)``, an ``n x n`` solve and never a ``D x D`` matrix. (Woodbury's
    ``(g - G^T (nλ I + G G^T)^{-1} G g) / λ`` divides the rounding of ``g`` outside the span of
    ``G`` by ``λ``: from float32 gradients it was percents off at ``λ = 1e-3``.) Returns ``[D]``."""
    if not lam > 0:
        raise ValueError(f"fisher_lambda must be > 0, got {lam}")
    G = grads.to(torch.float64)
    n = G.shape[0]
    gram = G @ G.T + n * lam * torch.eye(n, dtype=torch.float64, device=G.device)
    weights = torch.linalg.solve(gram, torch.ones(n, dtype=torch.float64, device=G.device))
    return (G.T @ weights).to(work_dtype(grads))


def grad_direction(grads: torch.Tensor, diffs: torch.Tensor, fisher_lambda: float | None = None):
    """Gradient-to-steering direction from per-example VJPs ``grads [n, D]`` (``J^T d`` for both
    members of every pair), signed and scaled with the layer's pair differences ``diffs``."""
    check_finite("gradients", grads)
    if fisher_lambda is not None:
        return signed_scaled(fisher_preconditioned_mean(grads, float(fisher_lambda)), diffs)
    return signed_scaled(grads.to(work_dtype(grads)).mean(0), diffs)


def additive(method: str, cho: torch.Tensor, rej: torch.Tensor) -> torch.Tensor:
    """Dispatch for the activation-only additive methods."""
    functions = {"mean_diff": mean_diff, "pca_diff": pca_diff, "pca_center": pca_center, "logistic": logistic}
    if method not in functions:
        raise ValueError(f"method={method!r} is not one of {sorted(functions)}")
    return functions[method](cho, rej)

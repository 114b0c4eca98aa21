"""steerkern.ops.steer_ / steer against the float64 torch reference (SPEC section 1).

The Triton kernel runs through the interpreter on CPU (``use_backend("triton")``), the torch
path through ``use_backend("torch")``; both must agree with ``steer_ref`` in float64.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csrc_triton.steer_ref import steer_ref
from steerkern import ops
from tests.conftest import poisoned

BACKENDS = ["triton", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_case(N, D, K, R, dtype, *, d_src=None, bias=True, seed=0, unsteered=0.3):
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(N, D, generator=g).to(dtype)
    slot = torch.randint(0, K, (N,), generator=g)
    slot[torch.rand(N, generator=g) < unsteered] = -1
    coeff = torch.randn(N, generator=g)
    case = dict(out=out, slot=slot, coeff=coeff, bias=None, A=None, B=None, src=None)
    if bias:
        case["bias"] = torch.randn(K, D, generator=g).to(dtype)
    if R:
        ds = d_src or D
        case["A"] = (torch.randn(K, ds, R, generator=g) / ds**0.5).to(dtype)
        case["B"] = (torch.randn(K, D, R, generator=g) / R**0.5).to(dtype)
        if d_src is not None:
            case["src"] = torch.randn(N, ds, generator=g).to(dtype)
    return case


def reference64(case, preserve_norm=False):
    up = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in case.items()}
    return steer_ref(up["out"], up["slot"], up["coeff"], up["bias"], up["A"], up["B"], up["src"], preserve_norm)


def run_op(case, backend, preserve_norm=False, **kw):
    out = case["out"].clone()
    with ops.use_backend(backend):
        result = ops.steer_(out, case["slot"], case["coeff"], case["bias"], case["A"], case["B"], case["src"], preserve_norm, **kw)
    assert result is out
    return out


def assert_close64(got, ref64, dtype):
    """fp32: 1e-5 relative to the row scale; fp16/bf16: one ulp of the value (the interpreter
    truncates to bf16) plus fp32-level error of the terms."""
    eps = torch.finfo(dtype).eps
    scale = ref64.abs().amax(dim=1, keepdim=True).clamp_min(1.0)
    tol = (eps * ref64.abs() + 1e-5 * scale) if dtype != torch.float32 else 2e-5 * scale
    err = (got.double() - ref64).abs()
    assert torch.isfinite(got).all() == torch.isfinite(ref64).all()
    assert (err <= tol).all(), f"max err {err.max().item():.3g}, worst tol {tol.min().item():.3g}"


def assert_untouched(got, before, slot):
    rows = slot < 0
    assert torch.equal(got[rows].view(torch.uint8), before[rows].view(torch.uint8))


CASES = [
    # N, D, K, R, d_src, bias, preserve_norm
    (1, 40, 1, 0, None, True, False),
    (9, 300, 5, 0, None, True, True),
    (20, 72, 5, 1, None, True, False),
    (20, 72, 5, 3, 33, False, False),
    (17, 40, 1, 64, None, True, True),
    (33, 136, 5, 3, 90, True, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_args", CASES, ids=lambda c: "N{}-D{}-K{}-R{}-Ds{}-b{}-pn{}".format(*c))
def test_matches_float64_reference(backend, case_args):
    N, D, K, R, d_src, bias, pn = case_args
    for i, dtype in enumerate(DTYPES):
        case = make_case(N, D, K, R, dtype, d_src=d_src, bias=bias, seed=i)
        got = run_op(case, backend, pn)
        assert_close64(got, reference64(case, pn), dtype)
        assert_untouched(got, case["out"], case["slot"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsteered_rows_and_padding_never_written(backend):
    """out is a strided view into a NaN-poisoned buffer: the padding columns and the rows with
    slot -1 (also NaN) stay bitwise NaN, and no NaN leaks into steered rows."""
    N, D, K, R = 24, 50, 5, 3
    case = make_case(N, D, K, R, torch.float32, seed=3)
    buf = poisoned(N, D + 14)
    buf[:, :D] = case["out"]
    buf[case["slot"] < 0, :D] = float("nan")
    out = buf[:, :D]
    clean = case["out"].clone()
    with ops.use_backend(backend):
        ops.steer_(out, case["slot"], case["coeff"], case["bias"], case["A"], case["B"], src=clean)
    case["src"] = clean
    assert torch.isnan(buf[:, D:]).all()
    assert torch.isnan(buf[case["slot"] < 0]).all()
    steered = case["slot"] >= 0
    assert_close64(out[steered], reference64(case)[steered], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_coeff_zero_is_identity(backend):
    case = make_case(16, 64, 5, 3, torch.float32, seed=4)
    case["coeff"] = torch.zeros(16)
    got = run_op(case, backend, preserve_norm=True)
    assert torch.equal(got, case["out"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_are_handled(backend):
    N, D, K, R = 16, 48, 5, 3
    case = make_case(N, D, K, R, torch.float16, d_src=40, seed=5)
    ref = reference64(case)
    strided = dict(case)
    strided["slot"] = torch.stack([case["slot"], case["slot"]], 1)[:, 0]  # stride 2
    strided["coeff"] = torch.stack([case["coeff"]] * 3, 1)[:, 1]  # stride 3
    strided["src"] = case["src"].T.contiguous().T  # column-major
    strided["A"] = case["A"].transpose(1, 2).contiguous().transpose(1, 2)
    strided["B"] = case["B"].transpose(0, 2).contiguous().transpose(0, 2)
    strided["bias"] = case["bias"].T.contiguous().T
    assert not strided["src"].is_contiguous() and not strided["A"].is_contiguous()
    got = run_op(strided, backend)
    assert_close64(got, ref, torch.float16)


def test_non_unit_stride_out_is_refused():
    case = make_case(8, 16, 1, 0, torch.float32)
    out = case["out"].T.contiguous().T
    with pytest.raises(ValueError, match="out must have unit stride along D"):
        ops.steer_(out, case["slot"], case["coeff"], case["bias"])
    with pytest.raises(ValueError, match="overlapping rows"):
        ops.steer_(torch.zeros(16).expand(8, 16), case["slot"], case["coeff"], case["bias"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ablation_and_clamp(backend):
    N, D = 12, 96
    g = torch.Generator().manual_seed(6)
    u = torch.randn(D, generator=g)
    u /= u.norm()
    out = torch.randn(N, D, generator=g) + 3 * u
    slot = torch.zeros(N, dtype=torch.int32)
    one = torch.ones(N)
    A, B = u[None, :, None], -u[None, :, None]
    with ops.use_backend(backend):
        ablated = ops.steer_(out.clone(), slot, one, A=A, B=B)
        clamped = ops.steer_(out.clone(), slot, one, bias=2.5 * u[None], A=A, B=B)
    assert (ablated @ u).abs().max() < 1e-5
    assert ((clamped @ u) - 2.5).abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_preserve_norm_keeps_row_norms(backend):
    case = make_case(10, 80, 5, 3, torch.float32, seed=7, unsteered=0.0)
    got = run_op(case, backend, preserve_norm=True)
    torch.testing.assert_close(got.norm(dim=1), case["out"].norm(dim=1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, case["out"])


@pytest.mark.interpreter
@settings(max_examples=6, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    N=st.integers(1, 20),
    D=st.integers(1, 70),
    K=st.integers(1, 4),
    R=st.sampled_from([0, 1, 2, 5]),
    pn=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_triton_matches_reference(N, D, K, R, pn, seed):
    case = make_case(N, D, K, R, torch.float32, seed=seed)
    got = run_op(case, "triton", pn)
    assert_close64(got, reference64(case, pn), torch.float32)
    assert_untouched(got, case["out"], case["slot"])


def test_bad_inputs_have_clear_messages():
    case = make_case(8, 16, 2, 2, torch.float32)
    o, s, c, b, A, B = (case[k] for k in ("out", "slot", "coeff", "bias", "A", "B"))
    cases = [
        (dict(out=o[0]), ValueError, "out must be a 2-D tensor"),
        (dict(out=o.long()), TypeError, "out must be float32"),
        (dict(slot=s.float()), TypeError, "slot must be an int32/int64"),
        (dict(slot=s[:5]), ValueError, r"slot must have shape \[N\]"),
        (dict(coeff=c[:3]), ValueError, r"coeff must have shape \[N\]"),
        (dict(bias=b[:, :5]), ValueError, r"bias must be \[K, D\]"),
        (dict(A=A, B=None), ValueError, "A and B come together"),
        (dict(A=A[:, :3], B=B), ValueError, r"expected A \[K, D_src, R\]"),
        (dict(bias=b[:1], A=A, B=B), ValueError, "every bank tensor needs the same K"),
        (dict(A=torch.zeros(2, 16, 65), B=torch.zeros(2, 16, 65)), ValueError, "rank R must be in 1..64"),
        (dict(A=torch.zeros(2, 16, 0), B=torch.zeros(2, 16, 0)), ValueError, "R = 0 .*bias only"),
        (dict(slot=torch.full((8,), 2)), ValueError, "slot holds 2 but the bank has K = 2"),
        (dict(bias=b.to("meta")), ValueError, "bias is on meta"),
        (dict(src=torch.zeros(8, 16)), ValueError, "src is only read by the low-rank term"),
        (dict(bias=b.int()), TypeError, "bias must be float32"),
    ]
    for override, exc, msg in cases:
        args = dict(out=o.clone(), slot=s, coeff=c, bias=b)
        args.update(override)
        with pytest.raises(exc, match=msg):
            ops.steer_(**args)
    with pytest.raises(ValueError, match="use steerkern.ops.steer"):
        ops.steer_(o.clone().requires_grad_(), s, c, b)


def test_validate_false_and_full():
    case = make_case(8, 16, 2, 0, torch.float32)
    bad_slot = torch.full((8,), 5)
    with pytest.raises(ValueError, match="slot holds 5"):
        ops.steer_(case["out"].clone(), bad_slot, case["coeff"], case["bias"], validate="full")
    got = ops.steer_(case["out"].clone(), case["slot"], case["coeff"], case["bias"], validate=False)
    assert_close64(got, reference64(case), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unvalidated_out_of_range_slot_leaves_row_untouched(backend):
    case = make_case(16, 40, 3, 2, torch.float32, seed=10)
    case["slot"][:4] = 3  # == K: refused by validation, never read out of bounds without it
    got = run_op(case, backend, validate=False)
    assert torch.equal(got[:4], case["out"][:4])
    case["slot"][:4] = -1
    assert_close64(got, reference64(case), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["bias", "lowrank_src", "lowrank_self", "all_norm", "all_src_norm"])
def test_steer_gradcheck_float64(backend, form):
    case = make_case(6, 7, 3, 2, torch.float64, d_src=5 if "src" in form else None,
                     bias=form in ("bias", "all_norm", "all_src_norm"), seed=8)
    if form == "bias":
        case["A"] = case["B"] = None
    case["coeff"] = case["coeff"].double()
    names = [k for k in ("out", "coeff", "bias", "A", "B", "src") if case[k] is not None]
    pn = form.endswith("norm")

    def f(*tensors):
        kw = dict(case)
        kw.update(zip(names, tensors))
        return ops.steer(kw["out"], kw["slot"], kw["coeff"], kw["bias"], kw["A"], kw["B"], kw["src"], pn)

    inputs = [case[k].clone().requires_grad_() for k in names]
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_src", [False, True])
def test_non_finite_unsteered_rows_stay_out_of_every_gradient(backend, with_src):
    """A NaN / Inf row with slot -1 (padding, an overflowed fp16 row) is left alone by the
    forward pass and adds nothing to any gradient: NaN * 0 once poisoned A's gradient."""
    case = make_case(5, 8, 2, 2, torch.float32, seed=3, d_src=6 if with_src else None)
    case["slot"] = torch.tensor([0, 1, 0, -1, 1])
    case["out"][3] = float("nan")
    if with_src:
        case["src"][3] = float("inf")
    names = [k for k in ("out", "coeff", "bias", "A", "B", "src") if case[k] is not None]
    inputs = {k: case[k].clone().requires_grad_() for k in names}
    with ops.use_backend(backend):
        y = ops.steer(**{**case, **inputs})
    y[torch.arange(5) != 3].sum().backward()
    for name, tensor in inputs.items():
        grad = tensor.grad if name not in ("out", "src") else tensor.grad[torch.arange(5) != 3]
        assert torch.isfinite(grad).all(), name
    if with_src:
        assert torch.equal(inputs["src"].grad[3], torch.zeros(6))


@pytest.mark.interpreter
def test_steer_fp32_kernel_forward_and_backward_match_reference_autograd():
    case = make_case(12, 40, 3, 3, torch.float32, seed=9)
    names = ("out", "coeff", "bias", "A", "B")
    a = [case[k].clone().requires_grad_() for k in names]
    b = [case[k].clone().requires_grad_() for k in names]
    with ops.use_backend("triton"):
        y = ops.steer(a[0], case["slot"], a[1], a[2], a[3], a[4], preserve_norm=True)
    y_ref = steer_ref(b[0], case["slot"], b[1], b[2], b[3], b[4], preserve_norm=True)
    torch.testing.assert_close(y, y_ref, rtol=2e-5, atol=2e-5)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    for name, x, r in zip(names, a, b):
        torch.testing.assert_close(x.grad, r.grad, rtol=1e-4, atol=1e-4, msg=name)
    assert torch.equal(a[0].detach(), case["out"])  # steer() is out of place


@pytest.mark.interpreter
def test_steer_accepts_any_layout_of_out():
    case = make_case(8, 24, 2, 2, torch.float32, seed=11)
    col_major = case["out"].T.contiguous().T
    with ops.use_backend("triton"):
        y = ops.steer(col_major, case["slot"], case["coeff"], case["bias"], case["A"], case["B"])
    assert_close64(y, reference64(case), torch.float32)


def loop_reference64(out, slot, coeff, bias=None, A=None, B=None, src=None, preserve_norm=False):
    """SPEC section 1 written row by row in float64, independent of ``steer_ref``."""
    result = out.double().clone()
    num_entries = next((t.shape[0] for t in (bias, A) if t is not None), 0)
    for n in range(out.shape[0]):
        k = int(slot[n])
        if not 0 <= k < num_entries:
            continue
        x = out[n].double()
        v = torch.zeros_like(x)
        if bias is not None:
            v += bias[k].double()
        if A is not None:
            s = (out[n] if src is None else src[n]).double()
            v += B[k].double() @ (A[k].double().T @ s)
        y = x + float(coeff[n]) * v
        if preserve_norm and y.norm() > 0:
            y = y * (x.norm() / y.norm())
        result[n] = y
    return result


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pn", [False, True])
def test_reference_and_kernel_match_a_row_loop(backend, pn):
    """steer_ref and both backends against a per-row float64 loop, in every form: bias only,
    low-rank only, both, with src of another width, and mixed dtypes between out and bank."""
    N, D, K, R = 11, 37, 4, 5
    forms = [
        dict(bias=True, R=0, d_src=None, dtypes=(torch.float32,) * 3),
        dict(bias=False, R=R, d_src=None, dtypes=(torch.float32,) * 3),
        dict(bias=True, R=R, d_src=23, dtypes=(torch.float32,) * 3),
        dict(bias=True, R=R, d_src=23, dtypes=(torch.float32, torch.bfloat16, torch.float16)),
        dict(bias=True, R=R, d_src=None, dtypes=(torch.bfloat16, torch.float32, torch.float32)),
    ]
    for i, form in enumerate(forms):
        out_dt, bank_dt, src_dt = form["dtypes"]
        case = make_case(N, D, K, form["R"], torch.float32, d_src=form["d_src"], bias=form["bias"], seed=20 + i)
        case["out"] = case["out"].to(out_dt)
        for name in ("bias", "A", "B"):
            if case[name] is not None:
                case[name] = case[name].to(bank_dt)
        if case["src"] is not None:
            case["src"] = case["src"].to(src_dt)
        expected = loop_reference64(**case, preserve_norm=pn)
        ref = steer_ref(**case, preserve_norm=pn)
        assert_close64(ref, expected, out_dt)
        assert_close64(run_op(case, backend, pn), expected, out_dt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_bank_steers_nothing(backend):
    """K = 0 (a bank with no entries): every row is unsteered, forward and backward."""
    N, D = 5, 8
    out = torch.randn(N, D)
    slot = torch.full((N,), -1)
    bias = torch.zeros(0, D, requires_grad=True)
    x = out.clone().requires_grad_()
    with ops.use_backend(backend):
        assert torch.equal(ops.steer_(out.clone(), slot, torch.ones(N), bias.detach()), out)
        y = ops.steer(x, slot, torch.ones(N), bias)
        y.backward(torch.ones_like(y))
        # unvalidated slot 0 with K = 0 is out of range: left untouched, never an IndexError
        assert torch.equal(ops.steer_(out.clone(), torch.zeros(N, dtype=torch.long), torch.ones(N),
                                      bias.detach(), validate=False), out)
    assert torch.equal(y, out)
    assert torch.equal(x.grad, torch.ones(N, D)) and bias.grad.shape == (0, D)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unvalidated_int64_slot_beyond_int32_leaves_row_untouched(backend):
    """slot 2**32 must not wrap to entry 0 (nor -2**32 + 1 to entry 1) inside the kernel."""
    case = make_case(6, 20, 2, 2, torch.float32, seed=12, unsteered=0.0)
    case["slot"][:3] = torch.tensor([2**32, 2**32 + 1, -(2**32) + 1])
    got = run_op(case, backend, validate=False)
    assert torch.equal(got[:3], case["out"][:3])
    case["slot"][:3] = -1
    assert_close64(got, reference64(case), torch.float32)


def test_non_finite_coeff_and_bank_are_refused():
    """NaN / Inf in a steered row's coefficient or in a bank tensor: a ValueError naming the
    argument, and out left as it was (SPEC section 9); a NaN coefficient on a slot -1 row is
    never read, so it is accepted."""
    case = make_case(8, 16, 2, 2, torch.float32, seed=13, unsteered=0.0)
    args = {k: case[k] for k in ("out", "slot", "coeff", "bias", "A", "B")}
    for bad in (float("nan"), float("inf"), -float("inf")):
        coeff = case["coeff"].clone()
        coeff[3] = bad
        out = case["out"].clone()
        for fn in (ops.steer_, ops.steer):
            with pytest.raises(ValueError, match=r"coeff\[3\] is .* coefficients must be finite"):
                fn(**{**args, "out": out, "coeff": coeff})
        assert torch.equal(out, case["out"])
        for name in ("bias", "A", "B"):
            poisoned_bank = case[name].clone()
            poisoned_bank[1].view(-1)[3] = bad
            with pytest.raises(ValueError, match=rf"{name}\[1\] holds NaN or Inf"):
                ops.steer_(**{**args, "out": out, name: poisoned_bank})
            assert torch.equal(out, case["out"])
    slot = case["slot"].clone()
    slot[3] = -1
    coeff = case["coeff"].clone()
    coeff[3] = float("nan")
    got = ops.steer_(**{**args, "out": case["out"].clone(), "slot": slot, "coeff": coeff})
    assert torch.equal(got[3], case["out"][3]) and torch.isfinite(got).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_rank_steering_under_autocast_keeps_its_precision(backend):
    """Under ``torch.autocast`` the reference's low-rank products once ran in bfloat16 and
    failed to land in its float32 buffers (``index_add_``: Float and BFloat16); forward and
    gradients now equal those without autocast."""
    case = make_case(12, 40, 3, 3, torch.float32, seed=11)
    names = ("out", "coeff", "bias", "A", "B")
    results = []
    for enabled in (False, True):
        leaves = [case[k].clone().requires_grad_() for k in names]
        with ops.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            in_place = ops.steer_(case["out"].clone(), case["slot"], case["coeff"], case["bias"], case["A"], case["B"])
            y = ops.steer(leaves[0], case["slot"], leaves[1], leaves[2], leaves[3], leaves[4])
            (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        results.append([in_place, y.detach()] + [x.grad for x in leaves])
    for name, plain, autocast in zip(("steer_", "steer") + names, *results):
        assert plain.dtype == autocast.dtype == torch.float32, name
        torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=1e-6, msg=name)


def test_tensors_on_the_meta_device_are_refused_by_name():
    """A meta tensor has a shape and no values: the value checks (finite bank and
    coefficients, slots < K) cannot run on it, nor can the steering."""
    out, slot, coeff, bias = torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), torch.ones(3), torch.ones(2, 4)
    for name in ("out", "slot", "coeff", "bias"):
        args = dict(out=out, slot=slot, coeff=coeff, bias=bias)
        args[name] = args[name].to("meta")
        if name == "out":
            args.update(slot=slot.to("meta"), coeff=coeff.to("meta"), bias=bias.to("meta"))
        for op in (ops.steer_, ops.steer):
            with pytest.raises(ValueError, match=f"steer_: {name} .*meta"):
                op(**args)


def test_preserve_norm_and_validate_are_not_taken_by_truthiness():
    """``preserve_norm="no"`` rescaled every steered row and ``validate="fulll"`` checked as
    ``True``: both are refused by name."""
    out, slot, coeff, bias = torch.randn(3, 4), torch.zeros(3, dtype=torch.long), torch.ones(3), torch.ones(2, 4)
    for op in (ops.steer_, ops.steer):
        with pytest.raises(TypeError, match="preserve_norm must be True or False"):
            op(out.clone(), slot, coeff, bias, preserve_norm="no")
        with pytest.raises(ValueError, match="validate must be True, False or 'full'"):
            op(out.clone(), slot, coeff, bias, validate="fulll")
        torch.testing.assert_close(op(out.clone(), slot, coeff, bias, validate="full"), out + 1)


def test_numpy_bools_are_taken_for_preserve_norm_and_validate():
    """``validate`` took any truthy value before it was checked; numpy bools (what a config
    array or ``x > 0`` of a numpy scalar gives) stay accepted, for ``preserve_norm`` too."""
    import numpy as np

    out, slot, coeff, bias = torch.randn(3, 4), torch.zeros(3, dtype=torch.long), torch.ones(3), torch.ones(2, 4)
    for op in (ops.steer_, ops.steer):
        for validate in (np.True_, np.False_):
            torch.testing.assert_close(op(out.clone(), slot, coeff, bias, validate=validate), out + 1)
        torch.testing.assert_close(op(out.clone(), slot, coeff, bias, preserve_norm=np.False_), out + 1)

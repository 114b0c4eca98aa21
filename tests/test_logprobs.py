"""token_logprobs: Triton kernels (interpreter, small shapes) and the chunked torch reference
(realistic shapes) against an unchunked float64 reference."""

import pytest
import torch

from csrc_triton import logprobs_ref as R
from steerkern import ops
from tests.conftest import INTERPRETING, poisoned

# small shapes for the interpreter: V not a multiple of any BLOCK_V, D not a power of two
N, D, V = 37, 48, 300
BACKENDS = ["torch", "triton"]


def _inputs(n=N, d=D, v=V, dtype=torch.float32, ignore=(3, 20), seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype)
    W = (torch.randn(v, d, generator=g) * 0.3).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[[i for i in ignore if i < n]] = -100
    return h, W, y


def _reference(h, W, y, grad, softcap=None):
    """float64 value and gradients of the unchunked formula, for h/W as given (rounded)."""
    hr = h.detach().double().clone().requires_grad_()
    Wr = W.detach().double().clone().requires_grad_()
    lp = R.token_logprobs_naive(hr, Wr, y, softcap=softcap)
    (lp * grad.double()).sum().backward()
    return lp.detach(), hr.grad, Wr.grad


def _run(backend, h, W, y, grad, need_W=True, softcap=None):
    hh = h.clone().requires_grad_()
    WW = W.clone().requires_grad_(need_W)
    with ops.use_backend(backend):
        lp = ops.token_logprobs(hh, WW, y, softcap=softcap)
        (lp * grad.to(lp.dtype)).sum().backward()
    return lp.detach(), hh.grad, WW.grad


TOL = {  # (logp atol, relative gradient tolerance)
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (1e-4, 3e-2),  # bf16 dz scratch and bf16 gradients
    torch.float16: (1e-4, 1e-2),
}


def _assert_grad_close(got, want, rel):
    scale = want.abs().max().item()
    err = (got.double() - want).abs().max().item()
    assert err <= rel * scale, f"gradient error {err:.3g} > {rel} * {scale:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_reference(backend, dtype):
    h, W, y = _inputs(dtype=dtype)
    grad = torch.randn(N, generator=torch.Generator().manual_seed(1))
    lp, dh, dW = _run(backend, h, W, y, grad)
    ref, dh_ref, dW_ref = _reference(h, W, y, grad)
    atol, rel = TOL[dtype]
    assert lp.dtype == torch.float32 and lp.shape == (N,)
    torch.testing.assert_close(lp.double(), ref, atol=atol, rtol=1e-5)
    assert dh.dtype == dtype and dW.dtype == dtype
    _assert_grad_close(dh, dh_ref, rel)
    _assert_grad_close(dW, dW_ref, rel)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_rows_are_zero_with_zero_gradient(backend):
    h, W, y = _inputs(ignore=(0, 5, 36))
    grad = torch.ones(N)
    lp, dh, dW = _run(backend, h, W, y, grad)
    assert torch.equal(lp[[0, 5, 36]], torch.zeros(3))
    assert torch.equal(dh[[0, 5, 36]], torch.zeros(3, D))
    # ignored rows also do not contribute to dW: compare with those rows removed
    keep = y != -100
    _, _, dW_kept = _run(backend, h[keep], W, y[keep], grad[keep])
    torch.testing.assert_close(dW, dW_kept, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend):
    h, W, y = _inputs(n=5)
    y[:] = -7
    hh = h.clone().requires_grad_()
    with ops.use_backend(backend):
        lp = ops.token_logprobs(hh, W, y, ignore_index=-7)
        lp.sum().backward()
    assert torch.equal(lp, torch.zeros(5)) and torch.equal(hh.grad, torch.zeros(5, D))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_weight_gradient_unless_required(backend):
    h, W, y = _inputs()
    _, dh, dW = _run(backend, h, W, y, torch.ones(N), need_W=False)
    assert dW is None and dh is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_upstream_gradient_rows_get_zero(backend):
    """Rows with zero upstream gradient (inactive margin tokens) are skipped: exactly 0."""
    h, W, y = _inputs(ignore=())
    grad = torch.zeros(N)
    grad[[2, 9, 30]] = torch.tensor([1.0, -2.0, 0.5])
    lp, dh, dW = _run(backend, h, W, y, grad)
    _, dh_ref, dW_ref = _reference(h, W, y, grad)
    others = torch.ones(N, dtype=torch.bool)
    others[[2, 9, 30]] = False
    assert torch.equal(dh[others], torch.zeros(int(others.sum()), D))
    _assert_grad_close(dh, dh_ref, 1e-4)
    _assert_grad_close(dW, dW_ref, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_shape_and_strided_rows(backend):
    h, W, y = _inputs(n=24, ignore=(4,))
    h3 = h.reshape(2, 12, D)
    wide = torch.randn(2, 12, 2 * D)
    wide[..., :D] = h3
    strided = wide[..., :D]  # rows with stride 2D, unit column stride
    with ops.use_backend(backend):
        lp = ops.token_logprobs(strided, W, y.reshape(2, 12))
    assert lp.shape == (2, 12)
    torch.testing.assert_close(
        lp.reshape(-1).double(),
        R.token_logprobs_naive(h.double(), W.double(), y),
        atol=1e-4,
        rtol=1e-5,
    )


def test_triton_forward_vocabulary_splits_merge():
    """The forward's [splits, N] partials merge into the same lse as one split."""
    if not INTERPRETING:
        pytest.skip("CPU interpreter check")
    from csrc_triton import logprobs as K

    h, W, y = _inputs(v=1100)  # three 512-column splits, the last one partial
    one, lse1 = K.token_logprobs_fwd(h, W, y, splits=1)
    three, lse3 = K.token_logprobs_fwd(h, W, y, splits=3)
    torch.testing.assert_close(three, one, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(lse3, lse1, atol=1e-5, rtol=1e-6)
    ref = R.token_logprobs_naive(h.double(), W.double(), y)
    torch.testing.assert_close(three.double(), ref, atol=1e-4, rtol=1e-5)


def test_triton_backward_small_chunks_and_poisoned_scratch(monkeypatch):
    """Several backward chunks, the last one partial; scratch starts as NaN."""
    if not INTERPRETING:
        pytest.skip("CPU interpreter check")
    from csrc_triton import logprobs as K

    real_empty = torch.empty
    monkeypatch.setattr(
        K.torch,
        "empty",
        lambda *s, **kw: (
            poisoned(*s, **kw)
            if kw.get("dtype") in (torch.float32, torch.bfloat16)
            else real_empty(*s, **kw)
        ),
    )
    h, W, y = _inputs()
    grad = torch.randn(N, generator=torch.Generator().manual_seed(3))
    _, lse = R.token_logprobs_fwd(h, W, y)
    dh, dW = K.token_logprobs_bwd(h, W, y, lse, grad, need_h=True, need_W=True, chunk=128)
    _, dh_ref, dW_ref = _reference(h, W, y, grad)
    _assert_grad_close(dh, dh_ref, 1e-4)
    _assert_grad_close(dW, dW_ref, 1e-4)


def test_reference_chunked_equals_unchunked_in_float64():
    h, W, y = _inputs(dtype=torch.float64)
    lp, lse = R.token_logprobs_fwd(h, W, y, chunk=64)
    torch.testing.assert_close(lp, R.token_logprobs_naive(h, W, y), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(h @ W.T, dim=1), atol=1e-12, rtol=1e-12)


def test_reference_realistic_shape():
    """The CPU path at the default model's sizes (D=576, V=49152), against fp64."""
    h, W, y = _inputs(n=128, d=576, v=49152, ignore=(7,), seed=5)
    W = W * 0.2
    grad = torch.randn(128, generator=torch.Generator().manual_seed(2))
    lp, dh, _ = _run("torch", h, W, y, grad, need_W=False)
    ref, dh_ref, _ = _reference(h, W, y, grad)
    torch.testing.assert_close(lp.double(), ref, atol=2e-4, rtol=1e-5)
    _assert_grad_close(dh, dh_ref, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    n, d, v = (6, 5, 37) if backend == "triton" else (9, 7, 50)
    h, W, y = _inputs(n=n, d=d, v=v, dtype=torch.float64, ignore=(2,))
    h.requires_grad_()
    W.requires_grad_()

    def f(h, W):
        with ops.use_backend(backend):
            return ops.token_logprobs(h, W, y)

    # fast_mode: checks random projections of the Jacobian (a few evaluations, not one per input)
    assert torch.autograd.gradcheck(f, (h, W), eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcapped_logits_match_float64_reference(backend, dtype):
    """Logits ``c tanh(u / c)`` (Gemma 2): a head large enough that many logits saturate the cap
    (|u| / c up to about 8), so that neither the cap nor its slope ``1 - tanh^2`` may be
    dropped."""
    h, W, y = _inputs(dtype=dtype)
    W = (W.float() * 5).to(dtype)
    grad = torch.randn(N, generator=torch.Generator().manual_seed(1))
    lp, dh, dW = _run(backend, h, W, y, grad, softcap=3.0)
    ref, dh_ref, dW_ref = _reference(h, W, y, grad, softcap=3.0)
    plain, _, _ = _reference(h, W, y, grad)
    assert (ref - plain).abs().max() > 1.0  # the cap changes these log-probs
    atol, rel = TOL[dtype]
    torch.testing.assert_close(lp.double(), ref, atol=atol, rtol=1e-5)
    _assert_grad_close(dh, dh_ref, rel)
    _assert_grad_close(dW, dW_ref, rel)


def test_softcapped_reference_chunked_equals_unchunked_in_float64():
    h, W, y = _inputs(dtype=torch.float64)
    grad = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    lp, lse = R.token_logprobs_fwd(h, W * 5, y, chunk=64, softcap=2.5)
    torch.testing.assert_close(lp, R.token_logprobs_naive(h, W * 5, y, softcap=2.5),
                               atol=1e-12, rtol=1e-12)
    dh, dW = R.token_logprobs_bwd(h, W * 5, y, lse, grad, need_h=True, need_W=True, chunk=64,
                                  softcap=2.5)
    _, dh_ref, dW_ref = _reference(h, W * 5, y, grad, softcap=2.5)
    torch.testing.assert_close(dh, dh_ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(dW, dW_ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcapped_gradcheck_float64(backend):
    n, d, v = (6, 5, 37) if backend == "triton" else (9, 7, 50)
    h, W, y = _inputs(n=n, d=d, v=v, dtype=torch.float64, ignore=(2,))
    h.requires_grad_()
    W = (W * 4).requires_grad_()

    def f(h, W):
        with ops.use_backend(backend):
            return ops.token_logprobs(h, W, y, softcap=1.5)

    assert torch.autograd.gradcheck(f, (h, W), eps=1e-6, atol=1e-7, fast_mode=True)


def test_triton_softcapped_backward_small_chunks():
    """Several backward chunks with the cap, the last one partial."""
    if not INTERPRETING:
        pytest.skip("CPU interpreter check")
    from csrc_triton import logprobs as K

    h, W, y = _inputs()
    W = W * 5
    grad = torch.randn(N, generator=torch.Generator().manual_seed(3))
    _, lse = R.token_logprobs_fwd(h, W, y, softcap=2.0)
    _, lse_k = K.token_logprobs_fwd(h, W, y, softcap=2.0)
    torch.testing.assert_close(lse_k, lse, atol=1e-5, rtol=1e-6)
    dh, dW = K.token_logprobs_bwd(h, W, y, lse, grad, need_h=True, need_W=True, chunk=128,
                                  softcap=2.0)
    _, dh_ref, dW_ref = _reference(h, W, y, grad, softcap=2.0)
    _assert_grad_close(dh, dh_ref, 1e-4)
    _assert_grad_close(dW, dW_ref, 1e-4)


def test_triton_float64_softcap_is_sent_in_two_fp32_parts():
    """Triton passes a Python float to a compiled kernel as fp32 (the interpreter keeps it a
    double, so only tests/test_gpu.py sees the rounding itself): the cap goes as ``hi + lo``,
    both fp32, which the float64 kernels add back to within 1e-15 of the cap and the fp32
    kernels read as ``hi``, the cap rounded to fp32."""
    import numpy as np
    from triton.runtime.jit import native_specialize_impl

    from csrc_triton import logprobs as K

    assert native_specialize_impl(None, 2.3, False, True, True)[0] == "fp32"
    for cap in (2.3, 0.1, 7.7, 30.0, 1e-3, 1e6):
        hi, lo = K._softcap_args(cap)
        assert hi == float(np.float32(cap)) and lo == float(np.float32(lo))
        assert abs((hi + lo) - cap) <= 1e-15 * cap
        assert float(np.float32(hi) + np.float32(lo)) == hi
    assert K._softcap_args(None) == (0.0, 0.0)
    if INTERPRETING:  # the kernels as run here, at a cap that fp32 rounds
        h, W, y = _inputs(n=8, d=16, v=70, dtype=torch.float64, ignore=(2,))
        grad = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        lp, lse = K.token_logprobs_fwd(h, W * 3, y, softcap=2.3)
        torch.testing.assert_close(lp, R.token_logprobs_naive(h, W * 3, y, softcap=2.3), atol=1e-13, rtol=0)
        dh, dW = K.token_logprobs_bwd(h, W * 3, y, lse, grad, need_h=True, need_W=True, softcap=2.3)
        _, dh_ref, dW_ref = _reference(h, W * 3, y, grad, softcap=2.3)
        torch.testing.assert_close(dh, dh_ref, atol=1e-13, rtol=1e-11)
        torch.testing.assert_close(dW, dW_ref, atol=1e-13, rtol=1e-11)


@pytest.mark.parametrize("softcap", [0, -1.0, float("inf"), float("nan"), True, "30", 1e39])
def test_bad_softcap_is_refused(softcap):
    h, W, y = _inputs(n=4)
    with pytest.raises(ValueError, match=r"softcap must be a finite number > 0, <= 3.4e\+38 or None"):
        ops.token_logprobs(h, W, y, softcap=softcap)


def test_bad_input_errors_name_the_argument():
    h, W, y = _inputs(n=4)
    with pytest.raises(ValueError, match="hidden size"):
        ops.token_logprobs(h, W[:, :10], y)
    with pytest.raises(TypeError, match="W has dtype"):
        ops.token_logprobs(h, W.double(), y)
    with pytest.raises(TypeError, match="labels"):
        ops.token_logprobs(h, W, y.float())
    with pytest.raises(ValueError, match="labels"):
        ops.token_logprobs(h, W, y[:3])
    bad = y.clone()
    bad[1] = V
    with pytest.raises(ValueError, match="outside"):
        ops.token_logprobs(h, W, bad)


def test_a_head_with_no_hidden_size_is_refused_by_name():
    """D = 0 (h [N, 0], W [V, 0]) made every logit 0, and torch's reshape failed on it; a
    head with no inputs is almost surely a mistake, so it is refused by name."""
    for n in (3, 0):
        with pytest.raises(ValueError, match=r"token_logprobs: h and W have hidden size D = 0"):
            ops.token_logprobs(torch.zeros(n, 0), torch.zeros(5, 0), torch.zeros(n, dtype=torch.long))


def test_empty_input():
    h, W, _ = _inputs(n=4)
    out = ops.token_logprobs(h[:0], W, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,) and out.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_row_active(backend):
    """No ignored row and no zero gradient: the backward's no-gather path."""
    h, W, y = _inputs(ignore=())
    grad = torch.rand(N, generator=torch.Generator().manual_seed(4)) + 0.5
    lp, dh, dW = _run(backend, h, W, y, grad)
    ref, dh_ref, dW_ref = _reference(h, W, y, grad)
    torch.testing.assert_close(lp.double(), ref, atol=1e-4, rtol=1e-5)
    _assert_grad_close(dh, dh_ref, 1e-4)
    _assert_grad_close(dW, dW_ref, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_gradients_with_tiny_upstream_gradients(backend):
    """fp16 gradients stay accurate when the upstream gradient is tiny (a mean over many tokens
    gives g ~ 1e-5, and g * p underflows fp16), with mixed magnitudes and signs."""
    h, W, y = _inputs(dtype=torch.float16)
    g = torch.Generator().manual_seed(6)
    grad = 1e-5 * torch.randn(N, generator=g) * torch.rand(N, generator=g)
    hh = h.clone().requires_grad_()
    WW = W.clone().requires_grad_()
    with ops.use_backend(backend):
        (ops.token_logprobs(hh, WW, y).double() * grad.double()).sum().backward()
    _, dh_ref, dW_ref = _reference(h, W, y, grad)
    # dh ~ 1e-5 is itself subnormal in fp16 (spacing 6e-8): 1e-2 of its largest entry
    _assert_grad_close(hh.grad, dh_ref, 1e-2)
    _assert_grad_close(WW.grad, dW_ref, 2e-3)


def test_reference_scratch_does_not_grow_with_vocabulary_for_16bit_heads(monkeypatch):
    """CPU path, few rows, bf16 head: the fp32 copies of the head's chunks stay within
    CHUNK_ELEMENTS values (with chunk = CHUNK_ELEMENTS // rows alone, one copy covered all of V:
    2x the head's bytes)."""
    monkeypatch.setattr(R, "CHUNK_ELEMENTS", 1 << 16)
    n, d, v = 2, 64, 1 << 14
    h, W, y = _inputs(n=n, d=d, v=v, dtype=torch.bfloat16, ignore=())
    _, lse = R.token_logprobs_fwd(h, W, y)
    copies = []
    real_to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if out.data_ptr() != self.data_ptr():
            copies.append(out.numel())
        return out

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny chunks: a second intra-op thread only contends
    try:
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "to", recording_to)
            lp, _ = R.token_logprobs_fwd(h, W, y)
            R.token_logprobs_bwd(h, W, y, lse, torch.ones(n), need_h=True, need_W=False)
    finally:
        torch.set_num_threads(threads)
    assert copies and max(copies) <= 1 << 16, f"a copy of {max(copies)} elements"
    ref = R.token_logprobs_naive(h.double(), W.double(), y)
    torch.testing.assert_close(lp.double(), ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_path_accumulates_in_fp32_under_autocast(dtype):
    """fp32 inputs inside ``torch.autocast`` (forward and backward in the block): the CPU path
    computes in fp32 as the kernel does; its dW product ran in the autocast dtype (3e-3 off)."""
    h, W, y = _inputs(ignore=(3,))
    grad = torch.randn(N, generator=torch.Generator().manual_seed(7))
    with torch.autocast("cpu", dtype=dtype):
        lp, dh, dW = _run("torch", h, W, y, grad)
    ref, dh_ref, dW_ref = _reference(h, W, y, grad)
    assert lp.dtype == dh.dtype == dW.dtype == torch.float32
    torch.testing.assert_close(lp.double(), ref, atol=1e-4, rtol=1e-5)
    _assert_grad_close(dh, dh_ref, 1e-4)
    _assert_grad_close(dW, dW_ref, 1e-4)


def test_softcap_and_ignore_index_are_checked_numbers():
    """``softcap`` takes what the other real arguments take (a 0-d tensor, a numpy scalar);
    ``ignore_index`` must be an integer: ``1.5`` would be compared as 1.5 against the labels but
    sent to the kernel as 1, ``True`` as 1, silently dropping every label 1."""
    import numpy as np

    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(5, 8, generator=g), torch.randn(16, 8, generator=g)
    y = torch.tensor([1, 3, 1, 0, 7])
    capped = ops.token_logprobs(h, W, y, softcap=30.0)
    torch.testing.assert_close(ops.token_logprobs(h, W, y, softcap=torch.tensor(30.0)), capped)
    torch.testing.assert_close(ops.token_logprobs(h, W, y, softcap=np.float32(30.0)), capped)
    torch.testing.assert_close(ops.token_logprobs(h, W, y, ignore_index=np.int64(-100)),
                               ops.token_logprobs(h, W, y))
    for bad in (1.5, True, "x", torch.tensor(1.5)):
        with pytest.raises(ValueError, match="ignore_index must be an int"):
            ops.token_logprobs(h, W, y, ignore_index=bad)

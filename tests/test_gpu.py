"""Checks that only a CUDA device can run (skipped without one; marker ``gpu``).

The compiled Triton kernels against float64 references in every dtype, the steering bank on
CUDA against the CPU, a model split across the GPU and the CPU with ``device_map``, CUDA-graph
capture of a steered decode step, and ``torch.compile`` with the Triton kernel inside.
"""

import pytest
import torch

from csrc_triton.logprobs_ref import token_logprobs_fwd as logprobs_fwd_ref
from csrc_triton.steer_ref import steer_ref_
from steerkern import SteeringVector, ops
from steerkern.control import SteeringBank
from tests.hooks import steerkern_hook_count
from tests.tiny_models import build_tiny_model

pytestmark = pytest.mark.gpu

CUDA = "cuda"
# ||out - ref|| / ||ref|| bounds by output dtype (the kernel accumulates in fp32)
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _bank_inputs(N, D, K, R, dtype, seed, unsteered_every=5):
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(N, D, generator=g)
    slot = torch.randint(0, K, (N,), generator=g)
    slot[2::unsteered_every] = -1
    coeff = torch.randn(N, generator=g)
    bias = torch.randn(K, D, generator=g)
    A = B = None
    if R:
        A = torch.randn(K, D, R, generator=g) / D**0.5
        B = torch.randn(K, D, R, generator=g) / R**0.5
    cast = lambda t: None if t is None else t.to(CUDA, dtype)
    return cast(out), slot.to(CUDA), coeff.to(CUDA), cast(bias), cast(A), cast(B)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("R", [0, 1, 16, 64])
@pytest.mark.parametrize("N,D", [(1, 576), (7, 1000), (64, 4096), (8192, 4096), (333, 5120)])
@pytest.mark.parametrize("preserve_norm", [False, True])
def test_steer_kernel_matches_float64(N, D, R, dtype, preserve_norm):
    out, slot, coeff, bias, A, B = _bank_inputs(N, D, 4, R, dtype, seed=N * 31 + D + R)
    expected = out.double().cpu()
    up = lambda t: None if t is None else t.double().cpu()
    steer_ref_(expected, slot.cpu(), coeff.cpu().double(), up(bias), up(A), up(B), None,
               preserve_norm)
    before = out.clone()
    ops.steer_(out, slot, coeff, bias, A, B, preserve_norm=preserve_norm, validate="full")
    torch.cuda.synchronize()
    steered = slot >= 0
    assert torch.equal(out[~steered], before[~steered]), "slot -1 rows must stay bitwise"
    assert _rel(out[steered].cpu(), expected[steered.cpu()]) < REL_TOL[dtype]


def test_steer_kernel_64bit_offsets():
    """N * D > 2^31 elements: rows past the 32-bit boundary are steered at the right place."""
    D = 4096
    N = (2**31) // D + 64
    out = torch.zeros(N, D, dtype=torch.bfloat16, device=CUDA)
    slot = torch.full((N,), -1, dtype=torch.int32, device=CUDA)
    slot[-3:] = torch.tensor([0, 1, 0], dtype=torch.int32)
    coeff = torch.full((N,), 2.0, device=CUDA)
    bias = torch.randn(2, D, device=CUDA).to(torch.bfloat16)
    ops.steer_(out, slot, coeff, bias, validate=False)
    expected = (2.0 * bias.float()[[0, 1, 0]]).to(torch.bfloat16)
    assert torch.equal(out[-3:], expected)
    assert not out[:-3].any()
    del out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steer_differentiable_on_cuda(dtype):
    out, slot, coeff, bias, A, B = _bank_inputs(96, 256, 3, 8, dtype, seed=3)
    leaves = [t.clone().requires_grad_() for t in (out, bias, A, B)]
    y = ops.steer(leaves[0], slot, coeff, *leaves[1:])
    weights = torch.randn_like(y)
    (y.float() * weights.float()).sum().backward()
    doubles = [t.detach().double().cpu().requires_grad_() for t in (out, bias, A, B)]
    y_ref = doubles[0].clone()
    y_ref = _steer_autograd_ref(y_ref, slot.cpu(), coeff.cpu().double(), *doubles[1:])
    (y_ref * weights.double().cpu()).sum().backward()
    assert _rel(y.detach().cpu(), y_ref.detach()) < REL_TOL[dtype]
    for got, ref in zip(leaves, doubles):
        assert _rel(got.grad.cpu(), ref.grad) < 5 * REL_TOL[dtype]


def _steer_autograd_ref(out, slot, coeff, bias, A, B):
    rows = []
    for n in range(out.shape[0]):
        k = int(slot[n])
        if k < 0:
            rows.append(out[n])
            continue
        v = bias[k] + B[k] @ (A[k].T @ out[n])
        rows.append(out[n] + coeff[n] * v)
    return torch.stack(rows)


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,D,V", [(4096, 1024, 50257), (300, 576, 49152), (17, 4096, 128256)])
def test_token_logprobs_matches_float64(N, D, V, dtype, softcap):
    g = torch.Generator().manual_seed(N + V)
    spread = 1.0 if softcap is None else 20.0  # capped: logits of about +-40 against the cap 30
    h = (torch.randn(N, D, generator=g) / D**0.25).to(CUDA, dtype)
    W = (spread * torch.randn(V, D, generator=g) / D**0.25).to(CUDA, dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::7] = -100
    labels = labels.to(CUDA)
    h_leaf, W_leaf = h.clone().requires_grad_(), W.clone().requires_grad_()
    logp = ops.token_logprobs(h_leaf, W_leaf, labels, softcap=softcap)
    weights = torch.randn(N, generator=g).to(CUDA)
    (logp * weights).sum().backward()

    h64 = h.double().cpu().requires_grad_()
    W64 = W.double().cpu().requires_grad_()
    logits = h64 @ W64.T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    lse = torch.logsumexp(logits, dim=-1)
    keep = labels.cpu() != -100
    picked = logits.gather(1, labels.cpu().clamp_min(0)[:, None])[:, 0]
    ref = torch.where(keep, picked - lse, torch.zeros_like(lse))
    (ref * weights.double().cpu()).sum().backward()

    assert torch.all(logp[~keep.to(CUDA)] == 0)
    assert _rel(logp.detach().cpu(), ref.detach()) < (1e-5 if dtype == torch.float32 else 2e-3)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert _rel(h_leaf.grad.cpu(), h64.grad) < tol
    assert _rel(W_leaf.grad.cpu(), W64.grad) < tol
    assert not h_leaf.grad[~keep.to(CUDA)].any()
    # forward agrees with the chunked torch reference at the input dtype as well
    ref_same, _ = logprobs_fwd_ref(h, W, labels, -100, softcap=softcap)
    assert _rel(logp.detach(), ref_same) < 1e-4


@pytest.mark.parametrize("softcap", [2.3, 0.1, 30.0])
def test_float64_softcapped_logprobs_keep_the_cap_in_float64(softcap):
    """Triton passes a Python float to a kernel as fp32: a cap of 2.3 reached the float64
    kernels as 2.29999995, log-probs 1e-7 off the float64 reference (the cap is sent as two
    fp32 parts that float64 kernels add back)."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(40, 32, generator=g, dtype=torch.float64)
    W = 3 * torch.randn(500, 32, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 500, (40,), generator=g)
    grad = torch.randn(40, generator=g, dtype=torch.float64)
    h_leaf, W_leaf = h.to(CUDA).requires_grad_(), W.to(CUDA).requires_grad_()
    logp = ops.token_logprobs(h_leaf, W_leaf, labels.to(CUDA), softcap=softcap)
    (logp * grad.to(CUDA)).sum().backward()
    h64, W64 = h.clone().requires_grad_(), W.clone().requires_grad_()
    logits = softcap * torch.tanh(h64 @ W64.T / softcap)
    ref = torch.log_softmax(logits, dim=-1).gather(1, labels[:, None])[:, 0]
    (ref * grad).sum().backward()
    torch.testing.assert_close(logp.detach().cpu(), ref.detach(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(h_leaf.grad.cpu(), h64.grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(W_leaf.grad.cpu(), W64.grad, atol=1e-12, rtol=1e-10)


# --- the bank on real models ------------------------------------------------------------------


def _vectors(model, layers, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = model.config.hidden_size
    return [SteeringVector.from_directions({layer: torch.randn(width, generator=g)
                                            for layer in layers}) for _ in range(count)]


def _steered_logits(model, vectors, ids, mask, slots, coeff):
    bank = SteeringBank(model, vectors)
    bank.set_batch(slots=slots, coeff=coeff)
    with torch.no_grad(), bank.attached():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().cpu()


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen2_moe", "gpt2"])
def test_bank_on_cuda_matches_cpu(arch):
    cpu_model = build_tiny_model(arch)
    cuda_model = build_tiny_model(arch).to(CUDA)
    vectors = _vectors(cpu_model, [1, 2], 3)
    ids = torch.randint(3, 128, (4, 12))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    slots, coeff = [0, 2, -1, 1], [3.0, -2.0, 5.0, 1.5]
    expected = _steered_logits(cpu_model, vectors, ids, mask, slots, coeff)
    got = _steered_logits(cuda_model, vectors, ids.to(CUDA), mask.to(CUDA), slots, coeff)
    plain = _steered_logits(cpu_model, vectors, ids, mask, [-1] * 4, coeff)
    valid = mask.bool()
    assert _rel(got[valid], expected[valid]) < 1e-4
    assert _rel(expected[valid], plain[valid]) > 1e-2  # the steering did something
    assert steerkern_hook_count(cuda_model) == 0


@pytest.mark.parametrize("mode", ["split", "offload"])
def test_device_map_split_gpu_cpu(mode):
    """Layers 0-1 on the GPU, 2-3 and the head on "cpu". ``split``: the CPU layers compute on
    the CPU (main device cpu); ``offload``: accelerate's CPU offload, their weights stream to
    the GPU per call. Each site's bank lives where its layer computes; logits and greedy
    generations equal the single-device run."""
    from accelerate import dispatch_model

    reference = build_tiny_model("llama")
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0,
                  "model.layers.1": 0, "model.layers.2": "cpu", "model.layers.3": "cpu",
                  "model.norm": "cpu", "lm_head": "cpu"}
    main = "cpu" if mode == "split" else None
    model = dispatch_model(build_tiny_model("llama"), device_map=device_map, main_device=main)
    vectors = _vectors(reference, [1, 2], 2)
    bank = SteeringBank(model, vectors)
    expected_devices = ["cuda", "cpu" if mode == "split" else "cuda"]
    assert [site.device.type for site in bank.sites] == expected_devices
    ids = torch.randint(3, 128, (3, 10))
    mask = torch.ones_like(ids)
    mask[2, :4] = 0
    slots, coeff = [0, 1, 0], [4.0, -3.0, 2.0]
    expected = _steered_logits(reference, vectors, ids, mask, slots, coeff)
    got = _steered_logits(model, vectors, ids.to(CUDA), mask.to(CUDA), slots, coeff)
    valid = mask.bool()
    assert _rel(got[valid], expected[valid]) < 1e-4
    with torch.no_grad(), steer_generate(model, vectors, slots, coeff) as generate:
        tokens = generate(ids.to(CUDA), mask.to(CUDA))
    with torch.no_grad(), steer_generate(reference, vectors, slots, coeff) as generate:
        tokens_ref = generate(ids, mask)
    assert torch.equal(tokens.cpu(), tokens_ref)
    assert steerkern_hook_count(model) == 0


@pytest.mark.parametrize("mode", ["split", "offload"])
def test_shared_prefix_capture_across_gpu_and_cpu(mode):
    """Extraction's prefix-shared capture on a model split across the GPU and the CPU: the KV
    cache rows are gathered on each layer's device and the reads equal the one-device run."""
    from accelerate import dispatch_model

    from steerkern.capture import capture
    from tests.test_extract import CharTokenizer
    from tests.test_prefix_tree import TEXTS

    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0,
                  "model.layers.1": 0, "model.layers.2": "cpu", "model.layers.3": "cpu",
                  "model.norm": "cpu", "lm_head": "cpu"}
    model = dispatch_model(build_tiny_model("llama"), device_map=device_map,
                           main_device="cpu" if mode == "split" else None)
    tok = CharTokenizer()
    want = capture(build_tiny_model("llama"), tok, TEXTS, [1, 3], last_n_tokens=2,
                   progress=False, share_prefixes=False)
    got = capture(model, tok, TEXTS, [1, 3], last_n_tokens=2, progress=False)
    for layer in (1, 3):
        assert _rel(got[layer], want[layer]) < 1e-4


@pytest.mark.parametrize("mode", ["split", "offload"])
def test_sweep_generations_and_nll_across_gpu_and_cpu(mode):
    """A sweep's generations and their NLL on a model split across the GPU and the CPU (the
    fused head log-probs get the head's input from the layer before it, the labels from the
    GPU) equal the one-device run's."""
    from accelerate import dispatch_model

    from steerkern.sweep import generate_rows
    from tests.test_eval import word_tokenizer

    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0,
                  "model.layers.1": 0, "model.layers.2": "cpu", "model.layers.3": "cpu",
                  "model.norm": 0, "lm_head": "cpu"}
    model = dispatch_model(build_tiny_model("llama"), device_map=device_map,
                           main_device="cpu" if mode == "split" else None)
    reference = build_tiny_model("llama")
    vectors = _vectors(reference, [1, 2], 1)
    tokenizer = word_tokenizer("left")
    prompts, arms = ["Are you happy ?", "Tell me about your weekend"], [(0, -4.0), (-1, 0.0), (0, 4.0)]
    texts, nll = generate_rows(model, tokenizer, vectors, prompts, arms, max_new_tokens=4)
    want_texts, want_nll = generate_rows(reference, tokenizer, vectors, prompts, arms, max_new_tokens=4)
    assert texts == want_texts
    assert float(abs(torch.tensor(nll) - torch.tensor(want_nll)).max()) < 1e-4


def test_train_adapter_across_gpu_and_cpu():
    """train_adapter on a model whose inputs, loss layer and head sit on different devices
    (embedding and layers 0-1 on the GPU, layers 2-3 on the CPU, the head on the GPU): the loss
    is formed on the loss layer's device and the run equals the one-device run."""
    from accelerate import dispatch_model

    from steerkern.train import train_adapter
    from tests.test_train import PAIRS, ToyTokenizer

    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0,
                  "model.layers.1": 0, "model.layers.2": "cpu", "model.layers.3": "cpu",
                  "model.norm": 0, "lm_head": 0}
    model = dispatch_model(build_tiny_model("llama"), device_map=device_map, main_device="cpu")
    args = dict(layers=[1], loss_layer=2, rank=2, steps=3, lr=3e-2, batch_size=4, progress=False,
                tau=0.0, kind="hinge")
    got = train_adapter(model, ToyTokenizer(), PAIRS, **args)
    want = train_adapter(build_tiny_model("llama"), ToyTokenizer(), PAIRS, **args)
    assert got.metadata["loss_history"] == pytest.approx(want.metadata["loss_history"], abs=1e-4)
    assert steerkern_hook_count(model) == 0


class steer_generate:
    """``with steer_generate(model, vectors, slots, coeff) as gen: gen(ids, mask)`` greedy."""

    def __init__(self, model, vectors, slots, coeff):
        self.bank = SteeringBank(model, vectors)
        self.bank.set_batch(slots=slots, coeff=coeff)
        self.model = model

    def __enter__(self):
        self.bank.attach()
        return lambda ids, mask: self.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
            do_sample=False, pad_token_id=0)

    def __exit__(self, *exc):
        self.bank.detach()


# --- CUDA graphs and torch.compile ------------------------------------------------------------


def _static_decoder(model, batch, prompt_len, max_len, seed=0):
    """Prefill a StaticCache eagerly; return (step, token buffer): ``step()`` decodes one
    greedy token per row in place of the buffer and returns the logits [batch, vocab]."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_len)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=g).to(CUDA)
    with torch.no_grad():
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits
    token = logits[:, -1:].argmax(-1)

    def step():
        out = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1]
        token.copy_(out.argmax(-1, keepdim=True))
        return out

    return step, token, cache


def _cache_length(cache):
    return int(cache.get_seq_length())


def _rewind(cache, length):
    for layer in cache.layers:
        layer.cumulative_length.fill_(length)


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_cuda_graph_capture_of_steered_decode_step(positions):
    model = build_tiny_model("llama").to(CUDA)
    vectors = _vectors(model, [1, 2], 3)
    bank = SteeringBank(model, vectors, positions=positions)
    bank.set_batch(slots=[0, 1, -1, 2], coeff=[2.0, -1.0, 3.0, 4.0])
    with torch.no_grad(), bank.attached():
        step, token, cache = _static_decoder(model, 4, 9, 64)
        start = _cache_length(cache)
        first_token = token.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up: autotuning and lazy init happen outside the capture
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        _rewind(cache, start)
        token.copy_(first_token)
        with torch.cuda.graph(graph):
            static_logits = step()

        def eager_and_graph():
            _rewind(cache, start)
            token.copy_(first_token)
            eager = step().clone()
            _rewind(cache, start)
            token.copy_(first_token)
            graph.replay()
            return eager, static_logits.clone()

        eager, replayed = eager_and_graph()
        assert torch.allclose(replayed, eager, atol=1e-5, rtol=1e-5)
        # new coefficients and slots reach the captured graph through the bank's buffers
        bank.set_batch(slots=[2, -1, 0, 1], coeff=[-3.0, 1.0, 0.5, 2.0])
        eager2, replayed2 = eager_and_graph()
        assert torch.allclose(replayed2, eager2, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(replayed2, replayed, atol=1e-3)
        bank.set_batch(slots=[-1, -1, -1, -1], coeff=0.0)
        _, replayed_off = eager_and_graph()
    with torch.no_grad():
        _rewind(cache, start)
        token.copy_(first_token)
        plain = step()
    assert torch.allclose(replayed_off, plain, atol=1e-5, rtol=1e-5)


def test_torch_compile_on_cuda_no_graph_break_no_recompile():
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    model = build_tiny_model("llama").to(CUDA)
    vectors = _vectors(model, [1, 2], 2)
    ids = torch.randint(3, 128, (2, 8), device=CUDA)

    def forward(input_ids):
        return model(input_ids=input_ids, use_cache=False).logits

    bank = SteeringBank(model, vectors)
    bank.set_batch(slots=[0, 1], coeff=[2.0, -1.0])
    with torch.no_grad(), bank.attached():
        explanation = dynamo.explain(forward)(ids)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        dynamo.reset()
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(forward, backend=counter)
        first = compiled(ids)
        eager_first = forward(ids)
        bank.set_batch(slots=[1, -1], coeff=[0.5, 3.0])
        second = compiled(ids)
        eager_second = forward(ids)
        assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"
    assert torch.allclose(first, eager_first, atol=1e-4, rtol=1e-4)
    assert torch.allclose(second, eager_second, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(first, second, atol=1e-3)

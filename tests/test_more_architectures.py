"""Architectures beyond the tiny set of tests/tiny_models.py, each checked end to end once:
layer discovery (known paths, or the one ModuleList as long as the config's layer count),
canonical sub-module names, per-row steering against rows run alone (residual and sub-module), positions="generated"
inside generate (KV caches and Mamba's recurrent state), and prefix-shared capture against
whole-text passes (including MPT, whose ALiBi places tokens by column: it must fall back).
Then what some layouts need of their own: Gemma 3n's parallel residual copies, Mamba 2's mask
given for the prompt pass only, RWKV ignoring the attention mask, modules shared between layers."""

import pytest
import torch
import transformers

from steerkern.capture import capture
from steerkern.control import steer
from steerkern.models import decoder_layers, hidden_size, resolve_module
from steerkern.vectors import SteeringVector
from tests.hooks import steerkern_hook_count
from tests.test_extract import CharTokenizer
from tests.tiny_models import skip_if_rows_couple

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# name: (config class, model class, config kwargs, canonical sub-modules it has)
MORE = {
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(COMMON, head_dim=16), "oud"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", COMMON, "oud"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=48), "o"),
    "granite": ("GraniteConfig", "GraniteForCausalLM", COMMON, "oud"),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", COMMON, "oud"),
    "phi": ("PhiConfig", "PhiForCausalLM", COMMON, "oud"),
    "cohere": ("CohereConfig", "CohereForCausalLM", COMMON, "oud"),
    "gptj": ("GPTJConfig", "GPTJForCausalLM",
             dict(IDS, vocab_size=128, n_embd=64, n_layer=4, n_head=4, n_positions=256,
                  rotary_dim=8), "oud"),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(IDS, vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=4,
                 num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64), "oud"),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(IDS, vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                    new_decoder_architecture=True, num_kv_heads=2), "oud"),
    "bloom": ("BloomConfig", "BloomForCausalLM",
              dict(IDS, vocab_size=128, hidden_size=64, n_layer=4, n_head=4), "oud"),
    "mpt": ("MptConfig", "MptForCausalLM",
            dict(IDS, vocab_size=128, d_model=64, n_layers=4, n_heads=4, max_seq_len=256), "oud"),
    "mamba": ("MambaConfig", "MambaForCausalLM",
              dict(IDS, vocab_size=128, hidden_size=64, num_hidden_layers=4, state_size=8), ""),
    # 2025-26 layouts: feed_forward.* with a MoE (Llama 4), conv + attention layers with
    # feed_forward.w1/w3/w2 (LFM2), Mamba 2 (a recurrent cache), Gemma 3n (the residual stream
    # kept as [S, B, T, D] copies). StarCoder2, GLM-4, XGLM, OLMo 3, SmolLM3, Cohere 2, EXAONE 4,
    # Seed-OSS, Apertus, CodeGen, BioGPT, Qwen3-Next, Bamba, Falcon-H1, Jamba took the same paths
    # as the layouts above when checked by hand (transformers 5.24).
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM",
               dict(COMMON, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
                    intermediate_size_mlp=96, attention_chunk_size=64), "o"),
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM",
             dict(COMMON, layer_types=["conv", "full_attention", "conv", "full_attention"],
                  block_ff_dim=96, block_auto_adjust_ff_dim=False), "oud"),
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM",
               dict(IDS, vocab_size=128, hidden_size=64, num_hidden_layers=4, num_heads=8, head_dim=16,
                    state_size=8, n_groups=1, chunk_size=16, expand=2), ""),
    "gemma3n": ("Gemma3nTextConfig", "Gemma3nForCausalLM",
                dict(COMMON, head_dim=16, sliding_window=64, laurel_rank=8, altup_num_inputs=2,
                     num_kv_shared_layers=0, hidden_size_per_layer_input=8,
                     vocab_size_per_layer_input=128, intermediate_size=[96] * 4,
                     activation_sparsity_pattern=[0.0] * 4,
                     layer_types=["sliding_attention", "full_attention"] * 2), "oud"),
}
SUBMODULES = {"o": "self_attn.o_proj", "u": "mlp.up_proj", "d": "mlp.down_proj"}


def build(name):
    config_name, model_name, kwargs, _ = MORE[name]
    if not (hasattr(transformers, model_name) and hasattr(transformers, config_name)):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    torch.manual_seed(0)
    return getattr(transformers, model_name)(getattr(transformers, config_name)(**kwargs)).eval()


@pytest.mark.parametrize("name", sorted(MORE))
def test_steering_extraction_and_generation(name):
    model = build(name)
    assert len(decoder_layers(model)) == 4
    for code in MORE[name][3]:
        module = resolve_module(model, 1, SUBMODULES[code])
        assert isinstance(module, torch.nn.Module) and module is not decoder_layers(model)[1]
    width = hidden_size(model)
    gen = torch.Generator().manual_seed(1)
    vectors = [SteeringVector.from_directions({layer: 3 * torch.randn(width, generator=gen)
                                               for layer in (1, 2)}) for _ in range(2)]
    ids = torch.randint(3, 100, (3, 7), generator=gen)
    slots, coeffs = [0, 1, -1], [1.0, -2.0, 1.0]
    skip_if_rows_couple(model, name)
    with torch.no_grad():
        base = model(ids).logits
        with steer(model, vectors, slots=slots, coeff=coeffs):
            batched = model(ids).logits
        torch.testing.assert_close(batched[2], base[2], atol=1e-6, rtol=1e-6)  # slot -1
        for row in (0, 1):
            with steer(model, vectors[slots[row]], coeff=coeffs[row]):
                alone = model(ids[row:row + 1]).logits[0]
            torch.testing.assert_close(batched[row], alone, atol=1e-5, rtol=1e-5)
            assert (alone - base[row]).abs().max() > 1e-3

        if "d" in MORE[name][3]:  # a sub-module target (OPT's fc2 sees flattened [B*T, D])
            module = resolve_module(model, 2, "mlp.down_proj")
            out_width = (module.weight.shape[1] if type(module).__name__ == "Conv1D"
                         else module.weight.shape[0])
            down = SteeringVector.from_directions(
                {2: 3 * torch.randn(out_width, generator=gen)}, target="mlp.down_proj")
            with steer(model, [down], slots=[-1, 0, -1], coeff=[1.0, 2.0, 1.0]):
                batched = model(ids).logits
            with steer(model, down, coeff=2.0):
                alone = model(ids[1:2]).logits[0]
            torch.testing.assert_close(batched[1], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batched[0], base[0], atol=1e-6, rtol=1e-6)
            assert (alone - base[1]).abs().max() > 1e-3

        # positions="generated": the prompt's pass (first-token scores) is left alone, the
        # decode steps are steered
        options = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, output_scores=True,
                       return_dict_in_generate=True)
        plain = model.generate(input_ids=ids, **options)
        with steer(model, vectors, slots=slots, coeff=coeffs, positions="generated"):
            steered = model.generate(input_ids=ids, **options)
    torch.testing.assert_close(steered.scores[0], plain.scores[0], atol=1e-5, rtol=1e-5)
    assert (steered.scores[1][:2] - plain.scores[1][:2]).abs().max() > 1e-3
    assert steerkern_hook_count(model) == 0

    tokenizer = CharTokenizer("left")
    texts = ["hello world this", "hello world that", "hello there", "hello world this is it",
             "hello world this is", "hello world th"]
    whole = capture(model, tokenizer, texts, [1, 2], last_n_tokens=2, progress=False,
                    share_prefixes=False)
    shared = capture(model, tokenizer, texts, [1, 2], last_n_tokens=2, progress=False)
    for layer in (1, 2):
        torch.testing.assert_close(shared[layer], whole[layer], atol=1e-5, rtol=1e-5)


def test_feed_forward_spellings_resolve():
    """Canonical names find the feed-forward of layouts that call it ``feed_forward`` (Llama 4,
    Jamba, Bamba, Falcon-H1, LFM2 with w1/w3/w2 as gate/up/down)."""
    model = build("lfm2")
    layer = decoder_layers(model)[1]
    assert resolve_module(model, 1, "mlp") is layer.feed_forward
    assert resolve_module(model, 1, "mlp.down_proj") is layer.feed_forward.w2
    assert resolve_module(model, 1, "mlp.up_proj") is layer.feed_forward.w3
    assert resolve_module(model, 1, "mlp.gate_proj") is layer.feed_forward.w1
    assert resolve_module(model, 1, "self_attn.o_proj") is layer.self_attn.out_proj
    llama4 = build("llama4")
    assert resolve_module(llama4, 0, "mlp") is decoder_layers(llama4)[0].feed_forward


def test_parallel_residual_streams_are_read_and_steered_on_the_active_copy():
    """Gemma 3n's layers return the residual stream as ``[S, B, T, D]`` copies (AltUp): capture
    reads the active copy (what ``output_hidden_states`` holds there), and a residual vector
    changes that copy only, by exactly ``coeff * bias``."""
    model = build("gemma3n")
    stream = model.config.altup_active_idx
    tokenizer = CharTokenizer("left")
    texts = ["hello world", "hi"]
    got = capture(model, tokenizer, texts, [1], progress=False, share_prefixes=False)[1][:, -1]
    bias = torch.randn(64, generator=torch.Generator().manual_seed(0))
    vector = SteeringVector.from_directions({1: bias})

    def layer_output(ids):  # hooked last: after any steering hook
        seen = []
        handle = decoder_layers(model)[1].register_forward_hook(
            lambda module, args, output: seen.append(
                (output[0] if isinstance(output, tuple) else output).clone()))  # a tuple before 5
        try:
            model(ids)
        finally:
            handle.remove()
        return seen[0]

    with torch.no_grad():
        for row, text in enumerate(texts):
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            hidden = model(ids, output_hidden_states=True).hidden_states[2]
            assert hidden.dim() == 4
            torch.testing.assert_close(got[row], hidden[stream, 0, -1], atol=1e-5, rtol=1e-5)
            plain = layer_output(ids)
            with steer(model, vector, coeff=2.0):
                steered = layer_output(ids)
            torch.testing.assert_close(steered[stream] - plain[stream],
                                       (2.0 * bias).expand_as(plain[stream]), atol=1e-5, rtol=1e-5)
            others = [s for s in range(plain.shape[0]) if s != stream]
            assert torch.equal(steered[others], plain[others])
    assert steerkern_hook_count(model) == 0


def test_recurrent_cache_generated_positions_with_a_padded_batch():
    """Mamba 2 gets an attention mask for the prompt pass only: positions="generated" must still
    steer the decode steps (its recurrent state's token count includes the masked prompt pass),
    as the explicit mask of the generated columns does, and leave the first token alone."""
    model = build("mamba2")
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 100, (2, 6), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # row 1 is left-padded
    vector = SteeringVector.from_directions({1: 4 * torch.randn(64, generator=generator)})
    assert_generated_positions_match_their_columns(model, vector, ids, mask, new_tokens=3, atol=1e-6)


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_recurrent_cache_token_index_positions_with_a_padded_batch(name):
    """Mamba and Mamba 2 get the attention mask for the prompt pass only: ``positions=k`` must
    still count each row's real tokens in the decode steps (not the left pads its recurrent
    state consumed), as a hand hook steering by the mask's token index on the whole sequence
    (no cache) does."""
    model = build(name)
    ids = torch.tensor([[0, 0, 0, 5, 6, 7], [4, 5, 6, 7, 8, 9]])
    mask = (ids != 0).long()
    bias = 4 * torch.randn(64, generator=torch.Generator().manual_seed(3))
    k, new = 4, 3  # row 0's first decode step feeds its real token 3 (column 6): not steered
    state = {}

    def hook(module, args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden += 1.5 * bias * ((state["mask"].cumsum(1) - 1 >= k) & state["mask"].bool())[..., None]
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    want, want_logits = ids, []
    handle = decoder_layers(model)[1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            for step in range(new):
                state["mask"] = torch.cat([mask, torch.ones(2, step, dtype=torch.long)], 1)
                logits = model(input_ids=want, attention_mask=state["mask"], use_cache=False).logits[:, -1]
                want_logits.append(logits)
                want = torch.cat([want, logits.argmax(-1, keepdim=True)], 1)
    finally:
        handle.remove()
    with torch.no_grad(), steer(model, SteeringVector.from_directions({1: bias}), coeff=1.5, positions=k):
        got = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    for ours, theirs in zip(got.logits, want_logits):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.sequences, want)
    assert steerkern_hook_count(model) == 0


def assert_generated_positions_match_their_columns(model, vector, ids, mask, *, new_tokens, atol,
                                                   rerun_without_cache=False):
    """Greedy generate under ``positions="generated"`` leaves the first token's scores alone,
    moves the next, and gives the tokens and scores of the explicit mask of the generated
    columns (with ``rerun_without_cache``, run on the whole sequence at every step, where the
    bank's count of cached tokens plays no part)."""
    options = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    columns = torch.zeros(ids.shape[0], ids.shape[1] + new_tokens, dtype=torch.bool)
    columns[:, ids.shape[1]:] = True
    with torch.no_grad():
        plain = model.generate(**options)
        with steer(model, vector, coeff=1.0, positions="generated"):
            steered = model.generate(**options)
        with steer(model, vector, coeff=1.0, positions=columns):
            explicit = model.generate(**options, use_cache=not rerun_without_cache)
    assert torch.equal(steered.scores[0], plain.scores[0])
    assert (steered.scores[1] - plain.scores[1]).abs().max() > 1e-3
    assert torch.equal(steered.sequences, explicit.sequences)
    for ours, theirs in zip(steered.scores, explicit.scores):
        torch.testing.assert_close(ours, theirs, atol=atol, rtol=atol)
    assert steerkern_hook_count(model) == 0


def test_capture_of_a_model_that_ignores_the_attention_mask():
    """RWKV ignores the attention mask, so left pads would flow into its state: capture pads
    after the real tokens, and a batch of texts of several lengths reads what each text alone
    gives."""
    if not hasattr(transformers, "RwkvForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no RwkvForCausalLM")
    torch.manual_seed(0)
    config = transformers.RwkvConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                     attention_hidden_size=64, intermediate_size=96,
                                     context_length=64, **IDS)
    model = transformers.RwkvForCausalLM(config).eval()
    tokenizer = CharTokenizer("left")
    texts = ["hello world", "hi", "hello there world"]
    batched = capture(model, tokenizer, texts, [0, 1], last_n_tokens=2, progress=False)
    for row, text in enumerate(texts):
        alone = capture(model, tokenizer, [text], [0, 1], last_n_tokens=2, progress=False)
        for layer in (0, 1):
            torch.testing.assert_close(batched[layer][row], alone[layer][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared", ["layer", "mlp"])
def test_modules_shared_between_layers_are_refused(shared):
    """A module that several decoder layers call (a layer listed twice, a block shared between
    layers as Zamba's attention block was) would be hooked at all of them: steering or reading
    it at one layer is refused with a message naming the layers, before any hook is attached."""
    from tests.tiny_models import build_tiny_model

    model = build_tiny_model("llama")
    layers = decoder_layers(model)
    if shared == "layer":
        layers[2] = layers[1]
        target = "residual"
    else:
        layers[2].mlp = layers[1].mlp
        target = "mlp.down_proj"
    width = resolve_module(model, 0, target).weight.shape[0] if target != "residual" else 64
    vector = SteeringVector.from_directions({1: torch.ones(width)}, target=target)
    with pytest.raises(ValueError, match=r"layer\(s\) \[2\]"):
        with steer(model, vector):
            pass
    with pytest.raises(ValueError, match=r"layer\(s\) \[2\]"):
        capture(model, CharTokenizer(), ["hello"], [1], target=target, progress=False)
    assert steerkern_hook_count(model) == 0
    resolve_module(model, 0, target)  # layer 0 is its own


def test_layers_that_run_only_the_kept_positions_are_steered_on_them():
    """Gemma 4 with KV-shared layers runs the layers from the first shared one on the last
    ``logits_to_keep`` positions only (generate passes 1): steering there acts on those
    positions with their own slots and coefficients, as in the full pass."""
    if not hasattr(transformers, "Gemma4ForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no Gemma4ForCausalLM")
    config = transformers.Gemma4TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=64, hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=128, num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention"] * 2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.Gemma4ForCausalLM(config).eval()
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = (ids != 0).long()
    vectors = [SteeringVector.from_directions({3: torch.randn(64)}), SteeringVector.from_directions({3: torch.randn(64)})]
    last_only = torch.zeros_like(mask, dtype=torch.bool)
    last_only[:, -1] = True
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        # the last position is steered in the first three; the fourth steers only the others,
        # which at a KV-shared layer no later position reads
        for positions, moves in (("all", True), ("prompt", True), (last_only, True), (~last_only, False)):
            with steer(model, vectors, slots=[1, 0], coeff=[4.0, -3.0], positions=positions):
                full = model(input_ids=ids, attention_mask=mask).logits[:, -1]
                kept = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]
            torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-5)
            assert bool((full - plain).abs().max() > 1e-2) == moves
        with steer(model, vectors[0], coeff=4.0):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 9)


@pytest.mark.parametrize("positions", ["generated", "all"])
def test_sweeps_of_a_model_that_keeps_rope_deltas_between_generates(default_model, positions):
    """Qwen2.5-VL reuses its last generate's rope_deltas ([rows, 1]) when generate is handed a
    cache: a shared sweep hands it caches of another row count (the first token's P' rows, a
    smaller last pass). Shared and plain sweeps must agree, and the model keeps its value: unset
    on a fresh model, the user's own generate's after that."""
    if not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
        pytest.skip(f"transformers {transformers.__version__} has no Qwen2_5_VLForConditionalGeneration")
    from steerkern.eval import evaluate

    tokenizer = default_model[1]
    text = dict(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=2,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if int(transformers.__version__.split(".")[0]) >= 5:
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    else:  # 4.5x: the multimodal sections are a rope_scaling entry
        text.update(rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rope_theta=10000.0)
    vision = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[0])
    torch.manual_seed(0)
    try:
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=49151,
                                               video_token_id=49150, vision_start_token_id=49149)
        model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    except (AttributeError, TypeError) as error:  # 4.50: text settings at the config's top level
        pytest.skip(f"transformers {transformers.__version__} builds no Qwen2.5-VL from text_config: {error}")
    vector = SteeringVector.from_directions({2: 3.0 * torch.randn(64)})
    prompts = [{"prompt": "Is the sky blue?", "label": 1}, {"prompt": "Do you like cheese a lot?", "label": -1}]
    options = dict(coeffs=(-2.0, 0.0, 2.0), prompts=prompts, gen_prompts=["Tell me about your weekend.", "Hi"],
                   max_new_tokens=4, positions=positions, batch_size=4)
    assert model.model.rope_deltas is None
    evaluate(model, tokenizer, vector, **options)
    assert model.model.rope_deltas is None
    ids = tokenizer(["Hello there", "Hi"], return_tensors="pt", padding=True)
    model.generate(**ids, max_new_tokens=2, do_sample=False)
    before = model.model.rope_deltas
    assert before is not None
    plain = evaluate(model, tokenizer, vector, share_prefill=False, **options)
    shared = evaluate(model, tokenizer, vector, **options)
    assert model.model.rope_deltas is before
    assert shared.samples == plain.samples
    assert shared.scores == pytest.approx(plain.scores, abs=1e-4)
    assert shared.delta_nll == pytest.approx(plain.delta_nll, abs=1e-4)


def test_generated_positions_with_a_cache_whose_first_layer_holds_no_keys():
    """MiniMax's cache keeps its linear-attention layers' state apart, so layer 0 of the
    key/value cache stays empty and the cache's length answers 0 while decoding; a single
    unpadded prompt also gets no attention mask in the decode steps. positions="generated" must
    still steer every decode step: as the explicit mask of the generated columns does when the
    whole sequence is rerun at each step without a cache."""
    if not hasattr(transformers, "MiniMaxForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no MiniMaxForCausalLM")
    config = transformers.MiniMaxConfig(**dict(COMMON, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                               layer_types=["linear_attention", "full_attention"] * 2))
    torch.manual_seed(0)
    model = transformers.MiniMaxForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 100, (1, 6), generator=generator)
    vector = SteeringVector.from_directions({1: 4 * torch.randn(64, generator=generator)})
    assert_generated_positions_match_their_columns(model, vector, ids, torch.ones_like(ids), new_tokens=4,
                                                   atol=1e-5, rerun_without_cache=True)


@pytest.mark.parametrize("positions", ["all", "generated", 3])
def test_static_cache_with_a_mask_padded_to_its_capacity(positions):
    """BLOOM under a static cache gets a 2-D attention mask padded with zeros to the cache's
    capacity (its ALiBi needs 2-D), not ``[B, past + T]``: the pass's columns must come from the
    cache's count, so steering under a static cache gives the dynamic cache's tokens and scores
    (the last prompt tokens and the decode steps were left unsteered)."""
    model = build("bloom")
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 100, (2, 6), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # row 1 is left-padded
    vector = SteeringVector.from_directions({1: 3 * torch.randn(64, generator=generator)})
    options = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                   pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        plain = model.generate(**options)
        assert torch.equal(model.generate(**options, cache_implementation="static").sequences, plain.sequences)
        with steer(model, vector, coeff=[1.5, -2.0], positions=positions):
            dynamic = model.generate(**options)
            static = model.generate(**options, cache_implementation="static")
    assert (dynamic.scores[-1] - plain.scores[-1]).abs().max() > 1e-2
    assert torch.equal(static.sequences, dynamic.sequences)
    for ours, theirs in zip(static.scores, dynamic.scores):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert steerkern_hook_count(model) == 0

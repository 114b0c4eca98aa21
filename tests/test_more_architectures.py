"""Architectures beyond the tiny set of tests/tiny_models.py, each checked end to end once:
layer discovery (known paths, or the one ModuleList as long as the config's layer count),
canonical sub-module names, per-row steering against rows run alone (residual and sub-module), positions="generated"
inside generate (KV caches and Mamba's recurrent state), and prefix-shared capture against
whole-text passes (including MPT, whose ALiBi places tokens by column: it must fall back)."""

import pytest
import torch
import transformers

from steerkern.capture import capture
from steerkern.control import steer
from steerkern.models import decoder_layers, hidden_size, resolve_module
from steerkern.vectors import SteeringVector
from tests.hooks import steerkern_hook_count
from tests.test_extract import CharTokenizer

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
}
SUBMODULES = {"o": "self_attn.o_proj", "u": "mlp.up_proj", "d": "mlp.down_proj"}


def build(name):
    config_name, model_name, kwargs, _ = MORE[name]
    if not hasattr(transformers, model_name):
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

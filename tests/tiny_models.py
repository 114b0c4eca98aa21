"""Tiny random-initialised models of every supported architecture, built from configs.

Each is small enough to run a forward pass in milliseconds on CPU: hidden 64, 4 layers,
vocabulary 128. Used by layer discovery, control and extraction tests.
"""

import pytest
import torch
import transformers

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 64}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 64}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                   "shared_expert_intermediate_size": 48}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             {"n_embd": 64, "n_layer": 4, "n_head": 4, "n_positions": 256, "vocab_size": 128,
              "bos_token_id": 1, "eos_token_id": 2}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
                  "num_attention_heads": 4, "max_position_embeddings": 256, "bos_token_id": 1,
                  "eos_token_id": 2, "pad_token_id": 0}),
}

ARCHITECTURES = sorted(CONFIGS)


def build_tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    config_name, model_name, overrides = CONFIGS[arch]
    if arch in ("gpt2", "gpt_neox"):
        kwargs = dict(overrides)
    else:
        kwargs = {**COMMON, **overrides}
    if not hasattr(transformers, config_name):  # e.g. Qwen3 arrived in transformers 4.51
        pytest.skip(f"transformers {transformers.__version__} has no {config_name}")
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    return model



def skip_unless_rows_can_share_a_cache(model, max_length: int = 16, *, models_own: bool = False) -> None:
    """Skip when the installed transformers gives ``model`` no KV cache that steerkern can
    gather by rows (:mod:`steerkern.kvcache`), so prefix sharing falls back to whole passes by
    design. Extraction passes a cache of its own (``empty_model_cache``; none for models that
    still take tuples, GPT-2 before 4.53); sweeps use the cache the model builds itself
    (``models_own``: not gatherable for Gemma 2's ``HybridCache`` or the tuples some models
    return before 4.53)."""
    from steerkern.kvcache import empty_model_cache, is_gatherable

    reason = None
    if empty_model_cache(model, max_length) is None:
        reason = "takes no cache steerkern can build"
    elif models_own:
        with torch.no_grad():
            own = model(torch.ones(1, 2, dtype=torch.long), use_cache=True).past_key_values
        if not is_gatherable(own, max_length):
            reason = f"builds a {type(own).__name__}, not gatherable by rows"
    if reason:
        pytest.skip(f"transformers {transformers.__version__}: {type(model).__name__} {reason}")


def skip_if_rows_couple(model, name: str) -> None:
    """Skip when ``model`` does not compute the rows of a batch independently (Llama 4 under
    transformers 4.55: 1.2e-2 between a row alone and in a batch of 3, no steering attached):
    checks that compare a row across batch compositions cannot hold there."""
    ids = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batch = model(ids).logits[2]
        alone = model(ids[2:]).logits[0]
    if not torch.allclose(alone, batch, atol=1e-4, rtol=1e-4):
        pytest.skip(f"{name} under transformers {transformers.__version__} couples the rows of "
                    f"a batch ({(alone - batch).abs().max():.1e} between a row alone and in "
                    "the batch): steering one row moves the others")


class MergesOnEval(torch.nn.Linear):
    """A LoRA-style layer (as loralib's): ``eval()`` merges its update into the weight."""

    def train(self, mode=True):
        if not mode and self.training:
            with torch.no_grad():
                self.weight.add_(1.0)
        return super().train(mode)

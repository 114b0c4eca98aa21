"""How many rows of a sweep one forward pass or ``generate`` call can hold.

A sweep of ``C`` coefficients over ``P`` prompts is one batch of ``C * P`` rows when it fits,
which it does for every shipped concept; a whole model-written-evals file (1000 items x 5
coefficients) does not: its KV cache alone would take tens of GiB on the default model. The
estimate here lets ``batch_size=None`` mean "as many rows as fit": no pass's estimated peak
goes over a fraction of the free memory of the device the inputs go to (how the rows are then
cut into passes: :mod:`steerkern.passes`).

Per row of ``T`` tokens (prompt and generated) whose last ``keep`` positions' logits are read:

    kv         = 2 * layers * 2 * kv_heads * head_dim * T * elem  (the KV cache, twice)
    attention  = heads * T * T * 4                                 (one layer's fp32 scores)
    mlp        = 3 * intermediate * T * elem                        (one layer's MLP activations)
    logits     = 3 * keep * V * 4                                   (fp32 logits, three copies)

with ``elem`` the parameters' bytes per element. The attention and MLP terms are transient (one
layer at a time); the cache and the logits are held together. The factors 2 and 3 are measured:
a shared prefill's cache and its copy gathered to the rows (or generate's cache growing by
concatenation) are alive together, and the head's output, its log-softmax and a temporary;
with them the estimate is within 20% of the peak resident memory a sweep adds on the default
model (research_notes.md, 2026-11-30 session 6), where the plain sum was 1.7-1.9x too low.
"""

from __future__ import annotations

import torch
from torch import nn

from steerkern.models import hidden_size, input_device, num_layers

# Share of the free memory a sweep's passes may fill (the rest: the model's own workspace, the
# allocator's slack, the caller's tensors).
MEMORY_FRACTION = 0.5


def _config_value(model: nn.Module, keys: tuple[str, ...]):
    config = getattr(model, "config", None)
    for part in (getattr(config, "text_config", None), config):
        for key in keys:
            value = getattr(part, key, None) if part is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def row_bytes(model: nn.Module, tokens: int, keep: int) -> int:
    """Estimated peak bytes one row of ``tokens`` tokens adds to a pass that reads the logits
    of its last ``keep`` positions (formula in the module docstring)."""
    width = hidden_size(model)
    heads = _config_value(model, ("num_attention_heads", "n_head", "num_heads")) or 1
    kv_heads = _config_value(model, ("num_key_value_heads", "multi_query_group_num")) or heads
    head_dim = _config_value(model, ("head_dim",)) or max(width // heads, 1)
    inner = _config_value(model, ("intermediate_size", "n_inner", "ffn_dim")) or 4 * width
    output = model.get_output_embeddings()
    weight = getattr(output, "weight", None)
    vocab = weight.shape[0] if isinstance(weight, torch.Tensor) else (
        _config_value(model, ("vocab_size",)) or 1)
    parameter = next(model.parameters(), None)
    elem = parameter.element_size() if parameter is not None else 4
    kv = 2 * num_layers(model) * 2 * kv_heads * head_dim * tokens * elem
    attention = heads * tokens * tokens * 4
    mlp = 3 * inner * tokens * elem
    logits = 3 * max(keep, 1) * vocab * 4
    return kv + attention + mlp + logits


def free_bytes(device: torch.device) -> int:
    """Free memory of ``device``: the CUDA allocator's free bytes plus what the caching
    allocator holds unused, or the host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    import psutil

    return int(psutil.virtual_memory().available)


def rows_that_fit(model: nn.Module, tokens: int, keep: int = 1) -> int:
    """Most rows of ``tokens`` tokens one pass can hold: ``row_bytes * rows`` under
    ``MEMORY_FRACTION`` of the free memory of the device the inputs go to (at least 1)."""
    budget = MEMORY_FRACTION * free_bytes(input_device(model))
    return max(1, int(budget // max(row_bytes(model, tokens, keep), 1)))

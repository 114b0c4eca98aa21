"""Counting the hooks steerkern leaves on a model.

transformers 5 installs output-capturing hooks of its own the first time a model is asked for
hidden states or attentions, and keeps them; tests that check clean-up count only steerkern's.
"""

from torch import nn


def _is_steerkern(hook) -> bool:
    return (getattr(hook, "__module__", None) or "").startswith("steerkern")


def steerkern_hook_count(model: nn.Module) -> int:
    """Forward, pre-forward and backward hooks defined by steerkern code, over all sub-modules."""
    return sum(
        _is_steerkern(hook)
        for module in model.modules()
        for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks)
        for hook in hooks.values()
    )

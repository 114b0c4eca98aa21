"""steerkern: Triton-accelerated activation steering for causal language models.

Extract steering vectors from contrast pairs, apply them inside decoder layers while the model
generates (a different vector and coefficient per request in one batch), evaluate what they
did, and train steering with a per-token coherence-bounded loss.

Public names are imported lazily, so ``import steerkern`` stays cheap.
"""

import sys
import types
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    # models
    "load_model": "steerkern.models",
    "decoder_layers": "steerkern.models",
    "resolve_module": "steerkern.models",
    # vectors and data
    "SteeringVector": "steerkern.vectors",
    "SteeringPart": "steerkern.vectors",
    "make_pairs": "steerkern.data",
    "PairSet": "steerkern.data",
    "concept_pairs": "steerkern.data",
    "concept_eval_prompts": "steerkern.data",
    "list_concepts": "steerkern.data",
    "load_mwe": "steerkern.data",
    "mwe_pairs": "steerkern.data",
    "mwe_eval_prompts": "steerkern.data",
    "split_items": "steerkern.data",
    # extraction
    "extract": "steerkern.extract",
    "capture": "steerkern.capture",
    "record": "steerkern.capture",
    # losses
    "margin_loss": "steerkern.loss",
    "coherence_penalty": "steerkern.loss",
    "inner_contrastive_loss": "steerkern.loss",
    "CoherenceInputs": "steerkern.loss",
    "train_adapter": "steerkern.train",
    # evaluation
    "evaluate": "steerkern.eval",
    "compare": "steerkern.eval",
    "calibrate": "steerkern.eval",
    "EvalReport": "steerkern.eval_report",
    "ComparisonReport": "steerkern.eval_report",
    # control
    "steer": "steerkern.control",
    "SteeringBank": "steerkern.control",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'steerkern' has no attribute {name!r}")


def __dir__():
    return __all__


class _CallableModule(types.ModuleType):
    """A module that, called, calls its function of the same name."""

    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rsplit(".", 1)[-1])(*args, **kwargs)


def _callable_module(name: str) -> None:
    """Make submodule ``name`` (``steerkern.extract``, ``steerkern.capture``) callable as the
    function it exports under its own name. Importing a submodule binds it as the package's
    attribute, so after ``from steerkern.extract import ...`` anywhere, ``steerkern.extract``
    is the module and ``steerkern.extract(model, ...)`` must still extract."""
    sys.modules[name].__class__ = _CallableModule

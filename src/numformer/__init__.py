"""numformer: Transformers as readable NumPy with hand-written backprop.

The math lives in :mod:`numformer.ops` (forward and backward side by side),
models in :mod:`numformer.models`, and :mod:`numformer.backend` routes the
hot operations to the optional compiled extension ``numformer._cpu``.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "from_pretrained", "save_pretrained", "load_tokenizer",
           "embed", "load_bert", "load_sentence_encoder"]

# Loaded on first use so that ``import numformer`` stays light.
_LAZY = {"from_pretrained": "numformer.pretrained", "save_pretrained": "numformer.pretrained",
         "load_tokenizer": "numformer.pretrained", "embed": "numformer.sentence",
         "load_sentence_encoder": "numformer.sentence", "load_bert": "numformer.models.bert"}


def __getattr__(name: str):
    """Lazy top-level API (importing numformer stays cheap)."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'numformer' has no attribute {name!r}")

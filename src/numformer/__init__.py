"""numformer: Transformers as readable NumPy with hand-written backprop.

The math lives in :mod:`numformer.ops` (forward and backward side by side),
models in :mod:`numformer.models`, and :mod:`numformer.backend` routes the
hot operations to the optional compiled extension ``numformer._cpu``.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "embed", "load_bert", "load_sentence_encoder"]


def __getattr__(name):
    """Lazy top-level API (importing numformer stays cheap)."""
    if name in ("embed", "load_sentence_encoder"):
        from numformer import sentence

        return getattr(sentence, name)
    if name == "load_bert":
        from numformer.models.bert import load_bert

        return load_bert
    raise AttributeError(f"module 'numformer' has no attribute {name!r}")

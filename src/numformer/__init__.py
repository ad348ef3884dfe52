"""numformer: Transformers as readable NumPy with hand-written backprop.

The math lives in :mod:`numformer.ops` (forward and backward side by side),
models in :mod:`numformer.models`, and :mod:`numformer.backend` routes the
hot operations to the optional compiled extension ``numformer._cpu``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]

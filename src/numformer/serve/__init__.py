"""An OpenAI-compatible HTTP server for numformer models (``numformer serve``).

Needs the ``serve`` extra (Starlette + uvicorn): ``pip install "numformer[serve]"``.

    protocol   request bodies: parsing and field checks, limits
    models     loading the served model; checks that need its tokenizer/context
    text       token ids -> text deltas, stop strings
    engine     the worker thread: request queue, batching, the model calls
    app        the HTTP routes (Starlette)
    server     uvicorn: foreground (the CLI) or a background thread (tests)

Only :mod:`app` and :mod:`server` import the server stack; the rest is plain
Python and NumPy.
"""

from numformer.serve.models import ServedModel, load_served_model
from numformer.serve.protocol import Limits

__all__ = ["ServedModel", "load_served_model", "Limits", "BackgroundServer", "serve_forever", "create_app"]


def __getattr__(name):
    # the server stack is optional: import it only when asked for
    if name in ("BackgroundServer", "serve_forever"):
        from numformer.serve import server

        return getattr(server, name)
    if name == "create_app":
        from numformer.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'numformer.serve' has no attribute {name!r}")

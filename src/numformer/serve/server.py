"""Running the app under uvicorn: in the foreground (``numformer serve``) or on a background thread.

    from numformer.serve import load_served_model, BackgroundServer
    with BackgroundServer(load_served_model("ckpt")) as srv:     # a free loopback port
        print(srv.base_url)                                       # http://127.0.0.1:PORT/v1
"""

from __future__ import annotations

import socket
import threading
import time

from numformer.serve.models import ServedModel

LOOPBACK = "127.0.0.1"


def _uvicorn_config(app, host: str, port: int, log_level: str):
    import uvicorn

    # h11: pure Python, no optional C parser needed; keep-alive short enough to free idle sockets.
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http="h11", ws="none",
                          lifespan="on", timeout_keep_alive=5, access_log=log_level == "debug")


def serve_forever(served: ServedModel, host: str = LOOPBACK, port: int = 8000, *, log_level: str = "info",
                  **app_options) -> None:
    """Serve ``served`` until interrupted (Ctrl-C stops it cleanly)."""
    import uvicorn

    from numformer.serve.app import create_app

    uvicorn.Server(_uvicorn_config(create_app(served, **app_options), host, port, log_level)).run()


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """The server on a daemon thread (no signal handlers: uvicorn installs them only on the main thread).

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, served: ServedModel, host: str = LOOPBACK, port: int | None = None, *,
                 log_level: str = "warning", **app_options):
        import uvicorn

        from numformer.serve.app import create_app

        self.app = create_app(served, **app_options)
        self.host, self.port = host, port or free_port(host)
        self._server = uvicorn.Server(_uvicorn_config(self.app, self.host, self.port, log_level))
        self._thread = threading.Thread(target=self._server.run, name="numformer-http", daemon=True)

    @property
    def base_url(self) -> str:
        """The OpenAI client's ``base_url`` (``http://host:port/v1``)."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def engine(self):
        return self.app.state.engine

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

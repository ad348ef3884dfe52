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

    # h11: pure Python, no optional C parser needed; keep-alive short enough to free idle sockets;
    # a deadline for each request's headers (uvicorn has none, see _guarded_h11).
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          http=_guarded_h11(app.state.limits.header_timeout), ws="none",
                          lifespan="on", timeout_keep_alive=5, access_log=log_level == "debug")


def _guarded_h11(header_timeout: float):
    """uvicorn's h11 protocol, plus a deadline for the client between requests (slowloris).

    uvicorn starts no timer when a connection opens, and any byte received
    cancels its keep-alive timer, so a client that sends a request's
    headers one byte at a time (or nothing at all) holds a connection
    forever. Here a timer of ``header_timeout`` seconds runs whenever no
    request is being handled: from the moment the connection opens, and
    again from the end of each response. It stops when a request's headers
    are complete (then the app's body timeout applies to the body, see
    :func:`numformer.serve.app.read_json`); when it fires, the connection
    is closed. It also covers the rest of a body the app never read (a 401,
    a 404) that a client keeps trickling in.

    h11 refuses a request head still incomplete past 16 KiB (uvicorn answers
    400 and closes), so the head a slow client can build is bounded too.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            self._arm_head_timer()             # before super(): it may start a pipelined request at once
            super().on_response_complete()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._cancel_head_timer()      # a request is in the app's hands

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(header_timeout, self._head_timeout)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            idle = self.cycle is None or self.cycle.response_complete
            if idle and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


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

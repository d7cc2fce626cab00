"""``jvlm serve`` / ``python -m jvlm.server``: flags generated from ``Settings``, then uvicorn."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import types
import typing

from pydantic import ValidationError

from .settings import Settings

SHUTDOWN_GRACE_S = 5.0  # after --shutdown-timeout: for cancelled requests to send their 503s


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per ``Settings`` field (``max_batch`` → ``--max-batch``); unset flags keep the defaults."""
    for name, field in Settings.model_fields.items():
        kind = field.annotation
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        help = field.description
        if "(default" not in help:
            help += f" (default: {field.default})"
        flag = "--" + name.replace("_", "-")
        if name == "model":  # the same short flag as `jvlm chat -m`
            parser.add_argument("-m", flag, dest=name, default=None, metavar="MODEL", help=help)
        elif kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help)
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, dest=name, nargs="+", default=None, metavar="HOST", help=help)
        elif typing.get_origin(kind) is typing.Literal:
            parser.add_argument(flag, dest=name, choices=typing.get_args(kind), default=None, help=help)
        else:
            parser.add_argument(flag, dest=name, type=kind, default=None, metavar=name.upper(), help=help)


def settings_from_args(args: argparse.Namespace) -> Settings:
    values = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    if "api_key" not in values and os.environ.get("JVLM_API_KEY"):
        values["api_key"] = os.environ["JVLM_API_KEY"]
    return Settings(**values)


@contextlib.contextmanager
def _exit_quietly_on_signals():
    """uvicorn re-raises SIGTERM / SIGINT after its graceful shutdown; with the default handlers that
    would kill the process (exit 143) instead of letting ``serve_main`` return 0."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def uvicorn_config(app, settings: Settings):
    """uvicorn's configuration for ``app``: the address, the request-head deadline (server/connection.py), and
    a shutdown deadline a little after jvlm's own, so that the requests it cancels have had their answers."""
    import uvicorn

    from .connection import protocol_with_header_timeout

    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                          http=protocol_with_header_timeout(settings.header_timeout),
                          timeout_graceful_shutdown=settings.shutdown_timeout + SHUTDOWN_GRACE_S)


def serve_main(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM / SIGINT; 0 after a graceful shutdown, 1 if startup or loading failed."""
    import uvicorn

    from .app import create_app

    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        problems = "; ".join(f"--{'-'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}"
                             for err in e.errors())
        print(f"jvlm serve: invalid settings: {problems}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    app = create_app(settings)
    host = app.state.host

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:  # the first signal: jvlm cancels its own requests at the deadline
                host.cancel_after(settings.shutdown_timeout)
            super().handle_exit(sig, frame)

    server = Server(uvicorn_config(app, settings))

    def stop() -> None:
        server.should_exit = True

    host.on_failure = stop
    with _exit_quietly_on_signals():
        try:
            server.run()
        except SystemExit as e:  # uvicorn exits 1 when it cannot bind
            return e.code if isinstance(e.code, int) else 1
    return 1 if host.state == "failed" or not server.started else 0

"""The live view's web server: a Starlette app on uvicorn, in a background thread.

Why these libraries: Starlette gives routing, static files and WebSockets in one small,
well-kept ASGI package, and uvicorn serves it from a thread of the session's process without
an event loop of our own to manage (Bokeh or Panel would bring a plotting stack and a
server model much larger than a page of canvases needs). The page (``static/``) draws with
the browser's canvas, so nothing is fetched from the internet.

Routes
------
``GET /``
    The page.
``GET /api/state``
    The session's info and state (JSON).
``POST /api/control``
    An operator action (JSON, :class:`agent.operator.OperatorAction` fields); 200 with
    ``{"accepted": ...}``, 400 with ``{"error": ...}`` for a refused one, 409 when the view shows
    a journal.
``WS /ws``
    ``hello``, then every ``step``/``survey``/``state`` message; the page sends actions as
    ``{"type": "control", ...}`` and gets ``{"type": "ack"}`` or ``{"type": "error"}`` back.

Security: the server binds to loopback by default. Any other address needs a token, given as
``?token=...`` on the page and the socket, or as ``Authorization: Bearer ...`` on the API.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.errors import MicrographyError
from agent.operator import OperatorDesk, OperatorError
from agent.view.feed import ViewHub

__all__ = ["ViewError", "ViewServer", "create_app", "parse_bind"]

STATIC = Path(__file__).with_name("static")
DEFAULT_BIND = "127.0.0.1:8765"


class ViewError(MicrographyError, ValueError):
    """The live view cannot be served as asked (bad bind address, missing token, port taken)."""


def parse_bind(bind: str, token: str | None) -> tuple[str, int, str | None]:
    """Check a ``HOST:PORT`` bind address and its token before anything is exposed.

    Parameters
    ----------
    bind : str
        ``HOST:PORT`` (``PORT`` 0 takes a free one).
    token : str or None
        The access token; one is generated for a non-loopback host when None.

    Returns
    -------
    host, port, token
        ``token`` is None on loopback unless one was given.

    Raises
    ------
    ViewError
        For a malformed address.
    """
    host, sep, port_text = bind.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ViewError(f"--view-bind {bind!r}: give HOST:PORT, e.g. {DEFAULT_BIND}")
    host = host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise ViewError(f"--view-bind {bind!r}: {host!r} is not an IP address (or localhost)") from None
    if not loopback and not token:
        token = secrets.token_urlsafe(18)
    return host, int(port_text), token


def create_app(
    hub: ViewHub, desk: OperatorDesk | None, token: str | None, state: Callable[[], dict[str, Any]]
) -> Any:
    """The Starlette application serving one hub.

    Parameters
    ----------
    hub : ViewHub
        What the page shows.
    desk : OperatorDesk or None
        Where control actions go (None: a journal view, read-only).
    token : str or None
        Required on every route when set.
    state : callable
        Returns the state now (published after every accepted action).
    """
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route, WebSocketRoute
    from starlette.staticfiles import StaticFiles
    from starlette.websockets import WebSocket, WebSocketDisconnect

    def allowed(params: Any, headers: Any) -> bool:
        if token is None:
            return True
        given = params.get("token") or headers.get("authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(str(given), token)

    def control(fields: dict[str, Any], source: str) -> tuple[int, dict[str, Any]]:
        if desk is None:
            return 409, {"error": "this view shows a journal: there is no running session to control"}
        fields = {**fields, "source": fields.get("source", source)}
        fields.pop("type", None)
        try:
            accepted = desk.submit(fields)
        except OperatorError as error:
            return 400, {"error": str(error)}
        hub.set_state(state())
        return 200, {"accepted": accepted.describe(), "received_unix_s": accepted.received_unix_s}

    async def page(request: Request) -> Response:
        if not allowed(request.query_params, request.headers):
            return JSONResponse({"error": "a token is required: open the URL the session printed"}, 401)
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def api_state(request: Request) -> Response:
        if not allowed(request.query_params, request.headers):
            return JSONResponse({"error": "token required"}, 401)
        return JSONResponse({"info": hub.info, "state": state(), "steps": len(hub.steps)})

    async def api_control(request: Request) -> Response:
        if not allowed(request.query_params, request.headers):
            return JSONResponse({"error": "token required"}, 401)
        try:
            fields = await request.json()
        except ValueError:
            return JSONResponse({"error": "the body must be a JSON object"}, 400)
        if not isinstance(fields, dict):
            return JSONResponse({"error": "the body must be a JSON object"}, 400)
        status, body = control(fields, "api")
        return JSONResponse(body, status)

    async def socket(websocket: WebSocket) -> None:
        if not allowed(websocket.query_params, websocket.headers):
            await websocket.close(code=4401)
            return
        await websocket.accept()
        queue = hub.subscribe(asyncio.get_running_loop())

        async def send() -> None:
            while True:
                await websocket.send_text(await queue.get())

        sender = asyncio.create_task(send())
        try:
            await websocket.send_text(hub.hello())
            while True:
                message = json.loads(await websocket.receive_text())
                if isinstance(message, dict) and message.get("type") == "control":
                    status, body = control(message, "page")
                    reply = {"type": "ack" if status == 200 else "error", **body}
                    await websocket.send_text(json.dumps(reply))
        except (WebSocketDisconnect, json.JSONDecodeError, RuntimeError):
            pass
        finally:
            sender.cancel()
            hub.unsubscribe(queue)

    return Starlette(
        routes=[
            Route("/", page),
            Route("/api/state", api_state),
            Route("/api/control", api_control, methods=["POST"]),
            WebSocketRoute("/ws", socket),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
    )


class ViewServer:
    """Serves a hub's page from a background thread (uvicorn).

    Parameters
    ----------
    hub : ViewHub
        What to show.
    state : callable
        Returns the state now.
    desk : OperatorDesk, optional
        Where control actions go (None: read-only).
    bind : str
        ``HOST:PORT``; loopback by default, port 0 takes a free one.
    token : str, optional
        Access token (generated for a non-loopback bind when None).

    Raises
    ------
    ViewError
        For a bad bind address, or (from :meth:`start`) a port that cannot be bound.

    Examples
    --------
    ::

        feed = SessionFeed(session)
        with ViewServer(feed.hub, feed.state, session.operator, "127.0.0.1:0") as server:
            print(server.url)
            session.on_step = feed.on_step
            session.run()
    """

    def __init__(
        self,
        hub: ViewHub,
        state: Callable[[], dict[str, Any]],
        desk: OperatorDesk | None = None,
        bind: str = DEFAULT_BIND,
        token: str | None = None,
    ) -> None:
        self.host, self.port, self.token = parse_bind(bind, token)
        self.hub = hub
        self._app = create_app(hub, desk, self.token, state)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The page's address (with the token, when there is one)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def start(self, timeout_s: float = 10.0) -> ViewServer:
        """Start serving; returns once the port is bound."""
        import logging

        import uvicorn

        config = uvicorn.Config(
            self._app, host=self.host, port=self.port, log_level="warning", access_log=False,
            ws="websockets-sansio", lifespan="off", ws_ping_interval=20.0,
        )  # fmt: skip
        self._server = uvicorn.Server(config)
        logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
        failed: list[BaseException] = []

        def serve() -> None:
            try:
                self._server.run()
            except BaseException as error:
                failed.append(error)

        self._thread = threading.Thread(target=serve, name="micrography-view", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if failed or not self._thread.is_alive() or time.monotonic() > deadline:
                raise ViewError(
                    f"the live view cannot listen on {self.host}:{self.port} (is the port taken?)"
                )
            time.sleep(0.02)
        if self.port == 0:
            self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        """Stop serving (pages still open keep what they show)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10.0)

    def __enter__(self) -> ViewServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

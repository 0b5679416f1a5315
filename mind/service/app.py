"""The recall service's ASGI app (Starlette) and how ``python -m mind serve`` runs it (uvicorn).

Routes (JSON in and out; every error is ``{"error": "<one line>"}`` with a 4xx, or 503 while no
model is loaded or the queue is full; a 500 means a fault of the service, never of the request):

=========================  ==================================================================
``POST /recommend``        one user (mind/service/models.py) -> ``{"items": [{"id", "title",
                           "score", "interest"}], "interests": K'_u, "dropped": unknown ids
                           dropped, "model": <model id>}``
``POST /recommend/batch``  ``{"users": [...]}`` -> ``{"results": [<as above, without model>],
                           "model": <model id>}``
``GET /healthz``           liveness: 200 while the process answers
``GET /readyz``            200 with the model's description once a model is loaded, else 503
``GET /metrics``           Prometheus text (mind/service/metrics.py)
``GET /catalogue?q=&limit=``  items whose title or id contains q (the page's picker)
``GET /``                  a page to try the service (mind/service/page.py)
``POST /admin/reload``     ``{"model": DIR, "force": false}``: hot swap (below)
=========================  ==================================================================

Retrieval is ``mind.serve.Recommender``'s (through :class:`mind.service.reload.ModelState`); the
service adds parsing, dynamic batching (:mod:`mind.service.batcher`), metrics and the hot swap.
``merge`` and ``diversity`` are passed to ``Recommender.recommend_batch`` only when a request gives
them; a Recommender without them answers such a request with a 400.

Hot swap: ``POST /admin/reload`` (or SIGHUP, which reloads the serving folder) loads the new export
beside the old one in a worker thread, serves a probe user with it, and replaces the serving state in
one assignment.  Requests admitted before the swap are answered by the model they were admitted with.
A folder that fails to load is refused with 422 and the loader's one-line reason, which names the
file; an export whose user features differ is refused with 409 unless ``"force": true``.  Either
way the old model keeps serving.  One reload runs at a time.

Admin routes answer loopback clients only (127.0.0.0/8, ::1), unless the service was started with
``admin_expose`` (``--admin-expose``), which requires a token (``--admin-token`` or the environment
variable ``MIND_SERVE_ADMIN_TOKEN``).  With a token set, every admin request, loopback or not, must
send ``Authorization: Bearer <token>`` (401 without it, 403 with a wrong one).  The client address
is the one uvicorn reports (with ``X-Forwarded-For`` trusted from 127.0.0.1 only, uvicorn's default).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..export.errors import first_line
from .batcher import Batcher, Overloaded
from .metrics import CONTENT_TYPE, Metrics
from .models import BadRequest, Limits, parse_batch, parse_json, parse_recommend
from .page import PAGE
from .reload import IncompatibleExport, ModelState, check_compatible, load_state, meta_summary

log = logging.getLogger("mind.service")
TOKEN_ENV = "MIND_SERVE_ADMIN_TOKEN"
ROUTES = {"/": "page", "/healthz": "healthz", "/readyz": "readyz", "/metrics": "metrics", "/catalogue": "catalogue",
          "/recommend": "recommend", "/recommend/batch": "recommend_batch", "/admin/reload": "admin_reload"}
# The Recommender warns once per call about unknown ids; the service reports them as "dropped" instead.
UNKNOWN_IDS_WARNING = r"dropping \d+ unknown item id"


@dataclass
class ServiceConfig:
    """Everything ``python -m mind serve`` takes (its flags, same names)."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    index: str = "export"            # reload.INDEX_CHOICES
    max_wait_ms: float = 1.0         # dynamic batching: longest wait for more requests
    max_batch: int = 64              # users per model call; 1 = no batching
    max_queue: int = 4096            # users waiting at most; more is a 503
    limits: Limits = field(default_factory=Limits)
    admin_token: Optional[str] = None
    admin_expose: bool = False
    request_timeout_s: float = 30.0

    def __post_init__(self):
        if self.admin_expose and not self.admin_token:
            raise ValueError(f"--admin-expose needs a token: --admin-token or ${TOKEN_ENV}")


def _json(payload, status: int = 200) -> JSONResponse:
    return JSONResponse(payload, status_code=status)


def _error(reason: str, status: int) -> JSONResponse:
    return _json({"error": " ".join(str(reason).split())[:500]}, status)


def _is_loopback(host: Optional[str]) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


class Service:
    """The serving state behind one app: config, the model state, the batcher, the metrics."""

    def __init__(self, config: ServiceConfig, state: Optional[ModelState] = None):
        self.config = config
        self.state: Optional[ModelState] = None
        self.metrics = Metrics()
        self.batcher = Batcher(max_wait_s=config.max_wait_ms / 1000.0, max_batch=config.max_batch,
                               max_queue=config.max_queue, on_batch=self.metrics.batch_users.observe)
        self.load_error: Optional[str] = None
        self._reload_lock: Optional[asyncio.Lock] = None
        self._tasks: set = set()       # background tasks (initial load, SIGHUP reloads), kept until done
        if state is not None:
            self._set(state)

    def _set(self, state: ModelState) -> None:
        self.state = state           # the swap: one assignment; admitted requests keep their state
        self.metrics.set_model(state)

    # --- lifecycle -------------------------------------------------------------------------------
    async def startup(self) -> None:
        warnings.filterwarnings("ignore", message=UNKNOWN_IDS_WARNING, category=UserWarning)
        self._reload_lock = asyncio.Lock()
        self.batcher.start()
        if self.state is None:                  # load in the background: /healthz answers meanwhile
            self._background(self._initial_load())
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP"):
            try:
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)
            except (NotImplementedError, RuntimeError, ValueError):
                pass

    async def shutdown(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.batcher.stop)

    async def _initial_load(self) -> None:
        try:
            state = await asyncio.get_running_loop().run_in_executor(None, load_state, self.config.model,
                                                                     self.config.index)
        except Exception as e:  # noqa: BLE001 - readyz says why
            self.load_error = first_line(e, 300)
            log.error("could not load %s: %s", self.config.model, self.load_error)
            return
        self._set(state)

    def _on_sighup(self) -> None:
        folder = str(self.state.folder) if self.state is not None else self.config.model

        async def go():
            status, payload = await self.reload(folder, force=False)
            print(f"SIGHUP reload of {folder}: {status} {json.dumps(payload)}", file=sys.stderr, flush=True)

        self._background(go())

    def _background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self, folder: str, force: bool) -> tuple[int, dict]:
        """Load ``folder`` beside the serving model and swap; (HTTP status, answer)."""
        async with self._reload_lock:
            old = self.state
            try:
                new = await asyncio.get_running_loop().run_in_executor(None, load_state, folder, self.config.index)
            except Exception as e:  # noqa: BLE001 - any failure to load is the export's: refuse it
                self.metrics.reloads.labels("refused").inc()
                return 422, {"error": f"refused {folder}: {first_line(e, 400)}; still serving "
                                      f"{old.model_id if old else 'nothing'}"}
            if not force:
                try:
                    check_compatible(old, new)
                except IncompatibleExport as e:
                    self.metrics.reloads.labels("refused").inc()
                    return 409, {"error": f"refused: {first_line(e, 400)}; still serving {old.model_id}"}
            self._set(new)
            self.metrics.reloads.labels("ok").inc()
            log.warning("reloaded: %s", meta_summary(new))
            return 200, {"model": new.model_id, "previous": old.model_id if old else None, "folder": str(new.folder)}

    # --- request helpers -------------------------------------------------------------------------
    async def body(self, request: Request) -> bytes:
        """The request body; 413 past ``max_body_bytes`` (read on, up to 16x, so the client sees the answer)."""
        limit = self.config.limits.max_body_bytes
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > 16 * limit:
                break
        if size > limit:
            raise BadRequest(f"body is larger than the limit of {limit} bytes", 413)
        return b"".join(chunks)

    def ready_state(self) -> ModelState:
        state = self.state
        if state is None:
            raise _Unavailable(f"no model loaded yet{': ' + self.load_error if self.load_error else ''}")
        return state

    @contextlib.contextmanager
    def arriving(self):
        """Count the request as arriving (the batcher waits for those) until it is queued or refused."""
        arrival = _Arrival(self.batcher)
        try:
            yield arrival
        finally:
            arrival.done()

    async def answer(self, state: ModelState, query, arrival: Optional["_Arrival"] = None) -> list[dict]:
        """Check the histories against the catalogue (the Recommender's own mapping), then batch."""
        if query.merge_kwargs and not state.supports_merge:
            raise BadRequest("merge / diversity are not supported by this service's mind.serve "
                             "(Recommender.recommend_batch takes no merge=); drop them")
        dropped = []
        for u, history in enumerate(query.histories):
            try:
                known = state.rec.map_history(history)
            except ValueError as e:
                where = f"users[{u}].history: " if query.batch else ""
                raise BadRequest(where + first_line(e, 300)) from None
            dropped.append(len(history) - len(known))
        try:
            # wait_for on the future itself, not on a coroutine: no Task per request
            future = self.batcher.put(state, query, arrival.done if arrival else None)
            results = await asyncio.wait_for(future, self.config.request_timeout_s)
        except (ValueError, TypeError) as e:   # the Recommender refused the arguments (merge, n, ...)
            raise BadRequest(first_line(e, 300)) from None
        except Overloaded as e:
            raise _Unavailable(f"overloaded: {e}") from None
        except asyncio.TimeoutError:
            raise _Unavailable(f"no answer within {self.config.request_timeout_s} s") from None
        for r, d in zip(results, dropped):
            r["dropped"] = d
        return results


class _Arrival:
    """One request counted in ``Batcher.arriving`` until ``done()`` (idempotent; event loop only)."""

    __slots__ = ("batcher", "open")

    def __init__(self, batcher: Batcher):
        self.batcher, self.open = batcher, True
        batcher.arriving += 1

    def done(self) -> None:
        if self.open:
            self.open = False
            self.batcher.arriving -= 1


class _Unavailable(Exception):
    """503: no model yet, queue full, or no answer in time."""


def create_app(config: ServiceConfig, state: Optional[ModelState] = None) -> Starlette:
    """The ASGI app for ``config``; ``state``: an already loaded model (else it loads in the background)."""
    svc = Service(config, state)

    async def page(request: Request):
        return HTMLResponse(PAGE)

    async def healthz(request: Request):
        return _json({"status": "ok"})

    async def readyz(request: Request):
        state = svc.state
        if state is None:
            return _json({"status": "loading" if svc.load_error is None else "failed",
                          "error": svc.load_error}, 503)
        return _json({"status": "ready", **state.describe(), "batching": {
            "max_wait_ms": config.max_wait_ms, "max_batch": config.max_batch}})

    async def metrics(request: Request):
        svc.metrics.queue_users.set(svc.batcher.queued_users)
        return Response(svc.metrics.render(), media_type=CONTENT_TYPE)

    async def catalogue(request: Request):
        state = svc.ready_state()
        q = request.query_params.get("q", "").strip().lower()
        try:
            limit = max(1, min(100, int(request.query_params.get("limit", "20"))))
        except ValueError:
            raise BadRequest("limit must be an integer") from None
        rec, out = state.rec, []
        for i in range(1, rec.num_items + 1):
            title = str(rec.titles[i])
            if not q or q in title.lower() or q == str(rec.raw_ids[i]).lower():
                out.append({"id": rec.raw_ids[i], "title": title, "genres": rec.genres[i]})
                if len(out) >= limit:
                    break
        return _json({"items": out, "model": state.model_id})

    async def recommend(request: Request):
        state = svc.ready_state()
        with svc.arriving() as arrival:
            body = parse_json(await svc.body(request))
            query = parse_recommend(body, state.num_items, state.feature_names, state.feature_cardinalities,
                                    config.limits)
            result = (await svc.answer(state, query, arrival))[0]
        return _json({**result, "model": state.model_id})

    async def recommend_batch(request: Request):
        state = svc.ready_state()
        with svc.arriving() as arrival:
            body = parse_json(await svc.body(request))
            query = parse_batch(body, state.num_items, state.feature_names, state.feature_cardinalities,
                                config.limits)
            results = await svc.answer(state, query, arrival)
        return _json({"results": results, "model": state.model_id})

    async def admin_reload(request: Request):
        refused = _admin_refusal(request, config)
        if refused is not None:
            return refused
        raw = await svc.body(request)
        body = parse_json(raw) if raw.strip() else {}
        if not isinstance(body, dict) or set(body) - {"model", "force"}:
            raise BadRequest("the body must be {\"model\": FOLDER, \"force\": false} (both optional)")
        folder = body.get("model") or (str(svc.state.folder) if svc.state else config.model)
        if not isinstance(folder, str) or not isinstance(body.get("force", False), bool):
            raise BadRequest("model must be a folder path (string) and force true or false")
        status, payload = await svc.reload(folder, bool(body.get("force", False)))
        return _json(payload, status)

    async def bad_request(request: Request, exc: BadRequest):
        return _error(exc.reason, exc.status)

    async def unavailable(request: Request, exc: _Unavailable):
        return _error(str(exc), 503)

    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.detail if isinstance(exc.detail, str) else str(exc.detail), exc.status_code)

    async def server_error(request: Request, exc: Exception):
        log.error("internal error on %s: %s", request.url.path, "".join(traceback.format_exception(exc)))
        return _error(f"internal error ({type(exc).__name__}); the request was not the cause", 500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await svc.startup()
        if svc.state is not None:
            print(f"mind serve: {meta_summary(svc.state)} on http://{config.host}:{config.port}", file=sys.stderr,
                  flush=True)
        yield
        await svc.shutdown()

    routes = [Route("/", page), Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics),
              Route("/catalogue", catalogue), Route("/recommend", recommend, methods=["POST"]),
              Route("/recommend/batch", recommend_batch, methods=["POST"]),
              Route("/admin/reload", admin_reload, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={BadRequest: bad_request, _Unavailable: unavailable,
                                        HTTPException: http_error, Exception: server_error})
    app.state.service = svc
    return _Observe(app, svc)


def _admin_refusal(request: Request, config: ServiceConfig) -> Optional[JSONResponse]:
    """None when the admin request may go on, else the 401 / 403 answer."""
    host = request.client.host if request.client else None
    if not _is_loopback(host) and not config.admin_expose:
        return _error(f"admin routes answer loopback clients only (this request came from {host}); "
                      f"start the service with --admin-expose and --admin-token to allow others", 403)
    if config.admin_token:
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            return _error("admin routes need 'Authorization: Bearer <token>'", 401)
        if not hmac.compare_digest(auth[7:].strip().encode(), config.admin_token.encode()):
            return _error("wrong admin token", 403)
    return None


class _Observe:
    """ASGI middleware: counts every HTTP request by route and status, and times it (metrics.py)."""

    def __init__(self, app: Starlette, svc: Service):
        self.app, self.svc = app, svc
        self.state = app.state       # create_app(...).state.service works on the wrapped app too

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def observed_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.svc.metrics.observe(ROUTES.get(scope.get("path", ""), "other"), status[0], time.perf_counter() - t0)


def uvicorn_config(app, host: str, port: int, **kwargs):
    """uvicorn's config for the service: no access log (the metrics count requests), warnings only."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
                          **kwargs)


def serve(config: ServiceConfig) -> None:
    """Load the model (a bad folder raises here, before any socket opens) and run until SIGINT/SIGTERM."""
    import uvicorn

    state = load_state(config.model, config.index)
    sock = _bind(config.host, config.port)      # a port in use is an OSError here: the CLI's error: line
    server = uvicorn.Server(uvicorn_config(create_app(config, state), config.host, config.port))
    server.run(sockets=[sock])


def _bind(host: str, port: int):
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, as asyncio's own sockets: asyncio sets TCP_NODELAY only on those, and without it
    # a keep-alive client waits out its delayed ACK (~40 ms) between the answer's header and body writes
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def start_in_thread(app, host: str = "127.0.0.1", timeout: float = 30.0):
    """Run ``app`` under uvicorn in a daemon thread on a free port of ``host``; returns (server, port).
    Stop it with ``server.should_exit = True``.  For tests and embedding; ``serve`` is the CLI's way."""
    import uvicorn

    sock = _bind(host, 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, host, port))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="mind-serve-uvicorn")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the service did not start on {host}:{port}")
        time.sleep(0.02)
    return server, port


def token_from_env() -> Optional[str]:
    """The admin token from ``$MIND_SERVE_ADMIN_TOKEN`` (empty = none)."""
    return os.environ.get(TOKEN_ENV) or None


__all__ = ["ServiceConfig", "Service", "create_app", "serve", "start_in_thread", "uvicorn_config", "token_from_env"]

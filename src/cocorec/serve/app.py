"""The scoring service: a bundle (:mod:`cocorec.serve.bundle`) behind FastAPI, run by uvicorn.

    cocorec export --run runs/din-coco-0 --to bundles/din-coco-0
    cocorec serve --bundle bundles/din-coco-0 [--host 127.0.0.1 --port 8000] [--api-key K]

Endpoints (JSON in and out; an error is ``{"detail": "<one line>"}`` with a 4xx):

* ``POST /score`` ``{"user": "196", "items": ["242", "302"]}`` -> ``{"scores": [p, ...], "unknown_items":
  [...], "user_known": true}``: one probability per item, in the order of ``items``; an item the bundle
  does not know gets ``null`` and is listed in ``unknown_items``. A user the bundle does not know (or no
  ``user``) is scored with the fallback (zero user knowledge, see the bundle module) from the optional
  ``"profile": {"gender": "F", ...}`` and ``"history": ["242", {"item": "302", "rating": 4}, ...]``
  (oldest first; a bare id counts as rating 5, a positive); ``user_known`` says which case it was;
* ``POST /recommend``: the same body plus ``"k"`` (default 10) -> ``{"items": [...], "scores": [...],
  "unknown_items": [...], "user_known": ...}``: the top k of the known candidates, best first;
* ``GET /healthz``: the bundle's method, backbone, sizes, and the profile values an unknown user may give
  per field (no API key needed);
* ``GET /metrics``: Prometheus text: requests and errors by endpoint and status, a latency histogram,
  knowledge lookups (``hit``: the user's stored knowledge; ``fallback``: an unknown user), unknown items,
  users queued for a knowledge refresh (now, and appended by kind), reloads;
* ``POST /reload``: read the bundle directory again (after ``cocorec export --overwrite`` or ``cocorec
  knowledge refresh``, which replace it by a rename) and swap it in whole; a request in flight finishes
  on the bundle it started with, a bundle that cannot be read leaves the old one serving (409).

Near-line knowledge: an unknown user (and a known one whose request carries another profile or history
than the bundle's: ``changed``) is appended, with the request's profile and history, to the queue file
``<bundle>.queue.jsonl`` (:mod:`cocorec.serve.queue`; once per user while queued; it survives the
service). ``cocorec knowledge refresh --bundle B --reload http://HOST:PORT`` computes their knowledge
with the run's LM and swaps the refreshed bundle in (:mod:`cocorec.serve.refresh`); they are known from
then on.

Checks: the API key (``X-API-Key`` header, when the service has one: 401 without it), the body size
(413), JSON (400), the types and the limits (422: at most ``max_candidates`` items, ``max_history``
history entries, ``k`` >= 1). Concurrent requests are batched: while a pass through the model runs, the
requests that arrive wait and then go through the next pass together (one worker thread, ``--threads``
torch threads; ``--model-threads K``: up to K passes at once); ``--no-batching`` scores each request on
its own in the thread pool. ``--workers N`` runs N processes on the port (:mod:`cocorec.serve.fleet`):
``/reload`` and a knowledge refresh's swap reach all of them before ``/reload`` answers, ``/metrics``
counts all of them, and the queue file is shared.

This module imports nothing heavy until an app is made: the command line builds its parser from here.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["create_app", "add_serve_args", "cmd_serve", "add_export_args", "cmd_export"]

MAX_CANDIDATES = 1000
MAX_HISTORY = 200
MAX_BODY_BYTES = 256 * 1024
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _models(max_candidates: int, max_history: int) -> tuple[type, type]:
    from pydantic import BaseModel, ConfigDict, Field

    class HistoryEntry(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        item: str
        rating: int = Field(5, ge=1, le=5)

    class ScoreBody(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        user: str | None = None
        items: list[str] = Field(min_length=1, max_length=max_candidates)
        history: list[str | HistoryEntry] | None = Field(None, max_length=max_history)
        profile: dict[str, str] | None = Field(None, max_length=64)

    class RecommendBody(ScoreBody):
        k: int = Field(10, ge=1)

    return ScoreBody, RecommendBody


def _reason(e: Any) -> str:
    """One line from a pydantic ValidationError: where and what of the first error (+ how many more)."""
    errs = e.errors(include_url=False)
    first = max(errs, key=lambda err: len(err.get("loc", ())))   # a union's deepest branch says the most
    union_tags = ("str", "HistoryEntry")
    where = ".".join(str(x) for x in first.get("loc", ()) if x not in union_tags) or "body"
    msg = first.get("msg", "invalid")
    if first.get("type") == "too_long" and where in ("items", "history"):
        msg = f"at most {first.get('ctx', {}).get('max_length')} entries"
    more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
    return " ".join(f"{where}: {msg}{more}".split())[:300]


class Batcher:
    """Concurrent requests through the model together: a request waits while a pass is running, then every
    waiting request (up to ``max_rows`` candidates) goes in the next pass, in one worker thread; with
    ``concurrency`` k, up to k passes run at once (k model threads: TorchScript runs without the GIL)."""

    def __init__(self, run_in_thread: Any, max_rows: int = 8192, concurrency: int = 1) -> None:
        self.run_in_thread, self.max_rows, self.concurrency = run_in_thread, max_rows, max(1, int(concurrency))
        self.pending: list[tuple[Any, Any, Any]] = []   # (scorer, request, future)
        self.running = 0   # passes in flight (drain tasks)
        self.passes = 0

    async def submit(self, scorer: Any, request: Any) -> Any:
        """The answer to ``request`` (made by ``scorer.request``: a pass never mixes two bundles)."""
        import asyncio

        fut = asyncio.get_running_loop().create_future()
        self.pending.append((scorer, request, fut))
        if self.running < self.concurrency:
            self.running += 1
            asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        try:
            while self.pending:
                take, rows = 0, 0
                scorer = self.pending[0][0]
                while take < len(self.pending):
                    n = len(self.pending[take][1].items)
                    if take and (rows + n > self.max_rows or self.pending[take][0] is not scorer):
                        break
                    rows += n
                    take += 1
                group, self.pending = self.pending[:take], self.pending[take:]
                try:
                    outs = await self.run_in_thread(scorer.score_requests, [r for _, r, _ in group])
                    self.passes += 1
                except Exception as e:  # noqa: BLE001 - handed to every request of the pass
                    for _, _, fut in group:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                for (_, _, fut), out in zip(group, outs):
                    if not fut.done():
                        fut.set_result(out)
        finally:
            self.running -= 1


def create_app(bundle: Any, *, api_key: str | None = None, max_candidates: int = MAX_CANDIDATES,
               max_history: int = MAX_HISTORY, max_body_bytes: int = MAX_BODY_BYTES,
               torch_threads: int | None = None, batching: bool = True, max_batch_rows: int = 8192,
               queue: str | None = None, max_queue: int = 100_000, jit: bool = True, fleet: Any = None,
               model_threads: int = 1) -> Any:
    """A FastAPI app over ``bundle`` (a :class:`~cocorec.serve.bundle.BundleScorer` or its directory).

    ``queue``: the near-line queue file (default ``<bundle>.queue.jsonl``, :mod:`cocorec.serve.queue`)
    where unknown and changed users are appended (at most ``max_queue`` users) for
    ``cocorec knowledge refresh``. ``jit``: run the backbone as a frozen TorchScript trace (the
    bundles loaded from a directory here and by ``/reload``; see :class:`~cocorec.serve.bundle.BundleScorer`).
    ``fleet``: this process is one worker of several (a :class:`~cocorec.serve.fleet.Fleet`): it follows
    the bundle the others publish, and its ``/reload`` answers once all of them serve the new one; its
    metrics go to prometheus_client's multiprocess files when ``PROMETHEUS_MULTIPROC_DIR`` is set.
    ``model_threads``: model passes that may run at once (each on its own thread, ``torch_threads`` each)."""
    import asyncio
    import contextlib
    import hmac
    from concurrent.futures import ThreadPoolExecutor

    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.core import GaugeMetricFamily
    from pydantic import ValidationError
    from starlette.concurrency import run_in_threadpool

    from cocorec.data.errors import DataError
    from cocorec.errors import one_line
    from cocorec.serve.bundle import FALLBACK, BundleScorer
    from cocorec.serve.queue import UserQueue, default_queue_path

    if torch_threads:
        import torch

        torch.set_num_threads(int(torch_threads))
    first = bundle if isinstance(bundle, BundleScorer) else BundleScorer(bundle, jit=jit)
    # swapped whole by /reload (and, in a worker of several, when another worker publishes a reload)
    live = {"scorer": first, "loaded_at": time.time(), "generation": fleet.generation if fleet else 0}
    ScoreBody, RecommendBody = _models(max_candidates, max_history)
    multiprocess = fleet is not None and bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

    reg = CollectorRegistry()
    requests = Counter("cocorec_requests", "HTTP requests by endpoint and status code", ["endpoint", "code"],
                       registry=reg)
    errors = Counter("cocorec_errors", "HTTP requests answered with a 4xx or 5xx", ["endpoint", "code"], registry=reg)
    latency = Histogram("cocorec_request_latency_seconds", "request latency (server side)", ["endpoint"],
                        buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .25, .5, 1.0, 2.5), registry=reg)
    lookups = Counter("cocorec_knowledge_lookups", "user knowledge: hit (stored) or fallback (unknown user)",
                      ["result"], registry=reg)
    lookup = {True: lookups.labels("hit"), False: lookups.labels("fallback")}   # bound once, not per request
    unknown_items = Counter("cocorec_unknown_items", "candidate items the bundle does not know", registry=reg)
    user_queue = UserQueue(queue or default_queue_path(first.path), max_queue)
    queued = Counter("cocorec_queued_users", "users appended to the refresh queue, by kind (new, changed) or "
                     "dropped (queue full)", ["kind"], registry=reg)
    reloads = Counter("cocorec_bundle_reloads", "bundle loads by /reload (per worker) by result", ["result"],
                      registry=reg)
    passes = Gauge("cocorec_model_passes", "passes through the model (concurrent requests share one)",
                   registry=reg, multiprocess_mode="sum")

    class Queued:
        """``cocorec_unknown_users``: the queue file's users, read when scraped (every worker appends to it)."""

        def collect(self) -> Any:
            user_queue.sync()
            yield GaugeMetricFamily("cocorec_unknown_users", "users queued for a knowledge refresh (unknown or "
                                    "changed)", value=len(user_queue))

    if multiprocess:   # a scrape of any worker counts every worker (their files in PROMETHEUS_MULTIPROC_DIR)
        from prometheus_client import multiprocess as mp

        scrape = CollectorRegistry()
        mp.MultiProcessCollector(scrape)
    else:
        scrape = reg
    scrape.register(Queued())
    routes = {"/score", "/recommend", "/healthz", "/metrics", "/reload"}
    children: dict[tuple[str, int], tuple[Any, Any, Any]] = {}

    def key_error(headers: Any) -> str | None:
        """Why a request's headers (ASGI: (name, value) bytes) fail the API key check; None when they pass."""
        if api_key is None:
            return None
        given = next((v for k, v in headers if k == b"x-api-key"), None)
        if given is None:
            return "missing X-API-Key header"
        return None if hmac.compare_digest(given, api_key.encode()) else "wrong API key"

    def check_key(request: Request) -> None:
        why = key_error(request.scope["headers"])
        if why:
            raise HTTPException(401, why)

    async def read(scope: Any, receive: Any, model: type) -> Any:
        """The body of a POST, checked: API key (401), size (413), JSON (400), types and limits (422)."""
        why = key_error(scope["headers"])
        if why:
            raise HTTPException(401, why)
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise HTTPException(413, f"body of {declared.decode()} bytes; at most {max_body_bytes}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":   # the client went away
                raise HTTPException(400, "the client disconnected before the body ended")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_body_bytes:
                raise HTTPException(413, f"body over {max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        try:
            return model.model_validate_json(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        except ValidationError as e:
            if any(err.get("type") == "json_invalid" for err in e.errors()):
                raise HTTPException(400, "the body is not valid JSON") from None
            raise HTTPException(422, _reason(e)) from None

    # One worker thread of our own runs the model passes: the event loop hands it a pass without
    # anyio's capacity limiter and task group around every call.
    worker = ThreadPoolExecutor(max(1, int(model_threads)), thread_name_prefix="cocorec-model")

    async def in_worker(fn: Any, *a: Any) -> Any:
        out = await asyncio.get_running_loop().run_in_executor(worker, fn, *a)
        passes.inc()
        return out

    batcher = Batcher(in_worker, max_batch_rows, model_threads) if batching else None

    async def score(req: Any) -> Any:
        hist = [(h, 5) if isinstance(h, str) else (h.item, h.rating) for h in (req.history or [])]
        scorer = live["scorer"]   # this request is answered by the bundle live when it arrived
        r = scorer.request(req.user, req.items, hist, req.profile)
        changed = r.changed
        if batcher is None:
            out = (await run_in_threadpool(scorer.score_requests, [r]))[0]
        else:
            out = await batcher.submit(scorer, r)
        lookup[bool(out.user_known)].inc()
        if out.unknown_items:
            unknown_items.inc(len(out.unknown_items))
        if req.user is not None and (not out.user_known or changed) and req.user not in user_queue.ids:
            before = user_queue.dropped
            if user_queue.add(req.user, req.profile, hist, "new" if not out.user_known else "changed"):
                queued.labels("new" if not out.user_known else "changed").inc()
            elif user_queue.dropped > before:
                queued.labels("dropped").inc()
        return out

    def encode(body: dict[str, Any]) -> bytes:
        return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()

    async def post_score(scope: Any, receive: Any) -> bytes:
        out = await score(await read(scope, receive, ScoreBody))
        return encode({"scores": out.scores, "unknown_items": out.unknown_items, "user_known": out.user_known})

    async def post_recommend(scope: Any, receive: Any) -> bytes:
        req = await read(scope, receive, RecommendBody)
        out = await score(req)
        ranked = sorted((j for j, s in enumerate(out.scores) if s is not None), key=lambda j: -out.scores[j])
        top = ranked[:req.k]
        return encode({"items": [req.items[j] for j in top], "scores": [out.scores[j] for j in top],
                       "unknown_items": out.unknown_items, "user_known": out.user_known})

    # The scoring endpoints are plain ASGI, answered in the middleware below: FastAPI's routing,
    # dependency solving, request object and exception layers took ~10% of the server's CPU under load
    # (py-spy); the other endpoints are FastAPI's.
    scoring = {"/score": post_score, "/recommend": post_recommend}

    async def respond(send: Any, status: int, body: bytes, extra: tuple = ()) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                                *extra]})
        await send({"type": "http.response.body", "body": body})

    async def scoring_endpoint(handler: Any, scope: Any, receive: Any, send: Any) -> None:
        if scope["method"] != "POST":
            await respond(send, 405, b'{"detail":"Method Not Allowed"}', ((b"allow", b"POST"),))
            return
        try:
            body, status, extra = await handler(scope, receive), 200, ()
        except HTTPException as e:
            body, status, extra = encode({"detail": e.detail}), e.status_code, ()
        except Exception as e:  # noqa: BLE001 - a bug: one line, as the app's handler of the other endpoints
            body, status = encode({"detail": f"internal error: {one_line(e, 200)}"}), 500
        await respond(send, status, body, extra)

    class Metrics:
        """ASGI middleware: counts and times every HTTP request (unknown paths are ``other``); answers
        the scoring endpoints itself."""

        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            t0, status, done = time.perf_counter(), [500], [False]
            path = scope.get("path", "")

            def record() -> None:
                if done[0]:
                    return
                done[0] = True
                ep = path if path in routes else "other"
                slot = (ep, status[0])
                counted = children.get(slot)
                if counted is None:   # the labelled series, looked up once per (endpoint, code)
                    code = str(status[0])
                    counted = children[slot] = (requests.labels(ep, code), errors.labels(ep, code)
                                                if status[0] >= 400 else None, latency.labels(ep))
                counted[0].inc()
                if counted[1] is not None:
                    counted[1].inc()
                counted[2].observe(time.perf_counter() - t0)

            async def send_status(message: Any) -> None:
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                elif message["type"] == "http.response.body" and not message.get("more_body", False):
                    record()   # before the client has the answer: a scrape after it counts this request
                await send(message)

            try:
                handler = scoring.get(path)
                if handler is not None:
                    await scoring_endpoint(handler, scope, receive, send_status)
                else:
                    await self.app(scope, receive, send_status)
            finally:
                record()

    async def load_bundle(path: Any) -> Any:
        """The bundle directory read again; a DataError after 3 tries (replaced while read, or unreadable)."""
        for attempt in range(3):   # replaced while we read it (mixed files, or gone for an instant): again
            try:
                return await run_in_threadpool(BundleScorer, path, jit)
            except DataError:
                if attempt == 2:
                    raise
                await asyncio.sleep(0.2)

    def swap(new: Any, generation: int) -> None:
        live.update(scorer=new, loaded_at=time.time(), generation=generation)
        user_queue.resync()   # a knowledge refresh consumed what it computed: those users may queue again
        reloads.labels("ok").inc()

    async def follow() -> None:
        """A worker of several: load and swap in every bundle another worker publishes (see fleet)."""
        from cocorec.serve.fleet import POLL_S

        while True:
            await asyncio.sleep(POLL_S)
            gen, _ = fleet.published()
            if gen <= live["generation"]:
                continue
            try:
                new = await load_bundle(live["scorer"].path)
            except DataError as e:
                live["generation"] = gen   # stays on the old bundle; the /reload that published says why
                reloads.labels("failed").inc()
                fleet.ack(gen, live["scorer"].id, one_line(e, 200))
                continue
            if fleet.published()[0] > gen:   # published again while we loaded: the next round loads that
                continue
            swap(new, gen)
            fleet.ack(gen, new.id)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        task = asyncio.get_running_loop().create_task(follow()) if fleet is not None else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                fleet.leave()
            worker.shutdown(wait=False)

    app = FastAPI(title="cocorec", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(Metrics)
    app.state.live, app.state.user_queue, app.state.batcher, app.state.fleet = live, user_queue, batcher, fleet
    if fleet is not None:
        fleet.ack(live["generation"], first.id)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:   # pragma: no cover - a bug
        return JSONResponse({"detail": f"internal error: {one_line(exc, 200)}"}, status_code=500)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        scorer = live["scorer"]
        c = scorer.config
        return {"status": "ok", "method": c["method"], "backbone": c["backbone"], "users": len(scorer.user_ids),
                "items": len(scorer.item_ids), "knowledge": c["knowledge"], "fallback": FALLBACK,
                "bundle_id": scorer.id, "engine": scorer.engine, "exported_at": c.get("exported_at"),
                "queued_users": len(user_queue), "queue": str(user_queue.path),
                "profile_fields": {f: sorted(v) for f, v in scorer.vocab.items()},
                "max_candidates": max_candidates, "pid": os.getpid(), "generation": live["generation"]}

    @app.post("/reload")
    async def reload(request: Request) -> dict[str, Any]:
        """Load the bundle directory again (e.g. after ``cocorec export --overwrite`` with fresh knowledge)
        and swap it in whole: a request in flight finishes on the bundle it started with. A worker of
        several answers once every worker serves the new bundle."""
        check_key(request)
        try:
            new = await load_bundle(live["scorer"].path)
        except DataError as e:
            reloads.labels("failed").inc()
            why = one_line(e, 200)
            raise HTTPException(409, f"reload refused, the old bundle stays: {why}") from None
        old_id = live["scorer"].id
        answer = {"bundle_id": new.id, "previous": old_id, "users": len(new.user_ids), "items": len(new.item_ids),
                  "workers": 1}
        if fleet is None:
            swap(new, live["generation"] + 1)
            return answer
        gen = fleet.publish(new.id)
        swap(new, gen)
        fleet.ack(gen, new.id)
        try:
            acks = await fleet.wait(gen)
        except TimeoutError as e:
            raise HTTPException(504, f"reload published, not yet served by every worker: {e}") from None
        failed = {pid: a["error"] for pid, a in acks.items() if a.get("error")}
        if failed:
            pid, why = next(iter(failed.items()))
            raise HTTPException(409, f"worker {pid} could not load the new bundle and keeps the old one "
                                     f"({len(failed)} of {len(acks)} workers): {why}")
        ids = {a["bundle_id"] for a in acks.values() if a.get("bundle_id")}
        if len(ids) > 1:
            raise HTTPException(409, f"the workers serve {len(ids)} bundles (the bundle was replaced during the "
                                     f"reload): POST /reload again")
        answer["workers"] = len(acks)
        return answer

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        check_key(request)
        return Response(generate_latest(scrape), media_type=CONTENT_TYPE_LATEST)

    return app


# ---------------------------------------------------------------------------------------------- CLI
def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle directory written by 'cocorec export'")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require this X-API-Key header on /score, /recommend, /metrics (default: $COCOREC_API_KEY)")
    p.add_argument("--max-candidates", type=int, default=MAX_CANDIDATES, help="most items a request may score")
    p.add_argument("--max-history", type=int, default=MAX_HISTORY, help="most history entries of an unknown user")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the model pass (default 1)")
    p.add_argument("--no-batching", action="store_true",
                   help="score each request on its own (default: concurrent requests share a model pass)")
    p.add_argument("--queue", default=None,
                   help="near-line queue of unknown/changed users for 'cocorec knowledge refresh' "
                        "(default: <bundle>.queue.jsonl)")
    p.add_argument("--max-queue", type=int, default=100_000, help="most users queued at once")
    p.add_argument("--model-threads", type=int, default=1,
                   help="model passes that may run at once in a process, each on its own thread (default 1)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="worker processes (default 2, 1 on a 1-CPU machine: the best p99 measured on 2 cores, "
                        "benchmarks/RESULTS.md); a /reload or a knowledge refresh reaches all of them and /metrics "
                        "counts all of them")
    p.add_argument("--no-jit", action="store_true",
                   help="run the backbone eagerly (default: a frozen TorchScript trace, checked against it at load)")


def _worker_app() -> Any:
    """The app of one worker of ``cocorec serve --workers N`` (uvicorn calls this factory in each process
    it starts): the settings come from the main process in ``$COCOREC_SERVE_WORKER`` (:mod:`cocorec.serve.fleet`)."""
    from cocorec.serve.bundle import BundleScorer
    from cocorec.serve.fleet import ENV, Fleet

    cfg = json.loads(os.environ[ENV])
    fleet = Fleet(cfg.pop("state_dir"))   # the published generation, read before the bundle is
    scorer = BundleScorer(cfg.pop("bundle"), jit=cfg["jit"])
    return create_app(scorer, fleet=fleet, **cfg)


def cmd_serve(args: argparse.Namespace) -> int:
    from cocorec.config import ConfigError

    for name in ("port", "max_candidates", "max_history", "max_body_bytes", "threads", "max_queue", "workers",
                 "model_threads"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    import uvicorn

    from cocorec.serve.bundle import BundleScorer

    key = args.api_key or os.environ.get("COCOREC_API_KEY") or None
    if args.host not in LOOPBACK and key is None:
        print(f"warning: serving on {args.host} without an API key", file=sys.stderr)
    settings = dict(api_key=key, max_candidates=args.max_candidates, max_history=args.max_history,
                    max_body_bytes=args.max_body_bytes, torch_threads=args.threads, batching=not args.no_batching,
                    queue=args.queue, max_queue=args.max_queue, jit=not args.no_jit,
                    model_threads=args.model_threads)
    # the bundle is read here first in both cases: a bad one is a one-line error before any worker starts
    scorer = BundleScorer(args.bundle, jit=not args.no_jit and args.workers == 1)
    engine = scorer.engine if args.workers == 1 else "eager" if args.no_jit else "jit"
    print(f"serving {args.bundle} ({scorer.config['backbone']} + {scorer.method}, {len(scorer.user_ids)} users, "
          f"{len(scorer.item_ids)} items, {engine}, {args.workers} worker{'s' if args.workers > 1 else ''}) on http://{args.host}:{args.port}",
          file=sys.stderr, flush=True)
    # uvicorn's own layers the service does not use: X-Forwarded-* rewriting (no client addresses read)
    common = dict(host=args.host, port=args.port, log_level="warning", access_log=False, proxy_headers=False)
    if args.workers == 1:
        uvicorn.run(create_app(scorer, **settings), **common)
        return 0
    import shutil
    import tempfile

    from cocorec.serve.fleet import ENV

    del scorer
    state = Path(tempfile.mkdtemp(prefix="cocorec-serve-"))
    (state / "metrics").mkdir()
    saved = {k: os.environ.get(k) for k in (ENV, "PROMETHEUS_MULTIPROC_DIR", "OMP_NUM_THREADS")}
    os.environ.update({ENV: json.dumps({**settings, "bundle": str(Path(args.bundle).resolve()),
                                        "state_dir": str(state)}),
                       "PROMETHEUS_MULTIPROC_DIR": str(state / "metrics"), "OMP_NUM_THREADS": str(args.threads)})
    try:
        return _supervise(args.workers, args.host, args.port)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(state, ignore_errors=True)


def _listener(host: str, port: int) -> Any:
    """The service's TCP socket bound to (host, port), not listening yet: the workers share it."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _worker_main(sock: Any, counts: Any, index: int, ready: Any) -> None:   # pragma: no cover - a spawned worker
    import uvicorn

    from cocorec.serve.fleet import Balancer

    class Server(uvicorn.Server):
        """uvicorn with no listener of its own: the worker's :class:`~cocorec.serve.fleet.Balancer` accepts
        from the shared socket and hands each connection to uvicorn's HTTP protocol."""

        balancer = Balancer(sock, counts, index)

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=[])
            if self.started:
                self.balancer.start(self.config.http_protocol_class, config=self.config,
                                    server_state=self.server_state, app_state=self.lifespan.state)

        async def shutdown(self, sockets: Any = None) -> None:
            await self.balancer.stop()
            await super().shutdown(sockets=None)

    config = uvicorn.Config("cocorec.serve.app:_worker_app", factory=True, log_level="warning",
                            access_log=False, proxy_headers=False)
    config.load()   # the bundle first: a worker takes connections only once it can score them
    ready.set()
    Server(config).run()


def _supervise(workers: int, host: str, port: int) -> int:
    """Run ``workers`` worker processes (spawned) on one port and restart one that dies. They share one
    listening socket and take its connections least-loaded first (:class:`~cocorec.serve.fleet.Balancer`):
    uvicorn's ``--workers`` lets each worker's event loop accept every connection waiting when it wakes
    (all 8 of 8 opened at once went to one worker in half the tries), a socket per worker (SO_REUSEPORT)
    leaves the split to a hash of the address (6 / 2 or worse in a third of the tries)."""
    import multiprocessing
    import signal

    from cocorec.config import ConfigError

    try:   # the port is free (or ours): a one-line error here, not N workers failing one by one
        sock = _listener(host, port)
    except OSError as e:
        raise ConfigError(f"cannot bind {host}:{port}: {e.strerror or e}") from None
    ctx = multiprocessing.get_context("spawn")
    counts = ctx.RawArray("q", [-1] * workers)   # open connections of each worker; -1: not accepting
    stop = {"signal": None}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    procs: list[Any] = []
    try:
        def start(i: int) -> Any:
            counts[i] = -1
            ready = ctx.Event()   # set by the worker once its app is up: one that dies before could not start
            p = ctx.Process(target=_worker_main, args=(sock, counts, i, ready), daemon=False)
            p.ready = ready
            p.start()
            return p

        procs = [start(i) for i in range(workers)]
        listening = False
        while stop["signal"] is None:
            time.sleep(0.2)
            if not listening and any(p.ready.is_set() for p in procs):
                sock.listen(2048)   # once a worker can score: before, a client is refused rather than kept waiting
                listening = True
            for i, p in enumerate(procs):
                if p.is_alive() or stop["signal"] is not None:
                    continue
                counts[i] = -1   # it accepts no more: the others must not wait for it
                if not p.ready.is_set():   # it could not load the bundle or bind: say so, do not loop
                    raise ConfigError(f"worker {p.pid} exited with code {p.exitcode} while starting; see its "
                                      f"error above")
                print(f"worker {p.pid} exited with code {p.exitcode}; starting another", file=sys.stderr, flush=True)
                procs[i] = start(i)
        return 0
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()   # uvicorn's graceful shutdown: requests in flight are answered
        for p in procs:
            p.join(15)
            if p.is_alive():
                p.kill()
                p.join(5)
        for s, h in old.items():
            signal.signal(s, h)
        sock.close()


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory written by 'cocorec train --output'")
    p.add_argument("--to", required=True, help="the bundle directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.add_argument("--data-dir", default=None, help="directory holding the dataset (default: the run's own)")
    p.add_argument("--dataset", default=None, help="the run's dataset, if it moved (default: from the checkpoint)")


def cmd_export(args: argparse.Namespace) -> int:
    from cocorec.serve.bundle import export_bundle

    m = export_bundle(args.run, args.to, overwrite=args.overwrite, dataset=args.dataset, data_dir=args.data_dir)
    size = sum(m["bytes"].values())
    fields = ", ".join(f"{k['name']} by {k['key']}" for k in m["knowledge"]) or "none"
    print(f"wrote {args.to}: {m['backbone']} + {m['method']}, {m['n_users']} users, {m['n_items']} items, "
          f"knowledge: {fields}; {size / 1e6:.2f} MB in {m['seconds']} s")
    return 0

"""A fake RunPod control plane on 127.0.0.1, for driving real workers and the real client.

It serves both sides of a queue endpoint, the way ``runpod`` 1.12 and ``runpod-flash`` 1.21 talk
to the real one (docs/contracts.md, "The queue" and "Driving the real client offline"):

worker side (under ``/v2/{endpoint}/``, reached through the ``RUNPOD_WEBHOOK_*`` variables that
:meth:`FakeRunPod.worker_env` returns)
    ``GET job-take/{worker}`` (one job or 204), ``GET job-take-batch/{worker}?batch_size=N`` (a
    list or 204), ``GET job-stop/{worker}`` (``{"jobsToStop": [...]}`` or 204), ``POST
    job-done/{worker}/{job}`` (the body is JSON sent with a form content type), ``POST
    job-stream/{worker}/{job}`` (each item's arrival time is recorded), ``GET ping/{worker}``.
    Takes and stop polls are long polls held up to ``hold_s``, like the platform's, so an idle
    SDK loop does not spin.

client side (under :attr:`FakeRunPod.api_base`, which is what ``RUNPOD_ENDPOINT_BASE_URL`` /
``runpod.endpoint_url_base`` must point at; the ``/v2`` prefix is optional)
    ``POST {endpoint}/run``, ``POST {endpoint}/runsync``, ``GET {endpoint}/status/{job}``,
    ``POST {endpoint}/cancel/{job}``, ``GET {endpoint}/health`` and the deployed-app route
    ``POST flash/runsync`` (the ``X-Flash-Endpoint`` header names the endpoint).

HAPI (``RUNPOD_HAPI_URL`` = :attr:`FakeRunPod.base_url`)
    ``GET /v1/pod/{worker}/logs``: ``{"container": [lines], "system": []}``, every line the
    worker's process wrote so far (fed by :meth:`add_log_line`), prefixed with an ISO-8601 time.

Every job records when it was taken and when its job-done came (:meth:`held_peak`), and
:attr:`FakeRunPod.take_faults` makes job-takes answer an error status or hang
(:attr:`FakeRunPod.done_faults`: job-done posts an error status).

Tests can also enqueue and wait without HTTP (:meth:`submit`, :meth:`wait`). Everything runs in
one background thread per request (``ThreadingHTTPServer``); state is guarded by one condition.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["FakeJob", "FakeRunPod"]

FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")


@dataclass
class FakeJob:
    """One job as the fake platform tracks it."""

    id: str
    endpoint: str
    input: Any
    status: str = "IN_QUEUE"
    output: Any = None
    error: Any = None
    worker_id: str | None = None
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    stream: list[Any] = field(default_factory=list)
    #: When each stream item's post arrived (monotonic), in order.
    stream_at: list[float] = field(default_factory=list)
    done_posts: int = 0
    #: The size in bytes of the last job-done body that came for it.
    done_bytes: int = 0
    #: The last job-done's ``stopPod`` flag and ``X-Request-ID`` header.
    stop_pod: bool = False
    request_id: str | None = None
    #: When the worker's job-take got it and when its first job-done arrived (monotonic).
    taken_at: float | None = None
    done_at: float | None = None

    def status_payload(self) -> dict[str, Any]:
        """What ``GET /status/{job}`` answers: the fields the runpod-flash client requires."""
        now = time.monotonic()
        started = self.started if self.started is not None else now
        finished = self.finished if self.finished is not None else now
        payload: dict[str, Any] = {
            "id": self.id,
            "status": self.status,
            "delayTime": int((started - self.created) * 1000),
            "executionTime": int((finished - started) * 1000) if self.started else 0,
            "workerId": self.worker_id or "",
        }
        if self.output is not None:
            payload["output"] = self.output
        if self.error:
            payload["error"] = self.error
        return payload


class FakeRunPod:
    """The fake control plane; use as a context manager or call :meth:`start` / :meth:`stop`."""

    def __init__(self, *, hold_s: float = 0.5, runsync_wait_s: float = 90.0) -> None:
        self.hold_s = hold_s
        self.runsync_wait_s = runsync_wait_s
        self.jobs: dict[str, FakeJob] = {}
        self.queues: dict[str, deque[str]] = {}
        self.stop_signals: dict[str, list[str]] = {}
        self.pings: list[dict[str, Any]] = []
        self.takes: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str]] = []
        #: worker id -> what its next job-takes answer instead of jobs, one entry per take: an
        #: HTTP status, or "hang" (held ``hang_s`` without taking a job, then answered 204).
        self.take_faults: dict[str, deque[int | str]] = {}
        self.hang_s = 30.0
        #: HTTP statuses the next job-done posts answer instead of taking the result.
        self.done_faults: deque[int] = deque()
        #: worker id -> job-take requests it has open now, and the most it ever had open at once.
        self.takes_open: dict[str, int] = {}
        self.takes_open_peak: dict[str, int] = {}
        #: worker id -> its process's output lines, each prefixed with an ISO-8601 time.
        self.logs: dict[str, list[str]] = {}
        #: X-Flash-Endpoint name -> endpoint id for ``/flash/runsync`` (default: the name itself)
        self.flash_routes: dict[str, str] = {}
        self.cond = threading.Condition()
        self._closing = False
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeRunPod:
        handler = type("_Handler", (_Handler,), {"fake": self})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="fake-runpod", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self._closing = True
            self.cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeRunPod:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the fake first"
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        """The client's ``RUNPOD_ENDPOINT_BASE_URL`` (the real default ends in ``/v2`` too)."""
        return f"{self.base_url}/v2"

    def worker_env(self, endpoint: str, worker_id: str = "worker-1") -> dict[str, str]:
        """The environment the platform gives a worker of ``endpoint``, pointed at this fake."""
        root = f"{self.base_url}/v2/{endpoint}"
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{root}/job-take/$ID?gpu=fake",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{root}/job-done/$RUNPOD_POD_ID/$ID?gpu=fake",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{root}/job-stream/$RUNPOD_POD_ID/$ID?gpu=fake",
            "RUNPOD_WEBHOOK_PING": f"{root}/ping/$RUNPOD_POD_ID",
            "RUNPOD_PING_INTERVAL": "10000",
            "RUNPOD_POD_ID": worker_id,
            "RUNPOD_AI_API_KEY": "fake-worker-key",
            "RUNPOD_ENDPOINT_ID": endpoint,
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_SKIP_GPU_CHECK": "true",
        }

    # --- direct API for tests --------------------------------------------------------------

    def submit(self, endpoint: str, job_input: Any, *, job_id: str | None = None) -> str:
        """Queue a job as ``POST /{endpoint}/run`` would; returns its id."""
        job = FakeJob(
            id=job_id or f"job-{uuid.uuid4().hex[:12]}", endpoint=endpoint, input=job_input
        )
        with self.cond:
            self.jobs[job.id] = job
            self.queues.setdefault(endpoint, deque()).append(job.id)
            self.cond.notify_all()
        return job.id

    def wait(self, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """Block until the job is final; returns its status payload. Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.jobs[job_id].status not in FINAL:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job {job_id} still {self.jobs[job_id].status}")
                self.cond.wait(left)
            return self.jobs[job_id].status_payload()

    def wait_all(self, job_ids: list[str], timeout: float = 60.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        return [self.wait(j, max(0.0, deadline - time.monotonic())) for j in job_ids]

    def wait_for(self, predicate: Any, timeout: float = 30.0) -> None:
        """Block until ``predicate(self)`` holds (checked on every state change)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("condition not reached")
                self.cond.wait(left)

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel: a queued job never runs; a running one is signalled on the stop channel."""
        with self.cond:
            job = self.jobs[job_id]
            if job.status == "IN_QUEUE":
                self.queues[job.endpoint].remove(job_id)
            elif job.status == "IN_PROGRESS" and job.worker_id:
                self.stop_signals.setdefault(job.worker_id, []).append(job_id)
                job.done_at = job.done_at or time.monotonic()  # no job-done comes for it
            if job.status not in FINAL:
                job.status = "CANCELLED"
                job.finished = time.monotonic()
            self.cond.notify_all()
            return {"id": job.id, "status": job.status}

    def held_peak(self, worker: str) -> int:
        """Most jobs ``worker`` held at once (taken, no job-done yet; a cancelled one counts)."""
        events: list[tuple[float, int]] = []
        with self.cond:
            for job in self.jobs.values():
                if job.worker_id == worker and job.taken_at is not None:
                    events.append((job.taken_at, 1))
                    if job.done_at is not None:
                        events.append((job.done_at, -1))
        held = peak = 0
        for _, step in sorted(events):  # at equal times a done (-1) sorts before a take
            held += step
            peak = max(peak, held)
        return peak

    def add_log_line(self, worker: str, line: str) -> None:
        """Record one line the worker's process wrote, timestamped now, as the platform does."""
        stamp = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        with self.cond:
            self.logs.setdefault(worker, []).append(f"{stamp.replace('+00:00', 'Z')} {line}")
            self.cond.notify_all()

    def counts(self, endpoint: str) -> dict[str, int]:
        with self.cond:
            mine = [j for j in self.jobs.values() if j.endpoint == endpoint]
        return {
            "completed": sum(j.status == "COMPLETED" for j in mine),
            "failed": sum(j.status == "FAILED" for j in mine),
            "inProgress": sum(j.status == "IN_PROGRESS" for j in mine),
            "inQueue": sum(j.status == "IN_QUEUE" for j in mine),
            "retried": 0,
        }

    # --- worker side -----------------------------------------------------------------------

    def _take(self, endpoint: str, worker: str, count: int, hold: bool = True) -> list[FakeJob]:
        deadline = time.monotonic() + self.hold_s
        with self.cond:
            queue = self.queues.setdefault(endpoint, deque())
            while not queue and not self._closing and hold:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            taken: list[FakeJob] = []
            while queue and len(taken) < count:
                job = self.jobs[queue.popleft()]
                job.status = "IN_PROGRESS"
                job.worker_id = worker
                job.started = job.taken_at = time.monotonic()
                taken.append(job)
            self.takes.append(
                {"worker": worker, "asked": count, "got": len(taken), "t": time.monotonic()}
            )
            self.cond.notify_all()
            return taken

    def inject_take_faults(self, worker: str, *faults: int | str) -> None:
        """Make ``worker``'s next job-takes answer these (see :attr:`take_faults`)."""
        with self.cond:
            self.take_faults.setdefault(worker, deque()).extend(faults)

    def _take_fault(self, worker: str) -> int | str | None:
        with self.cond:
            faults = self.take_faults.get(worker)
            fault = faults.popleft() if faults else None
            if fault is not None:
                self.takes.append(
                    {"worker": worker, "asked": 0, "got": 0, "t": time.monotonic(), "fault": fault}
                )
                self.cond.notify_all()
            return fault

    def _hang(self, worker: str) -> None:
        deadline = time.monotonic() + self.hang_s
        with self.cond:
            while not self._closing and (left := deadline - time.monotonic()) > 0:
                self.cond.wait(left)

    @contextlib.contextmanager
    def _open_take(self, worker: str) -> Iterator[None]:
        with self.cond:
            self.takes_open[worker] = self.takes_open.get(worker, 0) + 1
            peak = max(self.takes_open_peak.get(worker, 0), self.takes_open[worker])
            self.takes_open_peak[worker] = peak
        try:
            yield
        finally:
            with self.cond:
                self.takes_open[worker] -= 1

    def inject_done_faults(self, *statuses: int) -> None:
        """Make the next job-done posts answer these statuses (see :attr:`done_faults`)."""
        with self.cond:
            self.done_faults.extend(statuses)

    def _job_done(
        self,
        job_id: str,
        body: Any,
        *,
        stream: bool,
        request_id: str | None = None,
        size: int = 0,
    ) -> int:
        """Record a job-done post (``size``: its body's bytes); the status it answers."""
        with self.cond:
            job = self.jobs.get(job_id)
            if job is None:
                return 200
            job.done_posts += 1
            job.done_bytes = size
            if self.done_faults:
                return self.done_faults.popleft()
            job.request_id = request_id
            if job.done_at is None:
                job.done_at = time.monotonic()
            if job.status in FINAL:  # cancelled meanwhile: the platform keeps CANCELLED
                self.cond.notify_all()
                return 200
            body = body if isinstance(body, dict) else {"output": body}
            job.output = body.get("output", job.stream if stream else None)
            job.error = body.get("error")
            job.stop_pod = bool(body.get("stopPod"))
            job.status = "FAILED" if job.error else "COMPLETED"
            job.finished = time.monotonic()
            self.cond.notify_all()
            return 200

    def _stream(self, job_id: str, body: Any) -> None:
        with self.cond:
            job = self.jobs.get(job_id)
            if job is not None and isinstance(body, dict):
                job.stream.append(body.get("output"))
                job.stream_at.append(time.monotonic())
            self.cond.notify_all()

    def _stop_poll(self, worker: str) -> list[str]:
        deadline = time.monotonic() + self.hold_s
        with self.cond:
            while not self.stop_signals.get(worker) and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            return self.stop_signals.pop(worker, [])

    # --- client side -----------------------------------------------------------------------

    def _runsync(self, endpoint: str, job_input: Any) -> dict[str, Any]:
        job_id = self.submit(endpoint, job_input)
        try:
            return self.wait(job_id, self.runsync_wait_s)
        except TimeoutError:
            with self.cond:
                return {"id": job_id, "status": self.jobs[job_id].status}

    def _health(self, endpoint: str) -> dict[str, Any]:
        recent = time.monotonic() - 30
        with self.cond:
            workers = {t["worker"] for t in self.takes if t["t"] > recent}
            busy = {j.worker_id for j in self.jobs.values() if j.status == "IN_PROGRESS"}
        return {
            "jobs": self.counts(endpoint),
            "workers": {
                "idle": len(workers - busy),
                "initializing": 0,
                "ready": len(workers),
                "running": len(busy & workers),
                "throttled": 0,
                "unhealthy": 0,
            },
        }


class _Handler(BaseHTTPRequestHandler):
    fake: FakeRunPod
    protocol_version = "HTTP/1.1"
    # Headers and body go out as separate writes; with Nagle's algorithm the body waits for the
    # client's delayed ACK (~40 ms on Linux) on every answer, which no real platform adds.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    # --- plumbing --------------------------------------------------------------------------

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", "replace")

    def _send(self, status: int, payload: Any = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [p for p in url.path.split("/") if p]
        if parts and parts[0] == "v2":
            parts = parts[1:]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        fake = self.fake
        with fake.cond:
            fake.requests.append((method, url.path))
        if (
            method == "GET"
            and len(parts) == 4
            and parts[:2] == ["v1", "pod"]
            and parts[3] == "logs"
        ):
            with fake.cond:  # HAPI: GET /v1/pod/{worker}/logs
                lines = list(fake.logs.get(parts[2], []))
            self._send(200, {"container": lines, "system": []})
            return
        body = self._body() if method == "POST" else None
        try:
            self._dispatch(method, parts, query, body)
        except (KeyError, ValueError) as exc:
            self._send(404, {"error": f"not found: {exc}"})

    def _dispatch(self, method: str, parts: list[str], query: dict[str, str], body: Any) -> None:
        fake = self.fake
        if len(parts) < 2:
            self._send(404, {"error": "unknown route"})
            return
        endpoint, action = parts[0], parts[1]
        rest = parts[2:]
        if method == "GET" and action in ("job-take", "job-take-batch") and rest:
            with fake._open_take(rest[0]):
                status, payload = self._job_take(action, endpoint, rest[0], query)
            # Sent once the take no longer counts as open: the worker may ask again at once.
            self._send(status, payload)
        elif method == "GET" and action == "job-stop" and rest:
            ids = fake._stop_poll(rest[0])
            if ids:
                self._send(200, {"jobsToStop": ids})
            else:
                self._send(204)
        elif method == "POST" and action == "job-done" and len(rest) >= 2:
            status = fake._job_done(
                rest[1],
                body,
                stream=query.get("isStream") == "true",
                request_id=self.headers.get("X-Request-ID"),
                size=int(self.headers.get("Content-Length") or 0),
            )
            self._send(status, {} if status < 400 else {"error": f"injected {status}"})
        elif method == "POST" and action == "job-stream" and len(rest) >= 2:
            fake._stream(rest[1], body)
            self._send(200, {})
        elif method == "GET" and action == "ping" and rest:
            with fake.cond:
                fake.pings.append({"worker": rest[0], **query})
            self._send(200, {})
        elif endpoint == "flash" and action == "runsync" and method == "POST":
            name = self.headers.get("X-Flash-Endpoint") or ""
            target = fake.flash_routes.get(name, name)
            if not target:
                self._send(404, {"error": "X-Flash-Endpoint header missing"})
                return
            self._send(200, fake._runsync(target, (body or {}).get("input")))
        elif method == "POST" and action == "run":
            job_input = (body or {}).get("input") if isinstance(body, dict) else None
            if job_input is None:
                self._send(400, {"error": "body needs an input"})
                return
            job_id = fake.submit(endpoint, job_input)
            self._send(200, {"id": job_id, "status": "IN_QUEUE"})
        elif method == "POST" and action == "runsync":
            self._send(200, fake._runsync(endpoint, (body or {}).get("input")))
        elif method == "GET" and action in ("status", "stream") and rest:
            with fake.cond:
                job = fake.jobs[rest[0]]
                payload = job.status_payload()
                if action == "stream":
                    payload["stream"] = [{"output": o} for o in job.stream]
            self._send(200, payload)
        elif method == "POST" and action == "cancel" and rest:
            self._send(200, fake.cancel(rest[0]))
        elif method == "GET" and action == "health":
            self._send(200, fake._health(endpoint))
        else:
            self._send(404, {"error": f"unknown route {method} {'/'.join(parts)}"})

    def _job_take(
        self, action: str, endpoint: str, worker: str, query: dict[str, str]
    ) -> tuple[int, Any]:
        """The answer to one job-take: (status, body or None)."""
        fake = self.fake
        fault = fake._take_fault(worker)
        if fault == "hang":
            fake._hang(worker)
            return 204, None
        if isinstance(fault, int):
            return fault, {"error": f"injected {fault}"}
        count = int(query.get("batch_size", "1")) if action == "job-take-batch" else 1
        jobs = fake._take(endpoint, worker, max(1, count))
        if not jobs:
            return 204, None
        if action == "job-take":
            return 200, {"id": jobs[0].id, "input": jobs[0].input}
        return 200, [{"id": j.id, "input": j.input} for j in jobs]

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

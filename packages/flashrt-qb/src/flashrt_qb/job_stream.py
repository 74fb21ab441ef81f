"""A streaming job: each item to the platform as it comes, then job-done, as the SDK does it.

The runpod SDK streams a generator handler's job (``rp_job.handle_job`` with
``rp_http.stream_result``): each item is POSTed to the stream URL
(``RUNPOD_WEBHOOK_POST_STREAM``, ``isStream=false``) as ``{"output": item}`` as soon as it is
produced, in order, with the job's ``X-Request-ID``; when the generator ends, job-done gets
``isStream=true`` and ``{"output": [every item]}`` with ``return_aggregate_stream`` (``[]``
without), so ``/runsync`` and ``/status`` see the whole stream; when it raised, job-done gets
``{"error": ...}`` instead, and the items already streamed stay streamed.

Our handler is not a generator (a deployed function's generator runs where user code runs), so
:func:`flashrt_qb.job_result.finish_job` makes a :class:`JobStream` per job and puts it in
:data:`current_stream`; the worker hands its :meth:`JobStream.item` to the runtime, which calls
it on the job loop as each item arrives, and marks the job streamed (:meth:`JobStream.end`).
An item is posted while the generator makes the next one (a poster task per job, in order). An
item, or the aggregate, over the platform's limit ends the job failed, naming the size.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
from collections import deque
from typing import TYPE_CHECKING, Any

from runpod.serverless.modules.rp_logger import RunPodLogger

if TYPE_CHECKING:
    from runpod.http_client import ClientSession

__all__ = ["JobStream", "current_stream"]

log = RunPodLogger()

#: The job stream of the job the current task answers (set by ``finish_job``).
current_stream: contextvars.ContextVar[JobStream | None] = contextvars.ContextVar(
    "flashrt_qb_job_stream", default=None
)

#: How ``json.dumps`` wraps an item: ``{"output": `` ... ``}``.
_HEAD = b'{"output": '
_TAIL = b"}"
#: Seconds before each retry of a post that failed (three attempts in all, as the SDK's).
RETRY_WAITS_S = (1.0, 2.0)


class JobStream:
    """One job's stream to the platform; its methods run on the job loop."""

    def __init__(
        self,
        session: ClientSession,
        stream_url: str,
        job: dict[str, Any],
        *,
        aggregate: bool,
        limit: int,
        waits: tuple[float, ...] = RETRY_WAITS_S,
    ) -> None:
        self.session = session
        self.job = job
        self.url = stream_url.replace("$ID", job["id"]) + "&isStream=false"
        self.aggregate = aggregate
        self.limit = limit
        self.waits = waits
        #: Items handed over, and those kept for the aggregate (their JSON).
        self.count = 0
        self.items: list[bytes] = []
        self._pending: deque[bytes] = deque()
        self._wake = asyncio.Event()
        #: Made at the first item: most jobs never stream, and cost nothing more here.
        self._poster: asyncio.Task[None] | None = None
        #: Set by :meth:`end`: the job streamed, and why it ended early (or ``None``).
        self.ended = False
        self.error: str | None = None

    @property
    def max_item_bytes(self) -> int:
        """The largest item's JSON whose post stays within the platform's limit."""
        return self.limit - len(_HEAD) - len(_TAIL)

    def item(self, data: bytes) -> None:
        """An item's JSON, as it arrives: posted next, in order."""
        self.count += 1
        if self.aggregate:
            self.items.append(data)
        self._pending.append(_HEAD + data + _TAIL)
        if self._poster is None:
            self._poster = asyncio.get_running_loop().create_task(self._post_items())
        else:
            self._wake.set()

    def end(self, error: str | None) -> None:
        """The job streamed (possibly nothing), and ended with ``error`` or cleanly."""
        self.ended = True
        self.error = error

    async def _post_items(self) -> None:
        while True:
            while self._pending:
                await self._post(self.url, self._pending.popleft(), "stream item")
            if self.ended:
                return
            self._wake.clear()
            await self._wake.wait()

    async def finish(self, done_url: str, *, stop_pod: bool = False) -> None:
        """Post the last items, then job-done (``isStream=true``) with the aggregate or the
        error."""
        self.ended = True
        if self._poster is not None:
            self._wake.set()
            try:
                await self._poster
            except Exception as exc:  # job-done still goes: the job must end
                log.error(f"Posting stream items failed. | {exc!r}", self.job["id"])
        output = b"[" + b", ".join(self.items) + b"]"
        body = _done_body(output, self.error, stop_pod)
        if self.error is None and len(body) > self.limit:
            error = (
                f"the stream's {self.count} items together are {len(body) / 1e6:.1f} MB "
                f"({len(body)} bytes) as the job's result, over the platform's limit of "
                f"{self.limit / 1e6:g} MB ({self.limit} bytes): each item was streamed, but "
                "/runsync and /status cannot carry them all; yield URLs to stored data, or "
                "write large data to the network volume"
            )
            body = _done_body(b"", error, stop_pod)
        url = done_url.replace("$ID", self.job["id"]) + "&isStream=true"
        await self._post(url, body, "job-done")

    def close(self) -> None:
        """The job is over (finished, or stopped): no item is posted any more."""
        if self._poster is not None and not self._poster.done():
            self._poster.cancel()

    async def _post(self, url: str, body: bytes, what: str) -> bool:
        """POST ``body``, retrying a connection error or a 5xx; whether it landed."""
        from .job_result import post_retrying  # job_result finishes a job through this class

        return await post_retrying(self.session, url, body, self.job["id"], self.waits, what)


def _done_body(output: bytes, error: str | None, stop_pod: bool) -> bytes:
    """job-done's JSON, as ``json.dumps`` writes the SDK's result: the aggregate (items' JSON
    spliced in as they are), or the error."""
    if error is None:
        parts = [b'"output": ' + output]
    else:
        parts = [b'"error": ' + json.dumps(error, ensure_ascii=False).encode()]
    if stop_pod:
        parts.append(b'"stopPod": true')
    return b"{" + b", ".join(parts) + b"}"

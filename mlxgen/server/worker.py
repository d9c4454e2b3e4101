"""The one thread that runs MLX. MLX is not thread-safe, and on a machine with one GPU (or a
few CPU cores) two generations at once would only share it: jobs run one at a time, in arrival
order whatever their model (fair FIFO), while the event loop stays free to accept requests,
stream tokens and notice disconnects. A job's `cancel` event stops it between tokens."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any, Callable

from ..errors import MlxgenError

log = logging.getLogger("mlxgen")

END = object()  # the last item a job puts on its queue


class Job:
    """A unit of work for the worker; `fn(job)` runs on the worker thread and reports through
    `job.put(item)`, which the event loop reads with `await job.get()`."""

    def __init__(self, fn: Callable[["Job"], None], loop: asyncio.AbstractEventLoop):
        self.fn, self.loop = fn, loop
        self.cancel = threading.Event()
        self._items: asyncio.Queue = asyncio.Queue()

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self._items.put_nowait, item)

    async def get(self) -> Any:
        return await self._items.get()


class Worker:
    def __init__(self, idle: Callable[[], None] | None = None, tick_s: float = 1.0):
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._idle, self._tick_s = idle, tick_s
        self._thread = threading.Thread(target=self._run, name="mlxgen-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        self._jobs.put(job)
        return job

    def pending(self) -> int:
        return self._jobs.qsize()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self._tick_s)
            except queue.Empty:
                job = False
            if job is None:
                return
            if job:
                try:
                    if not job.cancel.is_set():  # its client left while it waited
                        job.fn(job)
                except BaseException as e:  # noqa: BLE001 - reported to the request, worker lives on
                    if not isinstance(e, MlxgenError):
                        log.exception("server job failed")
                    job.put(e)
                finally:
                    job.put(END)
            if self._idle is not None:
                try:
                    self._idle()  # keep_alive expiry
                except Exception:  # noqa: BLE001
                    log.exception("idle task failed")

"""Dynamic batching: requests that arrive together share one model call.

Each request is a job of some items. One worker takes the first waiting job,
then, while more requests are on their way, keeps taking jobs for at most
``window_s`` (or until ``max_items`` items), runs them as one batch on the model
thread and hands each caller its own slice of the answer. A model is faster per
item in a batch (``bench/oracles.py`` measures by how much), and the model thread
is the only one that ever runs it.

When a combined call fails, each job is run again on its own, so one bad
request does not fail the requests it happened to share a batch with.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

Job = TypeVar("Job")
Answer = TypeVar("Answer")


class Overloaded(RuntimeError):
    """More requests are waiting than the service queues."""


class DynamicBatcher(Generic[Job, Answer]):
    """Batches jobs for ``run``: a list of jobs in, one answer per job out, in order.

    ``size(job)`` is its number of items; a batch holds at most ``max_items`` items (a
    job is never split). ``executor`` is the model thread: give every batcher of one
    model the same single-thread executor. ``observe(items, jobs, retried_alone)`` is
    called after each model call. ``arriving()``, when given, counts the requests the
    service is receiving or answering (those in this batch included): a batch waits for
    company only while that exceeds its own requests, so a lone caller never waits. ``start`` (from the event loop) and ``stop`` run the
    worker; ``submit`` is what request handlers await.
    """

    def __init__(self, run: Callable[[Sequence[Job]], list[Answer]], size: Callable[[Job], int], executor: ThreadPoolExecutor,
                 max_items: int, window_s: float, max_waiting: int,
                 observe: Callable[[int, int, int], None] | None = None, arriving: Callable[[], int] | None = None) -> None:
        self.run, self.size, self.executor, self.observe, self.arriving = run, size, executor, observe, arriving
        self.max_items, self.window_s = max_items, window_s
        self.queue: asyncio.Queue[tuple[Job, asyncio.Future[Answer]]] = asyncio.Queue(maxsize=max_waiting)
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    async def submit(self, job: Job) -> Answer:
        """The job's answer once its batch has run; ``Overloaded`` at once when the queue is full."""
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((job, future))
        except asyncio.QueueFull:
            raise Overloaded(f"{self.queue.maxsize} requests are already waiting for the model") from None
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        held: tuple[Job, asyncio.Future[Answer]] | None = None  # taken, but did not fit the last batch
        while True:
            first = held or await self.queue.get()
            held = None
            batch, items = [first], self.size(first[0])
            deadline = loop.time() + self.window_s
            while items < self.max_items:
                if not self.queue.empty():
                    waiting = self.queue.get_nowait()
                elif self.arriving is not None and self.arriving() <= len(batch):
                    break  # nobody else is on the way: waiting would only add latency
                else:
                    try:
                        waiting = await asyncio.wait_for(self.queue.get(), deadline - loop.time())
                    except TimeoutError:
                        break
                if items + self.size(waiting[0]) > self.max_items:
                    held = waiting
                    break
                batch.append(waiting)
                items += self.size(waiting[0])
            await self._answer(batch, items)

    async def _answer(self, batch: list[tuple[Job, asyncio.Future[Answer]]], items: int) -> None:
        jobs = [job for job, _ in batch]
        try:
            answers: list[Answer | BaseException] = list(await self._run(jobs))
            retried = 0
        except Exception as exc:  # noqa: BLE001 - handed to the caller(s)
            # With several jobs, find the one that failed by running each alone: the others still get answers.
            answers = [exc] if len(jobs) == 1 else [await self._alone(job) for job in jobs]
            retried = len(jobs) if len(jobs) > 1 else 0
        if self.observe is not None:
            self.observe(items, len(jobs), retried)
        for (_, future), answer in zip(batch, answers):
            if future.done():  # the caller went away
                continue
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result(answer)

    async def _run(self, jobs: list[Job]) -> list[Answer]:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.run, jobs)

    async def _alone(self, job: Job) -> Answer | BaseException:
        try:
            return (await self._run([job]))[0]
        except Exception as exc:  # noqa: BLE001
            return exc

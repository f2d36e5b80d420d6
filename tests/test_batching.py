"""Dynamic batching (pure asyncio logic): shared model calls, own answers, limits, failures."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fedhlm_app.oracle.batching import DynamicBatcher, Overloaded


class Model:
    """Doubles every number; records each call's jobs; fails on a job holding -1; takes ``seconds`` per call."""

    def __init__(self, seconds=0.0):
        self.calls, self.seconds, self.threads = [], seconds, set()

    def __call__(self, jobs):
        self.calls.append([list(j) for j in jobs])
        self.threads.add(threading.get_ident())
        if any(-1 in j for j in jobs):
            raise ValueError("bad item")
        time.sleep(self.seconds)
        return [[2 * x for x in j] for j in jobs]


def _run(model, jobs, *, max_items=100, window_s=0.05, max_waiting=100, stagger_s=0.0):
    """Submit ``jobs`` concurrently (``stagger_s`` apart); each job's answer or exception, and what was observed."""
    observed = []

    async def main():
        batcher = DynamicBatcher(model, len, ThreadPoolExecutor(1), max_items, window_s, max_waiting,
                                 observe=lambda *a: observed.append(a))
        batcher.start()

        async def submit(i, job):
            await asyncio.sleep(i * stagger_s)
            return await batcher.submit(job)

        answers = await asyncio.gather(*(submit(i, j) for i, j in enumerate(jobs)), return_exceptions=True)
        await batcher.stop()
        return answers

    return asyncio.run(main()), observed


def test_requests_that_arrive_together_share_one_call_and_get_their_own_answers():
    model = Model()
    answers, observed = _run(model, [[1], [2, 3], [4, 5, 6]])
    assert answers == [[2], [4, 6], [8, 10, 12]]
    assert model.calls == [[[1], [2, 3], [4, 5, 6]]] and observed == [(6, 3, 0)]


def test_a_batch_holds_at_most_max_items_and_never_splits_a_request():
    model = Model()
    answers, _ = _run(model, [[1, 2], [3, 4], [5, 6], [7]], max_items=5)
    assert answers == [[2, 4], [6, 8], [10, 12], [14]]
    assert [sum(len(j) for j in call) for call in model.calls] == [4, 3]
    oversized, _ = _run(Model(), [[1] * 7], max_items=5)  # larger than a batch: runs alone, whole
    assert oversized == [[2] * 7]


def test_requests_arriving_while_the_model_runs_form_the_next_batch():
    model = Model(seconds=0.2)
    answers, _ = _run(model, [[i] for i in range(6)], window_s=0.0, stagger_s=0.05)
    assert answers == [[2 * i] for i in range(6)]
    assert len(model.calls) < 6 and len(model.threads) == 1  # batched, and always on the one model thread


def test_one_bad_request_fails_alone_not_the_requests_it_shared_a_call_with():
    model = Model()
    answers, observed = _run(model, [[1], [-1, 2], [3]])
    assert answers[0] == [2] and answers[2] == [6]
    assert isinstance(answers[1], ValueError)
    assert observed == [(4, 3, 3)]  # the shared call failed; each request was then run on its own


def test_a_full_queue_refuses_at_once():
    answers, _ = _run(Model(seconds=0.3), [[1], [2], [3], [4]], max_waiting=1, window_s=0.0, stagger_s=0.01)
    assert answers[0] == [2] and any(isinstance(a, Overloaded) for a in answers)


def test_no_window_adds_no_wait_for_a_lone_request():
    started = time.perf_counter()
    answers, _ = _run(Model(), [[1]], window_s=0.0)
    assert answers == [[2]] and time.perf_counter() - started < 0.5


@pytest.mark.parametrize("window_s", [0.0, 0.2])
def test_the_window_is_how_long_a_batch_waits_for_company(window_s):
    model = Model()
    _run(model, [[1], [2]], window_s=window_s, stagger_s=0.1)
    assert len(model.calls) == (2 if window_s == 0 else 1)


def test_a_batch_waits_for_company_only_while_more_requests_are_on_their_way():
    def run(arriving, jobs, stagger_s):
        model = Model()

        async def main():
            batcher = DynamicBatcher(model, len, ThreadPoolExecutor(1), 100, 5.0, 100, arriving=arriving)
            batcher.start()

            async def submit(i, job):
                await asyncio.sleep(i * stagger_s)
                return await batcher.submit(job)

            started = time.perf_counter()
            await asyncio.gather(*(submit(i, j) for i, j in enumerate(jobs)))
            await batcher.stop()
            return time.perf_counter() - started

        return asyncio.run(main()), model.calls

    lone_s, calls = run(lambda: 1, [[1]], 0.0)  # the service is receiving nothing else
    assert lone_s < 2.5 and calls == [[[1]]]  # answered without waiting out the 5 s window
    together_s, calls = run(lambda: 2, [[1], [2]], 0.3)  # a second request is on its way
    assert calls == [[[1], [2]]] and together_s < 2.5  # waited for it, and not a moment longer

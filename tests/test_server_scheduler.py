"""The scheduler's hand-off of events to the event loops (``_Outbox``): a step's events reach each job's
queue in order, with one wake-up of each loop, and a closed loop's jobs are cancelled."""

from __future__ import annotations

import asyncio
import threading

from pipx_llama.engine import SamplerConfig
from pipx_llama.server.scheduler import Done, Job, Text, _Outbox


def _job(name: str) -> Job:
    return Job(name, "chat", None, [1, 2], 4, SamplerConfig())


def test_a_flush_delivers_each_jobs_events_in_order_with_one_wakeup_per_loop() -> None:
    async def run() -> tuple[dict[str, list], int]:
        loop = asyncio.get_running_loop()
        a, b = _job("a"), _job("b")
        a.bind()
        b.bind()
        wakeups = 0
        real = loop.call_soon_threadsafe

        def counting(*args):
            nonlocal wakeups
            wakeups += 1
            return real(*args)

        loop.call_soon_threadsafe = counting
        box = _Outbox()

        def engine() -> None:  # the scheduler's thread: one step's events, then the job's end
            for i in range(3):
                box.put(a, Text(f"a{i}"))
                box.put(b, Text(f"b{i}"))
            box.put(a, Done(None))
            box.flush()
            box.put(b, Done(None))
            box.flush()
            box.flush()  # nothing held: no wake-up

        t = threading.Thread(target=engine)
        t.start()
        got = {}
        for job in (a, b):
            got[job.id] = [ev.text if isinstance(ev, Text) else "done" async for ev in job.events()]
        t.join()
        return got, wakeups

    got, wakeups = asyncio.run(run())
    assert got == {"a": ["a0", "a1", "a2", "done"], "b": ["b0", "b1", "b2", "done"]}
    assert wakeups == 2


def test_a_closed_loop_cancels_its_jobs() -> None:
    loop = asyncio.new_event_loop()
    job = _job("gone")
    job._loop, job._events = loop, None
    loop.close()
    box = _Outbox()
    box.put(job, Text("x"))
    box.flush()
    assert job.cancelled

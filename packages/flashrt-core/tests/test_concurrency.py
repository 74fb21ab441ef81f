"""Many requests at once: output stays with its request, sync code never blocks the loop."""

from __future__ import annotations

import asyncio
import random
import re
import sys
import time

SYNC_WORK = """
def work(i):
    import logging, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    tag = f"<id:{i}>"
    print("print", tag)
    sys.stderr.write(f"stderr {tag}\\n")
    logging.getLogger("user.sync").warning("log %s", tag)
    def in_thread():
        time.sleep(0.005)
        print("thread", tag)
        logging.getLogger("user.thread").warning("thread log %s", tag)
    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    with ThreadPoolExecutor(2) as pool:
        pool.submit(print, "own pool", tag).result()
    time.sleep(0.01)
    print("end", tag)
    return i
"""

ASYNC_WORK = """
async def work(i):
    import asyncio, logging, threading
    tag = f"<id:{i}>"
    print("print", tag)
    await asyncio.sleep(0.005)
    logging.getLogger("user.async").warning("log %s", tag)
    await asyncio.to_thread(print, "to_thread", tag)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, print, "default executor", tag)
    async def sub():
        await asyncio.sleep(0.005)
        print("subtask", tag)
    await asyncio.create_task(sub())
    done = asyncio.Event()
    def in_thread():
        print("thread", tag)
        loop.call_soon_threadsafe(done.set)
    threading.Thread(target=in_thread).start()
    await done.wait()
    print("end", tag)
    return i
"""

SYNC_LINES = 7  # print, stderr, log, thread, thread log, own pool, end
ASYNC_LINES = 7  # print, log, to_thread, default executor, subtask, thread, end


def test_fifty_concurrent_requests_each_get_only_their_own_output(worker, wire):
    out, err = sys.stdout, sys.stderr
    kinds = ["sync", "async"] * 25
    random.Random(7).shuffle(kinds)

    async def scenario():
        requests = [
            wire.function(SYNC_WORK if kind == "sync" else ASYNC_WORK, "work", i)
            for i, kind in enumerate(kinds)
        ]
        return await asyncio.gather(*(worker.rt.execute(r) for r in requests))

    responses = worker.run(scenario())
    assert len(responses) == 50
    for i, (kind, response) in enumerate(zip(kinds, responses)):
        assert wire.dec(response) == i
        ids = re.findall(r"<id:(\d+)>", response.stdout)
        assert ids and set(ids) == {str(i)}, (i, response.stdout)
        lines = response.stdout.splitlines()
        assert all(f"<id:{i}>" in line for line in lines), response.stdout
        expected = SYNC_LINES if kind == "sync" else ASYNC_LINES
        assert len(lines) == expected, response.stdout
    assert sys.stdout is out
    assert sys.stderr is err


def test_sync_sleep_does_not_delay_a_concurrent_async_request(worker, wire):
    sleeper = wire.function(
        "def nap():\n    import time\n    time.sleep(2.0)\n    return 'rested'\n", "nap"
    )
    quick = wire.function("async def quick():\n    return 'quick'\n", "quick")

    async def scenario():
        slow = asyncio.ensure_future(worker.rt.execute(sleeper))
        await asyncio.sleep(0.1)  # the sleeper is now inside time.sleep, in a worker thread
        started = time.perf_counter()
        fast = await worker.rt.execute(quick)
        elapsed = time.perf_counter() - started
        sleeping_still = not slow.done()
        return fast, elapsed, sleeping_still, await slow

    fast, elapsed, sleeping_still, slow = worker.run(scenario())
    assert wire.dec(fast) == "quick"
    assert sleeping_still
    assert elapsed < 0.1, f"the async request took {elapsed * 1000:.0f} ms next to a sync sleep"
    assert wire.dec(slow) == "rested"


def test_many_sync_requests_run_in_parallel_threads(make_worker, wire):
    worker = make_worker(max_threads=16)
    request = wire.function(
        "def nap(i):\n    import threading, time\n    time.sleep(0.2)\n"
        "    return threading.current_thread().name\n",
        "nap",
        0,
    )

    async def scenario():
        return await asyncio.gather(*(worker.rt.execute(request) for _ in range(16)))

    names = {wire.dec(r) for r in worker.run(scenario())}
    # Sixteen overlapping sleeps: sixteen distinct threads, none of them an event loop's. In an
    # executor process one of them may be its main thread (free when the first one came).
    assert len(names) == 16
    assert all(name.startswith("flashrt") or name == "MainThread" for name in names)
    assert "flashrt-executor-loop" not in names


def test_concurrent_failures_and_successes_do_not_mix(worker, wire):
    code = (
        "def f(i):\n"
        "    print(f'<id:{i}>')\n"
        "    if i % 2:\n"
        "        raise ValueError(f'<id:{i}> failed')\n"
        "    return i\n"
    )

    async def scenario():
        return await asyncio.gather(
            *(worker.rt.execute(wire.function(code, "f", i)) for i in range(20))
        )

    for i, response in enumerate(worker.run(scenario())):
        assert response.success is (i % 2 == 0)
        assert response.stdout == f"<id:{i}>\n"
        if not response.success:
            assert response.error.startswith(f"<id:{i}> failed")

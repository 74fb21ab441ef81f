"""A small flash project built by the deployed-mode tests: a function, a class resource, and
two generator functions (sync and async) whose items stream."""

from runpod_flash import Endpoint


@Endpoint(name="sync_worker", cpu="cpu3c-1-2")
def add(a: int, b: int, scale: int = 1) -> int:
    print(f"adding {a} + {b}")
    return (a + b) * scale


@Endpoint(name="calc_worker", cpu="cpu3c-1-2")
class Counter:
    def __init__(self, start: int = 0) -> None:
        self.calls = start

    def bump(self, by: int = 1) -> dict:
        self.calls += by
        return {"calls": self.calls}

    def peek(self) -> dict:
        return {"calls": self.calls}


@Endpoint(name="stream_worker", cpu="cpu3c-1-2")
def stream_items(
    n: int = 3,
    pause: float = 0.5,
    fail_at: int = -1,
    die_at: int = -1,
    big_at: int = -1,
    pad: int = 0,
    stamp: bool = False,
):
    """A token stream: n items pause s apart. Instead of item fail_at it raises, instead of
    item die_at its process dies; item big_at is 21 MB (over the platform's 20 MB limit for one
    item), every item carries pad bytes of padding, and with stamp says when it was yielded
    (time.monotonic: one clock for every process of the machine)."""
    import os
    import time

    for i in range(n):
        if i:
            time.sleep(pause)
        if i == fail_at:
            raise RuntimeError(f"failed after {i} items")
        if i == die_at:
            os._exit(3)
        item: dict = {"i": i}
        if stamp:
            item["t"] = time.monotonic()
        if pad or i == big_at:
            item["pad"] = "x" * (21_000_000 if i == big_at else pad)
        yield item


@Endpoint(name="astream_worker", cpu="cpu3c-1-2")
async def astream_items(n: int = 3, pause: float = 0.5):
    """The same stream from an async generator."""
    import asyncio

    for i in range(n):
        if i:
            await asyncio.sleep(pause)
        yield {"i": i}

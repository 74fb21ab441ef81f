"""Resources with ``max_concurrency=4`` for the concurrency tests: an async and a plain function,
and a class with one of each."""

import asyncio
import time

from runpod_flash import Endpoint


@Endpoint(name="nap_async", cpu="cpu3c-1-2", max_concurrency=4)
async def nap_async(seconds: float = 1.0) -> dict:
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@Endpoint(name="nap_sync", cpu="cpu3c-1-2", max_concurrency=4)
def nap_sync(seconds: float = 1.0) -> dict:
    time.sleep(seconds)
    return {"slept": seconds}


@Endpoint(name="nap_class", cpu="cpu3c-1-2", max_concurrency=4)
class Cot:
    """Its async method makes flash build await every method, ``doze`` included."""

    async def nap(self, seconds: float = 1.0) -> dict:
        await asyncio.sleep(seconds)
        return {"napped": seconds}

    def doze(self, seconds: float = 1.0) -> dict:
        time.sleep(seconds)
        return {"dozed": seconds}

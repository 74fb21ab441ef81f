"""A queue and a load-balanced resource whose module imports a package no index has.

``flashrt_no_such_pkg_xyz`` exists only where the tests build this app (a private module of the
build machine): no worker can install it, so their start-up fails naming it.
"""

import flashrt_no_such_pkg_xyz
from runpod_flash import Endpoint


@Endpoint(name="broken_qb", cpu="cpu3c-1-2")
def private(text: str) -> dict:
    return {"text": text, "private": flashrt_no_such_pkg_xyz.__name__}


api = Endpoint(name="broken_lb", cpu="cpu3c-1-2", workers=(1, 3))


@api.get("/private")
async def private_route() -> dict:
    return {"private": flashrt_no_such_pkg_xyz.__name__}

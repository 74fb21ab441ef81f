"""A queue and a load-balanced resource whose module imports a package the worker's image lacks.

``termcolor`` is importable where the tests build this app and left out of the artifact (it is
in no requirements): the worker installs it at start-up.
"""

import termcolor
from runpod_flash import Endpoint


@Endpoint(name="needs_pkg", cpu="cpu3c-1-2")
def shout(text: str) -> dict:
    return {"text": termcolor.colored(text, "red"), "from": termcolor.__file__}


api = Endpoint(name="needs_pkg_lb", cpu="cpu3c-1-2", workers=(1, 3))


@api.post("/shout")
async def shout_route(text: str) -> dict:
    return {"text": termcolor.colored(text, "red"), "from": termcolor.__file__}

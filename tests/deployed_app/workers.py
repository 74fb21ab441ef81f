"""A small flash project built by the deployed-mode tests: a function and a class resource."""

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

"""The user code behind fixtures 01-07, decorated the way a runpod-flash user writes it.

The real client sends each function's source (from the ``def`` line), its cloudpickled arguments
and, for ``uses_local_module``, ``helper_mod.py`` from this directory. Nothing here runs locally:
every call goes through the client to a worker.
"""

from runpod_flash import CpuLiveServerless, remote

# One resource per fixture, as the captures were made; tests give them all one endpoint id.
sync_ep = CpuLiveServerless(name="ep-sync")
async_ep = CpuLiveServerless(name="ep-async")
numpy_ep = CpuLiveServerless(name="ep-numpy")
modules_ep = CpuLiveServerless(name="ep-modules")
class_ep = CpuLiveServerless(name="ep-class")
fail_ep = CpuLiveServerless(name="ep-fail")

# The bodies below must stay byte-identical to the captured function_code: no reformatting.
# fmt: off


@remote(resource_config=sync_ep, _internal=True)
def add(a, b, scale=1):
    print(f"adding {a} + {b}")
    return (a + b) * scale


@remote(resource_config=async_ep, _internal=True)
async def greet(name: str) -> dict:
    import asyncio
    await asyncio.sleep(0)
    return {"greeting": f"hello {name}"}


@remote(
    resource_config=numpy_ep,
    dependencies=["numpy"],
    system_dependencies=["libgl1"],
    _internal=True,
)
def np_sum(xs):
    import numpy as np
    return float(np.asarray(xs).sum())


@remote(resource_config=modules_ep, _internal=True)
def uses_local_module(x):
    from helper_mod import scale
    return scale(x, factor=3)


@remote(resource_config=class_ep, dependencies=["numpy"], _internal=True)
class Calculator:
    def __init__(self, base, *, offset=0):
        self.base = base
        self.offset = offset
        self.calls = 0

    def compute(self, x, mult=1):
        self.calls += 1
        return {"value": (self.base + x) * mult + self.offset, "calls": self.calls}

    async def acompute(self, x):
        return self.base - x


@remote(resource_config=fail_ep, _internal=True)
def boom(x):
    print("about to fail")
    raise ValueError(f"bad value {x}")

# fmt: on


REMOTES = (add, greet, np_sum, uses_local_module, Calculator, boom)

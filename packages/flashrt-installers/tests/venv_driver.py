"""Run requests through a Runtime inside a throwaway venv (the interpreter that runs this file).

Usage: ``python venv_driver.py SCENARIO.json``; the scenario is ``{"rounds": [[body, ...], ...]}``
and optionally ``"settings"`` (core settings by name; in-process by default).
The bodies of one round run concurrently, rounds one after the other, all in one Runtime loaded
the way a worker loads it (entry points). Prints one JSON document: per response its fields, the
decoded result, and the installer counters right after its round.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from typing import Any


async def main(scenario: dict[str, Any]) -> list[list[dict[str, Any]]]:
    import cloudpickle
    from flashrt_core import Runtime, Settings, load_settings
    from flashrt_installers import proc, python

    # In one interpreter: the scenario reads the installer's own counters back.
    runtime = Runtime(
        load_settings(Settings, **(scenario.get("settings") or {"isolation": "none"}))
    )
    await runtime.start()
    rounds = []
    for bodies in scenario["rounds"]:
        responses = await asyncio.gather(*(runtime.execute(b) for b in bodies))
        plugin = runtime.pm.get_plugin("python-installer")
        installer = plugin.installer if isinstance(plugin, python.PythonInstallerPlugin) else None
        out = []
        for r in responses:
            value = r.json_result
            if r.result is not None:
                value = cloudpickle.loads(base64.b64decode(r.result))
            out.append(
                {
                    "success": r.success,
                    "value": value,
                    "error": r.error,
                    "stdout": r.stdout,
                    "python_installs": installer.installs if installer else 0,
                    "processes_started": proc.STATS.started,
                }
            )
        rounds.append(out)
    await runtime.shutdown()
    return rounds


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        scenario = json.load(fh)
    print(json.dumps(asyncio.run(main(scenario))))

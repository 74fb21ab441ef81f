"""The executor process: where user code runs, supervised by :mod:`flashrt_core.supervisor`.

``python -m flashrt_core.executor`` with the channel socket as its stdin. Its main thread runs
sync user code (so ``signal.signal`` works there); its event loop, in a thread of its own, reads
the channel and runs each request through the in-process pipeline.
"""

"""An ordered parallel map over Ray tasks: ``Context.map`` under ``executor: ray``.

A global stage's fit hands it independent calls (the candidate pairs of one LSH band, the
line counts of one bucket) as ``ctx.map(fn, items)``. Here each item is one Ray task and
the results come back in the order of the items, at most ``ahead`` of them in flight. The
callable is put in the object store once, with what it carries (a ``functools.partial``
over the signature or key matrix): every task reads that one copy (numpy arrays without a
copy, from shared memory on its node) and only the item travels with each task.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from functools import cache
from typing import Any

__all__ = ["RayMap"]


def _call(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)


@cache
def _remote_call() -> Any:
    import ray

    return ray.remote(num_cpus=1)(_call)


class RayMap:
    """``map(fn, items)`` with each call a Ray task, in order; ``ahead``: calls in flight at most."""

    def __init__(self, ahead: int) -> None:
        self.ahead = max(1, ahead)
        self.calls = 0  # calls run as Ray tasks, for tests and reports

    def __call__(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        import ray

        remote = _remote_call()
        fn_ref = ray.put(fn)
        running: deque[Any] = deque()
        for item in items:
            running.append(remote.remote(fn_ref, item))
            self.calls += 1
            if len(running) >= self.ahead:
                yield ray.get(running.popleft())
        while running:
            yield ray.get(running.popleft())

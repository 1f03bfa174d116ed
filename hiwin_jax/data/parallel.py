"""Tasks over the cores of this host: the data build and the metadata pass.

`run_tasks(fn, state, tasks)` yields `fn(state, task)` per task, in order, from spawned
processes (never forked: the training process may already run jax's threads), each of which
receives `state` (source, tokenizer, settings) once. With one worker or one task everything
runs in the calling thread.

Host-side code: no jax import.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from typing import Any, Callable, Iterator, Sequence

_WORKER: tuple = ()


def cores() -> int:
  """CPU cores this process may run on."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _init(fn: Callable, state: Any) -> None:
  global _WORKER
  _WORKER = (fn, state)


def _call(task: Any) -> Any:
  fn, state = _WORKER
  return fn(state, task)


def run_tasks(fn: Callable[[Any, Any], Any], state: Any, tasks: Sequence[Any], *,
              workers: int) -> Iterator[Any]:
  """Yields `fn(state, task)` for each task in order, computed by up to `workers` processes (0:
  one per core). `fn` (a module-level function) and `state` must be picklable."""
  workers = min(workers or cores(), len(tasks))
  if workers <= 1:
    for task in tasks:
      yield fn(state, task)
    return
  with concurrent.futures.ProcessPoolExecutor(
      max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init,
      initargs=(fn, state)) as pool:
    yield from pool.map(_call, tasks)

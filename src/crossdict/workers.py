"""Independent tasks in worker processes, with numpy/BLAS threads split between them.

`run_tasks(fn, tasks, workers)` calls `fn(*task)` for every task and returns the results in task
order. With workers <= 1 it runs them here, one after the other; otherwise in a pool of fresh
("spawn") interpreters: a forked child would inherit the parent's OpenBLAS / OpenMP thread pools
and their locks, which is not safe once torch or numpy have run. Each worker gets
cores // workers BLAS threads through the environment (read when numpy loads in the worker;
without threadpoolctl there is no portable way to change them afterwards).

What a worker logs goes to the parent's logger of the same name (so handlers and pytest's
caplog see it); `slot()` is the worker's number (1..workers) for a progress bar's `position`,
and workers share one tqdm write lock so their bars do not overwrite each other. Ctrl-C belongs
to the parent: workers ignore SIGINT (no traceback per worker); the parent stops them and
re-raises KeyboardInterrupt, as it does any error a task raised.

Nothing here imports the rest of crossdict (`evaluate` imports it).
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import multiprocessing as mp
import os
import signal
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from typing import Any, Callable, Iterator, Sequence

from tqdm.auto import tqdm

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
"""Environment variables numpy's BLAS, torch and OpenMP read for their thread count at load."""

_SLOT: int | None = None


def slot() -> int | None:
    """This worker's number, 1..workers (a tqdm `position` below the parent's bar); None outside a pool."""
    return _SLOT


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def thread_env(threads: int) -> Iterator[None]:
    """Set THREAD_VARS to `threads` for processes started inside the block; restored afterwards."""
    old = {k: os.environ.get(k) for k in THREAD_VARS}
    os.environ.update({k: str(threads) for k in THREAD_VARS})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _ToLoggers(logging.Handler):
    """Hands a worker's record to this process's logger of the same name (and so to its handlers)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(record.name).handle(record)


def _init_worker(lock: Any, slots: Any, logq: Any, level: int) -> None:
    global _SLOT
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool
    tqdm.set_lock(lock)
    with slots.get_lock():
        slots.value += 1
        _SLOT = slots.value
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(logq)]
    root.setLevel(level)


def _stop(pool: ProcessPoolExecutor, futures: Sequence[Future]) -> None:
    """Cancel what has not started and terminate the workers, so the stage ends now rather than
    after the running tasks (ProcessPoolExecutor gains a public call for it only in Python 3.14)."""
    for f in futures:
        f.cancel()
    terminate = getattr(pool, "terminate_workers", None)
    if terminate is not None:
        terminate()
        return
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.terminate()


def run_tasks(fn: Callable[..., Any], tasks: Sequence[tuple], workers: int = 1,
              done: Callable[[int, Any], None] | None = None, order: Sequence[int] | None = None) -> list[Any]:  # fmt: skip
    """`[fn(*task) for task in tasks]`, in `workers` processes when workers > 1.

    fn must be a module-level function and tasks and results picklable. `order`: the order tasks are
    handed out (longest first balances the pool); `done(i, result)` is called in this process as
    task i finishes. The first task error stops the pool and is raised here.
    """
    order = list(range(len(tasks))) if order is None else list(order)
    results: list[Any] = [None] * len(tasks)
    if workers <= 1 or len(tasks) <= 1:
        for i in order:
            results[i] = fn(*tasks[i])
            if done is not None:
                done(i, results[i])
        return results
    ctx = mp.get_context("spawn")
    lock, slots, logq = ctx.RLock(), ctx.Value("i", 0), ctx.Queue()
    listener = logging.handlers.QueueListener(logq, _ToLoggers())
    level = logging.getLogger("crossdict").getEffectiveLevel()
    parent_lock = tqdm.get_lock()
    tqdm.set_lock(lock)
    listener.start()
    futures: dict[Future, int] = {}
    try:
        with thread_env(max(1, cores() // workers)):  # workers are started (spawned) inside this block
            pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx, initializer=_init_worker,
                                       initargs=(lock, slots, logq, level))  # fmt: skip
            try:
                futures = {pool.submit(fn, *tasks[i]): i for i in order}
                for f in as_completed(futures):
                    results[futures[f]] = f.result()
                    if done is not None:
                        done(futures[f], results[futures[f]])
            except BaseException:
                _stop(pool, list(futures))
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        listener.stop()
        tqdm.set_lock(parent_lock)
    return results

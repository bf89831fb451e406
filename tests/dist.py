"""Real gloo process groups for tests: a pool of rank processes that lives for the test session.

Spawning ranks per test costs seconds of imports each; the pool starts a world of `ws` processes
once, initialises a gloo group, and runs test functions on every rank. A function must be
importable by reference (module-level in a test module) and return something picklable; the
per-rank results come back as a list. An exception on any rank fails the test with that rank's
traceback. A gloo timeout turns a rank stuck in a mismatched collective into an error, after
which the pool is restarted.
"""

from __future__ import annotations

import os
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

from autoshard.distributed.mesh import free_port

TASK_TIMEOUT_S = float(os.environ.get("AUTOSHARD_TEST_TIMEOUT", "300"))


def _worker(rank: int, world_size: int, port: int, tasks, results, gloo_timeout_s: float = 120.0) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=gloo_timeout_s))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - report every failure to the parent
            results.put((rank, False, traceback.format_exc()))
    dist.barrier()
    dist.destroy_process_group()


class RankPool:
    """`world_size` gloo ranks that run submitted functions together. `gloo_timeout_s`: how long a
    rank left alone in a collective by a crashed peer waits before it gives up."""

    def __init__(self, world_size: int, gloo_timeout_s: float = 120.0):
        self.world_size, self.gloo_timeout_s = world_size, gloo_timeout_s
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(target=_worker, args=(r, self.world_size, port, self._tasks[r], self._results, self.gloo_timeout_s), daemon=True)
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn, *args, **kwargs) -> list:
        for q in self._tasks:
            q.put((fn, args, kwargs))
        out: dict[int, object] = {}
        errors = []
        import queue

        try:
            for _ in range(self.world_size):
                rank, ok, value = self._results.get(timeout=TASK_TIMEOUT_S)
                (out.__setitem__(rank, value) if ok else errors.append(f"rank {rank}:\n{value}"))
        except queue.Empty:
            self.restart()
            raise TimeoutError(f"ranks did not finish {fn.__name__} in {TASK_TIMEOUT_S}s") from None
        if errors:
            # A failure may leave peers mid-collective with different state; start clean.
            self.restart()
            raise AssertionError("\n".join(errors))
        return [out[r] for r in range(self.world_size)]

    def restart(self) -> None:
        self.close(graceful=False)
        self._start()

    def close(self, graceful: bool = True) -> None:
        if graceful:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=30)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        # gloo teardown occasionally aborts after a clean finish (TORCH213.md); exit codes are
        # deliberately ignored here: every task's result already came back through the queue.

"""The CPU kernels' persistent worker pool (kernels/cpu/pool.h): a forked child never waits on the
parent's workers, and kernels on several MLX streams at once (one job at a time in the pool, the
other inline) give the same results as one at a time."""

import os
import threading
import time

import mlx.core as mx
import pytest
from build_tools import needs_cpu_kernel_tools

pytestmark = needs_cpu_kernel_tools


def _wait(pid: int, timeout_s: float) -> int | None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_runs_its_own_pool(ext):
    # The parent's pool is busy on another thread (its locks may be held) at every fork.
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            ext.read_bandwidth(1 << 15, 2, 1)

    ext.read_bandwidth(1 << 15, 2, 1)  # the pool's workers exist before the first fork
    worker = threading.Thread(target=busy)
    worker.start()
    try:
        for _ in range(4):
            pid = os.fork()
            if pid == 0:  # child: only the extension's own code, never MLX (its threads are gone too)
                ok = all(ext.read_bandwidth(1 << 15, 2, 1) > 0 for _ in range(20))
                os._exit(0 if ok else 1)
            assert _wait(pid, 30) == 0, "the forked child hung or failed in the worker pool"
    finally:
        stop.set()
        worker.join()


def test_kernels_on_two_streams_at_once(ext):
    k, n = 896, 4864  # large enough to be split over the pool
    w = mx.random.normal((n, k), key=mx.random.key(3))
    q, s, b = mx.quantize(w, group_size=32, bits=5)
    xs = [mx.random.normal((1, k), key=mx.random.key(i)) for i in range(8)]
    want = [ext.qmatvec(x, q, s, b, 5, 32, 2) for x in xs]
    mx.eval(want)
    streams = [mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)]
    for _ in range(3):
        got = []
        for i, x in enumerate(xs):
            with mx.stream(streams[i % 2]):
                got.append(ext.qmatvec(x, q, s, b, 5, 32, 2))
        mx.eval(got)  # both streams' threads run their kernels concurrently
        assert all(mx.array_equal(g, w_) for g, w_ in zip(got, want))

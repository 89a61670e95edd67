"""Decode workers for prep that survive a crashing or hanging decoder.

Each worker process holds one item at a time (no chunks), so the parent always knows which item a worker
is on. A worker that dies (a segfault in a codec library, the OOM killer) or runs past `timeout` seconds on
one item is replaced; that item alone is rejected with "decoder crashed (...)" or "decoder timed out
(...)" and the rest goes on. (concurrent.futures' BrokenProcessPool fails every pending future without
saying which item broke the pool, and a future's timeout runs from the wait, not from the item's start.)

    pool = DecodePool(workers=4, timeout=300)
    pool.submit(key, job)            # any number, any order; the caller bounds how far ahead it submits
    pieces, reason = pool.get(key)   # blocks until that item is done
    pool.close()

A background thread hands items to idle workers, receives results as soon as they are ready and replaces
dead or stuck workers. workers=0 decodes in the calling process, at get() (no protection there).
Test hooks: UNIMOE_PREP_FAULT_CRASH / UNIMOE_PREP_FAULT_HANG = a file name; a worker that gets that file
kills itself with SIGSEGV / sleeps forever.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from multiprocessing.connection import wait

from data_prep.audio import DecodeJob, load_job

CRASH_ENV = "UNIMOE_PREP_FAULT_CRASH"
HANG_ENV = "UNIMOE_PREP_FAULT_HANG"


def _inject_fault(job: DecodeJob) -> None:
    name = os.path.basename(job.path)
    if name == os.environ.get(CRASH_ENV):
        faulthandler.disable()  # a real crash, without pytest's traceback dump of this worker
        os.kill(os.getpid(), signal.SIGSEGV)
    if name == os.environ.get(HANG_ENV):
        while True:
            time.sleep(60)


def _worker_main(conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which ends the workers
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        key, job = msg
        _inject_fault(job)
        conn.send((key, load_job(job)))


def _signal_name(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class _Worker:
    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.key = None  # the item it holds
        self.since = 0.0

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except (OSError, ValueError):  # the worker is gone already
                pass
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


class DecodePool:
    def __init__(self, workers: int, timeout: float = 300.0, ctx=None):
        # fork (as torch's DataLoader does on Linux): cheap start and restart; workers run only numpy,
        # soundfile and soxr code (data_prep.audio). spawn where fork does not exist.
        self.ctx = ctx or mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.timeout = timeout
        self.queue: deque = deque()  # (key, job) not handed out yet
        self.done: dict = {}  # key -> (pieces, reason), until get() takes it
        self.restarts = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._closed = False
        self.workers = [_Worker(self.ctx) for _ in range(workers)]
        self._wake_r, self._wake_w = self.ctx.Pipe(duplex=False)
        self._thread = None
        if workers:
            # results are received as soon as they are ready, so a worker never waits with a finished item
            # while the caller runs the codec
            self._thread = threading.Thread(target=self._run, name="decode-pool", daemon=True)
            self._thread.start()

    def submit(self, key, job: DecodeJob) -> None:
        with self._cond:
            self.queue.append((key, job))
        if self._thread is not None:
            self._wake_w.send_bytes(b"1")

    def get(self, key) -> tuple:
        """(pieces or None, reason or None) of the item submitted under `key`."""
        if self._thread is None:
            for i, (k, job) in enumerate(self.queue):
                if k == key:
                    del self.queue[i]
                    return load_job(job)
            raise KeyError(f"decode pool: {key!r} was never submitted")
        with self._cond:
            self._cond.wait_for(lambda: key in self.done or self._error is not None)
            if key not in self.done:
                raise RuntimeError(f"decode pool failed: {self._error!r}") from self._error
            return self.done.pop(key)

    def _run(self) -> None:
        try:
            while not self._closed:
                with self._cond:
                    self._dispatch()
                    busy = [w for w in self.workers if w.key is not None]
                timeout = None
                if busy:
                    timeout = max(0.0, min(w.since for w in busy) + self.timeout - time.monotonic())
                waits = [self._wake_r] + [w.conn for w in busy] + [w.proc.sentinel for w in busy]
                ready = wait(waits, timeout)
                if self._wake_r in ready:
                    while self._wake_r.poll():
                        self._wake_r.recv_bytes()
                with self._cond:
                    for i, w in enumerate(self.workers):
                        if w.key is None:
                            continue
                        if w.conn in ready or w.proc.sentinel in ready:
                            self._collect(i)
                        elif time.monotonic() - w.since > self.timeout:
                            self._replace(i, f"decoder timed out (no result after {self.timeout:g} s; "
                                          "worker killed)", kill=True)
                    self._cond.notify_all()
        except BaseException as e:  # handed to get(), raised in the caller
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def _dispatch(self) -> None:
        for i, w in enumerate(self.workers):
            if w.key is None and self.queue:
                if not w.proc.is_alive():  # died between items: replace it, no item is lost
                    w.stop(kill=True)
                    w = self.workers[i] = _Worker(self.ctx)
                    self.restarts += 1
                key, job = self.queue.popleft()
                w.key, w.since = key, time.monotonic()
                w.conn.send((key, job))

    def _collect(self, i: int) -> None:
        w = self.workers[i]
        try:
            if w.conn.poll():
                key, result = w.conn.recv()
                self.done[key] = result
                w.key = None
                return
        except (EOFError, OSError):
            pass
        w.proc.join(timeout=5)
        self._replace(i, f"decoder crashed (worker {_signal_name(w.proc.exitcode)})")

    def _replace(self, i: int, reason: str, kill: bool = False) -> None:
        w = self.workers[i]
        self.done[w.key] = (None, reason)
        w.key = None
        w.stop(kill=kill)
        self.workers[i] = _Worker(self.ctx)
        self.restarts += 1

    def close(self) -> None:
        self._closed = True
        if self._thread is not None:
            self._wake_w.send_bytes(b"1")
            self._thread.join(timeout=10)
        for w in self.workers:
            w.stop(kill=w.key is not None)
        self.workers = []
        self._wake_r.close()
        self._wake_w.close()

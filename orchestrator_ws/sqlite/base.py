"""Django's SQLite backend, with a write lock that goes to a waiting writer within milliseconds.

Worker threads of several daphne processes commit steps to one SQLite file, each step in a
``BEGIN IMMEDIATE`` transaction, so they queue for SQLite's single write lock. SQLite's own busy
handler makes a waiting writer sleep 1, 2, 5, 10 ... up to 100 ms between tries: while it sleeps,
writers that came later take the lock again and again. In the benchmark's bursts one worker
would wait 100-530 ms for a lock that was free most of that time (docs/benchmarks.md), and its
steps were the burst's last.

Here ``BEGIN`` of an IMMEDIATE (or EXCLUSIVE) transaction is tried without SQLite's busy handler
and tried again after a pause that starts at a tenth of a millisecond and doubles up to two,
until the database's ``timeout`` has passed; then it fails as SQLite would ("database is
locked"). Inside the transaction the handler stays off, which is safe: the transaction holds the
write lock already, and in WAL mode nothing it does waits for another connection. Commit and
rollback turn the handler back on for the statements outside transactions, which keep SQLite's
usual wait, except writes: one outside a transaction (a conditional ``UPDATE`` of the engine's,
its own transaction in autocommit) is tried the same way. Other transaction modes take no lock
at ``BEGIN`` and are left as Django runs them.

Threads of one process do not all try: they queue on a lock of the process's own (one per
database file), and only the thread at its head asks SQLite. With hundreds of workers (the
setting allows 256) every one of them retrying every two milliseconds kept the interpreter busy
for the writer that held the lock, and which retry won was luck: writers waited up to 11 s and
requests starting processes timed out (docs/benchmarks.md); a worker's lone ``UPDATE``, left
to SQLite's handler, gave up after the 30 s timeout, and its process stalled. Asleep on the
process's lock waiting writers cost nothing, and they take SQLite's lock in the order they
asked for it.
"""

from __future__ import annotations

import collections
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from django.db.backends.sqlite3 import base

FIRST_PAUSE_SECONDS = 0.0001
LONGEST_PAUSE_SECONDS = 0.002
_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLAC")


class _WriterQueue:
    """A lock taken in the order it was asked for: released, it goes to the longest waiter."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._waiters: collections.deque[threading.Lock] = collections.deque()
        self._held = False

    def acquire(self, timeout: float) -> bool:
        with self._mutex:
            if not self._held:
                self._held = True
                return True
            turn = threading.Lock()
            turn.acquire()
            self._waiters.append(turn)
        if turn.acquire(timeout=max(0.0, timeout)):
            return True
        with self._mutex:
            if turn in self._waiters:
                self._waiters.remove(turn)
                return False
        return True  # handed over just as the wait timed out

    def release(self) -> None:
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().release()  # still held: by the next in line
            else:
                self._held = False


_queues: dict[str, _WriterQueue] = {}
_queues_lock = threading.Lock()


def _writer_queue(name: str) -> _WriterQueue:
    with _queues_lock:
        return _queues.setdefault(name, _WriterQueue())


class DatabaseWrapper(base.DatabaseWrapper):
    # The process's queue of writers to this file while this connection is at its head.
    _writer_queue: _WriterQueue | None = None

    def get_connection_params(self) -> dict:
        params = super().get_connection_params()
        # Django's default is sqlite3's own: 5 s.
        self.busy_timeout = float(params.get("timeout", 5.0))
        return params

    @property
    def _begin_takes_lock(self) -> bool:
        return self.transaction_mode in ("IMMEDIATE", "EXCLUSIVE")

    def _start_transaction_under_autocommit(self) -> None:
        if not self._begin_takes_lock:
            super()._start_transaction_under_autocommit()
            return
        try:
            self._at_our_turn(lambda: self.connection.execute(f"BEGIN {self.transaction_mode}"))
        except BaseException:
            self._end_transaction()
            raise

    def create_cursor(self, name=None):
        return self.connection.cursor(factory=lambda connection: _CursorWrapper(connection, self))

    def write_alone(self, sql: str, run: Callable[[], Any]) -> Any:
        """``run`` a statement; a write outside a transaction (its own, in autocommit) waits
        for this process's turn and SQLite's lock as a ``BEGIN`` does."""
        lone_write = sql.lstrip()[:6].upper() in _WRITES and not self.connection.in_transaction
        if not (lone_write and self._begin_takes_lock):
            return run()
        try:
            return self._at_our_turn(run)
        finally:
            self._end_transaction()

    def _at_our_turn(self, attempt: Callable[[], Any]) -> Any:
        """Wait behind this process's earlier writers, then ``attempt`` until SQLite's lock is
        free; raises "database is locked" once the timeout has passed."""
        deadline = time.monotonic() + self.busy_timeout
        with self.wrap_database_errors:  # what fails is raised as Django's OperationalError
            queue = _writer_queue(str(self.settings_dict["NAME"]))
            if not queue.acquire(timeout=deadline - time.monotonic()):
                raise sqlite3.OperationalError("database is locked")
            self._writer_queue = queue
            self.connection.execute("PRAGMA busy_timeout = 0")
            pause = FIRST_PAUSE_SECONDS
            while True:
                try:
                    return attempt()
                except sqlite3.OperationalError as exc:
                    # The primary code: a lone write can also meet SQLITE_BUSY_SNAPSHOT.
                    if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                        raise
                time.sleep(pause)
                pause = min(2 * pause, LONGEST_PAUSE_SECONDS)

    def _commit(self) -> None:
        try:
            super()._commit()
        finally:
            self._end_transaction()

    def _rollback(self) -> None:
        try:
            super()._rollback()
        finally:
            self._end_transaction()

    def _close(self) -> None:
        # Closing inside a transaction (Django does when a rollback fails) ends it too.
        try:
            super()._close()
        finally:
            self._leave_writer_queue()

    def _end_transaction(self) -> None:
        """Statements outside transactions wait with SQLite's handler again; the process's next
        writer may ask for the lock. Safe to call when no transaction was started."""
        try:
            if self.connection is not None and self._begin_takes_lock:
                self.connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        finally:
            self._leave_writer_queue()

    def _leave_writer_queue(self) -> None:
        queue, self._writer_queue = self._writer_queue, None
        if queue is not None:
            queue.release()


class _CursorWrapper(base.SQLiteCursorWrapper):
    def __init__(self, connection: sqlite3.Connection, database: DatabaseWrapper) -> None:
        super().__init__(connection)
        self._database = database

    def execute(self, query, params=None):
        return self._database.write_alone(query, lambda: super(_CursorWrapper, self).execute(query, params))

    def executemany(self, query, param_list):
        return self._database.write_alone(
            query, lambda: super(_CursorWrapper, self).executemany(query, param_list)
        )

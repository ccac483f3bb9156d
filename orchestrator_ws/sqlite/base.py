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
usual wait. Other transaction modes take no lock at ``BEGIN`` and are left as Django runs them.
"""

from __future__ import annotations

import sqlite3
import time

from django.db.backends.sqlite3 import base

FIRST_PAUSE_SECONDS = 0.0001
LONGEST_PAUSE_SECONDS = 0.002


class DatabaseWrapper(base.DatabaseWrapper):
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
        self.connection.execute("PRAGMA busy_timeout = 0")
        try:
            with self.wrap_database_errors:  # what fails is raised as Django's OperationalError
                self._begin_without_busy_handler()
        except BaseException:
            self._restore_busy_handler()
            raise

    def _begin_without_busy_handler(self) -> None:
        deadline = time.monotonic() + self.busy_timeout
        pause = FIRST_PAUSE_SECONDS
        while True:
            try:
                self.connection.execute(f"BEGIN {self.transaction_mode}")
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                    raise
            time.sleep(pause)
            pause = min(2 * pause, LONGEST_PAUSE_SECONDS)

    def _commit(self) -> None:
        try:
            super()._commit()
        finally:
            self._restore_busy_handler()

    def _rollback(self) -> None:
        try:
            super()._rollback()
        finally:
            self._restore_busy_handler()

    def _restore_busy_handler(self) -> None:
        if self.connection is not None and self._begin_takes_lock:
            self.connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")

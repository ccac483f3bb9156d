"""orchestrator_ws.sqlite: a writer waiting for SQLite's write lock, without SQLite's busy handler.

Each test opens its own SQLite file through the backend, whatever database the suite runs on,
and holds the write lock from a plain sqlite3 connection, as another process would.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from django.db.utils import ConnectionHandler, OperationalError


@pytest.fixture(autouse=True)
def own_databases(django_db_blocker):
    """These databases are the tests' own files, not the suite's test database."""
    with django_db_blocker.unblock():
        yield


def open_database(path, timeout: float):
    handler = ConnectionHandler(
        {
            "default": {
                "ENGINE": "orchestrator_ws.sqlite",
                "NAME": str(path),
                "OPTIONS": {
                    "timeout": timeout,
                    "transaction_mode": "IMMEDIATE",
                    "init_command": "PRAGMA journal_mode=WAL",
                },
            }
        }
    )
    database = handler["default"]
    with database.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS steps (name TEXT)")
    return database


def hold_write_lock(path) -> sqlite3.Connection:
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO steps VALUES ('holder')")
    return holder


def write_step(database, name: str) -> None:
    """What ``transaction.atomic()`` does around a write, on this connection."""
    database.set_autocommit(False, force_begin_transaction_with_broken_autocommit=True)
    try:
        with database.cursor() as cursor:
            cursor.execute("INSERT INTO steps VALUES (%s)", [name])
        database.commit()
    finally:
        database.set_autocommit(True)


def busy_timeout_ms(database) -> int:
    with database.cursor() as cursor:
        cursor.execute("PRAGMA busy_timeout")
        return cursor.fetchone()[0]


def names(database) -> list[str]:
    with database.cursor() as cursor:
        cursor.execute("SELECT name FROM steps ORDER BY rowid")
        return [row[0] for row in cursor.fetchall()]


def test_a_writer_waits_for_the_lock_and_takes_it_once_free(tmp_path):
    path = tmp_path / "db.sqlite3"
    database = open_database(path, timeout=10)
    holder = hold_write_lock(path)
    releases_at = time.monotonic() + 0.5
    threading.Timer(0.5, holder.commit).start()

    write_step(database, "worker")

    assert time.monotonic() >= releases_at
    assert names(database) == ["holder", "worker"]
    # Outside a transaction, statements wait with SQLite's own handler again.
    assert busy_timeout_ms(database) == 10_000
    database.close()
    holder.close()


def test_a_writer_gives_up_after_the_timeout_and_the_connection_stays_usable(tmp_path):
    path = tmp_path / "db.sqlite3"
    database = open_database(path, timeout=0.3)
    holder = hold_write_lock(path)

    began = time.monotonic()
    with pytest.raises(OperationalError, match="database is locked"):
        write_step(database, "worker")
    assert 0.3 <= time.monotonic() - began < 5
    assert busy_timeout_ms(database) == 300

    holder.commit()
    write_step(database, "worker")
    assert names(database) == ["holder", "worker"]
    database.close()
    holder.close()


def test_a_rolled_back_transaction_gives_the_lock_back(tmp_path):
    path = tmp_path / "db.sqlite3"
    database = open_database(path, timeout=2)
    database.set_autocommit(False, force_begin_transaction_with_broken_autocommit=True)
    with database.cursor() as cursor:
        cursor.execute("INSERT INTO steps VALUES ('discarded')")
    database.rollback()
    database.set_autocommit(True)
    assert busy_timeout_ms(database) == 2000

    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    other.execute("BEGIN IMMEDIATE")  # fails at once if the rolled back transaction kept the lock
    other.execute("COMMIT")
    other.close()
    assert names(database) == []
    database.close()


def test_a_long_waiting_writer_takes_the_lock_within_milliseconds_of_its_release(tmp_path):
    """SQLite's own handler sleeps 100 ms between tries once a writer has waited a quarter of a
    second, so the lock would stay free for up to 100 ms while the writer sleeps; here its
    pauses stay under 2 ms. Three rounds: the handler's luck would not pass all three."""
    path = tmp_path / "db.sqlite3"
    database = open_database(path, timeout=10)
    handoffs = []
    for _ in range(3):
        holder = hold_write_lock(path)
        released = {}

        def release(holder=holder, released=released):
            released["at"] = time.monotonic()
            holder.commit()

        threading.Timer(0.6, release).start()
        write_step(database, "worker")
        handoffs.append(time.monotonic() - released["at"])
        holder.close()
    assert max(handoffs) < 0.03, handoffs
    database.close()

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


def begin_step(database, name: str) -> None:
    """What ``transaction.atomic()`` does on entering, then a write, on this connection."""
    database.set_autocommit(False, force_begin_transaction_with_broken_autocommit=True)
    with database.cursor() as cursor:
        cursor.execute("INSERT INTO steps VALUES (%s)", [name])


def write_step(database, name: str) -> None:
    """What ``transaction.atomic()`` does around a write, on this connection."""
    try:
        begin_step(database, name)
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
    begin_step(database, "discarded")
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


def count_begins(database) -> list[str]:
    """Every BEGIN this connection runs, those SQLite answers busy included."""
    begins: list[str] = []
    database.ensure_connection()
    database.connection.set_trace_callback(
        lambda sql: begins.append(sql) if sql.startswith("BEGIN") else None
    )
    return begins


def in_thread(target, *args) -> dict:
    """Run ``target`` on a thread of its own (Django connections belong to one thread)."""
    outcome: dict = {}

    def run() -> None:
        began = time.monotonic()
        try:
            outcome["result"] = target(*args)
        except Exception as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - began

    thread = threading.Thread(target=run)
    thread.start()
    outcome["thread"] = thread
    return outcome


def finished(outcome: dict) -> dict:
    outcome["thread"].join(timeout=10)
    assert not outcome["thread"].is_alive()
    return outcome


def test_writers_of_one_process_wait_asleep_and_take_the_lock_in_the_order_they_asked(tmp_path):
    """One thread at a time asks SQLite; the others do not retry BEGIN while they wait."""
    path = tmp_path / "db.sqlite3"
    reader = open_database(path, timeout=10)
    holder = hold_write_lock(path)
    asked: list[str] = []

    def writer(name: str) -> list[str]:
        database = open_database(path, timeout=10)
        begins = count_begins(database)
        asked.append(name)
        write_step(database, name)
        database.close()
        return begins

    writers = {}
    for index in range(5):
        writers[f"w{index}"] = in_thread(writer, f"w{index}")
        time.sleep(0.05)  # each asks once the one before is waiting
    time.sleep(0.3)
    holder.commit()
    begins = {name: finished(outcome)["result"] for name, outcome in writers.items()}

    assert names(reader) == ["holder", *asked]
    assert len(begins[asked[0]]) > 10  # the head of the queue retried while the holder held on
    assert [len(begins[name]) for name in asked[1:]] == [1, 1, 1, 1]
    reader.close()
    holder.close()


def test_a_writer_queued_behind_one_of_its_own_process_gives_up_after_the_timeout(tmp_path):
    path = tmp_path / "db.sqlite3"
    first = open_database(path, timeout=10)
    begin_step(first, "first")

    second = finished(in_thread(lambda: write_step(open_database(path, timeout=0.3), "second")))
    assert str(second["error"]) == "database is locked"
    assert 0.3 <= second["seconds"] < 5

    first.commit()
    first.set_autocommit(True)
    assert "error" not in finished(in_thread(lambda: write_step(open_database(path, timeout=0.3), "third")))
    assert names(first) == ["first", "third"]
    first.close()


def test_a_connection_closed_inside_its_transaction_lets_the_next_writer_in(tmp_path):
    """Django closes a connection whose rollback failed; its place in the queue goes with it."""
    path = tmp_path / "db.sqlite3"
    first = open_database(path, timeout=10)
    begin_step(first, "gone with the connection")
    first.close()  # inside the transaction: Django's close() only closes the connection

    second = finished(in_thread(lambda: write_step(open_database(path, timeout=0.3), "second")))
    assert "error" not in second, second.get("error")
    assert names(open_database(path, timeout=1)) == ["second"]


def test_a_write_outside_a_transaction_takes_its_turn_like_a_transaction(tmp_path):
    """Left to SQLite's handler (asleep up to 100 ms between tries), a lone write of a busy
    process's worker lost the lock to every retrying writer; here it keeps its place in the queue.
    """
    path = tmp_path / "db.sqlite3"
    reader = open_database(path, timeout=10)
    holder = hold_write_lock(path)

    def alone() -> int:
        database = open_database(path, timeout=10)
        with database.cursor() as cursor:  # autocommit; RETURNING keeps the statement open
            cursor.execute("INSERT INTO steps VALUES (%s) RETURNING rowid", ["alone"])
            rowid = cursor.fetchone()[0]
        database.close()
        return rowid

    def in_transaction() -> None:
        database = open_database(path, timeout=10)
        write_step(database, "in a transaction, asked later")
        database.close()

    first = in_thread(alone)
    time.sleep(0.1)
    second = in_thread(in_transaction)
    time.sleep(0.4)
    holder.commit()

    assert finished(first)["result"] == 2
    assert "error" not in finished(second)
    reads = count_begins(reader)
    assert names(reader) == ["holder", "alone", "in a transaction, asked later"]
    assert reads == []  # reads outside transactions begin nothing
    assert busy_timeout_ms(reader) == 10_000
    reader.close()
    holder.close()

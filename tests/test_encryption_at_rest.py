"""Encrypted queues stay encrypted at rest, in the file buffer too, and are never weakened
by a missing or malformed key (issue 17, point 7).

The buffer tests run real servers on a PostgreSQL of their own (maintenance mode, which
sends every push to the buffer, is cluster-wide) and grep every file under the buffer
directory for a marker only the plaintext payload contains.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg2
import pytest

from queen_tw.crypto import PayloadCipher
from queen_tw.errors import Unavailable
from queen_tw.failover.sealing import SEALED, BufferSeal

from faultkit import Fleet, private_fleet, set_maintenance, wait_until
from process_helpers import assert_refused_with, run_queen
from support import ServerProcess, unique_name

KEY_HEX = "3c" * 32
OTHER_KEY = bytes.fromhex("a7" * 32)


# -- the seal itself ----------------------------------------------------------------------


def test_the_seal_hides_payloads_of_queues_not_known_to_be_plain() -> None:
    seal = BufferSeal(PayloadCipher(bytes.fromhex(KEY_HEX)))
    items = [{"queue": "secret", "payload": {"s": "swordfish"}, "transactionId": "a"},
             {"queue": "open", "payload": {"s": "daylight"}, "transactionId": "b"}]

    written = seal.seal(items, plain_queues={"open"})

    assert "swordfish" not in json.dumps(written[0]) and written[0][SEALED] is True
    assert written[1] == items[1]  # known plain: as it came
    assert items[0]["payload"] == {"s": "swordfish"}  # the request's own items are untouched
    opened, kept = seal.unseal(written)
    assert kept == items[1]
    # the text as sealed, handed to the store as JSON text (as a binary push's payload)
    assert opened == dict(items[0], payload=opened["payload"])
    assert orjson.dumps(opened["payload"]) == b'{"s":"swordfish"}'


def test_the_seal_keeps_a_binary_payload_text_as_it_came() -> None:
    seal = BufferSeal(PayloadCipher(bytes.fromhex(KEY_HEX)))
    exact = b'{"price":12345678901234.123456789,"z":1.50,"s":"\xc3\xa9"}'
    items = [{"queue": "unknown", "payload": orjson.Fragment(exact), "transactionId": "a"}]

    [opened] = seal.unseal(seal.seal(items, plain_queues=set()))

    assert orjson.dumps(opened["payload"]) == exact


def test_a_record_without_payload_has_nothing_to_seal() -> None:
    seal = BufferSeal(PayloadCipher(bytes.fromhex(KEY_HEX)))
    item = {"queue": "q", "transactionId": "a"}

    assert seal.seal([item], plain_queues=set()) == [item]


def test_without_a_key_nothing_is_sealed() -> None:
    item = {"queue": "q", "payload": "x", "transactionId": "a"}

    assert BufferSeal(None).seal([item], plain_queues=set()) == [item]


@pytest.mark.parametrize("replaying_key", [None, OTHER_KEY])
def test_a_sealed_record_without_its_key_holds_the_replay(replaying_key: bytes | None) -> None:
    sealed = BufferSeal(PayloadCipher(bytes.fromhex(KEY_HEX))).seal(
        [{"queue": "q", "payload": "x", "transactionId": "a"}], plain_queues=set())
    other = BufferSeal(PayloadCipher(replaying_key) if replaying_key else None)

    with pytest.raises(Unavailable, match="QUEEN_ENCRYPTION_KEY"):
        other.unseal(sealed)


# -- a malformed key ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["not-a-key", KEY_HEX[:-2], "zz" * 32,
                                 KEY_HEX[:30] + "  " + KEY_HEX[32:],  # a traceback, once
                                 KEY_HEX[:30] + "\n\n" + KEY_HEX[32:]])
def test_a_malformed_key_refuses_to_start(bad: str, tmp_path: Path) -> None:
    result = run_queen(env={"QUEEN_ENCRYPTION_KEY": bad,
                            "FILE_BUFFER_DIR": str(tmp_path / "buffers")})

    assert_refused_with(result, "QUEEN_ENCRYPTION_KEY: expected 64 hex characters")
    assert bad not in result.stdout + result.stderr


# -- servers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with private_fleet() as servers:
        yield servers


@pytest.fixture
def keyed(fleet: Fleet) -> Iterator[ServerProcess]:
    """A server with a key, stopped after the test (push maintenance switched off first): the
    module's PostgreSQL has room for only so many servers' pools at once."""
    server = fleet.server(QUEEN_ENCRYPTION_KEY=KEY_HEX)
    yield server
    if server.running:
        set_maintenance(server.url, False)
        server.stop()


def configure(url: str, queue: str, **options: Any) -> httpx.Response:
    return httpx.post(f"{url}/api/v1/configure", json={"queue": queue, "options": options},
                      timeout=20)


def push(url: str, queue: str, payload: Any) -> httpx.Response:
    return httpx.post(f"{url}/api/v1/push",
                      json={"items": [{"queue": queue, "payload": payload}]}, timeout=20)


def pop_one(url: str, queue: str) -> Any:
    answer = httpx.get(f"{url}/api/v1/pop/queue/{queue}",
                       params={"wait": "false", "autoAck": "true"}, timeout=20)
    assert answer.status_code == 200, answer.text
    [message] = answer.json()["messages"]
    return message["data"]


def buffered(url: str) -> int:
    return httpx.get(f"{url}/api/v1/system/maintenance", timeout=10).json()["bufferedMessages"]


def files_containing(directory: Path, marker: str) -> list[Path]:
    """Every file under ``directory`` (segments, failed/, adopted directories, anything)
    whose bytes contain ``marker``."""
    return [path for path in directory.rglob("*")
            if path.is_file() and marker.encode() in path.read_bytes()]


def segment_files(directory: Path) -> list[Path]:
    return [path for path in directory.rglob("segment-*") if path.is_file()]


def stored_rows(fleet: Fleet, queue: str) -> list[tuple[Any, bool]]:
    """(payload, is_encrypted) of every message of ``queue`` in PostgreSQL."""
    env = fleet.pg_env
    with psycopg2.connect(host=env["PG_HOST"], port=env["PG_PORT"], user=env["PG_USER"],
                          password=env["PG_PASSWORD"], dbname=env["PG_DB"]) as db, \
            db.cursor() as cursor:
        cursor.execute("""SELECT m.payload, m.is_encrypted FROM queen.messages m
                            JOIN queen.partitions p ON p.id = m.partition_id
                            JOIN queen.queues q ON q.id = p.queue_id
                           WHERE q.name = %s""", (queue,))
        rows = cursor.fetchall()
    db.close()
    return rows


def secret() -> dict[str, str]:
    return {"secret": f"plaintext-marker-{uuid.uuid4().hex}"}


# -- the file buffer ----------------------------------------------------------------------


def test_buffered_payloads_of_an_encrypted_queue_never_reach_the_disk_in_plaintext(
        keyed: ServerProcess, fleet: Fleet) -> None:
    queue = unique_name()
    assert configure(keyed.url, queue, encryptionEnabled=True).status_code == 200
    payload = secret()
    set_maintenance(keyed.url, True)

    answer = push(keyed.url, queue, payload)

    assert answer.json()[0]["status"] == "buffered", answer.text
    assert segment_files(keyed.buffer_dir)  # it is on disk...
    assert files_containing(keyed.buffer_dir, payload["secret"]) == []  # ...sealed
    set_maintenance(keyed.url, False)
    wait_until(lambda: buffered(keyed.url) == 0, message="the replay")
    assert pop_one(keyed.url, queue) == payload
    [(stored, is_encrypted)] = stored_rows(fleet, queue)
    assert is_encrypted and set(stored) == {"encrypted", "iv", "authTag"}  # encrypted once:
    assert PayloadCipher(bytes.fromhex(KEY_HEX)).decrypt(stored) == payload  # opens to it


def test_a_queue_known_to_be_plain_is_buffered_and_stored_as_it_came(
        keyed: ServerProcess, fleet: Fleet) -> None:
    queue = unique_name()
    assert configure(keyed.url, queue).status_code == 200  # this server now knows: plain
    payload = secret()
    set_maintenance(keyed.url, True)

    assert push(keyed.url, queue, payload).json()[0]["status"] == "buffered"

    assert files_containing(keyed.buffer_dir, payload["secret"])  # not sealed
    set_maintenance(keyed.url, False)
    wait_until(lambda: buffered(keyed.url) == 0, message="the replay")
    assert stored_rows(fleet, queue) == [(payload, False)]
    assert pop_one(keyed.url, queue) == payload


def test_a_queue_of_unknown_flag_is_sealed_and_stored_as_its_queue_asks_at_replay(
        keyed: ServerProcess, fleet: Fleet) -> None:
    """A queue this server has never seen (PostgreSQL may be down: it cannot ask) is sealed
    on disk; at replay the seal comes off and the queue, created plain, stores plaintext."""
    queue = unique_name()
    payload = secret()
    set_maintenance(keyed.url, True)

    assert push(keyed.url, queue, payload).json()[0]["status"] == "buffered"

    assert files_containing(keyed.buffer_dir, payload["secret"]) == []
    set_maintenance(keyed.url, False)
    wait_until(lambda: buffered(keyed.url) == 0, message="the replay")
    assert stored_rows(fleet, queue) == [(payload, False)]  # not left sealed


def test_sealed_records_left_by_a_killed_server_replay_after_restart(
        keyed: ServerProcess, fleet: Fleet) -> None:
    queue = unique_name()
    assert configure(keyed.url, queue, encryptionEnabled=True).status_code == 200
    payloads = [secret() for _ in range(5)]
    set_maintenance(keyed.url, True)
    for payload in payloads:
        assert push(keyed.url, queue, payload).json()[0]["status"] == "buffered"

    keyed.kill()  # SIGKILL: no shutdown work at all

    for payload in payloads:
        assert files_containing(keyed.buffer_dir, payload["secret"]) == []
    keyed.start()
    assert buffered(keyed.url) == len(payloads)
    set_maintenance(keyed.url, False)
    wait_until(lambda: buffered(keyed.url) == 0, message="the replay after the restart")
    assert [pop_one(keyed.url, queue) for _ in payloads] == payloads
    assert all(is_encrypted for _, is_encrypted in stored_rows(fleet, queue))


# -- no key -------------------------------------------------------------------------------


def test_configuring_an_encrypted_queue_without_a_key_is_refused_and_changes_nothing(
        fleet: Fleet) -> None:
    server = fleet.server(QUEEN_ENCRYPTION_KEY="")
    queue = unique_name()

    answer = configure(server.url, queue, encryptionEnabled=True)

    assert answer.status_code == 400
    assert "QUEEN_ENCRYPTION_KEY" in answer.json()["error"]
    assert httpx.get(f"{server.url}/api/v1/resources/queues/{queue}",
                     timeout=10).status_code == 404


def test_pushes_to_an_encrypted_queue_on_a_server_without_key_are_refused(
        keyed: ServerProcess, fleet: Fleet) -> None:
    """The queue was made encrypted by a keyed instance; an instance started without the key
    must not store its messages in plaintext, nor buffer them."""
    queue = unique_name()
    assert configure(keyed.url, queue, encryptionEnabled=True).status_code == 200
    keyless = fleet.server(QUEEN_ENCRYPTION_KEY="", QUEEN_QUEUE_CONFIG_TTL_MS="600000")

    refused = push(keyless.url, queue, secret())

    assert refused.status_code == 503, refused.text
    assert "has no QUEEN_ENCRYPTION_KEY" in refused.json()["error"]
    assert stored_rows(fleet, queue) == []
    set_maintenance(keyless.url, True)  # the flag is cached now: not buffered either
    payload = secret()
    assert push(keyless.url, queue, payload).status_code == 503
    assert files_containing(keyless.buffer_dir, payload["secret"]) == []


def test_a_transaction_pushing_to_an_encrypted_queue_without_a_key_is_refused(
        keyed: ServerProcess, fleet: Fleet) -> None:
    queue = unique_name()
    assert configure(keyed.url, queue, encryptionEnabled=True).status_code == 200
    keyless = fleet.server(QUEEN_ENCRYPTION_KEY="")

    answer = httpx.post(f"{keyless.url}/api/v1/transaction", json={"operations": [
        {"type": "push", "items": [{"queue": queue, "payload": secret()}]}]}, timeout=20)

    assert answer.status_code == 503, answer.text
    assert stored_rows(fleet, queue) == []



@pytest.fixture(scope="module")
def keyless(fleet: Fleet) -> Iterator[ServerProcess]:
    """One server without a key for the tests below (see ``keyed``)."""
    server = fleet.server(QUEEN_ENCRYPTION_KEY="")
    yield server
    server.stop()


@pytest.mark.parametrize("still_encrypting", [True, False])
@pytest.mark.parametrize("auto_ack", ["true", "false"])
def test_a_server_without_a_key_never_hands_out_an_encrypted_message(
        keyed: ServerProcess, keyless: ServerProcess, auto_ack: str,
        still_encrypting: bool) -> None:
    """It answered the stored envelope as the message's data (and, with autoAck, consumed
    it): 503 now. A queue that encrypts is refused before anything is taken; a payload
    sealed before its queue stopped encrypting is met in the delivery, given back."""
    queue = unique_name()
    assert configure(keyed.url, queue, encryptionEnabled=True).status_code == 200
    payload = secret()
    assert push(keyed.url, queue, payload).status_code == 201
    if not still_encrypting:
        assert configure(keyed.url, queue, encryptionEnabled=False).status_code == 200

    refused = httpx.get(f"{keyless.url}/api/v1/pop/queue/{queue}", timeout=20,
                        params={"wait": "false", "autoAck": auto_ack})
    fetched = httpx.post(f"{keyless.url}/api/v1/fetch", timeout=20, json={
        "entries": [{"queue": queue, "partition": "Default", "offset": 0}]})

    assert refused.status_code == 503, refused.text
    assert "no QUEEN_ENCRYPTION_KEY" in refused.json()["error"]
    assert fetched.status_code == 503, fetched.text
    assert pop_one(keyed.url, queue) == payload


def test_a_server_without_a_key_marks_the_dead_letters_it_cannot_open(
        keyed: ServerProcess, keyless: ServerProcess) -> None:
    """The listing dropped the isEncrypted mark and showed the envelope as the data."""
    queue = unique_name()
    assert configure(keyed.url, queue, encryptionEnabled=True).status_code == 200
    payload = secret()
    assert push(keyed.url, queue, payload).status_code == 201
    popped = httpx.get(f"{keyed.url}/api/v1/pop/queue/{queue}", params={"wait": "false"},
                       timeout=20).json()["messages"][0]
    assert httpx.post(f"{keyed.url}/api/v1/messages/{popped['partitionId']}/"
                      f"{popped['transactionId']}/dlq", json={}, timeout=20).status_code == 200

    [sealed] = httpx.get(f"{keyless.url}/api/v1/dlq", params={"queue": queue},
                         timeout=20).json()["messages"]
    [opened] = httpx.get(f"{keyed.url}/api/v1/dlq", params={"queue": queue},
                         timeout=20).json()["messages"]

    assert sealed["isEncrypted"] is True and payload["secret"] not in json.dumps(sealed)
    assert opened["data"] == payload and "isEncrypted" not in opened


# -- a flag that changed after a server read it -------------------------------------------


def _encrypted_elsewhere(keyed: ServerProcess, fleet: Fleet) -> tuple[str, ServerProcess]:
    """A queue, and a keyed instance that pushed to it once and so holds its flag (plain)
    for ten minutes; then ``keyed`` makes the queue encrypt, and that instance is not told
    (no peer sync here; with it, a lost datagram or a NUM_WORKERS sibling not told yet is
    the same)."""
    queue = unique_name()
    stale = fleet.server(QUEEN_ENCRYPTION_KEY=KEY_HEX, QUEEN_QUEUE_CONFIG_TTL_MS="600000")
    assert push(stale.url, queue, {"before": True}).status_code == 201
    assert configure(keyed.url, queue, encryptionEnabled=True).status_code == 200
    return queue, stale


def transaction_push(url: str, queue: str, payload: Any) -> httpx.Response:
    return httpx.post(f"{url}/api/v1/transaction", timeout=20, json={
        "operations": [{"type": "push", "items": [{"queue": queue, "payload": payload}]}]})


def test_a_push_to_a_queue_encrypted_elsewhere_is_stored_encrypted(
        keyed: ServerProcess, fleet: Fleet) -> None:
    queue, stale = _encrypted_elsewhere(keyed, fleet)
    payload = secret()
    pushed = push(stale.url, queue, payload)

    assert pushed.status_code == 201 and pushed.json()[0]["status"] == "queued", pushed.text
    rows = stored_rows(fleet, queue)
    assert sorted(encrypted for _, encrypted in rows) == [False, True]  # before; this one
    assert not any(payload["secret"] in json.dumps(stored) for stored, _ in rows)
    assert pop_one(stale.url, queue) == {"before": True}
    assert pop_one(stale.url, queue) == payload


def test_a_transaction_to_a_queue_encrypted_elsewhere_answers_503_then_stores_encrypted(
        keyed: ServerProcess, fleet: Fleet) -> None:
    queue, stale = _encrypted_elsewhere(keyed, fleet)
    payload = secret()

    first = transaction_push(stale.url, queue, payload)
    again = transaction_push(stale.url, queue, payload)

    assert first.status_code == 503 and "encryptionEnabled" in first.json()["error"]
    assert again.status_code == 200 and again.json()["success"] is True, again.text
    rows = stored_rows(fleet, queue)
    assert sorted(encrypted for _, encrypted in rows) == [False, True]
    assert not any(payload["secret"] in json.dumps(stored) for stored, _ in rows)


def test_a_stream_cycle_to_a_sink_encrypted_elsewhere_answers_503_once(
        keyed: ServerProcess, fleet: Fleet) -> None:
    sink, stale = _encrypted_elsewhere(keyed, fleet)
    source = unique_name()
    [pushed] = push(stale.url, source, {"n": 1}).json()
    registered = httpx.post(f"{stale.url}/streams/v1/queries", timeout=20, json={
        "name": unique_name("test-q-"), "source_queue": source, "sink_queue": sink,
        "config_hash": "h1", "reset": False})
    payload = secret()
    cycle = {"query_id": registered.json()["query_id"], "partition_id": pushed["partition_id"],
             "consumer_group": "g", "state_ops": [], "ack": None,
             "push_items": [{"queue": sink, "payload": payload}]}

    first = httpx.post(f"{stale.url}/streams/v1/cycle", json=cycle, timeout=20)
    again = httpx.post(f"{stale.url}/streams/v1/cycle", json=cycle, timeout=20)

    assert first.status_code == 503, first.text
    assert again.status_code == 200 and again.json()["success"] is True, again.text
    assert sorted(encrypted for _, encrypted in stored_rows(fleet, sink)) == [False, True]
    assert not any(payload["secret"] in json.dumps(stored)
                   for stored, _ in stored_rows(fleet, sink))


# -- the key the database was written with ------------------------------------------------


def test_a_server_with_another_key_refuses_to_start_on_encrypted_payloads(
        keyed: ServerProcess, fleet: Fleet) -> None:
    """It would hand them out undecrypted, and seal new ones no other instance could open."""
    queue = unique_name()
    assert configure(keyed.url, queue, encryptionEnabled=True).status_code == 200
    assert push(keyed.url, queue, secret()).status_code == 201
    log = _refused_to_start(fleet.server(start=False, QUEEN_ENCRYPTION_KEY=OTHER_KEY.hex()))

    assert "QUEEN_ENCRYPTION_KEY is not the key this database's encrypted payloads were " \
           "written with" in log
    assert fleet.server(QUEEN_ENCRYPTION_KEY=KEY_HEX).running  # the right key still starts


def _refused_to_start(server: ServerProcess) -> str:
    """Starts ``server`` expecting it to stop by itself with status 1; its log."""
    try:
        server.start()  # /health may answer before the key is checked, or never
    except RuntimeError:
        pass
    wait_until(lambda: not server.running, 30)
    assert server.process is not None and server.process.returncode == 1
    return server.log_text()


def test_a_new_key_is_refused_until_the_record_is_deleted_even_with_nothing_encrypted(
        ) -> None:
    """Instances with the recorded key may be running: they would seal payloads the new
    key cannot open. Changing keys is an operator's step."""
    with private_fleet() as fresh:
        first = fresh.server(QUEEN_ENCRYPTION_KEY=KEY_HEX)
        queue = unique_name()
        assert push(first.url, queue, {"plain": True}).status_code == 201
        first.stop()

        log = _refused_to_start(fresh.server(start=False, QUEEN_ENCRYPTION_KEY=OTHER_KEY.hex()))

        assert "stop every instance, delete the record" in log
        env = fresh.pg_env
        with psycopg2.connect(host=env["PG_HOST"], port=env["PG_PORT"], user=env["PG_USER"],
                              dbname=env["PG_DB"]) as db, db.cursor() as cursor:
            cursor.execute("DELETE FROM queen.system_state WHERE key = 'encryption_key_check'")
        db.close()
        second = fresh.server(QUEEN_ENCRYPTION_KEY=OTHER_KEY.hex())
        assert pop_one(second.url, queue) == {"plain": True}


def test_a_database_encrypted_before_the_key_check_records_only_the_key_that_opens_it(
        ) -> None:
    """A release from before the key check left encrypted payloads and no digest. The
    first server to start used to record whatever key it brought: a wrong one then served
    the payloads undecrypted and locked the right key out for good (an upgrade audit).
    Now a key is recorded only once it opens a stored payload."""
    with private_fleet() as fresh:
        first = fresh.server(QUEEN_ENCRYPTION_KEY=KEY_HEX)
        queue = unique_name()
        assert configure(first.url, queue, encryptionEnabled=True).status_code == 200
        payload = secret()
        assert push(first.url, queue, payload).status_code == 201
        first.stop()
        env = fresh.pg_env
        with psycopg2.connect(host=env["PG_HOST"], port=env["PG_PORT"], user=env["PG_USER"],
                              dbname=env["PG_DB"]) as db, db.cursor() as cursor:
            cursor.execute("DELETE FROM queen.system_state WHERE key = 'encryption_key_check'")
        db.close()

        log = _refused_to_start(fresh.server(start=False, QUEEN_ENCRYPTION_KEY=OTHER_KEY.hex()))

        assert "QUEEN_ENCRYPTION_KEY is not the key this database's encrypted payloads were " \
               "written with" in log
        right = fresh.server(QUEEN_ENCRYPTION_KEY=KEY_HEX)
        assert pop_one(right.url, queue) == payload
        right.stop()
        _refused_to_start(fresh.server(start=False, QUEEN_ENCRYPTION_KEY=OTHER_KEY.hex()))

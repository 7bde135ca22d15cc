"""Buffered payloads of encrypted queues stay encrypted on disk (issue 17, point 7).

A push goes to the file buffer when PostgreSQL cannot take it, which is exactly when the
server cannot ask PostgreSQL whether the queue has ``encryptionEnabled``. So, with a
``QUEEN_ENCRYPTION_KEY`` configured, the buffer decides from what it can know:

- the queue is known *not* to encrypt (the queue-config cache says so, see
  :mod:`queen_tw.cluster.config_cache`): the record is written as it came;
- otherwise (known to encrypt, or unknown): the payload is *sealed* before it is written:
  AES-256-GCM with the server's key (:class:`~queen_tw.crypto.PayloadCipher`, the same
  cipher and stored shape as PostgreSQL's rows) and the record is flagged ``bufferSealed``.
  Sealing a queue that turns out not to encrypt costs a little CPU and no correctness.

At replay the seal is taken off (:meth:`BufferSeal.unsealing`) *before* the records reach
``QueueEngine.store``, which then decides from PostgreSQL's flag exactly as for a live push:
an encrypted queue's payload is encrypted once (never twice: the buffer's ciphertext is
never what is stored), a plain queue's is stored in plaintext (never left sealed). Records
the replay gives up on go to ``failed/`` as they were read, so still sealed.

Without a key nothing is sealed (there is nothing to seal with; pushes to queues known to
encrypt are refused by the engine instead). A sealed record met without a key, or with a
different key than the one that sealed it, cannot be stored: the replay answers
``Unavailable`` and holds (logged as an outage, retried with backoff) until the server runs
with the key again. The records are not dropped and not moved to ``failed/``, because nothing
a retry could do would make them readable.
"""

from typing import AbstractSet, Any, Dict, List, Optional

import orjson
from cryptography.exceptions import InvalidTag

from queen_tw.crypto import PayloadCipher
from queen_tw.errors import Unavailable
from queen_tw.failover.records import item_of
from queen_tw.failover.replay import Store

SEALED = "bufferSealed"
"""The record field that flags a payload sealed by the buffer."""


class BufferSeal:
    """Seals the payloads of buffered records and takes the seal off at replay.

    :param cipher: the server's payload cipher; None (no key) seals nothing.
    """

    def __init__(self, cipher: Optional[PayloadCipher]):
        self._cipher = cipher

    def seal(self, items: List[Dict[str, Any]], plain_queues: AbstractSet[str]
             ) -> List[Dict[str, Any]]:
        """The records to write for ``items``: sealed unless their queue is in
        ``plain_queues`` (known not to encrypt). The items themselves are not changed."""
        cipher = self._cipher
        if cipher is None:
            return items
        return [dict(item, payload=cipher.encrypt(item["payload"]), **{SEALED: True})
                if "payload" in item and item["queue"] not in plain_queues else item
                for item in items]

    def unseal(self, records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """The items of buffered ``records``, with sealed payloads back in plaintext.

        Raises ``Unavailable`` when a sealed payload cannot be opened (no key, another key).
        """
        return [self._open(record) if record.get(SEALED) else item_of(record)
                for record in records]

    def unsealing(self, store: Store) -> Store:
        """``store`` (``QueueEngine.store``) for buffered records: unseals, then stores."""
        async def store_unsealed(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
            return await store(self.unseal(records))
        return store_unsealed

    def _open(self, record: Dict[str, Any]) -> Dict[str, Any]:
        if self._cipher is None:
            raise Unavailable("the file buffer holds payloads sealed with QUEEN_ENCRYPTION_KEY "
                              "and this server has no key: they are replayed once it runs "
                              "with the key that sealed them")
        try:  # the text as sealed (a binary push's payload keeps every digit)
            payload = orjson.Fragment(self._cipher.decrypt_text(record["payload"]).encode())
        except (InvalidTag, KeyError, TypeError, ValueError) as err:
            raise Unavailable(
                f"a buffered payload of queue {record.get('queue')} cannot be unsealed with "
                f"this QUEEN_ENCRYPTION_KEY ({err.__class__.__name__}): it is replayed once "
                "the server runs with the key that sealed it") from err
        opened = dict(record, payload=payload)
        del opened[SEALED]
        return opened

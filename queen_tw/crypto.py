"""AES-256-GCM payload encryption at rest (WIRE.md 2.2 point 5)."""

import base64
import hashlib
import hmac
import json
import os
from typing import Any, Optional

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_IV_BYTES = 16
_TAG_BYTES = 16


class PayloadCipher:
    """Encrypts a JSON payload into ``{"encrypted", "iv", "authTag"}`` and back.

    The stored shape matches upstream Queen: base64 ciphertext, 16-byte IV and 16-byte tag
    over the JSON text of the payload: compact for a value, and a binary push's text as it
    came (any JSON text; its readers parse it or splice it into an answer).
    """

    def __init__(self, key: bytes):
        if len(key) != 32:
            raise ValueError("encryption key must be 32 bytes")
        self._aead = AESGCM(key)

    def encrypt(self, payload: Any) -> dict:
        """``payload`` sealed: a value as its compact JSON text, an ``orjson.Fragment`` (a
        binary push's payload) as the text it holds, so its numbers keep every digit."""
        iv = os.urandom(_IV_BYTES)
        if isinstance(payload, orjson.Fragment):
            plain = orjson.dumps(payload)
        else:
            plain = json.dumps(payload, separators=(",", ":")).encode()
        sealed = self._aead.encrypt(iv, plain, None)
        return {
            "encrypted": base64.b64encode(sealed[:-_TAG_BYTES]).decode(),
            "iv": base64.b64encode(iv).decode(),
            "authTag": base64.b64encode(sealed[-_TAG_BYTES:]).decode(),
        }

    def decrypt(self, stored: Any) -> Any:
        return json.loads(self.decrypt_text(stored))

    def decrypt_text(self, stored: Any) -> str:
        """The payload's JSON text as it was sealed."""
        sealed = base64.b64decode(stored["encrypted"]) + base64.b64decode(stored["authTag"])
        return self._aead.decrypt(base64.b64decode(stored["iv"]), sealed, None).decode()

    def opens(self, stored: Any) -> bool:
        """Whether ``stored`` (an envelope as kept in PostgreSQL) was sealed with this key."""
        try:
            self.decrypt_text(stored)
        except (InvalidTag, ValueError, TypeError, KeyError):  # (binascii.Error: ValueError)
            return False
        return True


def key_check(key: bytes) -> str:
    """A digest naming ``key`` without revealing it: what PostgreSQL keeps to tell a server
    started with another key (``queen.encryption_key_check``)."""
    return hmac.new(key, b"queen-tw encryption key check 1", hashlib.sha256).hexdigest()


def make_cipher(key: Optional[bytes]) -> Optional[PayloadCipher]:
    """A cipher when a key is configured; None (no key) makes the server refuse to configure
    or push to encrypted queues rather than store their payloads in plaintext."""
    return PayloadCipher(key) if key else None

"""Loading ``JWT_PUBLIC_KEY``: PEM text, or the path of a PEM file.

Used twice: by the configuration, so a key that cannot be read or parsed refuses the start
with one line, and by the verifier, which needs the key object.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

PublicKey = RSAPublicKey | Ed25519PublicKey

PEM_MARKER = "-----BEGIN"


def load_public_key(value: str) -> PublicKey:
    """The RSA or Ed25519 public key of ``value``: PEM text when it contains a PEM header
    (``-----BEGIN PUBLIC KEY-----``, newlines may be written as ``\\n``), else a file path.

    Raises ValueError saying what is wrong (unreadable file, not PEM, another key type).
    """
    text = value.strip()
    if PEM_MARKER not in text:
        try:
            text = Path(text).read_text()
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or str(err)
            raise ValueError(f"cannot read PEM file {value.strip()!r}: {reason}") from None
    pem = text.strip().replace("\\n", "\n").encode()
    try:
        key = load_pem_public_key(pem)
    except ValueError as err:
        raise ValueError(f"not a PEM public key ({err})") from None
    if not isinstance(key, (RSAPublicKey, Ed25519PublicKey)):
        raise ValueError(f"a {type(key).__name__} is neither an RSA nor an Ed25519 key")
    return key


def key_family(key: PublicKey) -> str:
    """``RSA`` or ``EdDSA``: which token algorithms the key can verify."""
    return "RSA" if isinstance(key, RSAPublicKey) else "EdDSA"

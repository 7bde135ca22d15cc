"""JWT authentication (WIRE.md section 4.1): who is calling, proven by a signed token.

:mod:`queen_tw.auth.tokens` turns an ``Authorization`` header into an :class:`Identity` or an
:class:`AuthError` carrying WIRE 4.3's status and text; :mod:`queen_tw.auth.jwks` keeps the
identity provider's signing keys; :mod:`queen_tw.auth.keys` loads a configured public key.
Deciding what an identity may do is the HTTP layer's business, not this package's.
"""

"""Which instance owns an ephemeral queue when several serve them (``QUEEN_EPHEMERAL_PEERS``).

Every instance is given the same list of base URLs and its own entry in it; the owner of a
queue is the member with the highest rendezvous score for the queue's name, so every instance
computes the same owner without talking to the others, and adding or removing one member
moves only the queues that member wins or loses (their contents are lost, as on a restart).
All partitions of a queue have the same owner: a pop that names no partition sees the whole
queue, and an ack reaches the rings of its pop. The list is static: a member that is down
makes its queues answer 503 until it is back or removed from every instance's list.
"""

import hashlib
from typing import Optional, Sequence


def _score(member: str, queue: str) -> int:
    digest = hashlib.blake2b(f"{member}\x1f{queue}".encode("utf-8", "surrogatepass"),
                             digest_size=8).digest()
    return int.from_bytes(digest, "big")


def parse_members(text: str) -> tuple:
    """The comma list of base URLs, without blanks and trailing slashes."""
    return tuple(part.strip().rstrip("/") for part in text.split(",") if part.strip())


class Placement:
    """Ownership of queues among ``members``.

    :param members: every instance's base URL (``http://host:port``), this one included.
    :param me: this instance's entry; with no members every queue is local.
    """

    def __init__(self, members: Sequence[str] = (), me: str = ""):
        self.members = tuple(members)
        self.me = me.rstrip("/")
        if self.members and self.me not in self.members:
            raise ValueError(f"{me!r} is not one of the ephemeral peers {list(self.members)}")

    def owner(self, queue: str) -> Optional[str]:
        """The owner's base URL, or None when this instance owns ``queue``."""
        if len(self.members) < 2:
            return None
        best = max(self.members, key=lambda member: (_score(member, queue), member))
        return None if best == self.me else best

    def others(self) -> tuple:
        """Every member but this one."""
        return tuple(member for member in self.members if member != self.me)

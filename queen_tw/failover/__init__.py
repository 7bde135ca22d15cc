"""The file buffer that keeps pushes durable while PostgreSQL cannot take them (WIRE.md 2.2).

``records`` is the on-disk format, ``buffer`` the fsync'd segment files, ``policy`` decides
which pushes go there, ``replay`` moves them into PostgreSQL afterwards, ``adoption`` locks each
process's directory and takes over those of processes that no longer run, ``durability`` wires
it all (with the maintenance flags of ``queen_tw.maintenance``) into ``make_service``.
"""

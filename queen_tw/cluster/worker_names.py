"""How the worker processes of one instance are named (their ``WORKER_ID``, also their
PostgreSQL ``application_name``), and how a name tells which instance a worker belongs to."""


def worker_name(instance: str, index: int) -> str:
    """The ``WORKER_ID`` of worker ``index`` (from 0) of the instance named ``instance``."""
    return f"{instance}-{index + 1}"


def instance_of(worker: str) -> str:
    """The instance a worker named by :func:`worker_name` belongs to."""
    return worker.rsplit("-", 1)[0]

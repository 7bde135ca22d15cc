"""Schema installation is idempotent and race-free; /health tells the truth about PostgreSQL.

Upgrades, adoption of old databases and rollback are in test_migrations.py.
"""

import subprocess
import threading
import time

import httpx
import psycopg2

from queen_tw.db.schema import function_files, install_schema, migration_files
from queen_tw.paths import sql_dir


def _schema_fingerprint(dsn: str) -> list:
    """Every function definition and column of schema queen, to compare before/after."""
    with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute("""
            SELECT 'fn ' || p.proname || ' ' || md5(pg_get_functiondef(p.oid))
              FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'queen'
            UNION ALL
            SELECT 'col ' || table_name || '.' || column_name || ' ' || data_type
              FROM information_schema.columns WHERE table_schema = 'queen'
             ORDER BY 1""")
        rows = [row[0] for row in cursor.fetchall()]
        cursor.execute("""SELECT 'migration ' || name || ' ' || applied_at
                            FROM queen.schema_migrations
                          UNION ALL
                          SELECT 'functions ' || name || ' ' || sha256 || ' ' || applied_at
                            FROM queen.schema_functions ORDER BY 1""")
        return rows + [row[0] for row in cursor.fetchall()]


def test_installing_the_schema_again_changes_nothing(pg_dsn, server):
    before = _schema_fingerprint(pg_dsn)
    assert install_schema(pg_dsn, sql_dir()) == []
    assert _schema_fingerprint(pg_dsn) == before


def test_concurrent_installs_serialise_on_the_advisory_lock(pg_dsn, server):
    errors = []

    def install():
        try:
            install_schema(pg_dsn, sql_dir())
        except Exception as err:  # any error here is the failure being tested for
            errors.append(err)

    threads = [threading.Thread(target=install) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []


def test_every_migration_and_function_file_is_recorded(db, server):
    with db.cursor() as cursor:
        cursor.execute("SELECT version, name FROM queen.schema_migrations ORDER BY version")
        versions = cursor.fetchall()
        cursor.execute("SELECT name FROM queen.schema_functions ORDER BY name")
        functions = [row[0] for row in cursor.fetchall()]
    assert versions == [(m.version, m.path.name) for m in migration_files(sql_dir())]
    assert functions == [f"functions/{path.name}" for path in function_files(sql_dir())]


def test_health_is_503_while_postgresql_is_unreachable(make_server, tmp_path):
    server = make_server(start=False, PG_HOST=str(tmp_path / "no-postgres-here"))
    server.buffer_dir.mkdir(parents=True, exist_ok=True)
    with open(server.log_path, "ab") as output:
        server.process = subprocess.Popen(server.command(), env=server.env, cwd=server.workdir,
                                          stdin=subprocess.DEVNULL, stdout=output,
                                          stderr=subprocess.STDOUT)
    deadline, answer = time.monotonic() + 20, None
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(f"{server.url}/health", timeout=5)
            break
        except httpx.TransportError:
            time.sleep(0.2)
    assert answer is not None, server.log_tail()
    assert answer.status_code == 503
    assert answer.json()["status"] == "unhealthy"
    assert answer.json()["database"] == "disconnected"
    # A pop during the outage answers "nothing" (204), never a 5xx that stops consumers.
    popped = httpx.get(f"{server.url}/api/v1/pop/queue/anything", timeout=5)
    assert popped.status_code == 204

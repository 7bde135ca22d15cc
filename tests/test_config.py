"""Configuration parsing: defaults, environment, CLI precedence, refusals, DSN."""

from __future__ import annotations

from contextlib import closing

import psycopg2
import pytest
from psycopg2.extensions import make_dsn, parse_dsn
from twisted.python import usage

from queen_tw.config import OPTIONS, Config, ConfigError, QueenOptions, markdown_table

KEY_HEX = "00112233445566778899aabbccddeeff" * 2


def parse(env: dict[str, str] | None = None, **cli: str) -> Config:
    """Config from an environment mapping and CLI values keyed by field name."""
    return Config.from_sources(env or {}, cli)


def test_defaults_match_the_documented_values() -> None:
    config = Config.defaults()
    assert (config.port, config.host, config.num_workers, config.worker_id) == (
        6632, "0.0.0.0", 1, "queen-tw-1")
    assert (config.log_level, config.log_format) == ("info", "text")
    assert (config.pg_host, config.pg_port, config.pg_user, config.pg_password, config.pg_db) == (
        "localhost", "5432", "postgres", "postgres", "postgres")
    assert config.pg_use_ssl is False and config.pg_ssl_reject_unauthorized is True
    assert config.db_pool_size == 10
    assert config.pop_wait_backoff_multiplier == 2.0
    assert config.max_body_bytes == 64 * 1024 * 1024
    assert config.default_subscription_mode == ""
    assert config.encryption_key is None and config.embedded_pg is None
    assert config.warnings == ()


def test_environment_sets_values_by_upstream_names() -> None:
    config = parse({"PORT": "7000", "DB_POOL_SIZE": "4", "RETENTION_INTERVAL": "2000",
                    "PG_USE_SSL": "YES", "POP_WAIT_BACKOFF_MULTIPLIER": "1.5",
                    "DEFAULT_SUBSCRIPTION_MODE": "new-only", "LOG_LEVEL": "DEBUG"})
    assert config.port == 7000
    assert config.db_pool_size == 4
    assert config.retention_interval_ms == 2000
    assert config.pg_use_ssl is True
    assert config.pop_wait_backoff_multiplier == 1.5
    assert config.default_subscription_mode == "new-only"
    assert config.log_level == "debug"


def test_cli_value_overrides_environment() -> None:
    config = parse({"PORT": "7000", "PG_HOST": "db.example"}, port="7001")
    assert config.port == 7001
    assert config.pg_host == "db.example"


def test_cli_none_means_flag_not_given() -> None:
    assert Config.from_sources({"PORT": "7000"}, {"port": None}).port == 7000


def test_unknown_cli_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="no_such_option"):
        parse(no_such_option="1")


def test_bad_integer_names_the_environment_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        parse({"PORT": "abc"})
    assert str(caught.value) == "PORT: expected an integer, got 'abc'"


def test_bad_cli_integer_also_names_the_environment_variable() -> None:
    with pytest.raises(ConfigError, match=r"^DB_POOL_SIZE: expected an integer, got '1\.5'$"):
        parse(db_pool_size="1.5")


@pytest.mark.parametrize("env", [{"PORT": "70000"}, {"PORT": "-1"}, {"DB_POOL_SIZE": "0"},
                                 {"DEFAULT_BATCH_SIZE": "0"},
                                 {"POP_WAIT_BACKOFF_MULTIPLIER": "0.5"}])
def test_out_of_range_numbers_are_refused(env: dict[str, str]) -> None:
    (name,) = env
    with pytest.raises(ConfigError, match=f"^{name}: must be"):
        parse(env)


def test_non_finite_float_is_refused() -> None:
    with pytest.raises(ConfigError, match="^POP_WAIT_BACKOFF_MULTIPLIER: expected a finite number"):
        parse({"POP_WAIT_BACKOFF_MULTIPLIER": "inf"})


@pytest.mark.parametrize("word,expected", [("true", True), ("TRUE", True), ("1", True),
                                           ("Yes", True),
                                           ("false", False), ("0", False), ("no", False)])
def test_booleans_accept_the_usual_spellings(word: str, expected: bool) -> None:
    assert parse({"PG_USE_SSL": word}).pg_use_ssl is expected


def test_bad_boolean_names_the_environment_variable() -> None:
    with pytest.raises(ConfigError, match="^PG_SSL_REJECT_UNAUTHORIZED: expected true/false"):
        parse({"PG_SSL_REJECT_UNAUTHORIZED": "maybe"})


def test_bad_choice_is_refused() -> None:
    with pytest.raises(ConfigError, match="^DEFAULT_SUBSCRIPTION_MODE: expected one of"):
        parse({"DEFAULT_SUBSCRIPTION_MODE": "from_beginning"})


def test_empty_numeric_value_means_default() -> None:
    assert parse({"PORT": "", "PG_USE_SSL": " "}).port == 6632


def test_empty_password_is_kept() -> None:
    assert parse({"PG_PASSWORD": ""}).pg_password == ""


def test_pop_wait_max_below_initial_is_refused() -> None:
    with pytest.raises(ConfigError, match="^POP_WAIT_MAX_INTERVAL_MS"):
        parse({"POP_WAIT_INITIAL_INTERVAL_MS": "500", "POP_WAIT_MAX_INTERVAL_MS": "100"})


def test_encryption_key_of_64_hex_chars_becomes_32_bytes() -> None:
    config = parse({"QUEEN_ENCRYPTION_KEY": KEY_HEX.upper()})
    assert config.encryption_key == bytes.fromhex(KEY_HEX)
    assert config.warnings == ()


@pytest.mark.parametrize("bad", ["abc", KEY_HEX[:-2], KEY_HEX + "00", "zz" * 32])
def test_malformed_encryption_key_is_refused_without_echoing_it(bad: str) -> None:
    with pytest.raises(ConfigError, match="^QUEEN_ENCRYPTION_KEY: expected 64 hex") as refused:
        parse({"QUEEN_ENCRYPTION_KEY": bad})
    assert bad not in str(refused.value)


def test_listen_description_is_refused_with_several_workers() -> None:
    with pytest.raises(ConfigError, match="^QUEEN_LISTEN: not supported with NUM_WORKERS"):
        parse({"QUEEN_LISTEN": "tcp:6632", "NUM_WORKERS": "2"})


def test_listen_description_is_kept_as_given() -> None:
    assert parse({"QUEEN_LISTEN": "unix:/run/queen.sock"}).listen == "unix:/run/queen.sock"


def test_unset_encryption_key_is_off_without_warning() -> None:
    config = parse({"QUEEN_ENCRYPTION_KEY": ""})
    assert config.encryption_key is None and config.warnings == ()


def test_secrets_stay_out_of_repr() -> None:
    text = repr(parse({"QUEEN_ENCRYPTION_KEY": KEY_HEX, "PG_PASSWORD": "hunter2"}))
    assert "hunter2" not in text and "encryption_key" not in text


def test_dsn_points_at_a_unix_socket_directory() -> None:
    config = parse({"PG_HOST": "/tmp/queen pg/data", "PG_PORT": "5433", "PG_PASSWORD": "",
                    "DB_CONNECTION_TIMEOUT": "2500", "WORKER_ID": "w'1"})
    parts = parse_dsn(config.dsn)
    assert parts["host"] == "/tmp/queen pg/data"
    assert parts["port"] == "5433"
    assert parts["password"] == ""
    assert parts["connect_timeout"] == "3"
    assert parts["sslmode"] == "disable"
    assert parts["application_name"] == "w'1"
    assert parts["options"] == ("-c statement_timeout=30000 -c lock_timeout=10000 "
                                "-c queen.worker=w'1")


@pytest.mark.parametrize("dsn_variable", [False, True])
def test_every_session_names_its_worker_in_queen_worker(pg_env: dict[str, str],
                                                        dsn_variable: bool) -> None:
    # The wake-up notices' sender (cluster/pg_wakeups.py): exact, however long or spaced,
    # and also when QUEEN_PG_DSN brings an application_name of its own.
    worker = "night shift \\ " + "w" * 80 + "-2"
    env = {**pg_env, "WORKER_ID": worker}
    if dsn_variable:
        given = parse_dsn(parse(pg_env).dsn)
        env["QUEEN_PG_DSN"] = make_dsn(**{key: given[key] for key in ("host", "port", "user",
                                                                       "password", "dbname")},
                                       application_name="billing")
    with closing(psycopg2.connect(parse(env).dsn)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('queen.worker'), "
                       "current_setting('statement_timeout')")
        assert cursor.fetchone() == (worker, "30s")


@pytest.mark.parametrize("use_ssl,reject,mode", [("true", "true", "require"),
                                                 ("true", "false", "prefer"),
                                                 ("false", "true", "disable")])
def test_dsn_sslmode_follows_the_two_ssl_flags(use_ssl: str, reject: str, mode: str) -> None:
    config = parse({"PG_USE_SSL": use_ssl, "PG_SSL_REJECT_UNAUTHORIZED": reject})
    assert parse_dsn(config.dsn)["sslmode"] == mode


def test_with_changes_returns_a_modified_copy() -> None:
    config = Config.defaults()
    changed = config.with_changes(port=1234)
    assert changed.port == 1234 and config.port == 6632


def test_options_flags_are_env_names_in_lower_case_with_dashes() -> None:
    flags = {spec.flag for spec in OPTIONS}
    assert {"port", "host", "pg-host", "db-pool-size", "embedded-pg", "max-body-bytes",
            "encryption-key", "default-timeout"} <= flags


def test_queen_options_parse_flags_into_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_HOST", "from-env")
    monkeypatch.setenv("PORT", "7000")
    options = QueenOptions()
    options.parseOptions(["--port", "7001", "--embedded-pg", ".pgdata", "--db-pool-size", "3"])
    assert options.config.port == 7001
    assert options.config.pg_host == "from-env"
    assert options.config.embedded_pg == ".pgdata"
    assert options.config.db_pool_size == 3


def test_queen_options_refuse_a_bad_value_with_one_line_naming_it() -> None:
    with pytest.raises(SystemExit) as refused:
        QueenOptions().parseOptions(["--port", "abc"])
    assert str(refused.value) == (
        "queen-tw: PORT: expected an integer, got 'abc' (twistd queen --help lists the options)")


def test_queen_options_refuse_an_unknown_flag_with_one_line() -> None:
    with pytest.raises(SystemExit, match="^queen-tw: option --no-such-flag not recognized"):
        QueenOptions().parseOptions(["--no-such-flag"])


def test_queen_options_still_raise_usage_errors_from_validation() -> None:
    """postOptions keeps the usage.Options contract; only parseOptions ends the process."""
    options = QueenOptions()
    options["port"] = "abc"
    with pytest.raises(usage.UsageError, match="^PORT: expected an integer"):
        options.postOptions()


def test_migrate_only_is_off_unless_its_flag_is_given() -> None:
    assert Config.defaults().migrate_only is False
    plain = QueenOptions()
    plain.parseOptions([])
    assert plain.config.migrate_only is False
    flagged = QueenOptions()
    flagged.parseOptions(["--migrate-only"])
    assert flagged.config.migrate_only is True


def test_migrate_only_is_not_handed_to_worker_processes() -> None:
    assert "QUEEN_MIGRATE_ONLY" not in Config.defaults().with_changes(migrate_only=True).as_env()


def test_markdown_table_lists_the_run_mode_flag() -> None:
    assert "| (flag only) | `--migrate-only` | off |" in markdown_table()


def test_markdown_table_lists_every_option() -> None:
    table = markdown_table()
    for spec in OPTIONS:
        assert f"`{spec.env}`" in table and f"`--{spec.flag}`" in table


# --- cluster sync (WIRE.md 5 "Cluster sync", 6) ----------------------------------------


def test_sync_defaults_leave_sync_off_until_peers_are_set() -> None:
    config = Config.defaults()
    assert (config.udp_peers, config.udp_notify_port, config.sync_enabled,
            config.sync_secret, config.sync_heartbeat_ms, config.sync_dead_threshold_ms) == (
        "", 6633, True, "", 1000, 5000)
    assert config.sync_wanted is False
    assert parse({"QUEEN_UDP_PEERS": "b:6633"}).sync_wanted is True
    assert parse({"QUEEN_UDP_PEERS": "b:6633", "QUEEN_SYNC_ENABLED": "false"}).sync_wanted \
        is False


def test_udp_socket_binds_host_unless_udp_bind_is_set() -> None:
    assert parse({"HOST": "10.1.2.3"}).udp_interface == "10.1.2.3"
    assert parse({"HOST": "10.1.2.3", "QUEEN_UDP_BIND": "10.9.9.9"}).udp_interface == "10.9.9.9"


@pytest.mark.parametrize("peers, reason", [
    ("a:1,b:0", "QUEEN_UDP_PEERS: peer 'b:0': port '0' is not a number from 1 to 65535"),
    ("http://a/path", "QUEEN_UDP_PEERS: peer 'http://a/path': expected host[:port]"),
    ("a b", "QUEEN_UDP_PEERS: peer 'a b': 'a b' is not a host name"),
])
def test_a_bad_peer_entry_is_refused_naming_the_setting(peers: str, reason: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse({"QUEEN_UDP_PEERS": peers})
    assert str(refused.value).startswith(reason)


def test_a_peer_without_a_port_is_refused_when_the_local_port_is_any() -> None:
    with pytest.raises(ConfigError, match="QUEEN_UDP_PEERS: peer 'b' needs a port"):
        parse({"QUEEN_UDP_PEERS": "a:7000,b", "QUEEN_UDP_NOTIFY_PORT": "0"})


def test_the_dead_threshold_must_exceed_the_heartbeat() -> None:
    with pytest.raises(ConfigError, match="QUEEN_SYNC_DEAD_THRESHOLD_MS: must be more than "
                                          r"QUEEN_SYNC_HEARTBEAT_MS \(2000\), got 2000"):
        parse({"QUEEN_SYNC_HEARTBEAT_MS": "2000", "QUEEN_SYNC_DEAD_THRESHOLD_MS": "2000"})


def test_the_sync_secret_stays_out_of_repr_but_reaches_worker_processes() -> None:
    config = parse({"QUEEN_SYNC_SECRET": "hush-hush"})
    assert "hush-hush" not in repr(config)
    assert config.as_env()["QUEEN_SYNC_SECRET"] == "hush-hush"


@pytest.mark.parametrize("peers", ["127.0.0.1:6632,127.0.0.1:6642", "http://a:1,b:2",
                                   "http://a:1,ftp://b:2", "http://a:1,http://b:x",
                                   "http://a:1,http://b:2/queen"])
def test_ephemeral_peers_must_be_base_urls(peers) -> None:
    """The relay forwards to an entry + the request's path: an entry without http:// failed
    every forwarded request ("Unsupported scheme") instead of the start."""
    with pytest.raises(ConfigError, match="^QUEEN_EPHEMERAL_PEERS: .* is not a base URL"):
        parse({"QUEEN_EPHEMERAL_PEERS": peers, "QUEEN_EPHEMERAL_SELF": peers.split(",")[0]})


def test_ephemeral_peers_of_base_urls_are_taken() -> None:
    config = parse({"QUEEN_EPHEMERAL_PEERS": "http://a:1/, https://b.example:2",
                    "QUEEN_EPHEMERAL_SELF": "http://a:1"})
    assert config.ephemeral_self == "http://a:1"

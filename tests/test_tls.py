"""The HTTP listener chosen by an endpoint description (QUEEN_LISTEN / --listen, issue 17
point 6): native TLS with a certificate made here, a unix socket, and the one-line refusals.

The servers are real ``twistd queen`` processes on the session's PostgreSQL; the clients
check the server's certificate against the one the test made.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import socket
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from process_helpers import assert_refused_with, run_queen
from support import ServerProcess, free_port, unique_name, wait_until


def write_self_signed(directory: Path) -> tuple[Path, Path]:
    """A key and a self-signed certificate for 127.0.0.1 and localhost, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "queen-tw test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256()))
    key_file, cert_file = directory / "key.pem", directory / "cert.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_file, cert_file


def trusting(cert_file: Path) -> ssl.SSLContext:
    """A client TLS context that trusts ``cert_file`` alone."""
    return ssl.create_default_context(cafile=str(cert_file))


class TlsServer(ServerProcess):
    """A server listening with TLS on its port; healthy once /health answers over TLS with
    the certificate the test trusts."""

    def __init__(self, pg_env: dict[str, str], workdir: Path, cert_file: Path,
                 key_file: Path) -> None:
        port = free_port()
        super().__init__(pg_env, workdir, {"QUEEN_LISTEN": (
            f"ssl:{port}:interface=127.0.0.1:privateKey={key_file}:certKey={cert_file}")},
            port=port)
        self.cert_file = cert_file

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _wait_healthy(self, timeout: float) -> None:
        def healthy() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log_tail()}")
            try:
                return httpx.get(f"{self.url}/health", verify=trusting(self.cert_file),
                                 timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        wait_until(healthy, timeout, interval=0.1, message="the TLS server answering /health")


@pytest.fixture
def workdir() -> Iterator[Path]:
    # a short path of its own: unix socket paths are limited to ~100 bytes
    path = Path(tempfile.mkdtemp(prefix="qtw-tls-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tls_server(pg_env: dict[str, str], workdir: Path) -> Iterator[TlsServer]:
    key_file, cert_file = write_self_signed(workdir)
    server = TlsServer(pg_env, workdir / "server", cert_file, key_file)
    server.start()
    yield server
    server.stop()


def test_tls_listener_serves_health_and_a_push_pop_round_trip(tls_server: TlsServer) -> None:
    queue = unique_name()
    with httpx.Client(base_url=tls_server.url, verify=trusting(tls_server.cert_file),
                      timeout=20) as client:
        assert client.get("/health").status_code == 200
        pushed = client.post("/api/v1/push", json={"items": [
            {"queue": queue, "payload": {"over": "tls"}}]})
        assert pushed.status_code == 201, pushed.text
        popped = client.get(f"/api/v1/pop/queue/{queue}",
                            params={"wait": "false", "autoAck": "true"})

    assert popped.status_code == 200, popped.text
    assert [m["data"] for m in popped.json()["messages"]] == [{"over": "tls"}]


def test_tls_listener_does_not_speak_plain_http(tls_server: TlsServer) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{tls_server.port}/health", timeout=10)


def test_a_client_that_does_not_trust_the_certificate_is_refused(tls_server: TlsServer) -> None:
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{tls_server.url}/health", timeout=10)  # the system's trust store


class UnixServer(ServerProcess):
    """A server on a unix socket; healthy once /health answers over it."""

    def __init__(self, pg_env: dict[str, str], workdir: Path, path: Path) -> None:
        super().__init__(pg_env, workdir, {"QUEEN_LISTEN": f"unix:{path}"})
        self.socket_path = path

    def _wait_healthy(self, timeout: float) -> None:
        def healthy() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log_tail()}")
            try:
                with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket_path)),
                                  timeout=2) as client:
                    return client.get("http://queen/health").status_code == 200
            except httpx.HTTPError:
                return False
        wait_until(healthy, timeout, interval=0.1, message="the server answering on its socket")


def test_unix_socket_listener_serves_http(pg_env: dict[str, str], workdir: Path) -> None:
    path = workdir / "queen.sock"
    server = UnixServer(pg_env, workdir / "server", path)
    server.start()
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), timeout=20) as client:
            answer = client.get("http://queen/health")
    finally:
        server.stop()

    assert answer.status_code == 200, answer.text


# -- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["env", "flag"])
def test_an_unknown_endpoint_type_refuses_to_start(how: str, tmp_path: Path) -> None:
    env = {"FILE_BUFFER_DIR": str(tmp_path / "buffers")}
    if how == "env":
        result = run_queen(env={**env, "QUEEN_LISTEN": "bogus:6632"})
    else:
        result = run_queen("--listen", "bogus:6632", env=env)

    assert_refused_with(result, "QUEEN_LISTEN: cannot use 'bogus:6632': Unknown endpoint type")


def test_a_missing_certificate_file_refuses_to_start(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "key.pem"

    result = run_queen(env={"FILE_BUFFER_DIR": str(tmp_path / "buffers"),
                            "QUEEN_LISTEN": f"ssl:0:privateKey={missing}"})

    assert_refused_with(result, f"QUEEN_LISTEN: cannot use 'ssl:0:privateKey={missing}': "
                                f"No such file or directory ({missing})")


def test_a_file_that_is_not_a_certificate_refuses_to_start(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")

    result = run_queen(env={"FILE_BUFFER_DIR": str(tmp_path / "buffers"),
                            "QUEEN_LISTEN": f"ssl:0:privateKey={junk}"})

    assert_refused_with(result, f"QUEEN_LISTEN: cannot use 'ssl:0:privateKey={junk}': not a "
                                "usable PEM private key and certificate")


def test_a_tls_port_in_use_refuses_to_start(tmp_path: Path) -> None:
    key_file, cert_file = write_self_signed(tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        description = (f"ssl:{port}:interface=127.0.0.1:privateKey={key_file}:"
                       f"certKey={cert_file}")

        result = run_queen(env={"FILE_BUFFER_DIR": str(tmp_path / "buffers"),
                                "QUEEN_LISTEN": description})

    assert_refused_with(result, f"cannot listen on {description}: address already in use "
                                "(check QUEEN_LISTEN)")


def test_a_description_with_several_workers_refuses_to_start(tmp_path: Path) -> None:
    result = run_queen(env={"FILE_BUFFER_DIR": str(tmp_path / "buffers"),
                            "QUEEN_LISTEN": "tcp:6632", "NUM_WORKERS": "2"})

    assert_refused_with(result, "QUEEN_LISTEN: not supported with NUM_WORKERS > 1")

"""A Flower deployment on loopback, started as the docs' "Across machines" recipe
(docs/guide/flower.md) starts one: a SuperLink (optionally TLS with a private CA, and SuperNode
authentication: only registered keys connect), SuperNodes with their node configs, `flwr` against
it. Every process runs in its own process group and is stopped by its PID. Used by
tests/test_flower.py and benchmarks/flower_rounds.py."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def make_certificates(folder: Path, host: str = "127.0.0.1") -> dict[str, Path]:
    """A private CA (ca.crt) and a server certificate for `host` signed by it (server.pem,
    server.key), as `openssl` would make them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "falkit test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    out = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    out["ca"].write_bytes(ca.public_bytes(pem))
    out["cert"].write_bytes(cert.public_bytes(pem))
    out["key"].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    return out


def make_node_key(path: Path) -> tuple[Path, Path]:
    """A SuperNode's EC key pair in OpenSSH format (`ssh-keygen -t ecdsa -b 384 -N ""`):
    `path` (private) and `path`.pub."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    pub = path.with_name(path.name + ".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH))
    return path, pub


class Deployment:
    """A SuperLink and one SuperNode per node config on 127.0.0.1. `tls`: the SuperLink
    serves TLS with certificates of a CA made here; `auth` (needs tls): SuperNode
    authentication, each node's key registered with `flwr supernode register` before it
    starts. `env` may add environment variables for every process (polling intervals)."""

    def __init__(self, tmp: Path, node_configs: list[str], tls: bool = False,
                 auth: bool = False, env: dict[str, str] | None = None):
        self.tmp, self.procs, self.logs = tmp, {}, {}
        self.link_port, *self.node_ports = free_ports(1 + len(node_configs))
        home = tmp / "flwr"
        home.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
        address = f"127.0.0.1:{self.link_port}"
        link = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port",
                str(self.link_port), "--disable-runtime-dependency-installation",
                "--database", str(tmp / "state.db")]
        if tls:
            self.certs = make_certificates(tmp / "certificates")
            link += ["--ssl-ca-certfile", str(self.certs["ca"]), "--ssl-certfile",
                     str(self.certs["cert"]), "--ssl-keyfile", str(self.certs["key"])]
            if auth:
                link.append("--enable-supernode-auth")
            conn = f'root-certificates = "{self.certs["ca"]}"'  # flwr: an absolute path
        else:
            link.append("--insecure")
            conn = "insecure = true"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "deployment"\n\n[superlink.deployment]\n'
            f'address = "{address}"\n{conn}\n')
        self.start("superlink", link)
        self.wait_for_superlink()
        for i, (port, node_config) in enumerate(zip(self.node_ports, node_configs,
                                                   strict=True)):
            node = [str(BIN / "flower-supernode"), "--superlink", address, "--host",
                    "127.0.0.1", "--port", str(port), "--node-config", node_config]
            if tls:
                node += ["--root-certificates", str(self.certs["ca"])]
                if auth:
                    private, public = make_node_key(tmp / f"site{i}")
                    self.flwr("supernode", "register", str(public), "deployment")
                    node += ["--auth-supernode-private-key", str(private)]
            else:
                node.append("--insecure")
            self.start(f"node{i}", node)

    def wait_for_superlink(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:  # its API is up before the SuperNodes and the jobs connect
            try:
                socket.create_connection(("127.0.0.1", self.link_port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def start(self, name: str, cmd: list[str]) -> None:
        log = (self.tmp / f"{name}.log").open("w")
        self.logs[name] = log
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self, name: str) -> None:
        """SIGTERM, then SIGKILL, to the process group of the process we started (its
        SuperExec and ClientApp children included)."""
        proc = self.procs.pop(name)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        self.logs.pop(name).close()

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def flwr(self, *args: str, timeout: float = 120.0) -> str:
        out = subprocess.run([str(BIN / "flwr"), *args], env=self.env, capture_output=True,
                             text=True, timeout=timeout, cwd=self.tmp)
        if out.returncode != 0:
            raise AssertionError(f"flwr {' '.join(args)}: {out.stdout}{out.stderr}")
        return out.stdout + out.stderr

    def flwr_run(self, app: Path, run_config: str, stream: bool = False) -> subprocess.Popen:
        cmd = [str(BIN / "flwr"), "run", str(app), "deployment", "--run-config", run_config]
        if stream:
            cmd.append("--stream")
        return subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=self.tmp)

    def runs(self) -> list[dict]:
        """`flwr ls --format json`: every run with its status."""
        return json.loads(self.flwr("ls", "deployment", "--format", "json"))["runs"]

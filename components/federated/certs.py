"""TLS certificates and SuperNode authentication keys for a Flower deployment.

`make_certificates` creates a private CA and a SuperLink server certificate (SANs: localhost,
127.0.0.1 and any extra hosts). `make_supernode_keys` creates one EC P-384 key pair per site in
OpenSSH format, which `flower-supernode --auth-supernode-private-key` and
`flwr supernode register` expect. Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from components.errors import ConfigError

DEFAULT_HOSTS = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class CertPaths:
    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class KeyPair:
    private_key: Path
    public_key: Path


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path


def _san(hosts: Iterable[str]):
    from cryptography import x509

    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_certificates(
    out_dir: str | Path, hosts: Iterable[str] = DEFAULT_HOSTS, days: int = 365
) -> CertPaths:
    """Write `ca.crt`, `server.pem`, `server.key` (and `ca.key`) under `out_dir`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    hosts = [h for h in hosts if h]
    if not hosts:
        raise ConfigError("the SuperLink certificate needs at least one host name or IP")
    out = Path(out_dir)
    now = dt.datetime.now(dt.UTC)
    not_after = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "oncoflow federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    _write(out / "ca.key", ca_key.private_bytes(pem, pkcs8, none), private=True)
    paths = CertPaths(
        ca_cert=_write(out / "ca.crt", ca_cert.public_bytes(pem)),
        server_cert=_write(out / "server.pem", server_cert.public_bytes(pem)),
        server_key=_write(out / "server.key", server_key.private_bytes(pem, pkcs8, none), True),
    )
    return paths


def make_supernode_keys(out_dir: str | Path, sites: Iterable[str]) -> dict[str, KeyPair]:
    """One EC P-384 key pair per site: `<site>.key` (OpenSSH private) and `<site>.pub`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from components.federated.partition import safe_site_name

    out = Path(out_dir)
    pairs: dict[str, KeyPair] = {}
    for site in sites:
        key = ec.generate_private_key(ec.SECP384R1())
        stem = safe_site_name(site)
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        pairs[site] = KeyPair(
            private_key=_write(out / f"{stem}.key", private, private=True),
            public_key=_write(out / f"{stem}.pub", public + b"\n"),
        )
    return pairs


__all__ = ["CertPaths", "KeyPair", "make_certificates", "make_supernode_keys"]

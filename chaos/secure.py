"""Everything a mesh needs to run with its security settings on, made up for
a test or a chaos run: a CA, one certificate for the loopback address every
peer uses, a tokens file with an admin token and tenant tokens, and the
environment that hands them to the peers (files, never argv).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from raftmesh.mesh.auth import token_digest


@dataclass(frozen=True)
class SecureSetup:
    ca: Path
    cert: Path
    key: Path
    tokens_file: Path
    admin_token: str
    # The admin token again, in a file of its own (MESH_API_TOKEN_FILE).
    admin_token_file: Path
    # tenant -> its token
    tenant_tokens: dict[str, str] = field(default_factory=dict)

    def peer_env(self) -> dict[str, str]:
        """What every peer of the mesh gets: TLS on, the CA, the tokens file."""
        return {
            "MESH_TLS_CERT": str(self.cert),
            "MESH_TLS_KEY": str(self.key),
            "MESH_CA": str(self.ca),
            "MESH_API_TOKENS_FILE": str(self.tokens_file),
        }


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def make_certificates(dir: Path, host: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """A CA and a certificate for ``host`` (an IP address) that it signed:
    the paths of the CA's certificate, the peer's certificate and its key."""
    dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "raftmesh test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
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
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = dir / "ca.pem", dir / "peer.pem", dir / "peer.key"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return ca_path, cert_path, key_path


def write_tokens_file(path: Path, admin_token: str, tenant_tokens: dict[str, str]) -> None:
    """The tokens file (mesh/auth.py): digests only, never the tokens."""
    lines = [f'[[token]]\nsha256 = "{token_digest(admin_token)}"\ntenant = "ops"\nadmin = true\n']
    for tenant, token in tenant_tokens.items():
        lines.append(
            f'[[token]]\nsha256 = "{token_digest(token)}"\ntenant = "{tenant}"\nadmin = false\n'
        )
    _write_private(path, "\n".join(lines).encode())


def make_secure_setup(dir: Path, tenants: tuple[str, ...] = ("alpha", "beta")) -> SecureSetup:
    ca, cert, key = make_certificates(dir)
    admin = secrets.token_urlsafe(24)
    tenant_tokens = {t: secrets.token_urlsafe(24) for t in tenants}
    tokens_file = dir / "tokens.toml"
    write_tokens_file(tokens_file, admin, tenant_tokens)
    admin_file = dir / "admin.token"
    _write_private(admin_file, admin.encode())
    return SecureSetup(ca, cert, key, tokens_file, admin, admin_file, tenant_tokens)

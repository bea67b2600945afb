"""A throwaway certificate authority for TLS tests, made at run time with ``cryptography``.

Nothing here is ever committed: each test session writes its CA, server and client
certificates and their keys into a temporary directory and forgets them.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_Key = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Pair:
    cert: str
    key: str


@dataclass(frozen=True)
class Pki:
    ca: str
    """The CA certificate that signed ``server`` and ``client``."""
    server: Pair
    """For 127.0.0.1 and localhost."""
    client: Pair
    other_ca: str
    """A CA that signed nothing here: trusting it alone must fail."""
    other_server: Pair
    """A certificate for 127.0.0.1 signed by ``other_ca``."""
    wrong_host: Pair
    """Signed by ``ca``, but for another host (broker.example.com), not 127.0.0.1."""


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(key: _Key, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _make_ca(common: str) -> tuple[_Key, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(common)).issuer_name(_name(common))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _issue(ca_key: _Key, ca_cert: x509.Certificate, common: str, server: bool,
           hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> tuple[_Key, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder()
               .subject_name(_name(common)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False))
    if server:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate (127.0.0.1, localhost), a client certificate, and an
    unrelated CA with a server certificate of its own."""
    directory.mkdir(parents=True, exist_ok=True)

    def save(stem: str, key: _Key, cert: x509.Certificate) -> Pair:
        _write_key(key, directory / f"{stem}.key")
        _write_cert(cert, directory / f"{stem}.pem")
        return Pair(str(directory / f"{stem}.pem"), str(directory / f"{stem}.key"))

    ca_key, ca_cert = _make_ca("fleetmq test CA")
    ca = save("ca", ca_key, ca_cert)
    server = save("server", *_issue(ca_key, ca_cert, "127.0.0.1", server=True))
    client = save("client", *_issue(ca_key, ca_cert, "fleetmq-manager", server=False))
    other_key, other_cert = _make_ca("someone else's CA")
    other = save("other-ca", other_key, other_cert)
    other_server = save("other-server", *_issue(other_key, other_cert, "127.0.0.1", server=True))
    wrong_host = save("wrong-host", *_issue(ca_key, ca_cert, "broker.example.com", server=True,
                                            hosts=("broker.example.com",)))
    return Pki(ca=ca.cert, server=server, client=client, other_ca=other.cert,
               other_server=other_server, wrong_host=wrong_host)

"""Identities from certificates, and a development PKI that issues one for every role.

Every caller is identified by its client certificate, never by what a request says. A
certificate names its holder's role, and for a booking agency its ORI, as URI subject
alternative names::

    urn:fedprint:role:booking-agency
    urn:fedprint:ori:XX0010000

``fedprint certs DIR`` writes ``ca.pem`` (and the CA's key, so that more identities can be
issued later) and a certificate and key per identity:

================== =============== ===================================================
file               role            used by
================== =============== ===================================================
``coordinator``    coordinator     the coordinator's server, and its calls to nodes and ICE
``iafis``/``ident`` gallery-node    the nodes' servers; a sharded node's router calls its shards
``ice``            ice             the ICE service's server, and ICE reading its queue
``admin``          gallery-admin   enrolling and removing gallery subjects, gallery statistics
``examiner``       examiner        examiner review
``agency-<ORI>``   booking-agency  one per booking agency, naming its ORI
================== =============== ===================================================

Production deployments bring their own PKI; the file layout and the URI names are the same.
"""

from __future__ import annotations

import datetime as dt
import enum
import functools
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedprint.validation import ORI

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
ROLE_URI = "urn:fedprint:role:"
ORI_URI = "urn:fedprint:ori:"


class Role(enum.StrEnum):
    """Who a certificate's holder is, as far as access is concerned (DESIGN.md section 8)."""

    BOOKING_AGENCY = "booking-agency"
    COORDINATOR = "coordinator"
    GALLERY_ADMIN = "gallery-admin"
    EXAMINER = "examiner"
    ICE = "ice"
    #: A gallery node's server identity; a sharded node's router calls its own shards with it.
    GALLERY_NODE = "gallery-node"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files one identity needs for mTLS."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, directory: Path, name: str) -> TlsFiles:
        return cls(directory / "ca.pem", directory / f"{name}.pem", directory / f"{name}.key")


def agency_name(ori: str) -> str:
    """The file name (without suffix) of the booking agency ``ori``'s identity in a PKI directory."""
    return f"agency-{ori}"


#: The fixed identities of a federation: file name -> role (agencies come on top, one per ORI).
SERVICE_IDENTITIES: dict[str, Role] = {
    "coordinator": Role.COORDINATOR,
    "iafis": Role.GALLERY_NODE,
    "ident": Role.GALLERY_NODE,
    "ice": Role.ICE,
    "admin": Role.GALLERY_ADMIN,
    "examiner": Role.EXAMINER,
}
_ROLE_NAMES = frozenset(role.value for role in Role)
#: Identities that serve: their certificates also carry the server-authentication usage.
_SERVERS = frozenset({Role.COORDINATOR, Role.GALLERY_NODE, Role.ICE})


@dataclass(frozen=True)
class Identity:
    """The authenticated holder of a client certificate."""

    #: The certificate's subject, RFC 4514 (``CN=agency-XX0010000,O=fedprint development``).
    subject: str
    #: None when the certificate names no role, an unknown one, or more than one.
    role: Role | None
    #: The agency's ORI; None for other roles, or when an agency certificate names none validly.
    ori: str | None
    serial: int

    def describe(self) -> dict[str, str]:
        """Fields for a log or audit entry."""
        return {
            "subject": self.subject,
            "role": self.role.value if self.role else "",
            "ori": self.ori or "",
            "serial": f"{self.serial:x}",
        }


@functools.lru_cache(maxsize=1024)
def identity_of(pem: bytes) -> Identity:
    """Reads role and ORI from a certificate's URI subject alternative names (cached: every call
    of a connection presents the same certificate)."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        uris: list[str] = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    roles = [u.removeprefix(ROLE_URI) for u in uris if u.startswith(ROLE_URI)]
    oris = [u.removeprefix(ORI_URI) for u in uris if u.startswith(ORI_URI)]
    role = Role(roles[0]) if len(roles) == 1 and roles[0] in _ROLE_NAMES else None
    ori = oris[0] if role is Role.BOOKING_AGENCY and len(oris) == 1 and ORI.valid(oris[0]) else None
    return Identity(cert.subject.rfc4514_string(), role, ori, cert.serial_number)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedprint development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    """Writes a private key readable by its owner only (created so, never widened afterwards)."""
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    path.write_bytes(data)


def _host_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


class DevCa:
    """A development certificate authority kept in a directory (``ca.pem``, ``ca.key``)."""

    def __init__(self, directory: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.directory = directory
        self.cert = cert
        self.key = key

    @classmethod
    def create(cls, directory: Path, days: int = 365, name: str = "fedprint development CA") -> DevCa:
        directory.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(directory / "ca.key", _pem_key(key))
        return cls(directory, cert, key)

    @classmethod
    def load(cls, directory: Path) -> DevCa:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{directory / 'ca.key'} is not an EC private key")
        return cls(directory, cert, key)

    @classmethod
    def open(cls, directory: Path, days: int = 365) -> DevCa:
        """The CA in ``directory``, created there if it holds none."""
        if (directory / "ca.pem").exists() and (directory / "ca.key").exists():
            return cls.load(directory)
        return cls.create(directory, days)

    def issue(
        self,
        name: str,
        role: Role,
        *,
        ori: str | None = None,
        hosts: Sequence[str] = DEFAULT_HOSTS,
        days: int = 365,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> TlsFiles:
        """Issues ``name``'s certificate and key for ``role`` (a booking agency needs its ``ori``).

        Servers' certificates name ``hosts`` (and ``name``) as subject alternative names; ``not_before``
        and ``not_after`` override the validity (tests issue expired certificates with them).
        """
        if role is Role.BOOKING_AGENCY and (ori is None or not ORI.valid(ori)):
            raise ValueError(f"a booking agency's certificate needs a valid ORI, not {ori!r}")
        now = dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        uris: list[x509.GeneralName] = [x509.UniformResourceIdentifier(ROLE_URI + role.value)]
        if ori is not None:
            uris.append(x509.UniformResourceIdentifier(ORI_URI + ori))
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if role in _SERVERS:
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        alt_names = [*_host_names(hosts), x509.DNSName(name), *uris]
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - dt.timedelta(minutes=5))
            .not_valid_after(not_after or now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        files = TlsFiles.in_dir(self.directory, name)
        # Key first: a server reloading on a changed certificate must find the matching key.
        _write_private(files.key, _pem_key(key))
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return files


def issue_dev_pki(
    directory: Path,
    oris: Sequence[str] = (),
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = 365,
) -> dict[str, TlsFiles]:
    """A CA in ``directory`` (reused when there is one) and an identity for every service and role,
    plus one booking-agency identity per ORI in ``oris``; keyed by file name."""
    ca = DevCa.open(directory, days)
    issued = {name: ca.issue(name, role, hosts=hosts, days=days) for name, role in SERVICE_IDENTITIES.items()}
    for ori in oris:
        issued[agency_name(ori)] = ca.issue(agency_name(ori), Role.BOOKING_AGENCY, ori=ori, days=days)
    return issued

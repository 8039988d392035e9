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

A server's certificate also names the service it is as a DNS name, ``<service>.fedprint``
(:func:`service_host`), beside the hosts it is reached at (its own only): clients connect with that
name as the TLS target (:func:`fedprint.rpc.open_channel`), so a certificate of another service,
though from the same CA, fails the handshake. Certificates are short-lived (:data:`DEFAULT_DAYS`);
running ``fedprint certs DIR`` again renews them under the same CA, and servers pick renewed files
up without a restart. ``fedprint certs revoke NAME|SERIAL`` adds a certificate to ``crl.pem``
(:func:`revoke`), which every server checks each caller against (:class:`RevocationList`).

Production deployments bring their own PKI; the file layout and the names are the same.
"""

from __future__ import annotations

import datetime as dt
import enum
import functools
import ipaddress
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedprint.validation import ORI

log = structlog.get_logger(__name__)

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
#: Days a development identity is valid: a leaked key is useful for weeks at most, and renewal is
#: one command (``fedprint certs DIR`` again).
DEFAULT_DAYS = 30
#: Days the development CA is valid: it outlives many renewals of the identities it signs.
CA_DAYS = 365
#: The revocation list's file name in a PKI directory (absent: nothing is revoked).
CRL_FILE = "crl.pem"
#: Suffix of the DNS name that says which service a server certificate belongs to.
SERVICE_SUFFIX = ".fedprint"
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
    #: The CA's certificate revocation list; a server refuses callers it names. None, or a file
    #: that does not exist (yet), revokes nothing.
    crl: Path | None = None

    @classmethod
    def in_dir(cls, directory: Path, name: str) -> TlsFiles:
        """``name``'s files in a directory ``fedprint certs`` wrote (with its ``crl.pem``)."""
        return cls(
            directory / "ca.pem", directory / f"{name}.pem", directory / f"{name}.key", directory / CRL_FILE
        )


def service_host(service: str) -> str:
    """The DNS name a server certificate carries to say it is ``service``'s (``iafis.fedprint``),
    and the TLS target name a client expecting that service verifies."""
    return service + SERVICE_SUFFIX


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
#: Identities that serve (each is its own service): their certificates name the service and its
#: hosts, and carry the server-authentication usage.
SERVICES = ("coordinator", "iafis", "ident", "ice")


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
    def create(cls, directory: Path, days: int = CA_DAYS, name: str = "fedprint development CA") -> DevCa:
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
    def open(cls, directory: Path, days: int = CA_DAYS) -> DevCa:
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
        service: str | None = None,
        hosts: Sequence[str] = DEFAULT_HOSTS,
        days: int = DEFAULT_DAYS,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> TlsFiles:
        """Issues ``name``'s certificate and key for ``role`` (a booking agency needs its ``ori``).

        A server's certificate (``service`` given: ``coordinator``, ``iafis``, ``ident``, ``ice``)
        names :func:`service_host` of it and the ``hosts`` it is reached at as subject alternative
        names; a client's names none. ``not_before`` and ``not_after`` override the validity
        (tests issue expired certificates with them).
        """
        if role is Role.BOOKING_AGENCY and (ori is None or not ORI.valid(ori)):
            raise ValueError(f"a booking agency's certificate needs a valid ORI, not {ori!r}")
        # A host named like a service name would let that certificate pass for the service.
        if bad := [h for h in hosts if h.lower().rstrip(".").endswith(SERVICE_SUFFIX)]:
            raise ValueError(f"{', '.join(bad)}: names ending in {SERVICE_SUFFIX} name services, not hosts")
        now = dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        uris: list[x509.GeneralName] = [x509.UniformResourceIdentifier(ROLE_URI + role.value)]
        if ori is not None:
            uris.append(x509.UniformResourceIdentifier(ORI_URI + ori))
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if service is not None:
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        served = [x509.DNSName(service_host(service)), *_host_names(hosts)] if service is not None else []
        alt_names = [*served, *uris]
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
    days: int = DEFAULT_DAYS,
    service_hosts: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, TlsFiles]:
    """A CA in ``directory`` (reused when there is one) and an identity for every service and role,
    plus one booking-agency identity per ORI in ``oris``; keyed by file name. Run again, it renews
    every identity (new keys, new validity) under the same CA.

    Each service's certificate names its service (:func:`service_host`), the ``hosts`` every
    service shares (loopback, on one machine), and its own ``service_hosts[service]`` only.
    """
    extra = dict(service_hosts or {})
    if unknown := sorted(set(extra) - set(SERVICES)):
        raise ValueError(f"hosts for {', '.join(unknown)}: only {', '.join(SERVICES)} serve")
    ca = DevCa.open(directory)
    issued = {
        name: ca.issue(
            name,
            role,
            service=name if name in SERVICES else None,
            hosts=[*hosts, *extra.get(name, ())] if name in SERVICES else (),
            days=days,
        )
        for name, role in SERVICE_IDENTITIES.items()
    }
    for ori in oris:
        issued[agency_name(ori)] = ca.issue(agency_name(ori), Role.BOOKING_AGENCY, ori=ori, days=days)
    return issued


def _serial_of(directory: Path, name_or_serial: str) -> int:
    """The serial of identity ``name_or_serial`` in ``directory`` (its ``<name>.pem``), or the serial
    itself given in hex (as logs and audit entries write it, ``0x`` optional)."""
    cert = directory / f"{name_or_serial}.pem"
    if "/" not in name_or_serial and cert.is_file():
        return int(x509.load_pem_x509_certificate(cert.read_bytes()).serial_number)
    try:
        return int(name_or_serial.removeprefix("0x"), 16)
    except ValueError:
        what = f"{name_or_serial!r} is neither an identity in {directory} nor a hex serial"
        raise ValueError(what) from None


def revoke(directory: Path, names_or_serials: Sequence[str], *, days: int = CA_DAYS) -> list[int]:
    """Adds certificates (an identity's file name in ``directory``, or a serial in hex) to the CA's
    revocation list ``directory/crl.pem``, signed by the CA; returns the serials added.

    Entries stay for good: renewing a revoked identity (``fedprint certs DIR``) issues a new
    certificate with a new serial, and the leaked one stays refused. The file is replaced whole
    (written beside it, then renamed), so a server never reads half a list.
    """
    ca = DevCa.load(directory)
    serials = [_serial_of(directory, n) for n in names_or_serials]
    path = directory / CRL_FILE
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=days))
    )
    known: set[int] = set()
    if path.exists():
        for entry in load_revocations(path, ca.cert):
            known.add(entry.serial_number)
            builder = builder.add_revoked_certificate(entry)
    added = [s for s in dict.fromkeys(serials) if s not in known]
    for serial in added:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    crl = builder.sign(ca.key, hashes.SHA256())
    staged = path.with_name(f".{CRL_FILE}.new")
    staged.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    staged.replace(path)
    return added


def load_revocations(path: Path, ca: x509.Certificate) -> x509.CertificateRevocationList:
    """The revocation list in ``path``, checked to be signed by ``ca`` (ValueError otherwise)."""
    crl = x509.load_pem_x509_crl(path.read_bytes())
    public = ca.public_key()
    if crl.issuer != ca.subject or not isinstance(public, ec.EllipticCurvePublicKey):
        raise ValueError(f"{path} is not {ca.subject.rfc4514_string()}'s revocation list")
    if not crl.is_signature_valid(public):
        raise ValueError(f"{path} does not carry a valid signature of {ca.subject.rfc4514_string()}")
    return crl


class RevocationList:
    """The serials a CA revoked, re-read from its CRL file when the file changes.

    grpcio's Python credentials take no CRL, so servers ask :meth:`revoked` for each call's
    certificate (:class:`fedprint.access.AccessInterceptor`). Each question costs one ``stat`` of the
    file: a list replaced (``fedprint certs revoke``, a mounted ConfigMap updated) counts from the
    next call. An absent file revokes nothing; a file that does not read or verify keeps the last
    good list (logged), so a bad write never lets a revoked certificate back in.
    """

    def __init__(self, path: Path, ca: Path) -> None:
        self.path = path
        self.ca = ca
        self._seen: tuple[int, int, int] | None = None
        self._serials: frozenset[int] = frozenset()
        self.reloads = 0
        #: The last reason the file was not taken (empty while the list in force is the file's).
        self.error = ""
        self._refresh(strict=True)

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            s = os.stat(self.path)  # follows links: a ConfigMap volume swaps its ..data link
        except FileNotFoundError:
            return None
        return (s.st_mtime_ns, s.st_size, s.st_ino)

    def _refresh(self, *, strict: bool = False) -> None:
        signature = self._signature()
        if signature == self._seen:
            return
        if signature is None:
            self._serials, self._seen, self.error = frozenset(), None, ""
            return
        try:
            ca = x509.load_pem_x509_certificate(self.ca.read_bytes())
            crl = load_revocations(self.path, ca)
        except (OSError, ValueError) as error:
            if strict:  # at start-up: a server with an unreadable list does not start
                raise ValueError(f"revocation list {self.path}: {error}") from error
            # Not read again until the file changes again: a broken file costs one read, not one a call.
            self._seen, self.error = signature, str(error)
            log.error(
                "revocation list not taken; the previous one stays in force",
                path=str(self.path),
                error=str(error),
            )
            return
        self._serials = frozenset(entry.serial_number for entry in crl)
        self._seen, self.error = signature, ""
        self.reloads += 1
        log.info("revocation list loaded", path=str(self.path), revoked=len(self._serials))

    def revoked(self, serial: int) -> bool:
        """Whether the certificate with ``serial`` is revoked (re-reading a changed list first)."""
        self._refresh()
        return serial in self._serials

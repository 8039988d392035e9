"""``fedprint certs``: the development PKI. ``fedprint certs DIR`` issues (or renews) every
identity; ``fedprint certs revoke NAME|SERIAL`` adds a certificate to the CA's revocation list."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from fedprint.pki import CRL_FILE, DEFAULT_DAYS, DEFAULT_HOSTS, SERVICES, issue_dev_pki, revoke


class _IssueUnlessNamed(TyperGroup):
    """``fedprint certs DIR ...`` stays what it always was (``certs issue DIR ...``): arguments
    that do not start with a subcommand's name go to ``issue``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # click's Context, as typer vendors it
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = ["issue", *args]
        return super().parse_args(ctx, args)


def split_hosts(hosts: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """``--host`` values: ``HOST`` (every service's certificate names it) or ``SERVICE=HOST``
    (only that service's does); the shared hosts, and each service's own."""
    shared: list[str] = []
    own: dict[str, list[str]] = {}
    for value in hosts:
        service, sep, host = value.partition("=")
        if not sep:
            shared.append(value)
        elif service in SERVICES and host:
            own.setdefault(service, []).append(host)
        else:
            raise typer.BadParameter(
                f"{value!r}: give HOST or SERVICE=HOST, SERVICE one of {', '.join(SERVICES)}"
            )
    return shared, own


def register(app: typer.Typer, console: Console) -> None:
    """Adds the ``certs`` command group to ``app``."""
    certs_app = typer.Typer(
        cls=_IssueUnlessNamed,
        help=(
            "The development PKI: `fedprint certs DIR` issues or renews every identity, "
            "`fedprint certs revoke NAME|SERIAL` revokes one."
        ),
    )
    app.add_typer(certs_app, name="certs")

    @certs_app.command("issue")
    def issue(
        out: Annotated[Path, typer.Argument(help="directory for ca.pem and <identity>.pem/.key")] = Path(
            "pki"
        ),
        host: Annotated[
            list[str] | None,
            typer.Option(
                help=(
                    "a host the services are reached at (every service's certificate names it), or "
                    "SERVICE=HOST (only that service's: coordinator, iafis, ident, ice); repeatable. "
                    "Default: localhost and 127.0.0.1 for every service"
                )
            ),
        ] = None,
        ori: Annotated[
            list[str] | None,
            typer.Option(
                help="a booking agency's ORI (repeatable); default: the synthetic population's agencies"
            ),
        ] = None,
        days: Annotated[int, typer.Option(help="validity of each identity in days")] = DEFAULT_DAYS,
    ) -> None:
        """Creates a development CA (or reuses the one in OUT) and a certificate for every role: the
        coordinator, both nodes, ICE, a gallery administrator, an examiner, and one booking agency
        per ORI. Run again with the same options, it renews them all (new keys and validity, same
        CA); running services pick the new files up without a restart."""
        from fedprint.validation import ORI
        from synthetic.people import ORIS

        oris = ori or list(ORIS)
        if bad := [o for o in oris if not ORI.valid(o)]:
            raise typer.BadParameter(f"not an ORI (nine upper-case letters or digits): {', '.join(bad)}")
        shared, own = split_hosts(host) if host else (list(DEFAULT_HOSTS), {})
        try:
            issued = issue_dev_pki(out, oris=oris, hosts=shared, days=days, service_hosts=own)
        except ValueError as error:
            raise typer.BadParameter(str(error)) from error
        console.print(f"wrote ca.pem and certificates for {', '.join(issued)} to {out}, valid {days} days")

    @certs_app.command("revoke")
    def revoke_command(
        identities: Annotated[
            list[str],
            typer.Argument(
                help="an identity's file name in the directory (agency-XX0010000, iafis, ...) or a "
                "certificate serial in hex, as audit entries write it",
                metavar="NAME|SERIAL...",
            ),
        ],
        tls_dir: Annotated[
            Path, typer.Option(help="the directory `fedprint certs` wrote (with the CA's key)")
        ] = Path("pki"),
    ) -> None:
        """Revokes certificates: adds them to the CA's revocation list (crl.pem in the directory,
        signed by the CA). Every server reading that file refuses them from the next call on, with
        no restart; renew the identity (`fedprint certs DIR`) to give its holder a new one."""
        try:
            added = revoke(tls_dir, identities)
        except (OSError, ValueError) as error:
            raise typer.BadParameter(str(error)) from error
        serials = ", ".join(f"{s:x}" for s in added) or "none new (already revoked)"
        console.print(f"revoked {serials}; {tls_dir / CRL_FILE} updated")

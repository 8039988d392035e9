"""What every service's configuration has in common, and where its values come from.

Each service declares its own settings class on top of :class:`ServiceSettings`
(:mod:`nodes.gallery.config`, :mod:`federation.config`, :mod:`ice_service.config`).
A value is taken from the first of these that sets it (pydantic-settings' own sources):

1. the command line (``fedprint serve ... --listen``), passed to :meth:`ServiceSettings.load`;
2. the environment: ``FEDPRINT_<FIELD>``, nested fields joined by ``__``
   (``FEDPRINT_BATCHING__MAX_BATCH=32``);
3. the YAML configuration file (``--config``);
4. the field's default.

So an operator (or the Helm chart) overrides any file value from the environment. Secrets never
come from the configuration file: fields marked secret (the database URL, which carries a
password) are refused there, and are given through the environment or a ``*_file`` field naming
a file (a mounted Kubernetes Secret).
"""

from __future__ import annotations

from contextvars import ContextVar
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from fedprint.access import DenialLedger
from fedprint.pki import TlsFiles
from fedprint.tracing import TracingSettings

#: The YAML file :meth:`ServiceSettings.load` is reading (a context variable: the sources are
#: chosen by a class method, and two loads may run in one process).
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("fedprint_config_file", default=None)

#: Marks a field whose value is a secret: refused in the configuration file.
SECRET: dict[str, Any] = {"secret": True}


class SecretInConfigFile(ValueError):
    """The configuration file sets a field that may only come from the environment or a file."""


class _ConfigFileSource(YamlConfigSettingsSource):
    """The YAML configuration file, refusing secret fields and a top level that is not a mapping."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        if not path.is_file():
            # pydantic-settings skips a missing file silently; a mistyped --config must not.
            raise FileNotFoundError(f"configuration file {path} does not exist")
        super().__init__(settings_cls, yaml_file=path)
        self.path = path

    def _read_file(self, file_path: Path | Traversable) -> dict[str, Any]:
        data = super()._read_file(file_path)
        if not isinstance(data, dict):
            raise ValueError(f"{file_path}: top level must be a mapping")
        return data

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        secret = sorted(
            name
            for name, field in self.settings_cls.model_fields.items()
            if name in data
            and isinstance(field.json_schema_extra, dict)
            and field.json_schema_extra.get("secret")
        )
        if secret:
            env = ", ".join(f"FEDPRINT_{name.upper()}" for name in secret)
            raise SecretInConfigFile(
                f"{self.path}: {', '.join(secret)} is a secret and is not read from the configuration "
                f"file; give it in the environment ({env}) or name a file holding it "
                f"({', '.join(name + '_file' for name in secret)})"
            )
        return data


class RateLimit(BaseModel):
    """Calls a booking agency (one ORI) may make: ``per_second`` sustained, ``burst`` at once."""

    per_second: float = Field(default=20.0, gt=0)
    burst: int = Field(default=40, ge=1)


class RefusalBudget(BaseModel):
    """How often one caller may be refused before its refusals are refused for their number
    (RESOURCE_EXHAUSTED), and the window within which repeats of one refusal are audited as one
    entry with a count (fedprint.access.DenialLedger)."""

    per_second: float = Field(default=1.0, gt=0, description="refusals per caller per second, sustained")
    burst: int = Field(default=30, ge=1, description="refusals per caller at once")
    window_s: float = Field(default=60.0, gt=0, description="repeats within this are one audit entry")

    def ledger(self) -> DenialLedger:
        return DenialLedger(per_second=self.per_second, burst=self.burst, window_s=self.window_s)


class ServiceSettings(BaseSettings):
    """Settings shared by all four services."""

    model_config = SettingsConfigDict(env_prefix="FEDPRINT_", env_nested_delimiter="__", extra="forbid")

    listen: str = Field(default="127.0.0.1:0", description="host:port the gRPC server binds")
    data_dir: Path = Field(default=Path("data"), description="where the service keeps its SQLite files")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    tls: TlsFiles | None = Field(
        default=None, description="mTLS files (ca, cert, key) from `fedprint certs`; required unless insecure"
    )
    insecure: bool = Field(
        default=False,
        description="plaintext without caller identities, for local debugging only (warns at every start)",
    )

    metrics_listen: str | None = Field(
        default=None,
        description="host:port serving Prometheus metrics over HTTP at /metrics; off if unset",
    )
    health_listen: str | None = Field(
        default=None,
        description=(
            "host:port of a plaintext gRPC server carrying only grpc.health.v1 (for Kubernetes probes, "
            "which speak no mTLS); off if unset"
        ),
    )
    refusals: RefusalBudget = Field(
        default_factory=RefusalBudget, description="budget and audit window of refused calls, per caller"
    )
    tracing: TracingSettings | None = Field(
        default=None, description="OpenTelemetry traces: exporter and collector; off if unset"
    )
    database_url: SecretStr | None = Field(
        default=None,
        description="SQLAlchemy URL of its database (FEDPRINT_DATABASE_URL); SQLite in data_dir if unset",
        json_schema_extra=SECRET,
    )
    database_url_file: Path | None = Field(
        default=None,
        description="a file holding the database URL (a mounted Secret), instead of database_url",
    )

    @model_validator(mode="after")
    def _secure_unless_told(self) -> Self:
        if self.tls is None and not self.insecure:
            raise ValueError(
                "no tls section: give tls {ca, cert, key} (see `fedprint certs`), or set insecure: true "
                "(--insecure) for plaintext local debugging"
            )
        if self.tls is not None and self.insecure:
            raise ValueError("tls and insecure: true contradict each other; drop one")
        return self

    @model_validator(mode="after")
    def _one_database_url(self) -> Self:
        if self.database_url is not None and self.database_url_file is not None:
            raise ValueError("database_url and database_url_file are both set; give one")
        return self

    def resolved_database_url(self) -> str | None:
        """The database URL from the environment or its file; None for the service's SQLite default."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        if self.database_url_file is not None:
            url = self.database_url_file.read_text().strip()
            if not url:
                raise ValueError(f"{self.database_url_file} is empty")
            return url
        return None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Command line (constructor arguments) > environment > configuration file > defaults."""
        path = _CONFIG_FILE.get()
        if path is None:
            return (init_settings, env_settings)
        return (init_settings, env_settings, _ConfigFileSource(settings_cls, path))

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> Self:
        """The settings from ``overrides`` (the command line), the environment, the YAML file at
        ``path`` (if any) and the defaults, the first that sets a field winning."""
        token = _CONFIG_FILE.set(None if path is None else Path(path))
        try:
            return cls(**overrides)
        finally:
            _CONFIG_FILE.reset(token)

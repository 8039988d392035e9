"""What every service's configuration has in common: one YAML file, validated by pydantic.

Each service declares its own settings class on top of :class:`ServiceSettings`
(:mod:`nodes.gallery.config`, :mod:`federation.config`, :mod:`ice_service.config`).
Every field can be overridden from the environment (``FEDPRINT_<FIELD>``, nested
fields joined by ``__``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fedprint.pki import TlsFiles


class RateLimit(BaseModel):
    """Calls a booking agency (one ORI) may make: ``per_second`` sustained, ``burst`` at once."""

    per_second: float = Field(default=20.0, gt=0)
    burst: int = Field(default=40, ge=1)


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

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> Self:
        """Reads the YAML file (if any), then the environment, then ``overrides``."""
        data: dict[str, Any] = {}
        if path is not None:
            loaded = yaml.safe_load(Path(path).read_text())
            if loaded is not None and not isinstance(loaded, dict):
                raise ValueError(f"{path}: top level must be a mapping")
            data = loaded or {}
        # Explicit values (file, overrides) win over defaults; the environment sits between.
        return cls(**{**data, **overrides})

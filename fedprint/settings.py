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
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from fedprint.pki import TlsFiles


class ServiceSettings(BaseSettings):
    """Settings shared by all four services."""

    model_config = SettingsConfigDict(env_prefix="FEDPRINT_", env_nested_delimiter="__", extra="forbid")

    listen: str = Field(default="127.0.0.1:0", description="host:port the gRPC server binds")
    data_dir: Path = Field(default=Path("data"), description="where the service keeps its SQLite files")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    tls: TlsFiles | None = Field(
        default=None, description="mTLS files (ca, cert, key) from `fedprint certs`; plaintext if unset"
    )

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

"""Configuration of the ICE notification service."""

from __future__ import annotations

from fedprint.settings import ServiceSettings


class IceConfig(ServiceSettings):
    """The ICE notification service (receiving side)."""

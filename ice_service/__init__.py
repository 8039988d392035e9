"""The ICE notification service: the receiving side of the coordinator's notifications."""

from ice_service.server import IceNotificationServer, IceStore, build_ice

__all__ = ["IceNotificationServer", "IceStore", "build_ice"]

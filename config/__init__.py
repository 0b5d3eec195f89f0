"""Settings and stream/consumer definitions. Imports nothing from the other letta-bus packages."""

from config.settings import Settings

__all__ = ["Settings"]

"""Adapters over third-party clients."""

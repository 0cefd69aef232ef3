"""Helpers shared by every daqif server."""

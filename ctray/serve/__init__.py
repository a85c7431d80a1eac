"""Serving exported models over HTTP with Ray Serve (`ctray serve`), and a client for it.

Importing this package does not import Ray: ``ServeConfig`` and the client are enough for the
CLI and for users who only call a running server.
"""

from ctray.serve.client import CtrayClient, ServeError
from ctray.serve.config import ServeConfig

__all__ = ["CtrayClient", "ServeConfig", "ServeError"]

"""Stores: where envelopes live. `open_store(url)` picks one by URL scheme."""

from __future__ import annotations

from urllib.parse import urlsplit

from .base import STORE_URLS, Record, Store, StoreURLError, Write

__all__ = ["Record", "Store", "StoreURLError", "Write", "open_store", "redact"]


def redact(url: str) -> str:
    """`url` with any password replaced by ***: safe for messages, logs and reprs."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return parts._replace(netloc=f"***@{host}").geturl()


def open_store(url: str) -> Store:
    """Open the store a URL names: `sqlite:///file.db`, `sqlite://`, `http(s)://.../db`."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "sqlite":
        from .sqlite import SQLiteStore

        return SQLiteStore(url)
    if scheme in ("http", "https"):
        from .couchdb import CouchDBStore

        return CouchDBStore(url)
    raise StoreURLError(f"unknown store URL {redact(url)!r}: use {STORE_URLS}")

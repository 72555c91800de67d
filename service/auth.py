"""Who is calling. Every request is the single tenant "default" until API keys arrive (API.md's Bearer auth);
routes and queries already scope everything by this owner, so adding keys changes only this module."""

from __future__ import annotations

DEFAULT_OWNER = "default"


def current_owner() -> str:
    return DEFAULT_OWNER

"""Errors of the UI layer (the UI may not import `components.errors`, see ARCHITECTURE.md).

Every message is written for the person in front of the screen.
"""

from __future__ import annotations


class UiError(Exception):
    """Base class: something the user or operator can act on."""


class UiConfigError(UiError):
    """A UI setting (environment variable) is missing or invalid."""


class LoginRefused(UiError):
    """Sign-in refused: wrong credentials, locked or disabled account."""


class SessionExpired(UiError):
    """The session token is unknown, revoked or past its expiry."""


class PermissionDenied(UiError):
    """The signed-in user's role does not allow this action."""


class InvalidInput(UiError):
    """A form value is not acceptable (the message says why)."""


class NotFound(UiError):
    """The requested record does not exist or is not visible to this user."""

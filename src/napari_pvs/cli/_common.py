"""What every command group shares: the user-error type."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the command's input that the user can fix; printed without a traceback."""

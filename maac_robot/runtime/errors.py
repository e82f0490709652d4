"""Errors a user can cause and fix: the CLI prints their message as one line, no traceback."""


class UserError(Exception):
    """Base for errors whose message tells the user what is wrong and what to do."""

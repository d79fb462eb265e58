"""The one user-facing error type: the CLI prints it as a single ``error:`` line and exits 1."""


class MtkitError(Exception):
    """Bad input or a failed precondition the user can fix (a file, key or value is named)."""

"""The error every results writer raises when the disk refuses: exit 5."""

from __future__ import annotations

from typing import Final

from dispatcher.model import UserError

EXIT_WRITE_FAILED: Final = 5


def cleanup_warning(path: str, error: OSError, consequence: str) -> str:
    """One line for an end-of-run step on the disk that failed after every envelope was
    durable (removing the journal or the lock file): the run's outcome stands, so it is a
    warning with the path and the OS's reason, not a crash."""
    reason = error.strerror or str(error) or type(error).__name__
    return f"could not remove {path}: {reason}; {consequence}"


class ResultsWriteError(UserError):
    """The results (or the journal beside them) could not be written: exit 5.

    Nothing more is sent once it is raised; ``--resume`` continues from what is durable.
    """

    exit_code = EXIT_WRITE_FAILED

    def __init__(self, results: str, error: OSError | Exception) -> None:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        target = "standard output" if results == "-" else results
        super().__init__(f"cannot write results to {target}: {reason}")
        self.results = results
        self.error = error

"""The error every results writer raises when the disk refuses: exit 5."""

from __future__ import annotations

from typing import Final

from dispatcher.model import UserError

EXIT_WRITE_FAILED: Final = 5


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

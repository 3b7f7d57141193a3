"""The one exception type of the data package."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset problem found before training; the message names the file and the problem.

    ``problems`` holds every problem found (the message shows the first few), so that one
    check reports everything wrong with a dataset rather than stopping at the first file.
    """

    max_shown = 20

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems else [message]

    @classmethod
    def from_problems(cls, problems: list[str]) -> "DatasetError":
        shown = problems[: cls.max_shown]
        msg = "\n".join(shown)
        if len(problems) > len(shown):
            msg += f"\n... and {len(problems) - len(shown)} more problem(s)"
        if len(problems) > 1:
            msg = f"{len(problems)} dataset problems:\n" + msg
        return cls(msg, problems)

"""The one error the data layer raises for a dataset the user has to fix."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset problem the user must fix; the message names the file and what to do."""

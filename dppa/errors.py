"""One exception type for everything a user can fix; the CLI prints it as one line."""


class DppaError(Exception):
    """An input or usage problem, with a message naming the file or tensor and what to do."""

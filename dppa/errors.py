"""One exception type for everything a user can fix; the CLI prints it as one line."""


class DppaError(Exception):
    """An input or usage problem, with a message naming the file or tensor and what to do."""


DEBUG_ENV = "DPPA_DEBUG"  # set (not "0"): errors show their traceback, in this process and in the stages it starts


def debugging() -> bool:
    import os

    return os.environ.get(DEBUG_ENV, "") not in ("", "0")

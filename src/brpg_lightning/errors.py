"""User-facing errors: one line naming the file, key or value and what was expected."""


class BRPGInputError(ValueError):
    """Bad user input (config value, path, split, checkpoint). The message is one line.

    ``python -m brpg_lightning`` and ``python -m brpg_lightning.evaluate`` print ``error: <message>``
    and exit with status 2 when this is raised.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))

"""User-facing errors: one line naming the file, key or value and what was expected."""


class BRPGInputError(ValueError):
    """Bad user input (config value, path, split, checkpoint). The message is one line.

    ``python -m brpg_lightning`` and ``python -m brpg_lightning.evaluate`` print ``error: <message>``
    and exit with status 2 when this is raised.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class BRPGRunError(RuntimeError):
    """A run that did not do what was asked (stopped early for no stated reason, a non-finite loss, reported
    checkpoints missing). The message is one line; ``python -m brpg_lightning`` prints ``error: <message>`` and
    exits with status 3 (``cli.EXIT_RUN_FAILED``)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class NonFiniteLossError(BRPGRunError):
    """A NaN or inf loss term stopped the run (``nonfinite_loss=stop``)."""


def input_error_in(exc: BaseException) -> BRPGInputError | None:
    """The :class:`BRPGInputError` that is ``exc`` or caused it, following ``__cause__`` (or, when there is
    none, ``__context__``); ``None`` if the chain holds none. Hydra's instantiation and OmegaConf's
    interpolation wrap the errors they meet, so the one-line message sits somewhere down the chain.

    >>> try:
    ...     try:
    ...         raise BRPGInputError("split is not set")
    ...     except BRPGInputError as err:
    ...         raise RuntimeError("Error in call to target") from err
    ... except RuntimeError as wrapped:
    ...     print(input_error_in(wrapped))
    split is not set
    >>> input_error_in(KeyError("x")) is None
    True
    """
    cause: BaseException | None = exc
    seen: set[int] = set()  # a hand-made cycle in the chain must not loop forever
    while cause is not None and not isinstance(cause, BRPGInputError) and id(cause) not in seen:
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return cause if isinstance(cause, BRPGInputError) else None

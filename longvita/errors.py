"""Errors the user can fix. All are ValueErrors, so callers may catch either."""


class MediaError(ValueError):
    """An image or video that is missing, unreadable, too large or has no decodable frame."""


class CheckpointError(ValueError):
    """A checkpoint directory with missing, wrong or inconsistent files."""


class PromptError(ValueError):
    """A prompt that cannot be run: media/tag count mismatch, too long for the model."""


class PositionsError(PromptError):
    """The prompt and the new tokens asked for do not fit in the model's positions."""

    def __init__(
        self, message: str, *, prompt_tokens: int | None = None, positions: int | None = None
    ) -> None:
        super().__init__(message)  # (message) alone: a rank's error is pickled to its launcher
        self.prompt_tokens = prompt_tokens
        self.positions = positions


class ReservedTokenError(PromptError):
    """Text that contains a token only the Processor may write (`<IMG_CONTEXT>`, `<vid>`...)."""


class RunError(RuntimeError):
    """A long job that stopped for a reason it explains (a failed rank, a diverged run): the
    command line prints its message as one line."""

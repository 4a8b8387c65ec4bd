"""One error type for everything wrong with a checkpoint, so callers can catch it and users read it."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be served as it is.

    The message names the file (when known), the tensor, what was expected and what was found,
    and what to do about it.
    """

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None):
        where = ", ".join(p for p in (f"file {file}" if file else "", f"tensor {tensor}" if tensor else "") if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.message = message  # without the location, so a caller can re-raise it located better
        self.file = file
        self.tensor = tensor


def shape_str(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"

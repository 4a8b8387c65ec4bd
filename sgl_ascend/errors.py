"""One error type for everything wrong with a checkpoint, so callers can catch it and users read it."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be served as it is.

    The message names the file (when known), the tensor, what was expected and what was found,
    and what to do about it.
    """

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None,
                 key: str | None = None):
        where = ", ".join(p for p in (f"file {printable(file)}" if file else "",
                                      f"tensor {printable(tensor)}" if tensor else "",
                                      f"key {printable(key)}" if key else "") if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.message = message  # without the location, so a caller can re-raise it located better
        self.file = file
        self.tensor = tensor
        self.key = key  # a json key (config.json field, index entry) when the problem is not a tensor


def shape_str(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def printable(text) -> str:
    """Text safe to print on any terminal: bytes of file names that are not UTF-8 (surrogate escapes),
    lone surrogates and control characters come out as backslash escapes instead of failing the print."""
    out = []
    for c in str(text):
        if "\udc80" <= c <= "\udcff":  # an undecodable byte of a file name (surrogateescape)
            out.append(f"\\x{ord(c) - 0xdc00:02x}")
        elif "\ud800" <= c <= "\udfff":
            out.append(f"\\u{ord(c):04x}")
        elif c.isprintable():
            out.append(c)
        else:
            out.append(repr(c)[1:-1])
    return "".join(out)

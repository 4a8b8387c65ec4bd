"""Process memory counters for the peak-memory tests."""

MIB = 1 << 20


def status(key: str) -> int:
    """A /proc/self/status counter (VmRSS, VmHWM, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)

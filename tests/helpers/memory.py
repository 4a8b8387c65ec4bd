"""Process memory counters for the peak-memory tests."""

MIB = 1 << 20


def status(key: str) -> int:
    """A /proc/self/status counter (VmRSS, VmHWM, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def live_cpu_tensor_bytes() -> int:
    """Bytes of every CPU tensor storage Python can reach now (each storage once): what the process holds
    in tensors, independent of the allocator and of the page cache (RSS would count both)."""
    import gc

    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        # type(), not isinstance: isinstance asks obj.__class__, which dead weak proxies refuse
        if not issubclass(type(obj), torch.Tensor) or obj.device.type != "cpu":
            continue
        try:
            storage = obj.untyped_storage()
            pointer = storage.data_ptr()
        except RuntimeError:  # fake tensors left by earlier tests' tracing hold no memory
            continue
        if pointer not in seen:
            seen.add(pointer)
            total += storage.nbytes()
    return total

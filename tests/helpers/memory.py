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
    import warnings

    import torch

    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance on deprecated torch aliases warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total

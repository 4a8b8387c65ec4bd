"""Drops checkpoint tensors that a layer's scheme knowingly ignores before the model sees them.

Model `load_weights` methods look every tensor up in the model's parameters and fail (or warn) on
names they do not know, e.g. the per-channel weight_scale / weight_offset that some W8A8 writers
store beside deq_scale. Our configs know which scheme serves each checkpoint shard and which
suffixes it ignores (`LinearScheme.ignored_suffixes`).
"""


def drop_ignored_tensors(model, weights, target_device):
    config = getattr(model, "quant_config", None)
    is_ignored = getattr(config, "is_ignored_tensor", None)
    if is_ignored is None:
        return None
    return (model, (item for item in weights if not is_ignored(item[0])), target_device), {}

"""Drops checkpoint tensors that a layer's scheme knowingly ignores before the model sees them.

Model `load_weights` methods look every tensor up in the model's parameters and fail (or warn) on
names they do not know, e.g. the per-channel weight_scale / weight_offset that some W8A8 writers
store beside deq_scale. Our configs know which scheme serves each checkpoint shard and which
suffixes it ignores (`LinearScheme.ignored_suffixes`). The same pass gives KV-cache scales the name of
the attention parameter that takes them.
"""


def drop_ignored_tensors(model, weights, target_device):
    config = getattr(model, "quant_config", None)
    is_ignored = getattr(config, "is_ignored_tensor", None)
    if is_ignored is None:
        return None
    # KV-cache scales: the attention layers get their parameters, the checkpoint names are mapped to them.
    config.prepare_model(model)
    rename = config.checkpoint_to_model_name
    return (model, ((rename(name), t) for name, t in weights if not is_ignored(name)), target_device), {}

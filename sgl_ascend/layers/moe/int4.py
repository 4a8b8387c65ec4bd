"""Int4 expert writers: the shared int4 kernel helpers (sgl_ascend.layers.schemes.common), re-exported
under the names the expert schemes use. Kernel layout (all int4 schemes): [K, N/8] int32 per expert."""

from sgl_ascend.layers.schemes.common import write_fp32_bits, write_int4_pairs, write_scale_or_bits

write_modelslim_pairs = write_int4_pairs

__all__ = ["write_fp32_bits", "write_modelslim_pairs", "write_scale_or_bits"]

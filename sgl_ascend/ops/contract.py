"""The real torch_npu ops' contract: the dtype / shape / argument rules a call must meet.

Every twin checks its call here before computing (and its fake, so traced graphs are checked too),
so a call the real op would reject fails on CPU with the rule and its source. Checks read only
dtypes, shapes and arguments, never tensor values: they run on meta / fake tensors as well.

Sources (torch-npu 2.14.0 wheel; line numbers in that wheel):
  DOC  = torch_npu/_op_plugin_docs.py                (the op's documented dtype tables and limits)
  META = torch_npu/op_plugin/meta/_meta_registrations.py  (the checks the op's meta function makes)
  SGL  = SGLang 0.5.23 sglang/srt/hardware_backend/npu/ (calls that have run on Ascend hardware)
Where the documentation predates a combination that upstream runs on hardware (W4A8 / W4A4 grouped
matmul), the rule cites the upstream call: the twin must accept what the real op accepts.
"""

from typing import Optional

import torch

DOC = "torch_npu 2.14.0 _op_plugin_docs.py"
META = "torch_npu 2.14.0 op_plugin/meta/_meta_registrations.py"
SGL = "SGLang 0.5.23 hardware_backend/npu"

ACL_FORMAT_ND = 2
ACL_FORMAT_FRACTAL_NZ = 29

# c10::ScalarType codes: the schemas take dtypes as `int`, and torch hands a twin the code.
_SCALAR_TYPES = {0: torch.uint8, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.int64,
                 5: torch.float16, 6: torch.float32, 7: torch.float64, 11: torch.bool, 12: torch.qint8,
                 13: torch.quint8, 14: torch.qint32, 15: torch.bfloat16, 16: torch.quint4x2}

FLOAT16 = (torch.float16, torch.bfloat16)
INT4_PER_INT32 = 8


class NpuContractError(RuntimeError):
    """A call that the real torch_npu op rejects (or that its documentation does not allow)."""

    def __init__(self, op: str, rule: str, source: str):
        super().__init__(f"{op}: {rule} [rule: {source}]")
        self.op, self.rule, self.source = op, rule, source


def as_dtype(value) -> Optional[torch.dtype]:
    """A schema `int` dtype argument (ScalarType code, or a torch.dtype from a direct call) -> torch.dtype."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in _SCALAR_TYPES:
        raise NpuContractError("dtype", f"ScalarType code {value} is not one the twins know", "c10 ScalarType")
    return _SCALAR_TYPES[value]


def require(ok: bool, op: str, rule: str, source: str) -> None:
    if not ok:
        raise NpuContractError(op, rule, source)


def _names(dtypes) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def require_dtype(t: Optional[torch.Tensor], allowed, op: str, what: str, source: str) -> None:
    if t is not None:
        require(t.dtype in allowed, op, f"{what} must be {_names(allowed)}, got {str(t.dtype).replace('torch.', '')}",
                source)


# -- quantization --------------------------------------------------------------------------------

def check_dynamic_quant(input, smooth_scales, group_index, dst_type, quant_mode, dst_type_max):
    op = "npu_dynamic_quant"
    require_dtype(input, FLOAT16, op, "x", f"{DOC}:4673 (x: float16, bfloat16)")
    require(input.dim() > 1, op, f"x must have more than 1 dim, got {input.dim()}", f"{DOC}:4673")
    dst = as_dtype(dst_type) or torch.int8
    require(dst in (torch.int8, torch.quint4x2), op, f"dst_type must be int8 or quint4x2, got {dst}",
            f"{DOC}:4678-4679 (A2/A3: torch.int8, torch.quint4x2)")
    if dst == torch.quint4x2:
        require(input.shape[-1] % 8 == 0, op, f"int4 output needs x's last dim % 8 == 0, got {input.shape[-1]}",
                f"{DOC}:4673, {META}:5060-5062")
    require(quant_mode == "pertoken", op, f"the twin computes quant_mode 'pertoken' only, got {quant_mode!r}",
            "twin scope (sgl-ascend uses per-token only)")
    if smooth_scales is not None:
        require(smooth_scales.dtype == input.dtype, op, "smooth_scales must have x's dtype",
                f"{DOC}:4675 (单算子模式: smooth_scales的dtype必须和x保持一致)")
        require(group_index is None and smooth_scales.shape == (input.shape[-1],), op,
                "smooth_scales must be 1-D of x's last dim (no group_index in the twin)", f"{DOC}:4692")


def check_quantize(self, scales, zero_points, dtype, axis, div_mode):
    op = "npu_quantize"
    require_dtype(self, (torch.float32,) + FLOAT16, op, "input", f"{DOC}:11357 (A2: float, float16, bfloat16)")
    out = as_dtype(dtype)
    if div_mode:
        require(out in (torch.qint8, torch.quint8, torch.int32), op,
                f"dtype must be qint8/quint8/int32 with div_mode=True, got {out}", f"{DOC}:11375")
        require_dtype(scales, (torch.float32, torch.bfloat16), op, "scales (div_mode=True)", f"{DOC}:11361")
        require_dtype(zero_points, (torch.int8, torch.uint8, torch.int32, torch.bfloat16), op,
                      "zero_points (div_mode=True)", f"{DOC}:11368 (A2: int8, uint8, int32, bfloat16)")
    else:
        require(out in (torch.qint8, torch.quint4x2), op,
                f"dtype must be qint8/quint4x2 with div_mode=False, got {out}", f"{DOC}:11376")
        require_dtype(scales, (torch.float32,) + FLOAT16, op, "scales (div_mode=False)", f"{DOC}:11364")
        require(self.dtype == torch.float32 or scales.dtype == self.dtype, op,
                f"scales must have the input's dtype {self.dtype} (unless the input is float32), got {scales.dtype}",
                "CANN aclnnAscendQuant (npu_quantize div_mode=False runs aclnnAscendQuantV3): 如果x的dtype不是"
                "FLOAT32, 需要和x的dtype一致")
        require(axis >= -2 and axis < self.dim(), op, f"axis must lie in [-2, input.dim()), got {axis}",
                f"{DOC}:11377-11378")
        if zero_points is not None:
            require(zero_points.shape == scales.shape and zero_points.dtype == scales.dtype, op,
                    "zero_points must have scales' shape and dtype with div_mode=False",
                    f"{DOC}:11369 (zero_points的shape和dtype需要和scales一致)")
        elem = self.shape[-2] if axis == -2 else self.shape[-1]
        require(scales.dim() == 1 and scales.shape[0] in (1, elem), op,
                f"1-D scales must have 1 or {elem} elements (the axis dim), got {tuple(scales.shape)}",
                f"{DOC}:11362")
    if out == torch.quint4x2:
        require(self.shape[-1] % 8 == 0, op, "quint4x2 output needs the last dim % 8 == 0", f"{DOC}:11355, {META}:5009-5011")


def check_quant_matmul(x1, x2, scale, offset, pertoken_scale, bias, output_dtype, x1_dtype, x2_dtype,
                       pertoken_scale_dtype, scale_dtype, group_sizes, y_scale):
    op = "npu_quant_matmul"
    require(all(a is None for a in (x1_dtype, x2_dtype, pertoken_scale_dtype, scale_dtype, group_sizes, y_scale)),
            op, "the twin covers int8/int4 operands without mx/group-size extras", "twin scope")
    require_dtype(x1, (torch.int8, torch.int32), op, "x1", f"{DOC}:4964 (A2: int8, int32 = 8 x int4)")
    require(x1.dtype == x2.dtype, op, f"x2 must have x1's dtype, got {x1.dtype} and {x2.dtype}",
            f"{DOC}:4968 (数据类型与x1的数据类型保持一致)")
    require(2 <= x1.dim() <= 6 and 2 <= x2.dim() <= 6, op, "x1 and x2 must be 2-6 dimensional", f"{META}:4108-4111")
    out = as_dtype(output_dtype) or torch.int8
    require(out in (torch.int8, torch.float16, torch.bfloat16, torch.int32), op,
            f"output_dtype must be int8/float16/bfloat16/int32, got {out}", f"{DOC}:4986 (A2: int8, float16, bfloat16, int32)")
    int4 = x1.dtype == torch.int32
    k1 = x1.shape[-1] * (INT4_PER_INT32 if int4 else 1)
    n = x2.shape[-1] * (INT4_PER_INT32 if int4 else 1)
    require(k1 == x2.shape[-2], op, f"K of x1 ({k1}) and x2 ({x2.shape[-2]}) must agree", f"{META}:4121-4160")
    if int4:
        require(x2.dim() == 2 and x1.is_contiguous(), op, "int4 x1 must be contiguous and x2 2-D", f"{DOC}:5009")
    require_dtype(scale, (torch.float32, torch.int64, torch.bfloat16), op, "scale", f"{DOC}:4972")
    require(scale.dim() == 1 and scale.shape[0] in (1, n), op,
            f"scale must be 1-D of 1 or n={n} elements, got {tuple(scale.shape)}", f"{DOC}:4972")
    if pertoken_scale is not None:
        require(pertoken_scale.dtype == torch.float32 and pertoken_scale.dim() == 1
                and pertoken_scale.shape[0] == x1.numel() // x1.shape[-1], op,
                f"pertoken_scale must be float32 [m], got {pertoken_scale.dtype} {tuple(pertoken_scale.shape)}",
                f"{DOC}:4976-4978")
    if bias is not None:
        # DOC allows [1, n] too, META (4046, 4056) rejects a 2-D bias: only [n] satisfies both
        require(bias.dim() == 1 and bias.shape[0] == n, op, f"bias must be [n] with n={n}, got {tuple(bias.shape)}",
                f"{DOC}:4980, {META}:4040-4060")
    _check_quant_matmul_combination(op, x1.dtype, scale.dtype, offset, pertoken_scale is not None,
                                    None if bias is None else bias.dtype, out)


# Supported combinations, A2/A3 table (DOC:5020-5027): x1, scales, offset allowed, pertoken (None = not
# allowed, True = required, "opt" = optional), biases, output dtype. The int4 row with a per-token
# scale is what SGLang's W4A4 linear runs (SGL quantization/linear_method_npu.py:402-411) and META
# allows (4367: bf16 scale needs bf16/int32 output; fp16 output is only demanded without pertoken).
_I8, _I32, _I64, _F32, _BF, _F16 = torch.int8, torch.int32, torch.int64, torch.float32, torch.bfloat16, torch.float16
_QMM_ROWS = (
    (_I8, (_I64, _F32), False, None, (_I32,), _F16),
    (_I8, (_I64, _F32), True, None, (_I32,), _I8),
    (_I8, (_F32, _BF), False, "opt", (_I32, _BF, _F32), _BF),
    (_I8, (_F32,), False, True, (_I32, _F16, _F32), _F16),
    (_I32, (_I64, _F32), False, None, (_I32,), _F16),
    (_I8, (_F32, _BF), False, None, (_I32,), _I32),
    (_I32, (_F32, _BF), False, True, (), _BF),
    (_I32, (_F32,), False, True, (), _F16),
)


def _check_quant_matmul_combination(op, x1, scale, offset, pertoken, bias, out):
    for row_x1, scales, offset_ok, pertoken_rule, biases, row_out in _QMM_ROWS:
        if (x1, out) != (row_x1, row_out) or scale not in scales or (offset is not None and not offset_ok):
            continue
        if (pertoken_rule is None and pertoken) or (pertoken_rule is True and not pertoken):
            continue
        if bias is not None and bias not in biases:
            continue
        return
    raise NpuContractError(
        op, f"no supported combination for x1 {x1}, scale {scale}, offset {'set' if offset is not None else None}, "
            f"pertoken_scale {'set' if pertoken else None}, bias {bias}, output_dtype {out}",
        f"{DOC}:5020-5027 (A2/A3 dtype table), {META}:4367-4385")


def check_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset, quant_scale, quant_offset, bias,
                                   antiquant_group_size, inner_precise, weight_dtype):
    op = "npu_weight_quant_batchmatmul"
    require_dtype(x, FLOAT16, op, "x", f"{DOC}:5427 (A2: float16, bfloat16)")
    require(x.dim() == 2 and weight.dim() == 2, op, f"x and weight must be 2-D (M, K) and (K, N), got "
            f"{x.dim()}-D and {weight.dim()}-D", f"{DOC}:5425,5464")
    require_dtype(weight, (torch.int8, torch.int32), op, "weight", f"{DOC}:5431 (int8, int32 = int4)")
    require(weight_dtype is None, op, "weight_dtype is for 4-bit uint8 carriers only", "twin scope")
    n = weight.shape[1] * (INT4_PER_INT32 if weight.dtype == torch.int32 and weight.is_contiguous() else 1)
    require(x.shape[1] == weight.shape[0], op, f"K of x ({x.shape[1]}) and weight ({weight.shape[0]}) must agree",
            f"{DOC}:5464")
    require(antiquant_scale.dtype == x.dtype, op,
            f"antiquant_scale must have x's dtype {x.dtype} (float scales), got {antiquant_scale.dtype}",
            f"{DOC}:5437 (若输入为float16、bfloat16, 其数据类型需与x保持一致)")
    if antiquant_group_size:
        k = x.shape[1]
        require(antiquant_group_size % 32 == 0 and 32 <= antiquant_group_size <= k - 1, op,
                f"antiquant_group_size must be a multiple of 32 in [32, K-1], got {antiquant_group_size}",
                f"{DOC}:5454")
        groups = -(-k // antiquant_group_size)
        require(tuple(antiquant_scale.shape) == (groups, n), op,
                f"per-group antiquant_scale must be ({groups}, {n}), got {tuple(antiquant_scale.shape)}", f"{DOC}:5436")
    else:
        require(tuple(antiquant_scale.shape) in ((n,), (1, n), (1,), (1, 1)), op,
                f"antiquant_scale must be (N,) / (1, N) per channel or (1,) per tensor, N={n}, "
                f"got {tuple(antiquant_scale.shape)}", f"{DOC}:5434-5435")
    if antiquant_offset is not None:
        require(antiquant_offset.dtype == antiquant_scale.dtype and antiquant_offset.shape == antiquant_scale.shape,
                op, "antiquant_offset must have antiquant_scale's dtype and shape", f"{DOC}:5441,5466")
    require(quant_scale is None and quant_offset is None, op,
            "quant_scale makes the output int8 (it quantizes the result): the twin computes float outputs; "
            "pass the bias by keyword", f"{DOC}:5446,5459 (存在quant_scale时输出数据类型为int8)")
    if bias is not None:
        want = torch.float32 if x.dtype == torch.bfloat16 else torch.float16
        require(bias.dtype == want, op, f"bias must be {want} for {x.dtype} x, got {bias.dtype}",
                f"{DOC}:5452 (x为bfloat16, bias需为float32; x为float16, bias需为float16)")
        require(tuple(bias.shape) in ((n,), (1, n)), op, f"bias must be (N,) or (1, N), got {tuple(bias.shape)}",
                f"{DOC}:5450")


def check_convert_weight_to_int4pack(weight, inner_k_tiles):
    op = "npu_convert_weight_to_int4pack"
    require_dtype(weight, (torch.int32,), op, "weight", f"{DOC}:5696")
    require(weight.dim() == 2 and weight.shape[-1] % INT4_PER_INT32 == 0, op,
            f"weight must be 2-D with the last dim % 8 == 0, got {tuple(weight.shape)}", f"{DOC}:5696-5700")


def nz_aligned(shape, dtype: torch.dtype) -> bool:
    """FRACTAL_NZ tiles are 16 rows x 32 bytes: k % 16 and n % (32 / itemsize), int4 in int32 / uint8 as
    int4 (n % 64). SGL utils.py:229 `_is_nz_aligned`, whose ND fallback keeps unaligned weights ND."""
    if len(shape) < 2:
        return False
    k, n = shape[-2], shape[-1]
    cols = {torch.bfloat16: 16, torch.float16: 16, torch.int8: 32, torch.int32: 64, torch.uint8: 64}.get(dtype)
    return cols is not None and k % 16 == 0 and n % cols == 0


def check_format_cast(self, acl_format, customize_dtype, input_dtype):
    op = "npu_format_cast"
    require(acl_format in (ACL_FORMAT_ND, ACL_FORMAT_FRACTAL_NZ), op,
            f"the twin knows ND (2) and FRACTAL_NZ (29), got {acl_format}", "twin scope")
    require(customize_dtype is None and input_dtype is None, op, "customize_dtype/input_dtype are FP4-only",
            f"{SGL} utils.py:303")
    if acl_format == ACL_FORMAT_FRACTAL_NZ:
        require(nz_aligned(self.shape, self.dtype), op,
                f"FRACTAL_NZ needs k % 16 and n aligned for {self.dtype}, got {tuple(self.shape)} (keep it ND)",
                f"{SGL} utils.py:229 _is_nz_aligned")


# -- grouped matmul ---------------------------------------------------------------------------------

def check_grouped_matmul(x, weight, bias, scale, offset, antiquant_scale, antiquant_offset, per_token_scale,
                         group_list, activation_input, activation_quant_scale, activation_quant_offset, split_item,
                         group_type, group_list_type, act_type, tuning_config, output_dtype, x_dtype, weight_dtype,
                         scale_dtype, per_token_scale_dtype):
    op = "npu_grouped_matmul"
    require(group_type in (-1, 0, 2), op, f"group_type only supports -1, 0 and 2 with a Tensor group_list, got "
            f"{group_type} (pass group_type=0 for experts)", f"{META}:3511-3514")
    require(all(a is None for a in (offset, activation_input, activation_quant_scale, activation_quant_offset,
                                    x_dtype, weight_dtype, scale_dtype, per_token_scale_dtype)),
            op, "offset / activation_* / *_dtype must be None", f"{DOC}:5845,5876-5878 (当前仅支持传入None)")
    require(act_type == 0, op, "the twin computes act_type 0 (no fused activation)", "twin scope")
    require(group_type == 0 and split_item in (2, 3), op,
            f"experts grouped on M need group_type=0 with split_item 2 or 3, got group_type={group_type}, "
            f"split_item={split_item}", f"{DOC}:6017 (0: 仅支持split_item为2或3)")
    require(len(x) == 1 and len(weight) == 1 and weight[0].dim() == 3 and x[0].dim() == 2, op,
            "the twin covers one x [M, K] and one stacked weight [E, K, N] (单单单)", f"{DOC}:6017")
    require(group_list is not None and group_list.dtype == torch.int64 and group_list.dim() == 1, op,
            "group_list must be a 1-D int64 tensor", f"{DOC}:5866 (数据类型支持torch.int64)")
    experts = weight[0].shape[0]
    require(group_list.shape[0] == experts and experts <= 1024, op,
            f"group_list must have one entry per weight group ({experts}, at most 1024), got {group_list.shape[0]}",
            f"{DOC}:6017")
    require(group_list_type in (0, 1), op, f"group_list_type must be 0 (cumsum) or 1 (counts), got {group_list_type}",
            f"{DOC}:5887-5890")
    if group_list_type == 1:
        require(experts != 1, op, "group_list_type=1 (counts) must not have length 1",
                f"{DOC}:5875 (当group_list_type为1时, group_list必须为非负数列, 且长度不能为1)")
    x0, w = x[0], weight[0]
    k = x0.shape[1] * (INT4_PER_INT32 if x0.dtype == torch.int32 else 1)
    require(k == w.shape[1], op, f"K of x ({k}) and weight ({w.shape[1]}) must agree", f"{META}:3550-3556")
    n = w.shape[2] * (INT4_PER_INT32 if w.dtype == torch.int32 else 1)
    out = as_dtype(output_dtype)
    sc = None if scale is None else scale[0]
    pts = None if per_token_scale is None else per_token_scale[0]
    b = None if bias is None else bias[0]
    for lst, what in ((scale, "scale"), (per_token_scale, "per_token_scale"), (bias, "bias"),
                      (antiquant_scale, "antiquant_scale")):
        require(lst is None or len(lst) == 1, op, f"{what} must be a list of one tensor", f"{DOC}:5836")
    if b is not None:
        require(b.dim() == 2 and tuple(b.shape) == (experts, n), op,
                f"bias of a stacked weight must be [E, N] = ({experts}, {n}), got {tuple(b.shape)}", f"{DOC}:5833-5836")
    if sc is not None:
        require(sc.shape[0] == experts and sc.shape[-1] == n and sc.dim() in (2, 3), op,
                f"scale must be [E, N] or [E, G, N] with E={experts}, N={n}, got {tuple(sc.shape)}", f"{DOC}:5839-5844")
    if pts is not None:
        require(pts.dtype == torch.float32 and pts.dim() == 1 and pts.shape[0] == x0.shape[0], op,
                f"per_token_scale must be float32 [M], got {pts.dtype} {tuple(pts.shape)}", f"{DOC}:5860-5865")
    if x0.dtype in (torch.float16, torch.bfloat16, torch.float32):
        if antiquant_scale is not None:
            _check_gmm_antiquant(op, x0, w, antiquant_scale[0], antiquant_offset, b, out, experts, n)
            return
        require(w.dtype == x0.dtype, op, f"non-quantized weight must have x's dtype {x0.dtype}, got {w.dtype}",
                f"{DOC}:5941-5949 (非量化)")
        require(sc is None and pts is None, op, "a non-quantized grouped matmul takes no scale", f"{DOC}:5941-5949")
        require(out in (None, x0.dtype), op, f"output_dtype must be None or x's dtype, got {out}", f"{DOC}:5948")
        if b is not None:
            allowed = (torch.float16,) if x0.dtype == torch.float16 else (torch.float32,)
            require_dtype(b, allowed, op, f"bias for {x0.dtype} x", f"{DOC}:5944")
        return
    require(sc is not None, op, "a quantized grouped matmul needs a scale", f"{DOC}:5950-5969")
    if x0.dtype == torch.int8 and w.dtype == torch.int8:
        require(sc.dim() == 2, op, "int8 weights take a per-channel scale [E, N]", f"{DOC}:5950-5969")
        require_dtype(b, (torch.int32,), op, "bias (int8 x int8)", f"{DOC}:5953,5963")
        if pts is None:  # per-channel quantization
            allowed = {torch.int64: (None, torch.int8), torch.bfloat16: (torch.bfloat16,), torch.float32: (torch.float16,)}
            where = f"{DOC}:5950-5959 (per-channel)"
        else:  # per-token quantization
            allowed = {torch.bfloat16: (torch.bfloat16,), torch.float32: (torch.float16,)}
            where = f"{DOC}:5960-5969 (per-token: scale bf16 -> bf16 output, fp32 -> fp16 output)"
        require(sc.dtype in allowed and out in allowed[sc.dtype], op,
                f"scale {sc.dtype} with output_dtype {out} is not supported; allowed: "
                + ", ".join(f"{s} -> {o}" for s, o in allowed.items()), where)
        return
    # int4 weights (int32 carrying 8 x int4) against int8 (W4A8) or int4 (W4A4) activations: newer than
    # the documented table; the contract is what SGLang runs on hardware (SGL quantization/moe_methods.py
    # NPUW4A8Int8MoEMethod: int64 scale [E, N] or [E, G, N], bias = scale_bias fp32, per-token fp32;
    # NPUW4A4Int4MoEMethod: int64 scale [E, N], per-token fp32), output bf16 / fp16.
    where = f"{SGL} quantization/moe_methods.py NPUW4A8Int8MoEMethod / NPUW4A4Int4MoEMethod"
    require(w.dtype == torch.int32 and x0.dtype in (torch.int8, torch.int32), op,
            f"quantized weights are int8 or int4-in-int32 against int8/int4 x, got x {x0.dtype}, weight {w.dtype}",
            f"{DOC}:5950-5969, {where}")
    require(sc.dtype == torch.int64, op, f"int4 weights take an int64 (fp32-bits) scale, got {sc.dtype}", where)
    require(pts is not None, op, "int4 weights run per-token: per_token_scale is required", where)
    require(out in (torch.bfloat16, torch.float16), op, f"output_dtype must be bfloat16/float16, got {out}", where)
    if x0.dtype == torch.int32:
        require(sc.dim() == 2, op, "W4A4 takes a per-channel scale [E, N]", where)
    require_dtype(b, (torch.float32,), op, "bias (W4A8/W4A4 scale_bias)", where)


def _check_gmm_antiquant(op, x0, w, aq_scale, aq_offset, b, out, experts, n):
    where = f"{DOC}:5970-5979 (伪量化)"
    require(x0.dtype in FLOAT16 and w.dtype in (torch.int8, torch.int32), op,
            "weight-only: x float16/bfloat16, weight int8 or int4", where)
    require(aq_scale.dtype == x0.dtype, op, f"antiquant_scale must be {x0.dtype}", where)
    require(aq_scale.dim() in (2, 3) and aq_scale.shape[0] == experts and aq_scale.shape[-1] == n, op,
            f"antiquant_scale of a stacked weight must be [E, N] per channel or [E, G, N] per group, E={experts}, "
            f"N={n}, got {tuple(aq_scale.shape)}", f"{DOC}:5852-5853")
    if aq_scale.dim() == 3:
        k = w.shape[1]
        require(w.dtype == torch.int32, op, "int8 weight-only is per-channel only ([E, N] antiquant_scale)",
                f"{DOC}:5980")
        require(k % aq_scale.shape[1] == 0, op, f"the per-group count G={aq_scale.shape[1]} must divide K={k}",
                f"{DOC}:5980 (per-group数G或Gi必须要能整除对应的ki)")
    # Both upstreams always pass an offset with int4 weights (zeros when symmetric): vllm-ascend
    # quantization/methods/wna16/w4a16.py ("all-zero tensors constructed because the operator requires offset
    # inputs"), SGLang compressed_tensors_wNa16_moe.py NPUCompressedTensorsW4A16Int4DynamicMoE.
    if w.dtype == torch.int32:
        require(aq_offset is not None and len(aq_offset) == 1, op,
                "int4 weight-only takes an antiquant_offset (zeros when symmetric), one tensor",
                "vllm-ascend quantization/methods/wna16/w4a16.py; SGL NPUWNA16Int4MoEMethod")
    if aq_offset is not None:
        require(len(aq_offset) == 1 and aq_offset[0].dtype == aq_scale.dtype
                and aq_offset[0].shape == aq_scale.shape, op,
                "antiquant_offset must have antiquant_scale's dtype and shape", f"{DOC}:5854-5859, 5976")
    require(out in (None, x0.dtype), op, "output_dtype must be None or x's dtype", f"{DOC}:5978")
    if b is not None:
        require_dtype(b, (torch.float16,) if x0.dtype == torch.float16 else (torch.float32,), op, "bias",
                      f"{DOC}:5973")


# -- activations and routing --------------------------------------------------------------------------

def check_swiglu(self, dim):
    op = "npu_swiglu"
    require_dtype(self, (torch.float32,) + FLOAT16, op, "x", f"{DOC}:4404")
    require(self.shape[dim] % 2 == 0, op, f"dim {dim} must be even, got {self.shape[dim]}", f"{DOC}:4396-4401 (A, B halves), {META}:5739-5744")


def check_dequant_swiglu_quant(x, weight_scale, activation_scale, bias, quant_scale, quant_offset, group_index,
                               activate_left, quant_mode, dst_type, round_mode, activate_dim, swiglu_mode,
                               clamp_limit, glu_alpha, glu_bias):
    op = "npu_dequant_swiglu_quant"
    require(x.dim() == 2 and x.shape[-1] % 2 == 0, op, f"x must be 2-D [T, 2H] with an even last dim, got "
            f"{tuple(x.shape)}", f"{DOC}:11653, 11683")
    require(x.dtype in (torch.int32,) + FLOAT16, op, f"x must be int32 (to dequantize) or float16/bfloat16, got {x.dtype}",
            f"{DOC}:11653, 11682")
    require((as_dtype(dst_type) or torch.int8) == torch.int8, op, "y is int8 only", f"{DOC}:11686")
    require(quant_mode == 1 and swiglu_mode == 0 and activate_dim in (None, -1, 1) and quant_offset is None, op,
            "the twin computes dynamic quantization (quant_mode=1) of plain SwiGLU on the last dim", "twin scope")
    if x.dtype == torch.int32:
        require(weight_scale is not None and activation_scale is not None, op,
                "int32 x needs weight_scale [groups, 2H] and activation_scale [T]", f"{DOC}:11654-11655, 11681")
        require_dtype(weight_scale, (torch.float32,), op, "weight_scale", f"{DOC}:11654")
        require_dtype(activation_scale, (torch.float32,), op, "activation_scale", f"{DOC}:11655")
        require(weight_scale.dim() == 2 and weight_scale.shape[-1] == x.shape[-1]
                and activation_scale.shape == (x.shape[0],), op,
                "weight_scale must be [groups, 2H] and activation_scale [T]", f"{DOC}:11654-11655")
    else:
        require(weight_scale is None and activation_scale is None and bias is None, op,
                "float16/bfloat16 x takes no weight_scale, activation_scale or bias", f"{DOC}:11682")
    if group_index is not None:
        require(group_index.dtype == torch.int64 and group_index.dim() == 1, op,
                "group_index must be 1-D int64 (per-group token counts)", f"{DOC}:11659")
        require(bias is None and quant_offset is None, op, "with group_index, bias and quant_offset must be None",
                f"{DOC}:11685")
    if quant_scale is not None:
        require_dtype(quant_scale, (torch.float32,) + FLOAT16, op, "quant_scale", f"{DOC}:11657")
        require(quant_scale.shape[-1] == x.shape[-1] // 2, op, "quant_scale must be [groups, H]", f"{DOC}:11657")


def check_moe_init_routing_v2(x, expert_idx, scale, offset, active_num, expert_capacity, expert_num, drop_pad_mode,
                              expert_tokens_num_type, expert_tokens_num_flag, quant_mode, active_expert_range,
                              row_idx_type, x_dtype):
    op = "npu_moe_init_routing_v2"
    require(x.dim() == 2 and expert_idx.dim() == 2 and x.shape[0] == expert_idx.shape[0], op,
            "x [T, H] and expert_idx [T, K] must be 2-D with equal T", f"{META}:1413-1425")
    require_dtype(expert_idx, (torch.int32,), op, "expert_idx", f"{DOC}:11090")
    require(drop_pad_mode in (0, 1) and expert_tokens_num_type in (0, 1, 2) and row_idx_type in (0, 1), op,
            "drop_pad_mode 0/1, expert_tokens_num_type 0/1/2, row_idx_type 0/1", f"{META}:1443-1462")
    if active_expert_range:
        require(len(active_expert_range) == 2 and 0 <= active_expert_range[0] < active_expert_range[1] <= 10240, op,
                f"active_expert_range must be an increasing [start, end) in [0, 10240], got {active_expert_range}",
                f"{META}:1427-1437")
        require(expert_num < 0 or active_expert_range[1] <= expert_num, op,
                f"active_expert_range's end must not exceed expert_num {expert_num}, got {active_expert_range}",
                f"{DOC}:11104")
    require(quant_mode in (-1, 1) and drop_pad_mode == 0 and offset is None and x_dtype is None
            and expert_tokens_num_type in (0, 1), op,
            "the twin computes dropless routing, quant_mode -1 (none) or 1 (dynamic int8), counts as cumsum or "
            "counts", "twin scope")
    if quant_mode == 1:
        require_dtype(x, (torch.float32,) + FLOAT16, op, "x (dynamic quant)", f"{DOC}:11089")
        if scale is not None:
            span = (active_expert_range[1] - active_expert_range[0]) if active_expert_range else expert_num
            require(scale.dim() == 2 and scale.shape[0] in (span, 1) and scale.shape[1] == x.shape[1], op,
                    "dynamic-quant smooth scale must be [experts in range or 1, H]", f"{DOC}:11093, {META}:1549-1561")
    elif scale is not None:
        require(scale.dim() == 1 and scale.shape[0] == x.shape[0], op, "scale must be [T] without quant",
                f"{DOC}:11092, {META}:1522-1530")


def check_moe_token_unpermute(permuted_tokens, sorted_indices, probs, padded_mode, restore_shape):
    op = "npu_moe_token_unpermute"
    require(permuted_tokens.dim() == 2 and sorted_indices.dim() == 1, op,
            "permuted_tokens must be 2-D and sorted_indices 1-D", f"{DOC}:16941-16942")
    require_dtype(permuted_tokens, (torch.float32,) + FLOAT16, op, "permuted_tokens", f"{DOC}:16941")
    require_dtype(sorted_indices, (torch.int32,), op, "sorted_indices", f"{DOC}:16942 (the later of two docstrings, the one in effect)")
    require(not padded_mode and restore_shape is None, op, "padded_mode must be False and restore_shape None", f"{DOC}:16944-16945 (当前仅支持False)")
    if probs is not None:
        require(probs.dim() == 2 and sorted_indices.shape[0] == probs.numel(), op,
                "probs must be [T, K] with T*K sorted_indices", f"{DOC}:16943")
        require_dtype(probs, (torch.float32,) + FLOAT16, op, "probs", f"{DOC}:16943")


def check_moe_init_routing(x, row_idx, expert_idx, active_num):
    op = "npu_moe_init_routing"
    require(x.dim() == 2 and row_idx.dim() == 2 and expert_idx.dim() == 2 and row_idx.shape == expert_idx.shape
            and x.shape[0] == expert_idx.shape[0], op, "x [T, H], row_idx and expert_idx [T, K]", f"{DOC}:11017-11019")
    require_dtype(x, (torch.float32,) + FLOAT16, op, "x", f"{DOC}:11017")
    require_dtype(row_idx, (torch.int32,), op, "row_idx", f"{DOC}:11018")
    require_dtype(expert_idx, (torch.int32,), op, "expert_idx", f"{DOC}:11019")


def check_moe_compute_expert_tokens(sorted_expert_for_source_row, num_expert):
    op = "npu_moe_compute_expert_tokens"
    require(sorted_expert_for_source_row.dim() == 1, op, "sorted experts must be 1-D", f"{DOC}:10545")
    require_dtype(sorted_expert_for_source_row, (torch.int32,), op, "sorted_expert_for_source_row", f"{DOC}:10545")
    require(0 < num_expert <= 2048, op, "num_expert must be in (0, 2048]", f"{DOC}:10546")


def check_moe_finalize_routing(expanded_permuted_rows, skip1, skip2, bias, scales, expanded_src_to_dst_row,
                               export_for_source_row, drop_pad_mode, k):
    op = "npu_moe_finalize_routing"
    require(expanded_permuted_rows.dim() == 2 and drop_pad_mode in (0, 2, None), op,
            "dropless rows [T*K, H]: drop_pad_mode 0, or 2 as SGLang pairs it with v2 routing", f"{DOC}:10611,10618, {SGL} layers/moe/token_dispatcher/ascend_tp.py:81-82")
    require_dtype(expanded_permuted_rows, (torch.float32,) + FLOAT16, op, "expanded_permuted_rows", f"{DOC}:10611")
    require_dtype(expanded_src_to_dst_row, (torch.int32,), op, "expanded_src_to_dst_row", f"{DOC}:10616")
    for t, what in ((skip1, "skip1"), (skip2, "skip2"), (scales, "scales")):
        if t is not None:
            require(t.dtype == expanded_permuted_rows.dtype, op, f"{what} must have the rows' dtype",
                    f"{DOC}:10612-10615")
    require(skip1 is None or skip2 is not None, op, "skip1 needs skip2 (skip2 None => skip1 None)", f"{DOC}:10613")
    if scales is not None:
        require(scales.dim() == 2 and scales.numel() == expanded_src_to_dst_row.shape[0], op,
                "scales must be [T, K] with T*K = expanded_src_to_dst_row rows", f"{DOC}:10615")
    if bias is not None:
        require(export_for_source_row is not None and export_for_source_row.dtype == torch.int32, op,
                "bias needs export_for_source_row (int32 expert ids)", f"{DOC}:10614,10617")



def check_anti_quant(x, scale, offset, dst_dtype, src_dtype):
    op = "npu_anti_quant"
    require_dtype(x, (torch.int8,), op, "x (the twin models int8 x; int32 int4-packed x is not modelled)",
                  f"{DOC}:7210")
    require(as_dtype(src_dtype) in (None, torch.int8), op, f"src_dtype must be int8 for int8 x, got {src_dtype}",
            f"{DOC}:7222")
    require_dtype(scale, (torch.float32, torch.bfloat16), op, "scale", f"{DOC}:7214 (A2: float32, bfloat16)")
    require(scale.dim() == 1 and scale.shape[0] in (1, x.shape[-1]), op,
            f"scale must be 1-D with 1 or {x.shape[-1]} (x's last dim) elements, got {tuple(scale.shape)}",
            f"{DOC}:7214")
    if offset is not None:
        require(offset.shape == scale.shape and offset.dtype == scale.dtype, op,
                "offset must have scale's dtype and shape", f"{DOC}:7217")
    require(as_dtype(dst_dtype) in (None,) + FLOAT16, op, f"dst_dtype must be float16/bfloat16, got {dst_dtype}",
            f"{DOC}:7219")


# aclnnFlatQuant, the kernel behind npu_kronecker_quant (CANN 8.3.RC1 API reference, aclnnFlatQuant.md):
# x [K, M, N] with K <= 32768 and M, N <= 128 (vllm-ascend splits longer batches at 32768 tokens).
ACLNN_FLAT_QUANT = "CANN 8.3.RC1 aclnnFlatQuant.md"
KRONECKER_MAX_TOKENS = 32768
KRONECKER_MAX_DIM = 128


def check_kronecker_quant(x, kronecker_p1, kronecker_p2, clip_ratio, dst_dtype, dst_type_max):
    op = "npu_kronecker_quant"
    require_dtype(x, FLOAT16, op, "x", f"{DOC}:11445 (x: FLOAT16, BFLOAT16)")
    require(x.dim() == 3, op, f"x must be 3-D [K, M, N], got {x.dim()} dims", f"{DOC}:11445")
    k, m, n = x.shape
    require(n % 8 == 0, op, f"x's last dim N must be a multiple of 8, got {n}",
            f"{DOC}:11445, {META}:5289-5290")
    require(k <= KRONECKER_MAX_TOKENS and m <= KRONECKER_MAX_DIM and n <= KRONECKER_MAX_DIM, op,
            f"x [K, M, N] needs K <= {KRONECKER_MAX_TOKENS}, M and N <= {KRONECKER_MAX_DIM}, got {tuple(x.shape)}",
            ACLNN_FLAT_QUANT)
    for what, p, size, line in (("kronecker_p1", kronecker_p1, m, 11446), ("kronecker_p2", kronecker_p2, n, 11447)):
        require(p.dtype == x.dtype, op, f"{what} must have x's dtype {x.dtype}, got {p.dtype}",
                f"{DOC}:{line},11457")
        require(tuple(p.shape) == (size, size), op,
                f"{what} must be [{size}, {size}] (x is {tuple(x.shape)}), got {tuple(p.shape)}", f"{DOC}:{line}")
    require(clip_ratio is None or 0.0 < clip_ratio <= 1.0, op, f"clip_ratio must lie in (0, 1], got {clip_ratio}",
            f"{DOC}:11448")
    dst = as_dtype(dst_dtype)
    require(dst in (None, torch.int32), op,
            f"dst_dtype must be int32 (int4 packed eight per int32), got {dst} (the mxfp4 output is not modelled)",
            f"{DOC}:11449, {META}:5273-5278")
    require(dst_type_max in (None, 0.0), op, f"dst_type_max is for the mxfp4 output; int32 takes 0, got {dst_type_max}",
            f"{DOC}:11450")


FIA = "npu_fused_infer_attention_score"
# Arguments the real op has and the twin does not compute: a call with one of them fails loudly
# (a twin limit, not an NPU rule) instead of silently ignoring it.
FIA_UNMODELLED = ("pse_shift", "dequant_scale1", "quant_scale1", "dequant_scale2", "quant_scale2", "quant_offset2",
                  "key_antiquant_scale", "key_antiquant_offset", "value_antiquant_scale", "value_antiquant_offset",
                  "query_padding_size", "kv_padding_size", "key_shared_prefix", "value_shared_prefix",
                  "actual_shared_prefix_len", "query_rope", "key_rope", "key_rope_antiquant_scale")


def fia_dims(query, num_heads, input_layout):
    """(B, Q_S, N, D) of an FIA query in BSH or BSND, the layouts the twin models."""
    require(input_layout in ("BSH", "BSND"), FIA, f"the twin models input_layout BSH and BSND, got {input_layout!r}",
            "sgl_ascend twin scope")
    require(num_heads > 0, FIA, f"num_heads must be > 0, got {num_heads}", f"{META}:2050-2054")
    if input_layout == "BSH":
        require(query.dim() == 3 and query.shape[2] % num_heads == 0, FIA,
                f"BSH query must be [B, S, num_heads*D], got {tuple(query.shape)} with num_heads={num_heads}",
                f"{DOC}:8112")
        return query.shape[0], query.shape[1], num_heads, query.shape[2] // num_heads
    require(query.dim() == 4 and query.shape[2] == num_heads, FIA,
            f"BSND query must be [B, S, num_heads, D], got {tuple(query.shape)}", f"{DOC}:8112")
    return query.shape[0], query.shape[1], num_heads, query.shape[3]


def fia_lse_shape(query, num_heads, input_layout, softmax_lse_flag):
    """softmax_lse's shape: (B, N, Q_S, 1) with the flag (BSH / BSND), else [1] (holding 0)."""
    if not softmax_lse_flag:
        return (1,)  # docs :8148 (softmax_lse_flag为False时, 则输出shape为[1]的值为0的Tensor)
    b, q_s, n, _ = fia_dims(query, num_heads, input_layout)
    return (b, n, q_s, 1)  # docs :8148 (数据类型支持float32 ... 输出shape为(B, Q_N, Q_S, 1))


def check_fused_infer_attention_score(query, key, value, unmodelled, atten_mask, actual_seq_lengths,
                                      actual_seq_lengths_kv, antiquant_scale, antiquant_offset, block_table,
                                      num_heads, input_layout, num_key_value_heads, sparse_mode, block_size,
                                      antiquant_mode, softmax_lse_flag):
    op = FIA
    given = [name for name, t in unmodelled.items() if t is not None]
    require(not given, op, f"the twin does not model {given}", "sgl_ascend twin scope")
    b, q_s, n, d = fia_dims(query, num_heads, input_layout)
    kv_n = num_key_value_heads or n
    require(n % kv_n == 0 and n // kv_n <= 64, op,
            f"num_heads ({n}) must be a multiple of num_key_value_heads ({kv_n}), at most 64x", f"{DOC}:8116")
    require_dtype(query, FLOAT16, op, "query (the twin models float16/bfloat16 queries)", f"{DOC}:8065")
    require(query.is_contiguous() and key.is_contiguous() and value.is_contiguous(), op,
            "query, key and value must be contiguous", f"{DOC}:8065-8069 (不支持非连续的Tensor)")
    require(key.dtype == value.dtype and key.shape == value.shape, op,
            f"key and value must share dtype and shape, got {key.dtype}{tuple(key.shape)} and "
            f"{value.dtype}{tuple(value.shape)}", f"{DOC}:8221, 8285 (key和value的shape需保证一致)")
    require(key.dtype in (query.dtype, torch.int8), op,
            f"key/value must be int8 or the query's dtype {query.dtype}, got {key.dtype}", f"{DOC}:8065-8072")
    require(d <= 512 and n <= 256, op, f"D must be <= 512 and N <= 256, got D={d}, N={n}", f"{DOC}:8204")
    require(n * d < 65535, op, f"BSH/BSND need N*D < 65535, got {n * d}", f"{DOC}:8204")
    int8_kv = key.dtype == torch.int8
    require(d % (32 if int8_kv else 16) == 0, op,
            f"D must be {'32' if int8_kv else '16'}-aligned for {key.dtype} key/value, got D={d}", f"{DOC}:8210")
    require(sparse_mode == 0, op, f"the twin models sparse_mode=0 (explicit or no mask), got {sparse_mode}",
            "sgl_ascend twin scope")
    if atten_mask is not None:
        require_dtype(atten_mask, (torch.bool, torch.int8, torch.uint8), op, "atten_mask", f"{DOC}:8076")
        require(atten_mask.dim() == 2 or (atten_mask.dim() == 4 and atten_mask.shape[0] == b), op,
                f"the twin models atten_mask (Q_S, KV_S) or (B, 1, Q_S, KV_S), got {tuple(atten_mask.shape)}",
                f"{DOC}:8079")
        require(atten_mask.is_contiguous(), op, "atten_mask must be contiguous",
                f"{DOC}:8076 (不支持非连续的Tensor)")
        if block_table is not None:
            require(atten_mask.shape[-1] >= block_table.shape[1] * block_size, op,
                    f"a paged call's atten_mask must span block_table.shape[1] * block_size = "
                    f"{block_table.shape[1] * block_size} keys, got {atten_mask.shape[-1]}", f"{DOC}:8292")
    if int8_kv:
        require(antiquant_scale is not None, op, "int8 key/value need antiquant_scale (the twin models "
                "the combined per-channel antiquant)", f"{DOC}:8089, 8163")
        require(antiquant_mode in (0, 1), op, f"antiquant_mode must be 0 (per-channel) or 1 (per-token), got "
                f"{antiquant_mode}", f"{DOC}:8131")
        if antiquant_mode == 0:
            want = (2, kv_n * d) if input_layout == "BSH" else (2, kv_n, d)
            require(tuple(antiquant_scale.shape) == want, op, f"per-channel antiquant_scale for {input_layout} "
                    f"must be {want}, got {tuple(antiquant_scale.shape)}", f"{DOC}:8163")
            require(antiquant_scale.dtype == query.dtype, op,
                    f"antiquant_scale must have the query's dtype {query.dtype}, got {antiquant_scale.dtype}",
                    f"{DOC}:8163 (参数数据类型和query数据类型相同)")
        else:
            kv_s = key.shape[1] if block_table is None else block_table.shape[1] * block_size
            require(tuple(antiquant_scale.shape) == (2, b, kv_s), op, f"per-token antiquant_scale must be "
                    f"(2, B={b}, KV_S={kv_s}), got {tuple(antiquant_scale.shape)}", f"{DOC}:8165")
            require_dtype(antiquant_scale, (torch.float32,), op, "per-token antiquant_scale (float32)",
                          f"{DOC}:8165 (数据类型固定为float32, antiquant_mode置1)")
        require(antiquant_offset is None, op, "the twin models symmetric antiquant only (antiquant_offset=None)",
                f"{DOC}:8169 (对称量化模式下, antiquant_offset可以为空)")
        require(q_s == 1 or query.dtype == torch.float16, op,
                f"antiquant with Q_S={q_s} > 1 needs a float16 query, got {query.dtype}; dequantize the cache "
                "(npu_anti_quant) for prefill", f"{DOC}:8089, 8216")
        require(q_s == 1 or block_table is None, op,
                "with Q_S > 1, page attention does not support antiquant", f"{DOC}:8220")
    else:
        require(antiquant_scale is None and antiquant_offset is None, op,
                "antiquant_scale/offset need int8 key/value", f"{DOC}:8163")
    if block_table is not None:
        require(block_table.dtype == torch.int32 and block_table.dim() == 2 and block_table.shape[0] == b, op,
                f"block_table must be int32 [B={b}, max blocks], got {block_table.dtype}{tuple(block_table.shape)}",
                f"{DOC}:8091, 8223")
        require(actual_seq_lengths_kv is not None, op, "page attention needs actual_seq_lengths_kv", f"{DOC}:8222")
        if q_s == 1:
            align = 32 if int8_kv else 16
            require(0 < block_size <= 512 and block_size % align == 0, op,
                    f"Q_S=1 page attention needs block_size in (0, 512], {align}-aligned for {key.dtype}, "
                    f"got {block_size}", f"{DOC}:8280")
        else:
            require(128 <= block_size <= 512 and block_size % 128 == 0, op,
                    f"Q_S>1 page attention needs block_size a multiple of 128 in [128, 512], got {block_size}",
                    f"{DOC}:8219")
        require(key.dim() == 3 and key.shape[1] == block_size and key.shape[2] == kv_n * d, op,
                f"a BSH/BSND paged cache is (blocknum, block_size={block_size}, KV_N*D={kv_n * d}), "
                f"got {tuple(key.shape)}", f"{DOC}:8285")
        require(kv_n * d <= 65535, op, f"(blocknum, blocksize, H) caches need KV_N*D <= 65535, got {kv_n * d}",
                f"{DOC}:8287")
    else:
        want_dim = 3 if input_layout == "BSH" else 4
        require(key.dim() == want_dim and key.shape[0] == b, op,
                f"{input_layout} key/value must be {want_dim}-D with batch {b}, got {tuple(key.shape)}", f"{DOC}:8112")
        h_kv = key.shape[2] if input_layout == "BSH" else key.shape[2] * key.shape[3]
        require(h_kv == kv_n * d, op, f"key/value hidden size must be num_key_value_heads*D = {kv_n * d}, got {h_kv}",
                f"{DOC}:8116")
    for name, lengths in (("actual_seq_lengths", actual_seq_lengths), ("actual_seq_lengths_kv", actual_seq_lengths_kv)):
        if lengths is not None:
            require(len(lengths) == 1 or len(lengths) >= b, op,
                    f"{name} must have 1 or >= B={b} entries, got {len(lengths)}", f"{DOC}:8211, 8275")

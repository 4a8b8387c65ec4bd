"""The int4 range check says "(sampled)" only when it saw a sample of the tensor (inspect / verify read
a row from the header-level check); a full check while loading says what it saw without it."""

import pytest
import torch

from sgl_ascend.errors import CheckpointError
from sgl_ascend.layers.schemes.common import check_int4_values
from sgl_ascend.quant.checks import check_int4_in_int8

BAD = torch.tensor([[-9, 0, 7, 3]], dtype=torch.int8)


def test_a_full_check_does_not_say_sampled():
    with pytest.raises(CheckpointError) as err:
        check_int4_values(BAD, tensor="w")
    assert "values span [-9, 7] but" in str(err.value) and "sampled" not in str(err.value)


def test_a_sampled_check_says_so():
    with pytest.raises(CheckpointError) as err:
        check_int4_in_int8(BAD, file="f", tensor="w", scheme="W4A4_DYNAMIC", sampled=True)
    assert "values span [-9, 7] (sampled) but W4A4_DYNAMIC" in str(err.value)

"""QuaRot as msModelSlim 26.1.0's saver writes it (modelslim_v1/save/ascendv1.py): online rotations
(metadata.quarot layers, <prefix>.heads_rotation / kronecker_rotation_* tensors) must be applied while
serving, which sgl-ascend does not do, so such a checkpoint is refused with one clear error; the offline
rotation (optional.quarot, folded into the weights) is served. Unknown metadata is refused too."""

import pytest

from helpers.common import msmodelslim_fixture, rewrite_modelslim
from sgl_ascend.tools.cli import EXIT_CHECKPOINT_ERROR, EXIT_OK, main

W8A8_DYNAMIC = "qwen3-tiny-w8a8-dynamic"


def _inspect(capsys, path):
    code = main(["inspect", path])
    out, err = capsys.readouterr()
    return code, out, err


def _with_description(tmp_path, edit):
    return rewrite_modelslim(msmodelslim_fixture(W8A8_DYNAMIC), str(tmp_path / "ckpt"), description_edit=edit)


@pytest.mark.parametrize("edit, says", [
    (lambda d: d["metadata"].update(quarot={"max_tp_size": 4, "heads_rotation": {"layers": ["model.layers.0"]},
                                            "kronecker_rotation": {"layers": []}}), "1 layer(s) in metadata.quarot"),
    (lambda d: d.update({"model.layers.0.mlp.down_proj.kronecker_rotation_m": "FLOAT"}), "1 rotation tensor(s)"),
])
def test_online_rotation_is_refused(capsys, tmp_path, edit, says):
    code, _, err = _inspect(capsys, _with_description(tmp_path, edit))
    assert code == EXIT_CHECKPOINT_ERROR and "Traceback" not in err
    assert "quant_model_description.json" in err and "key metadata.quarot" in err
    assert says in err and "QuaRot online rotations" in err


def test_offline_rotation_is_served(capsys, tmp_path):
    def edit(d):
        d["metadata"]["quarot"] = {"max_tp_size": 4, "heads_rotation": {"layers": []},
                                   "kronecker_rotation": {"layers": []}}
        d["optional"] = {"quarot": {"rotation_map": {"global_rotation": "optional/quarot.safetensors"}}}

    code, out, _ = _inspect(capsys, _with_description(tmp_path, edit))
    assert code == EXIT_OK and "OK: every layer can be served" in out


def test_unknown_metadata_is_refused(capsys, tmp_path):
    code, _, err = _inspect(capsys, _with_description(tmp_path, lambda d: d["metadata"].update(spin={"r1": True})))
    assert code == EXIT_CHECKPOINT_ERROR and "key metadata.spin" in err and "unknown to sgl-ascend" in err

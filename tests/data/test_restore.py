"""CaseProperties: what preprocessing did to a case, its JSON form beside the case, and the way back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.volumes import GEOMETRIES, make_v2_dataset, plans_for
from unetrpp.data.preprocess import load_case, preprocess_array, preprocess_dataset
from unetrpp.data.restore import CaseProperties, restore_label, restore_label_from_probabilities
from unetrpp.errors import UserError

#: a CASE.json as ``unetrpp preprocess`` has written it before CaseProperties existed
OLD_JSON = {
    "plans_id": "0123456789abcdef",
    "geometry": {"spacing": [0.9, 1.1, 4.0], "origin": [12.5, -7.25, 100.0],
                 "direction": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]},
    "shape": [14, 40, 36], "bbox": [[0, 14], [3, 40], [0, 36]], "shape_after_crop": [14, 37, 36],
    "spacing": [4.0, 1.1, 0.9], "target_spacing": [2.0, 1.0, 1.0], "shape_after_resampling": [28, 41, 32],
    "name": "case_000", "class_voxels": {"0": 30000, "1": 5000, "2": 1736},
}  # fmt: skip


def _case():
    rng = np.random.default_rng(3)
    img = rng.normal(0, 1, (14, 40, 36)).astype(np.float32)
    img[:, :3] = 0
    seg = np.zeros(img.shape, np.uint8)
    seg[3:9, 10:30, 8:28] = 1
    return img, seg


def test_preprocessing_returns_case_properties_that_round_trip_through_json():
    img, seg = _case()
    plans = plans_for([{"scheme": "zscore"}], target_spacing=(2.0, 1.0, 1.0))
    _data, s, props = preprocess_array(img, GEOMETRIES["oblique"], plans, seg)
    assert isinstance(props, CaseProperties)
    assert props.bbox == ((0, 14), (3, 40), (0, 36)) and props.shape_after_crop == (14, 37, 36)
    assert props.original_geometry() == GEOMETRIES["oblique"] and props.plans_id == plans.id
    d = json.loads(json.dumps(props.to_dict()))  # plain JSON
    assert CaseProperties.from_dict(d) == props
    np.testing.assert_array_equal(props.restore_label(s), restore_label(s, d))


def test_an_existing_case_json_loads_and_restores():
    props = CaseProperties.from_dict(OLD_JSON, "case_000.json")
    assert props.name == "case_000" and props.class_voxels == {0: 30000, 1: 5000, 2: 1736}
    assert props.to_dict() == OLD_JSON  # written back unchanged
    seg = np.zeros((28, 41, 32), np.uint8)
    seg[4:20, 10:30, 5:25] = 2
    back = props.restore_label(seg)
    assert back.shape == (14, 40, 36) and back.dtype == np.uint8 and (back[:, :3] == 0).all()
    probs = np.stack([seg == c for c in range(3)]).astype(np.float32)
    np.testing.assert_array_equal(restore_label_from_probabilities(probs, OLD_JSON), back)
    full = props.restore_probabilities(probs)
    assert full.shape == (3, 14, 40, 36) and (full[0, :, :3] == 1).all()
    with pytest.raises(UserError, match=r"label shape \(28, 41, 31\) is not the preprocessed shape"):
        props.restore_label(seg[..., :31])


def test_transposed_properties_untranspose_what_they_restore():
    props = CaseProperties.from_dict({**OLD_JSON, "transpose_forward": [2, 0, 1]})
    assert props.transpose_forward == (2, 0, 1)
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    assert props.untranspose(arr).shape == (3, 4, 2)
    np.testing.assert_array_equal(props.untranspose(arr), arr.transpose(1, 2, 0))
    assert props.untranspose(arr[None], channels=True).shape == (1, 3, 4, 2)
    assert CaseProperties.from_dict({**OLD_JSON, "transpose_forward": [0, 1, 2]}).transpose_forward is None


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("bbox", [[0, 14], [3, 41], [0, 36]], "bbox must be 3"),
    ("bbox", "all", "bbox must be 3"),
    ("shape", [14, -40, 36], "shape must be 3 positive integers"),
    ("spacing", [4.0, float("nan"), 0.9], "spacing must be 3 positive finite"),
    ("shape_after_crop", [1, 2, 3], "shape_after_crop [1, 2, 3] is not the size"),
    ("geometry", {"spacing": [1, 1, 1], "origin": [0, 0, 0], "direction": [1]}, "geometry"),
    ("geometry", {"spacing": [1, 1, 1], "origin": [0, "x", 0], "direction": [1] * 9}, "geometry must hold"),
    ("transpose_forward", [0, 0, 1], "transpose_forward must be a permutation"),
    ("class_voxels", {"one": 3}, "class_voxels must map"),
    ("plans_id", 7, "plans_id must be a string"),
    ("shape_after_resampling", None, "shape_after_resampling must be 3 integers"),
    ("shape", [10**9, 10**9, 10**9], "over 2,147,483,648 voxels"),  # refused before anything is allocated
    ("shape", [10**400, 40, 36], "shape must be 3 integers"),
    ("shape", [float("inf"), 40, 36], "shape must be 3 integers"),
    ("shape_after_resampling", [True, True, True], "shape_after_resampling must be 3 integers"),
    ("spacing", [True, 1, 1], "spacing must be 3 numbers"),
    ("target_spacing", ["1", "1", "1"], "target_spacing must be 3 numbers"),
    ("class_voxels", {"\u00b2": 1}, "class_voxels must map"),  # a digit to str.isdigit, not to int()
    ("class_voxels", {"9" * 5000: 1}, "class_voxels must map"),
    ("class_voxels", {"1": 10**100}, "class_voxels must map"),
    ("geometry", {"spacing": [1, 1, 1], "origin": [10**400, 0, 0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]},
     "geometry must hold finite numbers"),
    ("geometry", {"spacing": [1, 1, 1], "origin": [0, 0, 0], "direction": [0] * 9}, "direction must be an invertible"),
])
def test_hostile_values_are_refused_in_one_line_naming_the_file(tmp_path, key, value, needle):
    with pytest.raises(UserError) as e:
        CaseProperties.from_dict({**OLD_JSON, key: value}, "pre/case_000.json")
    msg = str(e.value)
    assert msg.startswith("pre/case_000.json: ") and needle in msg and "\n" not in msg
    with pytest.raises(UserError, match="lack shape"):
        CaseProperties.from_dict({k: v for k, v in OLD_JSON.items() if k != "shape"}, "x.json")


def test_load_case_gives_case_properties_and_names_a_damaged_json(tmp_path):
    root = make_v2_dataset(tmp_path / "d", cases=1)
    plans = plans_for([{"scheme": "zscore"}], patch=(16, 32, 32))
    preprocess_dataset(root, plans=plans, workers=1)
    out = root / "preprocessed"
    name = next(p.stem for p in out.glob("*.json") if p.name != "plans.json")
    *_, props = load_case(out, name)
    assert isinstance(props, CaseProperties) and props.name == name and props.plans_id == plans.id
    d = json.loads((out / f"{name}.json").read_text())
    assert d == props.to_dict()
    (out / f"{name}.json").write_text(json.dumps({**d, "bbox": [[0, 1]]}))
    with pytest.raises(UserError, match=rf"{name}\.json: bbox must be 3"):
        load_case(out, name)
    # properties that do not describe the arrays beside them: named, not found later as a shape mismatch
    wrong = [n + 1 for n in d["shape_after_resampling"]]
    (out / f"{name}.json").write_text(json.dumps({**d, "shape_after_resampling": wrong}))
    with pytest.raises(UserError, match=rf"{name}\.json: the case's arrays .* are not its preprocessed shape"):
        load_case(out, name)

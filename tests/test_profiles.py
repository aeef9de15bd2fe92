"""Target profiles: strict loading, extends, built-ins."""

from __future__ import annotations

import pytest

from edgeq.errors import ProfileError
from edgeq.profiles import list_targets, load_profile, profile_yaml


def test_builtin_targets_load():
    names = {p.name for p in list_targets()}
    assert {"tensorrt", "qnn", "qnn-a16w8", "coreml", "ort-cpu"} <= names
    trt = load_profile("tensorrt")
    assert trt.activations.dtype == "int8" and trt.activations.symmetric and trt.placement.residual_add
    qnn = load_profile("qnn")
    assert qnn.placement.mode == "all" and qnn.weights.per_channel_ops == ("Conv", "ConvTranspose")
    assert qnn.placement.fixed_output_scales["Sigmoid"].scale == pytest.approx(1 / 256)


def test_extends_merges_and_overrides(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("extends: qnn\nname: mine\nactivations:\n  dtype: uint16\nthresholds:\n  min_cosine: 0.9\n")
    prof = load_profile(p)
    assert prof.name == "mine" and prof.activations.dtype == "uint16"
    assert prof.activations.symmetric is False, "unspecified keys come from the base"
    assert prof.thresholds.min_cosine == 0.9 and prof.placement.mode == "all"
    assert "mine" in profile_yaml(prof)


def test_unknown_key_names_key_file_and_valid_keys(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text("extends: tensorrt\nactivations:\n  dtpye: int8\n")
    with pytest.raises(ProfileError) as exc:
        load_profile(p)
    msg = str(exc.value)
    assert "dtpye" in msg and str(p) in msg and "dtype" in msg and "observer" in msg


@pytest.mark.parametrize("text,match", [
    ("activations:\n  symmetric: maybe\n", "true or false"),
    ("activations:\n  dtype: int7\n", "must be one of"),
    # float dtypes are no Q/DQ dtypes (they crashed insert_qdq); float16 comes from the to_fp16 pass
    ("extends: ort-cpu\nweights:\n  dtype: float32\n", "weights.dtype must be one of"),
    ("extends: ort-cpu\nactivations:\n  dtype: float16\n", "activations.dtype must be one of"),
    ("thresholds:\n  min_cosine: high\n", "must be a number"),
    ("placement:\n  ops: Conv\n", "must be a list"),
    ("- a\n- b\n", "must be a YAML mapping"),
    ("a: [unclosed\n", "invalid YAML"),
    ("extends: no-such-target\n", "unknown target"),
])
def test_bad_profiles(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ProfileError, match=match):
        load_profile(p)


def test_circular_extends(tmp_path):
    (tmp_path / "a.yaml").write_text(f"extends: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"extends: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ProfileError, match="circular"):
        load_profile(tmp_path / "a.yaml")


def test_unknown_target_lists_builtins():
    with pytest.raises(ProfileError, match="tensorrt"):
        load_profile("tensorrrt")


def test_an_exponent_without_a_dot_is_read_as_the_number_yaml_1_1_leaves_as_a_string(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("extends: tensorrt\nname: p\nactivations: {max_abs_range: 1e5}\n"
                 "post_passes:\n  - name: to_fp16\n    options: {max_abs: 2e4}\n")
    prof = load_profile(p)
    from edgeq.pass_base import make_pass

    assert prof.activations.max_abs_range == 1e5
    assert make_pass("to_fp16", prof.post_passes[0].options).options.max_abs == 2e4
    p.write_text("extends: tensorrt\nname: p\nactivations: {max_abs_range: big}\n")
    with pytest.raises(ProfileError, match="must be a number"):
        load_profile(p)

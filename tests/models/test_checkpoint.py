import json

import pytest
import torch
from safetensors.torch import save_file

from hybridreg.models import (CheckpointError, FAEMRegNet, FeatureAutoencoder,
                              SpatialTransformer, load_model, read_metadata, save_model)

AE_LAYERS = [(8, 3, 1), (4, 3, 2), (1, 3, 2)]


def _header(cls, config, version=1):
    return {"hybridreg_config": json.dumps({"class": cls, "config": config,
                                            "format_version": version})}


def _tensors(model):
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("make", [
    lambda: FAEMRegNet.from_preset("tiny"),
    lambda: FeatureAutoencoder(AE_LAYERS),
])
def test_round_trip_gives_identical_outputs(tmp_path, make):
    model = make().eval()
    path = save_model(model, tmp_path / "m.safetensors", metadata={"iterations": 3, "note": "x"})
    assert path.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left
    loaded = load_model(path)
    assert type(loaded) is type(model) and loaded.config == model.config
    assert not loaded.training
    if isinstance(model, FAEMRegNet):
        x = torch.randn(1, 1, 7, 40, 52)
    else:
        x = torch.randn(1, 1, 40, 52)
    with torch.no_grad():
        out, out2 = model(x), loaded(x)
    if isinstance(out, tuple):
        assert all(torch.equal(a, b) for a, b in zip(out, out2))
    else:
        assert torch.equal(out, out2)
    meta = read_metadata(path)
    assert meta["class"] == type(model).__name__ and meta["format_version"] == 1
    assert meta["metadata"] == {"iterations": 3, "note": "x"}


def test_overwrite_and_transformer(tmp_path):
    p = tmp_path / "st.safetensors"
    save_model(FeatureAutoencoder(AE_LAYERS), p)
    save_model(SpatialTransformer(padding_mode="zeros"), p)  # replaces the file
    st = load_model(p)
    assert isinstance(st, SpatialTransformer) and st.padding_mode == "zeros"
    assert read_metadata(p)["metadata"] == {}


def test_never_unpickles(tmp_path, monkeypatch):
    p = save_model(FeatureAutoencoder(AE_LAYERS), tmp_path / "a.safetensors")

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", forbidden)
    assert isinstance(load_model(p), FeatureAutoencoder)


def test_save_rejects_unknown_models_and_bad_metadata(tmp_path):
    with pytest.raises(TypeError, match="cannot save a Linear"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "l.safetensors")
    with pytest.raises(TypeError, match="JSON"):
        save_model(FeatureAutoencoder(AE_LAYERS), tmp_path / "a.safetensors",
                   metadata={"t": torch.zeros(1)})
    assert not list(tmp_path.iterdir())


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.safetensors")


def test_not_a_safetensors_file(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(p)


def test_truncated_file(tmp_path):
    p = save_model(FeatureAutoencoder(AE_LAYERS), tmp_path / "a.safetensors")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(p)


def test_plain_safetensors_without_config(tmp_path):
    p = tmp_path / "plain.safetensors"
    save_file(_tensors(FeatureAutoencoder(AE_LAYERS)), str(p))
    with pytest.raises(CheckpointError, match="no 'hybridreg_config'"):
        load_model(p)


def test_missing_and_unknown_class(tmp_path):
    tensors = _tensors(FeatureAutoencoder(AE_LAYERS))
    p = tmp_path / "c.safetensors"
    save_file(tensors, str(p), metadata={"hybridreg_config": json.dumps(
        {"config": {}, "format_version": 1})})
    with pytest.raises(CheckpointError, match="missing 'class'"):
        load_model(p)
    save_file(tensors, str(p), metadata=_header("VoxelMorph", {}))
    with pytest.raises(CheckpointError, match="unknown model class 'VoxelMorph'"):
        load_model(p)
    save_file(tensors, str(p), metadata=_header("FeatureAutoencoder", {"layers": AE_LAYERS},
                                                version=99))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_model(p)
    save_file(tensors, str(p), metadata=_header("FeatureAutoencoder", {"depth": 3}))
    with pytest.raises(CheckpointError, match="does not build a FeatureAutoencoder"):
        load_model(p)


def test_weights_of_another_architecture(tmp_path):
    p = tmp_path / "x.safetensors"
    tiny = FAEMRegNet.from_preset("tiny")
    save_file(_tensors(FeatureAutoencoder(AE_LAYERS)), str(p),
              metadata=_header("FAEMRegNet", tiny.config))
    with pytest.raises(CheckpointError, match="another architecture.*missing tensor "
                                              "'deconvs.0.weight'.*unexpected tensor "
                                              "'decoder.0.bias'"):
        load_model(p)


def test_mismatching_shapes_name_the_tensor(tmp_path):
    p = tmp_path / "x.safetensors"
    cfg = FAEMRegNet.from_preset("tiny").config
    wider = FAEMRegNet(**{**cfg, "encoder": [[6, 3, 2], [8, 3, 2], [8, 3, 2]]})
    save_file(_tensors(wider), str(p), metadata=_header("FAEMRegNet", cfg))
    with pytest.raises(CheckpointError,
                       match=r"'encoder.0.weight' has shape \(6, 1, 3, 3, 3\) in the file "
                             r"but \(4, 1, 3, 3, 3\)"):
        load_model(p)

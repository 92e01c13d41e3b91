"""train-features / train / finetune and the learned methods on the command line (tiny)."""
from __future__ import annotations

import numpy as np
import pytest

from hybridreg import cli, io


def run(argv) -> int:
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("train")
    assert run(["phantom", "--out", d / "ph.tif", "--sections", 5, "--size", 96, 96]) == 0
    assert run(["train-features", d / "ph.tif", "--out", d / "ae.safetensors", "--steps", 2,
                "--crop", 32, "--batch", 2, "--no-progress"]) == 0
    assert run(["train", d / "ph.tif", "--out", d / "net.safetensors", "--preset", "tiny",
                "--steps", 2, "--crop", 64, "--batch", 1, "--no-progress"]) == 0
    return d


def test_training_writes_loadable_weights(trained):
    from hybridreg.models import FAEMRegNet, FeatureAutoencoder, load_model

    assert isinstance(load_model(trained / "ae.safetensors"), FeatureAutoencoder)
    assert isinstance(load_model(trained / "net.safetensors"), FAEMRegNet)


def test_align_and_register_with_learned_methods(trained, capsys):
    d = trained
    assert run(["align", d / "ph.tif", "--method", "learned", "--model", d / "net.safetensors",
                "--mode", "sequential", "--out", d / "al.tif", "--fields-out", d / "f",
                "--no-progress"]) == 0
    from hybridreg.outputs import read_transforms

    maps, grid = read_transforms(d / "f", shape_yx=(96, 96))
    assert maps.shape == (5, 2) + grid.node_shape
    stack = io.read_stack(d / "ph.tif").data
    io.write_stack(d / "a.tif", stack[:1])
    io.write_stack(d / "b.tif", stack[1:2])
    assert run(["register", d / "a.tif", d / "b.tif", "--method", "ssemnet", "--model",
                d / "ae.safetensors", "--out", d / "w.tif"]) == 0
    assert np.isfinite(io.read_stack(d / "w.tif").data).all()
    # every method writes the same outputs: the field, its ITK .h5 and a transformix chain
    # (issue 18, item 10)
    assert run(["register", d / "a.tif", d / "b.tif", "--method", "learned", "--model",
                d / "net.safetensors", "--out", d / "wl.tif", "--fields-out", d / "pl"]) == 0
    import itk

    u, _, _ = io.read_field(d / "pl" / "section_0000.mha")
    t = itk.transformread(str(d / "pl" / "section_0000.h5"))[0]
    np.testing.assert_array_equal(
        np.moveaxis(itk.array_from_image(t.GetDisplacementField()), -1, 0), u)
    assert (d / "pl" / "transformix" / "TransformParameters.0.txt").is_file()


def test_finetune_and_errors(trained, capsys):
    d = trained
    assert run(["finetune", d / "ph.tif", "--model", d / "net.safetensors", "--out",
                d / "ft.safetensors", "--steps", 2, "--crop", 64, "--batch", 1,
                "--no-progress"]) == 0
    capsys.readouterr()
    # an autoencoder is not a registration network: a clear error, not a traceback
    assert run(["register", d / "ph.tif", d / "ph.tif", "--method", "learned", "--model",
                d / "ae.safetensors", "--out", d / "x.tif"]) == 2
    assert run(["align", d / "ph.tif", "--method", "learned", "--params", "em_rigid",
                "--out", d / "y.tif", "--fields-out", d / "g"]) == 2
    assert "--params is for --method elastix" in capsys.readouterr().err

"""Intensities on the networks' 0-255 scale: one map per stack, the same in the API and CLI
(issue 18 item 1: a uint16 stack or floats in [0, 1] used to reach the networks unscaled)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from hybridreg import cli, io
from hybridreg.methods import intensity_map


def test_intensity_map_per_dtype_and_choice():
    u8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert intensity_map(u8) == (1.0, 0.0)
    assert intensity_map(u8.astype(np.float32) / 255) == (255.0, 0.0)
    assert intensity_map(u8.astype(np.float32)) == (1.0, 0.0)
    x = np.linspace(1000, 5000, 20000).astype(np.uint16).reshape(2, 100, 100)
    gain, offset = intensity_map(x)
    lo, hi = np.percentile(x, [0.1, 99.9])
    assert gain * lo + offset == pytest.approx(0.0, abs=1e-6)
    assert gain * hi + offset == pytest.approx(255.0, abs=1e-6)
    assert "percentiles" in intensity_map(x).note
    # percentiles for any dtype, none, and a given range
    g8, o8 = intensity_map(u8, "percentiles")
    assert g8 * np.percentile(u8, 99.9) + o8 == pytest.approx(255.0)
    assert intensity_map(x, "none") == (1.0, 0.0)
    g, o = intensity_map(x, (1000, 3000))
    assert (g * 1000 + o, g * 3000 + o) == pytest.approx((0.0, 255.0))
    assert intensity_map(x, (1000, 3000)).options() == {"intensity_scale": g,
                                                        "intensity_offset": o}
    with pytest.raises(ValueError, match="LO < HI"):
        intensity_map(x, (5, 5))
    with pytest.raises(ValueError, match="intensity must be one of"):
        intensity_map(x, "robust")
    with pytest.raises(TypeError, match="numeric"):
        intensity_map(np.array([["a"]]))


def test_a_lazy_stack_is_sampled_by_region_as_the_array_is(tmp_path, monkeypatch):
    import hybridreg.io.base as base

    rng = np.random.default_rng(0)
    stack = rng.normal(2000, 300, (5, 200, 180)).clip(0, 65535).astype(np.uint16)
    io.write_stack(tmp_path / "s.tif", stack)
    lazy = io.read_stack(tmp_path / "s.tif", lazy=True).data
    assert intensity_map(lazy) == pytest.approx(intensity_map(stack), rel=1e-9)
    monkeypatch.setattr(base, "WHOLE_SECTION_BYTES", 1024)  # planes: blocks by region
    lazy = io.read_stack(tmp_path / "s.tif", lazy=True).data
    got, want = intensity_map(lazy), intensity_map(stack)
    assert lazy.reads == 0  # no whole section was read
    assert got == pytest.approx(want, rel=0.03)  # 64 blocks a section against a stride


@pytest.fixture(scope="module")
def pair():
    """Two phantom sections, the second moved by a few pixels (uint8)."""
    from hybridreg import phantom

    ph = phantom.make_phantom(sections=2, shape_yx=(128, 128), seed=0)
    moved = ndimage.shift(ph.stack[1].astype(np.float32), (3, -2), order=1, mode="nearest")
    return ph.stack[0], np.clip(moved, 0, 255).round().astype(np.uint8)


def test_api_registers_uint16_and_unit_floats_as_uint8(pair):
    import hybridreg

    f, m = pair
    inner = (slice(None), slice(16, -16), slice(16, -16))
    ref = hybridreg.register(f, m, method="learned").field
    as16 = [(a.astype(np.float64) * 13 + 1000).astype(np.uint16) for a in pair]
    as01 = [a.astype(np.float32) / 255 for a in pair]
    for kind, (a, b) in (("uint16", as16), ("0..1", as01)):
        auto = hybridreg.register(a, b, method="learned").field
        raw = hybridreg.register(a, b, method="learned", intensity="none").field
        err_auto = float(np.abs(auto - ref)[inner].mean())
        err_raw = float(np.abs(raw - ref)[inner].mean())
        assert err_auto < 1.0, (kind, err_auto)
        assert err_raw > 3.0, (kind, err_raw)  # what a user got before
    # a method built by name with its own scale keeps it
    own = hybridreg.register(*as16, method="learned", intensity_scale=1.0).field
    assert np.abs(own - ref)[inner].mean() > 3.0


def test_cli_intensity_and_option_on_register(tmp_path, pair, capsys):
    as16 = [(a.astype(np.float64) * 13 + 1000).astype(np.uint16) for a in pair]
    for name, a in zip(("f", "m"), as16):
        io.write_stack(tmp_path / f"{name}.tif", a[None])
    io.write_stack(tmp_path / "f8.tif", pair[0][None])
    io.write_stack(tmp_path / "m8.tif", pair[1][None])

    def register(fixed, moving, tag, *extra):
        code = cli.main(["register", str(tmp_path / fixed), str(tmp_path / moving), "--out",
                         str(tmp_path / f"{tag}.tif"), "--fields-out", str(tmp_path / tag),
                         "--method", "learned", *extra])
        assert code == 0, capsys.readouterr().err
        return io.read_fields(tmp_path / tag)[0][0]

    inner = (slice(None), slice(16, -16), slice(16, -16))
    ref = register("f8.tif", "m8.tif", "u8")
    assert "intensities: uint8: as is" in capsys.readouterr().out
    auto = register("f.tif", "m.tif", "auto")
    assert "percentiles" in capsys.readouterr().out
    assert np.abs(auto - ref)[inner].mean() < 1.0
    lo, hi = 1000, 1000 + 13 * 255
    given = register("f.tif", "m.tif", "given", "--intensity", f"{lo}:{hi}")
    assert np.abs(given - ref)[inner].mean() < 0.05  # the exact inverse of the uint16 map
    raw = register("f.tif", "m.tif", "raw", "--intensity", "none")
    assert np.abs(raw - ref)[inner].mean() > 3.0
    # --option on register, for the method chosen
    one = register("f8.tif", "m8.tif", "one", "--option", "learned.references=1")
    assert one.shape == ref.shape
    capsys.readouterr()
    assert cli.main(["register", str(tmp_path / "f8.tif"), str(tmp_path / "m8.tif"), "--out",
                     str(tmp_path / "x.tif"), "--method", "learned", "--option",
                     "elastix.threads=1"]) == 2
    assert "is for method 'elastix', not --method learned" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["register", "a", "b", "--out", "c", "--intensity", "bright"])
    assert "expected auto, percentiles, none or LO:HI" in capsys.readouterr().err

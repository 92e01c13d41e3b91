"""The procedural serial-EM phantom: layout, determinism, 3D consistency, EM-like appearance."""
from __future__ import annotations

import numpy as np
import pytest

from hybridreg.phantom import Phantom, make_phantom

SHAPE = (96, 128)


def ncc(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom(sections=8, shape_yx=(128, 128), seed=0)


def test_shapes_and_dtypes():
    p = make_phantom(sections=5, shape_yx=SHAPE, seed=1)
    assert isinstance(p, Phantom)
    assert p.stack.shape == (5,) + SHAPE and p.stack.dtype == np.uint8
    assert p.labels.shape == (5,) + SHAPE and p.labels.dtype == np.int32
    assert p.labels.min() == 0                      # membranes
    assert p.labels.max() >= 2                      # several cells
    # ids are consecutive from 1
    ids = np.unique(p.labels)
    np.testing.assert_array_equal(ids, np.arange(ids.max() + 1))


def test_single_section_and_small_grid():
    p = make_phantom(sections=1, shape_yx=(16, 16), seed=0)
    assert p.stack.shape == (1, 16, 16)
    assert p.labels.shape == (1, 16, 16)


def test_frozen():
    p = make_phantom(sections=1, shape_yx=(16, 16), seed=0)
    with pytest.raises(AttributeError):
        p.stack = None


def test_deterministic_per_seed():
    a = make_phantom(sections=3, shape_yx=SHAPE, seed=7)
    b = make_phantom(sections=3, shape_yx=SHAPE, seed=7)
    np.testing.assert_array_equal(a.stack, b.stack)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_seeds_differ():
    a = make_phantom(sections=3, shape_yx=SHAPE, seed=7)
    b = make_phantom(sections=3, shape_yx=SHAPE, seed=8)
    assert np.mean(a.stack != b.stack) > 0.5
    assert abs(ncc(a.stack, b.stack)) < 0.2


def test_grey_levels_follow_the_targets(phantom):
    # defaults follow the ISBI 2012 ssTEM volume: mean 126, std 44
    assert abs(phantom.stack.mean() - 126.0) < 3.0
    assert abs(phantom.stack.std() - 44.0) < 4.0
    p = make_phantom(sections=2, shape_yx=SHAPE, seed=0, intensity_mean=90.0,
                     intensity_std=20.0)
    assert abs(p.stack.mean() - 90.0) < 2.0
    assert abs(p.stack.std() - 20.0) < 2.0


def test_membranes_darker_than_cytoplasm(phantom):
    s, lab = phantom.stack.astype(np.float64), phantom.labels
    membrane, cytoplasm = s[lab == 0].mean(), s[lab > 0].mean()
    assert membrane < cytoplasm - 40.0              # measured: about 70 vs 138
    assert 0.05 < np.mean(lab == 0) < 0.35          # real ISBI membrane mask: 22 %


def test_cell_size_follows_the_option():
    """cell_size_px is the square root of the mean cross-section area (membranes included)."""
    kw = dict(sections=2, shape_yx=(192, 192), seed=2, size_variation=0.0)
    small = make_phantom(**kw, cell_size_px=24.0)
    large = make_phantom(**kw, cell_size_px=48.0)

    def size(p):
        return np.sqrt(np.mean([lab.size / len(np.unique(lab[lab > 0])) for lab in p.labels]))

    # measured over seeds 0-3: 25-28 px and 43-50 px
    assert 0.8 * 24 < size(small) < 1.25 * 24
    assert 0.75 * 48 < size(large) < 1.3 * 48


def test_labels_consistent_across_sections(phantom):
    lab = phantom.labels
    for k in range(len(lab) - 1):
        cur, nxt = lab[k], lab[k + 1]
        ids = np.unique(cur[cur > 0])
        present = np.isin(ids, np.unique(nxt))
        assert present.mean() > 0.6                  # measured: >= 0.75 (edge slivers)
        # by area, nearly all of section k belongs to cells that continue in k + 1
        assert np.isin(cur[cur > 0], np.unique(nxt)).mean() > 0.85
        # the same pixel mostly keeps its cell
        both = (cur > 0) & (nxt > 0)
        assert np.mean(cur[both] == nxt[both]) > 0.6
    # cells start and end: not every id is in every section
    per_section = [set(np.unique(x)) - {0} for x in lab]
    assert set.union(*per_section) != set.intersection(*per_section)


def test_adjacent_sections_similar_but_not_identical(phantom):
    s = phantom.stack
    adjacent = [ncc(s[k], s[k + 1]) for k in range(len(s) - 1)]
    # measured on this phantom: 0.29-0.37 (real ISBI 2012 ssTEM: 0.05-0.34, mean 0.21)
    assert 0.1 < np.mean(adjacent) < 0.6
    assert max(adjacent) < 0.8
    assert min(adjacent) > 0.05
    # neighbours are more alike than sections far apart
    far = [ncc(s[k], s[k + 6]) for k in range(len(s) - 6)]
    assert np.mean(far) < np.mean(adjacent) - 0.1


def test_organelles_can_be_switched_off():
    kw = dict(sections=2, shape_yx=SHAPE, seed=3)
    full = make_phantom(**kw)
    bare = make_phantom(**kw, mito_density=0, vesicle_density=0, dot_density=0,
                        texture_std=0, noise_std=0)
    np.testing.assert_array_equal(full.labels, bare.labels)   # same geometry
    # without texture and organelles, the cytoplasm is much smoother
    lab = bare.labels
    assert bare.stack[lab > 0].std() < full.stack[lab > 0].std()


@pytest.mark.parametrize("kwargs, match", [
    (dict(sections=0), "sections must be >= 1"),
    (dict(shape_yx=(8, 64)), "at least"),
    (dict(shape_yx=(64,)), "pair"),
    (dict(cell_size_px=-3), "cell_size_px"),
    (dict(noise_std=-1.0), "noise_std"),
    (dict(membrane_px=0), "membrane_px"),
    (dict(elongation=float("nan")), "elongation"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make_phantom(**kwargs)


def test_sections_must_be_an_integer():
    with pytest.raises(TypeError, match="sections"):
        make_phantom(sections=2.5)


def test_comparable_to_real_sstem(shared_data):
    """Grey levels and adjacent-section similarity against the ISBI 2012 volume."""
    tifffile = pytest.importorskip("tifffile")
    path = shared_data / "isbi2012_train_raw.tif"
    if not path.exists():
        pytest.skip(f"{path} not present")
    real = tifffile.imread(path)[:8, :256, :256]
    p = make_phantom(sections=8, shape_yx=(256, 256), seed=0)
    real_ncc = np.mean([ncc(real[k], real[k + 1]) for k in range(7)])
    phantom_ncc = np.mean([ncc(p.stack[k], p.stack[k + 1]) for k in range(7)])
    assert abs(p.stack.mean() - real.mean()) < 15
    assert abs(p.stack.std() - real.std()) < 10
    assert 0.5 * real_ncc < phantom_ncc < 2.5 * real_ncc

"""Canonical orientation of referring images: the flips read from the reader's direction, the lazy flipped crops the
loader takes, and the class locations that steer foreground oversampling."""
import numpy as np
import pytest
import torch

from lsms_nnunet.preprocessing.orientation import (CanonicallyOrientedDataset, FlippedView, canonical_flip_axes,
                                                   flip_spatial)

IDENTITY_3D = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _sitk(direction, spacing=(1.0, 1.0, 2.0)):
    return {"sitk_stuff": {"spacing": spacing, "origin": (0.0,) * len(spacing), "direction": direction}}


@pytest.mark.parametrize("properties, transpose, expected", [
    (_sitk(IDENTITY_3D), (0, 1, 2), ()),
    # ITK index axis x (numpy's last axis) runs towards the patient's right: flip it
    (_sitk((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)), (0, 1, 2), (2,)),
    # RAS-stored (x and y reversed against LPS), as nibabel-written volumes often are
    (_sitk((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)), (0, 1, 2), (1, 2)),
    # nnU-Net's planned transpose moves numpy's first axis (z, reversed) to the last place
    (_sitk((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)), (1, 2, 0), (2,)),
    # an oblique but mostly reversed y axis
    (_sitk((1.0, 0.0, 0.0, 0.0, -0.9, 0.1, 0.0, 0.1, 0.9)), (0, 1, 2), (1,)),
    # a 2D image: nnU-Net's leading axis has no direction
    (_sitk((1.0, 0.0, 0.0, -1.0), spacing=(1.0, 1.0)), (0, 1, 2), (1,)),
    # nibabel's RAS affine of a volume stored LPS: nothing to flip
    ({"nibabel_stuff": {"original_affine": np.diag([-1.0, -1.0, 2.0, 1.0])}}, (0, 1, 2), ()),
    ({"nibabel_stuff": {"original_affine": np.diag([1.0, 1.0, 2.0, 1.0])}}, (0, 1, 2), (1, 2)),
    ({}, (0, 1, 2), ()),  # PNG / TIFF readers record no orientation
])
def test_flips_follow_the_recorded_direction(properties, transpose, expected):
    assert canonical_flip_axes(properties, transpose) == expected


def test_flipped_view_crops_like_the_flipped_array():
    array = np.arange(2 * 5 * 6 * 7).reshape(2, 5, 6, 7)
    view = FlippedView(array, (0, 2))
    flipped = array[:, ::-1, :, ::-1]
    assert view.shape == array.shape
    for item in [(slice(None), slice(1, 4), slice(0, 6), slice(2, 7)), (0, slice(3, 5)), slice(None), (..., 3),
                 (slice(None), slice(4, 2)), ()]:
        assert np.array_equal(view[item], flipped[item]), item
    assert np.array_equal(np.asarray(view), flipped)
    assert np.array_equal(flip_spatial(array, (0, 2)), flipped)
    assert torch.equal(flip_spatial(torch.from_numpy(array), (0, 2)), torch.from_numpy(flipped.copy()))
    assert np.array_equal(FlippedView(array[0], (1,), leading_axes=0)[2:4], array[0, :, ::-1][2:4])


class _Dataset:
    identifiers = ["case"]

    def __init__(self, data, seg, properties):
        self.case = data, seg, None, properties

    def load_case(self, identifier):
        return self.case


def test_a_scan_stored_mirrored_loads_as_the_same_case():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(1, 4, 8, 8)).astype(np.float32)
    seg = (rng.random((1, 4, 8, 8)) > 0.8).astype(np.int16)
    locations = np.argwhere(seg == 1)
    stored = _Dataset(data, seg, {**_sitk(IDENTITY_3D), "class_locations": {1: locations}})
    mirrored_direction = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    mirrored = _Dataset(data[..., ::-1].copy(), seg[..., ::-1].copy(),
                        {**_sitk(mirrored_direction), "class_locations": {1: np.argwhere(seg[..., ::-1] == 1)}})
    as_stored = CanonicallyOrientedDataset(stored, (0, 1, 2)).load_case("case")
    canonical = CanonicallyOrientedDataset(mirrored, (0, 1, 2)).load_case("case")
    assert np.array_equal(np.asarray(canonical[0]), as_stored[0])
    assert np.array_equal(canonical[1][:, 1:3, 2:6, 0:5], seg[:, 1:3, 2:6, 0:5])
    located = canonical[3]["class_locations"][1]
    assert sorted(map(tuple, located)) == sorted(map(tuple, locations))
    assert all(seg[tuple(voxel)] == 1 for voxel in located)

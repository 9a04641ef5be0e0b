"""Orientation is meaning: a referring model sees every image in one canonical orientation.

nnU-Net reads arrays as stored and never reorients, so the same scan stored with a flipped direction matrix is a
mirrored image to the network — harmless for "all lesions", fatal for "the lesion in the left lobe". Here each
spatial axis of a preprocessed array is flipped, where needed, to run along +x, +y or +z of patient space (ITK's LPS
convention), read from the direction the image reader recorded in the case's properties (SimpleITK or nibabel);
readers that record no orientation (PNG, TIFF) leave the array as stored. Flipping is its own inverse: predictions
are flipped back before export, so masks overlay the input exactly.

Axis *order* is not changed: nnU-Net's planned transpose fixes it for the whole dataset, and a scan stored with
permuted axes (sagittal slices in an axial dataset) should be resampled by the user before prediction.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

#: nibabel's affines map to RAS; ITK's directions to LPS.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _array_axis_directions(properties: Mapping) -> list[np.ndarray | None] | None:
    """Patient-space (LPS) direction of each spatial axis of the array the reader returned (before nnU-Net's
    transpose); None for an axis without one, or for a reader without orientation."""
    sitk_stuff = properties.get("sitk_stuff")
    if sitk_stuff and "direction" in sitk_stuff:
        dim = len(sitk_stuff["spacing"])
        if dim not in (2, 3):
            return None
        direction = np.reshape(np.asarray(sitk_stuff["direction"], dtype=float), (dim, dim))
        # numpy axes reverse ITK's index axes; nnU-Net puts a leading axis in front of a 2D image
        return [None] * (3 - dim) + [direction[:, index] for index in reversed(range(dim))]
    nibabel_stuff = properties.get("nibabel_stuff")
    if nibabel_stuff:
        affine = nibabel_stuff.get("reoriented_affine", nibabel_stuff.get("original_affine"))
        if affine is None:
            return None
        linear = _RAS_TO_LPS @ np.asarray(affine, dtype=float)[:3, :3]
        return [linear[:, index] for index in reversed(range(3))]  # nnU-Net's NibabelIO transposes (2, 1, 0)
    return None


def canonical_flip_axes(properties: Mapping, transpose_forward: Sequence[int]) -> tuple[int, ...]:
    """The spatial axes of a preprocessed case (after nnU-Net's transpose) that run against patient space."""
    directions = _array_axis_directions(properties)
    if directions is None:
        return ()
    flipped = []
    for axis, source in enumerate(transpose_forward):
        direction = directions[source]
        if direction is not None and direction[np.argmax(np.abs(direction))] < 0:
            flipped.append(axis)
    return tuple(flipped)


def flip_spatial(array: np.ndarray | torch.Tensor, axes: Sequence[int]) -> np.ndarray | torch.Tensor:
    """Flip the given spatial axes of a [C, *spatial] array or tensor (its own inverse)."""
    if not axes:
        return array
    dims = [1 + axis for axis in axes]
    if isinstance(array, torch.Tensor):
        return torch.flip(array, dims)
    return np.ascontiguousarray(np.flip(np.asarray(array), dims))


class FlippedView:
    """A lazily flipped [C, *spatial] array (numpy or blosc2; `leading_axes=0` for a [*spatial] one): a crop reads
    only the mirrored crop from storage, so a large volume is never loaded whole by nnU-Net's `crop_and_pad_nd`."""

    def __init__(self, array, spatial_axes: Sequence[int], leading_axes: int = 1):
        self.array = array
        self.flipped = {leading_axes + axis for axis in spatial_axes}
        self.shape = tuple(array.shape)
        self.ndim = len(self.shape)
        self.dtype = array.dtype

    def __getitem__(self, item) -> np.ndarray:
        item = item if isinstance(item, tuple) else (item,)
        if any(index is Ellipsis for index in item):
            position = next(i for i, index in enumerate(item) if index is Ellipsis)
            fill = (slice(None),) * (self.ndim - len(item) + 1)
            item = item[:position] + fill + item[position + 1:]
        item = item + (slice(None),) * (self.ndim - len(item))
        stored, reversed_in_result = [], []
        for axis, index in enumerate(item):
            size = self.shape[axis]
            if isinstance(index, slice):
                start, stop, step = index.indices(size)
                if step != 1:
                    raise IndexError("FlippedView supports contiguous slices only")
                stop = max(start, stop)
                if axis in self.flipped:
                    reversed_in_result.append(sum(isinstance(i, slice) for i in stored))
                    stored.append(slice(size - stop, size - start))
                else:
                    stored.append(slice(start, stop))
            else:
                index = int(index) % size
                stored.append(size - 1 - index if axis in self.flipped else index)
        crop = np.asarray(self.array[tuple(stored)])
        return np.ascontiguousarray(np.flip(crop, reversed_in_result)) if reversed_in_result else crop

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        full = self[...]
        return full if dtype is None else full.astype(dtype)


def flip_locations(locations: np.ndarray, shape: Sequence[int], axes: Sequence[int]) -> np.ndarray:
    """nnU-Net's class locations ([N, 1 + spatial] voxel indices, channel first) in the flipped array."""
    flipped = np.array(locations, copy=True)
    for axis in axes:
        if len(flipped):
            flipped[:, 1 + axis] = shape[axis] - 1 - flipped[:, 1 + axis]
    return flipped


class CanonicallyOrientedDataset:
    """An nnU-Net dataset whose `load_case` returns the case in canonical orientation (lazily flipped arrays,
    class locations to match)."""

    def __init__(self, dataset, transpose_forward: Sequence[int]):
        self.dataset = dataset
        self.identifiers = dataset.identifiers
        self.transpose_forward = tuple(transpose_forward)

    def load_case(self, identifier: str):
        data, seg, seg_prev, properties = self.dataset.load_case(identifier)
        axes = canonical_flip_axes(properties, self.transpose_forward)
        if not axes:
            return data, seg, seg_prev, properties
        shape = data.shape[1:]
        properties = dict(properties)
        if "class_locations" in properties:
            properties["class_locations"] = {label: flip_locations(locations, shape, axes)
                                             for label, locations in properties["class_locations"].items()}
        return (FlippedView(data, axes), FlippedView(seg, axes),
                None if seg_prev is None else FlippedView(seg_prev, axes, leading_axes=0), properties)

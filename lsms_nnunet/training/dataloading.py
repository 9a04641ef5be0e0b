"""Training batches of (case, prompt) pairs for nnU-Net's data loader.

nnU-Net's loader stays untouched: the dataset it reads is wrapped so that each `load_case` draws one prompt of the
case, restricts foreground oversampling to the *referred* regions and hands out a lazily binarised segmentation
(referred regions -> 1, everything else -> 0), so augmentation runs on the cheap 2-label path; for a network with a
finding head a second channel holds all of the case's lesions, augmented with the first (as nnU-Net's cascade
carries the previous stage's segmentation), and for a network with an anatomy output a last channel holds the context
regions (anatomy) as 1..K. For a network that reads the case position, the image gets the position
channels (CasePositionDataset), which only the geometric augmentations touch. The loader subclass
adds the text tensors of the drawn prompts to the batch and, with `prompts_per_image` > 1, fills consecutive slots
with one case, each slot with a prompt of different targets.
"""
from __future__ import annotations

import random
from typing import Mapping, Sequence

import numpy as np
import torch

from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from lsms_nnunet.network.case_position import CASE_POSITION_CHANNELS, case_position
from lsms_nnunet.preprocessing.prompts import Prompt, anatomy_index_map, lesion_voxels


class ReferredSegmentation:
    """A lazy view of an nnU-Net segmentation in which only the referred region ids are foreground; with
    `all_lesions`, a channel in which every lesion is (the finding head's target); with `anatomy`, a channel holding
    the context regions as 1..K in the order of `context_ids` (the anatomy output's target).

    Slicing (what nnU-Net's `crop_and_pad_nd` does, every channel at once) reads just the crop, so big volumes are
    never fully loaded. Negative values (nnU-Net's outside-of-mask marker) are kept.
    """

    def __init__(self, segmentation, targets: Sequence[int], all_lesions: bool = False,
                 context_ids: Sequence[int] = (), anatomy: bool = False):
        if segmentation.shape[0] != 1:
            raise ValueError(f"Expected a one-channel nnU-Net segmentation, got shape {segmentation.shape}.")
        self.segmentation = segmentation
        self.targets = np.asarray(sorted(targets), dtype=np.int16)
        self.all_lesions = all_lesions
        self.context_ids = tuple(context_ids)
        self.anatomy = anatomy
        self.shape = (1 + all_lesions + anatomy, *segmentation.shape[1:])
        self.ndim = len(segmentation.shape)
        self.dtype = np.dtype(np.int16)

    def __getitem__(self, item) -> np.ndarray:
        crop = np.asarray(self.segmentation[item])
        binary = np.isin(crop, self.targets).astype(np.int16)
        if self.all_lesions:
            binary = np.concatenate((binary, lesion_voxels(crop, self.context_ids).astype(np.int16)))
        if self.anatomy:
            binary = np.concatenate((binary, anatomy_index_map(crop, self.context_ids)))
        binary[np.broadcast_to(crop < 0, binary.shape)] = -1
        return binary


class PromptSamplingDataset:
    """Wraps an nnU-Net dataset; every `load_case` draws one prompt of the case and records it.

    The loader fills a batch in groups of `prompts_per_image` slots holding the same case; `drawn` is cleared per
    batch, so its length is the slot being filled.
    """

    def __init__(self, dataset, prompts_by_case: Mapping[str, Sequence[Prompt]], present_label_bias: float,
                 prompts_per_image: int = 1, finding_fraction: float = 0.0, all_lesions_target: bool = False,
                 context_ids: Sequence[int] = (), anatomy_target: bool = False):
        self.dataset = dataset
        self.all_lesions_target = all_lesions_target
        self.anatomy_target = anatomy_target
        self.context_ids = tuple(context_ids)
        self.identifiers = dataset.identifiers
        self.prompts_by_case = prompts_by_case
        self.present_label_bias = present_label_bias
        self.prompts_per_image = prompts_per_image
        self.finding_fraction = finding_fraction
        self.drawn: list[tuple[Prompt, str]] = []  # (prompt, text) per slot of the batch being built

    def _draw(self, case: str, class_locations: Mapping) -> Prompt:
        prompts = self._not_yet_answered(case)
        finding = [p for p in prompts if p.all_regions]
        if finding and self.finding_fraction > 0:
            if random.random() < self.finding_fraction:
                return finding[0]
            prompts = [p for p in prompts if not p.all_regions] or prompts
        present = [p for p in prompts if p.all_regions or any(len(class_locations.get(t, ())) for t in p.targets)]
        if present and random.random() < self.present_label_bias:
            return random.choice(present)
        return random.choice(prompts)

    def _not_yet_answered(self, case: str) -> Sequence[Prompt]:
        """The case's prompts whose targets differ from those already drawn for its image group (all prompts, if
        none differ): one image asked different questions can only be answered through the text."""
        group_start = len(self.drawn) - len(self.drawn) % self.prompts_per_image
        answered = {(prompt.all_regions, tuple(prompt.targets)) for prompt, _ in self.drawn[group_start:]}
        different = [p for p in self.prompts_by_case[case] if (p.all_regions, tuple(p.targets)) not in answered]
        return different or self.prompts_by_case[case]

    def load_case(self, identifier: str):
        data, seg, seg_prev, properties = self.dataset.load_case(identifier)
        prompt = self._draw(identifier, properties["class_locations"])
        self.drawn.append((prompt, prompt.draw_text(random)))
        targets = [t for t in properties["class_locations"] if t > 0 and t not in self.context_ids] \
            if prompt.all_regions else prompt.targets
        locations = [properties["class_locations"][t] for t in targets
                     if len(properties["class_locations"].get(t, ()))]
        referred = np.concatenate(locations) if locations else np.zeros((0, seg.ndim), dtype=np.int64)
        properties = {**properties, "class_locations": {1: referred}}
        return (data, ReferredSegmentation(seg, targets, self.all_lesions_target, self.context_ids,
                                           self.anatomy_target), seg_prev, properties)


class CasePositionView:
    """A lazy [C + 3, *spatial] view of a preprocessed case: its image channels, then each voxel's normalised position
    in the case (network/case_position.py). A crop reads only the crop of the image and computes only its positions."""

    def __init__(self, data):
        self.data = data
        self.shape = (data.shape[0] + CASE_POSITION_CHANNELS, *data.shape[1:])
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, item) -> np.ndarray:
        item = item if isinstance(item, tuple) else (item,)
        item = item + (slice(None),) * (self.ndim - len(item))
        channels, region = item[0], item[1:]
        if not all(isinstance(part, slice) for part in region):
            raise IndexError("CasePositionView takes slices of the spatial axes only (what crop_and_pad_nd asks for)")
        image = np.asarray(self.data[(slice(None), *region)], dtype=np.float32)
        return np.concatenate((image, case_position(self.data.shape[1:], region)))[channels]


class CasePositionDataset:
    """Wraps an nnU-Net dataset (canonically oriented for referring tasks): `load_case` gives a CasePositionView."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.identifiers = dataset.identifiers

    def load_case(self, identifier: str):
        data, seg, seg_prev, properties = self.dataset.load_case(identifier)
        return CasePositionView(data), seg, seg_prev, properties


#: Augmentations that move voxels (or reshape the patch for dummy-2D augmentation): the position channels go
#: through them with the image. Every other transform sees the image channels only.
GEOMETRIC_TRANSFORMS = (SpatialTransform, MirrorTransform, Convert3DTo2DTransform, Convert2DTo3DTransform)


class ImageChannelsOnly(BasicTransform):
    """Applies a transform to the first `image_channels` channels of the image; the others (the case position) are
    set aside and put back unchanged: noise, blur, brightness, contrast and gamma are not positions."""

    def __init__(self, transform: BasicTransform, image_channels: int):
        super().__init__()
        self.transform, self.image_channels = transform, image_channels

    def apply(self, data_dict, **params):
        image = data_dict["image"]
        data_dict["image"] = image[:self.image_channels]
        data_dict = self.transform(**data_dict)
        data_dict["image"] = torch.cat((data_dict["image"], image[self.image_channels:]))
        return data_dict


def position_through_geometry_only(transforms: ComposeTransforms, image_channels: int) -> ComposeTransforms:
    """nnU-Net's transforms with every non-geometric one restricted to the image channels."""
    return ComposeTransforms([transform if isinstance(transform, GEOMETRIC_TRANSFORMS)
                              else ImageChannelsOnly(transform, image_channels)
                              for transform in transforms.transforms])


class TextEmbeddingBank:
    """Pre-computed token embeddings, held in memory and shared by the loader workers (small: texts x L x D)."""

    def __init__(self, embeddings: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]]):
        self.embeddings = dict(embeddings)

    def batch(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.from_numpy(np.stack([self.embeddings[t][0] for t in texts]).astype(np.float32))
        mask = torch.from_numpy(np.stack([self.embeddings[t][1] for t in texts]).astype(bool))
        return tokens, mask


class LSMSDataLoader(nnUNetDataLoader):
    """nnU-Net's loader over a prompt-sampling dataset; batches carry `text_tokens`, `text_mask`, `text_keys`.

    Each drawn case fills `prompts_per_image` consecutive batch slots (own crop and augmentation, different prompts).
    With `all_lesions_target` the target has a channel holding all of the case's lesions, with `anatomy_target` one
    holding the context regions (ReferredSegmentation).
    """

    def __init__(self, data, batch_size, patch_size, final_patch_size, label_manager, *,
                 prompts_by_case: Mapping[str, Sequence[Prompt]], text_bank: TextEmbeddingBank,
                 present_label_bias: float = 0.0, prompts_per_image: int = 1, finding_fraction: float = 0.0,
                 all_lesions_target: bool = False, context_ids: Sequence[int] = (), anatomy_target: bool = False,
                 **kwargs):
        if prompts_per_image < 1:
            raise ValueError(f"prompts_per_image must be >= 1, got {prompts_per_image}.")
        super().__init__(PromptSamplingDataset(data, prompts_by_case, present_label_bias, prompts_per_image,
                                               finding_fraction, all_lesions_target, context_ids, anatomy_target),
                         batch_size, patch_size, final_patch_size, label_manager, **kwargs)
        self.text_bank = text_bank

    def get_indices(self) -> list:
        prompts_per_image = self._data.prompts_per_image
        images = -(-self.batch_size // prompts_per_image)
        cases = np.random.choice(self.indices, images, replace=True, p=self.sampling_probabilities)
        return list(np.repeat(cases, prompts_per_image)[:self.batch_size])

    def generate_train_batch(self) -> dict:
        self._data.drawn.clear()
        batch = super().generate_train_batch()
        texts = [text for _, text in self._data.drawn]
        batch["text_tokens"], batch["text_mask"] = self.text_bank.batch(texts)
        # what a sample says, whatever its wording: a rewrite is no negative for its original in the contrastive loss
        batch["text_keys"] = [prompt.texts[0] for prompt, _ in self._data.drawn]
        return batch

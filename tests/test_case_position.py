"""Whole-case position (LSMSConfig.case_position): the loader's crops carry where they lie in the case, only geometric
augmentation moves those channels, and a network that reads them answers a question no patch can answer alone."""
import numpy as np
import pytest
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from lsms_nnunet.evaluation.metrics import dice_score
from lsms_nnunet.network.case_position import case_position, network_input_channels, with_case_position
from lsms_nnunet.network.config import LSMSConfig
from lsms_nnunet.network.lsms_net import build_lsms_network
from lsms_nnunet.training.dataloading import (GEOMETRIC_TRANSFORMS, CasePositionView, ImageChannelsOnly,
                                              position_through_geometry_only)
from test_network import plans_architecture


def test_position_runs_from_minus_one_to_one_along_each_axis_of_the_case():
    position = case_position((1, 5, 9))
    assert position.shape == (3, 1, 5, 9) and position.dtype == np.float32
    assert np.all(position[0] == 0)  # the z axis of a 2D image
    assert position[1, 0, :, 0].tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert position[2, 0, 0, 0] == -1.0 and position[2, 0, 0, -1] == 1.0
    data = torch.randn(2, 1, 5, 9)
    assert torch.equal(with_case_position(data), torch.cat((data, torch.from_numpy(position))))
    assert network_input_channels(2, True) == 5 and network_input_channels(2, False) == 2
    with pytest.raises(ValueError, match=r"\[C, Z, Y, X\]"):
        case_position((5, 9))


def test_a_crop_of_the_view_carries_its_place_in_the_case_and_padding_is_zero():
    data = np.random.default_rng(0).normal(size=(1, 4, 10, 12)).astype(np.float32)
    view = CasePositionView(data)
    assert view.shape == (4, 4, 10, 12)
    bbox = [[1, 3], [-2, 6], [8, 16]]  # reaches past the case on y (before) and x (after)
    crop = crop_and_pad_nd(view, bbox, 0)
    assert crop.shape == (4, 2, 8, 8)
    assert np.array_equal(crop[:1], crop_and_pad_nd(data, bbox, 0))
    expected = case_position((4, 10, 12))[:, 1:3, 0:6, 8:12]
    assert np.array_equal(crop[1:, :, 2:, :4], expected)
    assert np.all(crop[1:, :, :2] == 0) and np.all(crop[1:, :, :, 4:] == 0)


def test_only_geometric_augmentation_moves_the_position_channels():
    image = torch.rand(1, 4, 6, 8) + 1
    position = torch.from_numpy(case_position((4, 6, 8)))
    transforms = position_through_geometry_only(ComposeTransforms([
        MultiplicativeBrightnessTransform((2.0, 2.0), synchronize_channels=True, p_per_channel=1),
        MirrorTransform(allowed_axes=(2,)),
        GaussianBlurTransform(blur_sigma=(1.0, 1.0), synchronize_channels=True, synchronize_axes=True,
                              p_per_channel=1)]), image_channels=1)
    mirrored = None
    for _ in range(20):  # MirrorTransform flips each allowed axis with probability 0.5
        out = transforms(image=torch.cat((image, position)).clone())["image"]
        assert out.shape == (4, 4, 6, 8)
        if not torch.equal(out[1:], position):
            mirrored = out
            break
    assert mirrored is not None, "the mirror never moved the position channels"
    assert torch.equal(mirrored[1:], torch.flip(position, (3,)))  # moved exactly with the image, not blurred
    assert mirrored[0].mean() > 1.5 * image.mean()  # the image itself was brightened
    assert isinstance(transforms.transforms[0], ImageChannelsOnly)
    assert not isinstance(transforms.transforms[1], ImageChannelsOnly)


def test_nnunet_training_transforms_keep_the_position_out_of_intensity_augmentation():
    transforms = nnUNetTrainer.get_training_transforms(
        (32, 32), (-0.2, 0.2), [[1, 1], [0.5, 0.5]], None, False, [False], is_cascaded=False,
        foreground_labels=[1], regions=None, ignore_label=None)
    wrapped = position_through_geometry_only(transforms, 1)
    geometric = [t for t in wrapped.transforms if not isinstance(t, ImageChannelsOnly)]
    assert geometric and all(isinstance(t, GEOMETRIC_TRANSFORMS) for t in geometric)
    assert len(wrapped.transforms) == len(transforms.transforms) > len(geometric)


# --- learning: "the blob on the left" of a case four patches wide ------------------------------------------------

HEIGHT, WIDTH, PATCH = 32, 128, 32
LEFT, RIGHT = 0, 1
TEXT_DIM, TOKENS = 16, 3


def _disc(centre_y: int, centre_x: int) -> np.ndarray:
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    return (yy - centre_y) ** 2 + (xx - centre_x) ** 2 <= 16


def _patch(rng: np.random.Generator, asked: int, use_position: bool) -> tuple[np.ndarray, np.ndarray]:
    """A patch of a case with two identical discs, one in the left and one in the right part of the case, showing
    one of them (chosen at random, as foreground oversampling would); the target is that disc if it is the asked
    one. Nothing inside the patch tells left from right: only where the patch lies in the case does."""
    centres = [(rng.integers(6, HEIGHT - 6), rng.integers(8, 48)), (rng.integers(6, HEIGHT - 6), rng.integers(80, 120))]
    discs = [_disc(*centre) for centre in centres]
    image = rng.normal(0, 0.3, (HEIGHT, WIDTH)).astype(np.float32)
    for disc in discs:
        image[disc] = 2.0
    shown = rng.integers(0, 2)
    start = int(np.clip(centres[shown][1] - rng.integers(6, PATCH - 6), 0, WIDTH - PATCH))
    view = CasePositionView(image[None, None]) if use_position else image[None, None]
    crop = np.asarray(view[:, :, :, start:start + PATCH])[:, 0]
    target = discs[asked] & np.isin(np.arange(WIDTH), np.arange(start, start + PATCH))[None]
    return crop, target[:, start:start + PATCH]


#: Training from a random initialisation can stay where the text is not yet used (Dice ~0.5-0.6 per side) for the whole
#: budget, as in test_text_is_learned (an earlier decoder layout's initialisation 0 did; today initialisations 0, 1
#: and 2 all reach 1.0). The test trains one fixed initialisation: no retrying until a seed passes.
INITIALISATION = 1


def _train_and_score(use_position: bool, seed: int = 0, steps: int = 600) -> list[float]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(0)
    config = LSMSConfig(text_dim=TEXT_DIM, max_tokens=TOKENS, attention_dim=16, num_heads=2, contrastive=False,
                        fsd_channels_per_scale=4, visual_branch=False, finding_head=False,
                        case_position=use_position)
    architecture = plans_architecture(2, residual=False)
    network = build_lsms_network(architecture["network_class_name"], architecture["arch_kwargs"],
                                 architecture["_kw_requires_import"], network_input_channels(1, use_position), 2,
                                 False, config)
    loss_function = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                                   weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    tokens = torch.randn(2, TOKENS, TEXT_DIM, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, TOKENS, dtype=torch.bool)
    optimizer = torch.optim.AdamW(network.parameters(), 3e-3)

    def batch(size: int):
        asked = rng.integers(0, 2, size)
        patches = [_patch(rng, a, use_position) for a in asked]
        return (torch.from_numpy(np.stack([p[0] for p in patches])),
                torch.from_numpy(np.stack([p[1] for p in patches])[:, None].astype(np.float32)), asked)

    for _ in range(steps):
        images, targets, asked = batch(16)
        optimizer.zero_grad()
        loss_function(network(images, tokens[asked], mask[asked]), targets).backward()
        optimizer.step()
    network.eval()
    images, targets, asked = batch(100)
    with torch.no_grad():
        logits = network(images, tokens[asked], mask[asked])
    answers = (logits[:, 1] > logits[:, 0]).numpy()
    dice = [dice_score(answers[i], targets[i, 0].numpy() > 0) for i in range(len(asked))]
    return [float(np.mean([d for d, a in zip(dice, asked) if a == side])) for side in (LEFT, RIGHT)]


@pytest.mark.slow  # trains a network for a minute or more
def test_the_case_position_tells_left_from_right_where_the_patch_cannot():
    with_position = _train_and_score(use_position=True, seed=INITIALISATION)
    assert min(with_position) > 0.8, with_position
    without_position = _train_and_score(use_position=False)
    assert max(without_position) < 0.75, without_position  # the control: the patch alone cannot say which side

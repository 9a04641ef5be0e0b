"""LSMS network and contrastive loss, built from architecture blocks in the exact nnU-Net plans format."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from lsms_nnunet.network.losses import lesion_wise_dice_loss
from lsms_nnunet.network.prompt_decoder import existence_loss
from lsms_nnunet.network import (ABLATIONS, DepthwiseStripConv, FullScaleDecoder, LSMSConfig, LSMSNet,
                                 TextConditionedHead, VisionLanguageContrastiveLoss, build_lsms_network)

TINY = LSMSConfig(text_dim=16, max_tokens=6, attention_dim=8, num_heads=2, contrastive_dim=8,
                  fsd_channels_per_scale=4)
NUM_TOKENS = 6


def plans_architecture(dim: int, residual: bool, conv_bias: bool = True) -> dict:
    """A plans 'architecture' block as nnU-Net writes it: 2D 32x32 isotropic, or 3D 16^3 with anisotropic strides."""
    if dim == 2:
        n_stages, features = 4, [4, 8, 16, 32]
        kernels = [[3, 3]] * 4
        strides = [[1, 1], [2, 2], [2, 2], [2, 2]]
    else:
        n_stages, features = 3, [4, 8, 16]
        kernels = [[1, 3, 3], [3, 3, 3], [3, 3, 3]]
        strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    arch_kwargs = {"n_stages": n_stages, "features_per_stage": features,
                   "conv_op": f"torch.nn.modules.conv.Conv{dim}d", "kernel_sizes": kernels, "strides": strides}
    if residual:
        arch_kwargs["n_blocks_per_stage"] = [1, 2, 2, 2][:n_stages]
    else:
        arch_kwargs["n_conv_per_stage"] = [2] * n_stages
    arch_kwargs.update({
        "n_conv_per_stage_decoder": [1] * (n_stages - 1), "conv_bias": conv_bias,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    })
    name = "ResidualEncoderUNet" if residual else "PlainConvUNet"
    return {"network_class_name": f"dynamic_network_architectures.architectures.unet.{name}",
            "arch_kwargs": arch_kwargs, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def patch_shape(dim: int) -> tuple[int, ...]:
    return (32, 32) if dim == 2 else (16, 16, 16)


def build(architecture: dict, deep_supervision: bool = True, config: LSMSConfig = TINY) -> LSMSNet:
    return build_lsms_network(architecture["network_class_name"], architecture["arch_kwargs"],
                              architecture["_kw_requires_import"], 1, 2, deep_supervision, config)


def random_text(batch: int, seed: int, real_tokens: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, NUM_TOKENS, TINY.text_dim, generator=generator)
    mask = torch.zeros(batch, NUM_TOKENS, dtype=torch.bool)
    for row in range(batch):
        mask[row, :real_tokens[row] if real_tokens else NUM_TOKENS] = True
    return tokens, mask


def image(dim: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1, *patch_shape(dim), generator=torch.Generator().manual_seed(seed))


ARCHITECTURES = [pytest.param(2, False, id="2d-plain"), pytest.param(2, True, id="2d-resenc"),
                 pytest.param(3, False, id="3d-plain-anisotropic"), pytest.param(3, True, id="3d-resenc-anisotropic")]


# --- configuration ---------------------------------------------------------------------------------------------

def test_config_round_trips_through_json():
    config = LSMSConfig(svla_stages=(1, 3), decoder="unet", contrastive_weight=0.5, strip_kernel_sizes=(3, 9))
    restored = LSMSConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert LSMSConfig.from_dict({}) == LSMSConfig()


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="svla_stage"):
        LSMSConfig.from_dict({"svla_stage": [1]})
    with pytest.raises(ValueError, match="divisible"):
        LSMSConfig(attention_dim=10, num_heads=4)
    with pytest.raises(ValueError, match="odd"):
        LSMSConfig(strip_kernel_sizes=(7, 10))
    with pytest.raises(ValueError, match="decoder"):
        LSMSConfig(decoder="unet3+")
    with pytest.raises(ValueError, match="contrastive"):
        LSMSConfig.from_dict({"contrastive": "yes"})


def test_ablations_switch_exactly_their_flag():
    expected_changes = {"full": {}, "no_visual": {"visual_branch": False}, "no_language": {"language_branch": False},
                        "static_head": {"text_conditioned_head": False},
                        "prompt_decoder": {"prompt_decoder": True, "existence_head": True, "head_position": True},
                        "unet_decoder": {"decoder": "unet"}, "no_contrastive": {"contrastive": False},
                        "no_case_selection": {"case_selection": False}, "no_finding_head": {"finding_head": False},
                        "case_position": {"case_position": True}, "no_anatomy_head": {"anatomy_regions": 0},
                        "no_lesion_wise_finding": {"finding_lesion_weight": 0.0}}
    assert set(ABLATIONS) == set(expected_changes)
    with_anatomy = dataclasses.replace(TINY, anatomy_regions=2)  # as the trainer sets it for a dataset with context
    for name, changes in expected_changes.items():
        ablated = with_anatomy.with_ablation(name).to_dict()
        assert {key: value for key, value in ablated.items() if with_anatomy.to_dict()[key] != value} == changes
    with pytest.raises(ValueError, match="no_svla"):
        TINY.with_ablation("no_svla")


def test_svla_stages_default_to_stride_4_and_deeper():
    assert LSMSConfig().svla_stage_indices(5) == (2, 3, 4)
    assert LSMSConfig().svla_stage_indices(2) == (1,)  # a shallow encoder keeps its deepest stage
    assert LSMSConfig(svla_first_stage=1).svla_stage_indices(5) == (1, 2, 3, 4)
    assert LSMSConfig(svla_stages=(2, 0)).svla_stage_indices(5) == (0, 2)
    assert LSMSConfig(visual_branch=False, language_branch=False).svla_stage_indices(5) == ()
    with pytest.raises(ValueError, match="beyond"):
        LSMSConfig(svla_stages=(5,)).svla_stage_indices(5)


# --- network outputs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("decoder", ["fsd", "unet"])
@pytest.mark.parametrize("dim, residual", ARCHITECTURES)
def test_outputs_have_nnunet_deep_supervision_shapes(dim, residual, decoder):
    architecture = plans_architecture(dim, residual)
    stock = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                   architecture["_kw_requires_import"], 1, 2, deep_supervision=True)
    x = image(dim)
    expected = [tuple(o.shape) for o in stock(x)]
    assert len(expected) == architecture["arch_kwargs"]["n_stages"] - 1

    network = build(architecture, config=dataclasses.replace(TINY, decoder=decoder))
    assert isinstance(network.decoder, FullScaleDecoder if decoder == "fsd" else UNetDecoder)
    logits, aux = network(x, *random_text(2, 0), return_aux=True)
    assert [tuple(o.shape) for o in logits] == expected
    # the contrastive embedding lives at deep-supervision level TINY.contrastive_level (1)
    assert aux["voxel_embedding"].shape == (2, TINY.contrastive_dim, *expected[TINY.contrastive_level][2:])
    assert aux["sentence_embedding"].shape == (2, TINY.contrastive_dim)
    assert torch.allclose(aux["voxel_embedding"].norm(dim=1), torch.ones(1), atol=1e-5)
    assert torch.allclose(aux["sentence_embedding"].norm(dim=1), torch.ones(1), atol=1e-5)
    assert aux["logit_scale"].ndim == 0 and 1 <= aux["logit_scale"].item() <= 100


@pytest.mark.parametrize("decoder", ["fsd", "unet"])
def test_deep_supervision_can_be_toggled_like_nnunet(decoder):
    network = build(plans_architecture(2, False), deep_supervision=True,
                    config=dataclasses.replace(TINY, decoder=decoder))
    x, text = image(2), random_text(2, 0)
    assert isinstance(network(x, *text), list)
    network.decoder.deep_supervision = False  # what nnUNetTrainer.set_deep_supervision_enabled does
    single = network(x, *text)
    assert isinstance(single, torch.Tensor) and single.shape == (2, 2, 32, 32)
    network.decoder.deep_supervision = True
    assert len(network(x, *text)) == 3


def test_network_without_deep_supervision_returns_one_tensor():
    network = build(plans_architecture(3, True), deep_supervision=False)
    assert network(image(3), *random_text(2, 0)).shape == (2, 2, 16, 16, 16)


def test_different_texts_give_different_outputs():
    network = build(plans_architecture(2, False)).eval()
    x = image(2)
    with torch.no_grad():
        first = network(x, *random_text(2, 0))[0]
        second = network(x, *random_text(2, 1))[0]
    assert not torch.allclose(first, second)


def test_text_conditioned_head_starts_as_the_static_head_and_then_follows_the_sentence():
    static = nn.Conv2d(4, 2, 1)
    head = TextConditionedHead(static, sentence_dim=3)
    features = torch.randn(2, 4, 5, 5)
    with pytest.raises(RuntimeError, match="no sentence bound"):
        head(features)
    head.sentence = torch.randn(2, 3)
    assert torch.allclose(head(features), static(features))  # zero controller: nnU-Net's head
    with torch.no_grad():
        head.controller.weight.normal_()
    moved = head(features)
    head.sentence = head.sentence.flip(0)
    assert not torch.allclose(head(features), moved)
    assert not torch.allclose(moved, static(features))
    with pytest.raises(ValueError, match="do not match the batch"):
        head.sentence = torch.randn(3, 3)
        head(features)


def test_every_deep_supervision_head_is_text_conditioned_unless_ablated():
    for decoder in ("fsd", "unet"):
        config = dataclasses.replace(TINY, decoder=decoder)
        assert all(isinstance(h, TextConditionedHead) for h in build(plans_architecture(2, False), config=config)
                   .decoder.seg_layers)
        static = build(plans_architecture(2, False), config=config.with_ablation("static_head"))
        assert not any(isinstance(h, TextConditionedHead) for h in static.decoder.seg_layers)


def test_padding_tokens_do_not_influence_the_output():
    network = build(plans_architecture(2, False)).eval()
    x = image(2)
    tokens, mask = random_text(2, 0, real_tokens=(3, 0))
    altered = tokens.clone()
    altered[0, 3:] = 100.0  # padding of a partly filled row
    altered[1] = -100.0  # a row that is all padding
    with torch.no_grad():
        reference, reference_aux = network(x, tokens, mask, return_aux=True)
        changed, changed_aux = network(x, altered, mask, return_aux=True)
    for a, b in zip(reference, changed):
        assert torch.isfinite(a).all()
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.isfinite(reference_aux["sentence_embedding"]).all()
    assert torch.allclose(reference_aux["sentence_embedding"], changed_aux["sentence_embedding"], atol=1e-6)


def test_one_text_is_broadcast_to_every_image():
    network = build(plans_architecture(2, False)).eval()
    x = image(2, batch=3)
    tokens, mask = random_text(1, 0)
    with torch.no_grad():
        broadcast = network(x, tokens, mask)[0]
        explicit = network(x, tokens.expand(3, -1, -1), mask.expand(3, -1))[0]
    assert torch.equal(broadcast, explicit)
    with pytest.raises(ValueError, match="2 texts for 3 images"):
        network(x, *random_text(2, 0))


def test_bad_text_inputs_are_rejected_clearly():
    network = build(plans_architecture(2, False))
    tokens, mask = random_text(2, 0)
    with pytest.raises(ValueError, match="text_dim"):
        network(image(2), tokens[..., :8], mask)
    with pytest.raises(ValueError, match="bool"):
        network(image(2), tokens, mask.float())


@pytest.mark.parametrize("dim, residual", [ARCHITECTURES[0], ARCHITECTURES[3]])
@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_every_ablation_builds_and_runs(ablation, dim, residual):
    config = TINY.with_ablation(ablation)
    network = build(plans_architecture(dim, residual), config=config).eval()
    x = image(dim)
    with torch.no_grad():
        first = network(x, *random_text(2, 0))
        second = network(x, *random_text(2, 1))
    assert len(first) == len(plans_architecture(dim, residual)["arch_kwargs"]["features_per_stage"]) - 1
    text_matters = not torch.allclose(first[0], second[0])
    assert text_matters == config.language_branch
    assert all(block.visual is not None for block in network.svla.values()) == config.visual_branch
    expected_aux = ({"voxel_embedding", "sentence_embedding", "logit_scale"} if config.contrastive else set()) | \
        ({"existence_logit"} if config.existence_head else set()) | ({"finding_logits"} if config.finding_head else set())
    logits, aux = network(x, *random_text(2, 0), return_aux=True)
    assert set(aux) == expected_aux
    if config.finding_head:  # one 2-class all-lesion map per deep-supervision level, each the size of its level
        assert [f.shape[2:] for f in aux["finding_logits"]] == [level.shape[2:] for level in logits]
        assert all(f.shape[:2] == (2, 2) for f in aux["finding_logits"])


def test_unsupported_architecture_is_named_in_the_error():
    architecture = plans_architecture(2, True)
    with pytest.raises(ValueError, match="ResidualUNet"):
        build_lsms_network("dynamic_network_architectures.architectures.unet.ResidualUNet",
                           architecture["arch_kwargs"], architecture["_kw_requires_import"], 1, 2, True, TINY)


def test_new_modules_get_he_init_and_the_encoder_keeps_nnunet_init():
    network = build(plans_architecture(2, True))
    zeroed_norms = [block.conv2.norm.weight for block in network.encoder.modules() if isinstance(block, BasicBlockD)]
    assert zeroed_norms and all(torch.all(weight == 0) for weight in zeroed_norms)  # init_last_bn_before_add_to_0
    decoder_biases = [m.bias for m in network.decoder.modules() if isinstance(m, nn.Conv2d) and m.bias is not None]
    assert decoder_biases and all(torch.all(bias == 0) for bias in decoder_biases)  # InitWeights_He zeroes biases


# --- gradients -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim, residual", ARCHITECTURES)
def test_every_parameter_gets_gradient_from_segmentation_finding_contrastive_and_existence_losses(dim, residual):
    # Without conv biases: a bias right before an InstanceNorm has a structurally zero gradient (nnU-Net's too).
    network = build(plans_architecture(dim, residual, conv_bias=False), config=TINY.with_ablation("prompt_decoder"))
    if residual:  # nnU-Net zero-inits the last norm of each residual block, which blocks that branch at step 0
        for block in network.encoder.modules():
            if isinstance(block, BasicBlockD):
                nn.init.ones_(block.conv2.norm.weight)
    x = image(dim)
    target = torch.zeros(2, 1, *patch_shape(dim))
    target[0, :, 2:9, 3:10] = 1
    target[1, :, 8:14, 1:6] = 1
    logits, aux = network(x, *random_text(2, 0, real_tokens=(6, 4)), return_aux=True)
    targets = [F.interpolate(target, size=o.shape[2:], mode="nearest-exact") for o in logits]
    segmentation_loss = DeepSupervisionWrapper(
        DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                       dice_class=MemoryEfficientSoftDiceLoss),
        [1 / 2 ** i for i in range(len(logits))])
    contrastive_loss = VisionLanguageContrastiveLoss(TINY)
    contrastive_target = next(t for t in targets if t.shape[2:] == aux["voxel_embedding"].shape[2:])
    loss = segmentation_loss(logits, targets) + contrastive_loss(
        aux["voxel_embedding"], aux["sentence_embedding"], contrastive_target, aux["logit_scale"], ["a", "b"])
    # At step 0 the zero-initialised head controllers pass no gradient to the prompt; its existence output does.
    loss = loss + existence_loss(aux["existence_logit"], target) + segmentation_loss(aux["finding_logits"], targets)
    loss.backward()
    without_gradient = [name for name, parameter in network.named_parameters()
                        if parameter.grad is None or not parameter.grad.abs().sum() > 0]
    assert without_gradient == []


def test_highest_resolution_features_survive_torch_compile():
    # nnU-Net compiles the network on GPU; the contrastive features come from a forward hook that must be traced.
    network = build(plans_architecture(2, False)).eval()
    x, text = image(2), random_text(2, 0)
    with torch.no_grad():
        _, eager = network(x, *text, return_aux=True)
        _, compiled = torch.compile(network, backend="aot_eager")(x, *text, return_aux=True)
    assert torch.allclose(eager["voxel_embedding"], compiled["voxel_embedding"], atol=1e-4)


# --- SVLA building blocks --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim, axis, size, length", [(2, 0, 4, 21), (2, 1, 3, 21), (3, 2, 5, 21), (3, 0, 1, 21),
                                                     (3, 1, 12, 5), (2, 1, 13, 3), (2, 0, 30, 7)])
def test_strip_equals_the_zero_padded_depthwise_convolution(dim, axis, size, length):
    # Band-matrix products (taps clipped to the map) and, on axes much longer than the strip, the convolution itself.
    conv_op = nn.Conv2d if dim == 2 else nn.Conv3d
    strip = DepthwiseStripConv(conv_op, channels=3, length=length, axis=axis)
    nn.init.normal_(strip.conv.bias)
    shape = [6] * dim
    shape[axis] = size
    x = torch.randn(2, 3, *shape, requires_grad=True)
    answer = strip(x)
    reference = strip.conv(x)  # the full strip with 'same' zero padding
    assert answer.shape == x.shape
    assert torch.allclose(answer, reference, atol=1e-5)
    parameters = [x, strip.conv.weight, strip.conv.bias]
    for got, expected in zip(torch.autograd.grad(answer.square().sum(), parameters),
                             torch.autograd.grad(reference.square().sum(), parameters)):
        assert torch.allclose(got, expected, atol=1e-4)


#: Decoders of the layout before shared projections (one projection per level and source, LSMS up to commit
#: 8c4f87c), with their random weights, inputs and outputs: written by that code, so a checkpoint of the time
#: must give these outputs today.
SEPARATE_PROJECTIONS = Path(__file__).parent / "data" / "fsd_decoder_separate_projections.pt"


def fixture_encoder(dim: int) -> PlainConvEncoder:
    """The encoder the fixture decoders were built on: 2D 4 stages, or 3D 3 stages with anisotropic strides."""
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    norm = nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d
    features = [4, 8, 8, 8] if dim == 2 else [4, 8, 8]
    kernels = [[3, 3]] * 4 if dim == 2 else [[1, 3, 3], [3, 3, 3], [3, 3, 3]]
    strides = [[1, 1], [2, 2], [2, 2], [2, 2]] if dim == 2 else [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    return PlainConvEncoder(1, len(features), features, conv, kernels, strides, 1, True, norm,
                            {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True},
                            return_skips=True)


@pytest.mark.parametrize("name, dim, projection", [("2d_pointwise", 2, "pointwise"), ("3d_planned", 3, "planned")])
def test_checkpoints_with_one_projection_per_level_load_and_answer_as_before(name, dim, projection):
    saved = torch.load(SEPARATE_PROJECTIONS, weights_only=True)[name]
    decoder = FullScaleDecoder(fixture_encoder(dim), 2, 1, True, channels_per_scale=3, projection=projection)
    decoder.load_state_dict(saved["state_dict"])  # strict: every old tensor has found its place
    with torch.no_grad():
        outputs = decoder(saved["skips"])
    assert len(outputs) == len(saved["outputs"])
    for got, expected in zip(outputs, saved["outputs"]):
        assert torch.allclose(got, expected, atol=1e-5)
    assert len(decoder.skip_projections) == len(saved["skips"])  # one shared projection per source


@pytest.mark.parametrize("sizes", [[(8, 8), (4, 4), (2, 2), (1, 1)], [(12, 10), (6, 5), (3, 3), (2, 2)],
                                   [(4, 8, 8), (4, 4, 4), (2, 2, 2), (1, 1, 1)], [(5, 9, 8), (5, 5, 4), (3, 3, 2),
                                                                                    (2, 2, 1)]])
@pytest.mark.parametrize("autograd", [True, False], ids=["training", "inference"])
def test_full_scale_pooling_equals_adaptive_max_pooling_of_each_skip(sizes, autograd):
    # Nested window maxima where sizes divide (max pools with autograd, strided maxima without), adaptive pooling of
    # the skip where they do not: the same maxima.
    skips = [torch.randn(2, 3, *size, requires_grad=autograd) for size in sizes]
    adaptive = F.adaptive_max_pool2d if len(sizes[0]) == 2 else F.adaptive_max_pool3d
    with torch.set_grad_enabled(autograd):
        pooled = FullScaleDecoder.pooled_sources(skips)
    for source in range(len(skips) - 2):
        for level in range(source + 1, len(skips) - 1):
            assert torch.equal(pooled[source][level], adaptive(skips[source], list(sizes[level])))
            assert pooled[source][level].requires_grad == autograd


# --- memory estimate -------------------------------------------------------------------------------------------

def test_feature_map_estimate_matches_nnunet_without_lsms_parts_and_counts_them_otherwise():
    architecture = plans_architecture(3, False)
    stock = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                   architecture["_kw_requires_import"], 1, 2, deep_supervision=True)
    size = patch_shape(3)
    bare = build(architecture, config=dataclasses.replace(TINY, svla_stages=(), decoder="unet", contrastive=False))
    assert bare.compute_conv_feature_map_size(size) == stock.compute_conv_feature_map_size(size)

    def estimate(config: LSMSConfig) -> int:
        return build(architecture, config=config).compute_conv_feature_map_size(size)

    full = estimate(TINY)
    more_tokens = estimate(dataclasses.replace(TINY, max_tokens=64))
    no_language = estimate(TINY.with_ablation("no_language"))
    unet = estimate(TINY.with_ablation("unet_decoder"))
    stage_two_voxels = 8 * 4 * 4  # the one SVLA stage (2) of the anisotropic 16^3 patch
    heads = TINY.num_heads
    assert more_tokens - full >= heads * (64 - TINY.max_tokens) * stage_two_voxels  # attention maps
    assert no_language < full
    assert unet < full  # the full-scale fusion stores more than the U-Net decoder
    assert estimate(TINY.with_ablation("prompt_decoder")) > full  # voxel tokens and attention maps
    assert full > stock.compute_conv_feature_map_size(size)


# --- contrastive loss ------------------------------------------------------------------------------------------

def embeddings(batch: int, voxels: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    voxel = F.normalize(torch.randn(batch, 8, *voxels, generator=generator), dim=1).requires_grad_()
    sentence = F.normalize(torch.randn(batch, 8, generator=generator), dim=1).requires_grad_()
    return voxel, sentence


def test_contrastive_loss_is_class_balanced():
    # One sentence; one referred voxel orthogonal to it (BCE log 2), 63 others opposite to it (BCE ~ 0).
    sentence = F.normalize(torch.randn(1, 8), dim=1)
    other = torch.randn(8)
    orthogonal = F.normalize(other - (other @ sentence[0]) * sentence[0], dim=0)
    voxel = (-sentence[0])[None, :, None].repeat(1, 1, 64)
    voxel[0, :, 0] = orthogonal
    target = torch.zeros(1, 1, 64)
    target[0, 0, 0] = 1
    scale = torch.tensor(20.0)
    loss = VisionLanguageContrastiveLoss(TINY)(voxel, sentence, target, scale)
    expected = TINY.contrastive_weight * (math.log(2) + F.softplus(-scale).item()) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_contrastive_loss_prefers_aligned_embeddings():
    sentence = F.normalize(torch.randn(2, 8), dim=1)
    target = torch.zeros(2, 1, 4, 4)
    target[:, :, :2] = 1
    aligned = torch.where(target.bool(), sentence[:, :, None, None], -sentence[:, :, None, None])
    voxel, _ = embeddings(2, (4, 4))
    loss = VisionLanguageContrastiveLoss(TINY)
    scale = torch.tensor(10.0)
    assert loss(aligned, sentence, target, scale, ["a", "b"]) < loss(voxel, sentence, target, scale, ["a", "b"])


def test_same_text_keys_are_not_negatives():
    voxel, sentence = embeddings(2, (4, 4))
    target = torch.ones(2, 1, 4, 4)
    loss = VisionLanguageContrastiveLoss(TINY)
    scale = torch.tensor(10.0)
    same = loss(voxel, sentence, target, scale, ["liver lesion", "liver lesion"])
    distinct = loss(voxel, sentence, target, scale, ["liver lesion", "kidney cyst"])
    single = loss(voxel[:1], sentence[:1], target[:1], scale) + loss(voxel[1:], sentence[1:], target[1:], scale)
    assert same.item() == pytest.approx(single.item() / 2, rel=1e-5)  # InfoNCE term is exactly zero
    assert distinct > same


@pytest.mark.parametrize("case", ["empty_targets", "one_valid_sample", "zero_sentence", "zero_weight"])
def test_contrastive_loss_is_finite_with_gradient_in_degenerate_cases(case):
    voxel, sentence = embeddings(3, (4, 4, 4))
    target = torch.zeros(3, 1, 4, 4, 4)
    config = TINY
    if case == "one_valid_sample":
        target[1, :, 1:3] = 1
    if case == "zero_sentence":  # what an all-padding text row yields
        target[:, :, :2] = 1
        sentence = torch.zeros(3, 8, requires_grad=True)
    if case == "zero_weight":
        config = dataclasses.replace(TINY, contrastive_weight=0.0)
    scale = torch.tensor(14.0, requires_grad=True)
    loss = VisionLanguageContrastiveLoss(config)(voxel, sentence, target, scale, None)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(voxel.grad).all() and torch.isfinite(scale.grad)
    if case == "zero_weight":
        assert loss.item() == 0


def test_contrastive_loss_rejects_mismatched_inputs():
    voxel, sentence = embeddings(2, (4, 4))
    loss = VisionLanguageContrastiveLoss(TINY)
    with pytest.raises(ValueError, match="target"):
        loss(voxel, sentence, torch.zeros(2, 1, 8, 8), torch.tensor(1.0))
    with pytest.raises(ValueError, match="text_keys"):
        loss(voxel, sentence, torch.zeros(2, 1, 4, 4), torch.tensor(1.0), ["a"])
    with pytest.raises(ValueError, match="contrastive"):
        VisionLanguageContrastiveLoss(TINY.with_ablation("no_contrastive"))


# --- finding head -----------------------------------------------------------------------------------------------
def _promptable(config: LSMSConfig, deep_supervision: bool = True):
    from lsms_nnunet.network.prompting import PromptableLSMSNet

    architecture = plans_architecture(2, False)
    network = build_lsms_network(architecture["network_class_name"], architecture["arch_kwargs"],
                                 architecture["_kw_requires_import"], 1, 2, deep_supervision, config,
                                 network_class=PromptableLSMSNet)
    network.model_card = {}
    return network


def test_finding_head_answers_bound_finding_prompts_and_the_text_heads_answer_bound_prompts():
    network = _promptable(TINY, deep_supervision=False).eval()
    x, (tokens, mask) = image(2), random_text(3, 0)
    with torch.no_grad():
        network.bind_finding(tokens, mask)
        finding = network(x)
        network.bind_prompts(tokens, mask)
        prompts = network(x)
        _, aux = network(x, tokens[:1].expand(2, -1, -1), mask[:1].expand(2, -1), return_aux=True)
        logits = network(x, tokens[:1].expand(2, -1, -1), mask[:1].expand(2, -1))
    assert finding.shape == prompts.shape == (2, 4, *patch_shape(2))
    assert torch.allclose(finding[:, 1], aux["finding_logits"][:, 1] - aux["finding_logits"][:, 0], atol=1e-5)
    assert torch.allclose(prompts[:, 1], logits[:, 1] - logits[:, 0], atol=1e-5)
    assert not torch.allclose(finding[:, 1], prompts[:, 1])
    with torch.no_grad():  # prediction skips the contrastive projection, which only the training loss reads
        _, answer_aux = network(x, tokens[:1].expand(2, -1, -1), mask[:1].expand(2, -1), return_aux=True,
                                contrastive_aux=False)
    assert "voxel_embedding" in aux and "voxel_embedding" not in answer_aux
    assert torch.equal(answer_aux["finding_logits"], aux["finding_logits"])
    with pytest.raises(RuntimeError, match="no finding head"):
        _promptable(TINY.with_ablation("no_finding_head")).bind_finding(tokens, mask)


def _lsms_loss_of(network):
    """(LSMSLoss, the nnU-Net deep-supervised Dice+CE it wraps) for a network without the contrastive term."""
    from lsms_nnunet.training.lsms_trainer import LSMSLoss

    segmentation_loss = DeepSupervisionWrapper(
        DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                       dice_class=MemoryEfficientSoftDiceLoss), [1.0, 0.5, 0.25])
    return LSMSLoss(segmentation_loss, None, network), segmentation_loss


def test_loss_adds_the_finding_heads_dice_and_ce_against_all_lesions():
    """LSMSLoss reads the loader's second target channel (all lesions) for the finding head's outputs."""
    network = _promptable(dataclasses.replace(TINY, contrastive=False, finding_lesion_weight=0.0)).train()
    loss, segmentation_loss = _lsms_loss_of(network)
    target = torch.zeros(2, 2, *patch_shape(2))
    target[:, 0, 2:9, 3:10] = 1                       # the referred lesion
    target[:, 1, 2:9, 3:10] = target[:, 1, 20:26, 20:26] = 1  # ... and all lesions
    network.bind_batch_text(*random_text(2, 0))
    output = network(image(2))
    aux = network.last_aux
    targets = [F.interpolate(target, size=o.shape[2:], mode="nearest-exact") for o in output]
    total = loss(output, targets)
    expected = segmentation_loss(output, [t[:, :1] for t in targets]) + \
        segmentation_loss(aux["finding_logits"], [t[:, 1:] for t in targets])
    assert torch.allclose(total, expected)
    network.eval()
    assert torch.allclose(loss(output, targets), segmentation_loss(output, [t[:, :1] for t in targets]))


# --- anatomy head -----------------------------------------------------------------------------------------------
def test_anatomy_head_outputs_its_regions_beside_every_level_and_after_the_finding_answer():
    """With K context regions, a text-free (1 + K)-class output at every deep-supervision level; a bound finding
    prompt appends its full-resolution logits after the all-lesion logit (what the predictor's finding pass reads)."""
    network = _promptable(dataclasses.replace(TINY, anatomy_regions=2)).eval()
    x, (tokens, mask) = image(2), random_text(1, 0)
    with torch.no_grad():
        logits, aux = network(x, tokens.expand(2, -1, -1), mask.expand(2, -1), return_aux=True)
        network.bind_finding(tokens, mask)
        finding = network(x)
    assert [a.shape for a in aux["anatomy_logits"]] == [(2, 3, *level.shape[2:]) for level in logits]
    assert finding.shape == (2, 2 + 3, *patch_shape(2))
    assert torch.allclose(finding[:, 2:], aux["anatomy_logits"][0], atol=1e-5)
    without = _promptable(TINY).eval()
    with torch.no_grad():
        without.bind_finding(tokens, mask)
        assert without(x).shape == (2, 2, *patch_shape(2))
    assert not hasattr(without, "anatomy_heads")


def test_loss_adds_the_anatomy_heads_dice_and_ce_against_the_context_channel():
    """LSMSLoss reads the loader's last target channel (context regions 0..K) for the anatomy head's outputs."""
    network = _promptable(dataclasses.replace(TINY, contrastive=False, anatomy_regions=2,
                                              finding_lesion_weight=0.0)).train()
    loss, segmentation_loss = _lsms_loss_of(network)
    target = torch.zeros(2, 3, *patch_shape(2))
    target[:, 0, 2:9, 3:10] = 1                       # the referred lesion
    target[:, 1, 2:9, 3:10] = 1                       # all lesions
    target[:, 2, :, :16], target[:, 2, :, 40:] = 1, 2  # two organs
    network.bind_batch_text(*random_text(2, 0))
    output = network(image(2))
    aux = network.last_aux
    targets = [F.interpolate(target, size=o.shape[2:], mode="nearest-exact") for o in output]
    expected = segmentation_loss(output, [t[:, :1] for t in targets]) + \
        segmentation_loss(aux["finding_logits"], [t[:, 1:2] for t in targets]) + \
        segmentation_loss(aux["anatomy_logits"], [t[:, 2:] for t in targets])
    assert torch.allclose(loss(output, targets), expected)


def test_lesion_wise_dice_counts_every_lesion_once_and_masks_the_others():
    """Missing a 4-voxel lesion beside a 64-voxel one costs a third (one lesion of three), not 4/72 of the voxels;
    a lesion found elsewhere is no false positive for another; ignored voxels and empty batches cost nothing."""
    target = torch.zeros(2, 1, 16, 16)
    target[0, 0, 2:4, 2:4] = 1            # small lesion
    target[0, 0, 6:14, 6:14] = 1          # large lesion, same image
    target[1, 0, 5:8, 5:8] = 1
    target[1, 0, 0, :] = -1               # outside the mask

    def logits(lesion: torch.Tensor) -> torch.Tensor:
        answer = torch.where(lesion > 0, 20.0, -20.0)
        return torch.cat((-answer, answer), dim=1)

    assert lesion_wise_dice_loss(logits(target), target) < 1e-6
    assert lesion_wise_dice_loss(logits(torch.where(target < 0, 1.0, target)), target) < 1e-6
    small_missed = target.clone()
    small_missed[0, 0, 2:4, 2:4] = 0
    assert lesion_wise_dice_loss(logits(small_missed), target) == pytest.approx(1 / 3, abs=1e-4)
    doubled = target.clone()
    doubled[1, 0, 8:11, 5:8] = 1          # lesion of image 1 outlined at twice its size
    assert lesion_wise_dice_loss(logits(doubled), target) == pytest.approx((1 - 2 * 9 / 27) / 3, abs=1e-4)
    free = torch.randn(2, 2, 16, 16, requires_grad=True)
    lesion_wise_dice_loss(free, torch.zeros(2, 1, 16, 16)).backward()
    assert free.grad is not None and not free.grad.any()


def test_loss_adds_the_lesion_wise_term_on_the_full_resolution_finding_answer():
    network = _promptable(dataclasses.replace(TINY, contrastive=False, finding_lesion_weight=0.5)).train()
    loss, segmentation_loss = _lsms_loss_of(network)
    target = torch.zeros(2, 2, *patch_shape(2))
    target[:, 0, 2:9, 3:10] = 1
    target[:, 1, 2:9, 3:10] = target[:, 1, 20:26, 20:26] = 1
    network.bind_batch_text(*random_text(2, 0))
    output = network(image(2))
    aux = network.last_aux
    targets = [F.interpolate(target, size=o.shape[2:], mode="nearest-exact") for o in output]
    expected = segmentation_loss(output, [t[:, :1] for t in targets]) + \
        segmentation_loss(aux["finding_logits"], [t[:, 1:] for t in targets]) + \
        0.5 * lesion_wise_dice_loss(aux["finding_logits"][0], targets[0][:, 1:])
    assert torch.allclose(loss(output, targets), expected)

"""The benchmarked models: vanilla nnU-Net, LSMS, the constant-text control and every entry of the ablation table."""

from __future__ import annotations

from dataclasses import dataclass

from lsms_nnunet.network.config import ABLATIONS
from lsms_nnunet.training.variants import FULL_ABLATION, ablation_trainer_name


@dataclass(frozen=True)
class Variant:
    """One benchmarked model: a name for the table and the nnU-Net trainer that trains it."""
    name: str
    trainer: str
    description: str

    @property
    def uses_text(self) -> bool:
        return self.trainer.startswith("LSMSTrainer")


# Readable descriptions of the ablations for results.json; an ablation missing here is described by its overrides.
ABLATION_DESCRIPTIONS = {
    "no_visual": "LSMS without the SVLA scale-aware visual branch",
    "no_language": "LSMS without the SVLA vision-language branch",
    "unet_decoder": "LSMS with a plain U-Net decoder instead of FSD",
    "no_contrastive": "LSMS without the contrastive loss term",
    "static_head": "LSMS with nnU-Net's static output heads (text through SVLA only)",
    "prompt_decoder": "LSMS with the prompt decoder, its existence output and position-aware heads (opt-in)",
    "no_case_selection": "LSMS without case-level selection (each expression answered by the network alone)",
    "case_position": "LSMS whose network also reads each voxel's position in the whole case (opt-in)",
    "no_lesion_wise_finding": "LSMS whose finding head is trained with nnU-Net's Dice+CE alone (no lesion-wise term)",
}


def ablation_variant(ablation: str) -> Variant:
    """The benchmarked model of one entry of ABLATIONS, trained by its generated budget trainer."""
    if ablation == FULL_ABLATION:
        return Variant("lsms", ablation_trainer_name(ablation), "LSMS")
    overrides = ", ".join(f"{key}={value!r}" for key, value in ABLATIONS[ablation].items())
    return Variant(f"lsms_{ablation}", ablation_trainer_name(ablation),
                   ABLATION_DESCRIPTIONS.get(ablation, f"LSMS with {overrides}"))


VANILLA = Variant("nnunet_merged", "nnUNetTrainer_budget_merged",
                  "vanilla nnU-Net on the plain view (all regions = one lesion label); text-blind")


CONSTANT_TEXT = Variant("lsms_constant_text", "LSMSTrainer_budget_constant_text",
                        "LSMS trained and tested with one constant text (is the text used?)")


# Vanilla, LSMS, the constant-text control, then every other entry of the ablation table, in its order.
VARIANTS = (VANILLA, ablation_variant(FULL_ABLATION), CONSTANT_TEXT,
            *(ablation_variant(name) for name in ABLATIONS if name != FULL_ABLATION))


VARIANTS_BY_NAME = {variant.name: variant for variant in VARIANTS}

"""Settings of the LSMS network and its contrastive loss, stored with plans and checkpoints as plain JSON."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

DECODERS = ("fsd", "unet")
FSD_PROJECTIONS = ("pointwise", "planned")  # see FullScaleDecoder

# Each ablation switches off exactly one LSMS component, so its effect is measured against "full" with one flag.
ABLATIONS: dict[str, dict] = {
    "full": {},
    "no_visual": {"visual_branch": False},
    "no_language": {"language_branch": False},
    "unet_decoder": {"decoder": "unet"},
    "no_contrastive": {"contrastive": False},
    "static_head": {"text_conditioned_head": False},
    # Not an ablation but an opt-in variant: the prompt decoder with its existence output and position-aware heads.
    # At the README benchmark's budget it scored below the sentence-only heads, so it is not the default; on the micro
    # task it learns what they cannot (docs/decisions.md).
    "prompt_decoder": {"prompt_decoder": True, "existence_head": True, "head_position": True},
    "no_case_selection": {"case_selection": False},
    # Opt-in: the network also reads each voxel's position in the whole case (3D cases larger than the patch;
    # network/case_position.py). At the 3D benchmark's budget the channels cost the finding answer more than they
    # gave, and the case-level stage already places candidates in the whole case (docs/decisions.md).
    "case_position": {"case_position": True},
    "no_finding_head": {"finding_head": False},
    "no_lesion_wise_finding": {"finding_lesion_weight": 0.0},
    # Candidates placed in the case rather than in their organs (datasets with context regions only).
    "no_anatomy_head": {"anatomy_regions": 0},
}

#: What the model cards of older versions implied for settings added since: loading such a checkpoint rebuilds
#: exactly the model it was trained with (version 1: before the prompt decoder; version 2: before case selection;
#: version 3: before the finding head; version 4: SVLA from stage 1 on, the contrastive term at full resolution and
#: Full-Scale Decoder projections with the planned kernel; version 5: before the lesion-wise finding term).
_BEFORE_VERSION_6 = {"finding_lesion_weight": 0.0}
_BEFORE_VERSION_5 = {"svla_first_stage": 1, "contrastive_level": 0, "fsd_projection": "planned", **_BEFORE_VERSION_6}
SETTINGS_ADDED_SINCE = {1: {"prompt_decoder": False, "existence_head": False, "head_position": False,
                            "case_selection": False, "finding_head": False, **_BEFORE_VERSION_5},
                        2: {"case_selection": False, "finding_head": False, **_BEFORE_VERSION_5},
                        3: {"finding_head": False, **_BEFORE_VERSION_5},
                        4: _BEFORE_VERSION_5,
                        5: _BEFORE_VERSION_6}


@dataclass(frozen=True)
class LSMSConfig:
    """What LSMS adds on top of the planned nnU-Net architecture.

    svla_stages: encoder stage indices followed by an SVLA block. None means every stage from `svla_first_stage`
    on (at least the deepest): stage 2 is stride 4 in nnU-Net's plans, where LAVT starts its pixel-word attention.
    The finer stages cost the most (voxel-to-word attention memory grows with voxels x tokens x heads; stage 1 took
    most of SVLA's time in a training step) and their features are still edges and intensities that a sentence
    cannot ground; the coarser stages carry the semantics that the expression refers to.
    """

    text_dim: int = 384
    max_tokens: int = 32
    attention_dim: int = 64
    num_heads: int = 4
    svla_stages: tuple[int, ...] | None = None
    svla_first_stage: int = 2
    visual_branch: bool = True
    language_branch: bool = True
    decoder: str = "fsd"
    #: Output heads whose weights the sentence shifts (network/text_head.py); False = nnU-Net's static heads, the
    #: text then enters through SVLA only.
    text_conditioned_head: bool = True
    #: Channels each source is squeezed to before a Full-Scale Decoder level fuses them. 8 rather than UNet 3+'s
    #: wider fusion: the decoder's cost grows with these channels, and at 16 it cost far more per training step than
    #: nnU-Net's U-Net decoder on the CPU benchmark's shapes; 8 removes most of that extra cost (docs/decisions.md).
    fsd_channels_per_scale: int = 8
    #: How the Full-Scale Decoder squeezes each source (full_scale_decoder.PROJECTIONS): "pointwise" or "planned".
    fsd_projection: str = "pointwise"
    contrastive: bool = True
    contrastive_dim: int = 64
    contrastive_weight: float = 0.1
    #: Deep-supervision level (0 = full resolution) at which the contrastive term compares voxels with the sentence:
    #: the highest-resolution decoder features are average-pooled to it. The term's cost follows the voxels it
    #: compares: level 1 has a quarter of level 0's voxels in 2D (an eighth in 3D), and at level 0 the term and its
    #: projection were a noticeable share of a CPU training step.
    contrastive_level: int = 1
    strip_kernel_sizes: tuple[int, ...] = (7, 11, 21)
    #: Read the sentence against the image (network/prompt_decoder.py) before it drives the heads. Off by default
    #: (ABLATIONS["prompt_decoder"] turns it on): not yet better at the README benchmark's budget.
    prompt_decoder: bool = False
    prompt_decoder_layers: int = 2
    #: Coarsest encoder scales the prompt decoder reads (their voxels are its keys).
    prompt_decoder_scales: int = 3
    #: Per-prompt "the referred object is here" output; at inference a prompt judged absent gets an empty mask.
    existence_head: bool = False
    existence_weight: float = 0.5
    #: The heads also weigh each voxel's position in the patch ("left lobe", "upper").
    head_position: bool = False
    #: Referring tasks: the network's input also holds each voxel's normalised position in the whole case
    #: (network/case_position.py), so a patch of a scan larger than the patch knows where it lies.
    case_position: bool = False
    #: tanh(gate) scales the word-attention output at initialisation. 1.0 (tanh = 0.76): with a small gate the text
    #: path stayed unused for hundreds of iterations on the bright/dark micro task (docs/decisions.md).
    language_gate_init: float = 1.0
    #: Referring tasks: after the sliding window, choose among the case's lesion candidates (the components of the
    #: network's finding answer) with the case-level selector (lsms_nnunet/selection/), fitted on the training
    #: cases at validation. False = each expression's mask is the network's own answer.
    case_selection: bool = True
    #: Referring tasks: a text-free all-lesion output beside every deep-supervision head, trained on every sample
    #: with all of the case's lesions (what vanilla nnU-Net learns), whose answer gives the case selector its
    #: candidates. Without it the candidates come from the finding prompt, which is one draw in ~8 and segmented
    #: lesions less well than vanilla nnU-Net at the same budget (docs/decisions.md).
    finding_head: bool = True
    #: Weight of a lesion-wise Dice term on the finding head's full-resolution answer (network/losses.py
    #: lesion_wise_dice_loss): every lesion counts once, so small lesions are not outweighed by large ones in the
    #: batch Dice. The candidates are the finding answer's components, so their outlines bound every answer
    #: (docs/decisions.md); 0 = nnU-Net's Dice+CE alone.
    finding_lesion_weight: float = 1.0
    #: Referring tasks with context regions (dataset.json `lsms_context`, e.g. the liver): a text-free output beside
    #: every deep-supervision head that segments these K regions (background + K classes), trained on every sample.
    #: Its answer places each candidate in its organ at the case-level stage (selection/anatomy.py), so prediction
    #: needs no organ mask. Set by the trainer from the dataset; 0 = no anatomy output.
    anatomy_regions: int = 0

    def __post_init__(self) -> None:
        for name in ("text_dim", "max_tokens", "attention_dim", "num_heads", "fsd_channels_per_scale",
                     "contrastive_dim", "prompt_decoder_layers", "prompt_decoder_scales"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LSMSConfig.{name} must be a positive integer, got {value!r}.")
        for name in ("svla_first_stage", "contrastive_level", "anatomy_regions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"LSMSConfig.{name} must be an integer >= 0, got {value!r}.")
        for name in ("visual_branch", "language_branch", "contrastive", "text_conditioned_head", "prompt_decoder",
                     "existence_head", "head_position", "case_selection",
                     "finding_head", "case_position"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LSMSConfig.{name} must be true or false, got {getattr(self, name)!r}.")
        if self.attention_dim % self.num_heads:
            raise ValueError(f"LSMSConfig.attention_dim ({self.attention_dim}) must be divisible by num_heads "
                             f"({self.num_heads}); pick an attention_dim that is a multiple of num_heads.")
        if self.fsd_projection not in FSD_PROJECTIONS:
            raise ValueError(f"LSMSConfig.fsd_projection must be one of {FSD_PROJECTIONS}, got "
                             f"{self.fsd_projection!r}.")
        if self.decoder not in DECODERS:
            raise ValueError(f"LSMSConfig.decoder must be one of {DECODERS}, got {self.decoder!r}.")
        for name in ("contrastive_weight", "existence_weight", "finding_lesion_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"LSMSConfig.{name} must be a number >= 0, got {value!r}.")
        if (self.prompt_decoder or self.existence_head) and not self.text_conditioned_head:
            raise ValueError("LSMSConfig.prompt_decoder and existence_head need text_conditioned_head=True (the "
                             "prompt embedding drives the text-conditioned heads); switch them off with it.")
        if self.existence_head and not self.prompt_decoder:
            raise ValueError("LSMSConfig.existence_head reads the prompt decoder's embedding; set "
                             "prompt_decoder=True or existence_head=False.")
        if not self.strip_kernel_sizes or any(not isinstance(k, int) or k < 1 or k % 2 == 0
                                              for k in self.strip_kernel_sizes):
            raise ValueError(f"LSMSConfig.strip_kernel_sizes must be odd positive integers (so a strip is centred "
                             f"on its voxel), got {self.strip_kernel_sizes!r}.")
        if self.svla_stages is not None and (
                any(not isinstance(s, int) or s < 0 for s in self.svla_stages)
                or len(set(self.svla_stages)) != len(self.svla_stages)):
            raise ValueError(f"LSMSConfig.svla_stages must be None or distinct encoder stage indices >= 0, "
                             f"got {self.svla_stages!r}.")

    def svla_stage_indices(self, n_stages: int) -> tuple[int, ...]:
        """The encoder stages that get an SVLA block in an encoder of n_stages; none when both branches are off."""
        if not (self.visual_branch or self.language_branch):
            return ()
        if self.svla_stages is None:
            return tuple(range(min(self.svla_first_stage, n_stages - 1), n_stages))
        stages = tuple(sorted(self.svla_stages))
        if any(s >= n_stages for s in stages):
            raise ValueError(f"LSMSConfig.svla_stages {self.svla_stages} names a stage beyond this encoder's "
                             f"{n_stages} stages (valid: 0..{n_stages - 1}); fix svla_stages or use None.")
        return stages

    def with_ablation(self, name: str) -> LSMSConfig:
        """This configuration with one of ABLATIONS applied."""
        if name not in ABLATIONS:
            raise ValueError(f"Unknown LSMS ablation {name!r}; choose one of {sorted(ABLATIONS)}.")
        return dataclasses.replace(self, **ABLATIONS[name])

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dictionary (tuples become lists)."""
        return {field.name: _json_safe(getattr(self, field.name)) for field in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LSMSConfig:
        """Inverse of to_dict; missing keys take their defaults, unknown keys are an error (likely a typo)."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown LSMS setting(s) {unknown}; valid keys are {sorted(known)}. Remove or rename "
                             f"them in the plans/checkpoint 'lsms' entry.")
        converted = {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}
        return cls(**converted)


def _json_safe(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value

"""Every setting of the case-level stage in one object, saved with each fitted stage.

The values below were tuned on validation folds of the synthetic benchmarks; `docs/decisions.md` records, for each,
what else was tried, on which data and split it was chosen, and what it measured. A fitted stage stores the settings
it was fitted with (`CaseLevelStage.to_payload`), so a model folder says how its stage was made, and
`LSMSv2_fit_case_level --settings FILE` refits a fold with other values without retraining.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping


class CaseLevelSettingsError(ValueError):
    """Case-level settings that are unknown or out of range (from a file, a payload or code)."""


@dataclass(frozen=True)
class CaseLevelSettings:
    """What the case-level stage is fitted and applied with (see module docstring)."""

    # -- candidates (selection/candidates.py)
    #: Components smaller than this are speckles of the finding mask, not lesions.
    min_candidate_voxels: int = 4
    #: The network's answer is split along its logits, Gaussian-smoothed by this sigma (voxels) ...
    logit_smoothing_voxels: float = 1.0
    #: ... at maxima that rise this far above their surroundings (logits) ...
    logit_seed_height: float = 2.0
    #: ... read up to this ceiling: where the network is sure, its confidence is texture, not a lesion boundary.
    logit_ceiling: float = 8.0
    #: Width of the ring of surrounding tissue a candidate is compared with ("hypodense": darker than its organ).
    shell_voxels: int = 2
    #: Where the network outputs the anatomy (context regions), describe where a candidate lies in its organ
    #: (selection/anatomy.py); False: in the case, as for a dataset without context.
    organ_relative: bool = True

    # -- selector (selection/selector.py)
    #: Width of the candidate embedding and of each word's constraint.
    width: int = 64
    #: Dropout on the word embeddings while fitting (a few hundred expressions; the selector must not memorise).
    dropout: float = 0.3
    #: Prior logit of the operation "all" over the superlatives: a superlative that explains an answer by
    #: coincidence must not take over.
    all_prior: float = 1.5
    #: A superlative orders the matching candidates by what its words choose: volume ("the largest") or one of the
    #: descriptors ("the most cranial", "the brightest"), learned from the fitting expressions; False: volume only.
    #: Opt-in, with the two vote settings below (8.0 and 1e-2): on the synthetic benchmark it lets intensity
    #: orderings stand in for kinds ("the hemangioma" as "the brightest"), see docs/decisions.md.
    descriptor_superlatives: bool = False
    #: Prior logit of ordering by volume over each descriptor: an ordering that explains a few answers by
    #: coincidence must not take over from size.
    volume_ordering_prior: float = 1.0
    #: Each word's operation and ordering votes are bounded softly to +-vote_bound (0: unbounded): a vote that grows
    #: without bound early in the fit ("largest") can leave an alternative ("second largest") too little weight ever
    #: to be credited.
    vote_bound: float = 0.0
    #: The learning rate of the operation and ordering votes (the match learns at `learning_rate`): with orderings
    #: to learn too, a vote must outweigh those of the words every sentence shares ("the", "lesion") within the
    #: operations-first steps.
    vote_learning_rate: float = 1e-3
    #: Full-batch fitting steps of one selector.
    fit_steps: int = 300
    #: The first fitting steps learn the operations alone, every candidate held as matching.
    operations_first_steps: int = 50
    learning_rate: float = 1e-3
    weight_decay: float = 1e-3
    #: Gaussian noise on the (standardised) descriptors while fitting.
    descriptor_noise: float = 0.05
    #: After fitting, an operation vote reads each word as a softmax mix (this temperature over cosine similarity)
    #: of the fitted words: an unseen word votes as its nearest fitted words do.
    vote_snap_temperature: float = 0.05
    #: After fitting, a word constrains and votes in proportion to how familiar it is: the share the fitted words
    #: hold in its snap mix when "no word" joins that mix at `unfamiliar_similarity`. A word unlike every fitted word
    #: ("kindly", "focal" to a selector fitted without them) then costs little instead of vetoing every candidate.
    word_familiarity: bool = False
    #: The match reads each word snapped to the fitted words it resembles (as the votes always do), not raw.
    snap_match: bool = False
    #: Cosine similarity to the nearest fitted word at which a word counts half. MiniLM's token embeddings of a fitted
    #: word in a new sentence sit at 0.6-1.0 from the fitted ones, words never fitted at 0.2-0.4.
    unfamiliar_similarity: float = 0.55
    #: Fitting examples added per expression in other words, from the dataset's phrase-table rewrites
    #: (LSMSv2_encode_text --phrase_table): a wording only the table knows is read like the one it stands for.
    phrase_variants: int = 2
    #: Selectors fitted from different seeds; their answers are averaged.
    ensemble_members: int = 3

    # -- verdict (selection/evidence.py): does the stage answer better than the network alone?
    #: Groups of training cases the selector is refitted without, to be scored on them.
    verdict_folds: int = 5
    #: Selectors per verdict refit.
    verdict_members: int = 1
    #: The network answers alone at most as many training expressions as this many voxels hold ...
    verdict_voxels: int = 2 ** 24
    #: ... and at least this many.
    verdict_min_expressions: int = 24

    # -- application
    #: The logit given outside the chosen candidates: below the mask threshold, so saved probabilities still rank.
    unselected_logit: float = -1.0
    #: PyTorch threads while fitting and choosing: the selector is a small model, and on a few cores more threads
    #: only contend (with each other and with any other process).
    threads: int = 1

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "bool":
                if not isinstance(value, bool):
                    raise CaseLevelSettingsError(f"CaseLevelSettings.{field.name} must be true or false, got "
                                                 f"{value!r}.")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise CaseLevelSettingsError(f"CaseLevelSettings.{field.name} must be a number, got {value!r}.")
            if field.type == "int" and not isinstance(value, int):
                raise CaseLevelSettingsError(f"CaseLevelSettings.{field.name} must be an integer, got {value!r}.")
        positive = ("min_candidate_voxels", "width", "fit_steps", "ensemble_members", "verdict_folds",
                    "verdict_members", "verdict_voxels", "verdict_min_expressions", "threads", "learning_rate",
                    "vote_learning_rate",
                    "vote_snap_temperature")
        for name in positive:
            if getattr(self, name) <= 0:
                raise CaseLevelSettingsError(f"CaseLevelSettings.{name} must be > 0, got {getattr(self, name)!r}.")
        if not 0 <= self.dropout < 1:
            raise CaseLevelSettingsError(f"CaseLevelSettings.dropout must be in [0, 1), got {self.dropout!r}.")
        if not 0 <= self.operations_first_steps <= self.fit_steps:
            raise CaseLevelSettingsError(f"CaseLevelSettings.operations_first_steps must be in 0..fit_steps "
                                         f"({self.fit_steps}), got {self.operations_first_steps!r}.")
        for name in ("phrase_variants", "vote_bound"):
            if getattr(self, name) < 0:
                raise CaseLevelSettingsError(f"CaseLevelSettings.{name} must be >= 0, got {getattr(self, name)!r}.")
        if not -1 <= self.unfamiliar_similarity <= 1:
            raise CaseLevelSettingsError(f"CaseLevelSettings.unfamiliar_similarity is a cosine similarity in [-1, 1], "
                                         f"got {self.unfamiliar_similarity!r}.")
        if self.unselected_logit >= 0:
            raise CaseLevelSettingsError(f"CaseLevelSettings.unselected_logit must be < 0 (below the mask threshold), "
                                         f"got {self.unselected_logit!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "the settings") -> CaseLevelSettings:
        """Missing keys take their defaults (stages fitted before a setting existed used its default then); unknown
        keys are an error naming `source`."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CaseLevelSettingsError(f"{source}: unknown case-level setting(s) {unknown}. Fix: use the names of "
                                         f"CaseLevelSettings: {sorted(known)}.")
        try:
            return cls(**values)
        except (TypeError, ValueError) as error:
            raise CaseLevelSettingsError(f"{source}: {error}") from None

    @classmethod
    def from_json_file(cls, path: str | Path, base: CaseLevelSettings | None = None) -> CaseLevelSettings:
        """`base` (default: the defaults) with the fields a JSON object in `path` names."""
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CaseLevelSettingsError(f"{path}: not a readable JSON object of case-level settings ({error}). Fix: "
                                         f'write e.g. {{"logit_ceiling": 6.0}}.') from None
        if not isinstance(values, dict):
            raise CaseLevelSettingsError(f"{path}: expected a JSON object of case-level settings, e.g. "
                                         f'{{"logit_ceiling": 6.0}}.')
        return cls.from_dict({**(base or cls()).to_dict(), **values}, str(path))

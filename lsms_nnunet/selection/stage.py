"""The case-level stage: fitted once per fold, saved with it, applied at prediction (as nnU-Net's postprocessing).

At inference every image is also asked the finding prompt; the components of that answer are the candidates, and
each expression's mask becomes the union of the candidates the fold's selectors pick for it. The stage is:

- `CaseLevelStage.fit(evidence, settings, ...)`: the selectors, fitted on a fold's training cases (evidence.py);
- `stage.judge(evidence)`: the verdict, whether the stage answers better than the network alone on those cases;
- `stage.save(path)` / `CaseLevelStage.load(path, ...)` and `to_payload` / `from_payload`: plain tensors and numbers,
  with the settings it was fitted with and the identity of the weights it was fitted on; training stores it beside
  the fold (`case_selector.pt`) and inside the validated checkpoint (what nnU-Net's model export packs);
- `CaseLevelStage.of_folds(...)`: the stages of the folds a prediction uses, as one;
- `stage.read_image(finding, data, ...)` once per preprocessed image (the network's finding answer: its all-lesion
  logits and, where the stage places candidates in their organs, its anatomy map), then `stage.answer(image, texts,
  ...)` for its expressions, in as many chunks as wanted (`apply`: both at once).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from text_conditioning.io import atomic_path

from lsms_nnunet.network.prompting import CASE_SELECTOR_STATE_KEY as STAGE_STATE_KEY
from lsms_nnunet.selection.candidates import Candidates, FindingAnswer, candidates_of_answer, describe_candidates
from lsms_nnunet.selection.evidence import (CaseEvidence, TextFeatures, Verdict, cross_validated_verdict,
                                            fitting_examples, preprocessed_spacing)
from lsms_nnunet.selection.selector import CaseSelector, choose, fit_selectors, torch_threads
from lsms_nnunet.selection.settings import CaseLevelSettings, CaseLevelSettingsError

STAGE_FORMAT = "lsms-case-selector"
#: 5: how words never fitted are read recorded (`word_familiarity`, `snap_match`; off before); 4: the context
#: regions candidates are placed in; 3: settings and the fitted-on weights recorded; 2 (read: fitted with the default
#: settings): the verdict.
STAGE_VERSION, READABLE_VERSIONS = 6, (2, 3, 4, 5, 6)
STAGE_FILE = "case_selector.pt"
#: The candidate settings every fold of one prediction must share (the candidates are found once per image).
CANDIDATE_SETTINGS = ("min_candidate_voxels", "logit_smoothing_voxels", "logit_seed_height", "logit_ceiling",
                      "shell_voxels")


class CaseLevelStageError(ValueError):
    """A fitted stage that cannot be used as asked (format, encoder, weights or settings that do not match)."""


def weights_identity(network_weights: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the network's tensors (names, shapes, values; the extra state, where the stage itself is kept,
    left out): which weights a stage was fitted on."""
    digest = hashlib.sha256()
    for name in sorted(network_weights):
        value = network_weights[name]
        if name.endswith("_extra_state") or not isinstance(value, torch.Tensor):
            continue
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ImageCandidates:
    """One image's finding answer, its candidates and their descriptors (`CaseLevelStage.read_image`)."""

    finding_logits: torch.Tensor
    candidates: Candidates
    descriptors: np.ndarray


@dataclass
class CaseLevelStage:
    """Fitted selectors (of one fold, or of the folds of one prediction), their settings and verdicts."""

    settings: CaseLevelSettings
    selectors: list[CaseSelector]
    text_encoder_sha256: str
    #: Per fold, where its stage was read from and its verdict (None: not judged).
    verdicts: dict[str, Verdict | None] = field(default_factory=dict)
    #: weights_identity of the checkpoint the stage was fitted on (None: fitted before this was recorded).
    fitted_on: str | None = None
    #: Where it was read from, for messages.
    source: str = "the fitted stage"
    #: Context regions (anatomy) the candidates are placed in, from the network's anatomy output; 0: in the case.
    anatomy_regions: int = 0

    # ------------------------------------------------------------------------------------------------ fit, judge
    @classmethod
    def fit(cls, evidence: Mapping[str, CaseEvidence], settings: CaseLevelSettings, text_encoder_sha256: str,
            fitted_on: str | None = None, anatomy_regions: int = 0, log=print) -> CaseLevelStage:
        examples = fitting_examples(evidence)
        if not examples:
            raise ValueError("No training expression to fit the case selector on. Fix: check that expressions.json "
                             "has expressions for the training cases of this fold.")
        log(f"case selector: fitting {settings.ensemble_members} selectors on {len(examples)} examples (expressions "
            f"x candidate sets) of {len(evidence)} training cases")
        selectors = fit_selectors(examples, settings, log=log)[0]
        return cls(settings, selectors, text_encoder_sha256, fitted_on=fitted_on, source="this fold",
                   anatomy_regions=anatomy_regions)

    def judge(self, evidence: Mapping[str, CaseEvidence], log=print) -> Verdict | None:
        """The verdict on this fold's training cases (evidence.cross_validated_verdict), kept with the stage."""
        verdict = cross_validated_verdict(evidence, self.settings, log=log)
        self.verdicts = {self.source: verdict}
        if verdict is not None:
            log(f"case selector: {verdict.describe()}")
        return verdict

    @property
    def answers(self) -> bool:
        """Whether the stage answers: not if most of its folds' verdicts chose the network alone."""
        return 2 * len(self.declined) <= len(self.verdicts)

    @property
    def declined(self) -> dict[str, Verdict]:
        """The folds whose verdict chose the network alone."""
        return {source: verdict for source, verdict in self.verdicts.items()
                if verdict is not None and not verdict.case_level_answers}

    def describe(self) -> str:
        """Which stage answers, and why, in one line (logged at prediction)."""
        if not self.answers:
            return ("Expressions are answered by the network alone, as its training cases advised ("
                    + "; ".join(f"{source}: {verdict.describe()}" for source, verdict in self.declined.items()) + ")")
        judged = {source: verdict for source, verdict in self.verdicts.items() if verdict is not None}
        why = "; ".join(f"{source}: {verdict.describe()}" for source, verdict in judged.items()) \
            or "no verdict recorded"
        where = f", candidates placed in {self.anatomy_regions} context region(s)" if self.anatomy_regions else ""
        return (f"Expressions are answered by the case-level stage of {self.source} ({len(self.selectors)} "
                f"selectors{where}; {why})")

    # ------------------------------------------------------------------------------------------------ save, load
    def to_payload(self) -> dict:
        """Plain tensors, numbers and strings only, so it loads with weights_only=True (in its own file or in a
        checkpoint). One fold's stage."""
        first = self.selectors[0]
        verdict = next(iter(self.verdicts.values())) if len(self.verdicts) == 1 else None
        return {"format": STAGE_FORMAT, "version": STAGE_VERSION, "settings": self.settings.to_dict(),
                "verdict": asdict(verdict) if verdict else None, "fitted_on": self.fitted_on,
                "anatomy_regions": self.anatomy_regions,
                "descriptor_dim": first.descriptor_dim, "text_dim": first.text_dim,
                "text_encoder_sha256": self.text_encoder_sha256,
                "members": [selector.state_dict() for selector in self.selectors],
                "vocabulary": first.vocabulary.half()}  # the members share it (one fitting set); half: ~1 MB

    @classmethod
    def from_payload(cls, content: Mapping, text_encoder_sha256: str, source: str) -> CaseLevelStage:
        if not isinstance(content, Mapping) or content.get("format") != STAGE_FORMAT \
                or content.get("version") not in READABLE_VERSIONS:
            raise CaseLevelStageError(
                f"{source} holds no case-level stage of version {'/'.join(map(str, READABLE_VERSIONS))}. Fix: refit "
                f"it with LSMSv2_fit_case_level (or rerun validation: nnUNetv2_train ... --val) with this "
                f"lsms-nnunet.")
        if content["text_encoder_sha256"] != text_encoder_sha256:
            raise CaseLevelStageError(
                f"The case-level stage in {source} was fitted with another text encoder than its model. Fix: refit "
                f"it with LSMSv2_fit_case_level (or nnUNetv2_train ... --val).")
        recorded = dict(content.get("settings", {}))
        if content["version"] < 5:  # fitted before words were read by familiarity: answer as then
            recorded.update(word_familiarity=False, snap_match=False)
        if content["version"] < 6:  # fitted before phrase-table rewrites and orderings other than volume
            recorded.update(phrase_variants=0, descriptor_superlatives=False, vote_bound=0.0,
                            vote_learning_rate=recorded.get("learning_rate", CaseLevelSettings.learning_rate))
        try:
            settings = CaseLevelSettings.from_dict(recorded, source)
        except CaseLevelSettingsError as error:  # a stage of another lsms-nnunet: its settings cannot be edited
            raise CaseLevelStageError(f"{error} It was fitted by another lsms-nnunet. Fix: refit it with "
                                      f"LSMSv2_fit_case_level (or nnUNetv2_train ... --val) with this one.") from None
        if content["version"] == 2:  # fitted with the defaults of then, which were these, with a per-file width
            settings = CaseLevelSettings.from_dict({**settings.to_dict(), "width": content["width"]}, source)
        vocabulary = content["vocabulary"].float() if "vocabulary" in content else None  # one for all members
        selectors = []
        for state in content["members"]:
            selector = CaseSelector(content["descriptor_dim"], content["text_dim"], settings)
            selector.load_state_dict(state)
            if vocabulary is not None:
                selector.vocabulary = vocabulary
            selectors.append(selector.eval())
        verdict = Verdict(**content["verdict"]) if content.get("verdict") else None
        return cls(settings, selectors, text_encoder_sha256, {source: verdict}, content.get("fitted_on"), source,
                   int(content.get("anatomy_regions", 0)))

    def save(self, path: Path) -> None:
        """Write atomically."""
        with atomic_path(path, suffix=".pt") as temporary:
            torch.save(self.to_payload(), temporary)

    @classmethod
    def load(cls, path: Path, text_encoder_sha256: str) -> CaseLevelStage:
        return cls.from_payload(read_stage_payload(path), text_encoder_sha256, str(path))

    @classmethod
    def of_folds(cls, stages: Sequence[CaseLevelStage]) -> CaseLevelStage:
        """The stages of the folds of one prediction as one: their selectors averaged, the majority of their
        verdicts. The candidates are found once per image, so the folds must share the candidate settings."""
        first = stages[0]
        for stage in stages[1:]:
            differing = [name for name in CANDIDATE_SETTINGS
                         if getattr(stage.settings, name) != getattr(first.settings, name)]
            if differing:
                raise CaseLevelStageError(
                    f"The case-level stages of {first.source} and {stage.source} find candidates with different "
                    f"settings ({', '.join(differing)}). Fix: refit the folds with the same settings "
                    f"(LSMSv2_fit_case_level ... --settings FILE), or predict with one of them.")
            if stage.anatomy_regions != first.anatomy_regions:
                raise CaseLevelStageError(
                    f"The case-level stages of {first.source} and {stage.source} place candidates in "
                    f"{first.anatomy_regions} and {stage.anatomy_regions} context regions. Fix: predict with folds "
                    f"trained on the same dataset.")
        return cls(first.settings, [selector for stage in stages for selector in stage.selectors],
                   first.text_encoder_sha256, {source: verdict for stage in stages
                                               for source, verdict in stage.verdicts.items()},
                   None, ", ".join(stage.source for stage in stages), first.anatomy_regions)

    # ------------------------------------------------------------------------------------------------ apply
    def read_image(self, finding: FindingAnswer, data: torch.Tensor,
                   configured_spacing: Sequence[float]) -> ImageCandidates:
        """The candidates of one preprocessed image and what describes them: found once per image, then any number
        of texts is answered from them (`answer`)."""
        if self.anatomy_regions and finding.anatomy is None:
            raise CaseLevelStageError(
                f"The case-level stage in {self.source} places candidates in {self.anatomy_regions} context regions, "
                f"but the network gives no anatomy map. Fix: predict with the network the stage was fitted for.")
        logits = torch.as_tensor(finding.lesion_logits)
        finding_logits = logits.float().cpu()
        spacing = preprocessed_spacing(configured_spacing, finding_logits.ndim)
        candidates = candidates_of_answer(finding_logits.numpy(), spacing, self.settings)
        descriptors = describe_candidates(np.asarray(data.float().cpu()), candidates, spacing,
                                          self.settings.shell_voxels, finding.anatomy, self.anatomy_regions)
        return ImageCandidates(logits, candidates, descriptors)

    def answer(self, image: ImageCandidates, texts: Sequence[str], text_features: TextFeatures) -> torch.Tensor:
        """[E, *spatial] logits for the E `texts`: positive on the union of the candidates the selectors (averaged)
        pick for each text, where they keep the finding logits, and `settings.unselected_logit` elsewhere."""
        examples = [text_features.example(text, image.descriptors, image.candidates.volumes_mm3) for text in texts]
        with torch_threads(self.settings.threads):
            answers = choose(self.selectors, examples)
        selected = torch.stack([torch.from_numpy(image.candidates.masks(np.flatnonzero(answer))) for answer in answers])
        finding = image.finding_logits.float().cpu()
        chosen = torch.where(selected, finding.clamp_min(0.0).unsqueeze(0),
                             torch.tensor(self.settings.unselected_logit))
        return chosen.to(image.finding_logits.dtype)

    def apply(self, finding: FindingAnswer, data: torch.Tensor, texts: Sequence[str],
              text_features: TextFeatures, configured_spacing: Sequence[float]) -> torch.Tensor:
        """`answer` for the texts of one preprocessed image at once."""
        return self.answer(self.read_image(finding, data, configured_spacing), texts, text_features)


def read_stage_payload(path: Path) -> dict:
    """The payload of a stage file, read with weights_only=True; an unreadable file is named with the fix."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for damaged files
        raise CaseLevelStageError(
            f"{path} is not a readable case-level stage ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'}). Fix: delete it and refit the stage "
            f"with LSMSv2_fit_case_level (or nnUNetv2_train ... --val).") from None


def stage_for_prediction(model_folder: str | Path, folds: Sequence, fold_weights: Sequence[Mapping],
                         text_encoder_sha256: str, log=print) -> CaseLevelStage | None:
    """The stage of the folds a prediction uses: each fold's from its checkpoint weights or, for models validated
    before checkpoints carried it, from `fold_X/case_selector.pt`, which must have been fitted on these weights.
    None, with a warning naming the fix, when a fold has neither. Logs which stage answers and why."""
    stages, missing = [], []
    for fold, weights in zip(folds, fold_weights):
        payload = weights.get("_extra_state", {}).get(STAGE_STATE_KEY)
        path = Path(model_folder) / f"fold_{fold}" / STAGE_FILE
        if payload is not None:
            stage = CaseLevelStage.from_payload(payload, text_encoder_sha256, f"the checkpoint of fold {fold}")
        elif path.is_file():
            stage = CaseLevelStage.load(path, text_encoder_sha256)
        else:
            missing.append(str(path))
            continue
        if stage.fitted_on is not None and stage.fitted_on != weights_identity(weights):
            raise CaseLevelStageError(
                f"The case-level stage in {stage.source} was fitted on other weights than the checkpoint of fold "
                f"{fold} in use. Fix: refit it for this checkpoint: LSMSv2_fit_case_level -d DATASET -c CONFIG -f "
                f"{fold} -tr TRAINER -chk CHECKPOINT.")
        stages.append(stage)
    if missing:
        log(f"WARNING: no case selector for {missing} (in the checkpoint or beside it): these models answer without "
            f"case-level selection. Fix: fit it with LSMSv2_fit_case_level -d DATASET -c CONFIG -f FOLD -tr "
            f"TRAINER (or rerun validation: nnUNetv2_train DATASET CONFIG FOLD -tr TRAINER --val).")
        return None
    stage = CaseLevelStage.of_folds(stages)
    log(stage.describe())
    return stage

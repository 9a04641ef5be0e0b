"""LSMSTrainer: nnU-Net's trainer with text-conditioned LSMS, for referring and plain lesion tasks.

Everything nnU-Net does (splits, augmentation, poly LR, deep supervision, checkpoints, `--c`, `--val`) is inherited.
What changes, each in the narrowest hook:
- `__init__`: reads the encoded prompts; a referring task becomes binary ({background, target}).
- `build_network_architecture`: the LSMS network, configured by a model card (also the hook that makes the stock
  `nnUNetv2_predict` text-aware).
- `get_dataloaders`: nnU-Net's loaders over (case, prompt) pairs.
- `train_step` / `validation_step`: bind the batch's text, then nnU-Net's own step; the loss adds the contrastive term.
- `perform_actual_validation`: for referring tasks, fit the case-level stage on the fold's training cases, then
  per (case, expression) masks and RLS metrics (training/referring_validation.py); nnU-Net's own validation (label
  maps, summary.json) for plain tasks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
from pathlib import Path
import torch
from torch import nn

from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

from text_conditioning.cache import TextEmbeddingCache
from text_conditioning.encoders import EncoderIdentity

from lsms_nnunet.inference.nnunet_shim import adopt_stock_predictor, checkpoint_model_card, stock_loader_locals
from lsms_nnunet.network.config import LSMSConfig
from lsms_nnunet.network.losses import VisionLanguageContrastiveLoss, lesion_wise_dice_loss
from lsms_nnunet.network.prompt_decoder import existence_loss
from lsms_nnunet.network.prompting import (CASE_SELECTOR_STATE_KEY, MODEL_CARD_PLANS_KEY, PromptableLSMSNet,
                                          build_promptable_network, make_model_card, network_config_of)
from lsms_nnunet.planning.lsms_block import lsms_settings_from_plans
from lsms_nnunet.preprocessing.encode_text import TEXT_FOLDER
from lsms_nnunet.preprocessing.image_checks import training_directions
from lsms_nnunet.preprocessing.orientation import CanonicallyOrientedDataset
from lsms_nnunet.preprocessing.prompts import PLAIN, REFERRING, read_prompt_set
from lsms_nnunet.selection.settings import CaseLevelSettings
from lsms_nnunet.selection.stage import CaseLevelStage
from lsms_nnunet.training.dataloading import (CasePositionDataset, LSMSDataLoader, TextEmbeddingBank,
                                            position_through_geometry_only)

BINARY_LABELS = {"background": 0, "target": 1}
REFERRING_MAX_ROTATION = math.radians(15)
NNUNET_DEFAULT_FOLDS = 5  # nnU-Net's do_split creates a 5-fold split when splits_final.json is absent


class TooFewCasesError(ValueError):
    """A dataset with fewer training cases than nnU-Net's default cross-validation folds and no split of its own."""


def refuse_too_few_cases_for_folds(num_cases: int, fold: int | str, splits_file: Path) -> None:
    """nnU-Net would die in sklearn ("Cannot have number of splits n_splits=5 greater than the number of samples")
    after the network is built; say what to do instead, before training starts."""
    if fold == "all" or splits_file.is_file() or num_cases >= NNUNET_DEFAULT_FOLDS:
        return
    raise TooFewCasesError(
        f"The dataset has {num_cases} training case(s), fewer than nnU-Net's {NNUNET_DEFAULT_FOLDS} cross-validation "
        f"folds, and there is no {splits_file}. Fix: add cases (at least {NNUNET_DEFAULT_FOLDS}), write your own "
        f"{splits_file.name} there (a list of {{\"train\": [...], \"val\": [...]}} per fold), or train on all cases "
        f"with fold `all` (nnUNetv2_train DATASET CONFIG all -tr LSMSTrainer).")


def folders_not_made_yet(plans: dict, configuration: str, fold: int | str, trainer_name: str) -> list[Path]:
    """The fold folder and the model folder nnU-Net's trainer is about to make, those that do not exist yet."""
    from nnunetv2.paths import nnUNet_results

    if not nnUNet_results:
        return []
    model = Path(nnUNet_results) / plans["dataset_name"] / f"{trainer_name}__{plans['plans_name']}__{configuration}"
    return [folder for folder in (model / f"fold_{fold}", model) if not folder.exists()]


def uses_batch_dice(mode: str, planned: bool) -> bool:
    """Referring training always pools its Dice over the batch; plain tasks keep nnU-Net's planned choice.

    nnU-Net plans per-sample Dice for 3d_fullres, which suits one sizeable structure per patch. A referring target
    is one lesion of a few dozen voxels, or nothing: per-sample Dice then gives little usable gradient, and LSMS
    collapsed to all-background in 3D (issue 15); with Dice pooled over the batch it learns (docs/decisions.md; the
    3D micro task that showed this is too seed-sensitive to be a test). 2D plans already pool.
    """
    return True if mode == REFERRING else planned


class LSMSLoss(nn.Module):
    """nnU-Net's deep-supervised Dice+CE, plus the terms of LSMS's auxiliary outputs of the last forward:
    the finding head's Dice+CE against all lesions (the target's second channel), lambda * vision-language contrast
    and the weighted existence BCE ("is the referred object in this patch")."""

    def __init__(self, segmentation_loss: nn.Module, contrastive: VisionLanguageContrastiveLoss | None,
                 network: PromptableLSMSNet):
        super().__init__()
        self.segmentation_loss = segmentation_loss
        self.contrastive = contrastive
        self.network = [network]  # a list so the network is not registered as a sub-module of the loss
        self.text_keys: list[str] | None = None

    def forward(self, output, target) -> torch.Tensor:
        network = self.network[0]
        targets = split_target(target, network.config)
        referred = targets["referred"]
        loss = self.segmentation_loss(output, referred)
        aux = getattr(network, "last_aux", None)
        if not network.training or aux is None:
            return loss
        network.last_aux = None
        for name, channel in (("finding_logits", "all_lesions"), ("anatomy_logits", "anatomy")):
            if name in aux:
                loss = loss + self.segmentation_loss(aux[name], targets[channel])
        if network.config.finding_lesion_weight and "finding_logits" in aux:
            loss = loss + network.config.finding_lesion_weight * lesion_wise_dice_loss(
                _levels(aux["finding_logits"])[0], _levels(targets["all_lesions"])[0])
        levels = _levels(referred)
        full_resolution_target = levels[0].clamp_min(0)
        if self.contrastive is not None:
            voxels = aux["voxel_embedding"]
            target = next(level for level in levels if level.shape[2:] == voxels.shape[2:]).clamp_min(0)
            loss = loss + self.contrastive(voxels, aux["sentence_embedding"], target, aux["logit_scale"],
                                           self.text_keys)
        if "existence_logit" in aux:
            loss = loss + network.config.existence_weight * existence_loss(aux["existence_logit"],
                                                                           full_resolution_target)
        return loss


def _levels(output) -> list:
    """Deep-supervision outputs or targets as a list, highest resolution first (one tensor without it)."""
    return list(output) if isinstance(output, (list, tuple)) else [output]


def split_target(target, config: LSMSConfig) -> dict:
    """The loader's target channels by name (each a list per deep-supervision level, like the target): "referred",
    then "all_lesions" for a network with a finding head and "anatomy" (context regions 0..K) for one with an
    anatomy output (training/dataloading.py)."""
    names = ["referred"] + ["all_lesions"] * config.finding_head + ["anatomy"] * bool(config.anatomy_regions)
    if isinstance(target, (list, tuple)):
        levels = [split_target(level, config) for level in target]
        return {name: [level[name] for level in levels] for name in names}
    return {name: target[:, index:index + 1] for index, name in enumerate(names)}


class LSMSTrainer(nnUNetTrainer):
    """Referring (expressions.json) or plain (one prompt per label) LSMS training with nnU-Net's machinery."""

    #: LSMSConfig fields that a variant changes (ablations in `variants.py`).
    lsms_config_overrides: dict = {}
    #: Replace every text by one constant text (the "is the text used?" control of the benchmark).
    use_constant_text: bool = False
    #: Plain tasks: probability of drawing a label present in the sampled case (others teach "not here").
    present_label_bias: float = 0.75
    #: Batch slots per drawn case, each with a prompt of different targets (one image asked different questions in
    #: one step). Default 1, nnU-Net's own sampling: on the synthetic 2D benchmark two prompts per image scored no
    #: better, and they show the network fewer distinct images per batch (docs/decisions.md).
    prompts_per_image: int = 1
    #: Referring tasks: share of draws that ask a case's finding prompt (all lesions), whose answer is every
    #: expression's candidate set under case selection; the rest are drawn uniformly among its expressions.
    finding_fraction: float = 0.0
    #: What the case-level stage is fitted with at validation (and by LSMSv2_fit_case_level, unless --settings).
    case_level_settings: CaseLevelSettings = CaseLevelSettings()
    #: The checkpoint file the weights in memory came from, when loaded (None: the final weights of this run).
    validated_checkpoint: str | None = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        from nnunetv2.paths import nnUNet_preprocessed

        text_folder = Path(nnUNet_preprocessed) / plans["dataset_name"] / TEXT_FOLDER
        self.prompt_set, encoder = read_prompt_set(text_folder)
        self.text_encoder_identity = EncoderIdentity.from_dict(encoder)
        self.text_cache_folder = text_folder / self.text_encoder_identity.slug
        if self.prompt_set.mode == REFERRING:
            dataset_json = {**dataset_json, "labels": dict(BINARY_LABELS)}
        self.folders_made_by_this_run = folders_not_made_yet(plans, configuration, fold, type(self).__name__)
        super().__init__(plans, configuration, fold, dataset_json, device)  # makes the model and fold folders
        with self._folders_taken_back_if_refused():
            self.configuration_manager.configuration["batch_dice"] = uses_batch_dice(
                self.prompt_set.mode, self.configuration_manager.batch_dice)
            self.model_card = self._make_model_card()
        # nnU-Net copies these plans into the model folder (plans.json): the card travels with them, and
        # build_network_architecture reads it from the configuration, in training and in prediction alike.
        for configuration_dict in (self.plans_manager.plans["configurations"][configuration],
                                   self.configuration_manager.configuration):
            configuration_dict[MODEL_CARD_PLANS_KEY] = self.model_card

    @contextlib.contextmanager
    def _folders_taken_back_if_refused(self):
        """A run refused before its first epoch removes the folders it made: no empty `fold_X/` is left."""
        try:
            yield
        except BaseException:
            for folder in self.folders_made_by_this_run:
                shutil.rmtree(folder, ignore_errors=True)
            raise

    def on_train_start(self):
        with self._folders_taken_back_if_refused():
            super().on_train_start()

    def _make_model_card(self) -> dict:
        identity = self.text_encoder_identity
        planned = lsms_settings_from_plans(self.plans_manager.plans, self.configuration_name)  # {} for nnUNetPlans
        config = LSMSConfig(**{**planned, **self.lsms_config_overrides, "text_dim": identity.dim,
                               "max_tokens": identity.max_tokens})
        if self.prompt_set.mode == PLAIN:  # the finding head and the case position serve referring tasks only
            config = dataclasses.replace(config, finding_head=False, case_position=False)
        elif "anatomy_regions" not in self.lsms_config_overrides:  # the dataset's context regions, if any
            config = dataclasses.replace(config, anatomy_regions=len(self.prompt_set.context))
        label_prompts = [list(p) for p in self.prompt_set.canonical_label_prompts()] \
            if self.prompt_set.mode == PLAIN else None
        constant_text = sorted(self.prompt_set.all_texts())[0] if self.use_constant_text else None
        return make_model_card(self.prompt_set.mode, config, identity.to_dict(), label_prompts, constant_text,
                               training_directions(self.preprocessed_dataset_folder))

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """Referring expressions name sides and positions ("the lesion in the left lobe"): no mirroring (in training or
        test-time augmentation) and small rotations only, or the augmented image no longer matches its text."""
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if self.prompt_set.mode != REFERRING:
            return rotation, dummy_2d, initial_patch_size, mirror_axes
        rotation = (-REFERRING_MAX_ROTATION, REFERRING_MAX_ROTATION)
        patch_size = self.configuration_manager.patch_size
        initial_patch_size = get_patch_size(patch_size, rotation, rotation, rotation, (0.85, 1.25))
        if dummy_2d:
            initial_patch_size[0] = patch_size[0]
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None

    def _do_i_compile(self) -> bool:
        # The text is bound on the module between calls; keep eager mode so no stale compiled graph sees old text.
        return False

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        """The card comes with the configuration (the plans); nnU-Net's stock predictor restoring an LSMS checkpoint is
        turned into an LSMSPredictor here, the one moment LSMS code sees it (inference/nnunet_shim.py)."""
        model_card = configuration_manager.configuration.get(MODEL_CARD_PLANS_KEY)
        stock_loader = stock_loader_locals()
        if model_card is None:
            if stock_loader is None:
                raise RuntimeError(f"The configuration has no LSMS model card ('{MODEL_CARD_PLANS_KEY}'). Fix: "
                                   "build the network through LSMSTrainer, or restore it from an LSMS model folder.")
            model_card = checkpoint_model_card(stock_loader)  # a model folder from before cards lived in the plans
        if stock_loader is not None:
            adopt_stock_predictor(stock_loader, model_card)
        return build_promptable_network(configuration_manager, num_input_channels, model_card,
                                        enable_deep_supervision)

    def _unwrapped_network(self) -> PromptableLSMSNet:
        network = self.network.module if self.is_ddp else self.network
        return getattr(network, "_orig_mod", network)

    def _build_loss(self) -> nn.Module:
        network = self._unwrapped_network()
        config = network.config
        contrastive = VisionLanguageContrastiveLoss(config) if config.contrastive else None
        return LSMSLoss(super()._build_loss(), contrastive, network)

    # ---------------------------------------------------------------- data
    def do_split(self):
        """nnU-Net's split, refused clearly when a 5-fold split of too few cases would crash inside sklearn."""
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        dataset_class = self.dataset_class or infer_dataset_class(self.preprocessed_dataset_folder)
        refuse_too_few_cases_for_folds(len(dataset_class.get_identifiers(self.preprocessed_dataset_folder)),
                                       self.fold, Path(self.preprocessed_dataset_folder_base) / "splits_final.json")
        return super().do_split()

    def _text_bank(self) -> TextEmbeddingBank:
        cache = TextEmbeddingCache(self.text_cache_folder, self.text_encoder_identity)
        texts = self.prompt_set.texts_to_encode()
        encoded = cache.load(texts)
        return TextEmbeddingBank({t: (encoded.tokens[i], encoded.mask[i], encoded.pooled[i])
                                  for i, t in enumerate(texts)})

    def get_dataloaders(self):
        """nnU-Net's loaders (same transforms, patch sizes, oversampling) over (case, prompt) pairs.

        Copied from nnU-Net 2.8.1 `nnUNetTrainer.get_dataloaders`, which hard-codes `nnUNetDataLoader`.
        """
        patch_size = self.configuration_manager.patch_size
        deep_supervision_scales = self._get_deep_supervision_scales()
        rotation_for_DA, do_dummy_2d_data_aug, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        binary = LabelManager(BINARY_LABELS, regions_class_order=None)
        tr_transforms = self.get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=binary.foreground_labels, regions=None, ignore_label=None)
        val_transforms = self.get_validation_transforms(deep_supervision_scales, is_cascaded=False,
                                                        foreground_labels=binary.foreground_labels, regions=None,
                                                        ignore_label=None)
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        if self.prompt_set.mode == REFERRING:
            dataset_tr, dataset_val = self.canonically_oriented(dataset_tr), self.canonically_oriented(dataset_val)
        if self._unwrapped_network().config.case_position:
            dataset_tr, dataset_val = CasePositionDataset(dataset_tr), CasePositionDataset(dataset_val)
            tr_transforms = position_through_geometry_only(tr_transforms, self.num_input_channels)
            val_transforms = position_through_geometry_only(val_transforms, self.num_input_channels)
        text_bank = self._text_bank()
        prompts_by_case = self._prompts_by_case(dataset_tr.identifiers + dataset_val.identifiers)
        bias = self.present_label_bias if self.prompt_set.mode == PLAIN else 0.0
        common = dict(prompts_by_case=prompts_by_case, text_bank=text_bank, present_label_bias=bias,
                      prompts_per_image=min(self.prompts_per_image, self.batch_size),
                      finding_fraction=self.finding_fraction if self.prompt_set.mode == REFERRING else 0.0,
                      all_lesions_target=self._unwrapped_network().config.finding_head,
                      context_ids=self.prompt_set.context_ids,
                      anatomy_target=bool(self._unwrapped_network().config.anatomy_regions),
                      oversample_foreground_percent=self.oversample_foreground_percent,
                      probabilistic_oversampling=self.probabilistic_oversampling)
        dl_tr = LSMSDataLoader(dataset_tr, self.batch_size, initial_patch_size, patch_size, binary,
                               transforms=tr_transforms, **common)
        dl_val = LSMSDataLoader(dataset_val, self.batch_size, patch_size, patch_size, binary,
                                transforms=val_transforms, **common)
        processes = get_allowed_n_proc_DA()
        if processes == 0:
            mt_gen_train, mt_gen_val = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
        else:
            pin = self.device.type == "cuda"
            mt_gen_train = NonDetMultiThreadedAugmenter(dl_tr, None, processes, max(6, processes // 2), None, pin,
                                                        wait_time=0.002)
            mt_gen_val = NonDetMultiThreadedAugmenter(dl_val, None, max(1, processes // 2), max(3, processes // 4),
                                                      None, pin, wait_time=0.002)
        from lsms_nnunet.worker_lifetime import exit_with_trainer
        exit_with_trainer(mt_gen_train, mt_gen_val)  # workers of a killed trainer exit too
        next(mt_gen_train), next(mt_gen_val)
        return mt_gen_train, mt_gen_val

    def _prompts_by_case(self, identifiers: list[str]) -> dict:
        prompts = {case: self.prompt_set.prompts_for_case(case) for case in identifiers}
        without = sorted(case for case, p in prompts.items() if all(q.all_regions for q in p))
        if without:
            raise RuntimeError(f"Cases {without[:10]} (of {len(without)}) have no expression in "
                               f"{self.text_cache_folder.parent / 'prompts.json'}; LSMS cannot train on them. Fix: "
                               f"add expressions for them to expressions.json (targets [] for 'nothing referred') "
                               f"and rerun LSMSv2_encode_text.")
        if self.model_card["constant_text"] is not None:
            constant = (self.model_card["constant_text"],)
            prompts = {case: [dataclasses.replace(p, texts=constant, variants=()) for p in ps]
                       for case, ps in prompts.items()}
        return prompts

    # ---------------------------------------------------------------- steps
    def _bind_batch_text(self, batch: dict) -> None:
        self._unwrapped_network().bind_batch_text(batch["text_tokens"].to(self.device, non_blocking=True),
                                                  batch["text_mask"].to(self.device, non_blocking=True))
        self.loss.text_keys = batch["text_keys"]

    def train_step(self, batch: dict) -> dict:
        self._bind_batch_text(batch)
        return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's online validation (loss and pseudo Dice) of the referred target."""
        self._bind_batch_text(batch)
        config = self._unwrapped_network().config
        return super().validation_step({**batch, "target": split_target(batch["target"], config)["referred"]})

    # ---------------------------------------------------------------- final validation
    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        from lsms_nnunet.training.referring_validation import referring_predictor, validate_referring_fold

        network = self._unwrapped_network()
        if self.prompt_set.mode == PLAIN:
            from lsms_nnunet.inference.predictor import bind_label_prompts

            bind_label_prompts(network, self.text_cache_folder, self.text_encoder_identity)
            return super().perform_actual_validation(save_probabilities)
        self.set_deep_supervision_enabled(False)
        self.network.eval()
        _, val_keys = self.do_split()
        predictor = referring_predictor(self)
        if network.config.case_selection:
            predictor.case_level = self.fit_case_level_stage(predictor)
        summary = validate_referring_fold(self, predictor, val_keys)
        self.print_to_log_file("Validation complete", also_print_to_console=True)
        self.print_to_log_file(f"Mean validation Dice over {summary['aggregate']['n_expressions']} expressions: "
                               f"{summary['aggregate']['mean_dice']:.4f}", also_print_to_console=True)
        self.set_deep_supervision_enabled(True)

    def fit_case_level_stage(self, predictor=None) -> CaseLevelStage:
        """Fit, judge and save the case-level stage of this fold on the weights in memory (its training cases);
        the network must be in inference mode (eval, no deep supervision), as validation sets it."""
        from lsms_nnunet.training.referring_validation import fit_case_level_stage, referring_predictor

        train_keys, _ = self.do_split()
        return fit_case_level_stage(self, predictor or referring_predictor(self), train_keys,
                                    self.case_level_settings)

    def canonically_oriented(self, dataset) -> CanonicallyOrientedDataset:
        """Referring images are seen in one orientation: "left" is the patient's left however a scan is stored."""
        return CanonicallyOrientedDataset(dataset, self.plans_manager.transpose_forward)

    # ---------------------------------------------------------------- checkpoints that survive a kill
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written to a temporary file and renamed: a kill mid-write leaves the previous one."""
        from lsms_nnunet.training.checkpoints import save_atomically

        save_atomically(super().save_checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """`--c` continues from the last readable checkpoint (an unreadable checkpoint_latest -> checkpoint_best)."""
        from lsms_nnunet.training.checkpoints import readable_checkpoint

        if isinstance(filename_or_checkpoint, str):
            filename_or_checkpoint = readable_checkpoint(filename_or_checkpoint, self.print_to_log_file)
            self.validated_checkpoint = filename_or_checkpoint  # what --val / --val_best validate
        self._adopt_network_of(filename_or_checkpoint)
        super().load_checkpoint(filename_or_checkpoint)

    def _adopt_network_of(self, filename_or_checkpoint: dict | str) -> None:
        """A fold is validated, refitted or continued with the network its weights were trained with: a checkpoint of
        an earlier lsms-nnunet (before the anatomy head, say) keeps the settings of its own card, not those this
        version would choose for the dataset today."""
        from lsms_nnunet.training.checkpoints import load_checkpoint_safely

        checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) \
            else load_checkpoint_safely(filename_or_checkpoint, mmap=True)
        card = checkpoint["network_weights"].get("_extra_state")
        if not isinstance(card, dict) or network_config_of(card) == network_config_of(self.model_card):
            return
        self.model_card = {key: value for key, value in card.items() if key != CASE_SELECTOR_STATE_KEY}
        for configuration_dict in (self.plans_manager.plans["configurations"][self.configuration_name],
                                   self.configuration_manager.configuration):
            configuration_dict[MODEL_CARD_PLANS_KEY] = self.model_card
        self.print_to_log_file("The checkpoint's network settings differ from those this version would train; the "
                               "fold keeps its own (model card of the checkpoint).")
        if self.was_initialized:  # rebuild the network (and its optimiser and loss) as the checkpoint has it
            self.was_initialized = False
            self.initialize()

    def on_train_end(self) -> None:
        super().on_train_end()
        self.validated_checkpoint = None  # the weights in memory are the final ones (checkpoint_final.pth)

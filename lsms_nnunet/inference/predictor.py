"""Referring inference on nnU-Net's predictor: one mask per expression, expressions of an image batched.

`LSMSPredictor` subclasses `nnUNetPredictor` and keeps its whole pipeline (reading, preprocessing workers, sliding
window, Gaussian weighting, mirroring, fold averaging, `-num_parts`, `--continue_prediction`):
- the expressions come from the companion `expressions.json` in the input folder (or from the `PredictionRequest`
  that `LSMSv2_predict -e/--text` pass) and are validated before anything is written, as is the output: never the
  input folder or inside it, no expression id named like an input image;
- each image is preprocessed once and seen in canonical orientation (preprocessing/orientation.py; flipped back
  before export); its expressions are bound to the network as prompts, a batch at a time, so every sliding-window
  patch runs once per batch;
- where the folds' case-level stage answers (selection/stage.py), the network is asked for its finding answer only
  and the stage chooses each expression's lesions among its candidates;
- the expressions of an image are answered and exported in chunks (`CHUNK_VOXELS`), each resampled back to the
  original geometry and written as one binary mask per expression (`<expression id><file ending>`), plus
  `expressions_index.json`: memory follows a chunk, not the number of expressions.
A plain-task model without a companion file binds its label prompts and the stock nnU-Net export writes an ordinary
label map (and `--save_probabilities` npz) per case.

The stock `nnUNetv2_predict` builds a plain `nnUNetPredictor`; inference/nnunet_shim.py (called from
`LSMSTrainer.build_network_architecture`) turns it into an `LSMSPredictor`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from text_conditioning.encoders import EncoderIdentity
from text_conditioning.expressions import Expression, ExpressionsError, load_expressions
from text_conditioning.io import atomic_path, write_json_atomically
from text_conditioning.model_texts import embed_texts, encode_texts

from lsms_nnunet.inference.input_checks import check_input_images
from lsms_nnunet.network.case_position import with_case_position
from lsms_nnunet.network.prompting import PromptableLSMSNet
from lsms_nnunet.preprocessing.orientation import canonical_flip_axes, flip_spatial
from lsms_nnunet.preprocessing.prompts import EXPRESSIONS_FILE, FINDING_TEXT, PLAIN
from lsms_nnunet.selection.candidates import FindingAnswer
from lsms_nnunet.selection.evidence import TextFeatures
from lsms_nnunet.selection.stage import CaseLevelStage
from lsms_nnunet.worker_lifetime import preprocessing_workers_die_with_parent

EXPRESSION_BATCH_ENV = "LSMS_EXPRESSION_BATCH"
#: Expressions of one image are answered and exported in chunks of about this many voxels of logits (each chunk at
#: least one batch of prompts): peak memory follows the chunk, not the number of expressions.
CHUNK_VOXELS = 2 ** 24
#: Patch voxels x prompts of one sliding-window pass, at most: a 96 x 96 patch takes 8 prompts at once (the
#: default), a 32 x 64 x 64 patch 2, a 128^3 patch 1.
PASS_VOXELS = 2 ** 18
TEXTS_PER_ENCODING = 1024  # texts encoded and read back at once before prediction starts (~50 kB each)
INDEX_FILE = "expressions_index.json"


class UnsafeOutputError(ValueError):
    """A referring prediction whose masks would overwrite input images or mix with them."""


# ------------------------------------------------------------------------------------------------ text
def bind_label_prompts(network: PromptableLSMSNet, cache_folder: Path | None = None,
                       identity: EncoderIdentity | None = None) -> None:
    """Plain task: bind every label's prompt so `network(x)` returns nnU-Net (K+1)-class logits."""
    card = network.model_card
    identity = identity or EncoderIdentity.from_dict(card["text_encoder"])
    texts = [text for _, _, text in card["label_prompts"]]
    network.bind_prompts(*embed_texts(_maybe_constant(card, texts), identity, cache_folder))


def _maybe_constant(card: Mapping, texts: Sequence[str]) -> list[str]:
    return [card["constant_text"]] * len(texts) if card.get("constant_text") else list(texts)


# ------------------------------------------------------------------------------------------------ export
#: One expression's answer as nnU-Net's export sees it: background vs the referred target.
_TARGET_LABELS = LabelManager({"background": 0, "target": 1}, None)


def export_expression_masks(prompt_logits: np.ndarray | torch.Tensor, properties: dict, configuration_manager,
                            plans_manager, reader_writer, expression_ids: Sequence[str], output_folder: str | Path,
                            file_ending: str, save_probabilities: bool = False) -> list[str]:
    """Write one binary mask per expression from `[E, ...]` expression logits, in the original geometry.

    Expressions may overlap, so each is exported on its own by nnU-Net's
    `convert_predicted_logits_to_segmentation_with_correct_shape` (resampling, uncropping, transposing back) as a
    two-class answer `[0, logit]`: its argmax is the logit's sign, its softmax the logit's sigmoid. With
    `save_probabilities`, `<id>.npz` holds nnU-Net's layout for a 2-class task: `probabilities` [2, *shape].
    """
    logits = torch.as_tensor(prompt_logits).float()
    written = []
    for expression_id, expression_logits in zip(expression_ids, logits, strict=True):
        answer = torch.stack((torch.zeros_like(expression_logits), expression_logits))
        exported = convert_predicted_logits_to_segmentation_with_correct_shape(
            answer, plans_manager, configuration_manager, _TARGET_LABELS, properties,
            return_probabilities=save_probabilities)
        mask, probabilities = exported if save_probabilities else (exported, None)
        target = Path(output_folder) / f"{expression_id}{file_ending}"
        with atomic_path(target, suffix=file_ending) as temporary:
            reader_writer.write_seg(mask, str(temporary), properties)
        written.append(str(target))
        if save_probabilities:
            with atomic_path(target.with_name(f"{expression_id}.npz"), suffix=".npz") as temporary:
                np.savez_compressed(temporary, probabilities=probabilities)
    return written


def write_index(output_folder: Path, entries: list[dict]) -> None:
    target = output_folder / INDEX_FILE
    previous = json.loads(target.read_text(encoding="utf-8"))["expressions"] if target.is_file() else []
    merged = {e["id"]: e for e in previous} | {e["id"]: e for e in entries}
    write_json_atomically(target, {"format": "lsms-predictions", "version": 1, "expressions": list(merged.values())})


def empty_where_absent(prompt_logits: torch.Tensor, case_existence: torch.Tensor | None) -> torch.Tensor:
    """The existence decision, taken once per image: a prompt whose referred object no patch of the image (and no
    fold) judged present gets an empty mask, not a thresholded speckle. Its logits are only pushed below 0, so saved
    probabilities still rank voxels."""
    if case_existence is None:
        return prompt_logits
    absent = (case_existence.to(prompt_logits.device) < 0).view(-1, *([1] * (prompt_logits.ndim - 1)))
    return torch.where(absent, prompt_logits.clamp(max=-1.0), prompt_logits)


# ------------------------------------------------------------------------------------------------ predictor
@dataclass(frozen=True)
class PredictionRequest:
    """What one prediction asks beyond nnU-Net's own arguments: LSMSv2_predict's -e, --text, --text_encoder and
    --allow_nonfinite. The stock nnUNetv2_predict has none of them: it reads the companion expressions file,
    LSMS_TEXT_ENCODER and LSMS_ALLOW_NONFINITE instead."""

    expressions_file: str | None = None
    ad_hoc_text: str | None = None
    text_encoder_source: str | None = None
    allow_nonfinite: bool = False


class LSMSPredictor(nnUNetPredictor):
    """nnUNetPredictor that answers referring expressions (see module docstring).

    `request`: the prediction's `PredictionRequest`; `case_level`: the case-level stage of the folds in use (set when
    a model folder is loaded; None: each expression is answered by the network alone)."""

    #: At most this many prompts share one sliding-window pass (fewer where the patch is large: `prompts_per_pass`).
    expression_batch_size = int(os.environ.get(EXPRESSION_BATCH_ENV, "8"))

    def __init__(self, *args, request: PredictionRequest = PredictionRequest(), **kwargs):
        super().__init__(*args, **kwargs)
        self.request = request
        self.case_level: CaseLevelStage | None = None

    def adopt(self, request: PredictionRequest = PredictionRequest()) -> None:
        """The per-run state of a predictor built by nnU-Net's own code (the stock nnUNetv2_predict) and turned into
        an LSMSPredictor, whose __init__ did not run."""
        self.request = request
        self.case_level = None

    @property
    def model_card(self) -> dict:
        return self.network.model_card

    def predict_prompt_logits(self, data: torch.Tensor, texts: Sequence[str],
                              cache_folder: Path | None = None) -> torch.Tensor:
        """`[1 + E, ...]` logits for E texts on one preprocessed image, all at once (`prompt_logit_chunks` streams
        them; prediction and validation export chunk by chunk, `export_answers`)."""
        chunks = [logits for _, logits in self.prompt_logit_chunks(data, texts, cache_folder)]
        return torch.cat((torch.zeros_like(chunks[0][:1]), *chunks))

    def prompt_logit_chunks(self, data: torch.Tensor, texts: Sequence[str], cache_folder: Path | None = None
                            ) -> Iterator[tuple[slice, torch.Tensor]]:
        """(which texts, their `[c, ...]` logits) for the texts of one preprocessed image, chunk by chunk
        (`expression_chunks`): memory holds one chunk's logits and embeddings, whatever the number of texts.

        Where the case-level stage answers, the network is asked for the finding answer only, once per image, and the
        stage chooses each expression's lesions among its candidates (selection/stage.py)."""
        identity = EncoderIdentity.from_dict(self.model_card["text_encoder"])
        asked = _maybe_constant(self.model_card, texts)
        image = None
        if self.case_level is not None and self.case_level.answers:
            image = self.case_level.read_image(self.predict_finding(data, cache_folder), data,
                                               self.configuration_manager.spacing)
        for chunk in self.expression_chunks(len(asked), data[0].numel()):
            chunk_texts = asked[chunk]
            encoded = encode_texts(chunk_texts, identity, cache_folder, self.request.text_encoder_source)
            if image is None:
                yield chunk, self._sliding_window_prompt_logits(data, torch.from_numpy(encoded.tokens),
                                                                torch.from_numpy(encoded.mask))
            else:
                yield chunk, self.case_level.answer(image, chunk_texts, TextFeatures(chunk_texts, encoded))

    def expression_chunks(self, count: int, voxels: int) -> list[slice]:
        """Chunks of an image's `count` expressions: as many as `CHUNK_VOXELS` float logits hold, at least one batch
        of prompts."""
        size = max(self.prompts_per_pass(), CHUNK_VOXELS // max(1, voxels))
        return [slice(start, start + size) for start in range(0, count, size)]

    def prompts_per_pass(self) -> int:
        """Prompts bound together for one sliding-window pass: `expression_batch_size`, fewer where the patch is so
        large that the activations of that many prompts would outweigh the rest of a prediction (`PASS_VOXELS`)."""
        patch_voxels = int(np.prod(self.configuration_manager.patch_size))
        return max(1, min(self.expression_batch_size, PASS_VOXELS // patch_voxels))

    def export_answers(self, canonical_data: torch.Tensor, properties: dict, ids: Sequence[str],
                       texts: Sequence[str], output_folder: str | Path, save_probabilities: bool = False,
                       cache_folder: Path | None = None) -> list[str]:
        """One mask per expression of one preprocessed image (in canonical orientation), chunk by chunk: each
        chunk's logits are flipped back to the image's own orientation and written before the next is computed."""
        flips = canonical_flip_axes(properties, self.plans_manager.transpose_forward)
        reader_writer = self.plans_manager.image_reader_writer_class()
        written = []
        for chunk, logits in self.prompt_logit_chunks(canonical_data, texts, cache_folder):
            written += export_expression_masks(flip_spatial(logits, flips), properties, self.configuration_manager,
                                               self.plans_manager, reader_writer, ids[chunk], output_folder,
                                               self.dataset_json["file_ending"], save_probabilities)
        return written

    def predict_finding(self, data: torch.Tensor, cache_folder: Path | None = None) -> FindingAnswer:
        """The network's text-free answers on one preprocessed image, the case-level stage's input: all-lesion logits
        [*spatial] (the finding head's answer, the finding prompt bound; for networks without one the answer to the
        finding prompt) and, from a network with an anatomy output, its context-region map (0..K)."""
        identity = EncoderIdentity.from_dict(self.model_card["text_encoder"])
        encoded = encode_texts(_maybe_constant(self.model_card, [FINDING_TEXT]), identity, cache_folder,
                               self.request.text_encoder_source)
        tokens, mask = torch.from_numpy(encoded.tokens), torch.from_numpy(encoded.mask)
        config = self.network.config
        if not config.finding_head:
            return FindingAnswer(self._sliding_window_prompt_logits(data, tokens, mask)[0])
        self.network.bind_finding(tokens, mask)
        logits = self._sliding_window_bound(data, 1 + (1 + config.anatomy_regions if config.anatomy_regions else 0))
        anatomy = logits[1:].argmax(0).to(torch.int16).numpy() if config.anatomy_regions else None
        return FindingAnswer(logits[0], anatomy)

    def _sliding_window_prompt_logits(self, data: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
                                      ) -> torch.Tensor:
        """[E, *spatial] logits of the network answering E prompts itself, `prompts_per_pass()` at a time."""
        chunks, batch = [], self.prompts_per_pass()
        for start in range(0, len(tokens), batch):
            chunk = slice(start, start + batch)
            self.network.bind_prompts(tokens[chunk], mask[chunk])
            chunks.append(self._sliding_window_bound(data, len(tokens[chunk])))
        return torch.cat(chunks)

    def _sliding_window_bound(self, data: torch.Tensor, prompts: int) -> torch.Tensor:
        """[prompts, *spatial] target-vs-background logits of the prompts bound on the network, over all folds."""
        if getattr(getattr(self.network, "config", None), "case_position", False):  # LSMS networks carry a config
            data = with_case_position(data)  # before the sliding window: each window carries where it lies
        self.network.start_case()
        self.label_manager = LabelManager({"background": 0, **{f"prompt_{i}": i + 1 for i in range(prompts)}}, None)
        logits = self.predict_logits_from_preprocessed_data(data) if self.list_of_parameters \
            else self.predict_sliding_window_return_logits(data).cpu()
        return empty_where_absent(logits[1:], self.network.case_existence)

    # -- stock entries: predict_from_files(...), its sequential twin (-npp 0 -nps 0) and the numpy entries --------
    def predict_from_files(self, list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                           save_probabilities: bool = False, overwrite: bool = True,
                           num_processes_preprocessing: int = 3, num_processes_segmentation_export: int = 3,
                           folder_with_segs_from_prev_stage: str | None = None, num_parts: int = 1, part_id: int = 0):
        self._prepare_prompts(list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files)
        return super().predict_from_files(list_of_lists_or_source_folder,
                                          output_folder_or_list_of_truncated_output_files, save_probabilities,
                                          overwrite, num_processes_preprocessing, num_processes_segmentation_export,
                                          folder_with_segs_from_prev_stage, num_parts, part_id)

    def predict_from_files_sequential(self, list_of_lists_or_source_folder,
                                      output_folder_or_list_of_truncated_output_files,
                                      save_probabilities: bool = False, overwrite: bool = True,
                                      folder_with_segs_from_prev_stage: str | None = None):
        """nnU-Net's loop writes one label map per image; expressions go through `predict_from_data_iterator`."""
        self._prepare_prompts(list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files)
        if self._expressions is None:
            return super().predict_from_files_sequential(
                list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files, save_probabilities,
                overwrite, folder_with_segs_from_prev_stage)
        inputs, outputs, previous = self._manage_input_and_output_lists(
            list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
            folder_with_segs_from_prev_stage, overwrite, 0, 1, save_probabilities)
        for folder in {os.path.dirname(output) or os.curdir for output in outputs}:  # as nnU-Net's own loop does
            os.makedirs(folder, exist_ok=True)
        with torch.inference_mode():
            return self.predict_from_data_iterator(self._preprocessed_in_this_process(inputs, outputs, previous),
                                                   save_probabilities)

    def _internal_get_data_iterator_from_lists_of_filenames(self, *args, **kwargs):
        """nnU-Net's preprocessing workers, which here die with the prediction (a killed run leaks none)."""
        return preprocessing_workers_die_with_parent(
            super()._internal_get_data_iterator_from_lists_of_filenames(*args, **kwargs))

    def _preprocessed_in_this_process(self, inputs: list, outputs: list, previous: list):
        """nnU-Net's sequential preprocessing, yielding the items `predict_from_data_iterator` takes."""
        preprocessor = self.configuration_manager.preprocessor_class(verbose=self.verbose)
        for files, ofile, previous_stage in zip(inputs, outputs, previous):
            data, _, properties = preprocessor.run_case(files, previous_stage, self.plans_manager,
                                                        self.configuration_manager, self.dataset_json)
            yield {"data": torch.from_numpy(data), "data_properties": properties, "ofile": ofile}

    def predict_from_list_of_npy_arrays(self, *args, **kwargs):
        self._bind_label_prompts_or_refuse("predict_from_list_of_npy_arrays")
        return super().predict_from_list_of_npy_arrays(*args, **kwargs)

    def predict_single_npy_array(self, *args, **kwargs):
        self._bind_label_prompts_or_refuse("predict_single_npy_array")
        return super().predict_single_npy_array(*args, **kwargs)

    def _bind_label_prompts_or_refuse(self, entry: str) -> None:
        """The numpy entries take no expressions: fine for a plain-task model, refused for a referring one."""
        if self.model_card["mode"] != PLAIN:
            raise ExpressionsError(
                f"nnUNetPredictor.{entry} has no way to pass expressions to this referring model. Fix: use "
                f"predict_from_files with an {EXPRESSIONS_FILE} next to the images (or LSMSv2_predict -e FILE / "
                f"--text), or LSMSPredictor.predict_prompt_logits(preprocessed_data, texts).")
        self._expressions = None
        bind_label_prompts(self.network)

    def _prepare_prompts(self, source, output) -> None:
        """Bind a plain model's label prompts, or read, check and encode the expressions asked for, and check the
        images' content and orientation, before nnU-Net writes anything."""
        self._expressions = self._requested_expressions(source)
        if self._expressions is None:
            if self.model_card["mode"] != PLAIN:
                raise ExpressionsError(
                    f"This is a referring model: it needs expressions. None found: no {EXPRESSIONS_FILE} in {source}. "
                    f"Fix: put a companion {EXPRESSIONS_FILE} next to the images, or use LSMSv2_predict -e FILE / "
                    f"--text \"...\".")
            bind_label_prompts(self.network)
        else:
            self._refuse_unsafe_output(source, output)
            texts = list(dict.fromkeys(_maybe_constant(self.model_card, [e.text for e in self._expressions])))
            for start in range(0, len(texts), TEXTS_PER_ENCODING):  # encoded (and cached) before anything is written
                encode_texts(texts[start:start + TEXTS_PER_ENCODING],
                             EncoderIdentity.from_dict(self.model_card["text_encoder"]),
                             encoder_source=self.request.text_encoder_source)
        check_input_images(source, self.dataset_json, self.plans_manager.image_reader_writer_class(),
                           self.model_card.get("training_directions", []), self.request.allow_nonfinite)

    def _refuse_unsafe_output(self, source: str, output) -> None:
        """Masks are named `<expression id><file ending>`: in the input folder they can replace an image (an id equal
        to an image's name) and are taken for image channels by the next run, so refuse both before writing."""
        if isinstance(output, str):
            source_path, output_path = Path(source).resolve(), Path(output).resolve()
            if output_path == source_path or source_path in output_path.parents:
                where = "is the input folder" if output_path == source_path else f"is inside the input folder {source}"
                raise UnsafeOutputError(
                    f"The output folder {output} {where}: referring masks written there can replace input images and "
                    f"are read as images by the next prediction. Fix: pass an output folder (-o) outside {source}.")
        ending = self.dataset_json["file_ending"]
        inputs = {name for name in os.listdir(source) if name.endswith(ending)}
        clashes = sorted(e.id for e in self._expressions if e.id + ending in inputs)
        if clashes:
            raise UnsafeOutputError(
                f"{self._expressions_file(source)}: expression ids {clashes[:10]} ({len(clashes)} in all) would write "
                f"masks named like input images in {source} (e.g. {clashes[0]}{ending}). Fix: rename these ids in "
                f"the expressions file, e.g. to {clashes[0]}_mask.")

    def _expressions_file(self, source: str) -> str:
        return self.request.expressions_file or os.path.join(source, EXPRESSIONS_FILE)

    def _requested_expressions(self, source) -> list[Expression] | None:
        """The expressions asked for, validated against the images present; None when nothing was asked."""
        if not isinstance(source, str):
            return None
        ending = self.dataset_json["file_ending"]
        cases = sorted({name[: -len(ending) - 5] for name in os.listdir(source) if name.endswith(ending)})
        if self.request.ad_hoc_text:
            return [Expression(f"{case}-text", case, self.request.ad_hoc_text, None) for case in cases]
        file = self._expressions_file(source)
        if not os.path.isfile(file):
            if self.request.expressions_file:
                raise ExpressionsError(f"{file} is missing. Fix: point -e at an existing expressions file.")
            return None
        expressions = load_expressions(file, require_targets=False)
        absent = sorted({e.case for e in expressions} - set(cases))
        if absent:
            raise ExpressionsError(f"{file}: expressions name cases with no image in {source}: {absent[:10]} "
                                   f"({len(absent)} in all). Fix: add <case>_0000{ending} for them or remove those "
                                   f"expressions.")
        return expressions

    def _manage_input_and_output_lists(self, list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                                       folder_with_segs_from_prev_stage=None, overwrite=True, part_id=0, num_parts=1,
                                       save_probabilities=False):
        if getattr(self, "_expressions", None) is None:
            return super()._manage_input_and_output_lists(
                list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                folder_with_segs_from_prev_stage, overwrite, part_id, num_parts, save_probabilities)
        inputs, outputs, previous = super()._manage_input_and_output_lists(
            list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
            folder_with_segs_from_prev_stage, True, part_id, num_parts, save_probabilities)
        ending = self.dataset_json["file_ending"]
        keep = []
        for index, truncated in enumerate(outputs):
            case_expressions = [e for e in self._expressions if e.case == os.path.basename(truncated)]
            done = all(os.path.isfile(os.path.join(os.path.dirname(truncated), e.id + ending))
                       for e in case_expressions)
            if case_expressions and (overwrite or not done):
                keep.append(index)
        print(f"{len(keep)} images have expressions to answer"
              f"{'' if overwrite else ' (not yet predicted: --continue_prediction)'}")
        return [inputs[i] for i in keep], [outputs[i] for i in keep], [previous[i] for i in keep]

    def predict_from_data_iterator(self, data_iterator, save_probabilities: bool = False,
                                   num_processes_segmentation_export: int = 3):
        if getattr(self, "_expressions", None) is None:
            return super().predict_from_data_iterator(data_iterator, save_probabilities,
                                                      num_processes_segmentation_export)
        ending = self.dataset_json["file_ending"]
        written = []
        for item in data_iterator:
            data = item["data"]
            if isinstance(data, str):
                path, data = data, torch.from_numpy(np.load(data))
                os.remove(path)
            output_folder, case = os.path.split(item["ofile"])
            expressions = [e for e in self._expressions if e.case == case]
            print(f"\nPredicting {case}: {len(expressions)} expressions")
            flips = canonical_flip_axes(item["data_properties"], self.plans_manager.transpose_forward)
            self.export_answers(flip_spatial(data, flips), item["data_properties"], [e.id for e in expressions],
                                [e.text for e in expressions], output_folder, save_probabilities)
            entries = [{"id": e.id, "case": e.case, "text": e.text, "file": e.id + ending} for e in expressions]
            write_index(Path(output_folder), entries)
            written.extend(entries)
        return written

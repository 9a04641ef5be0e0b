"""The text-encoding step added to nnU-Net preprocessing: `LSMSv2_encode_text` and `LSMSv2_plan_and_preprocess`.

Expressions (or label prompts) are validated against the raw dataset, encoded once with the frozen text encoder and
cached at dataset level (`nnUNet_preprocessed/DatasetXXX/lsms_text/<encoder>/`, never inside a configuration folder,
where nnU-Net expects one file type only). Re-running encodes only new texts, also after an interrupted run (the cache
stores shards as it encodes). `LSMSv2_plan_and_preprocess` also brings a raw dataset's own splits_final.json (folds its
maker grouped) to nnUNet_preprocessed, where every trainer reads its folds.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from text_conditioning.cache import DEFAULT_SHARD_SIZE, TextEmbeddingCache
from text_conditioning.encoders import DEFAULT_TEXT_ENCODER, TextEncoder, encoder_identity
from text_conditioning.io import atomic_path
from text_conditioning.phrases import NONE, SHIPPED, PhraseTable, load_phrase_tables

from lsms_nnunet.preprocessing.image_checks import nonfinite_voxel_count, refuse_nonfinite, warn_if_constant
from lsms_nnunet.preprocessing.prompts import REFERRING, PromptSet, load_prompt_set, read_json, save_prompt_set
from lsms_nnunet.cli import console_entry

TEXT_FOLDER = "lsms_text"
DEFAULT_MAX_TOKENS = 32
DEFAULT_VARIANTS = 4  # phrase-table rewrites per expression text
SPLITS_FILE = "splits_final.json"


class SplitsFileError(ValueError):
    """A raw dataset's own splits_final.json that cannot become the folds nnU-Net trains on."""


def dataset_folders(dataset_name_or_id: str | int) -> tuple[str, Path, Path]:
    """(dataset name, raw folder, dataset-level text folder in nnUNet_preprocessed)."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    name = maybe_convert_to_dataset_name(dataset_name_or_id)
    return name, Path(nnUNet_raw) / name, Path(nnUNet_preprocessed) / name / TEXT_FOLDER


def with_phrase_variants(prompt_set: PromptSet, table: PhraseTable, per_expression: int) -> PromptSet:
    """A referring prompt set with up to `per_expression` phrase-table rewrites of each expression text."""
    if prompt_set.mode != REFERRING or not table.groups or per_expression <= 0:
        return prompt_set
    texts = prompt_set.all_texts()
    variants = tuple((text, tuple(rewrites)) for text in texts if (rewrites := table.variants(text, per_expression)))
    return dataclasses.replace(prompt_set, variants=variants, phrase_table_sha256=table.sha256,
                               phrase_table_sources=table.sources)


def encode_dataset_text(dataset_name_or_id: str | int, text_encoder: str | None = None,
                        max_tokens: int = DEFAULT_MAX_TOKENS, phrase_table: Sequence[str] = (SHIPPED,),
                        variants_per_expression: int = DEFAULT_VARIANTS) -> PromptSet:
    """Validate the dataset's prompts, add the phrase-table rewrites of its expressions, then encode every text
    missing from the cache."""
    name, raw_folder, text_folder = dataset_folders(dataset_name_or_id)
    table = load_phrase_tables(phrase_table)
    prompt_set = with_phrase_variants(load_prompt_set(raw_folder), table, variants_per_expression)
    identity = encoder_identity(text_encoder, max_tokens)
    cache = TextEmbeddingCache(text_folder / identity.slug, identity)
    texts = prompt_set.texts_to_encode()
    missing = cache.missing(texts)
    if missing:
        print(f"{name}: encoding {len(missing)} of {len(texts)} texts with {identity.name} (stored every "
              f"{DEFAULT_SHARD_SIZE}: if interrupted, rerun to encode only the rest)")
        cache.update(missing, TextEncoder(text_encoder, max_tokens=max_tokens))
    else:
        print(f"{name}: all {len(texts)} texts already encoded with {identity.name}")
    cache.prune(texts)
    save_prompt_set(prompt_set, identity.to_dict(), text_folder)
    kind = f"{len(prompt_set.expressions)} expressions" if prompt_set.expressions else \
        f"{len(prompt_set.label_prompts)} label prompts (plain task)"
    if prompt_set.variants:
        kind += (f" (and {len(prompt_set.variants_of(prompt_set.all_texts()))} phrase-table rewrites of "
                 f"{len(prompt_set.variants)} of their texts)")
    print(f"{name}: {kind} ready in {text_folder}")
    return prompt_set


def check_training_images(raw_folder: Path) -> None:
    """Refuse training images with NaN/infinite voxels (they poison nnU-Net's intensity fingerprint and every
    normalised case), naming each case and count; warn about constant images. Reads every training image once."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    dataset_json = read_json(raw_folder / "dataset.json")
    cases = get_filenames_of_train_images_and_targets(str(raw_folder), dataset_json)
    if not cases:
        return
    first_images = next(iter(cases.values()))["images"]
    reader = determine_reader_writer_from_dataset_json(dataset_json, first_images[0], verbose=False)()
    nonfinite = {}
    for case, files in tqdm(cases.items(), desc="Checking training images", disable=len(cases) < 20):
        image, _ = reader.read_images(files["images"])
        if count := nonfinite_voxel_count(image, files["images"]):
            nonfinite[case] = count
        warn_if_constant(case, image)
    refuse_nonfinite(nonfinite, f"repair or remove these cases in {raw_folder} (e.g. replace NaN by the background "
                                "value) before planning: NaNs would corrupt the intensity normalisation of all cases.")


def _is_fold(fold: object) -> bool:
    return isinstance(fold, dict) and all(isinstance(fold.get(part), list) and
                                          all(isinstance(case, str) for case in fold[part]) for part in ("train", "val"))


def check_dataset_splits(splits: object, path: Path, training_cases: set[str]) -> None:
    """Refuse a split file that is not nnU-Net's format (a list of {"train": [...], "val": [...]}), names cases the
    dataset does not train on, or validates a fold on one of its training cases."""
    fix = ("Fix: write nnU-Net's format, a list of folds {\"train\": [case, ...], \"val\": [case, ...]} naming cases "
           "of imagesTr, or remove the file to let nnU-Net make its random 5-fold split.")
    if not isinstance(splits, list) or not splits or not all(map(_is_fold, splits)):
        raise SplitsFileError(f"{path} is not a list of folds with 'train' and 'val' lists of case names. {fix}")
    for index, fold in enumerate(splits):
        unknown = sorted(set(fold["train"] + fold["val"]) - training_cases)
        if unknown:
            raise SplitsFileError(f"{path}: fold {index} names {unknown[:5]}, which are not training cases of "
                                  f"{path.parent} (imagesTr/labelsTr). {fix}")
        in_both = sorted(set(fold["train"]) & set(fold["val"]))
        if in_both:
            raise SplitsFileError(f"{path}: fold {index} trains and validates on {in_both[:5]}. Fix: put each case of "
                                  "a fold in 'train' or in 'val', not both.")


def adopt_dataset_splits(raw_folder: Path, preprocessed_folder: Path) -> None:
    """Copy the raw dataset's own splits_final.json, if it ships one, into its nnUNet_preprocessed folder, where
    nnU-Net's and LSMS's trainers and the benchmark read their folds: all of them then train on the folds the dataset's
    maker grouped (e.g. slabs of neighbouring slices never split between training and validation). A different split
    already there is refused, never overwritten: trainings may have used it."""
    source = raw_folder / SPLITS_FILE
    if not source.is_file():
        return
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    splits = read_json(source)
    dataset_json = read_json(raw_folder / "dataset.json")
    check_dataset_splits(splits, source, set(get_filenames_of_train_images_and_targets(str(raw_folder), dataset_json)))
    destination = preprocessed_folder / SPLITS_FILE
    if destination.is_file():
        if read_json(destination) != splits:
            raise SplitsFileError(f"{destination} holds other folds than the dataset's own {source}. Fix: delete "
                                  f"{destination} to train on the dataset's folds (models trained on the old folds "
                                  f"then no longer match them), or remove {source} to keep the folds in place.")
        return
    with atomic_path(destination) as temporary:
        shutil.copyfile(source, temporary)
    print(f"{raw_folder.name}: the dataset's own {SPLITS_FILE} ({len(splits)} folds) copied to {destination}")


NNUNET_DEFAULT_PROCESSES = {"-npfp": 8, "2d": 8, "3d_fullres": 4, "3d_lowres": 8, "other": 4}  # nnU-Net 2.8's


def processes_for_this_machine(nnunet_args: list[str], cpus: int | None = None) -> list[str]:
    """`-npfp`/`-np` for nnU-Net's planning where the user gave none: nnU-Net's defaults, capped at the CPU count.

    nnU-Net starts 8 spawned workers for fingerprinting and for 2d preprocessing whatever the machine; on a 2-core
    machine each imports PyTorch in turn, which costs more than the work itself on small datasets.
    """
    cpus = cpus or os.cpu_count() or 1
    added = []
    if "-npfp" not in nnunet_args:
        added += ["-npfp", str(min(NNUNET_DEFAULT_PROCESSES["-npfp"], cpus))]
    if "-np" not in nnunet_args:
        configurations = argparse.ArgumentParser(add_help=False)
        configurations.add_argument("-c", nargs="+", default=["2d", "3d_fullres", "3d_lowres"])
        named = configurations.parse_known_args(nnunet_args)[0].c
        added += ["-np", *(str(min(NNUNET_DEFAULT_PROCESSES.get(name, NNUNET_DEFAULT_PROCESSES["other"]), cpus))
                           for name in named)]
    return added


def _add_text_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text_encoder", "--text-encoder", default=None,
                        help=f"Hugging Face model name or local folder (default: the embedded {DEFAULT_TEXT_ENCODER}, "
                             f"offline). A hub name is downloaded only because you named it.")
    parser.add_argument("--max_tokens", "--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help=f"Tokens kept per expression (default {DEFAULT_MAX_TOKENS}).")
    parser.add_argument("--phrase_table", "--phrase-table", nargs="+", default=[SHIPPED],
                        help=f"Phrase tables whose interchangeable wordings rewrite the training expressions: "
                             f"'{SHIPPED}' (the project's radiology table, the default), your own JSON files (e.g. "
                             f"'{SHIPPED} my_phrases.json' extends it), or '{NONE}' (train on the expressions as "
                             f"written). See docs/data_format.md.")
    parser.add_argument("--phrase_variants", "--phrase-variants", type=int, default=DEFAULT_VARIANTS,
                        help=f"Rewrites kept per expression text (default {DEFAULT_VARIANTS}; 0: none).")


@console_entry
def encode_text_entry() -> None:
    parser = argparse.ArgumentParser(description="Validate and encode a dataset's expressions (or label prompts).")
    parser.add_argument("-d", nargs="+", required=True, help="Dataset name(s) or id(s).")
    _add_text_arguments(parser)
    args = parser.parse_args()
    if args.phrase_variants < 0:
        parser.error(f"--phrase_variants must be 0 or more, got {args.phrase_variants}.")
    for dataset in args.d:
        encode_dataset_text(dataset, args.text_encoder, args.max_tokens, args.phrase_table, args.phrase_variants)


@console_entry
def plan_and_preprocess_entry() -> None:
    """`nnUNetv2_plan_and_preprocess` (same flags) followed by the text-encoding step.

    Prompts, labels, image content and the dataset's own splits_final.json (copied to nnUNet_preprocessed) are
    checked first so a broken dataset fails before fingerprinting, not after preprocessing.
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import plan_and_preprocess_entry as nnunet_entry

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-d", nargs="+", required=True)
    _add_text_arguments(parser)
    args, nnunet_args = parser.parse_known_args()
    load_phrase_tables(args.phrase_table)  # a broken table fails before planning
    for dataset in args.d:
        _, raw_folder, text_folder = dataset_folders(dataset)
        load_prompt_set(raw_folder)
        check_training_images(raw_folder)
        adopt_dataset_splits(raw_folder, text_folder.parent)  # the text folder lies in the preprocessed dataset folder
    sys.argv = [sys.argv[0], "-d", *args.d, *nnunet_args, *processes_for_this_machine(nnunet_args)]
    if os.environ.get("nnUNet_n_proc_DA") == "0":
        # nnU-Net's planner estimates VRAM with torch.set_num_threads(nnUNet_n_proc_DA), which 0 crashes; 0 only
        # matters to training (augmentation in the main process), so planning gets 1
        os.environ["nnUNet_n_proc_DA"] = "1"
    nnunet_entry()
    for dataset in args.d:
        encode_dataset_text(dataset, args.text_encoder, args.max_tokens, args.phrase_table, args.phrase_variants)

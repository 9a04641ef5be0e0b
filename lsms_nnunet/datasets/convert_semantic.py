"""Turn a semantic lesion dataset (LiTS style: one lesion label, optionally an organ label) into a referring dataset.

Every connected component of the lesion label becomes one region (ids 1..K, largest first). Each region gets
attributes computed in physical space (ITK/LPS millimetres, so the image direction is respected), and expressions
are generated from those attributes with seeded phrasing templates. Only expressions whose referent is unambiguous
under the documented rules below are kept; expressions that refer to nothing ("the hyperdense lesion" where no
lesion is hyperdense) are added on purpose, so a model learns to answer "none".

Rules (all recorded in regions.json):
- components: 26-connectivity in 3D, 8 in 2D; components under ``min_lesion_voxels`` are dropped (they become
  background, so "all lesions" means all lesions of at least that size);
- size ranks ("the largest", "the second largest", "the smallest") need the neighbouring sizes to differ by a factor
  of at least SIZE_MARGIN_RATIO;
- extremes ("the most superior lesion") compare region centroids and need the winner ahead of the runner-up by at
  least max(EXTREME_MARGIN_MM, 2 voxels);
- liver lobes: the right lobe is the part of the liver on the patient's right of the sagittal plane that leaves
  RIGHT_LOBE_VOLUME_FRACTION of the liver's voxels on the right (the right lobe holds roughly 60 % of a liver);
  a lesion belongs to the lobe that holds its centroid. Other organs: left/right half around the organ's centroid;
- intensity: (lesion mean - organ mean) / organ standard deviation, in channel 0; below -INTENSITY_THRESHOLD is
  hypo, above +INTENSITY_THRESHOLD hyper, else iso, worded by the channel's modality: CT hypodense/hyperdense, MR
  (MR, MRI, T1, T2, FLAIR, DWI, ADC, PD, SWI...) hypointense/hyperintense, anything else darker/brighter.

A source's labelled test cases (imagesTs/ + labelsTs/ of an nnU-Net raw folder) are converted the same way into
imagesTs/, labelsTs/ and imagesTs/expressions.json; a source's own splits_final.json is kept (case names do not
change), so grouped folds survive the conversion.

Every expression carries a report category, named as in the synthetic generator: plural (all lesions, the only
lesion), size (size ranks, also the largest of a lobe or intensity group), lobe (lesions in a liver lobe), attribute
(intensity, also within a lobe), position (extremes, organ halves) and no_target (refers to nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cc3d
import numpy as np
import SimpleITK as sitk

from lsms_nnunet.datasets.geometry import (ConversionError, case_stem, check_region_count, check_same_geometry,
                                           copy_file_atomically, dataset_folder, image_ending, map_with_progress,
                                           physical_points, read_image, referring_labels, refuse_existing_dataset,
                                           region_map_image, resolve_raw_root, staged_dataset, write_image_atomically)
from text_conditioning.expressions import (NO_TARGET_CATEGORY, SAFE_ID_PATTERN, Expression,
                                           save_expressions, validate_against_cases)
from text_conditioning.io import write_json_atomically
from lsms_nnunet.cli import console_entry

CONVERTER_NAME = "LSMSv2_convert_semantic"
REGIONS_FORMAT = "lsms-regions"
REGIONS_VERSION = 1
SIZE_MARGIN_RATIO = 1.2
EXTREME_MARGIN_MM = 5.0
RIGHT_LOBE_VOLUME_FRACTION = 0.6
INTENSITY_THRESHOLD = 0.5
MAX_SIZE_RANK_EXPRESSED = 3
CONNECTIVITY = {2: 8, 3: 26}
#: With --organ_label the organ is kept in the region maps as context (anatomy, never a target) under this id, and
#: the lesion regions follow it (2, 3, ...).
ORGAN_CONTEXT_ID = 1
INTENSITY_CLASSES = ("hypo", "iso", "hyper")
PLAIN_NOUN = re.compile(r"^[a-z]+( [a-z]+)?$")
MR_CHANNEL = re.compile(r"^(MRI?|T1|T2|FLAIR|DWI|ADC|PD|SWI)", re.IGNORECASE)
GENERIC_INTENSITY_WORDS = {"hypo": "darker", "iso": "similarly bright", "hyper": "brighter"}
# Physical LPS axis, sign, and how to say "furthest in that direction".
EXTREME_DIRECTIONS = (
    ("superior", 2, 1, ("the most superior {noun}", "the uppermost {noun}", "the highest {noun}")),
    ("inferior", 2, -1, ("the most inferior {noun}", "the lowest {noun}")),
    ("right", 0, -1, ("the {noun} furthest to the patient's right", "the most right-sided {noun}")),
    ("left", 0, 1, ("the {noun} furthest to the patient's left", "the most left-sided {noun}")),
    ("anterior", 1, -1, ("the most anterior {noun}", "the {noun} closest to the front")),
    ("posterior", 1, 1, ("the most posterior {noun}", "the {noun} closest to the back")),
)
ORDINALS = {1: "", 2: "second ", 3: "third "}


@dataclass(frozen=True)
class SourceCase:
    case: str
    images: tuple[Path, ...]
    label: Path


@dataclass(frozen=True)
class SemanticSource:
    """The cases of a source folder and what its labels and channels are called."""

    folder: Path
    cases: tuple[SourceCase, ...]
    channel_names: dict[str, str]
    label_names: dict[int, str]
    test_cases: tuple[SourceCase, ...] = ()


def _read_nnunet_source(folder: Path) -> SemanticSource:
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    dataset_json = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    label_names = {}
    for label_name, value in dataset_json.get("labels", {}).items():
        if isinstance(value, int) and not isinstance(value, bool):
            label_names[value] = label_name
    files = get_filenames_of_train_images_and_targets(str(folder), dataset_json)
    cases = tuple(SourceCase(case, tuple(Path(path) for path in entry["images"]), Path(entry["label"]))
                  for case, entry in sorted(files.items()))
    channel_names = dict(dataset_json.get("channel_names", {"0": "CT"}))
    test_cases = _read_test_cases(folder, dataset_json["file_ending"], channel_names)
    unsafe = [case.case for case in cases + test_cases if not SAFE_ID_PATTERN.match(case.case)]
    if unsafe:
        raise ConversionError(f"{folder}: case identifier(s) {unsafe[:5]} are not file-name safe. Fix: rename them "
                              "to letters, digits, '.', '_' and '-'.")
    in_both = sorted({case.case for case in cases} & {case.case for case in test_cases})
    if in_both:
        raise ConversionError(f"{folder}: case(s) {in_both[:5]} are in labelsTr/ and labelsTs/. Fix: give test cases "
                              "names of their own.")
    return SemanticSource(folder, cases, channel_names, label_names, test_cases)


def _read_test_cases(folder: Path, file_ending: str, channel_names: dict[str, str]) -> tuple[SourceCase, ...]:
    """The labelled test cases: one per labelsTs/ file, with its images in imagesTs/ (none without labelsTs/, as in
    MSD, whose test images have no labels to convert)."""
    if not (folder / "labelsTs").is_dir():
        return ()
    cases = []
    for label in sorted((folder / "labelsTs").glob(f"*{file_ending}")):
        case = label.name[:-len(file_ending)]
        images = tuple(folder / "imagesTs" / f"{case}_{int(channel):04d}{file_ending}"
                       for channel in sorted(channel_names, key=int))
        missing = [image.name for image in images if not image.is_file()]
        if missing:
            raise ConversionError(f"{label}: the test case has no image(s) {missing} in {folder / 'imagesTs'}. Fix: "
                                  "add them, or remove the label from labelsTs/.")
        cases.append(SourceCase(case, images, label))
    return tuple(cases)


def _files_by_stem(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        stem = case_stem(path)
        if stem in files:
            raise ConversionError(f"{folder}: {files[stem].name} and {path.name} both give case {stem!r}. Fix: give "
                                  "every image a distinct file name.")
        files[stem] = path
    return files


def _read_plain_source(folder: Path, channel_name: str | None) -> SemanticSource:
    images, labels = _files_by_stem(folder / "images"), _files_by_stem(folder / "labels")
    unmatched = sorted(set(images) ^ set(labels))
    if unmatched:
        raise ConversionError(f"{folder}: case(s) {unmatched[:5]} have an image without a label or a label without "
                              "an image. Fix: give images/ and labels/ the same file stems.")
    if not images:
        raise ConversionError(f"{folder}/images holds no image. Fix: put one image per case there.")
    if channel_name is None:
        raise ConversionError(f"{folder} (images/ + labels/) does not say what the images are. Fix: pass "
                              "--channel_name with the modality: CT (CT normalisation, 'hypodense' wording), MR or "
                              "T1/T2/FLAIR... ('hypointense'), or any other name ('darker'/'brighter').")
    cases = tuple(SourceCase(case, (images[case],), labels[case]) for case in sorted(images))
    return SemanticSource(folder, cases, {"0": channel_name}, {})


def read_source(source: str | os.PathLike, channel_name: str | None = None) -> SemanticSource:
    """An nnU-Net raw dataset (dataset.json, imagesTr, labelsTr) or a plain folder with images/ and labels/.

    ``channel_name`` (the modality) is required for a plain folder, which cannot say it; for an nnU-Net dataset it
    replaces channel 0's name in its dataset.json."""
    folder = Path(source)
    if (folder / "dataset.json").is_file() and (folder / "imagesTr").is_dir() and (folder / "labelsTr").is_dir():
        semantic = _read_nnunet_source(folder)
        if channel_name is not None:
            semantic.channel_names["0"] = channel_name
        return semantic
    if (folder / "images").is_dir() and (folder / "labels").is_dir():
        return _read_plain_source(folder, channel_name)
    raise ConversionError(f"{folder} is neither an nnU-Net raw dataset (dataset.json, imagesTr/, labelsTr/) nor a "
                          "folder with images/ and labels/. Fix: point -i to one of those.")


def resolve_label(value: int | str, source: SemanticSource, role: str) -> int:
    """The integer value of a label given by value or by its dataset.json name."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, int):
        if source.label_names and value not in source.label_names:
            raise ConversionError(f"{role} label {value} is not declared in {source.folder}/dataset.json (labels: "
                                  f"{source.label_names}). Fix: pass one of those values or names.")
        return value
    by_name = {name.lower(): number for number, name in source.label_names.items()}
    if value.lower() not in by_name:
        known = ", ".join(source.label_names.values()) or "none (plain folders have no label names)"
        raise ConversionError(f"{role} label {value!r} is unknown in {source.folder}; names: {known}. Fix: pass "
                              "the label's name or integer value.")
    return by_name[value.lower()]


def plural(noun: str) -> str:
    if noun.endswith("sis"):
        return noun[:-3] + "ses"
    return noun if noun.endswith("s") else noun + "s"


@dataclass(frozen=True)
class Vocabulary:
    """Words for one dataset: lesion nouns, organ name, whether lobes apply, and the intensity words."""

    nouns: tuple[str, ...]
    organ: str | None
    has_lobes: bool
    intensity_words: tuple[tuple[str, str], ...]  # (intensity class, word)

    @classmethod
    def for_source(cls, source: SemanticSource, lesion_value: int, organ_value: int | None) -> "Vocabulary":
        lesion_name = source.label_names.get(lesion_value, "").lower().replace("_", " ")
        nouns = ("lesion",) + ((lesion_name,) if PLAIN_NOUN.match(lesion_name) and lesion_name != "lesion" else ())
        organ = None
        if organ_value is not None:
            organ_name = source.label_names.get(organ_value, "").lower().replace("_", " ")
            organ = organ_name if PLAIN_NOUN.match(organ_name) else "organ"
        words = intensity_words(source.channel_names.get("0", ""))
        return cls(nouns, organ, organ is not None and "liver" in organ, tuple(words.items()))

    def intensity_word(self, intensity_class: str) -> str:
        return dict(self.intensity_words)[intensity_class]


def intensity_words(channel_name: str) -> dict[str, str]:
    """Radiologists say "hypodense" of CT and "hypointense" of MR; for any other modality neither is right, so
    plain "darker"/"brighter" (than the organ) is used."""
    if channel_name.strip().upper() == "CT":
        return {intensity_class: intensity_class + "dense" for intensity_class in INTENSITY_CLASSES}
    if MR_CHANNEL.match(channel_name.strip()):
        return {intensity_class: intensity_class + "intense" for intensity_class in INTENSITY_CLASSES}
    return dict(GENERIC_INTENSITY_WORDS)


@dataclass
class RegionAttributes:
    """What the expressions may say about one region (stored in regions.json)."""

    id: int
    size_voxels: int
    size_physical: float
    size_unit: str
    size_rank: int
    centroid_voxel_zyx: list[float]
    centroid_mm_lps: list[float]
    mean_intensity: float
    offset_from_organ_centroid_mm: list[float] | None = None
    side_of_organ: str | None = None
    lobe: str | None = None
    intensity_contrast: float | None = None
    intensity_class: str | None = None


@dataclass
class OrganSummary:
    voxels: int
    centroid_mm_lps: list[float]
    bounding_box_mm_lps: list[list[float]]
    mean_intensity: float
    std_intensity: float
    right_lobe_plane_x_mm: float | None = None


def extract_regions(label: np.ndarray, lesion_value: int, min_lesion_voxels: int) -> tuple[np.ndarray, np.ndarray]:
    """Region map (ids 1..K by size, descending) of the lesion label's components, and the region sizes."""
    components = cc3d.connected_components((label == lesion_value).astype(np.uint8),
                                           connectivity=CONNECTIVITY[label.ndim])
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    kept = np.flatnonzero(sizes >= max(min_lesion_voxels, 1))
    kept = kept[np.argsort(-sizes[kept], kind="stable")]
    lookup = np.zeros(len(sizes), dtype=np.int32)
    lookup[kept] = np.arange(1, len(kept) + 1)
    return lookup[components], sizes[kept]


def describe_regions(image: sitk.Image, intensities: np.ndarray, label: np.ndarray, region_map: np.ndarray,
                     sizes: np.ndarray, organ_value: int | None, vocabulary: Vocabulary
                     ) -> tuple[list[RegionAttributes], OrganSummary | None]:
    """Size, position, location relative to the organ and relative intensity of every region."""
    num_regions = len(sizes)
    voxel_volume = float(np.prod(image.GetSpacing()))
    unit, scale = ("mL", 1e-3) if image.GetDimension() == 3 else ("mm2", 1.0)
    indices = np.nonzero(region_map)
    ids = region_map[indices]
    centroids = np.stack([np.bincount(ids, weights=axis, minlength=num_regions + 1)[1:] for axis in indices],
                         axis=1) / sizes[:, None] if num_regions else np.zeros((0, region_map.ndim))
    means = np.bincount(ids, weights=intensities[indices], minlength=num_regions + 1)[1:] / np.maximum(sizes, 1)
    centroids_mm = physical_points(image, centroids)
    regions = [RegionAttributes(id=index + 1, size_voxels=int(sizes[index]),
                                size_physical=round(float(sizes[index]) * voxel_volume * scale, 4), size_unit=unit,
                                size_rank=index + 1, centroid_voxel_zyx=[round(float(v), 3) for v in centroids[index]],
                                centroid_mm_lps=[round(float(v), 3) for v in centroids_mm[index]],
                                mean_intensity=round(float(means[index]), 3))
               for index in range(num_regions)]
    organ_voxels = np.argwhere(label == organ_value) if organ_value is not None else np.zeros((0, label.ndim))
    if len(organ_voxels) == 0:
        return regions, None
    organ_mm = physical_points(image, organ_voxels)
    organ_values = intensities[label == organ_value]
    organ = OrganSummary(voxels=len(organ_voxels), centroid_mm_lps=[round(float(v), 3) for v in organ_mm.mean(0)],
                         bounding_box_mm_lps=[[round(float(v), 3) for v in organ_mm.min(0)],
                                              [round(float(v), 3) for v in organ_mm.max(0)]],
                         mean_intensity=round(float(organ_values.mean()), 3),
                         std_intensity=round(float(organ_values.std()), 3))
    if vocabulary.has_lobes:
        # LPS: x grows towards the patient's left, so the right lobe is the part with the smallest x.
        organ.right_lobe_plane_x_mm = round(float(np.quantile(organ_mm[:, 0], RIGHT_LOBE_VOLUME_FRACTION)), 3)
    for region, centroid in zip(regions, centroids_mm):
        offset = centroid - organ_mm.mean(0)
        region.offset_from_organ_centroid_mm = [round(float(v), 3) for v in offset]
        region.side_of_organ = "left" if offset[0] > 0 else "right"
        if organ.right_lobe_plane_x_mm is not None:
            region.lobe = "right" if centroid[0] < organ.right_lobe_plane_x_mm else "left"
        contrast = (region.mean_intensity - organ.mean_intensity) / max(organ.std_intensity, 1e-6)
        region.intensity_contrast = round(float(contrast), 3)
        region.intensity_class = ("hypo" if contrast < -INTENSITY_THRESHOLD else
                                  "hyper" if contrast > INTENSITY_THRESHOLD else "iso")
    return regions, organ


@dataclass(frozen=True)
class Candidate:
    """One thing an expression may refer to: a family, phrasing templates ({noun}/{nouns}), its targets, and the
    report category of the expressions file (the synthetic generator's names, plus "position" for extremes and
    organ halves; an expression without targets is reported as "no_target" whatever its category here)."""

    family: str
    templates: tuple[str, ...]
    targets: tuple[int, ...]
    category: str

    @property
    def report_category(self) -> str:
        return NO_TARGET_CATEGORY if not self.targets else self.category


def _clear_maximum(values: Sequence[float], margin: float) -> int | None:
    """Index of the largest of two or more values when it beats the runner-up by at least margin, else None."""
    order = np.argsort(values)[::-1]
    return int(order[0]) if values[order[0]] - values[order[1]] >= margin else None


def _clear_size_rank(sizes: Sequence[int], rank: int) -> bool:
    """True when the size at this rank (1 = largest) differs clearly from its neighbours."""
    index = rank - 1
    clear_above = index == 0 or sizes[index - 1] >= SIZE_MARGIN_RATIO * sizes[index]
    clear_below = index == len(sizes) - 1 or sizes[index] >= SIZE_MARGIN_RATIO * sizes[index + 1]
    return clear_above and clear_below


def _group_candidates(family: str, category: str, members: list[RegionAttributes], singular: tuple[str, ...],
                      plural_templates: tuple[str, ...], largest: tuple[str, ...]) -> list[Candidate]:
    """A subset by some attribute: singular when it has 0 (no-target) or 1 member, plural and largest when more.

    A no-target expression uses only the first singular template ("the hyperdense lesion", not "the only ...").
    """
    ids = tuple(region.id for region in members)
    if not members:
        return [Candidate(family, singular[:1], ids, category)]
    if len(members) == 1:
        return [Candidate(family, singular, ids, category)]
    candidates = [Candidate(family, plural_templates, ids, category)]
    if _clear_size_rank([region.size_voxels for region in members], 1):
        candidates.append(Candidate(family, largest, (members[0].id,), "size"))
    return candidates


def candidate_expressions(regions: list[RegionAttributes], vocabulary: Vocabulary, spacing: Sequence[float]
                          ) -> list[Candidate]:
    """Every unambiguous referent of this case under the module's rules, including no-target ones."""
    all_ids = tuple(region.id for region in regions)
    candidates = [Candidate("count", ("all {nouns}", "every {noun}", "all the {nouns}"), all_ids, "plural")]
    if len(regions) == 1:
        candidates.append(Candidate("count", ("the {noun}", "the only {noun}"), all_ids, "plural"))
    sizes = [region.size_voxels for region in regions]
    for rank in range(1, min(MAX_SIZE_RANK_EXPRESSED, len(regions)) + 1):
        if len(regions) > 1 and _clear_size_rank(sizes, rank):
            ordinal = ORDINALS[rank]
            candidates.append(Candidate("size", (f"the {ordinal}largest {{noun}}", f"the {ordinal}biggest {{noun}}"),
                                        (regions[rank - 1].id,), "size"))
    if len(regions) > 1 and _clear_size_rank(sizes, len(regions)):
        candidates.append(Candidate("size", ("the smallest {noun}", "the tiniest {noun}"), (regions[-1].id,),
                                    "size"))
    if len(regions) > 1:
        margin = max(EXTREME_MARGIN_MM, 2 * max(spacing))
        for _, axis, sign, templates in EXTREME_DIRECTIONS:
            if axis < len(spacing):
                winner = _clear_maximum([sign * region.centroid_mm_lps[axis] for region in regions], margin)
                if winner is not None:
                    candidates.append(Candidate("extreme", templates, (regions[winner].id,), "position"))
    if vocabulary.organ is not None and regions and regions[0].side_of_organ is not None:
        candidates += _location_candidates(regions, vocabulary)
    if regions and regions[0].intensity_class is not None:
        candidates += _intensity_candidates(regions, vocabulary)
    return candidates


def _location_candidates(regions: list[RegionAttributes], vocabulary: Vocabulary) -> list[Candidate]:
    candidates = []
    for side in ("right", "left"):
        if vocabulary.has_lobes:
            members = [region for region in regions if region.lobe == side]
            where = f"in the {side} lobe"
            singular = (f"the {{noun}} {where}", f"the {side}-lobe {{noun}}")
        else:
            members = [region for region in regions if region.side_of_organ == side]
            where = f"in the patient's {side} half of the {vocabulary.organ}"
            singular = (f"the {{noun}} {where}",)
        category = "lobe" if vocabulary.has_lobes else "position"
        candidates += _group_candidates("location", category, members, singular,
                                        (f"all {{nouns}} {where}", f"every {{noun}} {where}"),
                                        (f"the largest {{noun}} {where}", f"the biggest {{noun}} {where}"))
    return candidates


def _intensity_candidates(regions: list[RegionAttributes], vocabulary: Vocabulary) -> list[Candidate]:
    candidates = []
    for intensity_class in INTENSITY_CLASSES:
        word = vocabulary.intensity_word(intensity_class)
        members = [region for region in regions if region.intensity_class == intensity_class]
        candidates += _group_candidates("intensity", "attribute", members,
                                        (f"the {word} {{noun}}", f"the only {word} {{noun}}"),
                                        (f"all {word} {{nouns}}", f"every {word} {{noun}}"),
                                        (f"the largest {word} {{noun}}",))
        if not members or not vocabulary.has_lobes:
            continue
        for side in ("right", "left"):
            subset = [region for region in members if region.lobe == side]
            lobe_members = [region for region in regions if region.lobe == side]
            if subset and len(subset) not in (len(members), len(lobe_members)):
                where = f"in the {side} lobe"
                templates = ((f"the {word} {{noun}} {where}",) if len(subset) == 1 else
                             (f"all {word} {{nouns}} {where}", f"every {word} {{noun}} {where}"))
                candidates.append(Candidate("combination", templates, tuple(region.id for region in subset),
                                            "attribute"))
    return candidates


def phrase(candidate: Candidate, vocabulary: Vocabulary, rng: np.random.Generator) -> str:
    template = candidate.templates[int(rng.integers(len(candidate.templates)))]
    noun = vocabulary.nouns[int(rng.integers(len(vocabulary.nouns)))]
    return template.format(noun=noun, nouns=plural(noun))


@dataclass(frozen=True)
class _CaseJob:
    case: SourceCase
    output_folder: Path
    lesion_value: int
    organ_value: int | None
    min_lesion_voxels: int
    vocabulary: Vocabulary
    seed: int
    split: str = "Tr"  # "Tr" (imagesTr/labelsTr) or "Ts" (imagesTs/labelsTs)


@dataclass
class _CaseResult:
    case: str
    num_regions: int
    expressions: list[tuple[str, tuple[int, ...], str, str]]  # text, targets, family, report category
    description: dict = field(default_factory=dict)


def _convert_case(job: _CaseJob) -> _CaseResult:
    """Components, attributes and expressions of one case; writes its images and region map (worker process)."""
    source = job.case
    where = f"case {source.case!r}"
    label_image = read_image(source.label, where)
    images = [read_image(path, where) for path in source.images]
    for path, image in zip(source.images, images):
        check_same_geometry(image, label_image, path, source.label, where, "export the label map on the image's "
                            "voxel grid (same size, spacing, origin and direction).", other_kind="label")
    label = sitk.GetArrayFromImage(label_image)
    region_map, sizes = extract_regions(label, job.lesion_value, job.min_lesion_voxels)
    check_region_count(len(sizes), where, "raise min_lesion_voxels so fewer components become regions.")
    intensities = sitk.GetArrayFromImage(images[0]).astype(np.float64)
    regions, organ = describe_regions(images[0], intensities, label, region_map, sizes, job.organ_value,
                                      job.vocabulary)
    rng = np.random.default_rng([job.seed, zlib.crc32(source.case.encode("utf-8"))])
    expressions, seen = [], set()
    for candidate in candidate_expressions(regions, job.vocabulary, images[0].GetSpacing()):
        text = phrase(candidate, job.vocabulary, rng)
        if text not in seen:
            seen.add(text)
            expressions.append((text, candidate.targets, candidate.family, candidate.report_category))
    for channel, (path, image) in enumerate(zip(source.images, images)):
        output = job.output_folder / f"images{job.split}" / f"{source.case}_{channel:04d}.nii.gz"
        if image_ending(path) == ".nii.gz":
            copy_file_atomically(path, output)
        else:
            write_image_atomically(image, output)
    if job.organ_value is not None:  # the organ (specks of lesion too small to be regions included) is context
        # region ORGAN_CONTEXT_ID; the lesion regions follow it
        organ_voxels = (label == job.organ_value) | (label == job.lesion_value)
        region_map = np.where(region_map > 0, region_map + ORGAN_CONTEXT_ID,
                              np.where(organ_voxels, ORGAN_CONTEXT_ID, 0))
        expressions = [(text, tuple(t + ORGAN_CONTEXT_ID for t in targets), family, category)
                       for text, targets, family, category in expressions]
        for region in regions:
            region.id += ORGAN_CONTEXT_ID
    write_image_atomically(region_map_image(region_map, label_image, ".nii.gz"),
                           job.output_folder / f"labels{job.split}" / f"{source.case}.nii.gz")
    description = {"organ": asdict(organ) if organ else None, "regions": [asdict(region) for region in regions]}
    return _CaseResult(source.case, len(regions), expressions, description)


def convert_semantic(source: str | os.PathLike, lesion_label: int | str, organ_label: int | str | None,
                     dataset_id: int, name: str, min_lesion_voxels: int = 10, num_processes: int = 1, seed: int = 0,
                     raw_root: str | os.PathLike | None = None, overwrite: bool = False,
                     source_description: str | None = None, channel_name: str | None = None) -> Path:
    """Build DatasetXXX_name (images, region maps, dataset.json, expressions.json, regions.json; the source's labelled
    test cases and its splits_final.json too); returns its folder.

    The dataset is assembled in a hidden folder beside its destination and moved into place only when complete.
    ``source_description`` replaces the source path in dataset.json and regions.json (for temporary sources).
    ``channel_name`` is the images' modality (see read_source): it selects nnU-Net's normalisation and the wording.
    """
    semantic = read_source(source, channel_name)
    lesion_value = resolve_label(lesion_label, semantic, "Lesion")
    organ_value = None if organ_label is None else resolve_label(organ_label, semantic, "Organ")
    if organ_value == lesion_value:
        raise ConversionError(f"Lesion and organ label are both {lesion_value}. Fix: pass the organ's own label.")
    vocabulary = Vocabulary.for_source(semantic, lesion_value, organ_value)
    root = resolve_raw_root(raw_root)
    destination = dataset_folder(root, dataset_id, name)
    replaced = refuse_existing_dataset(root, dataset_id, overwrite)
    with staged_dataset(root, destination, replaced) as staging:
        jobs = [_CaseJob(case, staging, lesion_value, organ_value, min_lesion_voxels, vocabulary, seed, split)
                for split, cases in (("Tr", semantic.cases), ("Ts", semantic.test_cases)) for case in cases]
        results = {result.case: result for result in map_with_progress(_convert_case, jobs, num_processes,
                                                                        "Converting cases")}
        _write_dataset_files(staging, semantic, [results[case.case] for case in semantic.cases],
                             [results[case.case] for case in semantic.test_cases], lesion_value, organ_value,
                             min_lesion_voxels, seed, source_description or str(semantic.folder))
        if (semantic.folder / "splits_final.json").is_file():
            copy_file_atomically(semantic.folder / "splits_final.json", staging / "splits_final.json")
    return destination


def _save_case_expressions(path: Path, results: list[_CaseResult], first_region_id: int) -> None:
    expressions = [Expression(id=f"{result.case}-e{index}", case=result.case, text=text, targets=targets,
                              category=category)
                   for result in results for index, (text, targets, _, category) in enumerate(result.expressions)]
    validate_against_cases(expressions, {result.case: range(first_region_id, first_region_id + result.num_regions)
                                         for result in results}, path)
    save_expressions(path, expressions)


def _case_entries(results: list[_CaseResult]) -> dict:
    return {result.case: {**result.description,
                          "expressions": [{"id": f"{result.case}-e{index}", "family": family}
                                          for index, (_, _, family, _) in enumerate(result.expressions)]}
            for result in results}


def _write_dataset_files(folder: Path, source: SemanticSource, results: list[_CaseResult],
                         test_results: list[_CaseResult], lesion_value: int, organ_value: int | None,
                         min_lesion_voxels: int, seed: int, source_description: str) -> None:
    max_regions = max(result.num_regions for result in results + test_results)
    if max_regions == 0:
        raise ConversionError(f"No case in {source.folder} has a component of label {lesion_value} with at least "
                              f"{min_lesion_voxels} voxels. Fix: check --lesion_label or lower --min_lesion_voxels.")
    first = 1 if organ_value is None else ORGAN_CONTEXT_ID + 1  # the organ, when kept, is context id 1
    _save_case_expressions(folder / "expressions.json", results, first)
    if test_results:
        _save_case_expressions(folder / "imagesTs" / "expressions.json", test_results, first)
    lesion_name = source.label_names.get(lesion_value, str(lesion_value))
    organ_name = context_name(source.label_names.get(organ_value, "")) if organ_value is not None else None
    context = {organ_name: ORGAN_CONTEXT_ID} if organ_name else {}
    write_json_atomically(folder / "dataset.json", {
        "channel_names": source.channel_names,
        **referring_labels(first + max_regions - 1, context),
        "numTraining": len(results),
        "file_ending": ".nii.gz",
        "description": (f"Referring dataset made by {CONVERTER_NAME}: each connected component of label "
                        f"{lesion_name!r} ({lesion_value}) with at least {min_lesion_voxels} voxels is one region "
                        "(ids by size, largest first)"
                        + (f", after the organ {organ_name!r} (context id {ORGAN_CONTEXT_ID})" if context else "")
                        + f"; expressions are generated from region attributes (regions.json). Source: "
                        f"{source_description}"),
    })
    write_json_atomically(folder / "regions.json", {
        "format": REGIONS_FORMAT, "version": REGIONS_VERSION, "source": source_description,
        "lesion_label": lesion_value, "organ_label": organ_value, "min_lesion_voxels": min_lesion_voxels,
        "seed": seed,
        "rules": {"connectivity": CONNECTIVITY, "size_margin_ratio": SIZE_MARGIN_RATIO,
                  "extreme_margin_mm": EXTREME_MARGIN_MM, "right_lobe_volume_fraction": RIGHT_LOBE_VOLUME_FRACTION,
                  "intensity_threshold_in_organ_std": INTENSITY_THRESHOLD, "coordinates": "ITK physical LPS mm"},
        "cases": _case_entries(results),
        **({"test_cases": _case_entries(test_results)} if test_results else {}),
    })


def context_name(label_name: str) -> str:
    """The dataset.json name of a kept organ: its source label name as a lowercase identifier ("organ" if none)."""
    name = re.sub(r"[^a-z0-9]+", "_", label_name.lower()).strip("_")
    return name if name and name[0].isalpha() and not name.startswith("region_") else "organ"


def _label_argument(value: str) -> int | str:
    return int(value) if value.lstrip("-").isdigit() else value


@console_entry
def convert_semantic_entry() -> None:
    """LSMSv2_convert_semantic -i SOURCE -d ID -n NAME --lesion_label 2 [--organ_label 1] [...]."""
    parser = argparse.ArgumentParser(description="Convert a semantic lesion dataset (nnU-Net raw folder or images/ + "
                                                 "labels/) into a referring dataset with generated expressions.")
    parser.add_argument("-i", "--input", required=True, help="nnU-Net raw dataset folder or folder with images/ and "
                                                             "labels/")
    parser.add_argument("-d", "--dataset_id", type=int, required=True, help="id of the new dataset (1-999)")
    parser.add_argument("-n", "--name", required=True, help="name of the new dataset")
    parser.add_argument("--lesion_label", type=_label_argument, required=True, help="lesion label value or name")
    parser.add_argument("--organ_label", type=_label_argument, default=None,
                        help="organ label value or name (enables location and intensity expressions)")
    parser.add_argument("--min_lesion_voxels", type=int, default=10, help="smaller components are dropped (10)")
    parser.add_argument("-np", "--num_processes", type=int, default=1, help="parallel worker processes (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the phrasing choices (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this id")
    parser.add_argument("--channel_name", default=None,
                        help="modality of the images for dataset.json and the wording: CT (CT normalisation, "
                             "hypodense), MR/T1/T2/FLAIR... (hypointense), other (darker/brighter). Required for an "
                             "images/ + labels/ folder; for an nnU-Net dataset it replaces its channel 0 name")
    args = parser.parse_args()
    folder = convert_semantic(args.input, args.lesion_label, args.organ_label, args.dataset_id, args.name,
                              min_lesion_voxels=args.min_lesion_voxels, num_processes=args.num_processes,
                              seed=args.seed, overwrite=args.overwrite, channel_name=args.channel_name)
    print(f"Wrote {folder}")

"""What a dataset asks the network to segment: referring expressions, or one prompt per label for plain tasks.

Both task kinds are reduced to the same thing — per case, a list of `Prompt`s (texts + target region ids) — so the
loader, trainer and predictor have one code path. The prompt set is validated against the raw dataset once, at
encoding time, and stored next to the embedding cache in `nnUNet_preprocessed/DatasetXXX/lsms_text/prompts.json`.
A referring dataset may also label context regions (anatomy such as the liver) in its maps: they are never targets,
and `lesion_voxels` leaves them out wherever "all lesions" is meant.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Mapping, Sequence

import numpy as np
from tqdm import tqdm

from text_conditioning.expressions import (Expression, ExpressionsError, expression_from_dict, expression_to_dict,
                                           json_too_deep_message, load_expressions, unusable_text_reason,
                                           validate_against_cases)
from text_conditioning.io import write_json_atomically

PROMPTS_FILE = "prompts.json"
PROMPT_TABLE_FILE = "prompts.json"  # optional table at the raw dataset root of a plain task
EXPRESSIONS_FILE = "expressions.json"
CONTEXT_KEY = "lsms_context"  # dataset.json: names of the labels that are anatomy (context), not lesions
REFERRING, PLAIN = "referring", "plain"
#: The finding prompt: every referring case is also asked for all of its lesions (targets: every region id), so the
#: network learns to find all lesions and its answer gives the case-level selector its candidates.
FINDING_TEXT = "all lesions"
FINDING_ID = "finding"
_GENERIC_WORDS = {"label", "labels", "class", "region", "structure", "object", "foreground", "segment", "mask", "roi"}


@dataclass(frozen=True)
class Prompt:
    """One thing the network can be asked for: alternative phrasings and the region ids they refer to."""
    texts: tuple[str, ...]
    targets: tuple[int, ...]
    expression_id: str | None = None
    all_regions: bool = False  # the finding prompt: targets are every region id of the case
    #: Rewrites of the text from the phrase table (text_conditioning/phrases.py), asked instead of it half the time.
    variants: tuple[str, ...] = ()

    def draw_text(self, rng: random.Random | ModuleType = random) -> str:
        """The text one training sample asks: one of `texts`, or with variants, one of them half the time (`rng`: a
        random.Random, or the random module, whose generator the loader workers seed)."""
        if self.variants and rng.random() < 0.5:
            return rng.choice(self.variants)
        return rng.choice(self.texts)


def lesion_voxels(region_map: np.ndarray, context_ids: Sequence[int] = ()) -> np.ndarray:
    """Where a region map holds lesions: its positive ids other than the context (anatomy) ids."""
    lesions = region_map > 0
    if len(context_ids):
        lesions &= ~np.isin(region_map, np.asarray(context_ids, dtype=region_map.dtype))
    return lesions


def anatomy_index_map(region_map: np.ndarray, context_ids: Sequence[int]) -> np.ndarray:
    """A label map's context regions as 1..K in the order of `context_ids`, 0 elsewhere (what the anatomy output
    predicts)."""
    lookup = np.zeros(int(max(region_map.max(), max(context_ids, default=0))) + 1, dtype=np.int16)
    for index, label in enumerate(context_ids, start=1):
        lookup[label] = index
    return lookup[np.clip(region_map, 0, None)]


@dataclass(frozen=True)
class PromptSet:
    """The prompts of a dataset. Referring: expressions per case, and the context regions (anatomy name, label id)
    its label maps hold besides the lesions. Plain: the same label prompts for every case."""
    mode: str
    expressions: tuple[Expression, ...] = ()
    label_prompts: tuple[tuple[str, int, tuple[str, ...]], ...] = ()  # (label name, label value, phrasings)
    context: tuple[tuple[str, int], ...] = ()
    #: Per expression text, its phrase-table rewrites (referring only), and what they were made from.
    variants: tuple[tuple[str, tuple[str, ...]], ...] = ()
    phrase_table_sha256: str = ""
    phrase_table_sources: tuple[str, ...] = ()

    @property
    def context_ids(self) -> tuple[int, ...]:
        return tuple(label for _, label in self.context)

    def prompts_for_case(self, case: str) -> list[Prompt]:
        """What training asks of a case: its expressions and the finding prompt, or the label prompts."""
        if self.mode == REFERRING:
            return [*(Prompt((e.text,), tuple(e.targets or ()), e.id, variants=self.rewrites.get(e.text, ()))
                      for e in self.expressions if e.case == case),
                    Prompt((FINDING_TEXT,), (), f"{case}-{FINDING_ID}", all_regions=True)]
        return [Prompt(texts, (value,)) for _, value, texts in self.label_prompts]

    def cases(self) -> set[str]:
        return {e.case for e in self.expressions}

    def all_texts(self) -> list[str]:
        if self.mode == REFERRING:
            texts = [e.text for e in self.expressions]
        else:
            texts = [t for _, _, phrasings in self.label_prompts for t in phrasings]
        return list(dict.fromkeys(texts))

    @cached_property
    def rewrites(self) -> dict[str, tuple[str, ...]]:
        """`variants` as a mapping, built once (asked per case and per text)."""
        return dict(self.variants)

    def variants_of(self, texts: Sequence[str], limit: int | None = None) -> list[str]:
        """The phrase-table rewrites of `texts` (at most `limit` of each), without the texts themselves."""
        known = set(texts)
        rewrites = [v for text in texts for v in self.rewrites.get(text, ())[:limit]]
        return [v for v in dict.fromkeys(rewrites) if v not in known]

    def texts_to_encode(self) -> list[str]:
        """Every text training reads: all_texts(), their phrase-table rewrites and, for a referring task, the finding
        prompt."""
        texts = self.all_texts()
        texts += self.variants_of(texts)
        return texts + ([FINDING_TEXT] if self.mode == REFERRING and FINDING_TEXT not in texts else [])

    def canonical_label_prompts(self) -> list[tuple[str, int, str]]:
        """The first phrasing of every label, in label order: what inference asks for on a plain task."""
        return [(name, value, texts[0]) for name, value, texts in self.label_prompts]

    def to_dict(self) -> dict:
        if self.mode == REFERRING:
            return {"mode": REFERRING, "expressions": [expression_to_dict(e) for e in self.expressions],
                    **({"context": dict(self.context)} if self.context else {}),
                    **({"variants": {text: list(rewrites) for text, rewrites in self.variants},
                        "phrase_table": {"sha256": self.phrase_table_sha256,
                                         "sources": list(self.phrase_table_sources)}} if self.variants else {})}
        return {"mode": PLAIN, "labels": [{"name": n, "value": v, "prompts": list(t)} for n, v, t in self.label_prompts]}

    @classmethod
    def from_dict(cls, content: Mapping) -> "PromptSet":
        if content["mode"] == REFERRING:
            expressions = tuple(expression_from_dict(e) for e in content["expressions"])
            variants = tuple((text, tuple(rewrites)) for text, rewrites in content.get("variants", {}).items())
            table = content.get("phrase_table", {})
            return cls(REFERRING, expressions=expressions, context=tuple(content.get("context", {}).items()),
                       variants=variants, phrase_table_sha256=table.get("sha256", ""),
                       phrase_table_sources=tuple(table.get("sources", ())))
        labels = tuple((l["name"], int(l["value"]), tuple(l["prompts"])) for l in content["labels"])
        return cls(PLAIN, label_prompts=labels)


def readable_label_name(name: str) -> str | None:
    """'liver_tumour' -> 'liver tumour', 'LeftKidney' -> 'left kidney'; None when nothing readable is left."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)
    words = [w.lower() for w in re.split(r"[\s_\-.]+", spaced) if w]
    meaningful = [w for w in words if re.fullmatch(r"[a-z]{3,}", w) and w not in _GENERIC_WORDS]
    return " ".join(words) if meaningful else None


def plain_label_prompts(raw_folder: Path, dataset_json: Mapping) -> tuple[tuple[str, int, tuple[str, ...]], ...]:
    """Prompts for an ordinary nnU-Net dataset: the optional prompt table, else every label's readable name."""
    labels = {name: value for name, value in dataset_json["labels"].items() if name != "ignore"}
    foreground = {name: value for name, value in labels.items() if value != 0}
    if any(isinstance(v, (list, tuple)) for v in foreground.values()):
        raise ValueError(f"{raw_folder / 'dataset.json'}: region-based labels (lists of ids) are not supported by "
                         f"LSMSTrainer yet. Fix: train the plain label version of this dataset.")
    table_file = raw_folder / PROMPT_TABLE_FILE
    table: dict[str, list[str]] = {}
    if table_file.is_file():
        content = read_json(table_file)
        if content.get("format") != "lsms-prompts" or not isinstance(content.get("labels"), dict):
            raise ValueError(f"{table_file}: not a prompt table. Fix: write {{\"format\": \"lsms-prompts\", "
                             f"\"version\": 1, \"labels\": {{\"<label name>\": [\"phrasing\", ...]}}}}.")
        table = content["labels"]
        unknown = sorted(set(table) - set(foreground))
        if unknown:
            raise ValueError(f"{table_file}: labels {unknown} are not foreground labels of dataset.json "
                             f"({sorted(foreground)}). Fix: use the label names of dataset.json.")
        for name, phrasings in table.items():
            if (not isinstance(phrasings, list) or not phrasings
                    or not all(isinstance(p, str) and p.strip() for p in phrasings)):
                raise ValueError(f"{table_file}: label '{name}' needs a non-empty list of non-empty phrasings.")
            for phrasing in phrasings:
                if (reason := unusable_text_reason(phrasing)) is not None:
                    raise ExpressionsError(f"{table_file}: label '{name}' has a phrasing {phrasing!r} that {reason}.")
    prompts = []
    for name, value in sorted(foreground.items(), key=lambda kv: kv[1]):
        if name in table:
            phrasings = tuple(p.strip() for p in table[name])
        else:
            readable = readable_label_name(name)
            if readable is None:
                raise ValueError(f"{raw_folder / 'dataset.json'}: label '{name}' (value {value}) has no usable name "
                                 f"to turn into a text prompt. Fix: rename it in dataset.json or add a prompt table "
                                 f"{table_file} with {{\"format\": \"lsms-prompts\", \"version\": 1, \"labels\": "
                                 f"{{\"{name}\": [\"a description of it\"]}}}}.")
            phrasings = (readable,)
        prompts.append((name, int(value), phrasings))
    return tuple(prompts)


def check_label_values(dataset_file: Path, dataset_json: Mapping) -> None:
    """nnU-Net gives label value k output channel k, so values must be 0, 1, 2, ... with no gap; its own check only
    runs with --verify_dataset_integrity, after which a gap silently adds a never-trained channel. Checked here,
    before fingerprinting. Region-based labels (lists) are left to their own check."""
    labels = {name: value for name, value in dataset_json["labels"].items()
              if name != "ignore" and not isinstance(value, (list, tuple))}
    not_integers = {name: value for name, value in labels.items()
                    if isinstance(value, bool) or not isinstance(value, int)}
    if not_integers:
        raise ExpressionsError(f"{dataset_file}: labels {not_integers} are not integers. Fix: give every label an "
                               f"integer value, background 0 and the others 1, 2, 3, ...")
    values = sorted(labels.values())
    if values != list(range(len(values))):
        raise ExpressionsError(f"{dataset_file}: label values {values} are not consecutive from 0 (expected "
                               f"{list(range(len(values)))}). Fix: renumber the labels (and the label maps) to "
                               f"0, 1, 2, ... without gaps.")


def _integer_region_ids(file: Path, seg: np.ndarray) -> set[int]:
    """Region ids of a label map; a map with fractional or negative values (saved as float, resampled with linear
    interpolation) is refused rather than truncated, which would report its regions as absent."""
    values = np.unique(seg)
    bad = values[(values != np.round(values)) | (values < 0)]
    if bad.size:
        raise ExpressionsError(f"{file}: the label map holds {bad.size} non-integer or negative value(s), e.g. "
                               f"{[float(v) for v in bad[:5]]}; region ids must be whole numbers 0, 1, 2, ... "
                               f"Fix: save it as an integer image (e.g. uint8/uint16), resampled with nearest "
                               f"neighbour, never linear interpolation.")
    return {int(v) for v in values if v > 0}


def case_region_ids(raw_folder: Path, dataset_json: Mapping, cases: Sequence[str]) -> dict[str, set[int]]:
    """Region ids present in each case's label map in nnUNet_raw (what expression targets may name)."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    ending = dataset_json["file_ending"]
    files = [raw_folder / "labelsTr" / f"{case}{ending}" for case in cases]
    reader = determine_reader_writer_from_dataset_json(dict(dataset_json), str(files[0]), verbose=False)()
    regions = {}
    for case, file in tqdm(list(zip(cases, files)), desc="Reading region maps", disable=len(files) < 20):
        seg, _ = reader.read_seg(str(file))
        regions[case] = _integer_region_ids(file, seg)
    return regions


def load_prompt_set(raw_folder: Path) -> PromptSet:
    """Read and fully validate the dataset's prompts before any long work starts."""
    raw_folder = Path(raw_folder)
    dataset_json = read_json(raw_folder / "dataset.json")
    check_label_values(raw_folder / "dataset.json", dataset_json)
    expressions_file = raw_folder / EXPRESSIONS_FILE
    if not expressions_file.is_file():
        return PromptSet(PLAIN, label_prompts=plain_label_prompts(raw_folder, dataset_json))
    expressions = load_expressions(expressions_file, require_targets=True)
    context = context_labels(dataset_json, raw_folder / "dataset.json")
    refuse_context_targets(expressions, context, expressions_file)
    label_cases = sorted(p.name[: -len(dataset_json["file_ending"])] for p in (raw_folder / "labelsTr").iterdir()
                         if p.name.endswith(dataset_json["file_ending"]))
    referenced = sorted({e.case for e in expressions})
    known = set(label_cases)
    regions = case_region_ids(raw_folder, dataset_json, [c for c in referenced if c in known])
    without_context = sorted(case for case, ids in regions.items() if context and not ids & set(context.values()))
    regions.update({c: set() for c in label_cases if c not in regions})
    validate_against_cases(expressions, regions, expressions_file)
    if without_context:
        raise ExpressionsError(
            f"{raw_folder / 'dataset.json'} declares context {sorted(context)} ({CONTEXT_KEY}), but the label maps "
            f"of {len(without_context)} case(s) hold none of it, e.g. {without_context[:5]} (in "
            f"{raw_folder / 'labelsTr'}). Fix: label the anatomy in those maps, remove those cases, or drop "
            f"{CONTEXT_KEY} for the whole dataset.")
    return PromptSet(REFERRING, expressions=tuple(expressions), context=tuple(context.items()))


def context_labels(dataset_json: Mapping, dataset_file: Path | str = "dataset.json") -> dict[str, int]:
    """The context regions of a referring dataset: the labels of dataset.json that `CONTEXT_KEY` names, e.g.
    `"labels": {..., "liver": 6}, "lsms_context": ["liver"]` -> {"liver": 6}. Empty when none are declared.

    Context regions are anatomy labelled in the same maps as the lesions, under their own ids (a lesion inside an
    organ keeps its lesion id): nnU-Net resamples and crops them with everything else; they are never targets."""
    names = dataset_json.get(CONTEXT_KEY, [])
    example = f'"{CONTEXT_KEY}": ["liver"] with "liver": <its id> in "labels"'
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ExpressionsError(f"{dataset_file}: {CONTEXT_KEY} is {names!r}. Fix: list label names, e.g. {example}.")
    labels = dataset_json["labels"]
    unknown = [name for name in names
               if not (isinstance(labels.get(name), int) and not isinstance(labels.get(name), bool)
                       and labels.get(name) > 0)]
    if unknown or len(set(names)) != len(names):
        raise ExpressionsError(f"{dataset_file}: {CONTEXT_KEY} names {unknown or names}, which are not distinct "
                               f"foreground labels of \"labels\" with one integer id each. Fix: {example}.")
    return {name: labels[name] for name in names}


def refuse_context_targets(expressions: Sequence[Expression], context: Mapping[str, int], path: Path) -> None:
    """A context region is anatomy a text may speak of, never a lesion an expression refers to."""
    name_of = {label: name for name, label in context.items()}
    problems = [f"entry {index} (id {e.id!r}) targets the id(s) of context "
                f"{sorted(name_of[t] for t in set(e.targets) & set(name_of))}"
                for index, e in enumerate(expressions) if e.targets and set(e.targets) & set(name_of)]
    if problems:
        listed = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ExpressionsError(f"{path}: {listed}. Fix: give each lesion an id of its own in the label maps; an "
                               f"organ declared in {CONTEXT_KEY} cannot be referred to.")


def save_prompt_set(prompt_set: PromptSet, encoder_identity: Mapping, text_folder: Path) -> Path:
    """Record the validated prompts and the encoder used for them (atomic write)."""
    text_folder.mkdir(parents=True, exist_ok=True)
    target = text_folder / PROMPTS_FILE
    content = {"format": "lsms-prompt-set", "version": 1, "encoder": dict(encoder_identity), **prompt_set.to_dict()}
    write_json_atomically(target, content)
    return target


def read_prompt_set(text_folder: Path) -> tuple[PromptSet, dict]:
    """The prompts and encoder identity written by `LSMSv2_encode_text`; a clear error when the step was skipped."""
    file = Path(text_folder) / PROMPTS_FILE
    if not file.is_file():
        dataset = Path(text_folder).parent.name
        raise FileNotFoundError(f"{file} is missing: the text-encoding step has not been run for {dataset}. "
                                f"Fix: run `LSMSv2_encode_text -d {dataset}` after nnUNetv2_plan_and_preprocess "
                                f"(or use LSMSv2_plan_and_preprocess, which does both).")
    content = read_json(file)
    return PromptSet.from_dict(content), content["encoder"]


def read_json(path: Path) -> dict:
    """A dataset-side JSON file (dataset.json, prompt table, prompt set), every failure naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExpressionsError(f"{path}: not valid UTF-8 JSON ({error}). Fix: repair or regenerate the file.") from None
    except RecursionError:
        raise ExpressionsError(json_too_deep_message(path)) from None

"""The expressions file: which text refers to which regions of which case.

A referring dataset is an ordinary nnU-Net raw dataset plus one companion file, ``expressions.json``. Every check
runs when the file is read, so a malformed file is rejected before any long work (planning, encoding, training,
inference) starts, with one message listing every bad entry and how to fix it.
"""
from __future__ import annotations

import json
import os
import re
import sys
import unicodedata
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from text_conditioning.io import write_bytes_atomically

EXPRESSIONS_FORMAT = "lsms-expressions"
EXPRESSIONS_VERSION = 1
SUPPORTED_EXPRESSIONS_VERSIONS = (1,)
SAFE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
MAX_LISTED_PROBLEMS = 20
CATEGORY_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
SEEN_PHRASING, HELDOUT_PHRASING = "seen", "heldout"
HELDOUT_EXPRESSIONS_FILE = "expressions_heldout.json"  # at a dataset root: held-out wordings, scored, never trained
NO_TARGET_CATEGORY = "no_target"  # the category of every expression that refers to nothing, whatever its wording
PHRASINGS = (SEEN_PHRASING, HELDOUT_PHRASING)

_REQUIRED_KEYS = ("id", "case", "text")
_ALLOWED_KEYS = ("id", "case", "text", "targets", "category", "phrasing")
_SCHEMA_EXAMPLE = ('{"format": "lsms-expressions", "version": 1, "expressions": [{"id": "liver_003-e0", '
                   '"case": "liver_003", "text": "the largest cyst in the right lobe", "targets": [2]}]}')


class ExpressionsError(ValueError):
    """An expressions file (or a list of expressions) that cannot be used as it is."""


_ORDINARY_WHITESPACE = frozenset(" \t\n\r")


def unusable_text_reason(text: str) -> str | None:
    """Why ``text`` cannot be a prompt, or None when it can.

    A text made of control characters ("\\u0000", ANSI colour codes pasted from a terminal), invisible format
    characters (zero-width spaces) or symbols only (emoji) encodes to an effectively empty sentence, and the
    network would still answer it with a mask: such texts are refused like empty ones.
    """
    surrogates = sorted({char for char in text if unicodedata.category(char) == "Cs"})
    if surrogates:
        listed = ", ".join(f"U+{ord(char):04X}" for char in surrogates[:5])
        return (f"contains lone surrogate code point(s) {listed} (half of a character pair, not text; often from a "
                "broken \\uD8xx escape). Fix: write the intended character itself")
    controls = sorted({char for char in text if unicodedata.category(char) == "Cc"} - _ORDINARY_WHITESPACE)
    if controls:
        listed = ", ".join(f"U+{ord(char):04X}" for char in controls[:5])
        return (f"contains control character(s) {listed} (e.g. a NUL byte or a terminal colour code). Fix: remove "
                "them; only ordinary spaces, tabs and line breaks are allowed")
    visible = "".join(char for char in text if unicodedata.category(char) != "Cf")
    if not any(unicodedata.category(char)[0] in "LN" for char in visible):
        return ("has no letter or digit (only spaces, invisible characters, punctuation or symbols such as emoji). "
                "Fix: write the expression in words")
    return None


@dataclass(frozen=True)
class Expression:
    """One referring expression. ``targets`` is None when unknown (inference files may omit it).

    ``category`` (e.g. "size", "no_target") and ``phrasing`` ("heldout" for wordings never used in training) only
    group expressions in evaluation reports; training and inference ignore them. None means absent from the file.
    """

    id: str
    case: str
    text: str
    targets: tuple[int, ...] | None
    category: str | None = None
    phrasing: str | None = None


def expression_to_dict(expression: Expression) -> dict[str, Any]:
    """The JSON form of one expression; ``targets``, ``category`` and ``phrasing`` are left out when absent."""
    entry: dict[str, Any] = {"id": expression.id, "case": expression.case, "text": expression.text}
    if expression.targets is not None:
        entry["targets"] = list(expression.targets)
    for key in ("category", "phrasing"):
        if getattr(expression, key) is not None:
            entry[key] = getattr(expression, key)
    return entry


def expression_from_dict(entry: Mapping[str, Any]) -> Expression:
    """The expression of one already checked JSON entry (the inverse of expression_to_dict)."""
    return Expression(id=entry["id"], case=entry["case"], text=entry["text"],
                      targets=tuple(entry["targets"]) if "targets" in entry else None,
                      category=entry.get("category"), phrasing=entry.get("phrasing"))


def _format_problems(header: str, problems: Sequence[str]) -> str:
    """One message listing at most MAX_LISTED_PROBLEMS problems, saying how many more were left out."""
    listed = [f"  - {problem}" for problem in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        listed.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more problem(s) of the same kind.")
    return "\n".join([header, *listed])


def _describe_entry(index: int, entry: Any) -> str:
    """'entry 3 (id "liver_003-e0")', so the user can find the entry with or without a usable id."""
    if isinstance(entry, dict) and isinstance(entry.get("id"), str):
        return f"entry {index} (id {entry['id']!r})"
    return f"entry {index} (no usable id)"


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _entry_problems(index: int, entry: Any, require_targets: bool) -> list[str]:
    """Everything wrong with one entry, each with its fix."""
    where = _describe_entry(index, entry)
    if not isinstance(entry, dict):
        return [f"{where} is a {type(entry).__name__}, not an object. Fix: write each expression as "
                f'{{"id": ..., "case": ..., "text": ..., "targets": [...]}}.']
    problems = []
    required = _REQUIRED_KEYS + (("targets",) if require_targets else ())
    missing = [key for key in required if key not in entry]
    if missing:
        fix = "add them"
        if "targets" in missing:
            fix += ' ("targets" lists the region ids the text refers to; [] means it refers to nothing here)'
        problems.append(f"{where} lacks key(s) {', '.join(missing)}. Fix: {fix}.")
    unknown = sorted(set(entry) - set(_ALLOWED_KEYS))
    if unknown:
        problems.append(f"{where} has unknown key(s) {', '.join(unknown)}. Fix: remove them or correct the "
                        f"spelling; allowed keys are {', '.join(_ALLOWED_KEYS)}.")
    if "id" in entry:
        expression_id = entry["id"]
        if not isinstance(expression_id, str) or not SAFE_ID_PATTERN.match(expression_id):
            problems.append(f"{where} has an unsafe id {expression_id!r}: it names the output file. Fix: use 1-200 "
                            "characters from letters, digits, '.', '_' and '-', starting with a letter or digit.")
    if "case" in entry:
        case = entry["case"]
        if not isinstance(case, str) or not case.strip():
            problems.append(f"{where} has case {case!r}. Fix: set it to the case identifier of an image "
                            "(e.g. 'liver_003' for imagesTr/liver_003_0000.nii.gz).")
    if "text" in entry:
        text = entry["text"]
        if not isinstance(text, str):
            problems.append(f"{where} has a {type(text).__name__} as text. Fix: write the expression as a string.")
        elif not text.strip():
            problems.append(f"{where} has an empty text. Fix: write the expression, or remove the entry.")
        elif (reason := unusable_text_reason(text)) is not None:
            problems.append(f"{where} has a text that {reason}.")
    if "targets" in entry:
        targets = entry["targets"]
        if not isinstance(targets, list) or not all(_is_positive_int(target) for target in targets):
            problems.append(f"{where} has targets {targets!r}. Fix: use a list of positive region ids, e.g. [1, 3], "
                            "or [] when the text refers to no region of this case.")
        elif len(set(targets)) != len(targets):
            repeated = sorted({target for target in targets if targets.count(target) > 1})
            problems.append(f"{where} repeats target id(s) {repeated}. Fix: list each region id once.")
    return problems + _label_problems(where, entry)


def _label_problems(where: str, entry: dict) -> list[str]:
    """The optional report labels: a category groups expressions in summaries, so it must be a plain identifier."""
    problems = []
    if "category" in entry and not (isinstance(entry["category"], str) and CATEGORY_PATTERN.match(entry["category"])):
        problems.append(f"{where} has category {entry['category']!r}. Fix: use a short lowercase identifier (letters, "
                        "digits, '_', starting with a letter, at most 40 characters), e.g. \"size\", or leave it out.")
    if "phrasing" in entry and entry["phrasing"] not in PHRASINGS:
        problems.append(f"{where} has phrasing {entry['phrasing']!r}. Fix: use one of {', '.join(PHRASINGS)}, or leave "
                        f"it out (absent means {SEEN_PHRASING!r}).")
    return problems


def _duplicate_id_problems(entries: Sequence[Any]) -> list[str]:
    """Ids name output files, so two entries with one id would overwrite each other's result."""
    first_index_of_id: dict[str, int] = {}
    problems = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        expression_id = entry["id"]
        if expression_id in first_index_of_id:
            problems.append(f"entry {index} (id {expression_id!r}) repeats the id of entry "
                            f"{first_index_of_id[expression_id]}. Fix: give every expression a unique id.")
        else:
            first_index_of_id[expression_id] = index
    return problems


def _expressions_from_entries(entries: Sequence[Any], source: str, require_targets: bool) -> list[Expression]:
    """Check every entry, report all problems in one error, and build the expressions."""
    problems = []
    for index, entry in enumerate(entries):
        problems.extend(_entry_problems(index, entry, require_targets))
    problems.extend(_duplicate_id_problems(entries))
    if problems:
        raise ExpressionsError(_format_problems(f"Expressions file {source} has {len(problems)} problem(s):",
                                               problems))
    return [expression_from_dict(entry) for entry in entries]


def json_too_deep_message(path: str | os.PathLike) -> str:
    """Python's JSON reader recurses once per nesting level and dies with a bare RecursionError on a pathologically
    nested file (damaged or malicious): this message names the file instead."""
    return (f"{path} nests JSON arrays/objects too deeply to be read (over ~{sys.getrecursionlimit()} levels). Fix: "
            "repair or regenerate the file; a valid one nests only a few levels.")


def _read_document(path: Path) -> Any:
    """The parsed JSON of the file, or an error naming the file, what is wrong and the fix."""
    if path.is_dir():
        raise ExpressionsError(f"Expressions file {path} is a folder. Fix: point to the file itself, e.g. "
                               f"{path / 'expressions.json'}.")
    if not path.is_file():
        raise ExpressionsError(f"Expressions file {path} does not exist. Fix: create it (format: {_SCHEMA_EXAMPLE}) "
                               "or point to the right folder.")
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise ExpressionsError(f"Expressions file {path} is not UTF-8 text (bad byte at line {line}, byte offset "
                               f"{error.start}). Fix: save the file with UTF-8 encoding.") from error
    try:
        return json.loads(content, object_pairs_hook=lambda pairs: _object_without_duplicate_keys(pairs, path))
    except json.JSONDecodeError as error:
        raise ExpressionsError(f"Expressions file {path} is not valid JSON: {error.msg} at line {error.lineno}, "
                               f"column {error.colno}. Fix: correct the JSON syntax there.") from error
    except RecursionError:
        raise ExpressionsError(f"Expressions file {json_too_deep_message(path)}") from None


def _object_without_duplicate_keys(pairs: list[tuple[str, Any]], path: Path) -> dict:
    """A JSON object as a dict, refused when a key repeats: Python's json would silently keep the last value."""
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        entry = dict(pairs).get("id")
        where = f"the entry with id {entry!r}" if isinstance(entry, str) else "an object"
        raise ExpressionsError(f"Expressions file {path}: {where} has the key(s) {repeated} more than once (JSON "
                               f"keeps only the last). Fix: keep one of each.")
    return dict(pairs)


def load_expressions(path: str | os.PathLike, require_targets: bool = True) -> list[Expression]:
    """Read and fully check an expressions file.

    Training needs ``targets`` (``require_targets=True``); at inference they are optional (``False``) and, where
    present, still checked and kept so that the same file can be used for evaluation.
    """
    path = Path(path)
    document = _read_document(path)
    if not isinstance(document, dict):
        raise ExpressionsError(f"Expressions file {path} holds a {type(document).__name__} at the top level. "
                               f"Fix: use the format {_SCHEMA_EXAMPLE}.")
    if document.get("format") != EXPRESSIONS_FORMAT:
        raise ExpressionsError(f"Expressions file {path} has format {document.get('format')!r}, expected "
                               f'{EXPRESSIONS_FORMAT!r}. Fix: set "format": "{EXPRESSIONS_FORMAT}" at the top level.')
    version = document.get("version")
    if type(version) is not int or version not in SUPPORTED_EXPRESSIONS_VERSIONS:
        found = "no version" if "version" not in document else f"version {version!r}"
        supported = ", ".join(str(supported) for supported in SUPPORTED_EXPRESSIONS_VERSIONS)
        raise ExpressionsError(f"Expressions file {path} has {found}; this LSMS supports version(s) {supported}. "
                               f'Fix: set "version": {EXPRESSIONS_VERSION} and follow that schema.')
    entries = document.get("expressions")
    if not isinstance(entries, list):
        raise ExpressionsError(f'Expressions file {path} has no "expressions" list. Fix: put the expressions in a '
                               f"list under the key \"expressions\" (format: {_SCHEMA_EXAMPLE}).")
    if not entries:
        raise ExpressionsError(f'Expressions file {path} has an empty "expressions" list. Fix: add at least one '
                               "expression.")
    return _expressions_from_entries(entries, str(path), require_targets)


def save_expressions(path: str | os.PathLike, expressions: Iterable[Expression]) -> None:
    """Write expressions in the file format, atomically; refuses to write a file that load_expressions would reject."""
    entries = [expression_to_dict(expression) for expression in expressions]
    _expressions_from_entries(entries, f"{path} (not written)", require_targets=False)
    document = {"format": EXPRESSIONS_FORMAT, "version": EXPRESSIONS_VERSION, "expressions": entries}
    text = json.dumps(document, ensure_ascii=False, indent=1) + "\n"
    write_bytes_atomically(path, text.encode("utf-8"))


def validate_against_cases(expressions: Iterable[Expression], case_regions: Mapping[str, Collection[int]],
                           path: str | os.PathLike) -> None:
    """Check that every expression names a known case and only region ids present in that case's region map.

    ``case_regions`` maps each case to the region ids of its map (background 0 may be included; it is never a valid
    target). ``path`` is the expressions file, named in the error.
    """
    problems = []
    known_cases = sorted(case_regions)
    for index, expression in enumerate(expressions):
        where = f"entry {index} (id {expression.id!r})"
        if expression.case not in case_regions:
            examples = ", ".join(repr(case) for case in known_cases[:5])
            more = f" and {len(known_cases) - 5} more" if len(known_cases) > 5 else ""
            problems.append(f"{where} refers to unknown case {expression.case!r}; known cases: "
                            f"{examples or 'none'}{more}. Fix: correct the case name or add the image and its map.")
            continue
        if expression.targets is None:
            continue
        present = sorted(int(region) for region in case_regions[expression.case] if int(region) != 0)
        absent = [target for target in expression.targets if target not in present]
        if absent:
            problems.append(f"{where} targets region id(s) {absent} absent from the region map of case "
                            f"{expression.case!r}, which holds {present or 'no regions'}. Fix: use region ids "
                            "present in that case's label map.")
    if problems:
        raise ExpressionsError(_format_problems(
            f"Expressions file {path} does not match the dataset's cases ({len(problems)} problem(s)):", problems))


def expressions_by_case(expressions: Iterable[Expression]) -> dict[str, list[Expression]]:
    """Group expressions by case, keeping file order, so each image is processed once for all its expressions."""
    grouped: dict[str, list[Expression]] = {}
    for expression in expressions:
        grouped.setdefault(expression.case, []).append(expression)
    return grouped

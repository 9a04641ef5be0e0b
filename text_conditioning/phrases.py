"""The phrase table: radiology wordings that mean the same thing, used to vary the training expressions.

A text encoder trained on general text does not place "hepatoma" near "HCC" or "secondary deposit" near
"metastasis", so a model trained on one wording answers the other as an unknown word. The phrase table holds groups of
interchangeable phrases; the text-encoding step rewrites each training expression with them (one phrase swapped for
another of its group per variant) and encodes the variants, the network is trained on them beside the original text,
and the case-level stage is fitted on them too. A phrase that appears only in the table, never in the training
expressions, is then read like the phrase it stands for.

The project ships `radiology_phrases.json` (English, lesion kinds, attenuation and enhancement words, size words);
users add their own tables (`--phrase_table shipped my_phrases.json`). Format:
``{"format": "lsms-phrase-table", "version": 1, "groups": [["metastasis", "secondary deposit", ...], ...]}``.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

PHRASE_TABLE_FORMAT = "lsms-phrase-table"
SHIPPED = "shipped"  # the name of the project's own table on the command line
NONE = "none"  # no table: train on the expressions as written
SHIPPED_TABLE = Path(__file__).with_name("radiology_phrases.json")
_EXAMPLE = '{"format": "lsms-phrase-table", "version": 1, "groups": [["metastasis", "secondary deposit"]]}'


class PhraseTableError(ValueError):
    """A phrase table that cannot be used as it is."""


def _normalised(phrase: str) -> str:
    return " ".join(phrase.lower().split())


@dataclass(frozen=True)
class PhraseTable:
    """Groups of interchangeable phrases (lower case, single spaces), and where they came from."""

    groups: tuple[tuple[str, ...], ...]
    sources: tuple[str, ...] = ()

    @property
    def sha256(self) -> str:
        """What the variants of a dataset were made from (recorded beside them)."""
        return hashlib.sha256(json.dumps(self.groups).encode("utf-8")).hexdigest()

    def variants(self, text: str, limit: int) -> list[str]:
        """Up to `limit` rewrites of `text`, each with one table phrase swapped for another of its group (whole words,
        any case; the longest phrase wins where phrases overlap): one swap of each phrase the text holds before a
        second of any, the alternatives of each taken from a place that depends on the text. Deterministic: the same
        text and table give the same variants."""
        if limit <= 0 or not self.groups:
            return []
        seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "little")
        options = []
        for start, end, group in self._phrase_spans(text):
            others = [other for other in self.groups[group] if other != _normalised(text[start:end])]
            turn = seed % len(others)
            options.append([text[:start] + other + text[end:] for other in others[turn:] + others[:turn]])
        ordered = [o[round_] for round_ in range(max((len(o) for o in options), default=0))
                   for o in options if round_ < len(o)]
        return list(dict.fromkeys(v for v in ordered if v != text))[:limit]

    def _phrase_spans(self, text: str) -> list[tuple[int, int, int]]:
        """(start, end, group) of each table phrase in `text`, non-overlapping, the longest first."""
        lowered = text.lower()
        found = []
        for group, phrases in enumerate(self.groups):
            for phrase in phrases:
                pattern = r"(?<![\w'-])" + r"\s+".join(map(re.escape, phrase.split())) + r"(?![\w'-])"
                found += [(m.start(), m.end(), group) for m in re.finditer(pattern, lowered)]
        taken: list[tuple[int, int, int]] = []
        for start, end, group in sorted(found, key=lambda s: (-(s[1] - s[0]), s[0])):
            if all(end <= s or start >= e for s, e, _ in taken):
                taken.append((start, end, group))
        return sorted(taken)


def read_phrase_table(path: str | Path) -> PhraseTable:
    """One table file, every problem naming the file, the group and the fix."""
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PhraseTableError(f"{path}: no such phrase table. Fix: give an existing JSON file, '{SHIPPED}' for the "
                               f"project's table or '{NONE}'.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PhraseTableError(f"{path}: not a readable UTF-8 JSON phrase table ({error}). Fix: write {_EXAMPLE}.") \
            from None
    if not isinstance(content, dict) or content.get("format") != PHRASE_TABLE_FORMAT or \
            not isinstance(content.get("groups"), list):
        raise PhraseTableError(f"{path}: expected a JSON object with \"format\": \"{PHRASE_TABLE_FORMAT}\" and a "
                               f"list of \"groups\". Fix: write {_EXAMPLE}.")
    groups = []
    for index, group in enumerate(content["groups"]):
        if not isinstance(group, list) or len(group) < 2 or not all(isinstance(p, str) and p.strip() for p in group):
            raise PhraseTableError(f"{path}: group {index} is {group!r}; a group lists two or more non-empty phrases "
                                   f"that mean the same, e.g. [\"metastasis\", \"secondary deposit\"].")
        phrases = tuple(dict.fromkeys(_normalised(p) for p in group))
        if len(phrases) < 2:
            raise PhraseTableError(f"{path}: group {index} ({group!r}) names one phrase only (case and spaces are "
                                   f"ignored). Fix: add a phrase that means the same, or remove the group.")
        groups.append(phrases)
    return PhraseTable(tuple(groups), (str(path),))


def load_phrase_tables(names: Sequence[str]) -> PhraseTable:
    """The tables named on a command line (`shipped`, `none` or files), merged: groups that share a phrase become one
    group, so a user's table extends the shipped one with ["metastasis", "met"]."""
    if list(names) == [NONE]:
        return PhraseTable(())
    if NONE in names:
        raise PhraseTableError(f"--phrase_table {' '.join(names)}: '{NONE}' cannot be combined with other tables. "
                               f"Fix: give '{NONE}' alone, or only the tables to use.")
    tables = [read_phrase_table(SHIPPED_TABLE if name == SHIPPED else name) for name in names]
    merged: list[list[str]] = []
    for group in (group for table in tables for group in table.groups):
        joined = [m for m in merged if set(m) & set(group)]
        union = list(dict.fromkeys([phrase for m in joined for phrase in m] + list(group)))
        merged = [m for m in merged if m not in joined] + [union]
    return PhraseTable(tuple(tuple(group) for group in merged), tuple(s for table in tables for s in table.sources))

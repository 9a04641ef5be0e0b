"""The expressions file: every malformed input is rejected with the file, the entry and the fix."""
import json
import os
from pathlib import Path

import pytest

from text_conditioning.expressions import (
    EXPRESSIONS_FORMAT,
    EXPRESSIONS_VERSION,
    Expression,
    ExpressionsError,
    expression_to_dict,
    expressions_by_case,
    load_expressions,
    save_expressions,
    validate_against_cases,
)


def _entry(expression_id="liver_003-e0", case="liver_003", text="the largest cyst in the right lobe", targets=(2,)):
    entry = {"id": expression_id, "case": case, "text": text}
    if targets is not None:
        entry["targets"] = list(targets)
    return entry


def _write(path: Path, entries, **top_level) -> Path:
    document = {"format": EXPRESSIONS_FORMAT, "version": EXPRESSIONS_VERSION, "expressions": entries}
    document.update(top_level)
    path.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    return path


def _error_of(path: Path, require_targets: bool = True) -> str:
    with pytest.raises(ExpressionsError) as caught:
        load_expressions(path, require_targets=require_targets)
    return str(caught.value)


def test_load_valid_file_keeps_order_and_values(tmp_path):
    path = _write(tmp_path / "expressions.json", [
        _entry(), _entry("liver_003-e1", text="all metastases", targets=(1, 4)),
        _entry("liver_004-e0", case="liver_004", text="the lesion in the left lobe", targets=())])
    expressions = load_expressions(path)
    assert expressions == [
        Expression("liver_003-e0", "liver_003", "the largest cyst in the right lobe", (2,)),
        Expression("liver_003-e1", "liver_003", "all metastases", (1, 4)),
        Expression("liver_004-e0", "liver_004", "the lesion in the left lobe", ()),
    ]
    assert len({*expressions, *expressions}) == 3  # hashable, equal by value
    with pytest.raises(AttributeError):
        expressions[0].text = "changed"  # immutable


def test_missing_file_names_file_and_fix(tmp_path):
    message = _error_of(tmp_path / "nowhere.json")
    assert "nowhere.json" in message and "does not exist" in message and "Fix" in message


def test_non_utf8_file_is_rejected(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('{"text": "lésion"}'.encode("latin-1"))
    message = _error_of(path)
    assert "latin1.json" in message and "not UTF-8" in message and "line 1" in message and "UTF-8 encoding" in message


def test_invalid_json_reports_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"format": "lsms-expressions",\n "version": 1,\n "expressions": [,]}', encoding="utf-8")
    message = _error_of(path)
    assert "broken.json" in message and "not valid JSON" in message and "line 3" in message and "column" in message


def test_top_level_must_be_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[]", encoding="utf-8")
    assert "holds a list at the top level" in _error_of(path)


def test_wrong_format_is_rejected(tmp_path):
    message = _error_of(_write(tmp_path / "e.json", [_entry()], format="refcoco"))
    assert "e.json" in message and "'refcoco'" in message and '"format": "lsms-expressions"' in message


@pytest.mark.parametrize("version, described", [(2, "version 2"), ("1", "version '1'"), (True, "version True"),
                                                (None, "no version")])
def test_wrong_or_missing_version_says_which_are_supported(tmp_path, version, described):
    path = _write(tmp_path / "e.json", [_entry()])
    document = json.loads(path.read_text(encoding="utf-8"))
    if version is None:
        del document["version"]
    else:
        document["version"] = version
    path.write_text(json.dumps(document), encoding="utf-8")
    message = _error_of(path)
    assert "e.json" in message and described in message and "supports version(s) 1" in message
    assert '"version": 1' in message


def test_expressions_list_missing_or_empty(tmp_path):
    path = tmp_path / "e.json"
    path.write_text(json.dumps({"format": EXPRESSIONS_FORMAT, "version": 1}), encoding="utf-8")
    assert 'no "expressions" list' in _error_of(path)
    _write(path, [])
    assert "empty" in _error_of(path) and "add at least one" in _error_of(path)


def test_missing_and_unknown_keys_name_the_entry(tmp_path):
    path = _write(tmp_path / "e.json", [_entry(), {"id": "liver_003-e1", "case": "liver_003", "txt": "a cyst"}])
    message = _error_of(path)
    assert "e.json" in message
    assert "entry 1 (id 'liver_003-e1') lacks key(s) text, targets" in message and "add them" in message
    assert "unknown key(s) txt" in message and "correct the spelling" in message


def test_non_object_entry(tmp_path):
    message = _error_of(_write(tmp_path / "e.json", ["just a text"]))
    assert "entry 0 (no usable id) is a str, not an object" in message


def test_duplicate_id_names_both_entries(tmp_path):
    message = _error_of(_write(tmp_path / "e.json", [_entry(), _entry(text="another text")]))
    assert "entry 1 (id 'liver_003-e0') repeats the id of entry 0" in message and "unique id" in message


def test_a_lone_surrogate_escape_is_refused_before_encoding(tmp_path):
    """"\\ud800" is valid JSON but no text: it would pass and then fail deep in the text cache's UTF-8 write."""
    path = tmp_path / "expressions.json"
    path.write_text('{"format": "lsms-expressions", "version": 1, "expressions": [{"id": "a", "case": "liver_003", '
                    '"text": "\\ud800 the cyst", "targets": [1]}]}', encoding="utf-8")
    message = _error_of(path)
    assert "entry 0 (id 'a')" in message and "lone surrogate code point(s) U+D800" in message and "Fix:" in message


def test_a_key_given_twice_in_one_entry_is_refused(tmp_path):
    """Python's json keeps the last of repeated keys: {"id": "a", "id": "b"} would silently become id "b"."""
    path = tmp_path / "expressions.json"
    path.write_text('{"format": "lsms-expressions", "version": 1, "expressions": [{"id": "a", "case": "liver_003", '
                    '"text": "the cyst", "id": "b", "targets": [1]}]}', encoding="utf-8")
    message = _error_of(path)
    assert "expressions.json: the entry with id 'b' has the key(s) ['id'] more than once" in message
    assert "Fix: keep one of each" in message


@pytest.mark.parametrize("unsafe_id", ["../escape", "with space", "", "-leading-dash", "a" * 201, 7, "a/b"])
def test_unsafe_id_is_rejected(tmp_path, unsafe_id):
    message = _error_of(_write(tmp_path / "e.json", [_entry(expression_id=unsafe_id)]))
    assert f"unsafe id {unsafe_id!r}" in message and "letters, digits" in message


@pytest.mark.parametrize("text, complaint", [("", "empty text"), ("  \t\n", "empty text"),
                                             (None, "NoneType as text"), (["a", "list"], "list as text")])
def test_empty_or_non_string_text_is_rejected(tmp_path, text, complaint):
    message = _error_of(_write(tmp_path / "e.json", [_entry(text=text)]))
    assert "entry 0 (id 'liver_003-e0')" in message and complaint in message and "Fix" in message


def test_empty_case_is_rejected(tmp_path):
    message = _error_of(_write(tmp_path / "e.json", [_entry(case=" ")]))
    assert "entry 0 (id 'liver_003-e0') has case ' '" in message and "case identifier" in message


@pytest.mark.parametrize("targets", [[0], [-1], [1.5], ["2"], [True], "1", {"1": 1}])
def test_targets_must_be_positive_integers(tmp_path, targets):
    path = _write(tmp_path / "e.json", [{**_entry(), "targets": targets}])
    message = _error_of(path)
    assert "entry 0 (id 'liver_003-e0') has targets" in message and "list of positive region ids" in message


def test_duplicated_targets_are_rejected(tmp_path):
    message = _error_of(_write(tmp_path / "e.json", [_entry(targets=(2, 3, 2))]))
    assert "repeats target id(s) [2]" in message and "each region id once" in message


def test_targets_required_for_training_optional_for_inference(tmp_path):
    path = _write(tmp_path / "e.json", [_entry(targets=None), _entry("liver_003-e1", targets=(1,))])
    assert "lacks key(s) targets" in _error_of(path, require_targets=True)
    expressions = load_expressions(path, require_targets=False)
    assert [expression.targets for expression in expressions] == [None, (1,)]


def test_all_entry_errors_are_reported_together_and_capped(tmp_path):
    entries = [_entry(expression_id=f"bad id {index}") for index in range(25)] + [_entry(text="")]
    message = _error_of(_write(tmp_path / "e.json", entries))
    assert "26 problem(s)" in message
    assert "entry 0 (id 'bad id 0')" in message and "entry 19 (id 'bad id 19')" in message
    assert "entry 20 (id" not in message
    assert "and 6 more problem(s)" in message


def test_save_then_load_round_trip_is_atomic_and_utf8(tmp_path):
    expressions = [Expression("c1-e0", "c1", "la lésion la plus grande 病变", (1, 2)),
                   Expression("c1-e1", "c1", "nothing here", ()),
                   Expression("c2-e0", "c2", "unknown targets", None)]
    path = tmp_path / "sub" / "expressions.json"
    save_expressions(path, expressions)
    raw = path.read_text(encoding="utf-8")
    assert "病变" in raw and "\n \"format\"" in raw  # ensure_ascii=False, indent 1
    assert load_expressions(path, require_targets=False) == expressions
    assert sorted(os.listdir(path.parent)) == ["expressions.json"]  # no temporary file left behind


def test_save_refuses_invalid_expressions_and_keeps_existing_file(tmp_path):
    path = tmp_path / "expressions.json"
    save_expressions(path, [Expression("c1-e0", "c1", "a cyst", (1,))])
    before = path.read_bytes()
    with pytest.raises(ExpressionsError) as caught:
        save_expressions(path, [Expression("c1-e0", "c1", "a cyst", (1,)), Expression("c1-e0", "c1", "b", (2,))])
    assert "not written" in str(caught.value) and "repeats the id of entry 0" in str(caught.value)
    assert path.read_bytes() == before


def test_expression_to_dict_omits_unknown_targets():
    assert expression_to_dict(Expression("a", "c", "t", (3,))) == {"id": "a", "case": "c", "text": "t",
                                                                    "targets": [3]}
    assert expression_to_dict(Expression("a", "c", "t", None)) == {"id": "a", "case": "c", "text": "t"}


def test_validate_against_cases_accepts_matching_dataset():
    expressions = [Expression("c1-e0", "c1", "a", (1, 2)), Expression("c1-e1", "c1", "b", ()),
                   Expression("c2-e0", "c2", "c", None)]
    validate_against_cases(expressions, {"c1": {0, 1, 2}, "c2": []}, "expressions.json")


def test_validate_against_cases_reports_unknown_case_and_absent_targets():
    cases = {f"case_{index:02d}": {1, 2} for index in range(8)}
    expressions = [Expression("x-e0", "liver_999", "a", (1,)), Expression("y-e0", "case_00", "b", (2, 5, 0))]
    with pytest.raises(ExpressionsError) as caught:
        validate_against_cases(expressions, cases, "/data/expressions.json")
    message = str(caught.value)
    assert "/data/expressions.json" in message and "2 problem(s)" in message
    assert "entry 0 (id 'x-e0') refers to unknown case 'liver_999'" in message
    assert "'case_00', 'case_01', 'case_02', 'case_03', 'case_04' and 3 more" in message
    assert "entry 1 (id 'y-e0') targets region id(s) [5, 0]" in message and "which holds [1, 2]" in message
    assert "Fix: use region ids present" in message


def test_expressions_by_case_groups_in_file_order():
    expressions = [Expression("a", "c2", "t", ()), Expression("b", "c1", "t", ()), Expression("c", "c2", "u", ())]
    grouped = expressions_by_case(expressions)
    assert list(grouped) == ["c2", "c1"]
    assert [expression.id for expression in grouped["c2"]] == ["a", "c"]


def test_category_and_phrasing_are_optional_and_round_trip(tmp_path):
    expressions = [Expression("c1-e0", "c1", "the largest cyst", (1,), category="size"),
                   Expression("c1-e1-h", "c1", "the most sizeable cyst", (1,), category="size", phrasing="heldout"),
                   Expression("c1-e2", "c1", "all lesions", (1, 2))]
    path = tmp_path / "expressions.json"
    save_expressions(path, expressions)
    entries = json.loads(path.read_text(encoding="utf-8"))["expressions"]
    assert entries[0]["category"] == "size" and "phrasing" not in entries[0]
    assert entries[1]["phrasing"] == "heldout"
    assert "category" not in entries[2] and "phrasing" not in entries[2]  # absent stays absent
    assert load_expressions(path) == expressions
    assert Expression("a", "c", "t", (1,)).category is None  # the four-field form still works


@pytest.mark.parametrize("key, value, complaint", [
    ("category", "Size", "short lowercase identifier"),
    ("category", "size rank", "short lowercase identifier"),
    ("category", 3, "short lowercase identifier"),
    ("category", "x" * 41, "short lowercase identifier"),
    ("phrasing", "unseen", "seen, heldout"),
])
def test_bad_category_or_phrasing_is_rejected(tmp_path, key, value, complaint):
    path = _write(tmp_path / "expressions.json", [{**_entry(), key: value}])
    message = _error_of(path)
    assert f"has {key} {value!r}" in message and complaint in message and "Fix" in message


@pytest.mark.parametrize("text, expected", [
    ("\u0000", "control character(s) U+0000"),
    ("\x1b[31mthe cyst\x1b[0m", "control character(s) U+001B"),
    ("\u200b\u200b", "no letter or digit"),
    ("\u200b \ufeff", "no letter or digit"),
    ("\U0001F600\U0001F525", "no letter or digit"),
    ("?!", "no letter or digit"),
])
def test_texts_without_usable_content_are_rejected(tmp_path, text, expected):
    message = _error_of(_write(tmp_path / "expressions.json", [_entry(text=text)]))
    assert "entry 0 (id 'liver_003-e0')" in message and expected in message and "Fix:" in message


def test_ordinary_whitespace_and_non_latin_letters_are_kept(tmp_path):
    texts = ["the cyst\tin the\nleft lobe", "肝臓の嚢胞", "lesion 2 \u200bin the right lobe"]
    path = _write(tmp_path / "expressions.json", [_entry(f"e{i}", text=t) for i, t in enumerate(texts)])
    assert [e.text for e in load_expressions(path)] == texts


def test_deeply_nested_json_names_the_file_instead_of_a_recursion_error(tmp_path):
    path = tmp_path / "expressions.json"
    path.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    message = _error_of(path)
    assert str(path) in message and "too deeply" in message and "Fix:" in message


def test_expressions_path_that_is_a_folder_says_so(tmp_path):
    assert "is a folder. Fix: point to the file itself" in _error_of(tmp_path)

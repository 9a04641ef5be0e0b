"""Console entries: an expected error is its message alone on stderr (exit code 1); a bug keeps its traceback."""
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lsms_nnunet.cli import TRACEBACK_ENV, console_entry
from text_conditioning.expressions import ExpressionsError

REPOSITORY = Path(__file__).resolve().parents[1]
WRAPPER_CODE = console_entry(lambda: None).__code__  # the code object every wrapped entry runs


def test_expected_error_prints_the_message_alone_and_exits_1(monkeypatch, capsys):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/LSMSv2_example"])

    @console_entry
    def entry() -> None:
        raise ExpressionsError("expressions.json: entry 0 is wrong. Fix: correct it.")

    with pytest.raises(SystemExit) as exit_info:
        entry()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "LSMSv2_example: error: expressions.json: entry 0 is wrong. Fix: correct it.\n"


def test_unexpected_error_and_traceback_request_keep_the_traceback(monkeypatch):
    @console_entry
    def buggy() -> None:
        raise ZeroDivisionError("a bug")

    @console_entry
    def expected() -> None:
        raise ExpressionsError("bad file")

    with pytest.raises(ZeroDivisionError):
        buggy()
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(ExpressionsError):
        expected()


def test_every_console_script_is_wrapped():
    scripts = re.findall(r'"(LSMSv2_\w+)=([\w.]+):(\w+)"', (REPOSITORY / "setup.py").read_text(encoding="utf-8"))
    assert len(scripts) >= 16
    unwrapped = [name for name, module, function in scripts
                 if getattr(importlib.import_module(module), function).__code__ is not WRAPPER_CODE]
    assert not unwrapped


def test_real_entry_without_traceback(tmp_path):
    """LSMSv2_plan_and_preprocess on a dataset with a label gap: the message alone, before nnU-Net starts."""
    raw = tmp_path / "nnUNet_raw" / "Dataset901_Gap"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 2},
                                                  "numTraining": 0, "file_ending": ".nii.gz"}))
    code = ("import sys; from lsms_nnunet.preprocessing.encode_text import plan_and_preprocess_entry; "
            "sys.argv = ['LSMSv2_plan_and_preprocess', '-d', '901']; plan_and_preprocess_entry()")
    folders = {name: str(tmp_path / name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **folders, "PYTHONPATH": str(REPOSITORY)})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("LSMSv2_plan_and_preprocess: error: ") and "not consecutive" in result.stderr

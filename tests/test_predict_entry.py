"""`LSMSv2_predict`'s own flags are checked before nnU-Net starts (no model needed)."""
import sys

import pytest

from lsms_nnunet.inference import predict_entry as entry


@pytest.mark.parametrize("text", ["\u0000", "\u200b", "\U0001F600", "\x1b[0m"])
def test_unusable_text_is_refused_before_prediction(monkeypatch, text):
    monkeypatch.setattr(sys, "argv", ["LSMSv2_predict", "-i", "in", "-o", "out", "-d", "1", "--text", text])
    with pytest.raises(SystemExit) as caught:
        entry.predict_entry()
    assert str(caught.value).startswith("--text ") and "Fix:" in str(caught.value)


def test_expressions_option_pointing_to_a_folder_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["LSMSv2_predict", "-i", "in", "-o", "out", "-d", "1", "-e", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"is a folder\. Fix: point -e at the expressions file itself, e\.g\. -e "
                                         r".*expressions\.json"):
        entry.predict_entry()

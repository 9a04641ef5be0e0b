"""The plugin reads checkpoints with `weights_only=True`: data loads, code in a shared model file does not run."""
import os
import pickle

import numpy as np
import pytest
import torch

from lsms_nnunet.network.config import LSMSConfig
from lsms_nnunet.network.prompting import make_model_card
from lsms_nnunet.training.checkpoints import load_checkpoint_safely

IDENTITY = {"name": "all-MiniLM-L6-v2", "sha256": "0" * 64, "dim": 384, "max_tokens": 32}


class _RunsCode:
    """Unpickling this calls os.system: what an unrestricted torch.load of a hostile checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_with_model_card_and_numpy_scalars_loads(tmp_path):
    card = make_model_card("plain", LSMSConfig(text_dim=384, max_tokens=32), IDENTITY, [["lesion", 1, "the lesion"]],
                           training_directions=[[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]])
    checkpoint = {"network_weights": {"w": torch.ones(2), "_extra_state": card}, "current_epoch": 3,
                  "_best_ema": np.float32(0.5), "logging": {"ema_fg_dice": [np.float64(0.1), np.float32(0.2)]},
                  "init_args": {"fold": 0, "device": torch.device("cpu")}, "inference_allowed_mirroring_axes": (0, 1)}
    torch.save(checkpoint, tmp_path / "checkpoint_final.pth")
    loaded = load_checkpoint_safely(tmp_path / "checkpoint_final.pth")
    assert loaded["network_weights"]["_extra_state"] == card and loaded["_best_ema"] == np.float32(0.5)


def test_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"current_epoch": 1, "payload": _RunsCode(str(marker))}, tmp_path / "checkpoint_final.pth")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint_safely(tmp_path / "checkpoint_final.pth")
    assert not marker.exists()

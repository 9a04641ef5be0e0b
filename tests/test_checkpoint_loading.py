"""The plugin reads checkpoints with `weights_only=True`: data loads, code in a shared model file does not run."""
import os
import pickle

import numpy as np
import pytest
import torch

from lsms_nnunet.network.config import LSMSConfig
from lsms_nnunet.network.prompting import make_model_card, network_config_of
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


#: Per card version, the settings its network entry did not have yet.
_VERSION_6 = ("finding_lesion_weight",)
_VERSION_5 = ("svla_first_stage", "contrastive_level", "fsd_projection", *_VERSION_6)
_SETTINGS_UNKNOWN_TO = {1: None, 2: ("case_selection", "finding_head", *_VERSION_5),
                        3: ("finding_head", *_VERSION_5), 4: _VERSION_5, 5: _VERSION_6, 6: ()}
_BEFORE_5 = {"svla_first_stage": 1, "contrastive_level": 0, "fsd_projection": "planned", "finding_lesion_weight": 0.0}
_SINCE_5 = {"svla_first_stage": 2, "contrastive_level": 1, "fsd_projection": "pointwise", "finding_lesion_weight": 0.0}
_SINCE_6 = {**_SINCE_5, "finding_lesion_weight": 1.0}


@pytest.mark.parametrize("version, expected", [
    (1, {"prompt_decoder": False, "case_selection": False, "finding_head": False, **_BEFORE_5}),
    (2, {"prompt_decoder": True, "case_selection": False, "finding_head": False, **_BEFORE_5}),
    (3, {"prompt_decoder": True, "case_selection": True, "finding_head": False, **_BEFORE_5}),
    (4, {"prompt_decoder": True, "case_selection": True, "finding_head": True, **_BEFORE_5}),
    (5, {"prompt_decoder": True, "case_selection": True, "finding_head": True, **_SINCE_5}),
    (6, {"prompt_decoder": True, "case_selection": True, "finding_head": True, **_SINCE_6})])
def test_older_model_cards_rebuild_the_model_they_were_trained_with(version, expected):
    """A card written before a setting existed means the behaviour of its time (a setting off, SVLA from stage 1, the
    planned projection kernel): its checkpoint loads unchanged, and a model trained before case selection answers
    without a selector."""
    settings = LSMSConfig(text_dim=384, max_tokens=32, prompt_decoder=True, existence_head=True).to_dict()
    card = {**make_model_card("referring", LSMSConfig(), IDENTITY), "version": version}
    unknown = _SETTINGS_UNKNOWN_TO[version]
    card["network"] = {key: value for key, value in settings.items() if key in ("text_dim", "max_tokens")} \
        if unknown is None else {key: value for key, value in settings.items() if key not in unknown}
    config = network_config_of(card)
    assert {key: getattr(config, key) for key in expected} == expected


def test_unknown_model_card_version_is_refused_with_the_fix():
    card = {**make_model_card("referring", LSMSConfig(), IDENTITY), "version": 99}
    with pytest.raises(ValueError, match="install the lsms-nnunet release"):
        network_config_of(card)

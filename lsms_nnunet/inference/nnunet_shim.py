"""The one place where lsms-nnunet relies on nnU-Net internals that no release promises to keep.

The stock `nnUNetv2_predict` builds a plain `nnUNetPredictor`, which knows nothing of expressions, and nnU-Net has no
hook through which a trainer chooses its predictor. The only LSMS code its `initialize_from_trained_model_folder`
runs is `LSMSTrainer.build_network_architecture`, which calls `adopt_stock_predictor` below: that reads the calling
frame's local variables (`self`, `model_training_output_dir`, `use_folds`, `parameters`, `checkpoint_name`,
`configuration_name`: names in nnU-Net 2.8), refuses a fold checkpoint of another dataset or network, turns the
predictor into an `LSMSPredictor` and loads the case-level stage of the folds it uses (from their checkpoints). It
was checked against CHECKED_NNUNET_VERSIONS and refuses others with a message naming the fix; everything else (the
model card) reaches the network through the plans.
"""
from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path
from typing import Mapping

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

#: nnU-Net releases whose `initialize_from_trained_model_folder` this shim was checked against (the stock-predict
#: tests of tests/test_end_to_end_referring.py and tests/test_end_to_end_plain.py).
CHECKED_NNUNET_VERSIONS = ("2.8.",)
_STOCK_LOADER = "initialize_from_trained_model_folder"


class UnsupportedNnUNetError(RuntimeError):
    """The installed nnU-Net is not one the predictor shim was checked against."""


def check_nnunet_version(installed: str | None = None) -> None:
    installed = installed or version("nnunetv2")
    if not installed.startswith(CHECKED_NNUNET_VERSIONS):
        raise UnsupportedNnUNetError(
            f"lsms-nnunet's stock-predict integration was checked with nnunetv2 {', '.join(CHECKED_NNUNET_VERSIONS)}x, "
            f"not {installed}. Fix: pip install 'nnunetv2>=2.8,<2.9' (what setup.py pins).")


def stock_loader_locals(depth: int = 2) -> Mapping | None:
    """The local variables of nnU-Net's `initialize_from_trained_model_folder` when it is the frame `depth` levels
    above this one (2: the caller of `build_network_architecture`); None for any other caller, e.g. a trainer."""
    frame = sys._getframe(depth)
    return frame.f_locals if frame.f_code.co_name == _STOCK_LOADER else None


def adopt_stock_predictor(loader_locals: Mapping, model_card: Mapping) -> None:
    """Make the predictor restoring an LSMS checkpoint an `LSMSPredictor` with the case-level stage of its folds."""
    from lsms_nnunet.inference.model_files import load_checkpoint_safely, refuse_foreign_checkpoint
    from lsms_nnunet.inference.predictor import LSMSPredictor
    from lsms_nnunet.network.prompting import network_config_of
    from lsms_nnunet.preprocessing.prompts import PLAIN
    from lsms_nnunet.selection.stage import stage_for_prediction

    check_nnunet_version()
    predictor = loader_locals["self"]
    if not isinstance(predictor, nnUNetPredictor):
        return
    for fold in loader_locals["use_folds"]:  # nnU-Net has unpickled them already; refuse a fold of another model
        path = Path(loader_locals["model_training_output_dir"]) / f"fold_{fold}" / loader_locals["checkpoint_name"]
        refuse_foreign_checkpoint(path, load_checkpoint_safely(path, mmap=True), loader_locals["configuration_name"])
    if not isinstance(predictor, LSMSPredictor):
        predictor.__class__ = LSMSPredictor
        predictor.adopt()
    if model_card["mode"] != PLAIN and network_config_of(model_card).case_selection:
        predictor.case_level = stage_for_prediction(
            loader_locals["model_training_output_dir"], loader_locals["use_folds"], loader_locals["parameters"],
            model_card["text_encoder"]["sha256"])


def checkpoint_model_card(loader_locals: Mapping) -> Mapping:
    """The card stored in the first fold's weights (model folders written before the card travelled in the plans)."""
    return loader_locals["parameters"][0]["_extra_state"]

"""Training setup problems are reported before training starts, with what to do (no training needed)."""
import json

import pytest

from lsms_nnunet.training.lsms_trainer import LSMSTrainer, TooFewCasesError


def _trainer_on(tmp_path, num_cases: int, fold) -> LSMSTrainer:
    """An LSMSTrainer with only what do_split reads: a preprocessed folder holding `num_cases` cases."""
    folder = tmp_path / "nnUNetPlans_3d_fullres"
    folder.mkdir()
    for index in range(num_cases):
        for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
            (folder / f"case_{index}{suffix}").touch()
    trainer = object.__new__(LSMSTrainer)
    trainer.fold, trainer.dataset_class, trainer.folder_with_segs_from_previous_stage = fold, None, None
    trainer.preprocessed_dataset_folder, trainer.preprocessed_dataset_folder_base = str(folder), str(tmp_path)
    return trainer


def test_fewer_cases_than_folds_says_what_to_do(tmp_path):
    with pytest.raises(TooFewCasesError, match=r"3 training case\(s\), fewer than nnU-Net's 5 .* no .*splits_final"
                                               r"\.json\. Fix: add cases .* fold `all`"):
        _trainer_on(tmp_path, 3, 0).do_split()


def test_fold_all_or_an_own_split_is_accepted_with_few_cases(tmp_path):
    trainer = _trainer_on(tmp_path, 3, "all")
    assert sorted(trainer.do_split()[0]) == ["case_0", "case_1", "case_2"]
    (tmp_path / "splits_final.json").write_text(json.dumps([{"train": ["case_0", "case_1"], "val": ["case_2"]}]))
    trainer.fold = 0
    trainer.print_to_log_file = lambda *args, **kwargs: None
    assert trainer.do_split() == (["case_0", "case_1"], ["case_2"])


def test_a_refused_training_takes_back_the_folders_it_made(tmp_path, monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    trainer = _trainer_on(tmp_path, 3, 0)
    existing, made = tmp_path / "results" / "model", tmp_path / "results" / "model" / "fold_0"
    made.mkdir(parents=True)
    (made / "training_log.txt").write_text("refused")
    trainer.folders_made_by_this_run = [made]  # the model folder existed before (another fold's)
    monkeypatch.setattr(nnUNetTrainer, "on_train_start", lambda self: self.do_split())
    with pytest.raises(TooFewCasesError):
        trainer.on_train_start()
    assert not made.exists() and existing.is_dir()


def test_the_folders_a_training_makes_are_nnunets(tmp_path, monkeypatch):
    import nnunetv2.paths
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from lsms_nnunet.training.lsms_trainer import folders_not_made_yet

    monkeypatch.setattr(nnunetv2.paths, "nnUNet_results", str(tmp_path))
    plans = {"dataset_name": "Dataset001_X", "plans_name": "nnUNetPlans"}
    fold, model = folders_not_made_yet(plans, "2d", 1, "LSMSTrainer")
    monkeypatch.setattr("nnunetv2.utilities.file_path_utilities.nnUNet_results", str(tmp_path))
    assert str(fold) == get_output_folder("Dataset001_X", "LSMSTrainer", "nnUNetPlans", "2d", 1)
    assert str(model) == get_output_folder("Dataset001_X", "LSMSTrainer", "nnUNetPlans", "2d")
    fold.mkdir(parents=True)
    assert folders_not_made_yet(plans, "2d", 1, "LSMSTrainer") == []

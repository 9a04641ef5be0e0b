"""LSMSv2_benchmark end to end on the tiny synthetic 2D referring dataset of conftest (1 epoch x 2 iterations, tiny
plans, a short case-level fit): vanilla nnU-Net on merged labels, LSMS and LSMS with constant text; then a re-run that
must not retrain."""
import dataclasses
import json
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from lsms_nnunet.benchmark.costs import seconds_per_iteration
from lsms_nnunet.selection.settings import CaseLevelSettings
from lsms_nnunet.selection.stage import STAGE_STATE_KEY, CaseLevelStage
from lsms_nnunet.training.checkpoints import load_checkpoint_safely

from conftest import REFERRING_2D, TINY_PLANS, assert_scores_follow_from_voxel_counts

pytestmark = pytest.mark.slow  # trains models end to end

DATASET, PLANS = REFERRING_2D, TINY_PLANS
VARIANTS = ("nnunet_merged", "lsms", "lsms_constant_text")
TRAINERS = {"nnunet_merged": "nnUNetTrainer_budget_merged", "lsms": "LSMSTrainer_budget",
            "lsms_constant_text": "LSMSTrainer_budget_constant_text"}
BENCHMARK_ARGS = ("LSMSv2_benchmark", "-d", DATASET, "-c", "2d", "-p", PLANS, "--epochs", 1, "--iterations", 2,
                  "--variants", *VARIANTS, "-device", "cpu")
CASE_LEVEL_CHANGES = {"fit_steps": 60, "operations_first_steps": 10, "verdict_folds": 2}  # LSMSTrainer_test's fit


def _checkpoint_times(results_folder: Path) -> dict:
    """The benchmark's checkpoints (other modules train other models on the same dataset)."""
    return {str(path): path.stat().st_mtime_ns for trainer in TRAINERS.values()
            for path in (results_folder / f"{trainer}__{PLANS}__2d" / "fold_0").glob("*.pth")}


@pytest.fixture(scope="module")
def benchmarked(run, referring_2d, tmp_path_factory):
    case_level_file = tmp_path_factory.mktemp("benchmark_settings") / "case_level.json"
    case_level_file.write_text(json.dumps(CASE_LEVEL_CHANGES), encoding="utf-8")
    arguments = (*BENCHMARK_ARGS, "--case_level_settings", case_level_file)
    first = run(*arguments, nnUNet_n_proc_DA="0")
    results_folder = referring_2d["results"]
    out = results_folder / f"lsms_benchmark_{PLANS}_2d"
    checkpoints_after_first = _checkpoint_times(results_folder)
    results_after_first = json.loads((out / "results.json").read_text(encoding="utf-8"))
    second = run(*arguments, nnUNet_n_proc_DA="0")
    return dict(raw=referring_2d["raw"], results_folder=results_folder, out=out, first=first, second=second,
                checkpoints_after_first=checkpoints_after_first, results_after_first=results_after_first,
                preprocessed=referring_2d["preprocessed"])


def _validation_expressions(benchmarked) -> list[dict]:
    splits = json.loads((benchmarked["preprocessed"] / "splits_final.json").read_text(encoding="utf-8"))
    expressions = json.loads((benchmarked["raw"] / "expressions.json").read_text(encoding="utf-8"))["expressions"]
    return [e for e in expressions if e["case"] in set(splits[0]["val"])]


def _validation_lesions(benchmarked, min_voxels: int = 50) -> tuple[int, int]:
    """(regions of at least `min_voxels`, smaller regions) in the label maps of fold 0's validation cases (the 2D
    set is not resampled, so the preprocessed maps hold the same regions)."""
    splits = json.loads((benchmarked["preprocessed"] / "splits_final.json").read_text(encoding="utf-8"))
    sizes = []
    for case in splits[0]["val"]:
        regions = sitk.GetArrayFromImage(sitk.ReadImage(str(benchmarked["preprocessed"] / "gt_segmentations"
                                                            / f"{case}.nii.gz")))
        sizes += [int((regions == i).sum()) for i in np.unique(regions) if i > 0]
    return sum(size >= min_voxels for size in sizes), sum(size < min_voxels for size in sizes)


def test_results_json_reports_accuracy_and_cost_of_every_variant(benchmarked):
    results = json.loads((benchmarked["out"] / "results.json").read_text(encoding="utf-8"))
    assert results["budget"] == {"epochs": 1, "iterations_per_epoch": 2}
    assert results["case_level_settings"] == CaseLevelSettings(**CASE_LEVEL_CHANGES).to_dict()
    assert results["folds"] == [0]
    assert [v["name"] for v in results["variants"]] == list(VARIANTS)
    expected_expressions = len(_validation_expressions(benchmarked))
    for variant in results["variants"]:
        assert variant["trainer"] == TRAINERS[variant["name"]]
        referring, plain, cost = variant["referring"], variant["plain_lesion"], variant["cost"]
        assert referring["n_expressions"] == expected_expressions
        record = json.loads((benchmarked["out"] / "records" / f"{variant['name']}__fold_0.json")
                            .read_text(encoding="utf-8"))
        assert_scores_follow_from_voxel_counts(record["referring"]["per_expression"], referring)
        assert plain["cases"] == 1
        assert cost["trainable_parameters"] > 1000
        assert cost["gflops_per_patch"] > 0.01
        checkpoint = load_checkpoint_safely(benchmarked["results_folder"] / f"{TRAINERS[variant['name']]}__{PLANS}__2d"
                                            / "fold_0" / "checkpoint_final.pth")
        logged = checkpoint["logging"]
        assert cost["seconds_per_iteration"] == pytest.approx(seconds_per_iteration(
            logged["epoch_start_timestamps"], logged["epoch_end_timestamps"], 2))
        inference = record["inference"]
        assert cost["inference_seconds_per_case"] == pytest.approx(inference["seconds_per_case"])
        assert cost["inference_seconds_per_expression"] == pytest.approx(
            inference["seconds_per_case"] * inference["cases"] / inference["expressions"])
        assert cost["peak_memory_kind"] == "cpu_max_rss" and cost["peak_memory_bytes"] > 100 * 2 ** 20
        assert cost["probe_seconds_per_iteration"] == pytest.approx(record["probe"]["seconds_per_step"])
        assert cost["patch_size"] == [64, 64]
        assert len(variant["learning_curves"]["0"]["pseudo_dice"]) == 1
        if variant["name"] != "nnunet_merged":  # an LSMS model: its stage fitted with the benchmark's settings
            card = checkpoint["network_weights"]["_extra_state"]
            stage = CaseLevelStage.from_payload(card[STAGE_STATE_KEY], card["text_encoder"]["sha256"], "checkpoint")
            assert stage.settings == CaseLevelSettings(**CASE_LEVEL_CHANGES)
            # every validation lesion is seen: those of >= 50 voxels get an outcome per candidate source
            lesions, too_small = _validation_lesions(benchmarked)
            for counts in variant["candidate_quality"].values():
                assert (counts["lesions"], counts["too_small"]) == (lesions, too_small) and lesions + too_small > 0
                assert counts["matched"] + counts["missed"] + counts["poorly_outlined"] + counts["split"] + \
                    counts["merged"] >= lesions
            # a perfect choice among the network's candidates, per validation expression
            ceiling = record["candidates"]["choice_ceiling"]
            assert sorted(entry["id"] for entry in ceiling) == sorted(e["id"] for e in _validation_expressions(
                benchmarked)) and all(0.0 <= entry["dice"] <= 1.0 for entry in ceiling)
            summary = variant["choice_ceiling"]
            assert summary["n_expressions"] == expected_expressions == sum(
                group["n_expressions"] for group in summary["per_category"].values())
            assert summary["mean_dice"] == pytest.approx(np.mean([entry["dice"] for entry in ceiling]))
        else:
            assert "candidate_quality" not in variant and "choice_ceiling" not in variant
    report = (benchmarked["out"] / "results.md").read_text(encoding="utf-8")
    assert "Candidates against the validation lesions" in report
    assert "| lsms: a perfect choice among its candidates (mean " in report
    ceiling = results["text_blind_ceiling"]
    ceiling_record = json.loads((benchmarked["out"] / "records" / "text_blind_ceiling__fold_0.json")
                                .read_text(encoding="utf-8"))
    assert ceiling["n_expressions"] == expected_expressions
    assert_scores_follow_from_voxel_counts(ceiling_record["per_expression"], ceiling)
    assert ceiling["no_target_accuracy"] in (None, 0.0)  # a lesion mask never answers "nothing here"
    vanilla, lsms, constant = results["variants"]
    assert vanilla["cost"]["seconds_per_iteration_vs_vanilla"] == pytest.approx(1.0)
    assert vanilla["cost"]["probe_seconds_per_iteration_vs_vanilla"] == pytest.approx(1.0)
    assert lsms["cost"]["seconds_per_iteration_vs_vanilla"] == pytest.approx(
        lsms["cost"]["seconds_per_iteration"] / vanilla["cost"]["seconds_per_iteration"])
    assert vanilla["cost"]["frozen_parameters"] == 0 and vanilla["plain_lesion"]["prompt"] is None
    for text_model in (lsms, constant):
        assert text_model["cost"]["frozen_parameters"] > 20_000_000  # all-MiniLM-L6-v2: 22.7 M
        assert text_model["plain_lesion"]["prompt"] == "all lesions"
        assert text_model["cost"]["gflops_per_patch"] > vanilla["cost"]["gflops_per_patch"]


def test_step_profile_splits_a_training_step_by_component(benchmarked):
    results = json.loads((benchmarked["out"] / "results.json").read_text(encoding="utf-8"))
    vanilla, lsms, _ = results["variants"]
    shared = {"data loading + augmentation", "optimiser step", "encoder stage 0", "decoder", "output heads",
              "loss: Dice + CE (deep supervision)"}
    lsms_only = {"SVLA visual branch", "SVLA language branch", "contrastive projections",
                 "loss: vision-language contrastive", "finding heads"}
    for variant, expected in ((vanilla, shared), (lsms, shared | lsms_only)):
        profile = variant["cost"]["step_profile"]
        components = profile["components"]
        assert expected <= set(components) and (variant is lsms or not lsms_only & set(components))
        for times in components.values():
            assert times["total_ms"] == pytest.approx(times["forward_ms"] + times["backward_ms"])
            assert times["forward_ms"] >= 0 and times["backward_ms"] >= 0
        # backward reaches each component through the sequence numbers of the autograd nodes its forward created
        assert components["decoder"]["backward_ms"] > 0 and components["encoder stage 0"]["backward_ms"] > 0
    assert lsms["cost"]["step_profile"]["components"]["SVLA visual branch"]["backward_ms"] > 0
    markdown = (benchmarked["out"] / "results.md").read_text(encoding="utf-8")
    assert "| component: ms (forward + backward)" in markdown and "SVLA visual branch" in markdown


def test_inference_is_timed_as_expressions_per_image_grow(benchmarked):
    results = json.loads((benchmarked["out"] / "results.json").read_text(encoding="utf-8"))
    vanilla, lsms, constant = results["variants"]
    one_prediction = vanilla["cost"]["seconds_per_image"]
    for text_model in (lsms, constant):
        seconds = text_model["cost"]["seconds_by_expressions"]
        assert list(seconds) == ["1", "4", "16", "64"]
        assert text_model["cost"]["expressions_vs_vanilla_image"] == pytest.approx(
            {count: value / one_prediction for count, value in seconds.items()})
    markdown = (benchmarked["out"] / "results.md").read_text(encoding="utf-8")
    assert "| goal: (1 + 0.25 E)x" in markdown and "17.00x" in markdown


def test_results_report_categories_and_heldout_wording(benchmarked):
    results = json.loads((benchmarked["out"] / "results.json").read_text(encoding="utf-8"))
    validation = _validation_expressions(benchmarked)
    categories = {e["category"] for e in validation}
    for variant in results["variants"]:
        per_category = variant["referring_per_category"]
        assert set(per_category) == categories
        assert sum(group["n_expressions"] for group in per_category.values()) == len(validation)
        seen, heldout = variant["referring_per_phrasing"]["seen"], variant["referring_per_phrasing"]["heldout"]
        assert seen["n_expressions"] == heldout["n_expressions"] == len(validation)
        assert seen["mean_dice"] == variant["referring"]["mean_dice"]
        if heldout["mean_dice"] and seen["mean_dice"]:
            assert variant["heldout_vs_seen_dice"] == pytest.approx(heldout["mean_dice"] / seen["mean_dice"])
    vanilla = results["variants"][0]  # text-blind: the wording cannot change its answer
    assert vanilla["referring_per_phrasing"]["heldout"]["mean_dice"] == pytest.approx(vanilla["referring"]["mean_dice"])
    heldout_masks = benchmarked["out"] / "predictions" / "lsms" / "fold_0" / "heldout"
    assert sorted(p.name for p in heldout_masks.glob("*.nii.gz")) == sorted(f"{e['id']}-h.nii.gz" for e in validation)
    markdown = (benchmarked["out"] / "results.md").read_text(encoding="utf-8")
    assert "Mean Dice per expression category" in markdown and "held-out / seen" in markdown


def _read_mask(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_the_untouched_test_split_is_answered_from_raw_images_and_reported_first(benchmarked):
    """imagesTs answered by each trained fold from the raw files, scored against labelsTs, in both wordings."""
    from lsms_nnunet.evaluation.metrics import dice_score

    results = json.loads((benchmarked["out"] / "results.json").read_text(encoding="utf-8"))
    test = json.loads((benchmarked["raw"] / "imagesTs" / "expressions.json").read_text(encoding="utf-8"))["expressions"]
    heldout = [e for e in test if e.get("phrasing") == "heldout"]
    assert len(heldout) * 2 == len(test) and results["test_split"]["cases"] == 2
    assert results["test_split"]["expressions"] == results["test_text_blind_ceiling"]["n_expressions"] == len(test)
    labels = benchmarked["raw"] / "labelsTs"
    for variant in results["variants"]:
        assert variant["test"]["n_expressions"] == len(test)
        assert variant["test_per_phrasing"]["heldout"]["n_expressions"] == len(heldout)
        assert sum(g["n_expressions"] for g in variant["test_per_category"].values()) == len(test)
        record = json.loads((benchmarked["out"] / "records" / f"{variant['name']}__fold_0.json")
                            .read_text(encoding="utf-8"))["test"]
        assert_scores_follow_from_voxel_counts(record["per_expression"], variant["test"])
        masks = benchmarked["out"] / "predictions" / variant["name"] / "fold_0" / "test" / "masks"
        scored = {entry["id"]: entry["dice"] for entry in record["per_expression"]}
        for expression in test:  # each Dice recomputed from the written mask and the test region map
            reference = np.isin(_read_mask(labels / f"{expression['case']}.nii.gz"), expression["targets"])
            answer = _read_mask(masks / f"{expression['id']}.nii.gz") > 0
            assert scored[expression["id"]] == pytest.approx(dice_score(answer, reference))
        lesion_expressions = [e["id"] for e in test if e["targets"]]
        assert variant["test_lesion_expressions_mean_dice"] == pytest.approx(
            np.mean([scored[i] for i in lesion_expressions]))
    vanilla = benchmarked["out"] / "predictions" / "nnunet_merged" / "fold_0" / "test"
    for expression in test:  # text-blind: its label map of the test image answers every expression
        assert (vanilla / "masks" / f"{expression['id']}.nii.gz").read_bytes() == \
            (vanilla / "label_maps" / f"{expression['case']}.nii.gz").read_bytes()
    markdown = (benchmarked["out"] / "results.md").read_text(encoding="utf-8")
    assert markdown.index("Test split: 2 cases") < markdown.index("Validation folds:") < markdown.index("oIoU")


def test_case_level_step_is_reported_against_the_network_alone(benchmarked):
    results = json.loads((benchmarked["out"] / "results.json").read_text(encoding="utf-8"))
    validation = _validation_expressions(benchmarked)
    vanilla, lsms, constant = results["variants"]
    assert "referring_network_alone" not in vanilla  # no case-level step to take away
    for text_model in (lsms, constant):
        for answer in ("referring_case_level", "referring_network_alone"):
            assert text_model[answer]["n_expressions"] == len(validation)
            assert sum(group["n_expressions"] for group in
                       text_model[f"{answer}_per_category"].values()) == len(validation)
        # the model's own answer is the one its fold's verdict chose; the other is measured beside it
        chosen = "referring_network_alone" if text_model["answered_by_per_fold"] == ["network alone"] \
            else "referring_case_level"
        assert text_model["answered_by_per_fold"] in (["network alone"], ["case-level step"])
        assert text_model[chosen]["mean_dice"] == pytest.approx(text_model["referring"]["mean_dice"], abs=1e-3)
    other = "case_level" if lsms["answered_by_per_fold"] == ["network alone"] else "network_alone"
    other_masks = benchmarked["out"] / "predictions" / "lsms" / "fold_0" / other
    selected = benchmarked["results_folder"] / f"{TRAINERS['lsms']}__{PLANS}__2d" / "fold_0" / "validation"
    assert sorted(p.name for p in other_masks.glob("*.nii.gz")) == sorted(f"{e['id']}.nii.gz" for e in validation)
    differing = [e["id"] for e in validation if not np.array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(other_masks / f"{e['id']}.nii.gz"))),
        sitk.GetArrayFromImage(sitk.ReadImage(str(selected / f"{e['id']}.nii.gz"))))]
    assert differing, "the other answer is the model's own: was the case-level step left as it was?"
    markdown = (benchmarked["out"] / "results.md").read_text(encoding="utf-8")
    assert "What the case-level step adds" in markdown and re.search(r"\| lsms +\| network alone", markdown)


def test_vanilla_is_trained_on_merged_labels_and_answers_every_expression_with_its_lesion_mask(benchmarked):
    model = benchmarked["results_folder"] / f"{TRAINERS['nnunet_merged']}__{PLANS}__2d"
    raw_labels = json.loads((benchmarked["raw"] / "dataset.json").read_text(encoding="utf-8"))["labels"]
    dataset_json = json.loads((model / "dataset.json").read_text(encoding="utf-8"))
    assert dataset_json["labels"] == {"background": 0, "lesion": sorted(v for v in raw_labels.values() if v)}
    assert dataset_json["regions_class_order"] == [1]
    answers = benchmarked["out"] / "predictions" / "nnunet_merged" / "fold_0" / "referring"
    for expression in _validation_expressions(benchmarked):
        lesion_mask = model / "fold_0" / "validation" / f"{expression['case']}.nii.gz"
        assert (answers / f"{expression['id']}.nii.gz").read_bytes() == lesion_mask.read_bytes()


def test_lsms_answers_the_ad_hoc_all_lesions_prompt(benchmarked):
    splits = json.loads((benchmarked["preprocessed"] / "splits_final.json").read_text(encoding="utf-8"))
    for name in ("lsms", "lsms_constant_text"):
        folder = benchmarked["out"] / "predictions" / name / "fold_0" / "all_lesions"
        assert sorted(p.name for p in folder.glob("*.nii.gz")) == [f"{case}.nii.gz" for case in splits[0]["val"]]


def test_results_md_table_and_plots(benchmarked):
    markdown = (benchmarked["out"] / "results.md").read_text(encoding="utf-8")
    header = next(line for line in markdown.splitlines() if line.startswith("| variant") and "oIoU" in line)
    for column in ("mean Dice", "mIoU", "oIoU", "Prec@0.5", "no-target acc", "plain lesion Dice", "s/iter",
                   "s/iter vs vanilla", "probe s/iter", "GFLOPs", "params", "peak mem"):
        assert column in header
    lines = markdown.splitlines()
    first_table = lines[lines.index(header):]
    first_table = first_table[:first_table.index("")]
    rows = [line for line in first_table if line.startswith("| ") and not line.startswith("| variant")]
    assert [row.split("|")[1].strip() for row in rows] == list(VARIANTS)
    assert "1.00x" in rows[0] and "frozen" in rows[1]
    assert "ad hoc" in markdown and "\"all lesions\"" in markdown and "Text-blind ceiling" in markdown
    assert markdown.strip() in benchmarked["first"].stdout
    for plot in ("learning_curves.png", "accuracy_vs_cost.png"):
        content = (benchmarked["out"] / plot).read_bytes()
        assert content.startswith(b"\x89PNG") and len(content) > 5000


def test_rerun_neither_retrains_nor_remeasures(benchmarked):
    results_folder = benchmarked["results_folder"]
    assert len(benchmarked["checkpoints_after_first"]) >= len(VARIANTS)
    assert _checkpoint_times(results_folder) == benchmarked["checkpoints_after_first"]
    second = benchmarked["second"].stdout
    assert second.count("finished earlier, left untouched") == len(VARIANTS)
    assert second.count("all measurements recorded earlier, reused") == len(VARIANTS)
    assert "nnUNetv2_train" not in second and "measured" not in second
    rerun = json.loads((benchmarked["out"] / "results.json").read_text(encoding="utf-8"))
    assert rerun["variants"] == benchmarked["results_after_first"]["variants"]
    assert not list(benchmarked["out"].rglob("*.tmp"))


def test_a_changed_test_split_is_measured_again_and_everything_else_reused(benchmarked, tmp_path, capsys):
    """A record made on another test split (cases added or removed, expressions rewritten) is not reported: the test
    answers and the test's text-blind ceiling are measured again on the split as it is now; every other measurement
    is reused."""
    import shutil
    from lsms_nnunet.benchmark.measurements import measure_test_text_blind_ceiling, measure_variant
    from lsms_nnunet.benchmark.preparation import prepare_benchmark
    from lsms_nnunet.benchmark.variants import VARIANTS_BY_NAME

    out = tmp_path / "benchmark"
    shutil.copytree(benchmarked["out"] / "records", out / "records")
    setup = prepare_benchmark(DATASET, "2d", [0], 1, 2, PLANS, ["lsms"], out, "cpu")
    lsms = VARIANTS_BY_NAME["lsms"]
    before = measure_variant(setup, lsms, 0)
    assert "all measurements recorded earlier, reused" in capsys.readouterr().out  # the same split: its signature holds

    content = json.loads(setup.test_split.expressions_file.read_text(encoding="utf-8"))
    kept_case = setup.test_split.cases[0]
    content["expressions"] = [e for e in content["expressions"] if e["case"] == kept_case]
    assert 0 < len(content["expressions"]) < len(setup.test_split.expressions)
    smaller_file = tmp_path / "expressions.json"
    smaller_file.write_text(json.dumps(content), encoding="utf-8")
    smaller = dataclasses.replace(setup.test_split, expressions_file=smaller_file, expressions=tuple(
        e for e in setup.test_split.expressions if e.case == kept_case))
    changed = dataclasses.replace(setup, test_split=smaller)

    after = measure_variant(changed, lsms, 0)
    said = capsys.readouterr().out
    assert "lsms fold 0: measured test" in said and said.count("measured") == 1
    kept_ids = [e["id"] for e in content["expressions"]]
    assert [entry["id"] for entry in after["test"]["per_expression"]] == kept_ids
    assert {key: value for key, value in after.items() if key != "test"} == \
        {key: value for key, value in before.items() if key != "test"}
    answers = out / "predictions" / "lsms" / "fold_0" / "test" / "masks"
    assert sorted(path.name for path in answers.glob("*.nii.gz")) == sorted(f"{i}.nii.gz" for i in kept_ids)
    ceiling = measure_test_text_blind_ceiling(changed)
    assert [entry["id"] for entry in ceiling["per_expression"]] == kept_ids
    assert len(measure_test_text_blind_ceiling(setup)["per_expression"]) == len(setup.test_split.expressions)


def test_changed_budget_or_case_level_settings_are_refused_before_any_training(benchmarked):
    from lsms_nnunet.benchmark.preparation import BenchmarkSetupError, prepare_benchmark
    from lsms_nnunet.benchmark.training_runner import train_variant
    from lsms_nnunet.benchmark.variants import VARIANTS_BY_NAME

    setup = prepare_benchmark(DATASET, "2d", [0], 3, 2, PLANS, ["lsms"], benchmarked["out"], "cpu")
    with pytest.raises(BenchmarkSetupError, match="--epochs 1 --iterations 2"):
        train_variant(setup, VARIANTS_BY_NAME["lsms"], 0)
    same_budget = prepare_benchmark(DATASET, "2d", [0], 1, 2, PLANS, ["lsms"], benchmarked["out"], "cpu")
    with pytest.raises(BenchmarkSetupError, match="fit_steps=60.*Fix: rerun with the --case_level_settings"):
        train_variant(same_budget, VARIANTS_BY_NAME["lsms"], 0)  # the defaults, not the run's short fit
    assert _checkpoint_times(benchmarked["results_folder"]) == benchmarked["checkpoints_after_first"]


def test_resume_flags_continue_or_validate_an_unfinished_training(tmp_path):
    from lsms_nnunet.benchmark.training_runner import resume_flags

    assert resume_flags(tmp_path)[0] == []
    (tmp_path / "checkpoint_latest.pth").touch()
    assert resume_flags(tmp_path)[0] == ["--c"]
    (tmp_path / "checkpoint_final.pth").touch()
    assert resume_flags(tmp_path)[0] == ["--val"]


def test_unprepared_dataset_gets_an_error_naming_the_fix(nnunet_dirs):
    from lsms_nnunet.benchmark.preparation import BenchmarkSetupError, prepare_benchmark
    from lsms_nnunet.datasets.synthetic import make_synthetic_dataset

    with pytest.raises(BenchmarkSetupError, match="LSMSv2_plan_and_preprocess -d 597 -c 2d"):
        prepare_benchmark(597, "2d", [0], 1, 2)
    make_synthetic_dataset(598, dim=2, num_cases=3, num_test_cases=0, shape=(32, 32))
    with pytest.raises(BenchmarkSetupError, match="LSMSv2_plan_and_preprocess -d 598 -c 2d"):
        prepare_benchmark(598, "2d", [0], 1, 2)
    with pytest.raises(BenchmarkSetupError, match="Unknown variant"):
        prepare_benchmark(598, "2d", [0], 1, 2, variants=["lsms_typo"])


def _variant_summary(name: str, dice_by_category: dict, heldout: tuple | None = None) -> dict:
    groups = {category: {"n_expressions": 2, "mean_dice": dice, "mIoU": dice, "no_target_accuracy": None}
              for category, dice in dice_by_category.items()}
    summary = {"name": name, "referring_per_category": groups}
    if heldout:
        summary["referring_per_phrasing"] = {phrasing: {"n_expressions": 4, "mean_dice": dice, "mIoU": dice,
                                                        "no_target_accuracy": None}
                                             for phrasing, dice in zip(("seen", "heldout"), heldout)}
        summary["heldout_vs_seen_dice"] = heldout[1] / heldout[0]
    return summary


def test_results_md_category_table_has_a_column_per_category_and_a_row_per_variant():
    from lsms_nnunet.benchmark.report import format_category_table, format_phrasing_table

    results = {"variants": [_variant_summary("nnunet_merged", {"size": 0.25, "no_target": 0.0}, (0.5, 0.5)),
                            _variant_summary("lsms", {"size": 0.75, "no_target": 1.0, "uncategorized": 0.5},
                                             (0.8, 0.6))],
               "text_blind_ceiling_per_category": {"size": {"n_expressions": 2, "mean_dice": 0.4, "mIoU": 0.4,
                                                            "no_target_accuracy": None}}}
    table = format_category_table(results)
    assert table[2].split("|")[1:-1] == [" variant            ", " size (n=2) ", " no_target (n=2) ",
                                         " uncategorized (n=2) "]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]] for line in table[4:]}
    assert rows == {"nnunet_merged": ["0.250", "0.000", "n/a"], "lsms": ["0.750", "1.000", "0.500"],
                    "text-blind ceiling": ["0.400", "n/a", "n/a"]}
    phrasing = format_phrasing_table(results)
    assert [cell.strip() for cell in phrasing[-1].split("|")[1:-1]] == ["lsms", "0.8000", "0.6000", "0.75x", "4"]
    assert format_phrasing_table({"variants": [_variant_summary("lsms", {"size": 1.0})]}) == []


def test_seconds_per_iteration_leaves_out_the_warm_up_epoch():
    from lsms_nnunet.benchmark.costs import seconds_per_iteration

    assert seconds_per_iteration([0.0, 10.0, 20.0], [10.0, 12.0, 25.0], 2) == pytest.approx(1.75)
    assert seconds_per_iteration([5.0], [9.0], 4) == pytest.approx(1.0)


def test_merged_lesion_labels_make_one_region_of_all_ids():
    from lsms_nnunet.training.variants import merged_lesion_labels

    regions = {"labels": {"background": 0, "region_1": 1, "region_2": 2, "region_3": 3}, "file_ending": ".nii.gz"}
    merged = merged_lesion_labels(regions)
    assert merged["labels"] == {"background": 0, "lesion": [1, 2, 3]} and merged["regions_class_order"] == [1]
    assert regions["labels"]["region_1"] == 1  # the caller's dataset_json is not modified
    single = merged_lesion_labels({"labels": {"background": 0, "region_1": 1}, "regions_class_order": [1]})
    assert single["labels"] == {"background": 0, "lesion": 1} and "regions_class_order" not in single


def _seed_results(lsms_dice: float, vanilla_lesion_dice: float, size_dice: float, test_dice: float = 0.6) -> dict:
    def variant(name, dice, lesion, categories):
        return {"name": name, "referring": {"mean_dice": dice, "no_target_accuracy": 0.5},
                "plain_lesion": {"mean_dice": lesion}, "cost": {"seconds_per_iteration_vs_vanilla": 2.0},
                "referring_per_category": {c: {"mean_dice": d} for c, d in categories.items()},
                "test": {"mean_dice": test_dice, "no_target_accuracy": 1.0},
                "test_lesion_expressions_mean_dice": test_dice - 0.1,
                "test_per_category": {c: {"mean_dice": d} for c, d in categories.items()},
                "test_per_phrasing": {"seen": {"mean_dice": test_dice}, "heldout": {"mean_dice": test_dice / 2}},
                "test_heldout_vs_seen_dice": 0.5}
    return {"dataset": "Dataset1_x", "configuration": "2d", "plans": "nnUNetPlans", "folds": [0],
            "budget": {"epochs": 1, "iterations_per_epoch": 2}, "case_level_settings": None, "device": "cpu",
            "text_blind_ceiling": {"mean_dice": 0.5}, "test_text_blind_ceiling": {"mean_dice": 0.4},
            "test_split": {"cases": 3, "expressions": 12, "expressions_file": "imagesTs/expressions.json"},
            "variants": [variant("nnunet_merged", 0.5, vanilla_lesion_dice, {"size": 0.25}),
                         variant("lsms", lsms_dice, 0.7, {"size": size_dice, "kind": 0.9})]}


def test_results_over_seeds_report_mean_spread_and_the_ratio_to_vanillas_lesion_dice():
    from lsms_nnunet.benchmark.seeds import combine_seeds, format_seeds_table

    combined = combine_seeds([0, 1, 2], [_seed_results(0.8, 1.0, 0.6, 0.5), _seed_results(0.9, 0.9, 0.7, 0.6),
                                         _seed_results(0.7, 0.875, 0.8, 0.7)])
    lsms = combined["variants"][1]
    assert lsms["mean_dice"]["mean"] == pytest.approx(0.8) and lsms["mean_dice"]["std"] == pytest.approx(0.1)
    assert lsms["mean_dice"]["per_seed"] == [0.8, 0.9, 0.7]
    assert lsms["per_category"]["size"]["mean"] == pytest.approx(0.7)
    assert lsms["per_category"]["kind"]["std"] == pytest.approx(0.0)
    assert lsms["mean_dice_vs_vanilla_lesion_dice"]["per_seed"] == pytest.approx([0.8, 1.0, 0.8])
    assert lsms["test"]["mean_dice"]["per_seed"] == [0.5, 0.6, 0.7]
    assert lsms["test"]["per_phrasing"]["heldout"]["mean"] == pytest.approx(0.3)
    assert lsms["test"]["lesion_expressions_mean_dice"]["mean"] == pytest.approx(0.5)
    assert lsms["test"]["per_category"]["kind"]["mean"] == pytest.approx(0.9)
    table = format_seeds_table(combined)
    assert table.index("## Test split (3 cases, 12 expressions") < table.index("## Validation folds")
    test_row = next(line for line in table.splitlines() if line.startswith("| lsms"))  # the test table comes first
    assert [cell.strip() for cell in test_row.split("|")[1:6]] == ["lsms", "0.600 ± 0.100", "0.500 ± 0.100",
                                                                   "1.000 ± 0.000", "0.600 ± 0.100"]
    assert "| lsms          | 0.800 ± 0.100 |" in table
    assert "seed 2" in table and "0.7000" in table


def test_seeded_setup_trains_in_its_own_folder_with_the_seed_in_the_environment(tmp_path):
    from lsms_nnunet.benchmark.preparation import BenchmarkSetup
    from lsms_nnunet.benchmark.variants import VANILLA
    from lsms_nnunet.training.variants import BUDGET_CASE_LEVEL_ENV, BUDGET_SEED_ENV

    setup = BenchmarkSetup("Dataset1_x", "2d", "nnUNetPlans", (0,), 1, 2, "cpu", (VANILLA,), tmp_path / "out",
                           tmp_path / "pre", (), tmp_path / "text", ".nii.gz", (), results_root=tmp_path / "results")
    seeded = setup.for_seed(2)
    assert setup.fold_folder(VANILLA, 0) == tmp_path / "results" / "Dataset1_x" / \
        "nnUNetTrainer_budget_merged__nnUNetPlans__2d" / "fold_0"
    assert seeded.fold_folder(VANILLA, 0) == tmp_path / "out" / "seed_2" / "nnUNet_results" / "Dataset1_x" / \
        "nnUNetTrainer_budget_merged__nnUNetPlans__2d" / "fold_0"
    assert seeded.training_environment()[BUDGET_SEED_ENV] == "2"
    assert seeded.training_environment()["nnUNet_results"] == str(tmp_path / "out" / "seed_2" / "nnUNet_results")
    assert BUDGET_SEED_ENV not in setup.training_environment()
    assert BUDGET_CASE_LEVEL_ENV not in setup.training_environment()  # each LSMS trainer's own settings
    short = dataclasses.replace(setup, case_level_settings=CaseLevelSettings(fit_steps=60))
    assert json.loads(short.for_seed(2).training_environment()[BUDGET_CASE_LEVEL_ENV]) == \
        CaseLevelSettings(fit_steps=60).to_dict()


def test_unusable_case_level_settings_are_refused_before_any_work(monkeypatch, tmp_path, capsys):
    from lsms_nnunet.benchmark.benchmark import benchmark_entry

    settings = tmp_path / "case_level.json"
    settings.write_text('{"fit_stpes": 60}', encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["LSMSv2_benchmark", "-d", "1", "-c", "2d", "--case_level_settings",
                                      str(settings)])
    with pytest.raises(SystemExit):
        benchmark_entry()
    assert "unknown case-level setting(s) ['fit_stpes']" in capsys.readouterr().err


def test_a_budget_seed_makes_the_initial_weights_repeat():
    from lsms_nnunet.training.variants import seed_everything

    seed_everything(5)
    first = torch.nn.Conv2d(2, 3, 3).weight.detach().clone(), np.random.rand(), random.random()
    seed_everything(5)
    second = torch.nn.Conv2d(2, 3, 3).weight.detach().clone(), np.random.rand(), random.random()
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]


def test_a_test_split_with_missing_images_or_region_maps_is_refused_naming_them(tmp_path):
    from lsms_nnunet.benchmark.preparation import BenchmarkSetupError, read_test_split

    assert read_test_split(tmp_path, ".nii.gz") is None  # no imagesTs/expressions.json: validation folds only
    (tmp_path / "imagesTs").mkdir()
    (tmp_path / "labelsTs").mkdir()
    (tmp_path / "imagesTs" / "expressions.json").write_text(json.dumps({"format": "lsms-expressions", "version": 1,
        "expressions": [{"id": "a-e0", "case": "a", "text": "the cyst", "targets": [1]},
                        {"id": "b-e0", "case": "b", "text": "the cyst", "targets": []}]}), encoding="utf-8")
    (tmp_path / "imagesTs" / "a_0000.nii.gz").touch()
    (tmp_path / "labelsTs" / "b.nii.gz").touch()
    with pytest.raises(BenchmarkSetupError, match=r"an image in .*imagesTs \(\['b'\]\) and a region map in "
                                                  r".*labelsTs \(\['a'\]\)\. Fix: add"):
        read_test_split(tmp_path, ".nii.gz")
    (tmp_path / "imagesTs" / "b_0000.nii.gz").touch()
    (tmp_path / "labelsTs" / "a.nii.gz").touch()
    split = read_test_split(tmp_path, ".nii.gz")
    assert split.cases == ["a", "b"] and len(split.expressions) == 2

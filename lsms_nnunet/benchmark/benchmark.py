"""`LSMSv2_benchmark`: LSMS against vanilla nnU-Net on one referring dataset — same splits, same budget, one table.

1. Checks that the dataset is planned, preprocessed and text-encoded, and reads nnU-Net's splits_final.json (made
   exactly as nnU-Net makes it when missing), so every variant trains and validates on the same cases.
2. Trains every variant and fold with the stock `nnUNetv2_train` in a subprocess, all with the same budget
   (`*_budget` trainers read LSMS_BUDGET_EPOCHS / LSMS_BUDGET_ITERATIONS). The baseline is vanilla nnU-Net on the
   plain view of the dataset (every region merged into one lesion label): the best a text-blind model can do.
3. Scores every model on the referring expressions of its validation cases (per expression category too) and on
   plain all-lesion segmentation; when the raw dataset has expressions_heldout.json (LSMSv2_make_synthetic
   --heldout_phrasing), also on the held-out wordings of the same validation expressions; for a model with a
   case-level selector, also the other way than it answers (by its network alone, or by the case-level step its
   verdict declined: what the step adds); and measures its costs
   (parameters, GFLOPs, seconds per training iteration and per inference, peak memory).
   The text-blind ceiling (a perfect all-lesion mask answering every expression) is scored too, as a reference.
4. Writes results.json, results.md (one table) and plots.
   With `--case_level_settings FILE` (a JSON object of CaseLevelSettings fields to change, as for
   `LSMSv2_fit_case_level --settings`), every LSMS variant fits its case-level stage with those settings (the
   `*_budget` trainers read LSMS_BUDGET_CASE_LEVEL_SETTINGS), e.g. a short fit for a smoke run of a small budget.
5. With `--seeds`, all of this once per seed (seeded trainings in `seed_<k>/`), then results_over_seeds.json/.md:
   mean and spread over seeds (seeds.py).

Resumable: a finished training (checkpoint_final.pth + validation/summary.json) is never redone or touched, an
interrupted one continues with `--c`; measurements are kept per model and fold in `records/` (keyed by the final
checkpoint, so a retrained model is measured again; the test answers also by the test split, so added or rewritten
test cases are answered again) and a re-run computes only what is missing.
"""

from __future__ import annotations

import argparse
import time
from typing import Sequence

import numpy as np
import torch

from lsms_nnunet.benchmark.measurements import (measure_test_text_blind_ceiling, measure_text_blind_ceiling,
                                                measure_variant)
from lsms_nnunet.benchmark.preparation import (CANDIDATE_SOURCES, CANDIDATES_SECTION, CHOICE_CEILING,
                                               HELDOUT_SECTION, NETWORK_ALONE_SECTION, TEST_SECTION, BenchmarkSetup,
                                               prepare_benchmark, say)
from lsms_nnunet.benchmark.report import format_results_table, write_plots
from lsms_nnunet.benchmark.seeds import combine_seeds, format_seeds_table
from lsms_nnunet.benchmark.step_profile import merge_profiles
from lsms_nnunet.benchmark.training_runner import train_variant
from lsms_nnunet.benchmark.variants import VANILLA, VARIANTS_BY_NAME, Variant
from lsms_nnunet.evaluation.metrics import aggregate_metrics, per_category_metrics, per_phrasing_metrics
from lsms_nnunet.selection.settings import CaseLevelSettings, CaseLevelSettingsError
from text_conditioning.io import write_json_atomically, write_text_atomically
from lsms_nnunet.cli import console_entry


RESULTS_FORMAT, RESULTS_VERSION = "lsms-benchmark", 1


DEFAULT_EPOCHS, DEFAULT_ITERATIONS = 20, 50


def summarize_variant(setup: BenchmarkSetup, variant: Variant, records: Sequence[dict]) -> dict:
    """One variant over all benchmarked folds: metrics pooled over expressions and cases, costs averaged."""
    per_expression = [entry for record in records for entry in record["referring"]["per_expression"]]
    plain = {case: dice for record in records for case, dice in record["plain"]["dice_per_case"].items()}
    inference_cases = sum(r["inference"]["cases"] for r in records)
    inference_expressions = sum(r["inference"]["expressions"] for r in records)
    inference_seconds = sum(r["inference"]["seconds_per_case"] * r["inference"]["cases"] for r in records)
    network = records[0]["network"]
    return {
        "name": variant.name, "trainer": variant.trainer, "description": variant.description,
        "model_folder": str(setup.model_folder(variant)), "folds": [record["fold"] for record in records],
        "referring": aggregate_metrics(per_expression),
        "referring_per_category": per_category_metrics(per_expression),
        **phrasing_summary(records, per_expression),
        **test_summary(records),
        **network_alone_summary(records),
        **candidate_summary(records),
        "plain_lesion": {"mean_dice": float(np.mean(list(plain.values()))), "cases": len(plain),
                         "prompt": records[0]["plain"]["prompt"]},
        "cost": {
            "trainable_parameters": network["trainable"], "frozen_parameters": network["frozen_text_encoder"],
            "gflops_per_patch": network["gflops_per_patch"], "patch_size": network["patch_size"],
            "seconds_per_iteration": float(np.mean([r["training"]["seconds_per_iteration"] for r in records])),
            "inference_seconds_per_case": inference_seconds / inference_cases,
            "inference_seconds_per_expression": inference_seconds / inference_expressions
            if inference_expressions else None,
            "probe_seconds_per_iteration": float(np.mean([r["probe"]["seconds_per_step"] for r in records])),
            "peak_memory_bytes": max(r["probe"]["peak_bytes"] for r in records),
            "peak_memory_kind": records[0]["probe"]["kind"],
            "step_profile": merge_profiles([r["step_profile"] for r in records]),
            **expression_scaling_summary(records),
        },
        "learning_curves": {str(r["fold"]): {"pseudo_dice": r["training"]["pseudo_dice"],
                                             "ema_pseudo_dice": r["training"]["ema_pseudo_dice"]} for r in records},
    }


def expression_scaling_summary(records: Sequence[dict]) -> dict:
    """Seconds for one image, averaged over folds: per expression count (text variants) or one prediction."""
    scaling = [r["expression_scaling"] for r in records]
    if "seconds_per_image" in scaling[0]:
        return {"seconds_per_image": float(np.mean([s["seconds_per_image"] for s in scaling]))}
    return {"seconds_by_expressions": {count: float(np.mean([s["seconds_by_expressions"][count] for s in scaling]))
                                       for count in scaling[0]["seconds_by_expressions"]}}


def phrasing_summary(records: Sequence[dict], per_expression: list[dict]) -> dict:
    """Seen vs held-out wording of the same validation expressions, and their Dice ratio; {} without held-out."""
    heldout = [entry for record in records for entry in record.get(HELDOUT_SECTION, {}).get("per_expression", ())]
    if not heldout:
        return {}
    per_phrasing = per_phrasing_metrics(per_expression + heldout)
    seen_dice, heldout_dice = per_phrasing["seen"]["mean_dice"], per_phrasing["heldout"]["mean_dice"]
    return {"referring_per_phrasing": per_phrasing,
            "heldout_vs_seen_dice": heldout_dice / seen_dice if seen_dice else None,
            "heldout_per_category": per_category_metrics(heldout)}


def test_summary(records: Sequence[dict]) -> dict:
    """The test split answered by each benchmarked fold, pooled over folds: overall, per category and per wording
    ({} when the dataset has no test split)."""
    test = [entry for record in records for entry in record.get(TEST_SECTION, {}).get("per_expression", ())]
    if not test:
        return {}
    per_phrasing = per_phrasing_metrics(test)
    seen, heldout = per_phrasing.get("seen", {}).get("mean_dice"), per_phrasing.get("heldout", {}).get("mean_dice")
    referring = [entry for entry in test if entry["presence"] in ("pred_empty", "both_present")]
    return {"test": aggregate_metrics(test), "test_per_category": per_category_metrics(test),
            "test_lesion_expressions_mean_dice": float(np.mean([e["dice"] for e in referring])) if referring else None,
            "test_per_phrasing": per_phrasing,
            "test_heldout_vs_seen_dice": heldout / seen if heldout is not None and seen else None}


def candidate_summary(records: Sequence[dict]) -> dict:
    """Candidate quality counted over the folds, and the choice ceiling's mean Dice over their validation expressions,
    overall and per category ({} for models without a finding answer; no ceiling in records measured before it)."""
    found = [record[CANDIDATES_SECTION] for record in records if record.get(CANDIDATES_SECTION)]
    if not found:
        return {}
    summary = {"candidate_quality": {source: {outcome: sum(counts[source].get(outcome, 0) for counts in found)
                                              for outcome in found[0][source]} for source in CANDIDATE_SOURCES}}
    ceiling = [entry for counts in found for entry in counts.get(CHOICE_CEILING, ())]
    if ceiling:
        by_category = {}
        for entry in ceiling:
            by_category.setdefault(entry["category"] or "uncategorized", []).append(entry["dice"])
        summary[CHOICE_CEILING] = {
            "mean_dice": float(np.mean([entry["dice"] for entry in ceiling])), "n_expressions": len(ceiling),
            "per_category": {category: {"mean_dice": float(np.mean(dice)), "n_expressions": len(dice)}
                             for category, dice in sorted(by_category.items())}}
    return summary


def network_alone_summary(records: Sequence[dict]) -> dict:
    """The same validation expressions answered by the case-level step and by the network alone, and which of them
    the model answers with (per fold, its verdict); {} for models without a case-level step."""
    case_level, alone, answered_by = [], [], []
    for record in records:
        other = record.get(NETWORK_ALONE_SECTION)
        if not other:
            continue
        own = record["referring"]["per_expression"]
        declined = other.get("declined_case_level", False)
        case_level += other["per_expression"] if declined else own
        alone += own if declined else other["per_expression"]
        answered_by.append("network alone" if declined else "case-level step")
    if not alone:
        return {}
    return {"referring_case_level": aggregate_metrics(case_level),
            "referring_case_level_per_category": per_category_metrics(case_level),
            "referring_network_alone": aggregate_metrics(alone),
            "referring_network_alone_per_category": per_category_metrics(alone),
            "answered_by_per_fold": answered_by}


def build_results(setup: BenchmarkSetup, records: dict[str, list[dict]], ceiling_records: Sequence[dict],
                  wall_seconds: float, test_ceiling_record: dict | None = None) -> dict:
    variants = [summarize_variant(setup, variant, records[variant.name]) for variant in setup.variants]
    ceiling = [entry for record in ceiling_records for entry in record["per_expression"]]
    test_ceiling = test_ceiling_record["per_expression"] if test_ceiling_record else None
    vanilla = next((v for v in variants if v["name"] == VANILLA.name), None)
    for summary in variants:
        cost = summary["cost"]
        for key in ("seconds_per_iteration", "probe_seconds_per_iteration"):
            cost[f"{key}_vs_vanilla"] = cost[key] / vanilla["cost"][key] if vanilla else None
        if vanilla and "seconds_by_expressions" in cost:
            cost["expressions_vs_vanilla_image"] = {count: seconds / vanilla["cost"]["seconds_per_image"]
                                                    for count, seconds in cost["seconds_by_expressions"].items()}
    return {
        "format": RESULTS_FORMAT, "version": RESULTS_VERSION, "dataset": setup.dataset_name,
        "configuration": setup.configuration, "plans": setup.plans, "folds": list(setup.folds),
        "budget": {"epochs": setup.epochs, "iterations_per_epoch": setup.iterations}, "device": setup.device,
        "case_level_settings": setup.case_level_settings.to_dict() if setup.case_level_settings else None,
        "splits_file": str(setup.splits_file), "wall_seconds_of_this_run": wall_seconds,
        "text_blind_ceiling": aggregate_metrics(ceiling),
        "text_blind_ceiling_per_category": per_category_metrics(ceiling),
        **({"test_split": {"cases": len(setup.test_split.cases), "expressions": len(setup.test_split.expressions),
                           "expressions_file": str(setup.test_split.expressions_file)},
            "test_text_blind_ceiling": aggregate_metrics(test_ceiling),
            "test_text_blind_ceiling_per_category": per_category_metrics(test_ceiling)} if test_ceiling else {}),
        "variants": variants,
    }


def run_benchmark(setup: BenchmarkSetup) -> dict:
    """Train what is missing, measure what is missing, write results.json, results.md and plots."""
    start = time.perf_counter()
    setup.output_folder.mkdir(parents=True, exist_ok=True)
    jobs = [(variant, fold) for variant in setup.variants for fold in setup.folds]
    say(f"{setup.dataset_name} {setup.configuration} ({setup.plans}), folds {list(setup.folds)}, budget "
        f"{setup.epochs} epochs x {setup.iterations} iterations, device {setup.device}, {len(jobs)} trainings; "
        f"output {setup.output_folder}")
    for index, (variant, fold) in enumerate(jobs, 1):
        say(f"[{index}/{len(jobs)}] {variant.name} fold {fold}: {train_variant(setup, variant, fold)}")
    records: dict[str, list[dict]] = {variant.name: [] for variant in setup.variants}
    for index, (variant, fold) in enumerate(jobs, 1):
        say(f"[{index}/{len(jobs)}] measuring {variant.name} fold {fold}")
        records[variant.name].append(measure_variant(setup, variant, fold))
    ceiling_records = [measure_text_blind_ceiling(setup, fold) for fold in setup.folds]
    test_ceiling = measure_test_text_blind_ceiling(setup) if setup.test_split else None
    results = build_results(setup, records, ceiling_records, time.perf_counter() - start, test_ceiling)
    write_json_atomically(setup.output_folder / "results.json", results, ensure_ascii=True, allow_nan=False)
    table = format_results_table(results)
    write_text_atomically(setup.output_folder / "results.md", table + "\n")
    plots = write_plots(results, setup.output_folder)
    print(table)
    say(f"wrote {setup.output_folder / 'results.json'}, results.md and {', '.join(p.name for p in plots)} "
        f"in {results['wall_seconds_of_this_run']:.0f} s")
    return results


def run_benchmark_over_seeds(setup: BenchmarkSetup, seeds: Sequence[int]) -> dict:
    """The benchmark once per seed (each resumable on its own), then the mean and spread over seeds."""
    results = []
    for index, seed in enumerate(seeds, 1):
        say(f"seed {seed} ({index}/{len(seeds)})")
        results.append(run_benchmark(setup.for_seed(seed)))
    combined = combine_seeds(seeds, results)
    write_json_atomically(setup.output_folder / "results_over_seeds.json", combined, ensure_ascii=True,
                          allow_nan=False)
    table = format_seeds_table(combined)
    write_text_atomically(setup.output_folder / "results_over_seeds.md", table + "\n")
    print(table)
    say(f"wrote {setup.output_folder / 'results_over_seeds.json'} and results_over_seeds.md")
    return combined


@console_entry
def benchmark_entry() -> None:
    """`LSMSv2_benchmark -d ID -c CONFIG [--folds 0 ...] [--epochs E] [--iterations I] [-p PLANS] [--variants ...]
    [--case_level_settings FILE] [--seeds S ...] [--out DIR] [-device cpu|cuda]`."""
    parser = argparse.ArgumentParser(
        description="Benchmark LSMS against vanilla nnU-Net (all regions merged into one lesion label) on a "
                    "referring dataset: same splits, same budget; accuracy and cost in one table.")
    parser.add_argument("-d", required=True, help="dataset name or id (planned, preprocessed and text-encoded)")
    parser.add_argument("-c", required=True, help="configuration, e.g. 2d or 3d_fullres")
    parser.add_argument("--folds", "-f", nargs="+", type=int, default=[0], help="folds of splits_final.json "
                                                                               "(default: 0)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                        help=f"epochs per training (default {DEFAULT_EPOCHS})")
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                        help=f"training iterations per epoch (default {DEFAULT_ITERATIONS})")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS_BY_NAME),
                        help="variants to run (default: all)")
    parser.add_argument("--case_level_settings", metavar="FILE", default=None,
                        help="JSON file of CaseLevelSettings fields to change, as for LSMSv2_fit_case_level "
                             "--settings: every LSMS variant fits its case-level stage with them (recorded in "
                             "results.json; default: the trainers' own settings)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="repeat everything once per seed (seeded trainings, each in seed_<k>/ of the output "
                             "folder) and report mean and spread over seeds (default: one unseeded run)")
    parser.add_argument("--out", default=None, help="output folder (default: nnUNet_results/DatasetXXX/"
                                                    "lsms_benchmark_<configuration>)")
    parser.add_argument("-device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device for training and measurements (default: cuda when available)")
    args = parser.parse_args()
    try:
        case_level = CaseLevelSettings.from_json_file(args.case_level_settings) if args.case_level_settings else None
    except CaseLevelSettingsError as error:
        parser.error(f"--case_level_settings {error}")
    setup = prepare_benchmark(args.d, args.c, args.folds, args.epochs, args.iterations, args.p, args.variants,
                              args.out, args.device, case_level)
    if args.seeds is None:
        run_benchmark(setup)
    elif len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        parser.error(f"--seeds must be distinct integers >= 0, got {args.seeds}")
    else:
        run_benchmark_over_seeds(setup, args.seeds)

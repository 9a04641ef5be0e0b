"""Benchmark step 5 (with `--seeds`): the same benchmark repeated with seeded trainings, reported as mean and spread.

At the README budget one training run per variant can score noticeably apart from the next one, so a claim about a
variant's mean Dice, or about what choosing the referred lesion costs against vanilla's all-lesion answer, is read
from the mean and spread over seeds. Each seed is a complete benchmark in `seed_<k>/` (its own models, records,
results.json); this step only combines their results.json files into results_over_seeds.json and
results_over_seeds.md.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lsms_nnunet.benchmark.report import markdown_table, format_number
from lsms_nnunet.benchmark.variants import VANILLA

SEEDS_FORMAT, SEEDS_VERSION = "lsms-benchmark-seeds", 1


def spread(values: Sequence[float | None]) -> dict:
    """Mean, sample standard deviation (0 for one value), min, max and the values themselves; None-safe."""
    defined = [float(v) for v in values if v is not None]
    if not defined:
        return {"mean": None, "std": None, "min": None, "max": None, "per_seed": list(values)}
    return {"mean": float(np.mean(defined)), "std": float(np.std(defined, ddof=1)) if len(defined) > 1 else 0.0,
            "min": min(defined), "max": max(defined), "per_seed": list(values)}


def _variant_over_seeds(name: str, per_seed: list[dict], vanilla_per_seed: list[dict] | None) -> dict:
    categories = list(dict.fromkeys(c for v in per_seed for c in v.get("referring_per_category", {})))
    summary = {
        "name": name,
        "mean_dice": spread([v["referring"]["mean_dice"] for v in per_seed]),
        "no_target_accuracy": spread([v["referring"]["no_target_accuracy"] for v in per_seed]),
        "plain_lesion_dice": spread([v["plain_lesion"]["mean_dice"] for v in per_seed]),
        "per_category": {c: spread([v.get("referring_per_category", {}).get(c, {}).get("mean_dice")
                                    for v in per_seed]) for c in categories},
        "seconds_per_iteration_vs_vanilla": spread([v["cost"]["seconds_per_iteration_vs_vanilla"]
                                                    for v in per_seed]),
    }
    if all("heldout_vs_seen_dice" in v for v in per_seed):
        summary["heldout_vs_seen_dice"] = spread([v["heldout_vs_seen_dice"] for v in per_seed])
    if all("test" in v for v in per_seed):
        summary["test"] = _test_over_seeds(per_seed)
    if vanilla_per_seed is not None:  # what choosing costs: this variant's referring Dice / vanilla's lesion Dice
        summary["mean_dice_vs_vanilla_lesion_dice"] = spread(
            [v["referring"]["mean_dice"] / van["plain_lesion"]["mean_dice"] if van["plain_lesion"]["mean_dice"]
             else None for v, van in zip(per_seed, vanilla_per_seed)])
    return summary


def _test_over_seeds(per_seed: list[dict]) -> dict:
    """The test split's figures of one variant over seeds: overall, lesion expressions, per category and wording."""
    categories = list(dict.fromkeys(c for v in per_seed for c in v["test_per_category"]))
    phrasings = list(dict.fromkeys(p for v in per_seed for p in v["test_per_phrasing"]))
    return {"mean_dice": spread([v["test"]["mean_dice"] for v in per_seed]),
            "no_target_accuracy": spread([v["test"]["no_target_accuracy"] for v in per_seed]),
            "lesion_expressions_mean_dice": spread([v["test_lesion_expressions_mean_dice"] for v in per_seed]),
            "per_category": {c: spread([v["test_per_category"].get(c, {}).get("mean_dice") for v in per_seed])
                             for c in categories},
            "per_phrasing": {p: spread([v["test_per_phrasing"].get(p, {}).get("mean_dice") for v in per_seed])
                             for p in phrasings},
            "heldout_vs_seen_dice": spread([v["test_heldout_vs_seen_dice"] for v in per_seed])}


def combine_seeds(seeds: Sequence[int], results: Sequence[dict]) -> dict:
    """results_over_seeds.json from the results.json of each seed (same variants, folds and budget)."""
    names = [v["name"] for v in results[0]["variants"]]
    by_name = [{v["name"]: v for v in result["variants"]} for result in results]
    vanilla = [variants[VANILLA.name] for variants in by_name] if VANILLA.name in names else None
    return {
        "format": SEEDS_FORMAT, "version": SEEDS_VERSION, "seeds": list(seeds),
        **{key: results[0][key] for key in ("dataset", "configuration", "plans", "folds", "budget",
                                            "case_level_settings", "device")},
        "text_blind_ceiling_mean_dice": results[0]["text_blind_ceiling"]["mean_dice"],
        **({"test_split": results[0]["test_split"],
            "test_text_blind_ceiling_mean_dice": results[0]["test_text_blind_ceiling"]["mean_dice"]}
           if "test_split" in results[0] else {}),
        "variants": [_variant_over_seeds(name, [variants[name] for variants in by_name], vanilla) for name in names],
    }


def _mean_and_spread(value: dict, digits: int = 3) -> str:
    if value["mean"] is None:
        return "n/a"
    return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"


def _format_test_over_seeds(combined: dict) -> list[str]:
    """The test split's table (the headline: nothing was tuned on it), first in results_over_seeds.md."""
    tested = [v for v in combined["variants"] if "test" in v]
    if not tested:
        return []
    categories = list(dict.fromkeys(c for v in tested for c in v["test"]["per_category"]))
    phrasings = list(dict.fromkeys(p for v in tested for p in v["test"]["per_phrasing"]))
    header = ["variant", "mean Dice", "lesion expressions", "no-target acc", *(f"{p} wording" for p in phrasings),
              "held-out / seen", *categories]
    rows = [[v["name"], _mean_and_spread(v["test"]["mean_dice"]),
             _mean_and_spread(v["test"]["lesion_expressions_mean_dice"]),
             _mean_and_spread(v["test"]["no_target_accuracy"]),
             *(_mean_and_spread(v["test"]["per_phrasing"][p]) if p in v["test"]["per_phrasing"] else "n/a"
               for p in phrasings),
             _mean_and_spread(v["test"]["heldout_vs_seen_dice"]),
             *(_mean_and_spread(v["test"]["per_category"][c]) if c in v["test"]["per_category"] else "n/a"
               for c in categories)] for v in tested]
    split = combined["test_split"]
    return [f"## Test split ({split['cases']} cases, {split['expressions']} expressions of "
            f"`{split['expressions_file']}`), seeds {combined['seeds']}", "",
            "Answered by each seed's trained folds without mirroring; nothing was trained or tuned on these cases. "
            "Lesion expressions: those that refer to at least one lesion (no-target apart). Mean ± sample standard "
            f"deviation over seeds; text-blind ceiling (a perfect all-lesion mask): mean Dice "
            f"{format_number(combined['test_text_blind_ceiling_mean_dice'], 4)}.", "",
            *markdown_table([header, *rows]), "", "## Validation folds", ""]


def format_seeds_table(combined: dict) -> str:
    """results_over_seeds.md: mean ± standard deviation over seeds, overall and per expression category."""
    header = ["variant", "mean Dice", "no-target acc", "plain lesion Dice", "mean Dice / vanilla lesion Dice",
              "held-out / seen", "s/iter vs vanilla"]
    rows = [[v["name"], _mean_and_spread(v["mean_dice"]), _mean_and_spread(v["no_target_accuracy"]),
             _mean_and_spread(v["plain_lesion_dice"]),
             _mean_and_spread(v["mean_dice_vs_vanilla_lesion_dice"]) if "mean_dice_vs_vanilla_lesion_dice" in v
             else "n/a",
             _mean_and_spread(v["heldout_vs_seen_dice"]) if "heldout_vs_seen_dice" in v else "n/a",
             _mean_and_spread(v["seconds_per_iteration_vs_vanilla"], 2)] for v in combined["variants"]]
    categories = list(dict.fromkeys(c for v in combined["variants"] for c in v["per_category"]))
    category_rows = [[v["name"], *(_mean_and_spread(v["per_category"][c]) if c in v["per_category"] else "n/a"
                                   for c in categories)] for v in combined["variants"]]
    per_seed = [[v["name"], *(format_number(d, 4) for d in v["mean_dice"]["per_seed"])] for v in combined["variants"]]
    budget = combined["budget"]
    lines = [
        f"# LSMS benchmark over seeds {combined['seeds']}: {combined['dataset']}, {combined['configuration']} "
        f"({combined['plans']})", "",
        f"Folds {combined['folds']}, budget {budget['epochs']} epoch(s) x {budget['iterations_per_epoch']} "
        f"iterations, device {combined['device']}; each seed is a full benchmark in `seed_<k>/` (mean ± sample "
        f"standard deviation over seeds).", "",
        *_format_test_over_seeds(combined),
        *markdown_table([header, *rows]), "",
        "Mean Dice per expression category (mean ± standard deviation over seeds):", "",
        *markdown_table([["variant", *categories], *category_rows]), "",
        "Mean Dice per seed:", "",
        *markdown_table([["variant", *(f"seed {s}" for s in combined["seeds"])], *per_seed]), "",
        f"- Text-blind ceiling (a perfect all-lesion mask answering every expression): mean Dice "
        f"{format_number(combined['text_blind_ceiling_mean_dice'], 4)}.",
        "- mean Dice / vanilla lesion Dice: the variant's referring mean Dice over vanilla nnU-Net's all-lesion Dice "
        "of the same seed (what choosing the referred lesion costs against finding all of them).",
    ]
    return "\n".join(lines)

"""The benchmark's human-readable output: one Markdown table with its notes, and two plots."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first: no display on servers)

from text_conditioning.io import atomic_path

from lsms_nnunet.benchmark.preparation import CHOICE_CEILING

TABLE_COLUMNS = ("variant", "mean Dice", "mIoU", "oIoU", "Prec@0.5", "no-target acc", "plain lesion Dice", "s/iter",
                 "s/iter vs vanilla", "probe s/iter", "probe vs vanilla", "GFLOPs/patch", "params", "peak mem",
                 "infer s/case", "infer s/expr")


CANDIDATE_OUTCOMES = ("matched", "split", "merged", "missed", "poorly_outlined")


def format_number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _parameters(trainable: int, frozen: int) -> str:
    text = f"{trainable / 1e6:.2f} M"
    return text + (f" + {frozen / 1e6:.1f} M frozen" if frozen else "")


def _memory(size_bytes: int) -> str:
    return f"{size_bytes / 2 ** 30:.2f} GiB" if size_bytes >= 2 ** 30 else f"{size_bytes / 2 ** 20:.0f} MiB"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _row(variant: dict) -> list[str]:
    referring, cost = variant["referring"], variant["cost"]
    return [variant["name"], format_number(referring["mean_dice"], 4), format_number(referring["mIoU"], 4),
            format_number(referring["oIoU"], 4), format_number(referring["precision@0.5"], 3),
            format_number(referring["no_target_accuracy"], 3), format_number(variant["plain_lesion"]["mean_dice"], 4),
            format_number(cost["seconds_per_iteration"], 3), _ratio(cost["seconds_per_iteration_vs_vanilla"]),
            format_number(cost["probe_seconds_per_iteration"], 3), _ratio(cost["probe_seconds_per_iteration_vs_vanilla"]),
            format_number(cost["gflops_per_patch"], 2), _parameters(cost["trainable_parameters"], cost["frozen_parameters"]),
            _memory(cost["peak_memory_bytes"]), format_number(cost["inference_seconds_per_case"], 3),
            format_number(cost["inference_seconds_per_expression"], 3)]


def markdown_table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return lines


def format_category_table(results: dict) -> list[str]:
    """Mean Dice per expression category: one column per category, one row per variant and the text-blind ceiling."""
    rows_by_name = {variant["name"]: variant.get("referring_per_category", {}) for variant in results["variants"]}
    for variant in results["variants"]:
        if CHOICE_CEILING in variant:
            ceiling = variant[CHOICE_CEILING]
            rows_by_name[f"{variant['name']}: a perfect choice among its candidates (mean "
                         f"{format_number(ceiling['mean_dice'], 3)})"] = ceiling["per_category"]
    rows_by_name["text-blind ceiling"] = results.get("text_blind_ceiling_per_category", {})
    categories = list(dict.fromkeys(category for groups in rows_by_name.values() for category in groups))
    if not categories:
        return []
    counts = {}
    for groups in rows_by_name.values():
        for category, group in groups.items():
            counts.setdefault(category, group["n_expressions"])
    header = ["variant", *(f"{category} (n={counts[category]})" for category in categories)]
    rows = [[name, *(format_number(groups[category]["mean_dice"], 3) if category in groups else "n/a"
                     for category in categories)] for name, groups in rows_by_name.items()]
    caption = "Mean Dice per expression category (the expressions file's `category`; \"uncategorized\" when absent)"
    if any(CHOICE_CEILING in variant for variant in results["variants"]):
        caption += (". \"A perfect choice among its candidates\": the referred candidates of the model's finding answer "
                    "chosen exactly, each kept where its finding logits are positive as the case-level stage keeps "
                    "it (evaluation/candidate_quality.py); below it the choice loses, above it the outlines do")
    return [caption + ":", "", *markdown_table([header, *rows])]


def format_phrasing_table(results: dict) -> list[str]:
    """Seen vs held-out wording of the same validation expressions; empty when the dataset has no held-out file."""
    variants = [variant for variant in results["variants"] if "referring_per_phrasing" in variant]
    if not variants:
        return []
    header = ["variant", "seen mean Dice", "held-out mean Dice", "held-out / seen", "expressions (each)"]
    rows = [[variant["name"], format_number(variant["referring_per_phrasing"]["seen"]["mean_dice"], 4),
             format_number(variant["referring_per_phrasing"]["heldout"]["mean_dice"], 4),
             _ratio(variant["heldout_vs_seen_dice"]),
             str(variant["referring_per_phrasing"]["heldout"]["n_expressions"])] for variant in variants]
    return ["Phrasing never seen in training (expressions_heldout.json: the same validation expressions and targets "
            "in held-out wording, predicted in one pass per case without mirroring):", "",
            *markdown_table([header, *rows])]


def format_case_level_table(results: dict) -> list[str]:
    """Each model with a case-level step, answering with it and by its network alone (same weights): mean Dice,
    no-target accuracy and mean Dice per category, and which of them the model answers with (its folds' verdicts);
    empty when no model has one."""
    variants = [variant for variant in results["variants"] if "referring_network_alone" in variant]
    if not variants:
        return []
    categories = list(dict.fromkeys(category for variant in variants for category in variant["referring_per_category"]))
    header = ["variant", "answered by", "model answers with it (folds)", "mean Dice", "no-target acc", *categories]
    rows = []
    for variant in variants:
        for answered_by, overall, groups in (
                ("case-level step", variant["referring_case_level"], variant["referring_case_level_per_category"]),
                ("network alone", variant["referring_network_alone"], variant["referring_network_alone_per_category"])):
            folds = variant["answered_by_per_fold"]
            rows.append([variant["name"], answered_by, f"{folds.count(answered_by)} of {len(folds)}",
                         format_number(overall["mean_dice"], 4),
                         format_number(overall["no_target_accuracy"], 3),
                         *(format_number(groups[category]["mean_dice"], 3) if category in groups else "n/a"
                           for category in categories)])
    return ["What the case-level step adds: the same validation expressions answered with the selector the model "
            "carries and by its network alone (same weights, one pass per case, no mirroring). Each fold answers "
            "with the one that scored better on its own training cases (the selector cross-validated over them): "
            "the variant's rows above are that answer.", "",
            *markdown_table([header, *rows])]


def format_profile_table(results: dict) -> list[str]:
    """Milliseconds per training step by component (forward + backward), one column per variant."""
    profiles = {v["name"]: v["cost"]["step_profile"] for v in results["variants"] if "step_profile" in v["cost"]}
    if not profiles:
        return []
    components = sorted(dict.fromkeys(name for profile in profiles.values() for name in profile["components"]),
                        key=lambda name: -max(p["components"].get(name, {}).get("total_ms", 0.0)
                                              for p in profiles.values()))

    def cell(profile: dict, name: str) -> str:
        times = profile["components"].get(name)
        return "—" if times is None else f"{times['total_ms']:.1f} ({times['forward_ms']:.1f} + {times['backward_ms']:.1f})"

    rows = [["component: ms (forward + backward)", *profiles]]
    rows += [[name, *(cell(profile, name) for profile in profiles.values())] for name in components]
    rows.append(["profiled step", *(f"{profile['step_ms']:.1f}" for profile in profiles.values())])
    return markdown_table(rows)


def format_expression_scaling_table(results: dict) -> list[str]:
    """Seconds for E expressions of one image, and their ratio to one vanilla prediction of that image."""
    scaled = [v for v in results["variants"] if "seconds_by_expressions" in v["cost"]]
    if not scaled:
        return []
    counts = list(scaled[0]["cost"]["seconds_by_expressions"])
    rows = [["variant: s (x one vanilla prediction)", *(f"E = {count}" for count in counts)]]
    for variant in scaled:
        cost = variant["cost"]
        ratios = cost.get("expressions_vs_vanilla_image", {})
        rows.append([variant["name"], *(f"{cost['seconds_by_expressions'][count]:.3f}"
                                        + (f" ({ratios[count]:.2f}x)" if count in ratios else "")
                                        for count in counts)])
    vanilla = next((v for v in results["variants"] if "seconds_per_image" in v["cost"]), None)
    if vanilla:
        rows.append([f"{vanilla['name']} (one prediction)",
                     *([f"{vanilla['cost']['seconds_per_image']:.3f} (1.00x)"] * len(counts))])
    rows.append(["goal: (1 + 0.25 E)x", *(f"{1 + 0.25 * int(count):.2f}x" for count in counts)])
    return markdown_table(rows)


def format_candidate_table(results: dict) -> list[str]:
    """Per model with a finding answer, how its candidates (and those split from the true lesion masks) stand for
    the validation lesions; empty when no model has one."""
    rows = []
    for variant in results["variants"]:
        for source, counts in variant.get("candidate_quality", {}).items():
            lesions = counts.get("lesions", 0)
            scored = f"{lesions} (+{counts.get('too_small', 0)} smaller)"
            rows.append([variant["name"], source.replace("_", " "), scored,
                         *(f"{counts.get(outcome, 0)} ({counts.get(outcome, 0) / lesions:.0%})" if lesions else "0"
                           for outcome in CANDIDATE_OUTCOMES)])
    if not rows:
        return []
    return ["Candidates against the validation lesions (the regions of the label maps, at least 50 voxels): "
            "matched one-to-one (IoU >= 0.5), split, merged, missed, poorly outlined "
            "(evaluation/candidate_quality.py). \"true lesions\": the candidates split from the true lesion mask, "
            "what the stage is also fitted on.", "",
            *markdown_table([["variant", "candidates of", "lesions", *CANDIDATE_OUTCOMES], *rows])]


def format_test_table(results: dict) -> list[str]:
    """The test split (imagesTs/labelsTs), first in results.md: mean Dice overall, on the expressions that refer to a
    lesion, no-target accuracy, per wording and per category; empty when the dataset has no test split."""
    tested = [variant for variant in results["variants"] if "test" in variant]
    if not tested:
        return []
    categories = list(dict.fromkeys(c for variant in tested for c in variant["test_per_category"]))
    phrasings = list(dict.fromkeys(p for variant in tested for p in variant["test_per_phrasing"]))
    header = ["variant", "mean Dice", "lesion expressions", "no-target acc", *(f"{p} wording" for p in phrasings),
              "held-out / seen", *categories]
    rows = [[variant["name"], format_number(variant["test"]["mean_dice"], 4),
             format_number(variant["test_lesion_expressions_mean_dice"], 4),
             format_number(variant["test"]["no_target_accuracy"], 3),
             *(format_number(variant["test_per_phrasing"].get(p, {}).get("mean_dice"), 4) for p in phrasings),
             _ratio(variant["test_heldout_vs_seen_dice"]),
             *(format_number(variant["test_per_category"].get(c, {}).get("mean_dice"), 3) for c in categories)]
            for variant in tested]
    split = results["test_split"]
    return [f"Test split: {split['cases']} cases, {split['expressions']} expressions of `{split['expressions_file']}`, "
            f"answered by each benchmarked fold from the raw images (nnU-Net's preprocessing, no mirroring); nothing "
            f"was trained or tuned on them. Lesion expressions: those that refer to at least one lesion. Text-blind "
            f"ceiling: mean Dice {format_number(results['test_text_blind_ceiling']['mean_dice'], 4)}.", "",
            *markdown_table([header, *rows]), "", "Validation folds:", ""]


def format_results_table(results: dict) -> str:
    """results.md: the test split's table, then the validation table (one row per variant), per-category and
    seen/held-out tables, what every number means."""
    lines = format_test_table(results) + markdown_table([list(TABLE_COLUMNS),
                                                         *(_row(variant) for variant in results["variants"])])
    for extra in (format_category_table(results), format_case_level_table(results), format_phrasing_table(results),
                  format_candidate_table(results), format_profile_table(results),
                  format_expression_scaling_table(results)):
        if extra:
            lines += ["", *extra]
    first = results["variants"][0] if results["variants"] else None
    expressions = first["referring"]["n_expressions"] if first else 0
    cases = first["plain_lesion"]["cases"] if first else 0
    memory_kind = first["cost"]["peak_memory_kind"] if first else "n/a"
    prompt = next((v["plain_lesion"]["prompt"] for v in results["variants"] if v["plain_lesion"]["prompt"]), None)
    budget = results["budget"]
    ceiling = results["text_blind_ceiling"]
    notes = [
        f"# LSMS benchmark: {results['dataset']}, {results['configuration']} ({results['plans']})",
        "",
        f"Folds {results['folds']} of `{results['splits_file']}` (the same cases for every variant); budget "
        f"{budget['epochs']} epoch(s) x {budget['iterations_per_epoch']} iterations for every variant; device "
        f"{results['device']}.",
        "",
        *lines,
        "",
        f"- Referring metrics (mean Dice, mIoU, oIoU, Prec@0.5, no-target accuracy) pool the {expressions} "
        f"expressions of the validation cases. The vanilla row is nnU-Net trained on the plain view of the dataset "
        f"(every region merged into one lesion label); being text-blind, its answer to every expression of an image "
        f"is its lesion mask.",
        f"- Text-blind ceiling: a perfect all-lesion mask answering every expression scores mean Dice "
        f"{format_number(ceiling['mean_dice'], 4)}, mIoU {format_number(ceiling['mIoU'], 4)}, oIoU {format_number(ceiling['oIoU'], 4)}, "
        f"Prec@0.5 {format_number(ceiling['precision@0.5'], 3)}: what the vanilla row would reach if it segmented every "
        f"lesion perfectly.",
        f"- Plain lesion Dice: predicted lesion mask vs the union of all regions, mean over {cases} validation cases. "
        f"Vanilla: its stock final-validation label maps (with nnU-Net's test-time mirroring; LSMS never mirrors, "
        f"since expressions name sides)."
        + (f" LSMS variants: the prompt \"{prompt}\", an ad hoc text chosen by the benchmark (not a convention the "
           f"model was trained on)." if prompt else ""),
        "- s/iter: median epoch wall time (after the first epoch) / iterations per epoch, from the epoch timestamps "
        "in the final checkpoint; an epoch also runs its validation iterations and saves a checkpoint.",
        "- probe s/iter: median time of a few training steps (batch loading + forward + backward + update, after "
        "warm-up steps) in a fresh process per variant; the probes run minutes apart, so on a shared machine they "
        "see more similar load than the trainings, which run far apart.",
        "- GFLOPs/patch: one forward pass on one planned patch (batch 1, no deep-supervision heads), "
        "torch.utils.flop_counter; the frozen text encoder is not included (it runs once per new text, not per patch).",
        "- params: trainable parameters; \"frozen\" is the text encoder LSMS reads its embeddings from.",
        f"- peak mem: {memory_kind} of the probe process, which builds the trainer and runs a few training steps "
        f"(on CPU this includes the Python interpreter and libraries).",
        "- infer: sliding window on the preprocessed validation cases with one fold's weights, no test-time "
        "mirroring; per case answers all of a case's expressions (LSMS batches them, vanilla predicts once), "
        "per expression = total time / expressions.",
        "- Step profile: one training step split by component under torch.profiler (benchmark/step_profile.py; "
        "backward attributed to the component whose forward op created each autograd node), median of a few "
        "steps; data loading + augmentation and the optimiser step are timed around the trainer's calls. The "
        "profiler adds overhead, so compare shares, and the probe s/iter for totals.",
        "- Expressions per image: seconds to answer E expressions of the first validation image (the validation "
        "texts repeated as needed) against one prediction of that image by the vanilla model, same settings as "
        "infer.",
        "- Learning curves (learning_curves.png) show nnU-Net's online pseudo Dice: of the referred target for LSMS, "
        "of all lesions for vanilla, so their levels are not comparable.",
    ]
    return "\n".join(notes)


def _save_figure(figure, path: Path) -> None:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)


def write_plots(results: dict, folder: Path) -> list[Path]:
    """learning_curves.png (pseudo Dice per epoch) and accuracy_vs_cost.png (mean Dice vs s/iter and GFLOPs)."""
    variants = results["variants"]
    colours = plt.get_cmap("tab10")

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for index, variant in enumerate(variants):
        for fold, curves in variant["learning_curves"].items():
            epochs = range(1, len(curves["pseudo_dice"]) + 1)
            axis.plot(epochs, curves["pseudo_dice"], color=colours(index % 10), alpha=0.35, linewidth=1)
            axis.plot(epochs, curves["ema_pseudo_dice"], color=colours(index % 10), linewidth=2,
                      label=f"{variant['name']} (fold {fold}, EMA)")
    axis.set_xlabel("epoch")
    axis.set_ylabel("online pseudo Dice")
    axis.set_title("Learning curves (thin: per epoch, thick: EMA)")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=7)
    curves_file = folder / "learning_curves.png"
    _save_figure(figure, curves_file)

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for axis, (key, label) in zip(axes, (("seconds_per_iteration", "training s/iteration"),
                                         ("gflops_per_patch", "GFLOPs per patch"))):
        for index, variant in enumerate(variants):
            x, y = variant["cost"][key], variant["referring"]["mean_dice"]
            axis.scatter([x], [y], color=colours(index % 10), s=40)
            axis.annotate(variant["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("mean Dice over expressions")
    axes[0].set_ylim(0, 1)
    figure.suptitle(f"Accuracy vs cost: {results['dataset']} {results['configuration']}")
    scatter_file = folder / "accuracy_vs_cost.png"
    _save_figure(figure, scatter_file)
    return [curves_file, scatter_file]

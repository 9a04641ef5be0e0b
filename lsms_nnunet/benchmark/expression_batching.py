"""`LSMSv2_benchmark_expressions`: seconds per expression when an image's expressions are batched vs run one by one.

For E expressions on one image it times (a) what LSMSPredictor does — read and preprocess the image once, then one
sliding window with all E prompts batched — against (b) E separate runs, each reading, preprocessing and predicting
one expression (what E invocations of a text-per-run tool would do, minus process start and model loading).
Prints a table; the ratio (b)/(a) is the speed-up.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lsms_nnunet.inference.predictor import LSMSPredictor
from lsms_nnunet.cli import console_entry

TEMPLATE_TEXTS = ("the largest lesion", "the smallest lesion", "all cysts", "the lesion in the right lobe",
                  "the hemangioma", "every lesion in the left lobe", "the metastasis", "the hypodense lesion")


def expression_texts(count: int) -> list[str]:
    """`count` distinct expressions (each encoded on its own; none repeats another)."""
    return [f"{TEMPLATE_TEXTS[i % len(TEMPLATE_TEXTS)]}, query {i}" for i in range(count)]


def time_expression_batching(predictor: LSMSPredictor, image_file: str, counts: list[int]) -> list[dict]:
    """Seconds for batched and separate prediction of E expressions on one image, for each E in `counts`."""
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)

    def preprocess():
        data, _, properties = preprocessor.run_case([image_file], None, predictor.plans_manager,
                                                    predictor.configuration_manager, predictor.dataset_json)
        return torch.from_numpy(data), properties

    predictor.predict_prompt_logits(preprocess()[0], expression_texts(max(counts)))  # warm-up; encodes every text once
    rows = []
    for count in counts:
        texts = expression_texts(count)
        start = time.perf_counter()
        predictor.predict_prompt_logits(preprocess()[0], texts)
        batched = time.perf_counter() - start
        start = time.perf_counter()
        for text in texts:
            predictor.predict_prompt_logits(preprocess()[0], [text])
        separate = time.perf_counter() - start
        rows.append({"expressions": count, "batched_s": batched, "separate_s": separate,
                     "batched_s_per_expression": batched / count, "separate_s_per_expression": separate / count,
                     "speedup": separate / batched})
    return rows


def expression_benchmark_parser(description: str, default_counts: list[int]) -> argparse.ArgumentParser:
    """The arguments both expression benchmarks take: a trained model, an image and numbers of expressions."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-d", required=True)
    parser.add_argument("-c", required=True)
    parser.add_argument("-tr", default="LSMSTrainer")
    parser.add_argument("-p", default="nnUNetPlans")
    parser.add_argument("-f", nargs="+", default=["0"])
    parser.add_argument("-i", help="Image (<case>_0000<ending>); default: the first of imagesTs, else imagesTr.")
    parser.add_argument("-E", nargs="+", type=int, default=default_counts,
                        help=f"Numbers of expressions (default {' '.join(map(str, default_counts))}).")
    parser.add_argument("-device", default="cpu")
    parser.add_argument("-step_size", type=float, default=0.5,
                        help="Sliding-window step as a fraction of the patch (nnUNetv2_predict's -step_size).")
    return parser


def benchmarked_model_and_image(args: argparse.Namespace) -> tuple[str, Path, str]:
    """(dataset name, model folder, image) of an expression benchmark's arguments."""
    from nnunetv2.paths import nnUNet_raw, nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    name = maybe_convert_to_dataset_name(args.d)
    model = Path(nnUNet_results) / name / f"{args.tr}__{args.p}__{args.c}"
    image = args.i or str(next(p for folder in ("imagesTs", "imagesTr")
                               for p in sorted((Path(nnUNet_raw) / name / folder).glob("*_0000.*"))))
    return name, model, image


@console_entry
def benchmark_expressions_entry() -> None:
    import lsms_nnunet_ext_hook  # noqa: F401

    parser = expression_benchmark_parser(__doc__.splitlines()[0], [1, 4, 16])
    parser.add_argument("--expression_batch", type=int, default=16, help="Prompts per network batch (default 16).")
    args = parser.parse_args()

    name, model, image = benchmarked_model_and_image(args)
    predictor = LSMSPredictor(tile_step_size=args.step_size, use_mirroring=True, device=torch.device(args.device),
                              allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), [f if f == "all" else int(f) for f in args.f])
    predictor.expression_batch_size = args.expression_batch
    rows = time_expression_batching(predictor, image, args.E)
    print(f"\n{name} {args.c} {args.tr}, folds {args.f}, device {args.device}, image {Path(image).name}")
    print("| E | batched s | separate s | batched s/expr | separate s/expr | speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['expressions']} | {r['batched_s']:.3f} | {r['separate_s']:.3f} | "
              f"{r['batched_s_per_expression']:.4f} | {r['separate_s_per_expression']:.4f} | {r['speedup']:.2f}x |")

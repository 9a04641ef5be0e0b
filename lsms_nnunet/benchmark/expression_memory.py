"""`LSMSv2_benchmark_expression_memory`: peak memory of answering E expressions of one image, against the smallest E.

Each E is answered in a fresh process the way `LSMSv2_predict -npp 0 -nps 0` answers (read, preprocess, answer,
export one mask per expression, in one process); its peak resident memory (`ru_maxrss`) is printed with the ratio to
the smallest E. Prediction answers and exports an image's expressions chunk by chunk (inference/predictor.py,
`CHUNK_VOXELS`), so the ratio should stay near 1 however large E grows. The texts are encoded into the user's text
cache first (with a progress bar), so the measured processes only read them.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lsms_nnunet.benchmark.expression_batching import (benchmarked_model_and_image, expression_benchmark_parser,
                                                     expression_texts)
from lsms_nnunet.cli import console_entry

TEXTS_PER_ENCODING = 1024


def _predictor(model: Path, args: argparse.Namespace):
    import torch

    import lsms_nnunet_ext_hook  # noqa: F401
    from lsms_nnunet.inference.predictor import LSMSPredictor

    predictor = LSMSPredictor(tile_step_size=args.step_size, use_mirroring=False, device=torch.device(args.device),
                              allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), [f if f == "all" else int(f) for f in args.f])
    return predictor


def _answer(model: Path, args: argparse.Namespace, image: Path, count: int, workdir: Path) -> dict:
    """Answer `count` expressions of `image` in this process; its peak RSS in MB."""
    images, output = workdir / "images", workdir / "masks"
    images.mkdir(parents=True)
    shutil.copy(image, images / image.name)
    case = image.name[: image.name.rindex("_0000")]
    (images / "expressions.json").write_text(json.dumps({"format": "lsms-expressions", "version": 1, "expressions": [
        {"id": f"{case}-q{i}", "case": case, "text": text} for i, text in enumerate(expression_texts(count))]}),
        encoding="utf-8")
    predictor = _predictor(model, args)
    predictor.predict_from_files_sequential(str(images), str(output))
    masks = len(list(output.glob(f"*{predictor.dataset_json['file_ending']}")))
    return {"expressions": count, "masks": masks,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _encode_first(model: Path, args: argparse.Namespace, count: int) -> None:
    """Encode the texts into the user's text cache, so that the measured processes only read them."""
    from tqdm import tqdm

    from text_conditioning.encoders import EncoderIdentity
    from text_conditioning.model_texts import encode_texts

    identity = EncoderIdentity.from_dict(_predictor(model, args).model_card["text_encoder"])
    texts = expression_texts(count)
    for start in tqdm(range(0, count, TEXTS_PER_ENCODING), desc="Encoding the texts", unit="chunk"):
        encode_texts(texts[start:start + TEXTS_PER_ENCODING], identity)


@console_entry
def benchmark_expression_memory_entry() -> None:
    parser = expression_benchmark_parser(__doc__.splitlines()[0], [1, 10000])
    parser.add_argument("--answer_in_this_process", type=int, help=argparse.SUPPRESS)  # one measurement (child)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    name, model, image = benchmarked_model_and_image(args)
    if args.answer_in_this_process is not None:
        print(json.dumps(_answer(model, args, Path(image), args.answer_in_this_process, Path(args.workdir))))
        return
    _encode_first(model, args, max(args.E))
    rows = []
    for count in sorted(args.E):
        with tempfile.TemporaryDirectory() as workdir:
            result = subprocess.run([sys.executable, "-m", __name__, *sys.argv[1:], "-i", image,
                                     "--answer_in_this_process", str(count), "--workdir", workdir],
                                    capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"Answering {count} expressions failed:\n{result.stderr[-3000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(f"\n{name} {args.c} {args.tr}, folds {args.f}, device {args.device}, step size {args.step_size}, "
          f"image {Path(image).name}")
    print("| E | masks written | peak RSS MB | ratio to E = " f"{rows[0]['expressions']} |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['expressions']} | {row['masks']} | {row['peak_rss_mb']:.0f} | "
              f"{row['peak_rss_mb'] / rows[0]['peak_rss_mb']:.2f}x |")


if __name__ == "__main__":
    benchmark_expression_memory_entry()

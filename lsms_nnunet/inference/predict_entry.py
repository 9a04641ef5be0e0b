"""`LSMSv2_predict`: `nnUNetv2_predict` (same flags) plus where the expressions come from.

  -e FILE            expressions file kept elsewhere than the input folder
  --text "..."       one ad-hoc expression asked of every image (ids `<case>-text`)
  --text_encoder X   where the model's text encoder lives on this machine (checked against the checkpoint)
  --allow_nonfinite  predict images with NaN/infinite voxels anyway (refused by default), with a warning
"""
import argparse
import os
import sys

from text_conditioning.expressions import unusable_text_reason

from lsms_nnunet.inference.input_checks import ALLOW_NONFINITE_ENV
from lsms_nnunet.inference.predictor import EXPRESSIONS_ENV, TEXT_ENCODER_ENV, TEXT_ENV
from lsms_nnunet.cli import console_entry


@console_entry
def predict_entry() -> None:
    import lsms_nnunet_ext_hook  # noqa: F401  (registers the trainer folder in nnUNet_extTrainer)
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point

    parser = argparse.ArgumentParser(add_help=False)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("-e", dest="expressions")
    source.add_argument("--text")
    parser.add_argument("--text_encoder", "--text-encoder")
    parser.add_argument("--allow_nonfinite", "--allow-nonfinite", action="store_true")
    args, nnunet_args = parser.parse_known_args()
    if args.expressions:
        if os.path.isdir(args.expressions):
            raise SystemExit(f"-e {args.expressions} is a folder. Fix: point -e at the expressions file itself, e.g. "
                             f"-e {os.path.join(args.expressions, 'expressions.json')}.")
        os.environ[EXPRESSIONS_ENV] = os.path.abspath(args.expressions)
    if args.text is not None:
        if not args.text.strip():
            raise SystemExit("--text is empty. Fix: give the expression, e.g. --text \"the largest cyst\".")
        if (reason := unusable_text_reason(args.text)) is not None:
            raise SystemExit(f"--text {args.text!r} {reason}.")
        os.environ[TEXT_ENV] = args.text
    if args.text_encoder:
        os.environ[TEXT_ENCODER_ENV] = args.text_encoder
    if args.allow_nonfinite:
        os.environ[ALLOW_NONFINITE_ENV] = "1"
    if "-tr" not in nnunet_args:
        nnunet_args += ["-tr", "LSMSTrainer"]
    sys.argv = [sys.argv[0], *nnunet_args]
    predict_entry_point()

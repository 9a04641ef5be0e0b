"""`LSMSv2_predict`: `nnUNetv2_predict` (same flags) plus where the expressions come from.

  -e FILE            expressions file kept elsewhere than the input folder
  --text "..."       one ad-hoc expression asked of every image (ids `<case>-text`)
  --text_encoder X   where the model's text encoder lives on this machine (checked against the checkpoint)
  --allow_nonfinite  predict images with NaN/infinite voxels anyway (refused by default), with a warning

It screens each fold's checkpoint with `torch.load(weights_only=True)` (a file that would run code when nnU-Net's
unrestricted loader reads it is refused), builds an `LSMSPredictor` and hands it these as arguments; the rest is
nnU-Net's predictor, run as `nnUNetv2_predict` runs it.
"""
import argparse
import multiprocessing
import os

from text_conditioning.expressions import unusable_text_reason

from lsms_nnunet.cli import console_entry

DEFAULT_TRAINER = "LSMSTrainer"


def _parser() -> argparse.ArgumentParser:
    # The flags of nnU-Net 2.8.1's predict_entry_point (nnUNetv2_predict), with LSMSTrainer as the default trainer.
    parser = argparse.ArgumentParser(description="nnUNetv2_predict for LSMS models: one mask per expression.")
    parser.add_argument("-i", required=True, help="input folder (images, and expressions.json unless -e/--text)")
    parser.add_argument("-o", required=True, help="output folder (created if missing; not inside -i)")
    parser.add_argument("-d", required=True, help="dataset name or id")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-tr", default=DEFAULT_TRAINER, help=f"trainer class (default {DEFAULT_TRAINER})")
    parser.add_argument("-c", required=True, help="configuration, e.g. 2d or 3d_fullres")
    parser.add_argument("-f", nargs="+", default=(0, 1, 2, 3, 4), help="folds (default 0 1 2 3 4), or all")
    parser.add_argument("-step_size", type=float, default=0.5, help="sliding-window step (default 0.5)")
    parser.add_argument("--disable_tta", action="store_true", help="no test-time mirroring")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--save_probabilities", action="store_true", help="also write <id>.npz probabilities")
    parser.add_argument("--continue_prediction", action="store_true", help="skip images already answered")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    parser.add_argument("-npp", type=int, default=_environment_int("nnUNet_npp", 3), help="preprocessing processes")
    parser.add_argument("-nps", type=int, default=_environment_int("nnUNet_nps", 3), help="export processes")
    parser.add_argument("-prev_stage_predictions", default=None, help="previous stage's predictions (cascades)")
    parser.add_argument("-num_parts", type=int, default=1, help="number of separate calls sharing the images")
    parser.add_argument("-part_id", type=int, default=0, help="which of the -num_parts calls this is")
    parser.add_argument("-device", choices=("cuda", "cpu", "mps"), default="cuda", help="default cuda")
    parser.add_argument("--disable_progress_bar", action="store_true")
    parser.add_argument("--not_on_device", action="store_true", help="keep the sliding window's logits off the GPU")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("-e", dest="expressions", help="expressions file kept elsewhere than the input folder")
    source.add_argument("--text", help="one ad-hoc expression asked of every image")
    parser.add_argument("--text_encoder", "--text-encoder", help="local folder of the model's text encoder")
    parser.add_argument("--allow_nonfinite", "--allow-nonfinite", action="store_true",
                        help="predict images with NaN/infinite voxels anyway, with a warning")
    return parser


def _environment_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name) or default)
    except ValueError:
        return default


def _checked(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """LSMS's own flags, refused with the fix before any model is loaded."""
    if args.expressions and os.path.isdir(args.expressions):
        raise SystemExit(f"-e {args.expressions} is a folder. Fix: point -e at the expressions file itself, e.g. "
                         f"-e {os.path.join(args.expressions, 'expressions.json')}.")
    if args.text is not None:
        if not args.text.strip():
            raise SystemExit("--text is empty. Fix: give the expression, e.g. --text \"the largest cyst\".")
        if (reason := unusable_text_reason(args.text)) is not None:
            raise SystemExit(f"--text {args.text!r} {reason}.")
    if not 0 <= args.part_id < args.num_parts:
        parser.error(f"-part_id must be in 0..{args.num_parts - 1} (-num_parts {args.num_parts}).")
    return args


@console_entry
def predict_entry() -> None:
    parser = _parser()
    args = _checked(parser.parse_args(), parser)
    import torch
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    import lsms_nnunet_ext_hook  # noqa: F401  (registers the trainer folder in nnUNet_extTrainer)
    from lsms_nnunet.inference.predictor import LSMSPredictor, PredictionRequest
    from lsms_nnunet.inference.model_files import screen_checkpoint

    if args.device == "cpu":  # thread settings as nnUNetv2_predict chooses them
        torch.set_num_threads(multiprocessing.cpu_count())
    elif args.device == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    predictor = LSMSPredictor(tile_step_size=args.step_size, use_gaussian=True, use_mirroring=not args.disable_tta,
                              perform_everything_on_device=not args.not_on_device, device=torch.device(args.device),
                              verbose=args.verbose, verbose_preprocessing=args.verbose,
                              allow_tqdm=not args.disable_progress_bar,
                              request=PredictionRequest(
                                  expressions_file=os.path.abspath(args.expressions) if args.expressions else None,
                                  ad_hoc_text=args.text, text_encoder_source=args.text_encoder,
                                  allow_nonfinite=args.allow_nonfinite))
    folds = [fold if fold == "all" else int(fold) for fold in args.f]
    model_folder = get_output_folder(args.d, args.tr, args.p, args.c)
    for fold in folds:  # nnU-Net's loader unpickles without restriction: screen each file first
        checkpoint = os.path.join(model_folder, f"fold_{fold}", args.chk)
        if os.path.isfile(checkpoint):
            screen_checkpoint(checkpoint, args.c)
    predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint_name=args.chk)
    created = not os.path.isdir(args.o)
    os.makedirs(args.o, exist_ok=True)
    try:
        if args.npp == 0 and args.nps == 0:
            predictor.predict_from_files_sequential(args.i, args.o, save_probabilities=args.save_probabilities,
                                                    overwrite=not args.continue_prediction,
                                                    folder_with_segs_from_prev_stage=args.prev_stage_predictions)
        else:
            predictor.predict_from_files(args.i, args.o, save_probabilities=args.save_probabilities,
                                         overwrite=not args.continue_prediction, num_processes_preprocessing=args.npp,
                                         num_processes_segmentation_export=args.nps,
                                         folder_with_segs_from_prev_stage=args.prev_stage_predictions,
                                         num_parts=args.num_parts, part_id=args.part_id)
    except BaseException:
        if created and not os.listdir(args.o):  # a refused run leaves no empty output folder behind
            os.rmdir(args.o)
        raise

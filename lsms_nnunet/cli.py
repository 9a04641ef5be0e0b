"""Console entry points print an expected error as its message alone, and keep the traceback for real bugs.

Every project error says what is wrong, in which file, and the fix; a 40-line traceback above it hides that. Errors
of other kinds are bugs (or nnU-Net's own failures) and keep their full traceback. `LSMS_TRACEBACK=1` shows the
traceback of expected errors too.
"""
from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

TRACEBACK_ENV = "LSMS_TRACEBACK"

#: (module, class): the project's errors for bad inputs, mismatches and missing files. Looked up only in modules
#: already imported (an error can only come from one), so a light command does not import torch or nnU-Net for this.
EXPECTED_ERRORS = (
    ("text_conditioning.expressions", "ExpressionsError"),
    ("text_conditioning.encoders", "TextEncoderError"),
    ("text_conditioning.cache", "TextCacheError"),
    ("text_conditioning.cache", "MissingEmbeddingError"),
    ("text_conditioning.model_texts", "TextEncoderMismatchError"),
    ("lsms_nnunet.evaluation.evaluate", "EvaluationInputError"),
    ("lsms_nnunet.inference.predictor", "UnsafeOutputError"),
    ("lsms_nnunet.inference.input_checks", "InputChannelsError"),
    ("lsms_nnunet.preprocessing.image_checks", "ImageContentError"),
    ("lsms_nnunet.preprocessing.encode_text", "SplitsFileError"),
    ("lsms_nnunet.datasets.geometry", "ConversionError"),
    ("lsms_nnunet.training.lsms_trainer", "TooFewCasesError"),
    ("lsms_nnunet.selection.stage", "CaseLevelStageError"),
    ("lsms_nnunet.selection.settings", "CaseLevelSettingsError"),
    ("lsms_nnunet.inference.model_files", "UnsafeCheckpointError"),
    ("lsms_nnunet.benchmark.preparation", "BenchmarkSetupError"),
    ("lsms_nnunet.benchmark.training_runner", "TrainingFailedError"),
    ("lsms_nnunet.planning.plan_experiment", "LSMSPlanningError"),
    ("builtins", "FileNotFoundError"),
)


def is_expected_error(error: BaseException) -> bool:
    """True for the project's own error classes (and missing files), whose message is the whole story."""
    for module_name, class_name in EXPECTED_ERRORS:
        error_class = getattr(sys.modules.get(module_name), class_name, None)
        if error_class is not None and isinstance(error, error_class):
            return True
    return False


def console_entry(entry: Callable[[], None]) -> Callable[[], None]:
    """Decorate an `LSMSv2_*` entry: an expected error -> `<command>: error: <message>` on stderr, exit code 1."""
    @functools.wraps(entry)
    def run_entry() -> None:
        try:
            entry()
        except Exception as error:
            if not is_expected_error(error) or os.environ.get(TRACEBACK_ENV):
                raise
            print(f"{os.path.basename(sys.argv[0])}: error: {error}", file=sys.stderr)
            sys.exit(1)

    return run_entry

"""`LSMSv2_train`: exactly `nnUNetv2_train` (same flags), with the LSMS trainers registered even without the .pth hook."""
import sys

from lsms_nnunet.cli import console_entry


@console_entry
def train_entry() -> None:
    import lsms_nnunet_ext_hook  # noqa: F401  (registers the trainer folder in nnUNet_extTrainer)
    from nnunetv2.run.run_training import run_training_entry

    if "-tr" not in sys.argv:
        sys.argv += ["-tr", "LSMSTrainer"]
    run_training_entry()

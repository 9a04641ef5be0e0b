"""Re-export for nnU-Net's `nnUNet_extTrainer` search: the classes live in the installed package (stable __module__)."""
from lsms_nnunet.training.lsms_trainer import LSMSTrainer  # noqa: F401
from lsms_nnunet.training.variants import *  # noqa: F401,F403

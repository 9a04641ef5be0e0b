"""Imported by lsms_nnunet_ext_trainer.pth at interpreter start: lets the stock nnU-Net commands find LSMSTrainer.

Adds the plugin's trainer folder to nnU-Net's `nnUNet_extTrainer` search path. Cheap: no nnU-Net or torch import.
"""
import os

_folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lsms_nnunet", "nnunet_ext")
_paths = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
if os.path.isdir(_folder) and _folder not in _paths:
    os.environ["nnUNet_extTrainer"] = os.pathsep.join(_paths + [_folder])

"""Trainer variants: the ablation table (LSMSConfig ABLATIONS) is the one source of the ablation trainers and the
benchmark's variants; the demo's quick trainer is seeded."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

import lsms_nnunet
from lsms_nnunet.benchmark.variants import VARIANTS_BY_NAME
from lsms_nnunet.network.config import ABLATIONS, LSMSConfig
from lsms_nnunet.training.lsms_trainer import LSMSTrainer
from lsms_nnunet.training.variants import FULL_ABLATION, ablation_trainer_name

NNUNET_EXT = Path(lsms_nnunet.__file__).parent / "nnunet_ext"


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_nnunet_finds_each_ablation_trainer_with_the_tables_config(ablation):
    trainer = recursive_find_python_class(str(NNUNET_EXT), ablation_trainer_name(ablation), "lsms_nnunet.nnunet_ext")
    assert issubclass(trainer, LSMSTrainer)
    assert LSMSConfig(**trainer.lsms_config_overrides) == LSMSConfig().with_ablation(ablation)


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_the_benchmark_trains_each_ablation_with_its_trainer(ablation):
    variant = VARIANTS_BY_NAME["lsms" if ablation == FULL_ABLATION else f"lsms_{ablation}"]
    assert variant.trainer == ablation_trainer_name(ablation) and variant.uses_text


def test_a_new_ablation_needs_no_code():
    """What another engineer does: add a table entry. Its trainer and benchmark variant must follow by themselves."""
    program = (
        "from lsms_nnunet.network.config import ABLATIONS\n"
        "ABLATIONS['no_probe'] = {'contrastive': False, 'decoder': 'unet'}\n"
        "from lsms_nnunet.training import variants\n"
        "from lsms_nnunet.benchmark.variants import VARIANTS_BY_NAME\n"
        "trainer = variants.LSMSTrainer_budget_no_probe\n"
        "print(trainer.__module__, trainer.lsms_config_overrides, VARIANTS_BY_NAME['lsms_no_probe'])\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, encoding="utf-8",
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == (
        "lsms_nnunet.training.variants {'contrastive': False, 'decoder': 'unet'} "
        "Variant(name='lsms_no_probe', trainer='LSMSTrainer_budget_no_probe', "
        "description=\"LSMS with contrastive=False, decoder='unet'\")")


def test_the_quick_trainer_seeds_every_generator_before_nnunet_builds_anything(monkeypatch):
    """LSMSTrainer_quick (the demo's) draws the same numbers on every run, and others with LSMS_BUDGET_SEED."""
    import random

    import numpy as np
    import torch

    from lsms_nnunet.training.variants import BUDGET_SEED_ENV, _QuickBudget

    class _Recorder:
        def __init__(self, *args, **kwargs):
            self.drawn = (random.random(), float(np.random.rand()), float(torch.rand(1)))

    class _Probe(_QuickBudget, _Recorder):
        pass

    monkeypatch.delenv(BUDGET_SEED_ENV, raising=False)
    first, again = _Probe({}, "2d", 0, {}).drawn, _Probe({}, "2d", 0, {}).drawn
    assert first == again
    monkeypatch.setenv(BUDGET_SEED_ENV, "1")
    other = _Probe({}, "2d", 0, {}).drawn
    assert all(a != b for a, b in zip(first, other))

"""LSMSTrainer's training step under DistributedDataParallel, before a GPU ever sees it: two CPU processes (gloo).

nnU-Net trains on several GPUs with `-num_gpus` by wrapping the network in DDP. What LSMS adds must survive that:
the text is bound on the wrapped module (`_unwrapped_network`), the auxiliary outputs (finding head, contrastive
embeddings, existence logits) are produced inside the DDP forward and used by the loss, and every parameter must
receive a gradient in every step (nnU-Net's DDP has no `find_unused_parameters`, so an unused one is an error at the
next step). Checked for every entry of the ablation table with nnU-Net's own train_step and its DDP batch Dice.
"""
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from torch.nn.parallel import DistributedDataParallel

from lsms_nnunet.network.config import ABLATIONS
from lsms_nnunet.network.lsms_net import build_lsms_network
from lsms_nnunet.network.losses import VisionLanguageContrastiveLoss
from lsms_nnunet.network.prompting import PromptableLSMSNet
from lsms_nnunet.training.lsms_trainer import LSMSLoss, LSMSTrainer

from test_network import TINY, image, patch_shape, plans_architecture, random_text

WORLD_SIZE, STEPS = 2, 2


def _trainer_on(network: DistributedDataParallel, config) -> LSMSTrainer:
    """An LSMSTrainer holding what nnU-Net's train_step reads (network, loss, optimizer, device, grad scaler); the
    rest of a trainer (dataset, plans, logging) plays no part in one step."""
    trainer = LSMSTrainer.__new__(LSMSTrainer)
    trainer.is_ddp, trainer.network, trainer.device, trainer.grad_scaler = True, network, torch.device("cpu"), None
    trainer.optimizer = torch.optim.SGD(network.parameters(), 1e-2, momentum=0.99, nesterov=True)
    levels = len(plans_architecture(2, False)["arch_kwargs"]["features_per_stage"]) - 1
    dice_and_ce = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": True}, {},
                                 dice_class=MemoryEfficientSoftDiceLoss)  # nnU-Net's DDP Dice gathers over ranks
    trainer.loss = LSMSLoss(DeepSupervisionWrapper(dice_and_ce, [1 / 2 ** i for i in range(levels)]),
                            VisionLanguageContrastiveLoss(config) if config.contrastive else None, network.module)
    return trainer


def _batch(rank: int, step: int) -> dict:
    """Different data, targets and texts on each rank; targets carry the all-lesion channel."""
    target = torch.zeros(2, 2, *patch_shape(2))
    target[:, 0, 2 + rank:9, 3:10 + step] = 1
    target[:, 1] = target[:, 0]
    target[:, 1, 20:26, 20:26] = 1
    levels = len(plans_architecture(2, False)["arch_kwargs"]["features_per_stage"]) - 1
    targets = [torch.nn.functional.interpolate(target, scale_factor=1 / 2 ** i, mode="nearest-exact")
               for i in range(levels)]
    tokens, mask = random_text(2, 10 * rank + step)
    return {"data": image(2, seed=10 * rank + step), "target": targets, "text_tokens": tokens, "text_mask": mask,
            "text_keys": [f"text {rank} {step} {i}" for i in range(2)]}


def _train_every_ablation(rank: int, init_file: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    torch.set_num_threads(1)
    report = {}
    architecture = plans_architecture(2, False)
    for ablation in ABLATIONS:
        config = TINY.with_ablation(ablation)
        torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
        network = build_lsms_network(architecture["network_class_name"], architecture["arch_kwargs"],
                                     architecture["_kw_requires_import"], 1, 2, True, config,
                                     network_class=PromptableLSMSNet)
        network.model_card = {}
        trainer = _trainer_on(DistributedDataParallel(network), config)
        losses = [float(trainer.train_step(_batch(rank, step))["loss"]) for step in range(STEPS)]
        without_gradient = [name for name, p in network.named_parameters() if p.grad is None]
        weights = torch.cat([p.detach().flatten() for p in network.parameters()])
        gathered = [torch.zeros_like(weights) for _ in range(WORLD_SIZE)]
        dist.all_gather(gathered, weights)
        report[ablation] = {"losses": losses, "without_gradient": without_gradient,
                            "weights_differ_across_ranks": float((gathered[0] - gathered[1]).abs().max())}
    dist.destroy_process_group()
    with open(result_file.format(rank=rank), "w", encoding="utf-8") as handle:
        json.dump(report, handle)


@pytest.mark.skipif(not dist.is_gloo_available(), reason="this PyTorch build has no gloo backend")
def test_train_step_is_ddp_correct_in_every_ablation(tmp_path):
    result_file = str(tmp_path / "rank_{rank}.json")
    mp.spawn(_train_every_ablation, args=(str(tmp_path / "init"), result_file), nprocs=WORLD_SIZE, join=True)
    reports = [json.loads((tmp_path / f"rank_{rank}.json").read_text(encoding="utf-8")) for rank in range(2)]
    for ablation in ABLATIONS:
        for report in reports:
            entry = report[ablation]
            assert entry["without_gradient"] == [], (ablation, entry["without_gradient"])
            assert entry["weights_differ_across_ranks"] == 0.0, ablation  # synchronised gradients, same update
            assert all(loss == loss and loss > 0 for loss in entry["losses"]), (ablation, entry["losses"])
        assert reports[0][ablation]["losses"] != reports[1][ablation]["losses"], ablation  # each rank its own data

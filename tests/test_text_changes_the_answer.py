"""Different expressions about one image give different masks, each on its own target, through the real predictor.

A micro referring task: every image holds one bright and one dark blob; "the bright lesion" and "the dark lesion" refer
to one each. The network is controlled (its answer follows the real MiniLM embedding of the text), everything around
it is the real inference path: companion file, preprocessing once per image, both expressions batched as prompts,
per-expression export in the original geometry. Whether training makes LSMS use the text is measured by the benchmark
(LSMS vs the constant-text control), not here.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from text_conditioning.encoders import EncoderIdentity

from lsms_nnunet.inference.predictor import LSMSPredictor
from text_conditioning.model_texts import embed_texts
from lsms_nnunet.network.lsms_net import LSMSNet
from lsms_nnunet.network.prompting import PromptableLSMSNet

DATASET = 514
SIZE = 48
TEXTS = {"bright": "the bright lesion", "dark": "the dark lesion"}


def _blob_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    image = rng.normal(60, 8, (SIZE, SIZE)).astype(np.float32)
    regions = np.zeros((SIZE, SIZE), np.uint8)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    ids = rng.permutation([1, 2])
    centres = [(rng.integers(8, 18), rng.integers(8, 40)), (rng.integers(30, 40), rng.integers(8, 40))]
    rng.shuffle(centres)
    targets = {}
    for (kind, value), region_id, (cy, cx) in zip((("bright", 220.0), ("dark", -80.0)), ids, centres):
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(4, 7) ** 2
        image[disk] = value + rng.normal(0, 8, disk.sum())
        regions[disk] = region_id
        targets[kind] = int(region_id)
    return image, regions, targets


def _write_dataset(raw_root: Path, train_cases: int, test_cases: int) -> Path:
    folder = raw_root / f"Dataset{DATASET}_BrightDark"
    rng = np.random.default_rng(0)
    expressions = {"Tr": [], "Ts": []}
    for split, count in (("Tr", train_cases), ("Ts", test_cases)):
        (folder / f"images{split}").mkdir(parents=True)
        (folder / f"labels{split}").mkdir()
        for index in range(count):
            case = f"blob_{split.lower()}{index:02d}"
            image, regions, targets = _blob_case(rng)
            sitk.WriteImage(sitk.GetImageFromArray(image[None]), str(folder / f"images{split}" / f"{case}_0000.nii.gz"))
            sitk.WriteImage(sitk.GetImageFromArray(regions[None]), str(folder / f"labels{split}" / f"{case}.nii.gz"))
            expressions[split] += [{"id": f"{case}-{kind}", "case": case, "text": TEXTS[kind], "targets": [region]}
                                   for kind, region in targets.items()]
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "region_1": 1, "region_2": 2},
        "numTraining": train_cases, "file_ending": ".nii.gz"}))
    for split, target in (("Tr", folder / "expressions.json"), ("Ts", folder / "imagesTs" / "expressions.json")):
        target.write_text(json.dumps({"format": "lsms-expressions", "version": 1, "expressions": expressions[split]}))
    return folder


class _TextControlledBase(LSMSNet):
    """Stands in for a trained LSMS: target logit = (+x or -x) - 0.5, the sign read from the text embedding.

    Only the network is controlled; batching prompts, mapping channels to expressions, resampling and export are the
    real LSMSPredictor path.
    """

    def __init__(self, direction: torch.Tensor):
        nn.Module.__init__(self)
        self.direction = direction

    def forward(self, x, text_tokens, text_mask, return_aux=False, contrastive_aux=True):
        real = text_mask.unsqueeze(-1).float()
        sentence = (text_tokens * real).sum(1) / real.sum(1)
        sign = torch.sign(sentence @ self.direction).view(-1, 1, *([1] * (x.ndim - 2)))
        images = x.repeat_interleave(text_tokens.shape[0] // x.shape[0], dim=0)
        target = sign * images[:, :1] - 0.5
        logits = torch.cat((torch.zeros_like(target), target), dim=1)
        return (logits, {}) if return_aux else logits  # no auxiliary outputs: no existence decision


class _TextControlledNet(PromptableLSMSNet, _TextControlledBase):
    pass


@pytest.mark.slow  # trains a network for a minute or more
def test_two_expressions_on_one_image_segment_their_own_lesions(run, nnunet_dirs, tmp_path):
    folder = _write_dataset(Path(nnunet_dirs["nnUNet_raw"]), train_cases=5, test_cases=3)
    run("LSMSv2_plan_and_preprocess", "-d", DATASET, "-c", "2d", "-np", 1, nnUNet_n_proc_DA="1")
    identity = EncoderIdentity.from_dict(
        json.loads((Path(nnunet_dirs["nnUNet_preprocessed"]) / folder.name / "lsms_text" / "prompts.json")
                   .read_text(encoding="utf-8"))["encoder"])
    tokens, mask = embed_texts([TEXTS["bright"], TEXTS["dark"]], identity)
    sentences = (tokens * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    network = _TextControlledNet(sentences[0] - sentences[1])
    network.model_card = {"mode": "referring", "text_encoder": identity.to_dict(), "constant_text": None}
    plans = PlansManager(str(Path(nnunet_dirs["nnUNet_preprocessed"]) / folder.name / "nnUNetPlans.json"))
    dataset_json = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    predictor = LSMSPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.manual_initialization(network, plans, plans.get_configuration("2d"), None,
                                    {**dataset_json, "labels": {"background": 0, "target": 1}}, "LSMSTrainer", None)
    out = tmp_path / "out"
    predictor.predict_from_files(str(folder / "imagesTs"), str(out), num_processes_preprocessing=1,
                                 num_processes_segmentation_export=1)
    expressions = json.loads((folder / "imagesTs" / "expressions.json").read_text(encoding="utf-8"))["expressions"]
    for case in sorted({e["case"] for e in expressions}):
        regions = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTs" / f"{case}.nii.gz")))
        masks = {e["targets"][0]: sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{e['id']}.nii.gz"))) > 0
                 for e in expressions if e["case"] == case}
        assert not np.array_equal(masks[1], masks[2])
        for own, other in ((1, 2), (2, 1)):
            own_overlap = (masks[own] & (regions == own)).sum() / (regions == own).sum()
            other_overlap = (masks[own] & (regions == other)).sum() / (regions == other).sum()
            assert own_overlap > 0.8 and other_overlap < 0.2, (case, own, own_overlap, other_overlap)

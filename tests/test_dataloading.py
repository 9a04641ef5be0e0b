"""(case, prompt) sampling on top of nnU-Net's loader: referred-region oversampling, lazy binarisation, text tensors."""
import numpy as np
import torch

from nnunetv2.utilities.label_handling.label_handling import LabelManager

from lsms_nnunet.preprocessing.prompts import FINDING_TEXT, Prompt
from lsms_nnunet.training.dataloading import (LSMSDataLoader, PromptSamplingDataset, ReferredSegmentation,
                                              TextEmbeddingBank)


class _FakeDataset:
    """The part of nnU-Net's dataset API the loader uses: identifiers and load_case."""

    def __init__(self, seg: np.ndarray):
        self.identifiers = ["case"]
        self.seg = seg

    def load_case(self, identifier):
        locations = {int(r): np.argwhere(self.seg == r) for r in np.unique(self.seg) if r > 0}
        data = np.random.rand(1, *self.seg.shape[1:]).astype(np.float32)
        return data, self.seg, None, {"class_locations": locations}


def _region_map() -> np.ndarray:
    seg = np.zeros((1, 1, 64, 64), dtype=np.int16)
    seg[0, 0, 2:6, 2:6] = 1        # region 1 top-left
    seg[0, 0, 56:60, 56:60] = 2    # region 2 bottom-right
    seg[0, 0, 0, :] = -1           # nnU-Net's outside-of-mask marker
    return seg


def test_referred_segmentation_binarises_only_the_crop():
    view = ReferredSegmentation(_region_map(), [2])
    crop = view[(slice(None), slice(None), slice(0, 64), slice(50, 64))]
    assert crop.shape == (1, 1, 64, 14)
    assert crop.sum() == 16 - 14  # the 4x4 region 2 minus the -1 row (14 columns of -1)
    assert (crop[0, 0, 0] == -1).all()
    assert (view[:][0, 0, 2:6, 2:6] == 0).all()  # region 1 is not referred


def test_loader_oversamples_the_referred_region_and_carries_text():
    texts = ["the lesion at the bottom right", "the lesion at the top left"]
    prompts = {"case": [Prompt((texts[0],), (2,), "case-e0")]}
    bank = TextEmbeddingBank({t: (np.full((4, 8), i, np.float32), np.array([1, 1, 0, 0], bool), np.zeros(8))
                              for i, t in enumerate(texts)})
    loader = LSMSDataLoader(_FakeDataset(_region_map()), 4, (16, 16), (16, 16),
                            LabelManager({"background": 0, "target": 1}, None), prompts_by_case=prompts,
                            text_bank=bank, oversample_foreground_percent=1.0)
    batch = loader.generate_train_batch()
    assert batch["data"].shape == (4, 1, 16, 16)
    assert batch["target"].shape == (4, 1, 16, 16)
    assert batch["text_keys"] == [texts[0]] * 4
    assert torch.equal(batch["text_tokens"], torch.zeros(4, 4, 8))
    assert batch["text_mask"].dtype == torch.bool
    # every sample is forced onto the referred region (id 2), which is binarised to 1; region 1 never shows up
    assert all((batch["target"][i] == 1).any() for i in range(4))
    assert set(torch.unique(batch["target"]).tolist()) <= {-1, 0, 1}


class _TwoCaseDataset(_FakeDataset):
    def __init__(self, seg: np.ndarray):
        super().__init__(seg)
        self.identifiers = ["case_a", "case_b"]
        self.loaded: list[str] = []

    def load_case(self, identifier):
        self.loaded.append(identifier)
        return super().load_case(identifier)


def test_each_drawn_image_is_asked_different_questions_in_one_batch():
    """prompts_per_image=2: consecutive slots hold the same case with prompts of different targets, so the batch
    can only be fitted through the text."""
    texts = ["the top-left lesion", "the bottom-right lesion", "both lesions"]
    prompts = {case: [Prompt((texts[0],), (1,), f"{case}-e0"), Prompt((texts[1],), (2,), f"{case}-e1"),
                      Prompt((texts[2],), (1, 2), f"{case}-e2")] for case in ("case_a", "case_b")}
    bank = TextEmbeddingBank({t: (np.full((4, 8), i, np.float32), np.ones(4, bool), np.zeros(8))
                              for i, t in enumerate(texts)})
    dataset = _TwoCaseDataset(_region_map())
    loader = LSMSDataLoader(dataset, 6, (64, 64), (64, 64), LabelManager({"background": 0, "target": 1}, None),
                            prompts_by_case=prompts, text_bank=bank, prompts_per_image=2)
    for _ in range(20):
        dataset.loaded.clear()
        batch = loader.generate_train_batch()
        assert dataset.loaded[0::2] == dataset.loaded[1::2]
        for first, second in zip(batch["text_keys"][0::2], batch["text_keys"][1::2]):
            assert first != second
        for first, second in zip(batch["target"][0::2], batch["target"][1::2]):
            assert not torch.equal(first, second)  # same image (whole-image patch), different answers


def test_the_finding_prompt_refers_to_every_lesion_of_the_case():
    """The finding prompt (all_regions) has no listed targets: every region of the drawn case is its answer."""
    prompts = {"case": [Prompt(("all lesions",), (), "case-finding", all_regions=True)]}
    bank = TextEmbeddingBank({"all lesions": (np.zeros((4, 8), np.float32), np.ones(4, bool), np.zeros(8))})
    loader = LSMSDataLoader(_FakeDataset(_region_map()), 2, (64, 64), (64, 64),
                            LabelManager({"background": 0, "target": 1}, None), prompts_by_case=prompts,
                            text_bank=bank)
    target = loader.generate_train_batch()["target"]
    assert (target[:, 0, 2:6, 2:6] == 1).all() and (target[:, 0, 56:60, 56:60] == 1).all()
    assert int((target == 1).sum()) == 2 * 32


def test_finding_fraction_sets_how_often_the_finding_prompt_is_drawn():
    prompts = {"case": [Prompt(("all lesions",), (), "case-finding", all_regions=True),
                        Prompt(("the upper lesion",), (1,), "case-e0"), Prompt(("the lower lesion",), (2,), "case-e1")]}
    bank = TextEmbeddingBank({text: (np.zeros((4, 8), np.float32), np.ones(4, bool), np.zeros(8))
                              for text in ("all lesions", "the upper lesion", "the lower lesion")})
    counts = {}
    for fraction in (0.0, 0.75):
        loader = LSMSDataLoader(_FakeDataset(_region_map()), 8, (64, 64), (64, 64),
                                LabelManager({"background": 0, "target": 1}, None), prompts_by_case=prompts,
                                text_bank=bank, finding_fraction=fraction)
        keys = [key for _ in range(40) for key in loader.generate_train_batch()["text_keys"]]
        counts[fraction] = keys.count("all lesions") / len(keys)
    assert abs(counts[0.0] - 1 / 3) < 0.08 and abs(counts[0.75] - 0.75) < 0.08


def test_context_regions_are_neither_lesions_nor_finding_targets():
    """An organ labelled as context is background to the finding head's all-lesion channel and to the finding
    prompt's oversampling."""
    region_map = _region_map()
    region_map[0, 0, 30:40, 30:40] = 9  # the organ, context id 9
    view = ReferredSegmentation(region_map, [2], all_lesions=True, context_ids=(9,))
    lesions = view[(slice(None), slice(None), slice(0, 64), slice(0, 64))][1, 0]
    assert int((lesions == 1).sum()) == 32 and (lesions[30:40, 30:40] == 0).all()
    dataset = PromptSamplingDataset(_FakeDataset(region_map), {"case": [Prompt((FINDING_TEXT,), (), "f", True)]},
                                    0.0, context_ids=(9,))
    _, segmentation, _, properties = dataset.load_case("case")
    assert list(segmentation.targets) == [1, 2]
    organ = {(y, x) for y in range(30, 40) for x in range(30, 40)}
    assert len(properties["class_locations"][1]) == 32
    assert not any(tuple(location[2:]) in organ for location in properties["class_locations"][1])


def test_all_lesions_channel_holds_every_region_beside_the_referred_one():
    """The finding head's target: a second channel with all lesions, cropped and augmented with the first."""
    view = ReferredSegmentation(_region_map(), [2], all_lesions=True)
    assert view.shape == (2, 1, 64, 64)
    crop = view[(slice(None), slice(None), slice(0, 64), slice(0, 64))]
    referred, lesions = crop[0, 0], crop[1, 0]
    assert int((referred == 1).sum()) == 16 and (referred[2:6, 2:6] == 0).all()
    assert int((lesions == 1).sum()) == 32 and (lesions[2:6, 2:6] == 1).all() and (lesions[56:60, 56:60] == 1).all()
    assert (crop[:, 0, 0] == -1).all()  # the outside-of-mask marker stays in both channels
    texts = ["the lesion at the bottom right"]
    bank = TextEmbeddingBank({texts[0]: (np.zeros((4, 8), np.float32), np.ones(4, bool), np.zeros(8))})
    loader = LSMSDataLoader(_FakeDataset(_region_map()), 2, (64, 64), (64, 64),
                            LabelManager({"background": 0, "target": 1}, None),
                            prompts_by_case={"case": [Prompt((texts[0],), (2,), "case-e0")]}, text_bank=bank,
                            all_lesions_target=True)
    target = loader.generate_train_batch()["target"]
    assert target.shape == (2, 2, 64, 64)
    assert [int((target[:, c] == 1).sum()) for c in (0, 1)] == [2 * 16, 2 * 32]


def test_anatomy_channel_holds_the_context_regions_in_their_declared_order():
    """The anatomy head's target: a last channel with context ids mapped to 1..K (here id 9 -> 2, id 7 -> 1),
    lesions and background 0, the outside-of-mask marker kept."""
    region_map = _region_map()
    region_map[0, 0, 30:40, 30:40] = 9
    region_map[0, 0, 40:44, 0:10] = 7
    view = ReferredSegmentation(region_map, [2], all_lesions=True, context_ids=(7, 9), anatomy=True)
    assert view.shape == (3, 1, 64, 64)
    crop = view[(slice(None), slice(None), slice(0, 64), slice(0, 64))]
    anatomy = crop[2, 0]
    assert (anatomy[30:40, 30:40] == 2).all() and (anatomy[40:44, 0:10] == 1).all()
    assert int((anatomy > 0).sum()) == 100 + 40 and anatomy[0, 0] == -1
    assert int((crop[1, 0] == 1).sum()) == 32  # the lesions channel ignores the organs

"""The embedded synthetic referring dataset: CT-like livers whose lesions only the text can tell apart.

Each image holds 2-5 liver lesions of four kinds with distinct looks (cyst, hemangioma, HCC, metastasis) and of
clearly different sizes. Each expression refers to a subset of them by kind, lobe, size rank, attribute or count, and
about one in eight refers to nothing in the image; a model that ignores the text therefore cannot reach a high Dice.
With --organ_context the label maps also hold the
liver itself as a context region (`LIVER_LABEL`, declared in dataset.json's `lsms_context`): anatomy the expressions
speak of, never a target.
The dataset lets the whole pipeline (planning, text encoding, training, inference, evaluation) run offline in minutes.
Every expression carries a report category (kind, kind_lobe, lobe, attribute, plural, size, no_target). With
--heldout_phrasing, a second phrasebook of synonyms and templates never used in training words a copy of the test
cases' expressions (beside the seen ones in imagesTs/expressions.json, marked `phrasing` heldout) and of the training
expressions (expressions_heldout.json), so that generalisation to new wording can be measured.

Lobe convention (radiological display): arrays have the x axis last and SimpleITK's identity direction (LPS), so a
low x index, the image's left side, is the patient's right. The liver sits on the patient's right. A thin dark
interlobar fissure crosses it: the part on the image-left side is the "right lobe", the part on the image-right side
the "left lobe". A lesion belongs to the lobe of its centre; lesions never cross the fissure.

The stages, in the order a case is made: anatomy.py (the image and its lesions), phrasing.py (the expressions and
their words), cases.py (one case), writing.py (the nnU-Net raw dataset on disk and `LSMSv2_make_synthetic`).
"""
from lsms_nnunet.datasets.synthetic.anatomy import (DEFAULT_SHAPES, KINDS, LIVER_LABEL, LOBES, MAX_LESIONS,
                                                    MIN_SIZE_RATIO, PLAIN_LABELS, SPACINGS, SyntheticLesion)
from lsms_nnunet.datasets.synthetic.cases import SyntheticCase, generate_case
from lsms_nnunet.datasets.synthetic.phrasing import (ATTRIBUTE_KINDS, HELDOUT_PHRASEBOOK, HELDOUT_SYNONYMS,
                                                     SEEN_PHRASEBOOK, SyntheticExpression)
from lsms_nnunet.datasets.synthetic.writing import make_synthetic_dataset, make_synthetic_entry

__all__ = ["ATTRIBUTE_KINDS", "DEFAULT_SHAPES", "HELDOUT_PHRASEBOOK", "HELDOUT_SYNONYMS", "KINDS", "LIVER_LABEL", "LOBES",
           "MAX_LESIONS", "MIN_SIZE_RATIO", "PLAIN_LABELS", "SEEN_PHRASEBOOK", "SPACINGS", "SyntheticCase",
           "SyntheticExpression", "SyntheticLesion", "generate_case", "make_synthetic_dataset", "make_synthetic_entry"]

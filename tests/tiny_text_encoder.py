"""A tiny random-weight BERT encoder for fast tests: same interfaces as a real model, loads in well under a second."""
from __future__ import annotations

import os
import string
from pathlib import Path

import torch

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MEDICAL_WORDS = (
    "the", "a", "an", "all", "every", "each", "any", "no", "none", "only", "one", "two", "three", "four", "five",
    "first", "second", "third", "largest", "smallest", "biggest", "large", "small", "tiny", "big", "medium",
    "lesion", "lesions", "cyst", "cysts", "tumor", "tumors", "tumour", "tumours", "mass", "masses", "nodule",
    "nodules", "metastasis", "metastases", "hemangioma", "abscess", "left", "right", "upper", "lower", "middle",
    "central", "anterior", "posterior", "superior", "inferior", "medial", "lateral", "lobe", "lobes", "segment",
    "liver", "lung", "kidney", "brain", "spleen", "pancreas", "hepatic", "renal", "in", "of", "on", "at", "near",
    "to", "and", "or", "with", "without", "than", "most", "more", "less", "bright", "dark", "hypodense",
    "hyperdense", "isodense", "round", "irregular", "enhancing", "image", "slice", "side", "part", "region",
)


def _vocabulary() -> list[str]:
    """Special tokens, medical words, and every letter and digit (also as a '##' continuation), so no word is [UNK]."""
    characters = string.ascii_lowercase + string.digits
    pieces = list(SPECIAL_TOKENS) + list(MEDICAL_WORDS) + list(characters) + [f"##{c}" for c in characters]
    pieces += list(".,;:!?-'\"()")
    return list(dict.fromkeys(pieces))


def make_tiny_text_encoder(folder: str | os.PathLike, hidden_size: int = 32, num_layers: int = 2,
                           seed: int = 0) -> str:
    """Write a random BertModel and a WordPiece tokenizer to ``folder`` with save_pretrained; return the folder.

    The same arguments always give the same weights file (and so the same EncoderIdentity); another seed gives
    another one, which is how tests simulate "the encoder changed".
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocabulary = {piece: index for index, piece in enumerate(_vocabulary())}
    max_positions = 64

    word_piece = Tokenizer(models.WordPiece(vocabulary, unk_token="[UNK]"))
    word_piece.normalizer = normalizers.BertNormalizer(lowercase=True)
    word_piece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    word_piece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocabulary["[CLS]"]), ("[SEP]", vocabulary["[SEP]"])])
    word_piece.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_piece, model_max_length=max_positions,
                                        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                        mask_token="[MASK]")
    tokenizer.save_pretrained(str(folder))

    config = BertConfig(vocab_size=len(vocabulary), hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=2 if hidden_size % 2 == 0 else 1, intermediate_size=2 * hidden_size,
                        max_position_embeddings=max_positions, pad_token_id=vocabulary["[PAD]"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    model.save_pretrained(str(folder))
    return str(folder)

"""The case-level selector: which of a case's lesion candidates an expression refers to.

A patch-level network answers "what does this lesion look like, is it the kind asked for" but cannot compare lesions
it does not see together. The selector works on the whole case after the sliding window, in two learned parts:

- a *match* score per candidate: does this lesion fit the description ("cyst", "hypodense", "in the left lobe")?
  Each word states a constraint on the candidate's descriptors (a direction, a bias and a gate that says how much
  the word constrains at all) and the match is their soft conjunction: the product of the gated per-word
  probabilities. Reading words rather than the pooled sentence keeps one word's meaning whatever wording surrounds
  it: on the synthetic 2D benchmark (3 seeds) an MLP over the sentence embedding scored 0.84 on seen and 0.67 on
  held-out wording, the conjunction 0.89 and 0.78, and "left" / "right", nearly one point in sentence space,
  became separable;
- a soft choice among set *operations* read from the words: all matching candidates, or the largest, smallest or
  second largest of them. Each word votes and the strongest votes count (a soft maximum), so one word ("smallest",
  "second") decides even in a sentence of otherwise unseen wording; a word never fitted votes as its nearest fitted
  words do (VOTE_SNAP_TEMPERATURE). Each operation is the exact probability under
  independent matches (e.g. "largest": this one matches and no larger one does), so the relation itself is
  computed, not learned from a few examples. A sentence means one operation: fitting maximises the likelihood of
  the whole answer as a mixture over operations (its first steps with every candidate held as matching, so the
  operations are learned before the match could explain a rare relation instead), and prediction uses the most
  likely one.

It is fitted on the training cases' expressions and lesion candidates (selection/case_level.py), saved next to the
fold's checkpoint and applied by the predictor to the components of the network's finding answer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from text_conditioning.io import atomic_path

#: Set operations over the matching candidates; superlatives of size are the relations radiology reports use.
OPERATIONS = ("all", "largest", "smallest", "second_largest")
SELECTOR_FORMAT, SELECTOR_VERSION = "lsms-case-selector", 2
SELECTOR_FILE = "case_selector.pt"
ENSEMBLE_MEMBERS = 3
#: Prior logit of "all" over the other operations: an operation that explains an answer by coincidence (a kind the
#: match cannot yet tell, answered by "second largest") must not take over. Measured on the synthetic 2D benchmark's
#: fold 0 with ground-truth candidates, 3 seeds: prior 0 -> mean Dice 0.81 (kind 0.76), 3 -> 0.90 but size rank
#: 0.54, 1.5 -> 0.88 with size rank 0.75.
ALL_PRIOR = 1.5
#: Full-batch fitting steps. On the synthetic 2D benchmark (3 seeds, seen / held-out wording): 150 steps 0.883 / 0.775,
#: 300 0.885 / 0.794, 500 0.887 / 0.785, 1000 0.890 / 0.777 (the loss then reaches 0.003: memorised) at 3.3x the time.
FIT_STEPS = 300
#: The first fitting steps learn the operations alone, every candidate held as matching: otherwise the match learns
#: to single out the referred lesion of a rare relation ("the second largest", 3 training expressions) and "largest"
#: explains it, which no new case repeats. Synthetic 2D benchmark, 3 seeds (seen / held-out wording, size rank):
#: 0 steps 0.906 / 0.797, 0.71; 50 steps 0.921 / 0.819, 0.83; 100 steps 0.896 / 0.800, 0.83 (attribute drops).
#: On the 3D benchmark (one training) they traded attribute 0.71 -> 0.41 for size rank 0.62 -> 0.75 (mean 0.678 ->
#: 0.649): with every candidate matching, "the <attribute> lesion" can only be explained by a superlative.
OPERATIONS_FIRST_STEPS = 50
#: After fitting, an operation vote reads each word as a softmax mix (this temperature, over cosine similarity) of the
#: fitting expressions' word embeddings: "the most diminutive lesion" votes as its nearest fitted words do, where the
#: raw embedding of an unseen word votes wherever the linear vote happens to extrapolate. Only the votes: snapping
#: the match as well made negations and locations of unseen wording worse. Synthetic 2D benchmark, 3 seeds (seen /
#: held-out wording): without 0.921 / 0.819 (size rank held-out 0.72); votes snapped at 0.05 0.921 / 0.831 (0.80);
#: match and votes snapped 0.921 / 0.814.
VOTE_SNAP_TEMPERATURE = 0.05


@dataclass
class SelectionExample:
    """One expression of one case: its candidates' descriptors and volumes, its words, the referred candidates."""

    descriptors: np.ndarray  # [K, F]
    volumes: np.ndarray  # [K] mm^3
    words: np.ndarray  # [L, D] token embeddings, real tokens only
    referred: np.ndarray | None = None  # [K] bool (fitting only)


class CaseSelector(nn.Module):
    """Per-candidate probability of being referred to, given the expression's words (see module docstring)."""

    def __init__(self, descriptor_dim: int, text_dim: int, width: int = 64, dropout: float = 0.3):
        super().__init__()
        self.descriptor_dim, self.text_dim, self.width = descriptor_dim, text_dim, width
        self.register_buffer("descriptor_mean", torch.zeros(descriptor_dim))
        self.register_buffer("descriptor_std", torch.ones(descriptor_dim))
        self.candidate = nn.Sequential(nn.Linear(descriptor_dim, width), nn.GELU(), nn.Linear(width, width))
        self.constraint = nn.Sequential(nn.Dropout(dropout), nn.Linear(text_dim, width + 2))  # direction, bias, gate
        self.operation = nn.Sequential(nn.Dropout(dropout), nn.Linear(text_dim, len(OPERATIONS)))
        #: The fitting expressions' word embeddings (VOTE_SNAP_TEMPERATURE); empty while fitting and for selectors
        #: saved before it existed. Saved beside the members, once per ensemble (selectors_to_payload).
        self.register_buffer("vocabulary", torch.zeros(0, text_dim), persistent=False)
        with torch.no_grad():  # prior: "all that match" unless the words consistently say otherwise (an operation
            self.operation[1].bias[0] = ALL_PRIOR  # that explains an answer by coincidence must not take over)

    def forward(self, descriptors: torch.Tensor, volumes: torch.Tensor, valid: torch.Tensor, words: torch.Tensor,
                word_mask: torch.Tensor, operations_only: bool = False, vote_words: torch.Tensor | None = None
                ) -> torch.Tensor:
        """descriptors [E, K, F], volumes [E, K], valid [E, K] bool, words [E, L, D], word_mask [E, L] bool ->
        per-operation probabilities [E, K, operations] and log operation weights [E, operations]. `vote_words`:
        the words as the operation votes read them, when already computed (`vote_words_of`; choose shares them
        among the members of one fitting)."""
        vote_words = self.vote_words_of(words) if vote_words is None else vote_words
        words = _unit_variance(words)
        candidate = self.candidate((descriptors - self.descriptor_mean) / self.descriptor_std)  # [E, K, width]
        direction, bias, gate = self.constraint(words).split((self.width, 1, 1), dim=-1)  # [E, L, width | 1 | 1]
        fit = torch.einsum("ekw,elw->ekl", candidate, direction) / self.width ** 0.5 + bias.squeeze(-1).unsqueeze(1)
        gate = torch.sigmoid(gate.squeeze(-1)) * word_mask  # [E, L]
        match = torch.exp((nn.functional.logsigmoid(fit) * gate.unsqueeze(1)).sum(-1)) * valid  # soft conjunction
        if operations_only:  # fitting's first steps (OPERATIONS_FIRST_STEPS): every candidate held as matching
            match = 0.99 * valid.float()
        votes = self.operation(vote_words).masked_fill(~word_mask.unsqueeze(-1), -1e4)  # [E, L, operations]
        log_weights = torch.log_softmax(torch.logsumexp(votes, dim=1), dim=-1)  # a soft maximum over the words
        larger = (volumes.unsqueeze(1) > volumes.unsqueeze(2)) & valid.unsqueeze(1)  # [E, c, c']: c' larger than c
        smaller = (volumes.unsqueeze(1) < volumes.unsqueeze(2)) & valid.unsqueeze(1)
        log_miss = torch.log((1 - match).clamp_min(1e-6)).unsqueeze(1)  # [E, 1, c']
        none_larger = torch.exp((log_miss * larger).sum(-1))
        none_smaller = torch.exp((log_miss * smaller).sum(-1))
        odds = (match / (1 - match).clamp_min(1e-6)).unsqueeze(1)
        one_larger = none_larger * (odds * larger).sum(-1)  # exactly one larger candidate matches
        by_operation = torch.stack((match, match * none_larger, match * none_smaller, match * one_larger), dim=-1)
        return by_operation * valid.unsqueeze(-1), log_weights

    def vote_words_of(self, words: torch.Tensor) -> torch.Tensor:
        """The words as the operation votes read them: each as the similarity-weighted mix of the fitted vocabulary
        (itself, for a word seen in fitting), or as it is while fitting and for selectors without a vocabulary."""
        if not len(self.vocabulary):
            return _unit_variance(words)
        similarity = nn.functional.normalize(words, dim=-1) @ nn.functional.normalize(self.vocabulary, dim=-1).T
        return _unit_variance(torch.softmax(similarity / VOTE_SNAP_TEMPERATURE, dim=-1) @ self.vocabulary)

    def negative_log_likelihood(self, *inputs: torch.Tensor, referred: torch.Tensor, operations_only: bool = False
                                ) -> torch.Tensor:
        """Mean over expressions of -log P(answer): a sentence means one operation, so the answer's likelihood is a
        mixture over operations of the product over candidates (EM-like credit goes to the operation that explains
        the whole answer)."""
        by_operation, log_weights = self(*inputs, operations_only=operations_only)
        valid = inputs[2].unsqueeze(-1)
        p = by_operation.clamp(1e-6, 1 - 1e-6)
        target = referred.unsqueeze(-1)
        log_likelihood = ((target * p.log() + (1 - target) * (1 - p).log()) * valid).sum(1)  # [E, operations]
        return -torch.logsumexp(log_likelihood + log_weights, dim=-1).mean()


def choose(selectors: Sequence[CaseSelector], examples: Sequence[SelectionExample]) -> list[np.ndarray]:
    """The ensemble's answer per example, a bool array over its candidates: the most likely operation (weights
    averaged over members; a sentence means one operation), then its most likely answer. Under "all" each candidate
    is kept when its probability exceeds 0.5; a superlative refers to exactly one candidate, so the most probable one
    is kept when the chance that any is meant exceeds 0.5 (its candidates' probabilities are exclusive events, so
    they sum to that chance): thresholding each alone gave no answer when two lesions of similar size shared it."""
    inputs = _stack(examples)[:-1]
    with torch.no_grad():
        outputs = [selector.eval()(*inputs, vote_words=vote_words)
                   for selector, vote_words in zip(selectors, member_vote_words(selectors, inputs[3]))]
    weights = torch.stack([log_weights.exp() for _, log_weights in outputs]).mean(0)  # [E, operations]
    by_operation = torch.stack([by_operation for by_operation, _ in outputs]).mean(0)  # [E, K, operations]
    operation = weights.argmax(-1)
    chosen = by_operation.gather(-1, operation[:, None, None].expand(*by_operation.shape[:2], 1))[..., 0]
    answers = []
    for row, example in enumerate(examples):
        probabilities = chosen[row, :len(example.volumes)].numpy()
        if OPERATIONS[int(operation[row])] == "all" or not len(probabilities):
            answers.append(probabilities > 0.5)
        else:
            answers.append((np.arange(len(probabilities)) == probabilities.argmax()) & (probabilities.sum() > 0.5))
    return answers


def member_vote_words(selectors: Sequence[CaseSelector], words: torch.Tensor) -> list[torch.Tensor]:
    """Per member, the words as its operation votes read them, computed once per vocabulary: the members of one
    fitting share theirs (selectors_from_payload), and snapping is most of a member's work at inference."""
    snapped: dict[int, torch.Tensor] = {}
    for selector in selectors:
        if id(selector.vocabulary) not in snapped:
            snapped[id(selector.vocabulary)] = selector.vote_words_of(words)
    return [snapped[id(selector.vocabulary)] for selector in selectors]


def _unit_variance(vectors: torch.Tensor) -> torch.Tensor:
    """Unit-length vectors scaled to unit-variance components."""
    return nn.functional.normalize(vectors, dim=-1) * vectors.shape[-1] ** 0.5


def _stack(examples: Sequence[SelectionExample]):
    """Pad to the largest candidate and word counts: descriptors, volumes, valid, words, word mask, referred."""
    count = max([len(e.volumes) for e in examples] + [1])
    width = next((e.descriptors.shape[1] for e in examples if e.descriptors.ndim == 2), 0)
    descriptors = torch.zeros(len(examples), count, width)
    volumes = torch.zeros(len(examples), count)
    valid = torch.zeros(len(examples), count, dtype=torch.bool)
    referred = torch.zeros(len(examples), count)
    for row, example in enumerate(examples):
        k = len(example.volumes)
        descriptors[row, :k] = torch.as_tensor(example.descriptors, dtype=torch.float32)
        volumes[row, :k] = torch.as_tensor(example.volumes, dtype=torch.float32)
        valid[row, :k] = True
        if example.referred is not None:
            referred[row, :k] = torch.as_tensor(example.referred, dtype=torch.float32)
    length = max(len(e.words) for e in examples)
    words = torch.zeros(len(examples), length, examples[0].words.shape[-1])
    word_mask = torch.zeros(len(examples), length, dtype=torch.bool)
    for row, example in enumerate(examples):
        words[row, :len(example.words)] = torch.as_tensor(example.words, dtype=torch.float32)
        word_mask[row, :len(example.words)] = True
    return descriptors, volumes, valid, words, word_mask, referred


def fit_selector(examples: Sequence[SelectionExample], steps: int = FIT_STEPS, seed: int = 0,
                 learning_rate: float = 1e-3, log=print) -> CaseSelector:
    """Fit a selector on examples with known referred candidates (full batch, Adam, descriptor noise)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    descriptors, volumes, valid, words, word_mask, referred = _stack(examples)
    selector = CaseSelector(descriptors.shape[-1], words.shape[-1])
    real = descriptors[valid]
    selector.descriptor_mean.copy_(real.mean(0))
    selector.descriptor_std.copy_(real.std(0).clamp_min(1e-3))
    optimizer = torch.optim.AdamW(selector.parameters(), lr=learning_rate, weight_decay=1e-3)
    selector.train()
    for step in range(steps):
        noise = 0.05 * torch.randn(descriptors.shape, generator=generator) * selector.descriptor_std
        loss = selector.negative_log_likelihood(descriptors + noise, volumes, valid, words, word_mask,
                                                referred=referred, operations_only=step < OPERATIONS_FIRST_STEPS)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % max(1, steps // 4) == 0:
            log(f"case selector: step {step + 1}/{steps}, loss {loss.item():.4f}")
    selector.vocabulary = torch.unique(words[word_mask], dim=0)
    return selector.eval()


def fit_selectors(examples: Sequence[SelectionExample], members: int = ENSEMBLE_MEMBERS, log=print
                  ) -> list[CaseSelector]:
    """Several selectors from different seeds; `choose` averages them (a few hundred training expressions leave
    single fits seed-sensitive: 0.67 vs 0.73 mean Dice on one benchmark fold). The members hold one vocabulary
    tensor (the same fitting words), so `choose` snaps the words once for all of them, as for loaded members."""
    selectors = [fit_selector(examples, seed=seed, log=log) for seed in range(members)]
    for selector in selectors[1:]:
        selector.vocabulary = selectors[0].vocabulary
    return selectors


def selectors_to_payload(selectors: Sequence[CaseSelector], text_encoder_sha256: str,
                         verdict: Mapping[str, float] | None = None) -> dict:
    """Plain tensors and numbers only, so it loads with weights_only=True (in its own file or in a checkpoint).
    `verdict`: whether the selector or the network alone answers (case_level.Verdict's fields)."""
    first = selectors[0]
    return {"format": SELECTOR_FORMAT, "version": SELECTOR_VERSION, "verdict": dict(verdict) if verdict else None,
            "descriptor_dim": first.descriptor_dim, "text_dim": first.text_dim, "width": first.width,
            "text_encoder_sha256": text_encoder_sha256,
            "members": [selector.state_dict() for selector in selectors],
            "vocabulary": first.vocabulary.half()}  # the members share it (one fitting set); half precision: ~1 MB


def selectors_from_payload(content: dict, text_encoder_sha256: str, source: str) -> list[CaseSelector]:
    if content.get("format") != SELECTOR_FORMAT or content.get("version") != SELECTOR_VERSION:
        raise ValueError(f"{source} holds no case selector of version {SELECTOR_VERSION}. Fix: refit it by rerunning "
                         f"validation (nnUNetv2_train ... --val) with this lsms-nnunet.")
    if content["text_encoder_sha256"] != text_encoder_sha256:
        raise ValueError(f"The case selector in {source} was fitted with another text encoder than its model. Fix: "
                         f"rerun validation (nnUNetv2_train ... --val) to refit it.")
    selectors = []
    # absent from selectors saved before vote snapping: they vote on raw words; one tensor for all members
    vocabulary = content["vocabulary"].float() if "vocabulary" in content else None
    for state in content["members"]:
        selector = CaseSelector(content["descriptor_dim"], content["text_dim"], content["width"])
        selector.load_state_dict(state)
        if vocabulary is not None:
            selector.vocabulary = vocabulary
        selectors.append(selector.eval())
    return selectors


def save_selectors(selectors: Sequence[CaseSelector], path: Path, text_encoder_sha256: str,
                   verdict: Mapping[str, float] | None = None) -> None:
    """Write atomically."""
    with atomic_path(path, suffix=".pt") as temporary:
        torch.save(selectors_to_payload(selectors, text_encoder_sha256, verdict), temporary)


def read_selector_payload(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_selectors(path: Path, text_encoder_sha256: str) -> list[CaseSelector]:
    return selectors_from_payload(read_selector_payload(path), text_encoder_sha256, str(path))

"""The case-level selector: which of a case's lesion candidates an expression refers to.

A patch-level network answers "what does this lesion look like, is it the kind asked for" but cannot compare lesions
it does not see together. The selector works on the whole case after the sliding window, in two learned parts:

- a *match* score per candidate: does this lesion fit the description ("cyst", "hypodense", "in the left lobe")?
  Each word states a constraint on the candidate's descriptors (a direction, a bias and a gate that says how much
  the word constrains at all) and the match is their soft conjunction: the product of the gated per-word
  probabilities. Reading words rather than the pooled sentence keeps one word's meaning whatever wording surrounds
  it ("left" and "right" are nearly one point in sentence space);
- a soft choice among set *operations* read from the words: all matching candidates, or the largest, smallest or
  second largest of them; with `descriptor_superlatives` (opt-in) also of what a superlative orders by: volume, or
  one of the descriptors ("the most cranial", "the lowest", "the brightest" are the extreme of a position or an
  intensity; which one is learned, with votes bounded softly by `vote_bound` so that no early vote leaves an
  alternative too little weight ever to be credited). Each word votes and the strongest votes count (a soft
  maximum), so one word ("smallest", "second") decides even in a sentence of otherwise unseen wording. Each
  operation is the exact probability under
  independent matches (e.g. "largest": this one matches and no larger one does), so the relation itself is computed,
  not learned from a few examples. A sentence means one operation and one ordering: fitting maximises the likelihood
  of the whole answer as a mixture over (operation, ordering) (its first steps with every candidate held as matching,
  so both are learned before the match could explain a rare relation instead), and prediction uses the most likely
  pair.

After fitting, a word never fitted votes as the fitted words it resembles do (`CaseLevelSettings.vote_snap_temperature`)
and, with `word_familiarity`, counts in proportion to how familiar it is (`CaseSelector.read_words`): a word unlike all
of them ("kindly", "focal") then costs little instead of vetoing every candidate (the no-target answer).

Words are handled as rows of unique token embeddings (`SelectionBatch`): at inference a text asked of many
candidate sets is mapped once; while fitting each occurrence gets its own dropout. Several selectors (the ensemble's
members, the verdict's refits) are fitted from one padded batch (`fit_selectors`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from lsms_nnunet.selection.settings import CaseLevelSettings

#: Set operations over the matching candidates, each over an ordering (volume, or a descriptor): the relations
#: radiology reports use ("the largest", "the second largest", "the most cranial").
OPERATIONS = ("all", "largest", "smallest", "second_largest")


@dataclass
class SelectionExample:
    """One expression of one case: its candidates' descriptors and volumes, its words, the referred candidates."""

    descriptors: np.ndarray  # [K, F]
    volumes: np.ndarray  # [K] mm^3
    words: np.ndarray  # [L, D] token embeddings, real tokens only
    referred: np.ndarray | None = None  # [K] bool (fitting only)
    #: The expression it asks (fitting: its examples over different candidate sets read one draw of its words).
    expression: str | None = None


@dataclass
class SelectionBatch:
    """Examples padded to their largest candidate and word counts, the words as indices into unique rows."""

    descriptors: torch.Tensor  # [E, K, F]
    volumes: torch.Tensor  # [E, K]
    valid: torch.Tensor  # [E, K] bool
    word_rows: torch.Tensor  # [N, D] the unique token embeddings
    word_index: torch.Tensor  # [E, L] row of each word (0 where padded)
    word_mask: torch.Tensor  # [E, L] bool
    referred: torch.Tensor  # [E, K] (zeros at inference)
    #: The words as fitting reads them: one row per word of each expression ([T], into word_rows), and per example
    #: the place of each of its words among them ([E, L], 0 where padded).
    occurrence_rows: torch.Tensor
    occurrence_index: torch.Tensor

    def rows(self, chosen: torch.Tensor) -> SelectionBatch:
        """The examples `chosen` (a bool mask over them), over the same word rows."""
        return SelectionBatch(self.descriptors[chosen], self.volumes[chosen], self.valid[chosen], self.word_rows,
                              self.word_index[chosen], self.word_mask[chosen], self.referred[chosen],
                              self.occurrence_rows, self.occurrence_index[chosen])

    @classmethod
    def of(cls, examples: Sequence[SelectionExample]) -> SelectionBatch:
        count = max([len(e.volumes) for e in examples] + [1])
        width = next((e.descriptors.shape[1] for e in examples if e.descriptors.ndim == 2), 0)
        length = max(len(e.words) for e in examples)
        descriptors = torch.zeros(len(examples), count, width)
        volumes = torch.zeros(len(examples), count)
        valid = torch.zeros(len(examples), count, dtype=torch.bool)
        referred = torch.zeros(len(examples), count)
        word_mask = torch.zeros(len(examples), length, dtype=torch.bool)
        all_words = np.concatenate([np.asarray(e.words, dtype=np.float32) for e in examples])
        rows, inverse = np.unique(all_words, axis=0, return_inverse=True)
        word_index = torch.zeros(len(examples), length, dtype=torch.long)
        occurrence_index = torch.zeros(len(examples), length, dtype=torch.long)
        first_place: dict[str, int] = {}  # expression -> where its words start among the occurrences
        occurrences: list[torch.Tensor] = []
        start, placed = 0, 0
        for row, example in enumerate(examples):
            k, words = len(example.volumes), len(example.words)
            descriptors[row, :k] = torch.as_tensor(example.descriptors, dtype=torch.float32)
            volumes[row, :k] = torch.as_tensor(example.volumes, dtype=torch.float32)
            valid[row, :k] = True
            if example.referred is not None:
                referred[row, :k] = torch.as_tensor(example.referred, dtype=torch.float32)
            word_index[row, :words] = torch.as_tensor(inverse.reshape(-1)[start:start + words])
            word_mask[row, :words] = True
            start += words
            if example.expression is None or example.expression not in first_place:
                if example.expression is not None:
                    first_place[example.expression] = placed
                occurrences.append(word_index[row, :words])
                occurrence_index[row, :words] = torch.arange(placed, placed + words)
                placed += words
            else:
                place = first_place[example.expression]
                occurrence_index[row, :words] = torch.arange(place, place + words)
        return cls(descriptors, volumes, valid, torch.from_numpy(rows), word_index, word_mask, referred,
                   torch.cat(occurrences), occurrence_index)

    def inputs(self) -> tuple[torch.Tensor, ...]:
        """What `CaseSelector.forward` takes, in its order."""
        return self.descriptors, self.volumes, self.valid, self.word_rows, self.word_index, self.word_mask


def dropout_keep_mask(shape: tuple[int, ...], p: float) -> torch.Tensor:
    """A bool mask keeping each element with probability 1 - p (p rounded to a multiple of 1/256), from 8 random bits
    per element: the seven uniform low bytes of each int64 that PyTorch's generator draws (its top byte holds 7 bits).
    Several times faster on the CPU than its float sampler, which was most of a fitting step."""
    count = int(np.prod(shape))
    bits = torch.empty((count + 6) // 7, dtype=torch.int64).random_()
    lanes = bits.view(torch.uint8).view(-1, 8)[:, :7].reshape(-1)[:count].view(shape)
    return lanes >= int(round(p * 256))


def dropped_linears(values: torch.Tensor, p: float, *linears: nn.Linear) -> list[torch.Tensor]:
    """Each of `linears` applied to `values` under one draw of dropout (rate p): the mask and the rescaling applied
    once, the rescaling to the (narrower) outputs, the linears as one product."""
    kept = values * dropout_keep_mask(tuple(values.shape), p) if p > 0 else values
    weight = torch.cat([linear.weight for linear in linears])
    bias = torch.cat([linear.bias for linear in linears])
    outputs = nn.functional.linear(kept, weight) / (1 - p) + bias
    return list(outputs.split([linear.out_features for linear in linears], dim=-1))


class CaseSelector(nn.Module):
    """Per-candidate probability of being referred to, given the expression's words (see module docstring)."""

    def __init__(self, descriptor_dim: int, text_dim: int, settings: CaseLevelSettings = CaseLevelSettings()):
        super().__init__()
        self.descriptor_dim, self.text_dim, self.width = descriptor_dim, text_dim, settings.width
        self.vote_snap_temperature = settings.vote_snap_temperature
        self.word_familiarity, self.snap_match = settings.word_familiarity, settings.snap_match
        self.unfamiliar_similarity = settings.unfamiliar_similarity
        self.vote_bound = settings.vote_bound
        self.register_buffer("descriptor_mean", torch.zeros(descriptor_dim))
        self.register_buffer("descriptor_std", torch.ones(descriptor_dim))
        width = settings.width
        self.candidate = nn.Sequential(nn.Linear(descriptor_dim, width), nn.GELU(), nn.Linear(width, width))
        # per word: a direction, a bias and a gate
        self.constraint = nn.Sequential(nn.Dropout(settings.dropout), nn.Linear(text_dim, width + 2))
        self.operation = nn.Sequential(nn.Dropout(settings.dropout), nn.Linear(text_dim, len(OPERATIONS)))
        # per word: a vote for what a superlative orders by, volume or one of the descriptors ("the most cranial",
        # "the brightest"); zero weights, so every word starts at the prior for volume
        self.ordering = nn.Sequential(nn.Dropout(settings.dropout), nn.Linear(text_dim, 1 + descriptor_dim)) \
            if settings.descriptor_superlatives else None
        if self.ordering is not None:
            with torch.no_grad():
                self.ordering[1].weight.zero_()
                self.ordering[1].bias.zero_()
                self.ordering[1].bias[0] = settings.volume_ordering_prior
        #: The fitting expressions' word embeddings (vote snapping); empty while fitting and for selectors saved
        #: before it existed. Saved beside the members, once per ensemble (CaseLevelStage.to_payload).
        self.register_buffer("vocabulary", torch.zeros(0, text_dim), persistent=False)
        with torch.no_grad():  # prior: "all that match" unless the words consistently say otherwise
            self.operation[1].bias[0] = settings.all_prior

    def forward(self, descriptors: torch.Tensor, volumes: torch.Tensor, valid: torch.Tensor, word_rows: torch.Tensor,
                word_index: torch.Tensor, word_mask: torch.Tensor, operations_only: bool = False,
                words_read: tuple[torch.Tensor, torch.Tensor] | None = None,
                fitting_words: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`SelectionBatch.inputs()` -> per-operation probabilities [E, K, operations] and log operation weights
        [E, operations]. `words_read`: `read_words(word_rows)`, when already computed (the members of one fitting
        share it). `fitting_words`: while fitting, the unit-variance embedding of each word of each expression [T, D]
        and where each example's words lie among them [E, L] (`SelectionBatch.occurrence_index`): the constraints
        and the votes both read them, each occurrence under its own draw of dropout."""
        orderings = [] if self.ordering is None else [self.ordering[1]]
        if fitting_words is not None:
            occurrences, place = fitting_words
            constraints, votes, *ordering_votes = dropped_linears(occurrences, self.constraint[0].p,
                                                                  self.constraint[1], self.operation[1], *orderings)
            # [E, L, width + 2], [E, L, operations], [E, L, orderings]
            constraints, votes, ordering_votes = constraints[place], votes[place], [v[place] for v in ordering_votes]
            familiar = None  # while fitting, every word counts
        else:  # each unique word mapped once
            rows, familiarity = self.read_words(word_rows) if words_read is None else words_read
            constraints = self.constraint(rows if self.snap_match else _unit_variance(word_rows))[word_index]
            votes = self.operation(rows)[word_index]
            ordering_votes = [self.ordering(rows)[word_index]] if self.ordering is not None else []
            familiar = familiarity[word_index] if self.word_familiarity else None  # [E, L]
        votes = _bounded(votes, self.vote_bound)
        ordering_votes = [_bounded(v, self.vote_bound) for v in ordering_votes]
        if familiar is not None:  # a word counts by its familiarity: as a vote here, as a constraint in the match
            votes = _familiar_vote(votes, familiar, self.vote_bound)
            ordering_votes = [_familiar_vote(v, familiar, self.vote_bound) for v in ordering_votes]
        if operations_only:  # fitting's first steps: every candidate held as matching
            match = 0.99 * valid.float()
        else:
            direction, bias, gate = constraints.split((self.width, 1, 1), dim=-1)
            candidate = self.candidate((descriptors - self.descriptor_mean) / self.descriptor_std)  # [E, K, width]
            fit = torch.einsum("ekw,elw->ekl", candidate, direction) / self.width ** 0.5 \
                + bias.squeeze(-1).unsqueeze(1)
            gate = torch.sigmoid(gate.squeeze(-1)) * word_mask  # [E, L]
            if familiar is not None:
                gate = gate * familiar
            match = torch.exp((nn.functional.logsigmoid(fit) * gate.unsqueeze(1)).sum(-1)) * valid  # soft conjunction
        log_weights = _soft_maximum_vote(votes, word_mask)
        # what a superlative orders by: volume, then (with the ordering head) each descriptor
        if ordering_votes:
            ordering_weights = _soft_maximum_vote(ordering_votes[0], word_mask)  # [E, orderings]
            keys = torch.cat((volumes.unsqueeze(-1), descriptors), dim=-1).transpose(1, 2)  # [E, orderings, K]
        else:
            ordering_weights, keys = torch.zeros(len(volumes), 1), volumes.unsqueeze(1)
        by_ordering = _set_operations(match, keys, valid)  # [E, orderings, K, operations]
        by_operation = by_ordering.permute(0, 2, 3, 1).reshape(*match.shape, -1)  # operation-major, then ordering
        joint_weights = (log_weights.unsqueeze(-1) + ordering_weights.unsqueeze(1)).flatten(1)
        return by_operation * valid.unsqueeze(-1), joint_weights

    def read_words(self, word_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The words as the fitted selector reads them: unit-variance rows [N, D], each the similarity-weighted mix of
        the fitted vocabulary (itself, for a word seen in fitting), and how much each counts [N] in [0, 1]: with
        `word_familiarity`, "no word" joins the mix at `unfamiliar_similarity` and a word counts by the share the
        fitted words hold. Words as they are, all counting, while fitting and for selectors without a vocabulary."""
        counts = torch.ones(len(word_rows))
        if not len(self.vocabulary):
            return _unit_variance(word_rows), counts
        similarity = nn.functional.normalize(word_rows, dim=-1) @ nn.functional.normalize(self.vocabulary, dim=-1).T
        if self.word_familiarity:
            no_word = torch.full((len(word_rows), 1), self.unfamiliar_similarity)
            counts = 1 - torch.softmax(torch.cat((similarity, no_word), dim=-1) / self.vote_snap_temperature, -1)[:, -1]
        return _unit_variance(torch.softmax(similarity / self.vote_snap_temperature, dim=-1) @ self.vocabulary), counts


def _familiar_vote(votes: torch.Tensor, familiar: torch.Tensor, bound: float) -> torch.Tensor:
    """Votes [E, L, choices] counted by each word's familiarity [E, L]: shifted by its log, and for bounded votes
    also shrunk by it (a bounded vote of an unfamiliar word would otherwise still reach the known words' range)."""
    familiar = familiar.unsqueeze(-1)
    shrunk = votes * familiar if bound > 0 else votes
    return shrunk + torch.log(familiar.clamp_min(1e-6))


def _bounded(votes: torch.Tensor, bound: float) -> torch.Tensor:
    """Votes bounded softly to +-`bound` (0: as they are)."""
    return bound * torch.tanh(votes / bound) if bound > 0 else votes


def _soft_maximum_vote(votes: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
    """Per example, log weights over the choices the words vote for [E, choices]: the strongest votes count."""
    votes = votes.masked_fill(~word_mask.unsqueeze(-1), -1e4)
    return torch.log_softmax(torch.logsumexp(votes, dim=1), dim=-1)


def _set_operations(match: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per ordering key, the exact probability of each set operation given independent matches: [E, orderings, K,
    operations]. `keys` [E, orderings, K]: what each candidate is ordered by (volume, then each descriptor); "largest"
    is the largest key, "smallest" the smallest."""
    larger = (keys.unsqueeze(2) > keys.unsqueeze(3)) & valid[:, None, None, :]  # [E, o, c, c']: c' above c
    smaller = (keys.unsqueeze(2) < keys.unsqueeze(3)) & valid[:, None, None, :]
    log_miss = torch.log((1 - match).clamp_min(1e-6))[:, None, None, :]  # [E, 1, 1, c']
    none_larger = torch.exp((log_miss * larger).sum(-1))
    none_smaller = torch.exp((log_miss * smaller).sum(-1))
    odds = (match / (1 - match).clamp_min(1e-6))[:, None, None, :]
    one_larger = none_larger * (odds * larger).sum(-1)  # exactly one larger candidate matches
    matching = match.unsqueeze(1).expand_as(none_larger)
    return torch.stack((matching, matching * none_larger, matching * none_smaller, matching * one_larger), dim=-1)


def answer_log_likelihood(by_operation: torch.Tensor, log_weights: torch.Tensor, valid: torch.Tensor,
                          referred: torch.Tensor) -> torch.Tensor:
    """Per expression, log P(answer): a sentence means one operation, so the answer's likelihood is a mixture over
    operations of the product over candidates (EM-like credit goes to the operation that explains the whole
    answer). [E]"""
    p = by_operation.clamp(1e-6, 1 - 1e-6)
    target = referred.unsqueeze(-1)
    log_likelihood = ((target * p.log() + (1 - target) * (1 - p).log()) * valid.unsqueeze(-1)).sum(1)
    return torch.logsumexp(log_likelihood + log_weights, dim=-1)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """PyTorch's intra-op threads set to `count` inside the block, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def choose(selectors: Sequence[CaseSelector], examples: Sequence[SelectionExample]) -> list[np.ndarray]:
    """The ensemble's answer per example, a bool array over its candidates: the most likely operation (weights
    averaged over members; a sentence means one operation), then its most likely answer. Under "all" each candidate
    is kept when its probability exceeds 0.5; a superlative refers to exactly one candidate, so the most probable one
    is kept when the chance that any is meant exceeds 0.5 (its candidates' probabilities are exclusive events, so
    they sum to that chance): thresholding each alone gave no answer when two lesions of similar size shared it."""
    batch = SelectionBatch.of(examples)
    inputs = batch.inputs()
    with torch.no_grad():
        outputs = _over_common_orderings([selector.eval()(*inputs, words_read=words_read) for selector, words_read
                                          in zip(selectors, member_words_read(selectors, batch.word_rows))])
    weights = torch.stack([log_weights.exp() for _, log_weights in outputs]).mean(0)  # [E, operations]
    by_operation = torch.stack([by_operation for by_operation, _ in outputs]).mean(0)  # [E, K, operations]
    operation = weights.argmax(-1)  # an (operation, ordering) pair
    chosen = by_operation.gather(-1, operation[:, None, None].expand(*by_operation.shape[:2], 1))[..., 0]
    orderings = weights.shape[-1] // len(OPERATIONS)
    answers = []
    for row, example in enumerate(examples):
        probabilities = chosen[row, :len(example.volumes)].numpy()
        if OPERATIONS[int(operation[row]) // orderings] == "all" or not len(probabilities):
            answers.append(probabilities > 0.5)
        else:
            answers.append((np.arange(len(probabilities)) == probabilities.argmax()) & (probabilities.sum() > 0.5))
    return answers


def _over_common_orderings(outputs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Members' (probabilities [E, K, operations x orderings], log weights [E, operations x orderings]) over the same
    orderings: a member that orders by volume alone (fitted without descriptor superlatives, e.g. another fold's)
    gives the descriptor orderings no weight."""
    widest = max(weights.shape[-1] for _, weights in outputs) // len(OPERATIONS)

    def padded(values: torch.Tensor, fill: float) -> torch.Tensor:  # [..., operations x orderings], widened
        per_operation = values.unflatten(-1, (len(OPERATIONS), -1))
        return nn.functional.pad(per_operation, (0, widest - per_operation.shape[-1]), value=fill).flatten(-2)

    return [(padded(by_operation, 0.0), padded(weights, -1e4)) for by_operation, weights in outputs]


def member_words_read(selectors: Sequence[CaseSelector], word_rows: torch.Tensor
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per member, `read_words(word_rows)`, computed once per vocabulary: the members of one fitting share theirs,
    and reading the words is most of a member's work at inference."""
    read: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for selector in selectors:
        if id(selector.vocabulary) not in read:
            read[id(selector.vocabulary)] = selector.read_words(word_rows)
    return [read[id(selector.vocabulary)] for selector in selectors]


def _unit_variance(vectors: torch.Tensor) -> torch.Tensor:
    """Unit-length vectors scaled to unit-variance components."""
    return nn.functional.normalize(vectors, dim=-1) * vectors.shape[-1] ** 0.5


def fit_selectors(examples: Sequence[SelectionExample], settings: CaseLevelSettings = CaseLevelSettings(),
                  members: int | None = None, subsets: Sequence[np.ndarray] | None = None, log=print
                  ) -> list[list[CaseSelector]]:
    """Per subset of `examples` (bool masks; default: all of them), `members` selectors from seeds 0..members-1
    (default `settings.ensemble_members`): a few hundred training expressions leave single fits seed-sensitive, and
    `choose` averages the members. The examples are padded and their words indexed once for all fits, which run with
    `settings.threads` threads. The members of one subset hold one vocabulary tensor (their fitting words), so
    `choose` snaps words once for all of them."""
    members = settings.ensemble_members if members is None else members
    with torch_threads(settings.threads):
        batch = SelectionBatch.of(examples)
        fitted = []
        for subset in [None] if subsets is None else subsets:
            part = batch if subset is None else batch.rows(torch.from_numpy(np.asarray(subset, dtype=bool)))
            group = [_fit_one(part, settings, seed, log) for seed in range(members)]
            vocabulary = torch.unique(part.word_rows[part.word_index[part.word_mask]], dim=0)
            for selector in group:
                selector.vocabulary = vocabulary
            fitted.append(group)
    return fitted


def _fit_one(batch: SelectionBatch, settings: CaseLevelSettings, seed: int, log) -> CaseSelector:
    """One selector, full batch: AdamW, descriptor noise, the operations alone for the first steps."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    selector = CaseSelector(batch.descriptors.shape[-1], batch.word_rows.shape[-1], settings)
    real = batch.descriptors[batch.valid]
    selector.descriptor_mean.copy_(real.mean(0))
    selector.descriptor_std.copy_(real.std(0).clamp_min(1e-3))
    votes = [*selector.operation.parameters(), *(selector.ordering.parameters() if selector.ordering else ())]
    match = [parameter for parameter in selector.parameters() if all(parameter is not vote for vote in votes)]
    optimizer = torch.optim.AdamW([{"params": match}, {"params": votes, "lr": settings.vote_learning_rate}],
                                  lr=settings.learning_rate, weight_decay=settings.weight_decay)
    # every expression's words (the votes read them as they are), where the examples of the fit find theirs
    fitting_words = _unit_variance(batch.word_rows)[batch.occurrence_rows], batch.occurrence_index
    selector.train()
    for step in range(settings.fit_steps):
        noise = settings.descriptor_noise * torch.randn(batch.descriptors.shape, generator=generator)
        by_operation, log_weights = selector(batch.descriptors + noise * selector.descriptor_std, *batch.inputs()[1:],
                                             operations_only=step < settings.operations_first_steps,
                                             fitting_words=fitting_words)
        loss = -answer_log_likelihood(by_operation, log_weights, batch.valid, batch.referred).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % max(1, settings.fit_steps // 4) == 0:
            log(f"case selector: step {step + 1}/{settings.fit_steps}, loss {loss.item():.4f}")
    return selector.eval()

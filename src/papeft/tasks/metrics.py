"""Text metrics of the generation tasks, all in percent (0..100) over a corpus.

* SQuAD v1.1 / ReCoRD: exact match and token F1 after the official answer normalisation
  (lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace), each the
  maximum over the gold answers, averaged over questions; the papers' "f1-em" is their mean.
* E2E: ROUGE-L F-measure (`rouge_score`), the maximum over an input's references, averaged;
  corpus BLEU-4 with several references (Papineni et al., 2002), implemented here.
* GSM8K: the final number of a solution, compared numerically.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Iterable, Sequence

# ---------------------------------------------------------------------------- SQuAD / ReCoRD

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def squad_normalize(text: str) -> str:
    """The official SQuAD answer normalisation, in its order: lowercase, remove ASCII punctuation,
    remove the articles a/an/the as whole words, collapse whitespace."""
    text = "".join(ch for ch in str(text).lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(squad_normalize(prediction) == squad_normalize(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall over normalised bags of words (0..1).
    As in the v1.1 script, no shared token (including two empty strings) gives 0."""
    pred, ref = squad_normalize(prediction).split(), squad_normalize(gold).split()
    shared = sum((Counter(pred) & Counter(ref)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred), shared / len(ref)
    return 2 * precision * recall / (precision + recall)


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} examples")
    if not references:
        raise ValueError("no examples to score")


def squad_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"em", "f1", "f1_em"} in percent: per question the best gold answer, then the mean;
    f1_em is the mean of the two (the papers' "f1-em")."""
    _check_lengths(predictions, golds)
    em = sum(max(exact_match(p, g) for g in gs) for p, gs in zip(predictions, golds))
    f1 = sum(max(token_f1(p, g) for g in gs) for p, gs in zip(predictions, golds))
    em, f1 = 100.0 * em / len(golds), 100.0 * f1 / len(golds)
    return {"em": em, "f1": f1, "f1_em": (em + f1) / 2}


# ---------------------------------------------------------------------------- ROUGE-L


@lru_cache(maxsize=1)
def _rouge_l_scorer():
    from rouge_score import rouge_scorer

    # our reading: HF `evaluate`'s defaults (the paper's tool): rougeL, no stemming
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over inputs of the best ROUGE-L F-measure against that input's references, in percent."""
    _check_lengths(predictions, references)
    scorer = _rouge_l_scorer()
    total = sum(scorer.score_multi(list(refs), pred)["rougeL"].fmeasure
                for pred, refs in zip(predictions, references))
    return 100.0 * total / len(references)


# ---------------------------------------------------------------------------- BLEU

_BLEU_TOKEN = re.compile(r"\w+|[^\w\s]")


def bleu_tokens(text: str) -> list[str]:
    """Our reading of BLEU tokenisation: lowercase, words and single punctuation marks as tokens."""
    return _BLEU_TOKEN.findall(str(text).lower())


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Corpus BLEU in percent: n-gram precisions (n = 1..max_n) pooled over the corpus, each
    n-gram count clipped by its largest count in any one reference; geometric mean with
    uniform weights, no smoothing (a zero precision gives 0); brevity penalty against the
    summed reference lengths closest to each prediction's length (ties: the shorter)."""
    _check_lengths(predictions, references)
    matched, possible = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for prediction, refs in zip(predictions, references):
        hyp = bleu_tokens(prediction)
        ref_tokens = [bleu_tokens(r) for r in refs]
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in ref_tokens)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(hyp, n)
            most = Counter()
            for ref in ref_tokens:
                most |= _ngrams(ref, n)  # element-wise maximum over references
            matched[n - 1] += sum(min(c, most[g]) for g, c in counts.items())
            possible[n - 1] += max(len(hyp) - n + 1, 0)
    if hyp_len == 0 or min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / p) for m, p in zip(matched, possible)) / max_n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100.0 * brevity * math.exp(log_precision)


# ---------------------------------------------------------------------------- GSM8K

# a number: optional sign (not after a word character, so "5-3" reads 5 and 3), digits with
# optional thousands commas, optional decimals
_NUMBER = re.compile(r"(?:(?<![\w)])-)?\d+(?:,\d{3})*(?:\.\d+)?")
GSM8K_MARKER = "####"


def parse_number(text: str) -> Decimal | None:
    """A number token (e.g. "1,234", "-5", "3.50") as a Decimal; None if it is not one."""
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def gold_final_number(solution: str) -> Decimal | None:
    """The gold answer of a GSM8K solution: the number after its last `####`, commas removed."""
    if GSM8K_MARKER not in solution:
        return None
    return parse_number(solution.rsplit(GSM8K_MARKER, 1)[1].strip())


def predicted_final_number(text: str) -> Decimal | None:
    """The final number of a generated solution; None if it has none.

    Our reading: the first number after the last `####` when the text has that marker (the
    training targets end "#### N", and text generated after it is not the answer); otherwise
    the last number in the text."""
    if GSM8K_MARKER in text:
        found = _NUMBER.search(text.rsplit(GSM8K_MARKER, 1)[1])
        if found:
            return parse_number(found.group())
    numbers = _NUMBER.findall(text)
    return parse_number(numbers[-1]) if numbers else None


def final_number_accuracy(predictions: Sequence[str], golds: Sequence[str]) -> float:
    """Percent of predictions whose final number equals the gold number (3.50 == 3.5);
    a prediction without a number is wrong."""
    _check_lengths(predictions, golds)
    correct = 0
    for prediction, gold in zip(predictions, golds):
        expected, found = parse_number(gold), predicted_final_number(prediction)
        correct += expected is not None and found is not None and found == expected
    return 100.0 * correct / len(golds)


# ---------------------------------------------------------------------------- label accuracy (every task)

_EDGE_CHARS = string.whitespace + string.punctuation


def normalize_answer(text: str) -> str:
    """Lowercase, `_` -> space, collapse whitespace, strip surrounding whitespace and punctuation."""
    text = re.sub(r"\s+", " ", str(text).lower().replace("_", " "))
    return text.strip(_EDGE_CHARS)


def _matched_label(prediction: str, candidates: Iterable[str]) -> str | None:
    """The longest candidate that equals `prediction` or starts it, followed by a non-alphanumeric."""
    best = None
    for cand in candidates:
        hit = prediction == cand or (
            cand and prediction.startswith(cand) and not prediction[len(cand)].isalnum())
        if hit and (best is None or len(cand) > len(best)):
            best = cand
    return best


def names_a_label(prediction: str, labels: Iterable[str]) -> bool:
    """Whether `prediction` is, or starts with, one of `labels` (as accuracy reads it): an answer that
    names none is wrong whatever the gold label, a failure of format rather than of judgement."""
    return _matched_label(normalize_answer(prediction), {normalize_answer(label) for label in labels}) is not None


def is_correct(prediction: str, answers: Sequence[str], labels: Sequence[str] = ()) -> bool:
    """Whether `prediction` matches a gold answer.

    A prefix match ("yes." / "1\\n" / "yes, because ...") counts, but the longest matching label
    wins, so a prediction matching another, longer label (e.g. "not entailment ...") is wrong
    even if it happened to begin with a gold answer.
    """
    pred = normalize_answer(prediction)
    gold = {normalize_answer(a) for a in answers}
    found = _matched_label(pred, gold | {normalize_answer(label) for label in labels})
    return found is not None and found in gold


def accuracy(predictions: Sequence[str], examples: Sequence, labels: Sequence[str] = ()) -> float:
    """Percentage (0..100) of predictions that match their example's answers (`examples`: tasks.base.Example)."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        raise ValueError("no examples to score")
    correct = sum(is_correct(p, ex.answers, labels) for p, ex in zip(predictions, examples))
    return 100.0 * correct / len(examples)

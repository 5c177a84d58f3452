"""Retrieval over question/answer pairs: the knowledge base of the local LLM engine."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from rapidfuzz import fuzz, process
from rapidfuzz.utils import default_process

__all__ = ["FUZZY_CACHE_SIZE", "KnowledgeBase", "Match", "pairs_from_dialogs"]

FUZZY_CACHE_SIZE = 4096
"""Normalised queries whose fuzzy match a knowledge base remembers (least recently used go
first). Users ask the same questions again and again; a fuzzy scan of every stored question
costs tens of microseconds, a cache hit a dict look-up."""


@dataclass(frozen=True, slots=True)
class Match:
    """A retrieved answer.

    Attributes:
        answer: The answer text, as given.
        question: The stored question that matched, as given (not normalised).
        score: rapidfuzz ``WRatio`` similarity, 0-100 (100 for an exact normalised match).
    """

    answer: str
    question: str
    score: float


class KnowledgeBase:
    """Question/answer pairs looked up by fuzzy question similarity.

    Questions are normalised once with ``rapidfuzz.utils.default_process`` (lower-case, non
    alphanumeric characters replaced by spaces, trimmed). A question given several times keeps
    all its answers in order; lookups return the first, so results are deterministic. Pairs whose
    question normalises to nothing or whose answer is blank are skipped.

    Args:
        pairs: ``(question, answer)`` pairs, in priority order.
        min_score: ``WRatio`` score (0-100) below which :meth:`best_answer` returns None.

    Raises:
        ValueError: If ``min_score`` is outside 0-100.
    """

    def __init__(self, pairs: Sequence[tuple[str, str]], min_score: float = 60.0) -> None:
        if not 0.0 <= min_score <= 100.0:
            raise ValueError(f"min_score must be within 0-100, got {min_score}")
        self.min_score = float(min_score)
        self._answers: dict[str, list[str]] = {}
        self._originals: dict[str, str] = {}
        for question, answer in pairs:
            key = default_process(question)
            if not key or not answer.strip():
                continue
            if key not in self._answers:
                self._answers[key] = []
                self._originals[key] = question
            self._answers[key].append(answer)
        self._keys = list(self._answers)
        self._fuzzy = functools.lru_cache(maxsize=FUZZY_CACHE_SIZE)(self._fuzzy_match)

    def __len__(self) -> int:
        """Return the number of distinct (normalised) questions."""
        return len(self._keys)

    def answers(self, question: str) -> list[str]:
        """Return every answer stored for ``question`` (exact after normalisation), in order."""
        return list(self._answers.get(default_process(question), []))

    def best_answer(self, query: str) -> Match | None:
        """Return the answer of the stored question most similar to ``query``.

        An exact normalised match is a dict look-up (score 100). Otherwise the best question by
        ``rapidfuzz.fuzz.WRatio`` (a weighted mix of simple, partial and token-based Levenshtein
        ratios; rapidfuzz documentation) is chosen with ``process.extractOne``; among equal
        scores the question stored first wins. The pairs never change, so the fuzzy result of
        the last ``FUZZY_CACHE_SIZE`` distinct queries is remembered.

        Args:
            query: Free text, e.g. the user's last message.

        Returns:
            The match, or None when the query is empty or no score reaches ``min_score``.
        """
        key = default_process(query)
        if not key:
            return None
        answers = self._answers.get(key)
        if answers is not None:
            return Match(answer=answers[0], question=self._originals[key], score=100.0)
        return self._fuzzy(key)

    def _fuzzy_match(self, key: str) -> Match | None:
        found = process.extractOne(
            key, self._keys, scorer=fuzz.WRatio, processor=None, score_cutoff=self.min_score
        )
        if found is None:
            return None
        best, score, _index = found
        return Match(answer=self._answers[best][0], question=self._originals[best], score=score)


def pairs_from_dialogs(dialogs: Iterable[Sequence[str]]) -> list[tuple[str, str]]:
    """Turn chatterbot-style dialogs into question/answer pairs.

    Each statement answers the one before it: ``[a, b, c]`` gives ``(a, b)`` and ``(b, c)``
    (the chatterbot-corpus convention). Dialogs with fewer than two statements give nothing.

    Args:
        dialogs: Statements per dialog, in conversation order.

    Returns:
        The pairs in dialog order.
    """
    pairs: list[tuple[str, str]] = []
    for dialog in dialogs:
        pairs.extend(pairwise(dialog))
    return pairs

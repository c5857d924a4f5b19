"""A small knowledge graph of facts about the numbers 0..10 (and their squares), the external knowledge
the digits benchmark retrieves: parity, primality, successor, predecessor, square, number word, and the
closed loops of each digit's glyph. Each fact is a triple with one fixed English verbalization."""

from __future__ import annotations

from dataclasses import dataclass

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
PRIMES = frozenset({2, 3, 5, 7})
# Closed loops of the printed glyphs (4 drawn closed, as in most fonts); only digits have glyphs.
CLOSED_LOOPS = {0: 1, 1: 0, 2: 0, 3: 0, 4: 1, 5: 0, 6: 1, 7: 0, 8: 2, 9: 1}
# Pairs that handwriting makes easy to confuse: the hard negatives of yes/no probes and of
# multiple-choice options, and the digits whose facts serve as distractors.
CONFUSABLE = {0: (6, 8), 1: (7, 4), 2: (7, 3), 3: (8, 5), 4: (9, 1), 5: (6, 3), 6: (5, 0), 7: (1, 2), 8: (3, 0), 9: (4, 7)}

RELATIONS = ("parity", "primality", "successor", "predecessor", "square", "word", "closed_loops")


@dataclass(frozen=True)
class Fact:
    """One triple (head, relation, tail); `head` is a number, `tail` a number or a word."""

    head: int
    relation: str
    tail: int | str

    @property
    def text(self) -> str:
        """The sentence that stands for this fact in prompts and in `fact_token_ids`."""
        h, t = self.head, self.tail
        if self.relation in ("parity", "primality"):
            return f"{h} is {t}."
        if self.relation == "word":
            return f"{t} is the word for {h}."
        if self.relation == "closed_loops":
            return f"{h} has {t} closed loop{'' if t == 1 else 's'}."
        return f"{t} is the {self.relation} of {h}."

    def to_json(self) -> dict:
        return {"head": self.head, "relation": self.relation, "tail": self.tail, "text": self.text}


class NumberKnowledgeGraph:
    """All facts about the numbers 0..10, indexed by (head, relation). Every number has at most one
    fact per relation, so a question's chain of relations has one answer."""

    def __init__(self) -> None:
        facts: list[Fact] = []
        for n in range(11):
            facts.append(Fact(n, "parity", "even" if n % 2 == 0 else "odd"))
            facts.append(Fact(n, "primality", "prime" if n in PRIMES else "not prime"))
            facts.append(Fact(n, "successor", n + 1))
            if n > 0:
                facts.append(Fact(n, "predecessor", n - 1))
            facts.append(Fact(n, "square", n * n))
            facts.append(Fact(n, "word", NUMBER_WORDS[n]))
            if n in CLOSED_LOOPS:
                facts.append(Fact(n, "closed_loops", CLOSED_LOOPS[n]))
        self.facts: tuple[Fact, ...] = tuple(facts)
        self._by_key = {(f.head, f.relation): f for f in facts}

    def lookup(self, head: int, relation: str) -> Fact | None:
        return self._by_key.get((head, relation))

    def follow(self, head: int, relations: tuple[str, ...]) -> list[Fact] | None:
        """The facts met walking `relations` from `head` (each tail is the next head), or None where the
        walk leaves the graph (the predecessor of 0, the loops of 10, a tail that is not a number)."""
        chain: list[Fact] = []
        node: int | str = head
        for relation in relations:
            fact = self.lookup(node, relation) if isinstance(node, int) else None
            if fact is None:
                return None
            chain.append(fact)
            node = fact.tail
        return chain

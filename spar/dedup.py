"""Near-duplicate removal: MinHash signatures of word shingles and an LSH index (`datasketch`).

Texts are kept in order; a text whose estimated Jaccard similarity to an already kept one
reaches the threshold is removed. Deterministic: the permutations are seeded.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"\w+")


def shingles(text: str, size: int) -> set[str]:
    words = _WORD.findall(text.lower())
    if len(words) <= size:
        return {" ".join(words)}
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


def near_duplicates(texts: list[str], threshold: float, num_perm: int, shingle: int) -> list[int]:
    """Indices of the texts to remove (each near-duplicates an earlier kept text)."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    removed: list[int] = []
    for i, text in enumerate(texts):
        m = MinHash(num_perm=num_perm, seed=1)
        for s in shingles(text, shingle):
            m.update(s.encode("utf-8"))
        if lsh.query(m):
            removed.append(i)
        else:
            lsh.insert(str(i), m)
    return removed

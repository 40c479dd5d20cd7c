"""Knowledge sources: what a knowledge method knows about each user, with controls of known effect.

Every knowledge method takes ``source`` (``--set method.source=NAME``) and ``corrupt``:

* ``lm`` (default): the LM's own texts, written from the user's LM history (the first interactions
  of each user, never CTR samples);
* ``template``: a deterministic text of the same LM history (rating statistics, liked and disliked
  genres and titles), no LM: what the history says, without the LM's reading of it;
* ``oracle``: **a deliberate leak, for diagnostics only**: the user's label rate and per-genre
  positive rates over the user's own CTR samples (test labels included for test users). It is the
  upper bound of what a per-user knowledge vector can carry; a pipeline that cannot turn it into a
  gain cannot be expected to turn anything weaker into one;
* ``shuffled``: another user's knowledge (a seeded derangement of users): the knowledge of the
  right *kind* for the wrong user.

``corrupt=P`` corrupts the source for a seeded ``round(P * n_users)`` users, in the way ``corruption``
names:

* ``invert`` (default): ratings ``r -> 6 - r`` in the history the LM (or the template) reads, rates
  ``x -> 1 - x`` in the oracle;
* ``swap``: each corrupted user gets another corrupted user's knowledge, unaltered (a seeded
  derangement among them): a plausible text of the wrong user. An inverted text is a function of
  the user's own behaviour, which a backbone that also sees the user's rated history can learn to
  invert back (docs/coco.md, "The contradiction test"); a swapped one is not.

The corrupted users form the grouping ``corrupt`` (``corrupted`` / ``clean``) of the run's per-group
metrics, which is how a judge's ability to find and remove contradicting knowledge is measured
against ground truth.

Implicit feedback has no rating to invert (every LM-history row is a positive, its code 5 only
means "interacted"; ``6 - r`` would show the LM a column of 1-5 "ratings" of 1). There, a corrupted
user's LM history becomes as many items the user **never** interacted with (in any split; drawn
uniformly, distinct while there are enough, seeded per user by the run's seed and the split seed),
in the history's order and with the user's own counts: knowledge of preferences the user does not
have, worded exactly like true knowledge. The oracle's rates are inverted as on explicit data.

Every text says what the data's :class:`~cocorec.data.raw.Domain` says: its item noun, its tag label
("genres" on MovieLens) and, for implicit data, what the user interacted with and the counts' meaning,
never a rating (MovieLens' texts are unchanged, byte for byte).

All draws (the corrupted users, the derangements) follow the run's seed and the split seed, so a
source is deterministic per (dataset, split, seed).

Example:
    >>> check_source("kar", "oracle", 0.0)
    >>> check_source("kar", "gpt", 0.0)
    Traceback (most recent call last):
    ...
    cocorec.config.ConfigError: method kar: unknown source 'gpt' (one of lm, template, oracle, shuffled)
    >>> check_source("r4ec", "oracle", 0.0)
    Traceback (most recent call last):
    ...
    cocorec.config.ConfigError: method r4ec cannot take source 'oracle' (it takes lm, shuffled)
    >>> derangement(5, np.random.default_rng(0)).tolist()
    [2, 4, 3, 0, 1]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from cocorec.config import ConfigError

__all__ = ["SOURCES", "CORRUPTIONS", "FIELD_VIEWS", "LEAK", "UserSource", "check_source", "check_view", "data_domain",
           "derangement", "has_ratings", "item_noun", "source_label"]

#: Every source and what it is (the oracle's line names the leak wherever it is shown).
SOURCES: dict[str, str] = {
    "lm": "the LM's texts of the user's LM history",
    "template": "a deterministic text of the user's LM history (no LM)",
    "oracle": "LEAK (diagnostic only): the user's label rate and per-genre positive rates over their own samples",
    "shuffled": "another user's knowledge (a seeded derangement of users)",
}
#: How ``corrupt`` corrupts a user's knowledge.
CORRUPTIONS: dict[str, str] = {
    "invert": "ratings r -> 6 - r in the LM history, rates x -> 1 - x in the oracle",
    "swap": "another corrupted user's knowledge, unaltered (a derangement among the corrupted users)",
}
#: What a ``field`` holds of its source: every number (``full``) or, for the oracle, only the numbers its text
#: states (``text``) or only its label rate (``rate``: what a pooled read-out of SmolLM2-135M recovers).
FIELD_VIEWS = ("full", "text", "rate")
#: What the oracle leaks, recorded in the config of every run that uses it.
LEAK = "oracle source: label rates of the user's own CTR samples, test labels included (a diagnostic leak)"

#: Sources each method can take (a method not listed takes every source).
METHOD_SOURCES: dict[str, tuple[str, ...]] = {
    "r4ec": ("lm", "shuffled"),           # reflect and refine are LM passes over the LM's reasoning
    "field": ("oracle", "template"),       # numeric vectors: no text, no LM
    "static": ("lm",),                     # reads no user text: one knowledge vector for everyone
}

_LIKE_WORDS = ((0.2, "dislikes almost all of them"), (0.4, "dislikes most of them"), (0.6, "is mixed about them"),
               (0.8, "likes most of them"), (1.01, "likes almost all of them"))


def check_source(method: str, source: str, corrupt: float, corruption: str = "invert") -> None:
    """Raise :class:`ConfigError` (one line) for an unknown source, a source the method cannot take,
    a corruption fraction outside [0, 1] or an unknown kind of corruption."""
    if source not in SOURCES:
        raise ConfigError(f"method {method}: unknown source {source!r} (one of {', '.join(SOURCES)})")
    allowed = next((v for k, v in METHOD_SOURCES.items() if method == k or method.startswith(k + "-")), tuple(SOURCES))
    if source not in allowed:
        raise ConfigError(f"method {method} cannot take source {source!r} (it takes {', '.join(allowed)})")
    if not (isinstance(corrupt, (int, float)) and 0.0 <= float(corrupt) <= 1.0):
        raise ConfigError(f"method {method}: corrupt must be a fraction in [0, 1] (got {corrupt!r})")
    if corruption not in CORRUPTIONS:
        raise ConfigError(f"method {method}: unknown corruption {corruption!r} (one of {', '.join(CORRUPTIONS)})")


def source_label(source: str, corrupt: float, corruption: str = "invert") -> str:
    """``"lm"``, ``"oracle"``, ``"oracle+corrupt0.3"``, ``"oracle+swap0.3"``: how a run's knowledge is
    named in reports.

    Example:
        >>> source_label("oracle", 0.3), source_label("oracle", 0.3, "swap"), source_label("lm", 0.0, "swap")
        ('oracle+corrupt0.3', 'oracle+swap0.3', 'lm')
    """
    return source + (f"+{'corrupt' if corruption == 'invert' else corruption}{corrupt:g}" if corrupt else "")


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly drawn permutation of ``range(n)`` with no fixed point (``n >= 2``; identity for n < 2)."""
    if n < 2:
        return np.arange(n)
    while True:  # rejection: about e tries on average
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            return p


def _rng(seed: int, split_seed: int, what: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(split_seed), sum(what.encode())])


@dataclass
class UserSource:
    """The per-user knowledge source of one run: ``data`` (a :class:`~cocorec.data.protocol.CTRData`),
    the source name, the corruption fraction, the run's seed and the kind of corruption.

    ``knowledge_user[u]``: whose knowledge user ``u`` gets (``u`` itself unless ``shuffled`` or a
    ``swap``-corrupted user); ``corrupted[u]``: whether user ``u``'s knowledge is corrupted (the
    grouping); ``inverted[u]``: whether it is inverted (``invert``). Texts and vectors are built for
    the user whose knowledge it is, inverted where ``inverted`` says so.
    """

    data: Any
    source: str = "lm"
    corrupt: float = 0.0
    seed: int = 0
    corruption: str = "invert"

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"unknown source {self.source!r} (one of {', '.join(SOURCES)})")
        n = self.data.n_users
        split_seed = int(self.data.config.split_seed)
        self.corrupted = np.zeros(n, dtype=bool)
        n_bad = int(round(float(self.corrupt) * n))
        if n_bad:
            self.corrupted[_rng(self.seed, split_seed, "corrupt").choice(n, size=n_bad, replace=False)] = True
        self.knowledge_user = (derangement(n, _rng(self.seed, split_seed, "shuffle")) if self.source == "shuffled"
                               else np.arange(n))
        if self.corruption not in CORRUPTIONS:
            raise ConfigError(f"unknown corruption {self.corruption!r} (one of {', '.join(CORRUPTIONS)})")
        self.inverted = self.corrupted.copy() if self.corruption == "invert" else np.zeros(n, dtype=bool)
        if self.corruption == "swap" and n_bad:
            if n_bad < 2:
                raise ConfigError(f"corrupt={self.corrupt:g} of {n} users corrupts one user: a swap needs two")
            bad = np.flatnonzero(self.corrupted)
            self.knowledge_user[bad] = self.knowledge_user[bad[derangement(n_bad, _rng(self.seed, split_seed, "swap"))]]

    @property
    def label(self) -> str:
        return source_label(self.source, self.corrupt, self.corruption)

    def groups(self) -> dict[str, list[str]]:
        """The grouping ``corrupt`` (per user: ``corrupted`` / ``clean``) when some users are corrupted."""
        if not self.corrupt:
            return {}
        return {"corrupt": ["corrupted" if c else "clean" for c in self.corrupted]}

    # ------------------------------------------------------------------ the LM history, as read
    def history(self, u: int, corrupted: bool | None = None) -> list[tuple[int, int]]:
        """(item, rating 1-5) of user ``u``'s LM history; when ``u`` is corrupted (``corrupted``: override
        the run's draw), ratings inverted (6 - r), or on implicit data the items replaced by items the
        user never interacted with (codes kept: 5 = interacted)."""
        h = self.data.llm_history(u)
        bad = bool(self.inverted[u]) if corrupted is None else corrupted
        if not bad:
            return h
        if _implicit(self.data):
            return list(zip(self._foreign_items(u, len(h)), (r for _, r in h)))
        return [(i, 6 - r) for i, r in h]

    def counts(self, u: int) -> list[float] | None:
        """The counts of ``u``'s LM history (implicit data with a count column; corrupted or not, the
        user's own, in order), else None."""
        f = getattr(self.data, "llm_history_counts", None)
        return f(u) if f is not None else None

    def _foreign_items(self, u: int, n: int) -> list[int]:
        """``n`` items user ``u`` never interacted with (implicit corruption), seeded per user."""
        own = self._own_items[u]
        cand = np.setdiff1d(np.arange(1, int(self.data.spec.n_items)), own)
        if not len(cand) or not n:
            return [int(i) for i, _ in self.data.llm_history(u)][:n]   # nothing else to show: unchanged
        rng = np.random.default_rng([int(self.seed), int(self.data.config.split_seed), sum(b"corrupt-items"),
                                     int(u)])
        return rng.choice(cand, size=n, replace=len(cand) < n).tolist()

    @cached_property
    def _own_items(self) -> list[np.ndarray]:
        """Per user, every item they interacted with: the LM history and the positive samples of every split."""
        users, items, labels = self._sample_table
        pos = labels > 0
        by_user = pd.Series(items[pos]).groupby(users[pos]).unique() if pos.any() else pd.Series(dtype=object)
        d = self.data
        out = []
        for u in range(d.n_users):
            a, b = d.llm_offsets[u], d.llm_offsets[u + 1]
            mine = by_user.get(u, np.zeros(0, np.int64))
            out.append(np.union1d(np.asarray(d.llm_items[a:b], np.int64), np.asarray(mine, np.int64)))
        return out

    def _liked(self, rating: int) -> bool:
        return rating >= min(5.0, float(self.data.config.positive_threshold))

    # ------------------------------------------------------------------ texts
    def view(self) -> "SourceData":
        """The data as the LM sees it under this source: user ``u``'s profile, LM history and user
        text are those of ``knowledge_user[u]``, ratings inverted where ``corrupted[u]``. Everything
        else (splits, items, features) is the data's own."""
        return SourceData(self)

    def user_texts(self) -> list[str]:
        """Per user, the text an LM reads as that user (CoCo's user text; KAR encodes it for
        ``template`` and ``oracle``, which have no LM pass)."""
        pairs = [(int(self.knowledge_user[u]), bool(self.inverted[u])) for u in range(self.data.n_users)]
        if self.source == "template":
            return [self.template_text(v, c) for v, c in pairs]
        if self.source == "oracle":
            return [self.oracle_text(v, c) for v, c in pairs]
        return self.view().user_text

    def template_text(self, u: int, corrupted: bool | None = None) -> str:
        """A deterministic summary of ``u``'s LM history: rating statistics, genres (tags) and titles;
        on implicit data what the user interacted with, the counts, the tags and the top titles."""
        hist = self.history(u, corrupted)
        dom = data_domain(self.data)
        things, tags_word = dom.item_noun_plural, dom.tag_label.lower()
        if _implicit(self.data):
            return self._implicit_template(hist, self.counts(u), dom)
        if not hist:
            return f"No {things} rated yet."
        info = self.data.item_info
        r = np.array([x for _, x in hist], dtype=float)
        liked = [self._liked(x) for _, x in hist]
        n_liked = int(sum(liked))
        parts = [f"Rated {len(hist)} {things}" + (f", mean rating {r.mean():.1f} of 5" if has_ratings(self.data)
                                                  else "") + f"; liked {n_liked} ({100 * n_liked / len(hist):.0f}%)."]
        pos: dict[str, int] = {}
        neg: dict[str, int] = {}
        for (i, _), ok in zip(hist, liked):
            for t in info[i]["tags"]:
                (pos if ok else neg)[t] = (pos if ok else neg).get(t, 0) + 1
        for word, counts in (("Liked", pos), ("Disliked", neg)):
            top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
            if top:
                parts.append(f"{word} {tags_word}: " + ", ".join(f"{t} ({c})" for t, c in top) + ".")
        order = np.argsort(-r, kind="stable")
        best = [info[hist[j][0]]["title"] for j in order[:3] if liked[j]]
        worst = [info[hist[j][0]]["title"] for j in order[::-1][:3] if not liked[j]]
        if best:
            parts.append("Liked: " + "; ".join(best) + ".")
        if worst:
            parts.append("Disliked: " + "; ".join(worst) + ".")
        return " ".join(parts)

    def _implicit_template(self, hist: list[tuple[int, int]], counts: list[float] | None, dom: Any) -> str:
        """The template text of an implicit LM history: no rating, no "liked" (every row is a positive)."""
        if not hist:
            return f"No {dom.item_noun_plural} yet."
        info = self.data.item_info
        head = f"Interacted with {len(hist)} {dom.item_noun_plural}"
        if counts is not None:
            head += f" ({dom.feedback_meaning}: {_count_text(sum(counts))} in all)"
        parts = [head + "."]
        seen: dict[str, int] = {}
        for i, _ in hist:
            for t in info[i]["tags"]:
                seen[t] = seen.get(t, 0) + 1
        top = sorted(seen.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        if top:
            parts.append(f"Most frequent {dom.tag_label.lower()}: " + ", ".join(f"{t} ({c})" for t, c in top) + ".")
        if counts is not None:
            order = np.argsort(-np.asarray(counts, dtype=float), kind="stable")[:3]
            parts.append(f"Highest {dom.feedback_meaning}: "
                         + "; ".join(f"{info[hist[j][0]]['title']} ({_count_text(counts[j])})" for j in order) + ".")
        else:
            parts.append("Latest: " + "; ".join(info[i]["title"] for i, _ in hist[::-1][:3]) + ".")
        return " ".join(parts)

    def oracle_text(self, u: int, corrupted: bool | None = None) -> str:
        """LEAK: ``u``'s label rate and per-genre positive rates over their own samples, in words and numbers."""
        rate, per_tag, counts = self._oracle(u, corrupted)
        dom = data_domain(self.data)
        by = "genre" if dom.tag_label == "Genres" else dom.tag_label.lower()
        tags = self.data.meta["tag_vocab"]
        genre = ", ".join(f"{tags[j]} {100 * per_tag[j]:.0f}%" for j in _named_tags(counts))
        if _implicit(self.data):   # the samples: the user's own items and the sampled negatives
            return (f"Of the {dom.item_noun_plural} this user was shown, they interacted with {100 * rate:.0f}%."
                    + (f" Interacted with, by {by}: {genre}." if genre else ""))
        word = next(w for cut, w in _LIKE_WORDS if rate < cut)
        return (f"Of the {dom.item_noun_plural} this user was shown, they liked {100 * rate:.0f}%: the user {word}."
                + (f" Liked by {by}: {genre}." if genre else ""))

    # ------------------------------------------------------------------ vectors (the direct field)
    def vectors(self, view: str = "full") -> np.ndarray:
        """``[n_users, D]`` numeric knowledge of ``oracle`` or ``template`` (raw, not standardised);
        ``view="text"``: the oracle's numbers as its text states them (:meth:`oracle_text_vector`);
        ``view="rate"``: only the label rate it states (:meth:`oracle_rate_vector`)."""
        if self.source not in ("oracle", "template"):
            raise ValueError(f"source {self.source!r} has no numeric vector (oracle and template do)")
        check_view(view, self.source)
        f = self.template_vector if self.source == "template" else \
            {"full": self.oracle_vector, "text": self.oracle_text_vector, "rate": self.oracle_rate_vector}[view]
        return np.stack([f(int(self.knowledge_user[u]), bool(self.inverted[u]))
                         for u in range(self.data.n_users)]).astype(np.float32)

    def oracle_vector(self, u: int, corrupted: bool | None = None) -> np.ndarray:
        """[label rate, positive rate per genre] over ``u``'s samples (genre rates shrunk to the user's rate)."""
        rate, per_tag, _ = self._oracle(u, corrupted)
        return np.concatenate([[rate], per_tag])

    def oracle_text_vector(self, u: int, corrupted: bool | None = None) -> np.ndarray:
        """:meth:`oracle_vector` holding only what :meth:`oracle_text` says: the label rate and the named
        genres' rates to a whole percent; every genre the text leaves out at the stated label rate (the
        value the genre rates shrink towards). The ceiling of a perfect reader of the oracle text."""
        rate, per_tag, counts = self._oracle(u, corrupted)
        stated = np.round(100 * rate) / 100
        out = np.full(len(per_tag), stated)
        named = _named_tags(counts)
        out[named] = np.round(100 * per_tag[named]) / 100
        return np.concatenate([[stated], out])

    def oracle_rate_vector(self, u: int, corrupted: bool | None = None) -> np.ndarray:
        """:meth:`oracle_text_vector` without the named genres: the stated label rate in every column. The
        ceiling of a reader that gets the text's label rate but none of its per-genre numbers."""
        v = self.oracle_text_vector(u, corrupted)
        return np.full_like(v, v[0])

    def template_vector(self, u: int, corrupted: bool | None = None) -> np.ndarray:
        """[mean rating / 5, rating std / 2, liked share, log history length, per genre: share of the
        history, liked share (shrunk to the user's)] of ``u``'s LM history."""
        hist = self.history(u, corrupted)
        n_tags = len(self.data.meta["tag_vocab"])
        if not hist:
            return np.zeros(4 + 2 * n_tags)
        r = np.array([x for _, x in hist], dtype=float)
        liked = np.array([self._liked(x) for _, x in hist], dtype=float)
        share, pos = np.zeros(n_tags), np.zeros(n_tags)
        tags = self.data.item_tags.numpy()
        for (i, _), ok in zip(hist, liked):
            for t in tags[i]:
                if t > 0:
                    share[t - 1] += 1
                    pos[t - 1] += ok
        rate = liked.mean()
        genre_rate = (pos + rate) / (share + 1.0)
        head = [r.mean() / 5, r.std() / 2, rate, math.log1p(len(hist)) / math.log1p(30)]
        return np.concatenate([head, share / len(hist), genre_rate])

    # ------------------------------------------------------------------ helpers
    @cached_property
    def _sample_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every CTR sample of every split: (user, item, label)."""
        sp = [self.data.split(s) for s in ("train", "val", "test")]
        return (np.concatenate([s.user for s in sp]), np.concatenate([s.item for s in sp]),
                np.concatenate([s.label for s in sp]))

    def _oracle(self, u: int, corrupted: bool | None) -> tuple[float, np.ndarray, np.ndarray]:
        users, items, labels = self._sample_table
        m = users == u
        y, it = labels[m].astype(float), items[m]
        rate = float(y.mean()) if len(y) else 0.5
        n_tags = len(self.data.meta["tag_vocab"])
        counts, pos = np.zeros(n_tags), np.zeros(n_tags)
        tags = self.data.item_tags.numpy()[it]            # [n, G]
        for j in range(tags.shape[1]):
            t = tags[:, j]
            ok = t > 0
            np.add.at(counts, t[ok] - 1, 1.0)
            np.add.at(pos, t[ok] - 1, y[ok])
        per_tag = (pos + rate) / (counts + 1.0)            # one pseudo-sample at the user's own rate
        bad = bool(self.inverted[u]) if corrupted is None else corrupted
        if bad:
            rate, per_tag = 1.0 - rate, 1.0 - per_tag
        return rate, per_tag, counts


def check_view(view: str, source: str) -> None:
    """A :class:`ConfigError` unless ``view`` is one of :data:`FIELD_VIEWS` that ``source`` has."""
    if view not in FIELD_VIEWS or (view != "full" and source != "oracle"):
        raise ConfigError(f"view must be one of {FIELD_VIEWS} ('text' and 'rate' with the oracle source only), "
                          f"got {view!r}")


def _named_tags(counts: np.ndarray, n: int = 6) -> list[int]:
    """The ``n`` tags the oracle text names: the user's most frequent ones (ties by tag order)."""
    return [int(j) for j in np.argsort(-counts, kind="stable") if counts[j] > 0][:n]


def data_domain(data: Any) -> Any:
    """The data's :class:`~cocorec.data.raw.Domain` (an object without one: MovieLens' for an ``ml-``
    name, else the generic defaults)."""
    from cocorec.data.raw import MOVIELENS, Domain

    dom = getattr(data, "domain", None)
    if dom is not None:
        return dom
    return MOVIELENS if str(getattr(data, "name", "")).startswith("ml-") else Domain()


def item_noun(data: Any) -> str:
    """What the dataset's items are called in texts (``data.domain.item_noun``: "movie" on MovieLens)."""
    return data_domain(data).item_noun


def _implicit(data: Any) -> bool:
    return bool(getattr(data, "implicit", False))


def has_ratings(data: Any) -> bool:
    """Whether the LM history holds ratings to show: never on implicit data (its codes only mean "interacted")."""
    return not _implicit(data) and bool(getattr(data, "meta", {}).get("has_ratings", True))


def _count_text(c: float) -> str:
    return str(int(c)) if float(c).is_integer() else f"{c:g}"


class SourceData:
    """A :class:`~cocorec.data.protocol.CTRData` seen through a :class:`UserSource` (see
    :meth:`UserSource.view`); attributes it does not override are the data's own."""

    def __init__(self, src: UserSource) -> None:
        self._src, self._data = src, src.data
        who = src.knowledge_user
        self.user_profile = [src.data.user_profile[int(v)] for v in who]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._data, name)

    def llm_history(self, u: int) -> list[tuple[int, int]]:
        return self._src.history(int(self._src.knowledge_user[u]), bool(self._src.inverted[u]))

    def llm_history_counts(self, u: int) -> list[float] | None:
        """The counts of the history :meth:`llm_history` shows (the knowledge user's own, in order)."""
        return self._src.counts(int(self._src.knowledge_user[u]))

    @cached_property
    def user_text(self) -> list[str]:
        """The user texts in the data's own wording (its domain; implicit: the counts, never a rating)."""
        from cocorec.data.protocol import user_text

        d = self._data
        if self._src.source == "lm" and not self._src.corrupted.any():   # (a swap is a corruption too)
            return list(d.user_text)
        # Built as the data's own texts are (protocol.build): the stored has_ratings, the domain, the counts.
        rated = bool(d.meta.get("has_ratings", True))
        return [user_text(self.user_profile[u], [(d.item_info[i]["title"], r) for i, r in self.llm_history(u)],
                          rated, domain=data_domain(d), counts=self.llm_history_counts(u)) for u in range(d.n_users)]

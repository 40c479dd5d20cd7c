"""The CTR protocol (docs/data-format.md): labels, LM history, samples, split by user, cache.

Per user, interactions are sorted by time. The first ``n_llm = min(30, len // 2)`` form the
LM history (text for the LM; never CTR samples). Every later interaction is a sample whose
behaviour sequence is the previous ``max_hist_len`` items. Users are split 80/10/10 with a seed.
Implicit feedback (every row a positive): each sample gets ``negatives.ratio`` sampled negatives
(same user, time and behaviour sequence; an item the user never interacted with), drawn with
the split seed.

Example:
    >>> from cocorec.data import prepare
    >>> data = prepare("ml-100k")                       # doctest: +SKIP
    >>> data.split("train").n, data.stats()["test"]     # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch

from cocorec.data.errors import DataError
from cocorec.data.raw import MOVIELENS, Domain, NegativeSampling, RawData, load_raw
from cocorec.errors import one_line
from cocorec.utils.io import atomic_replace_dir, cache_root, key_of, read_json, to_jsonable

PROTOCOL_VERSION = 2   # 2: each user's LM history is their own (1 stored them in id-as-text order)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ProtocolConfig:
    """Settings of the protocol; every field is part of the processed-data cache key."""

    positive_threshold: float = 4.0   # label = rating >= threshold
    max_llm_history: int = 30         # n_llm = min(max_llm_history, len // 2)
    max_hist_len: int = 10            # behaviour sequence length of each sample
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_seed: int = 42
    min_user_interactions: int = 5    # fewer: the user is dropped (counted and reported)
    max_tags: int = 6                 # item tags (genres) kept per item


@dataclass
class FeatureSpec:
    """Vocabulary sizes of every categorical feature (index 0 is padding / unknown)."""

    n_items: int
    n_tags: int
    max_tags: int
    max_hist_len: int
    n_ratings: int = 6  # 0 = padding, 1..5 = rating (label-only data: 1 = negative, 5 = positive)
    user_fields: dict[str, int] = field(default_factory=dict)
    item_fields: dict[str, int] = field(default_factory=dict)


@dataclass
class Split:
    """The samples of one split, as flat numpy arrays (row i = sample i)."""

    user: np.ndarray          # int64 [N]   user index
    item: np.ndarray          # int64 [N]   item index (1..n_items-1)
    label: np.ndarray         # float32 [N]
    hist_items: np.ndarray    # int64 [N, T] previous items, most recent last, 0-padded on the left
    hist_ratings: np.ndarray  # int64 [N, T]
    timestamp: np.ndarray     # int64 [N]
    position: np.ndarray      # int64 [N] index of the interaction in the user's time-ordered sequence

    @property
    def n(self) -> int:
        return len(self.label)


class CTRData:
    """Processed data: feature tables, splits, and the texts the LM methods read.

    Item-side and user-side features live in lookup tables; a batch gathers them by index,
    so nothing is duplicated per sample.
    """

    def __init__(self, name: str, spec: FeatureSpec, config: ProtocolConfig, arrays: dict[str, np.ndarray],
                 meta: dict[str, Any]) -> None:
        self.name, self.spec, self.config, self.meta = name, spec, config, meta
        self.arrays = arrays
        self.user_feats = torch.from_numpy(arrays["user_feats"])        # [U, Fu]
        self.item_feats = torch.from_numpy(arrays["item_feats"])        # [I, Fi]
        self.item_tags = torch.from_numpy(arrays["item_tags"])          # [I, G]
        self.splits = {s: Split(**{k: arrays[f"{s}/{k}"] for k in Split.__dataclass_fields__}) for s in SPLITS}
        self.user_ids: list[str] = meta["user_ids"]
        self.item_ids: list[str] = meta["item_ids"]
        self.user_text: list[str] = meta["user_text"]
        self.item_text: list[str] = meta["item_text"]
        self.user_groups: dict[str, list[str]] = meta["user_groups"]   # group name -> label per user
        # LM history of each user (ragged): items and ratings of the first n_llm interactions.
        self.llm_offsets = arrays["llm_offsets"]
        self.llm_items = arrays["llm_items"]
        self.llm_ratings = arrays["llm_ratings"]
        self.user_profile: list[dict[str, str]] = meta["user_profile"]
        self.item_info: list[dict[str, Any]] = meta["item_info"]
        self.notes: list[str] = meta.get("notes", [])
        self.key: str = meta.get("key", "")
        # What the items are and what the feedback means (prompts read these). MovieLens data
        # processed before these were recorded gets MovieLens' values.
        dom = meta.get("domain")
        self.domain: Domain = Domain.from_dict(dom) if dom else (MOVIELENS if name.startswith("ml-") else Domain())
        #: ``{"type": "explicit" | "implicit", ...}``: see :func:`feedback_info`.
        self.feedback: dict[str, Any] = meta.get("feedback") or {"type": "explicit", "rating_scale": [1.0, 5.0]}
        #: Implicit data with a count column: the count of each LM-history interaction (else None).
        self.llm_counts: np.ndarray | None = arrays.get("llm_counts")

    # ------------------------------------------------------------------ access
    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise KeyError(f"unknown split {name!r}; one of {SPLITS}")
        return self.splits[name]

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def split_users(self, name: str) -> np.ndarray:
        return np.unique(self.split(name).user)

    @property
    def implicit(self) -> bool:
        """Every interaction is a positive (clicks, plays, usage counts); negatives were sampled.

        The LM history's ``rating`` codes are then all 5 (= positive), never a rating: use
        :meth:`llm_history_counts` and ``domain.feedback_meaning`` to say what the user did.
        """
        return self.feedback.get("type") == "implicit"

    def llm_history(self, user: int) -> list[tuple[int, int]]:
        """(item index, rating) pairs of the user's LM history, oldest first."""
        a, b = self.llm_offsets[user], self.llm_offsets[user + 1]
        return list(zip(self.llm_items[a:b].tolist(), self.llm_ratings[a:b].tolist()))

    def llm_history_counts(self, user: int) -> list[float] | None:
        """The counts of the user's LM-history interactions (implicit data with a count column), else None."""
        if self.llm_counts is None:
            return None
        a, b = self.llm_offsets[user], self.llm_offsets[user + 1]
        return self.llm_counts[a:b].tolist()

    def batch(self, split: str, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Gather a batch of samples (by row index) with all their features."""
        s = self.split(split)
        idx = np.asarray(idx)
        user = torch.from_numpy(s.user[idx])
        item = torch.from_numpy(s.item[idx])
        hist = torch.from_numpy(s.hist_items[idx])
        return {
            "user": user,
            "item": item,
            "label": torch.from_numpy(s.label[idx]),
            "user_feats": self.user_feats[user],
            "item_feats": self.item_feats[item],
            "item_tags": self.item_tags[item],
            "hist_items": hist,
            "hist_feats": self.item_feats[hist],
            "hist_tags": self.item_tags[hist],
            "hist_ratings": torch.from_numpy(s.hist_ratings[idx]),
            "hist_mask": hist > 0,
        }

    def batches(self, split: str, batch_size: int, shuffle: bool = False,
                seed: int = 0, epoch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        n = self.split(split).n
        order = np.arange(n)
        if shuffle:
            order = np.random.default_rng([seed, epoch]).permutation(n)
        for start in range(0, n, batch_size):
            yield self.batch(split, order[start:start + batch_size])

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dataset": self.name, "users": self.n_users, "items": self.spec.n_items - 1,
                               "llm_history_interactions": int(len(self.llm_items))}
        for s in SPLITS:
            sp = self.split(s)
            out[s] = {"users": int(len(np.unique(sp.user))), "samples": int(sp.n),
                      "positive_rate": round(float(sp.label.mean()), 4) if sp.n else float("nan")}
        out["notes"] = self.notes
        return out


# ---------------------------------------------------------------------------- building
def _vocab(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Map strings to 1..V (0 = unknown/padding); sorted so the mapping is deterministic."""
    cats = sorted(v for v in values.dropna().astype(str).unique())
    lookup = {c: i + 1 for i, c in enumerate(cats)}
    return values.astype(str).map(lookup).fillna(0).astype(np.int64).to_numpy(), cats


def _clean_interactions(raw: RawData, cfg: ProtocolConfig, notes: list[str]) -> pd.DataFrame:
    df = raw.interactions
    src = f"{raw.name} interactions"
    if len(df) == 0:
        raise DataError("the interactions table is empty", file=src)
    before = len(df)
    key_cols = ["user", "item", "timestamp", "rating"] + [c for c in ("label", "count") if c in df]
    df = df.drop_duplicates(subset=key_cols, keep="first")
    if len(df) < before:
        notes.append(f"dropped {before - len(df)} exact duplicate interaction rows")
    before = len(df)
    df = df.drop_duplicates(subset=["user", "item", "timestamp"], keep="last")
    if len(df) < before:
        notes.append(f"dropped {before - len(df)} conflicting rows with the same user, item and timestamp "
                     f"(kept the last)")
    unknown = ~df["item"].isin(raw.items.index)
    if unknown.any():
        first = df[unknown].iloc[0]
        notes.append(f"dropped {int(unknown.sum())} interactions with items missing from the items table "
                     f"(first: item {first['item']!r} at row {int(first['row'])})")
        df = df[~unknown]
    if "label" not in df.columns:
        df = df.assign(label=(df["rating"] >= cfg.positive_threshold).astype(np.int64))
    counts = df.groupby("user")["item"].transform("size")
    few = counts < cfg.min_user_interactions
    if few.any():
        notes.append(f"dropped {int(df.loc[few, 'user'].nunique())} users with fewer than "
                     f"{cfg.min_user_interactions} interactions ({int(few.sum())} interactions)")
        df = df[~few]
    if len(df) == 0:
        raise DataError(f"no user has at least {cfg.min_user_interactions} interactions", file=src)
    # Stable sort: equal timestamps keep file order.
    return df.sort_values(["user", "timestamp", "row"], kind="stable").reset_index(drop=True)


def _rating_code(df: pd.DataFrame, scale: tuple[float, float] | None = None) -> np.ndarray:
    """Rating codes 1..5 of the behaviour sequence and LM history (a rating scale other than 1-5 is mapped
    linearly onto 1-5); label-only and implicit rows: 5 = positive, 1 = negative."""
    r = df["rating"].to_numpy(dtype=float)
    if scale is not None and tuple(scale) != (1.0, 5.0):
        lo, hi = scale
        r = 1.0 + 4.0 * (r - lo) / (hi - lo)
    code = np.where(np.isnan(r), np.where(df["label"].to_numpy() > 0, 5, 1), np.rint(r))
    return np.clip(code, 1, 5).astype(np.int64)


def _count_text(c: float) -> str:
    return str(int(c)) if float(c).is_integer() else f"{c:g}"


def user_text(profile: dict[str, str], history: list[tuple[str, int]], has_ratings: bool, *,
              domain: Domain | None = None, counts: list[float] | None = None) -> str:
    """The text of a user's profile and LM history ``[(title, rating)]`` that CoCo's LM reads.

    Explicit data: ratings as ``r/5`` (label-only data: liked / not liked), the items named by
    ``domain.item_noun_plural`` (MovieLens, and no ``domain``: "Movies the user watched", as always).
    Implicit data (an implicit ``domain``) lists what the user interacted with, with ``counts`` (what
    ``domain.feedback_meaning`` says) when the data has them: never as a rating.

    Example:
        >>> from cocorec.data.raw import Domain
        >>> apps = Domain(item_noun="app", item_noun_plural="apps", feedback="implicit",
        ...               feedback_meaning="times the user opened it")
        >>> print(user_text({"country": "FR"}, [("Maps", 5), ("Mail", 5)], False, domain=apps, counts=[3, 40]))
        User profile: country: FR.
        Apps the user interacted with, oldest first, with the times the user opened it: Maps (3); Mail (40).
        >>> print(user_text({}, [("Kettle", 4)], True, domain=Domain(item_noun="product", item_noun_plural="products")))
        User profile: unknown.
        Products the user rated, oldest first, with their rating (1-5): Kettle (4/5).
    """
    parts = [f"{k}: {v}" for k, v in profile.items() if v and v != "unknown"]
    prof = "; ".join(parts) if parts else "unknown"
    dom = domain if domain is not None else MOVIELENS
    things = dom.item_noun_plural[:1].upper() + dom.item_noun_plural[1:]
    if dom.implicit:
        if counts is not None:
            hist = "; ".join(f"{t} ({_count_text(c)})" for (t, _), c in zip(history, counts))
            return (f"User profile: {prof}.\n{things} the user interacted with, oldest first, with the "
                    f"{domain.feedback_meaning}: {hist}.")
        hist = "; ".join(t for t, _ in history)
        return f"User profile: {prof}.\n{things} the user interacted with, oldest first: {hist}."
    if has_ratings:
        hist = "; ".join(f"{t} ({r}/5)" for t, r in history)
        verb = "watched" if dom.item_noun == "movie" else "rated"
        return f"User profile: {prof}.\n{things} the user {verb}, oldest first, with their rating (1-5): {hist}."
    hist = "; ".join(f"{t} ({'liked' if r >= 4 else 'not liked'})" for t, r in history)
    # Label-only data: "Items ..." whatever the domain was, until the domain named the items.
    things = "Items" if domain is None else things
    return f"User profile: {prof}.\n{things} the user interacted with, oldest first: {hist}."


def _item_text(info: dict[str, Any], extra: dict[str, str], tag_label: str = "Genres") -> str:
    """An item's text: title, year, its tags under ``tag_label`` (the domain's: "Genres" on MovieLens),
    and the spec's extra text columns."""
    s = f"Title: {info['title']}."
    if info.get("year"):
        s += f" Year: {info['year']}."
    if info.get("tags"):
        s += f" {tag_label}: {', '.join(info['tags'])}."
    for k, v in extra.items():
        if v:
            s += f" {k}: {v}."
    return s


# ---------------------------------------------------------------------------- checks
def check_protocol(cfg: ProtocolConfig) -> None:
    """Settings that cannot act as written are a one-line error, before any data is read."""
    r = tuple(cfg.split_ratios)
    shown = "(" + ", ".join(f"{x:g}" if isinstance(x, (int, float)) else repr(x) for x in r) + ")"
    if len(r) != 3:
        raise DataError(f"protocol.split_ratios needs 3 shares (train, val, test), got {shown}")
    if not all(isinstance(x, (int, float)) and np.isfinite(x) and x >= 0 for x in r):
        raise DataError(f"protocol.split_ratios {shown}: every share must be a number >= 0")
    total = float(sum(r))
    if total > 1 + 1e-6:
        raise DataError(f"protocol.split_ratios {shown} sum to {total:.6g}, over 1")
    if total < 1 - 1e-6:
        raise DataError(f"protocol.split_ratios {shown} sum to {total:.6g}, under 1 (the test split would "
                        f"silently take the remaining users)")
    for name, x in zip(SPLITS, r):
        if x == 0:
            raise DataError(f"protocol.split_ratios {shown}: the {name} share is 0 (every split needs users)")
    for key, low in (("max_hist_len", 1), ("max_tags", 1), ("max_llm_history", 0), ("min_user_interactions", 1),
                     ("split_seed", 0)):
        v = getattr(cfg, key)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < low:
            raise DataError(f"protocol.{key} must be a whole number >= {low}, got {v!r}")
    if not np.isfinite(cfg.positive_threshold):
        raise DataError(f"protocol.positive_threshold must be a finite number, got {cfg.positive_threshold!r}")


def check_protocol_against_data(raw: RawData, cfg: ProtocolConfig) -> None:
    """The dataset never silently replaces a protocol setting: what a run records is what acts.

    A spec's ``positive_threshold`` must equal ``protocol.positive_threshold``; a threshold that cannot
    act (implicit feedback, given labels, outside the rating scale) is an error too.
    """
    src = raw.source or f"{raw.name} interactions"
    thr = cfg.positive_threshold
    has_rating = bool(raw.interactions["rating"].notna().any()) if len(raw.interactions) else False
    default = ProtocolConfig().positive_threshold
    if raw.feedback == "implicit":
        if thr != default:
            raise DataError(f"protocol.positive_threshold {thr:g} does not apply to feedback: implicit (every "
                            f"interaction is a positive; negatives are sampled): leave it at {default:g}", file=src)
        return
    if raw.positive_threshold is not None and raw.positive_threshold != thr:
        raise DataError(f"the spec declares positive_threshold {raw.positive_threshold:g} but "
                        f"protocol.positive_threshold is {thr:g}; the protocol's value is the one every run records, "
                        f"so set it (--set protocol.positive_threshold={raw.positive_threshold:g}) or remove "
                        f"positive_threshold from the spec", file=src)
    if not has_rating:
        if thr != default:
            raise DataError(f"protocol.positive_threshold {thr:g} does not apply: the dataset gives 0/1 labels, "
                            f"not ratings (leave it at {default:g})", file=src)
        return
    lo, hi = raw.rating_scale or (1.0, 5.0)
    if not lo < thr <= hi:
        raise DataError(f"protocol.positive_threshold {thr:g} is not inside the rating scale ({lo:g}, {hi:g}]: "
                        f"every rating would get the same label", file=src)


def feedback_info(raw: RawData, cfg: ProtocolConfig) -> dict[str, Any]:
    """What the prepared data records about its feedback (``CTRData.feedback``)."""
    if raw.feedback == "implicit":
        neg = raw.negatives or NegativeSampling()
        return {"type": "implicit", "count_column": raw.count_column,
                "count_meaning": raw.domain.feedback_meaning if raw.count_column else None,
                "negatives": {"ratio": neg.ratio, "strategy": neg.strategy, "seed": cfg.split_seed,
                              "popularity_from": "interactions of the train split's users"
                              if neg.strategy == "popularity" else None}}
    has_rating = bool(raw.interactions["rating"].notna().any())
    return {"type": "explicit", "rating_scale": list(raw.rating_scale or (1.0, 5.0)) if has_rating else None,
            "positive_threshold": cfg.positive_threshold if has_rating else None}


_NEGATIVE_STREAM = 1   # negatives draw from [split_seed, 1, user index]; the split from split_seed alone


class _NegativeSampler:
    """Draws ``ratio`` distinct negatives per positive for one user at a time (see :class:`NegativeSampling`).

    Each user's draws come from their own generator ``[split_seed, 1, user index]``: the same seed gives
    the same negatives, whatever else changes in other users.
    """

    def __init__(self, neg: NegativeSampling, n_items: int, seed: int, weights: np.ndarray | None,
                 user_ids: list[str], src: str) -> None:
        self.ratio, self.strategy, self.n_items, self.seed = neg.ratio, neg.strategy, n_items, seed
        self.weights, self.user_ids, self.src = weights, user_ids, src

    def draw(self, uid: int, user_items: np.ndarray, m: int) -> np.ndarray:
        r = self.ratio
        rng = np.random.default_rng([self.seed, _NEGATIVE_STREAM, int(uid)])
        mask = np.ones(self.n_items, dtype=bool)
        mask[0] = False
        mask[user_items] = False
        cand = np.flatnonzero(mask)
        p = None
        if self.strategy == "popularity":
            assert self.weights is not None
            w = self.weights[cand]
            cand, w = cand[w > 0], w[w > 0]
            p = w / w.sum() if len(w) else w
        if len(cand) < r:
            why = " (popularity: an item no training user interacted with is never drawn)" if p is not None else ""
            raise DataError(f"user {self.user_ids[uid]!r} leaves {len(cand)} items to sample as negatives, fewer "
                            f"than negatives.ratio {r}{why}", file=self.src)
        cum = np.cumsum(p) if p is not None else None

        def sample(k: int) -> np.ndarray:
            if cum is None:
                return rng.integers(0, len(cand), size=(k, r))
            return np.minimum(np.searchsorted(cum, rng.random((k, r)) * cum[-1], side="right"), len(cand) - 1)

        idx = sample(m)
        if r > 1:   # distinct within one positive: redraw the rows with a repeat
            for _ in range(100):
                srt = np.sort(idx, axis=1)
                dup = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
                if not dup.any():
                    break
                idx[dup] = sample(int(dup.sum()))
            else:
                for i in np.flatnonzero(dup):
                    idx[i] = rng.choice(len(cand), size=r, replace=False, p=p)
        return cand[idx]


def _check_both_classes(arrays: dict[str, np.ndarray], raw: RawData, cfg: ProtocolConfig) -> None:
    """A split with one class has no AUC: an error that says so (never a NaN downstream)."""
    src = f"{raw.name} interactions"
    labels = {s: arrays[f"{s}/label"] for s in SPLITS}
    every = np.concatenate(list(labels.values()))
    rate = float(every.mean())
    for name, lab in labels.items():
        if len(lab) == 0 or lab.min() != lab.max():
            continue
        kind = "positive" if lab[0] > 0 else "negative"
        if 0 < rate < 1:
            why = (f"the data has both (positive rate {rate:.3f}) but this split does not: too few users in it "
                   f"for protocol.split_ratios {tuple(cfg.split_ratios)}")
        elif "label" in raw.interactions and raw.interactions["rating"].isna().all():
            why = (f"every interaction is labelled {int(lab[0])}" + (
                "; a log of positives only is implicit feedback: declare 'feedback: implicit' in the spec to "
                "sample negatives" if lab[0] > 0 else ""))
        elif lab[0] > 0:
            why = (f"every rating is >= protocol.positive_threshold {cfg.positive_threshold:g}; a log of positives "
                   f"only is implicit feedback: declare 'feedback: implicit' in the spec to sample negatives")
        else:
            why = f"no rating reaches protocol.positive_threshold {cfg.positive_threshold:g}"
        raise DataError(f"the {name} split has only {kind} labels ({len(lab)} samples), so AUC is undefined: {why}",
                        file=src)


# ---------------------------------------------------------------------------- building
@dataclass
class _Items:
    """The item tables: ids (index 0 is padding), tags, categorical features, the raw rows."""

    ids: list[str]
    index: dict[str, int]
    rows: pd.DataFrame
    tag_vocab: list[str]
    tags: np.ndarray
    feats: np.ndarray
    fields: dict[str, int]

    @property
    def n(self) -> int:
        return len(self.ids) + 1


@dataclass
class _Users:
    """The user tables: ids, categorical features, profile (for the texts) and groupings (for reports)."""

    ids: list[str]
    index: dict[str, int]
    feats: np.ndarray
    fields: dict[str, int]
    profile: list[dict[str, str]]
    groups: dict[str, list[str]]


def _item_tables(raw: RawData, cfg: ProtocolConfig, df: pd.DataFrame) -> _Items:
    # Items: index 0 is padding; only items that occur in interactions get an index.
    item_ids = sorted(df["item"].unique(), key=lambda s: (len(s), s))
    item_index = {it: i + 1 for i, it in enumerate(item_ids)}
    items = raw.items.loc[item_ids]
    tag_vocab = sorted({t for ts in items["tags"] for t in ts})
    tag_index = {t: i + 1 for i, t in enumerate(tag_vocab)}
    n_items = len(item_ids) + 1
    item_tags = np.zeros((n_items, cfg.max_tags), dtype=np.int64)
    for i, ts in enumerate(items["tags"], start=1):
        ids = [tag_index[t] for t in ts][: cfg.max_tags]
        item_tags[i, : len(ids)] = ids
    decade = items["year"].map(lambda y: "unknown" if pd.isna(y) else f"{int(y) // 10 * 10}s")
    item_cat = {"decade": decade}
    for c in raw.item_categorical:
        if c != "decade":
            item_cat[c] = items[c]
    item_fields: dict[str, int] = {}
    item_feats = np.zeros((n_items, len(item_cat)), dtype=np.int64)
    for j, (c, vals) in enumerate(item_cat.items()):
        codes, cats = _vocab(vals.reset_index(drop=True))
        item_feats[1:, j] = codes
        item_fields[c] = len(cats) + 1
    return _Items(item_ids, item_index, items, tag_vocab, item_tags, item_feats, item_fields)


def _user_tables(raw: RawData, df: pd.DataFrame, notes: list[str]) -> _Users:
    user_ids = sorted(df["user"].unique(), key=lambda s: (len(s), s))
    user_index = {u: i for i, u in enumerate(user_ids)}
    if raw.users is not None:
        missing = [u for u in user_ids if u not in raw.users.index]
        if missing:
            notes.append(f"{len(missing)} users have no profile row (first: {missing[0]!r}); "
                         f"their profile fields are 'unknown'")
        users = raw.users.reindex(user_ids)
    else:
        users = pd.DataFrame(index=pd.Index(user_ids, name="user"))
    user_fields: dict[str, int] = {}
    user_feats = np.zeros((len(user_ids), max(1, len(raw.user_categorical))), dtype=np.int64)
    for j, c in enumerate(raw.user_categorical):
        codes, cats = _vocab(users[c].reset_index(drop=True))
        user_feats[:, j] = codes
        user_fields[c] = len(cats) + 1
    if not raw.user_categorical:
        user_fields["none"] = 1
    profile_cols = [c for c in raw.user_categorical if c != "zip"]
    user_profile = [{c: ("unknown" if pd.isna(v) else str(v)) for c, v in zip(profile_cols, row)}
                    for row in users[profile_cols].itertuples(index=False)] if profile_cols else [{} for _ in user_ids]
    user_groups: dict[str, list[str]] = {}
    for g in raw.group_columns:
        user_groups[g] = users[g].fillna("unknown").astype(str).tolist()
    if len(raw.group_columns) >= 2:
        a, b = raw.group_columns[:2]
        user_groups[f"{a} x {b}"] = [f"{x} / {y}" for x, y in zip(user_groups[a], user_groups[b])]
    return _Users(user_ids, user_index, user_feats, user_fields, user_profile, user_groups)


def _split_of_users(n_users: int, cfg: ProtocolConfig) -> np.ndarray:
    """0 (train), 1 (val) or 2 (test) per user index: a seeded permutation cut by the split ratios."""
    rng = np.random.default_rng(cfg.split_seed)
    perm = rng.permutation(n_users)
    n_train = int(round(cfg.split_ratios[0] * n_users))
    n_val = int(round(cfg.split_ratios[1] * n_users))
    split_of = np.empty(n_users, dtype=np.int64)
    split_of[perm[:n_train]] = 0
    split_of[perm[n_train:n_train + n_val]] = 1
    split_of[perm[n_train + n_val:]] = 2
    return split_of


def _sequences(raw: RawData, cfg: ProtocolConfig, df: pd.DataFrame, items: _Items, users: _Users
               ) -> tuple[dict[str, np.ndarray], _NegativeSampler | None]:
    """Per user, in time order: the first interactions are the LM history (never samples), every later
    one is a sample with the ``max_hist_len`` interactions before it as its behaviour sequence (and,
    for implicit feedback, its sampled negatives). Returns the arrays of the LM histories and splits."""
    user_ids, n_items = users.ids, items.n
    u = df["user"].map(users.index).to_numpy(np.int64)
    it = df["item"].map(items.index).to_numpy(np.int64)
    rc = _rating_code(df, raw.rating_scale)
    lab = df["label"].to_numpy(np.float32)
    ts = df["timestamp"].to_numpy(np.int64)
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    ends = np.r_[starts[1:], len(u)]
    T = cfg.max_hist_len
    split_of = _split_of_users(len(user_ids), cfg)

    # Users come in the interactions' order (sorted by the id as text) but are indexed by ``user_ids``'
    # order: the LM histories are stored per index, so that offsets and contents agree.
    llm_offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
    llm_items: list[np.ndarray] = [np.zeros(0, np.int64)] * len(user_ids)
    llm_ratings: list[np.ndarray] = [np.zeros(0, np.int64)] * len(user_ids)
    cnt = df["count"].to_numpy(np.float64) if "count" in df else None
    llm_counts: list[np.ndarray] = [np.zeros(0, np.float64)] * len(user_ids)
    rows: list[list[np.ndarray]] = [[], [], []]
    sampler = None
    if raw.feedback == "implicit":
        neg = raw.negatives or NegativeSampling()
        weights = None
        if neg.strategy == "popularity":   # from the training users' interactions only
            weights = np.bincount(it[split_of[u] == 0], minlength=n_items).astype(np.float64)
            weights[0] = 0.0
        sampler = _NegativeSampler(neg, n_items, cfg.split_seed, weights, user_ids, raw.source or raw.name)
    for s, e in zip(starts, ends):
        uid = u[s]
        n = e - s
        n_llm = min(cfg.max_llm_history, n // 2)
        llm_items[uid] = it[s:s + n_llm]
        llm_ratings[uid] = rc[s:s + n_llm]
        if cnt is not None:
            llm_counts[uid] = cnt[s:s + n_llm]
        llm_offsets[uid + 1] = n_llm
        pos = np.arange(n_llm, n)
        # hist[j, t] = item at position pos[j] - T + t (0 when before the user's first interaction)
        back = pos[:, None] - T + np.arange(T)[None, :]
        valid = back >= 0
        hi = np.where(valid, it[s + np.clip(back, 0, None)], 0)
        hr = np.where(valid, rc[s + np.clip(back, 0, None)], 0)
        block = np.column_stack([
            np.full(len(pos), uid), it[s + pos], lab[s + pos].view(np.int32).astype(np.int64),
            ts[s + pos], pos, hi, hr])
        if sampler is not None and len(pos):
            # Each positive is followed by its negatives: same user, time, position and behaviour sequence.
            negs = sampler.draw(uid, it[s:e], len(pos))
            r = negs.shape[1]
            block = np.repeat(block, r + 1, axis=0)
            block[:, 1] = np.column_stack([it[s + pos], negs]).reshape(-1)
            block[np.arange(len(block)) % (r + 1) != 0, 2] = 0   # label 0.0 (float32 bits)
        rows[split_of[uid]].append(block)
    llm_offsets = np.cumsum(llm_offsets)

    arrays: dict[str, np.ndarray] = {
        "user_feats": users.feats, "item_feats": items.feats, "item_tags": items.tags,
        "llm_offsets": llm_offsets,
        "llm_items": np.concatenate(llm_items) if llm_items else np.zeros(0, np.int64),
        "llm_ratings": np.concatenate(llm_ratings) if llm_ratings else np.zeros(0, np.int64),
    }
    if cnt is not None:
        arrays["llm_counts"] = np.concatenate(llm_counts) if llm_counts else np.zeros(0, np.float64)
    for k, name in enumerate(SPLITS):
        m = np.concatenate(rows[k]) if rows[k] else np.zeros((0, 5 + 2 * T), np.int64)
        arrays[f"{name}/user"] = m[:, 0].copy()
        arrays[f"{name}/item"] = m[:, 1].copy()
        arrays[f"{name}/label"] = m[:, 2].astype(np.int32).view(np.float32).copy()
        arrays[f"{name}/timestamp"] = m[:, 3].copy()
        arrays[f"{name}/position"] = m[:, 4].copy()
        arrays[f"{name}/hist_items"] = m[:, 5:5 + T].copy()
        arrays[f"{name}/hist_ratings"] = m[:, 5 + T:5 + 2 * T].copy()
        if len(m) == 0:
            raise DataError(f"the {name} split has no samples: too few users ({len(user_ids)}) for the split "
                            f"ratios {cfg.split_ratios}", file=f"{raw.name} interactions")
    return arrays, sampler


def _texts(raw: RawData, items: _Items, users: _Users, arrays: dict[str, np.ndarray]
           ) -> tuple[list[dict[str, Any]], list[str], list[str], bool]:
    """What the LM methods read: item info and texts, and each user's text (profile + LM history)."""
    has_ratings = bool(raw.interactions["rating"].notna().any())
    item_info = []
    extra_cols = list(raw.text_columns)
    for iid, row in zip(items.ids, items.rows.itertuples()):
        info = {"id": iid, "title": str(row.title),
                "year": None if pd.isna(row.year) else int(row.year), "tags": list(row.tags)}
        info["extra"] = {c: str(getattr(row, c)) for c in extra_cols}
        item_info.append(info)
    item_text = [""] + [_item_text(info, info["extra"], raw.domain.tag_label) for info in item_info]
    item_info = [{"id": "", "title": "", "year": None, "tags": [], "extra": {}}] + item_info
    offsets = arrays["llm_offsets"]
    user_texts = []
    for uid in range(len(users.ids)):
        a, b = offsets[uid], offsets[uid + 1]
        hist = [(item_info[i]["title"], int(r)) for i, r in zip(arrays["llm_items"][a:b], arrays["llm_ratings"][a:b])]
        counts = arrays["llm_counts"][a:b].tolist() if "llm_counts" in arrays else None
        user_texts.append(user_text(users.profile[uid], hist, has_ratings, domain=raw.domain, counts=counts))
    return item_info, item_text, user_texts, has_ratings


def build(raw: RawData, cfg: ProtocolConfig) -> CTRData:
    """The protocol on loaded raw data: checks, items, users, per-user sequences (LM history and
    samples, split by user), then the texts the LM methods read."""
    check_protocol(cfg)
    check_protocol_against_data(raw, cfg)
    notes = list(raw.notes)
    df = _clean_interactions(raw, cfg, notes)
    items = _item_tables(raw, cfg, df)
    users = _user_tables(raw, df, notes)
    arrays, sampler = _sequences(raw, cfg, df, items, users)
    _check_both_classes(arrays, raw, cfg)
    feedback = feedback_info(raw, cfg)
    if sampler is not None:
        n_neg = sum(int((arrays[f"{s}/label"] == 0).sum()) for s in SPLITS)
        neg_info = feedback["negatives"]
        notes.append(f"implicit feedback: sampled {n_neg} negatives ({neg_info['ratio']} per positive, "
                     f"{neg_info['strategy']}, seed {neg_info['seed']})")
    item_info, item_text, user_texts, has_ratings = _texts(raw, items, users, arrays)
    spec = FeatureSpec(n_items=items.n, n_tags=len(items.tag_vocab) + 1, max_tags=cfg.max_tags,
                       max_hist_len=cfg.max_hist_len, user_fields=users.fields, item_fields=items.fields)
    meta = {"name": raw.name, "spec": asdict(spec), "config": asdict(cfg), "user_ids": users.ids,
            "item_ids": items.ids, "user_text": user_texts, "item_text": item_text, "user_groups": users.groups,
            "user_profile": users.profile, "item_info": item_info, "tag_vocab": items.tag_vocab, "notes": notes,
            "has_ratings": has_ratings, "domain": raw.domain.to_dict(), "feedback": feedback}
    return CTRData(raw.name, spec, cfg, arrays, meta)


# ---------------------------------------------------------------------------- caching
def _save(data: CTRData, directory: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
    try:
        np.savez(tmp / "arrays.npz", **data.arrays)
        (tmp / "meta.json").write_text(json.dumps(to_jsonable(data.meta)))
        atomic_replace_dir(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load(directory: Path) -> CTRData:
    with np.load(directory / "arrays.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = read_json(directory / "meta.json")
    cfg = meta["config"]
    cfg["split_ratios"] = tuple(cfg["split_ratios"])
    return CTRData(meta["name"], FeatureSpec(**meta["spec"]), ProtocolConfig(**cfg), arrays, meta)


def prepare(dataset: str, config: ProtocolConfig | None = None, data_dir: str | None = None,
            download: bool = False, cache: bool = True) -> CTRData:
    """Load a dataset and apply the protocol, using the processed-data cache when valid.

    The cache key covers the source files' content, the protocol settings and its version,
    so changed data or settings never reuse a stale cache.
    """
    cfg = config or ProtocolConfig()
    check_protocol(cfg)                     # bad settings fail before any data is read
    raw = load_raw(dataset, data_dir, download)
    check_protocol_against_data(raw, cfg)   # ... and settings the data contradicts, before any processing
    key = key_of(PROTOCOL_VERSION, raw.name, raw.fingerprint, asdict(cfg))
    directory = cache_root() / "processed" / f"{raw.name.replace('/', '_')}-{key}"
    data = None
    if cache and (directory / "meta.json").is_file():
        try:
            data = _load(directory)
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
            # a truncated or damaged cache (e.g. a disk that filled up): named, then rebuilt from the source
            print(f"note: processed-data cache {directory} is damaged ({type(e).__name__}: "
                  f"{one_line(e, 120)}); rebuilding it", file=sys.stderr)
    if data is None:
        data = build(raw, cfg)
        data.meta["key"] = key
        data.key = key
        if cache:
            directory.parent.mkdir(parents=True, exist_ok=True)
            _save(data, directory)
    data.key = key
    return data

"""Raw datasets: MovieLens-100K, MovieLens-1M (users 1-2,999) and the generic format.

Every source is read into one canonical `RawData`:

* ``interactions``: columns ``user`` (str), ``item`` (str), ``rating`` (float, NaN when
  the data has labels only or is implicit), ``label`` (int 0/1; all 1 for implicit feedback),
  ``timestamp`` (int64 seconds; without a time column, the row number: file order is time order),
  ``row`` (1-based line number in the source file, for error messages), and ``count`` (float > 0)
  for implicit feedback with a count column.
* ``domain``: what the items are and what the feedback means (:class:`Domain`), ``feedback``
  (explicit | implicit) and, for implicit data, how negatives are drawn (:class:`NegativeSampling`).
* ``items``: indexed by ``item`` (str) with ``title`` (str), ``year`` (float, NaN when unknown),
  ``tags`` (list of str, e.g. genres), plus any extra text columns (``text_columns``) and
  categorical feature columns (``item_categorical``).
* ``users``: indexed by ``user`` (str) with categorical profile columns (``user_categorical``),
  or None.

Data is found in an explicit directory, the ``COCOREC_DATA`` environment variable, or the user
cache (``~/.cache/cocorec/datasets``). On a machine with internet, MovieLens archives may be
downloaded from GroupLens and are checked against their published md5 before use.
"""

from __future__ import annotations

import codecs
import difflib
import gzip
import hashlib
import io
import json
import math
import os
import re
import urllib.request
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cocorec.data.errors import DataError
from cocorec.utils.io import cache_root

# Age buckets shared by both MovieLens sets (ML-1M's own codes), so groups mean the same thing.
ML1M_AGE_LABELS = {1: "<18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56+"}
# Coarse buckets for the per-group tables (the pilot study's user groups).
GROUP_AGE = {"<18": "<25", "18-24": "<25", "25-34": "25-34", "35-44": "35-44",
             "45-49": "45+", "50-55": "45+", "56+": "45+"}

ML1M_OCCUPATIONS = [
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
]

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
]

# Official archives (GroupLens publishes md5 sums for the zips).
ARCHIVES = {
    "ml-100k": ("https://files.grouplens.org/datasets/movielens/ml-100k.zip",
                "0e33842e24a9c977be4e0107933c0723"),
}


# ----------------------------------------------------------------------------- domain and feedback
#: KAR's scenario factors of the movie domain (the same as ``cocorec.knowledge.prompts.FACTORS``).
MOVIELENS_FACTORS: tuple[str, ...] = ("genre", "director/actors", "era/country", "plot/theme", "mood",
                                      "critical acclaim")
#: Factors of a dataset whose spec names none: neutral, so no movie wording reaches another domain.
GENERIC_FACTORS: tuple[str, ...] = ("category", "features", "style", "quality", "popularity")
#: How a profile value is worded (``{field}``: the column, ``{value}``: its value); a column not named
#: here reads ``"{field} {value}"``. These are today's prompt wordings (gender and occupation bare).
DEFAULT_PROFILE_WORDING: dict[str, str] = {"gender": "{value}", "age": "age {value}", "occupation": "{value}"}
FEEDBACK_KINDS = ("explicit", "implicit")
NEGATIVE_STRATEGIES = ("uniform", "popularity")


@dataclass(frozen=True)
class Domain:
    """What a dataset is about, in the words prompts and texts use.

    Parsed from the spec's ``domain`` section (docs/data-format.md); MovieLens gets the values today's
    prompts use. Stored in the prepared data (``CTRData.domain``).

    Example:
        >>> MOVIELENS.item_noun, MOVIELENS.implicit
        ('movie', False)
        >>> MOVIELENS.profile_phrase({"gender": "male", "age": "18-24", "zip": "9"})
        'male, age 18-24, zip 9'
    """

    item_noun: str = "item"                   # "movie": one item, in prompts
    item_noun_plural: str = "items"           # "movies"
    feedback: str = "explicit"                # explicit (ratings or 0/1 labels) | implicit (every row a positive)
    feedback_meaning: str = "rating from 1 to 5"   # what a rating (explicit) or a count (implicit) means
    factors: tuple[str, ...] = GENERIC_FACTORS      # KAR's scenario factors
    profile_fields: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PROFILE_WORDING), hash=False)
    tag_label: str = "Tags"                   # what the items' tags are, in texts ("Genres: Action, Drama.")

    @property
    def implicit(self) -> bool:
        return self.feedback == "implicit"

    def profile_wording(self, column: str) -> str:
        """The template a profile column is worded with (``{field}`` and ``{value}`` filled in)."""
        return self.profile_fields.get(column, "{field} {value}")

    def profile_phrase(self, profile: dict[str, str]) -> str:
        """A user's profile in words (unknown or empty values left out), e.g. ``"male, age 18-24"``."""
        parts = []
        for k, v in profile.items():
            v = str(v).strip()
            if not v or v.lower() in ("unknown", "nan", "none"):
                continue
            parts.append(self.profile_wording(k).format(field=k, value=v))
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"item_noun": self.item_noun, "item_noun_plural": self.item_noun_plural, "feedback": self.feedback,
                "feedback_meaning": self.feedback_meaning, "factors": list(self.factors),
                "profile_fields": dict(self.profile_fields), "tag_label": self.tag_label}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Domain":
        dom = cls(**{**d, "factors": tuple(d["factors"]), "profile_fields": dict(d["profile_fields"])})
        if "tag_label" not in d:   # recorded before tag_label existed: MovieLens' is "Genres"
            ml = replace(dom, tag_label=MOVIELENS.tag_label)
            if ml == MOVIELENS and ml.profile_fields == MOVIELENS.profile_fields:
                return ml
        return dom


MOVIELENS = Domain(item_noun="movie", item_noun_plural="movies", feedback="explicit",
                   feedback_meaning="rating from 1 (bad) to 5 (great)", factors=MOVIELENS_FACTORS, tag_label="Genres")


@dataclass(frozen=True)
class NegativeSampling:
    """Negatives drawn per positive of an implicit-feedback dataset (spec section ``negatives``).

    ``ratio`` negatives per positive, never an item the user interacted with, distinct within one
    positive; ``uniform`` over the other items or ``popularity``-weighted (by the item's interaction
    count among the training split's users). Seeded by the protocol's ``split_seed``.
    """

    ratio: int = 2
    strategy: str = "uniform"


@dataclass
class RawData:
    """A dataset in canonical form, before the CTR protocol is applied."""

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame | None
    user_categorical: list[str] = field(default_factory=list)
    item_categorical: list[str] = field(default_factory=list)
    text_columns: list[str] = field(default_factory=list)
    group_columns: list[str] = field(default_factory=list)
    fingerprint: str = ""  # content hash of the source files: part of every cache key
    notes: list[str] = field(default_factory=list)  # counted, documented handling ("dropped 3 duplicates")
    domain: Domain = field(default_factory=Domain)
    feedback: str = "explicit"                            # explicit | implicit
    rating_scale: tuple[float, float] | None = (1.0, 5.0)   # explicit ratings' range (None: no ratings)
    positive_threshold: float | None = None               # declared by the spec (must equal the protocol's)
    count_column: str | None = None                       # implicit: the source column of ``interactions.count``
    negatives: NegativeSampling | None = None             # implicit: how negatives are drawn
    source: str = ""                                      # the spec file (generic format), for error messages


def _sha_files(paths: list[Path], salt: str = "") -> str:
    h = hashlib.sha256()
    if salt:
        h.update(salt.encode())
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()[:16]


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DataError("file not found", file=str(path))
    return path


def _age_code(age: int) -> int:
    for code, upper in ((1, 18), (18, 25), (25, 35), (35, 45), (45, 50), (50, 56)):
        if age < upper:
            return code
    return 56


def _year_from_title(title: str) -> float:
    m = re.search(r"\((\d{4})\)\s*$", title)
    return float(m.group(1)) if m else float("nan")


def _strip_year(title: str) -> str:
    return re.sub(r"\s*\(\d{4}\)\s*$", "", title).strip()


def _read_delimited(path: Path, sep: str, names: list[str], encoding: str = "latin-1") -> pd.DataFrame:
    """Read a header-less delimited file as strings; errors name the file and line."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding=encoding, newline="") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split(sep)
            if len(parts) < len(names):
                raise DataError(f"expected {len(names)} fields separated by {sep!r}, found {len(parts)}",
                                file=str(path), row=lineno)
            rows.append(parts[: len(names)] + [lineno])
    if not rows:
        raise DataError("the table is empty", file=str(path))
    return pd.DataFrame(rows, columns=names + ["row"])


def _to_int(df: pd.DataFrame, col: str, path: Path, what: str = "an integer") -> np.ndarray:
    values = pd.to_numeric(df[col], errors="coerce")
    bad = values.isna()
    if bad.any():
        i = int(np.argmax(bad.to_numpy()))
        raise DataError(f"value {df[col].iloc[i]!r} is not {what}", file=str(path),
                        row=int(df["row"].iloc[i]), column=col)
    return values.to_numpy()


def _check_scale(rating: np.ndarray, df: pd.DataFrame, path: Path, col: str, scale: tuple[float, float]) -> None:
    lo, hi = scale
    bad = ~((rating >= lo) & (rating <= hi))
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"rating {df[col].iloc[i]!r} is outside the rating scale [{lo:g}, {hi:g}]", file=str(path),
                        row=int(df["row"].iloc[i]), column=col)


def _ratings_frame(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    rating = _to_int(df, "rating", path, "a number").astype(np.float64)
    _check_scale(rating, df, path, "rating", (1.0, 5.0))
    ts = _to_int(df, "timestamp", path, "a unix timestamp").astype(np.int64)
    return pd.DataFrame({
        "user": df["user"].str.strip().to_numpy(), "item": df["item"].str.strip().to_numpy(),
        "rating": rating, "timestamp": ts, "row": df["row"].to_numpy(),
    })


# ----------------------------------------------------------------------------- locating data
def candidate_dirs(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    """Where a dataset is looked for, in order: explicit dir, $COCOREC_DATA, user cache, ../shared/data."""
    dirs: list[Path] = []
    if data_dir is not None:
        d = Path(data_dir)
        dirs += [d / name, d]
        return dirs  # an explicit directory is a promise: look nowhere else
    env = os.environ.get("COCOREC_DATA")
    if env:
        dirs += [Path(env) / name, Path(env)]
    dirs.append(cache_root() / "datasets" / name)
    # A development checkout sits next to the team's shared data folder.
    here = Path(__file__).resolve()
    for parent in here.parents:
        shared = parent / "shared" / "data" / name
        if shared.is_dir():
            dirs.append(shared)
            break
    cwd_shared = Path.cwd().parent / "shared" / "data" / name
    if cwd_shared.is_dir() and cwd_shared not in dirs:
        dirs.append(cwd_shared)
    return dirs


def find_dataset_dir(name: str, marker: str, data_dir: str | os.PathLike | None = None,
                     download: bool = False) -> Path:
    for d in candidate_dirs(name, data_dir):
        if (d / marker).is_file():
            return d
    if download and name in ARCHIVES:
        return download_movielens(name)
    looked = ", ".join(str(d) for d in candidate_dirs(name, data_dir))
    raise DataError(f"dataset '{name}' not found (looked for {marker} in: {looked}); pass --data-dir, "
                    f"set COCOREC_DATA, or use --download where the network allows")


def download_movielens(name: str) -> Path:
    """Download an official MovieLens archive into the user cache, verifying its md5."""
    url, md5 = ARCHIVES[name]
    target = cache_root() / "datasets"
    target.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            blob = r.read()
    except OSError as e:
        raise DataError(f"could not download {url}: {e}") from None
    got = hashlib.md5(blob).hexdigest()
    if got != md5:
        raise DataError(f"checksum mismatch for {url}: md5 {got}, expected {md5}")
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        z.extractall(target)
    return target / name


# ----------------------------------------------------------------------------- MovieLens
def load_ml100k(data_dir: str | os.PathLike | None = None, download: bool = False) -> RawData:
    d = find_dataset_dir("ml-100k", "u.data", data_dir, download)
    p_data, p_item, p_user = _require(d / "u.data"), _require(d / "u.item"), _require(d / "u.user")
    inter = _ratings_frame(_read_delimited(p_data, "\t", ["user", "item", "rating", "timestamp"]), p_data)

    it = _read_delimited(p_item, "|", ["item", "title", "release", "video", "url"] + [f"g{i}" for i in range(19)])
    flags = np.stack([_to_int(it, f"g{i}", p_item) for i in range(19)], axis=1)
    tags = [[ML100K_GENRES[j] for j in np.flatnonzero(row) if j > 0] for row in flags]
    years = pd.to_datetime(it["release"], format="%d-%b-%Y", errors="coerce").dt.year.astype(float)
    title_year = it["title"].map(_year_from_title)
    items = pd.DataFrame({
        "title": it["title"].map(_strip_year).to_numpy(),
        "year": np.where(np.isnan(title_year), years, title_year),
        "tags": tags,
    }, index=pd.Index(it["item"].str.strip(), name="item"))

    us = _read_delimited(p_user, "|", ["user", "age", "gender", "occupation", "zip"])
    age = _to_int(us, "age", p_user).astype(int)
    users = pd.DataFrame({
        "gender": us["gender"].map({"M": "male", "F": "female"}).fillna("unknown").to_numpy(),
        "age": [ML1M_AGE_LABELS[_age_code(a)] for a in age],
        "occupation": us["occupation"].str.strip().to_numpy(),
        "zip": us["zip"].str[:1].to_numpy(),
    }, index=pd.Index(us["user"].str.strip(), name="user"))
    users["age_group"] = users["age"].map(GROUP_AGE)
    return RawData("ml-100k", inter, items, users,
                   user_categorical=["gender", "age", "occupation", "zip"], item_categorical=["decade"],
                   group_columns=["gender", "age_group"], fingerprint=_sha_files([p_data, p_item, p_user]),
                   domain=MOVIELENS)


def load_ml1m_3k(data_dir: str | os.PathLike | None = None, download: bool = False) -> RawData:
    """MovieLens-1M restricted to users 1-2,999 (the verified prefix of ratings.dat).

    Named ``ml-1m-3k`` so nobody mistakes it for the benchmark ML-1M. If a full ratings.dat is
    present it is filtered to the same users, so results stay comparable.
    """
    d = find_dataset_dir("ml-1m", "movies.dat", data_dir, download=False)
    p_movies, p_users = _require(d / "movies.dat"), _require(d / "users.dat")
    p_ratings = d / "ratings_first487650.dat.gz"
    if not p_ratings.is_file():
        p_ratings = _require(d / "ratings.dat")
    r = _read_delimited(p_ratings, "::", ["user", "item", "rating", "timestamp"])
    inter = _ratings_frame(r, p_ratings)
    inter = inter[pd.to_numeric(inter["user"]) <= 2999].reset_index(drop=True)

    mv = _read_delimited(p_movies, "::", ["item", "title", "genres"])
    items = pd.DataFrame({
        "title": mv["title"].map(_strip_year).to_numpy(),
        "year": mv["title"].map(_year_from_title).to_numpy(),
        "tags": mv["genres"].map(lambda s: [g for g in s.split("|") if g]).to_numpy(),
    }, index=pd.Index(mv["item"].str.strip(), name="item"))

    us = _read_delimited(p_users, "::", ["user", "gender", "age", "occupation", "zip"])
    age = _to_int(us, "age", p_users).astype(int)
    occ = _to_int(us, "occupation", p_users).astype(int)
    users = pd.DataFrame({
        "gender": us["gender"].map({"M": "male", "F": "female"}).fillna("unknown").to_numpy(),
        "age": [ML1M_AGE_LABELS.get(a, "unknown") for a in age],
        "occupation": [ML1M_OCCUPATIONS[o] if 0 <= o < len(ML1M_OCCUPATIONS) else "other" for o in occ],
        "zip": us["zip"].str[:1].to_numpy(),
    }, index=pd.Index(us["user"].str.strip(), name="user"))
    users["age_group"] = users["age"].map(GROUP_AGE).fillna("unknown")
    return RawData("ml-1m-3k", inter, items, users,
                   user_categorical=["gender", "age", "occupation", "zip"], item_categorical=["decade"],
                   group_columns=["gender", "age_group"],
                   fingerprint=_sha_files([p_ratings, p_movies, p_users]), domain=MOVIELENS)


# ----------------------------------------------------------------------------- generic format
GENERIC_SPEC_NAMES = ("dataset.yaml", "dataset.yml", "dataset.json")
# Part of every generic dataset's fingerprint: raise it when the generic format's processing changes,
# so processed generic data is rebuilt (MovieLens fingerprints are the files' alone).
GENERIC_FORMAT = "generic-format-3"   # 2: strict spec, implicit feedback, domain, declared encodings;
#                                       3: domain-worded texts (tag label, item noun), optional timestamp


def _is_name(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != ""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# A spec value's check and how the error names what it expects.
_NAME = (_is_name, "a non-empty string")
_NAMES = (lambda v: isinstance(v, list) and all(_is_name(x) for x in v), "a list of non-empty strings")
_NUMBER = (_is_number, "a number")
_RATIO = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a whole number >= 1")
_SCALE = (lambda v: isinstance(v, list) and len(v) == 2 and all(_is_number(x) for x in v) and v[0] < v[1],
          "[lowest, highest] with lowest < highest")
_FACTORS = (lambda v: isinstance(v, list) and len(v) > 0 and all(_is_name(x) for x in v),
            "a non-empty list of non-empty strings")
_WORDING = (lambda v: isinstance(v, dict) and all(_is_name(k) and _is_name(x) for k, x in v.items()),
            "a mapping of profile column to wording")


def _one_of(*values: str) -> tuple[Any, str]:
    return (lambda v: v in values, "one of " + ", ".join(values))


_TABLE = {"file": _NAME, "sep": (lambda v: isinstance(v, str) and v != "", "a non-empty string"), "encoding": _NAME}
#: Every key the spec may hold, at every level (a dict is a section).
SPEC_SCHEMA: dict[str, Any] = {
    "name": _NAME,
    "feedback": _one_of(*FEEDBACK_KINDS),
    "positive_threshold": _NUMBER,
    "negatives": {"ratio": _RATIO, "strategy": _one_of(*NEGATIVE_STRATEGIES)},
    "interactions": {**_TABLE, "user": _NAME, "item": _NAME, "rating": _NAME, "rating_scale": _SCALE,
                     "label": _NAME, "count": _NAME, "timestamp": _NAME},
    "items": {**_TABLE, "item": _NAME, "title": _NAME, "year": _NAME, "tags": _NAME, "tags_sep": _TABLE["sep"],
              "text": _NAMES, "categorical": _NAMES},
    "users": {**_TABLE, "user": _NAME, "profile": _NAMES, "groups": _NAMES},
    "domain": {"item_noun": _NAME, "item_noun_plural": _NAME, "feedback_meaning": _NAME, "factors": _FACTORS,
               "profile_fields": _WORDING, "tag_label": _NAME},
}


def _check_keys(spec: Any, schema: dict[str, Any], where: str, spec_path: Path) -> dict[str, Any]:
    """Reject unknown keys (naming the nearest valid one) and values of the wrong kind, at every level.

    A key whose value is null counts as absent. Returns the section without its null keys.
    """
    if not isinstance(spec, dict):
        what = f"'{where[:-1]}'" if where else "the spec"
        raise DataError(f"{what} must be a mapping of keys to values, got {spec!r}"[:300], file=str(spec_path))
    out = {}
    for key, value in spec.items():
        k = str(key)
        if k not in schema:
            near = difflib.get_close_matches(k, list(schema), n=1, cutoff=0.0)
            hint = f" (nearest valid key: '{where}{near[0]}')" if near else ""
            raise DataError(f"unknown key '{where}{k}'{hint}", file=str(spec_path))
        if value is None:
            continue
        rule = schema[k]
        if isinstance(rule, dict):
            out[k] = _check_keys(value, rule, f"{where}{k}.", spec_path)
        else:
            check, expected = rule
            if not check(value):
                raise DataError(f"'{where}{k}' must be {expected}, got {value!r}"[:300], file=str(spec_path))
            out[k] = value
    return out


def _check_semantics(spec: dict[str, Any], spec_path: Path) -> None:
    """Combinations of keys that cannot act as written: each is an error, before any table is read."""
    def fail(msg: str) -> None:
        raise DataError(msg, file=str(spec_path))

    for section in ("interactions", "items"):
        if section not in spec:
            fail("the spec must have 'interactions' and 'items' sections")
    si = spec["interactions"]
    implicit = spec.get("feedback", "explicit") == "implicit"
    if implicit:
        for k in ("rating", "label", "rating_scale"):
            if k in si:
                fail(f"feedback: implicit takes no 'interactions.{k}' (every row is a positive; "
                     f"a count or weight goes in 'interactions.count')")
        if "positive_threshold" in spec:
            fail("positive_threshold applies to explicit ratings, not to feedback: implicit")
    else:
        if "negatives" in spec:
            fail("'negatives' applies to feedback: implicit (this spec's feedback is explicit; "
                 "add 'feedback: implicit' if every row is a positive)")
        if "count" in si:
            fail("'interactions.count' applies to feedback: implicit (this spec's feedback is explicit)")
        if "rating" not in si and "label" not in si:
            fail("the interactions section needs a 'rating' or a 'label' column (or 'feedback: implicit')")
        if "rating_scale" in si and "rating" not in si:
            fail("'interactions.rating_scale' needs an 'interactions.rating' column")
        if "positive_threshold" in spec:
            if "rating" not in si:
                fail("positive_threshold needs an 'interactions.rating' column (the labels are given)")
            lo, hi = si.get("rating_scale", (1, 5))
            t = spec["positive_threshold"]
            if not lo < t <= hi:
                fail(f"positive_threshold {t:g} is not inside the rating scale ({lo:g}, {hi:g}]: "
                     f"every rating would get the same label")
    for section in ("interactions", "items", "users"):
        enc = spec.get(section, {}).get("encoding")
        if enc is not None:
            try:
                codecs.lookup(enc)
            except LookupError:
                fail(f"'{section}.encoding': unknown encoding {enc!r} (e.g. utf-8, latin-1, cp1252)")
    dom = spec.get("domain", {})
    profile = spec.get("users", {}).get("profile", [])
    for g in spec.get("users", {}).get("groups", []):
        if g not in profile:
            fail(f"group column {g!r} is not a profile column (users.profile: {', '.join(profile) or 'none'})")
    for col, wording in dom.get("profile_fields", {}).items():
        if col not in profile:
            fail(f"'domain.profile_fields' words {col!r}, which is not a 'users.profile' column "
                 f"(profile: {', '.join(profile) or 'none'})")
        try:
            ok = "{value}" in wording and isinstance(wording.format(field=col, value="x"), str)
        except (KeyError, IndexError, ValueError):
            ok = False
        if not ok:
            fail(f"'domain.profile_fields.{col}' must be a wording with {{value}} (and optionally {{field}}), "
                 f"got {wording!r}")


def _decode(path: Path, encoding: str) -> str:
    """The file's text in its declared encoding; an undecodable byte is an error naming its line."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    codec = codecs.lookup(encoding).name
    try:
        return raw.decode("utf-8-sig" if codec == "utf-8" else encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"byte 0x{raw[e.start]:02x} is not valid {encoding} (a file in another encoding: "
                        f"declare it, e.g. encoding: latin-1, in the table's section of the spec)",
                        file=str(path), row=line) from None


def _read_table(path: Path, sep: str | None = None, encoding: str | None = None) -> pd.DataFrame:
    """Read a CSV/TSV (any name when ``sep`` or ``encoding`` is given) or Parquet table as strings.

    ``row`` is the line number of each row (the header is line 1; Parquet: 1-based row number).
    """
    if not path.is_file():
        raise DataError("file not found", file=str(path))
    parquet = path.suffix in (".parquet", ".pq")
    text_name = path.suffix in (".csv", ".tsv", ".txt") or path.name.endswith((".csv.gz", ".tsv.gz", ".txt.gz"))
    try:
        if parquet:
            if sep is not None or encoding is not None:
                raise DataError("sep and encoding apply to text tables, not to Parquet", file=str(path))
            df = pd.read_parquet(path)
        elif text_name or sep is not None or encoding is not None:
            if sep is None:
                sep = "\t" if ".tsv" in path.name else ","
            text = _decode(path, encoding or "utf-8")
            kw: dict[str, Any] = {"sep": sep} if len(sep) == 1 else {"sep": re.escape(sep), "engine": "python"}
            df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, **kw)
        else:
            raise DataError("unsupported table format (use .csv, .tsv or .parquet, or give the table's sep)",
                            file=str(path))
    except DataError:
        raise
    except Exception as e:  # pandas/pyarrow parse errors: one line, naming the file
        raise DataError(f"cannot parse table: {str(e).splitlines()[0]}", file=str(path)) from None
    if len(df) == 0:
        raise DataError("the table is empty", file=str(path))
    df = df.reset_index(drop=True)
    df["row"] = np.arange(len(df)) + 1 if parquet else np.arange(len(df)) + 2
    return df


def _col(df: pd.DataFrame, name: str | None, path: Path, role: str) -> pd.Series:
    if name is None:
        raise DataError(f"the dataset spec does not name the {role} column", file=str(path))
    if name not in df.columns:
        have = [str(c) for c in df.columns if c != "row"]
        cols = ", ".join(c.encode("unicode_escape").decode() for c in have)
        hint = ""
        if len(have) == 1:
            found = next((s for s in ("\t", ";", "|", ",") if s in have[0]), None)
            if found:
                hint = f"; the header holds {found!r}: give the table's separator as sep in the spec"
        raise DataError(f"missing {role} column (have: {cols}){hint}", file=str(path), column=name)
    return df[name]


def _numbers(df: pd.DataFrame, c: str, path: Path, role: str) -> np.ndarray:
    vals = pd.to_numeric(_col(df, c, path, role), errors="coerce")
    if vals.isna().any():
        i = int(np.argmax(vals.isna().to_numpy()))
        raise DataError(f"{role} {df[c].iloc[i]!r} is not a number", file=str(path), row=int(df["row"].iloc[i]),
                        column=c)
    return vals.to_numpy(dtype=np.float64)


def _parse_timestamp(s: pd.Series, df: pd.DataFrame, path: Path, col: str) -> np.ndarray:
    num = pd.to_numeric(s, errors="coerce")
    if num.notna().mean() > 0.5:  # unix seconds; any non-number is an error
        bad = num.isna()
        if bad.any():
            i = int(np.argmax(bad.to_numpy()))
            raise DataError(f"unparseable timestamp {s.iloc[i]!r}", file=str(path), row=int(df["row"].iloc[i]),
                            column=col)
        return num.astype(np.int64).to_numpy()
    dt = pd.to_datetime(s, errors="coerce", utc=True, format="mixed")
    bad = dt.isna()
    if bad.any():
        i = int(np.argmax(bad.to_numpy()))
        raise DataError(f"unparseable timestamp {s.iloc[i]!r}", file=str(path), row=int(df["row"].iloc[i]),
                        column=col)
    return (dt.astype("int64") // 10**9).to_numpy() if dt.dtype.kind == "M" else np.array(
        [int(x.timestamp()) for x in dt], dtype=np.int64)


def _domain(spec: dict[str, Any], name: str) -> Domain:
    """The dataset's domain: the spec's ``domain`` section over the defaults (MovieLens' for ``ml-*``)."""
    dom = spec.get("domain", {})
    base = MOVIELENS if name.startswith("ml-") else Domain()
    si = spec["interactions"]
    feedback = spec.get("feedback", "explicit")
    noun = dom.get("item_noun", base.item_noun)
    plural = dom.get("item_noun_plural", base.item_noun_plural if "item_noun" not in dom else noun + "s")
    if feedback == "implicit":
        meaning = (f"number of times the user interacted with the {noun}" if "count" in si
                   else f"the user interacted with the {noun}")
    elif "rating" in si:
        lo, hi = si.get("rating_scale", (1, 5))
        meaning = base.feedback_meaning if base is MOVIELENS and (lo, hi) == (1, 5) else f"rating from {lo:g} to {hi:g}"
    else:
        meaning = f"whether the user liked the {noun} (1) or not (0)"
    tags = spec["items"].get("tags")
    if base is MOVIELENS or not tags:
        label = base.tag_label
    else:   # the tag column's own name: "genres" -> "Genres", "app_category" -> "App category"
        label = tags.replace("_", " ").strip()
        label = label[:1].upper() + label[1:]
    return Domain(item_noun=noun, item_noun_plural=plural, feedback=feedback,
                  feedback_meaning=dom.get("feedback_meaning", meaning),
                  factors=tuple(dom.get("factors", base.factors)),
                  profile_fields={**base.profile_fields, **dom.get("profile_fields", {})},
                  tag_label=dom.get("tag_label", label))


def _read_spec(d: Path) -> tuple[Path, dict[str, Any]]:
    spec_path = next((d / n for n in GENERIC_SPEC_NAMES if (d / n).is_file()), None)
    if spec_path is None:
        raise DataError(f"no dataset spec ({' / '.join(GENERIC_SPEC_NAMES)}) in {d}")
    try:
        text = spec_path.read_text(encoding="utf-8")
        if spec_path.suffix == ".json":
            spec = json.loads(text)
        else:
            import yaml
            spec = yaml.safe_load(text)
    except Exception as e:
        raise DataError(f"cannot parse the spec: {str(e).splitlines()[0]}", file=str(spec_path)) from None
    spec = _check_keys(spec, SPEC_SCHEMA, "", spec_path)
    _check_semantics(spec, spec_path)
    return spec_path, spec


def _generic_interactions(d: Path, spec: dict[str, Any], notes: list[str]
                          ) -> tuple[pd.DataFrame, Path, tuple[float, float] | None]:
    """The interactions table of a generic dataset: (user, item, rating, timestamp, row[, label][, count])."""
    implicit = spec.get("feedback") == "implicit"
    si = spec["interactions"]
    p_int = d / si.get("file", "interactions.csv")
    df = _read_table(p_int, si.get("sep"), si.get("encoding"))
    user = _col(df, si.get("user", "user"), p_int, "user").astype(str).str.strip()
    item = _col(df, si.get("item", "item"), p_int, "item").astype(str).str.strip()
    rating = np.full(len(df), np.nan)
    label = None
    count = None
    scale = None
    if "rating" in si:
        c = si["rating"]
        rating = _numbers(df, c, p_int, "rating")
        scale = tuple(float(x) for x in si.get("rating_scale", (1, 5)))
        _check_scale(rating, df, p_int, c, scale)  # type: ignore[arg-type]
    if "label" in si:
        c = si["label"]
        vals = pd.to_numeric(_col(df, c, p_int, "label"), errors="coerce")
        if vals.isna().any() or not vals.isin([0, 1]).all():
            i = int(np.argmax((vals.isna() | ~vals.isin([0, 1])).to_numpy()))
            raise DataError(f"label {df[c].iloc[i]!r} is not 0 or 1", file=str(p_int),
                            row=int(df["row"].iloc[i]), column=c)
        label = vals.to_numpy(dtype=np.int64)
    if implicit:
        label = np.ones(len(df), dtype=np.int64)   # every row is a positive; negatives are sampled
        if "count" in si:
            c = si["count"]
            count = _numbers(df, c, p_int, "count")
            bad = ~(np.isfinite(count) & (count > 0))
            if bad.any():
                i = int(np.argmax(bad))
                raise DataError(f"count {df[c].iloc[i]!r} is not a positive number (every row is a positive "
                                f"interaction)", file=str(p_int), row=int(df["row"].iloc[i]), column=c)
    tcol = si.get("timestamp", "timestamp" if "timestamp" in df.columns else None)
    if tcol is not None:
        ts = _parse_timestamp(_col(df, tcol, p_int, "timestamp"), df, p_int, tcol)
    else:   # no time column: the file's order is the time order
        ts = df["row"].to_numpy(dtype=np.int64)
        notes.append(f"{p_int.name}: no timestamp column; the file's row order is the time order (each user's "
                     f"interactions in the order of their rows)")
    inter = pd.DataFrame({"user": user.to_numpy(), "item": item.to_numpy(), "rating": rating,
                          "timestamp": ts, "row": df["row"].to_numpy()})
    if label is not None:
        inter["label"] = label
    if count is not None:
        inter["count"] = count
    return inter, p_int, scale  # type: ignore[return-value]


def _generic_items(d: Path, spec: dict[str, Any]) -> tuple[pd.DataFrame, Path, list[str], list[str]]:
    """The items table (title, year, tags, text and categorical columns), indexed by item id."""
    sm = spec["items"]
    p_items = d / sm.get("file", "items.csv")
    it = _read_table(p_items, sm.get("sep"), sm.get("encoding"))
    ids = _col(it, sm.get("item", "item"), p_items, "item").astype(str).str.strip()
    dup = ids.duplicated()
    if dup.any():
        i = int(np.argmax(dup.to_numpy()))
        raise DataError(f"duplicate item id {ids.iloc[i]!r}", file=str(p_items), row=int(it["row"].iloc[i]))
    title = _col(it, sm.get("title", "title"), p_items, "title").astype(str)
    if "year" in sm:
        year = pd.to_numeric(_col(it, sm["year"], p_items, "year"), errors="coerce").to_numpy(dtype=float)
    else:
        year = title.map(_year_from_title).to_numpy()
        title = title.map(_strip_year)
    sep = sm.get("tags_sep", "|")
    if "tags" in sm:
        tags = _col(it, sm["tags"], p_items, "tags").astype(str).map(
            lambda s: [t.strip() for t in s.split(sep) if t.strip()]).tolist()
    else:
        tags = [[] for _ in range(len(it))]
    items = pd.DataFrame({"title": title.to_numpy(), "year": year, "tags": tags},
                         index=pd.Index(ids.to_numpy(), name="item"))
    text_cols = list(sm.get("text", []))
    cat_cols = list(sm.get("categorical", []))
    for c in text_cols + cat_cols:
        items[c] = _col(it, c, p_items, "item text/categorical").astype(str).to_numpy()
    return items, p_items, text_cols, cat_cols


def _generic_users(d: Path, spec: dict[str, Any], notes: list[str]
                   ) -> tuple[pd.DataFrame | None, Path | None, list[str], list[str]]:
    """The optional users table: (profile columns by user id, its path, profile columns, group columns)."""
    if "users" not in spec:
        return None, None, [], []
    su = spec["users"]
    p_users = d / su.get("file", "users.csv")
    us = _read_table(p_users, su.get("sep"), su.get("encoding"))
    uids = _col(us, su.get("user", "user"), p_users, "user").astype(str).str.strip()
    user_cat = list(su.get("profile", []))
    users = pd.DataFrame(index=pd.Index(uids.to_numpy(), name="user"))
    for c in user_cat:
        users[c] = _col(us, c, p_users, "profile").astype(str).to_numpy()
    groups = list(su.get("groups", user_cat[:2]))   # each a profile column (checked with the spec)
    dup = users.index.duplicated()
    if dup.any():
        n = int(dup.sum())
        notes.append(f"{p_users.name}: dropped {n} rows with a repeated user id (kept the first)")
        users = users[~dup]
    return users, p_users, user_cat, groups


def load_generic(directory: str | os.PathLike) -> RawData:
    """Load a user's own data: see docs/data-format.md for the layout and spec file.

    The spec is checked whole (unknown keys at every level, wrong kinds of value, keys that cannot act
    together) before any table is read; then the interactions, items and (optional) users tables.
    """
    d = Path(directory)
    spec_path, spec = _read_spec(d)
    implicit = spec.get("feedback") == "implicit"
    notes: list[str] = []
    inter, p_int, scale = _generic_interactions(d, spec, notes)
    items, p_items, text_cols, cat_cols = _generic_items(d, spec)
    users, p_users, user_cat, groups = _generic_users(d, spec, notes)
    files = [spec_path, p_int, p_items] + ([p_users] if p_users is not None else [])
    name = spec.get("name", d.name)
    threshold = spec.get("positive_threshold")
    si = spec["interactions"]
    return RawData(name, inter, items, users, user_categorical=user_cat,
                   item_categorical=["decade"] + cat_cols, text_columns=text_cols, group_columns=groups,
                   fingerprint=_sha_files(files, salt=GENERIC_FORMAT), notes=notes, domain=_domain(spec, name),
                   feedback="implicit" if implicit else "explicit", rating_scale=scale,  # type: ignore[arg-type]
                   positive_threshold=None if threshold is None else float(threshold),
                   count_column=si.get("count"),
                   negatives=NegativeSampling(**spec.get("negatives", {})) if implicit else None,
                   source=str(spec_path))


BUILTIN = {"ml-100k": load_ml100k, "ml-1m-3k": load_ml1m_3k}


def load_raw(dataset: str, data_dir: str | os.PathLike | None = None, download: bool = False) -> RawData:
    """Load a built-in dataset by name, or a generic-format directory by path."""
    if dataset in BUILTIN:
        return BUILTIN[dataset](data_dir, download)
    if dataset == "ml-1m":
        raise DataError("the full ML-1M ratings are not available here; use 'ml-1m-3k' (users 1-2,999)")
    p = Path(dataset)
    if p.is_dir():
        return load_generic(p)
    raise DataError(f"unknown dataset {dataset!r}: use ml-100k, ml-1m-3k, or a directory in the generic format")

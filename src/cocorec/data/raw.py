"""Raw datasets: MovieLens-100K, MovieLens-1M (users 1-2,999) and the generic format.

Every source is read into one canonical `RawData`:

* ``interactions``: columns ``user`` (str), ``item`` (str), ``rating`` (float, NaN when
  the data has labels only), ``label`` (int 0/1), ``timestamp`` (int64 seconds), ``row`` (1-based
  line number in the source file, for error messages).
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

import gzip
import hashlib
import io
import json
import os
import re
import urllib.request
import zipfile
from dataclasses import dataclass, field
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


def _sha_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
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


def _ratings_frame(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    rating = _to_int(df, "rating", path, "a number").astype(np.float64)
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
                   group_columns=["gender", "age_group"], fingerprint=_sha_files([p_data, p_item, p_user]))


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
                   fingerprint=_sha_files([p_ratings, p_movies, p_users]))


# ----------------------------------------------------------------------------- generic format
GENERIC_SPEC_NAMES = ("dataset.yaml", "dataset.yml", "dataset.json")


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError("file not found", file=str(path))
    try:
        if path.suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        elif path.suffix in (".csv", ".tsv", ".txt") or path.name.endswith((".csv.gz", ".tsv.gz")):
            sep = "\t" if ".tsv" in path.name else ","
            try:
                df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8")
            except UnicodeDecodeError:
                # latin-1 text is common in older datasets (MovieLens): decode it rather than fail.
                df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="latin-1")
        else:
            raise DataError("unsupported table format (use .csv, .tsv or .parquet)", file=str(path))
    except DataError:
        raise
    except Exception as e:  # pandas/pyarrow parse errors: one line, naming the file
        raise DataError(f"cannot parse table: {str(e).splitlines()[0]}", file=str(path)) from None
    if len(df) == 0:
        raise DataError("the table is empty", file=str(path))
    df = df.reset_index(drop=True)
    df["row"] = np.arange(len(df)) + 2 if path.suffix != ".parquet" else np.arange(len(df)) + 1
    return df


def _col(df: pd.DataFrame, name: str | None, path: Path, role: str) -> pd.Series:
    if name is None:
        raise DataError(f"the dataset spec does not name the {role} column", file=str(path))
    if name not in df.columns:
        cols = ", ".join(c for c in df.columns if c != "row")
        raise DataError(f"missing {role} column (have: {cols})", file=str(path), column=name)
    return df[name]


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


def load_generic(directory: str | os.PathLike) -> RawData:
    """Load a user's own data: see docs/data-format.md for the layout and spec file."""
    d = Path(directory)
    spec_path = next((d / n for n in GENERIC_SPEC_NAMES if (d / n).is_file()), None)
    if spec_path is None:
        raise DataError(f"no dataset spec ({' / '.join(GENERIC_SPEC_NAMES)}) in {d}")
    try:
        if spec_path.suffix == ".json":
            spec = json.loads(spec_path.read_text())
        else:
            import yaml
            spec = yaml.safe_load(spec_path.read_text())
    except Exception as e:
        raise DataError(f"cannot parse the spec: {str(e).splitlines()[0]}", file=str(spec_path)) from None
    if not isinstance(spec, dict) or "interactions" not in spec or "items" not in spec:
        raise DataError("the spec must have 'interactions' and 'items' sections", file=str(spec_path))
    known = {"name", "interactions", "items", "users", "positive_threshold"}
    unknown = set(spec) - known
    if unknown:
        raise DataError(f"unknown keys {sorted(unknown)} (allowed: {sorted(known)})", file=str(spec_path))

    notes: list[str] = []
    si = spec["interactions"]
    p_int = d / si.get("file", "interactions.csv")
    df = _read_table(p_int)
    user = _col(df, si.get("user", "user"), p_int, "user").astype(str).str.strip()
    item = _col(df, si.get("item", "item"), p_int, "item").astype(str).str.strip()
    rating = np.full(len(df), np.nan)
    label = None
    if si.get("rating"):
        c = si["rating"]
        vals = pd.to_numeric(_col(df, c, p_int, "rating"), errors="coerce")
        if vals.isna().any():
            i = int(np.argmax(vals.isna().to_numpy()))
            raise DataError(f"rating {df[c].iloc[i]!r} is not a number", file=str(p_int),
                            row=int(df["row"].iloc[i]), column=c)
        rating = vals.to_numpy(dtype=np.float64)
    if si.get("label"):
        c = si["label"]
        vals = pd.to_numeric(_col(df, c, p_int, "label"), errors="coerce")
        if vals.isna().any() or not vals.isin([0, 1]).all():
            i = int(np.argmax((vals.isna() | ~vals.isin([0, 1])).to_numpy()))
            raise DataError(f"label {df[c].iloc[i]!r} is not 0 or 1", file=str(p_int),
                            row=int(df["row"].iloc[i]), column=c)
        label = vals.to_numpy(dtype=np.int64)
    if not si.get("rating") and not si.get("label"):
        raise DataError("the interactions section needs a 'rating' or a 'label' column", file=str(spec_path))
    tcol = si.get("timestamp", "timestamp")
    ts = _parse_timestamp(_col(df, tcol, p_int, "timestamp"), df, p_int, tcol)
    inter = pd.DataFrame({"user": user.to_numpy(), "item": item.to_numpy(), "rating": rating,
                          "timestamp": ts, "row": df["row"].to_numpy()})
    if label is not None:
        inter["label"] = label

    sm = spec["items"]
    p_items = d / sm.get("file", "items.csv")
    it = _read_table(p_items)
    ids = _col(it, sm.get("item", "item"), p_items, "item").astype(str).str.strip()
    dup = ids.duplicated()
    if dup.any():
        i = int(np.argmax(dup.to_numpy()))
        raise DataError(f"duplicate item id {ids.iloc[i]!r}", file=str(p_items), row=int(it["row"].iloc[i]))
    title = _col(it, sm.get("title", "title"), p_items, "title").astype(str)
    if sm.get("year"):
        year = pd.to_numeric(_col(it, sm["year"], p_items, "year"), errors="coerce").to_numpy(dtype=float)
    else:
        year = title.map(_year_from_title).to_numpy()
        title = title.map(_strip_year)
    sep = sm.get("tags_sep", "|")
    if sm.get("tags"):
        tags = _col(it, sm["tags"], p_items, "tags").astype(str).map(
            lambda s: [t.strip() for t in s.split(sep) if t.strip()]).tolist()
    else:
        tags = [[] for _ in range(len(it))]
    items = pd.DataFrame({"title": title.to_numpy(), "year": year, "tags": tags},
                         index=pd.Index(ids.to_numpy(), name="item"))
    text_cols = list(sm.get("text", []) or [])
    cat_cols = list(sm.get("categorical", []) or [])
    for c in text_cols + cat_cols:
        items[c] = _col(it, c, p_items, "item text/categorical").astype(str).to_numpy()

    users = None
    user_cat: list[str] = []
    groups: list[str] = []
    if spec.get("users"):
        su = spec["users"]
        p_users = d / su.get("file", "users.csv")
        us = _read_table(p_users)
        uids = _col(us, su.get("user", "user"), p_users, "user").astype(str).str.strip()
        user_cat = list(su.get("profile", []) or [])
        users = pd.DataFrame(index=pd.Index(uids.to_numpy(), name="user"))
        for c in user_cat:
            users[c] = _col(us, c, p_users, "profile").astype(str).to_numpy()
        groups = list(su.get("groups", user_cat[:2]) or [])
        for g in groups:
            if g not in users.columns:
                raise DataError(f"group column {g!r} is not a profile column", file=str(spec_path))
        dup = users.index.duplicated()
        if dup.any():
            n = int(dup.sum())
            notes.append(f"{p_users.name}: dropped {n} rows with a repeated user id (kept the first)")
            users = users[~dup]

    files = [spec_path, p_int, p_items] + ([d / spec["users"].get("file", "users.csv")] if spec.get("users") else [])
    raw = RawData(spec.get("name", d.name), inter, items, users, user_categorical=user_cat,
                  item_categorical=["decade"] + cat_cols, text_columns=text_cols, group_columns=groups,
                  fingerprint=_sha_files(files), notes=notes)
    raw.positive_threshold = float(spec.get("positive_threshold", 4))  # type: ignore[attr-defined]
    return raw


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

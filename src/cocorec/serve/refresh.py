"""Near-line knowledge: ``cocorec knowledge refresh --bundle BUNDLE`` gives queued users their own knowledge.

The service scores a user the bundle does not know at once with the fallback (zero user knowledge, the
request's profile and history: see :mod:`cocorec.serve.bundle`) and queues it with that profile and
history (:mod:`cocorec.serve.queue`); a known user whose request carries another profile or history is
queued as *changed*. The refresh then:

1. reads a snapshot of the queue (latest entry per user id);
2. loads the run the bundle was exported from (``bundle.json``'s ``run``, or ``--run``), its data and
   its LM, and checks they are the bundle's (data key, user ids, and the method's knowledge of a few
   of the bundle's own users against the bundle's table: a retrained run is refused);
3. builds the run's data *extended* by the requested users (:func:`extend_data`): each gets a user
   index (a new one is appended after the bundle's users; a changed one keeps its index), its profile,
   an LM history (the last ``max_llm_history`` known items of the request's history, oldest first;
   ratings as given, a bare id = 5), the user text built as the protocol builds it, its profile feature
   codes and its behaviour sequence (the last ``max_hist_len`` items) as the service computes them, and
   per grouping the label of the known users with the same profile (the most common label when no
   known user has it) - CoCo's group guard reads it;
4. computes their knowledge with the method's own code on that data: KAR / R4ec generate the user text
   with the run's LM (:class:`~cocorec.knowledge.kar.KnowledgeStore`, cached like training) and encode
   it (``template`` source: encode the template text); CoCo builds its user-text cache and takes k_u
   through its query, codebook, LM pass and read-out (``prepare`` on the extended data, as at export);
   ``field`` recomputes its vectors; then the rows come out of the method exactly as the export takes
   them (:func:`~cocorec.serve.bundle.user_knowledge_rows`);
5. writes a new bundle (new id; every table extended by the new users, the changed users' rows replaced;
   ``requested_users.json`` keeps the profile and history of every user added or changed by a refresh,
   for the next one) to a temporary directory and renames it over the old one
   (:func:`~cocorec.utils.io.atomic_replace_dir`), drops the lines it read from the queue, and with
   ``--reload URL`` asks the running service to swap it in (``POST /reload``: a request in flight finishes
   on the bundle it started with, no request fails).

A refreshed user is then *known* (``user_known: true``), scored with its profile, sequence and knowledge
from the bundle: what the method gives in process on the extended data (``load_scorer(run, data=ext)``).

What cannot be refreshed (a one-line error; the users stay on the fallback): a method whose knowledge of
a new user is not defined by its inputs - a knowledge source other than ``lm`` or ``template``
(``oracle`` reads the user's future labels, ``shuffled`` gives a user another user's knowledge), a
corruption (``corrupt > 0`` draws over the users), KAR / R4ec with ``standardize`` (the training users'
statistics are not in the checkpoint) - and a method that is not built in (its per-user state is unknown).
Item knowledge (KAR's) is unchanged: a refresh adds users, never items.

Example:
    >>> from cocorec.serve.refresh import refresh_bundle                        # doctest: +SKIP
    >>> refresh_bundle("bundles/din-kar-0")["users_new"]                        # doctest: +SKIP
    12
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from cocorec.data.errors import DataError
from cocorec.errors import one_line

# numpy and torch are imported where used: the command line builds its parser from this module

__all__ = ["extend_data", "prepare_users", "refresh_bundle", "refresh_support", "add_refresh_args", "cmd_refresh"]

REQUESTED = "requested_users.json"
BUILTIN = ("base", "field", "kar", "kar-item", "r4ec", "coco", "coco-novq", "coco-nojudge", "coco-oneprompt",
           "static")


def refresh_support(config: Mapping[str, Any]) -> str | None:
    """Why the knowledge of a new user cannot be computed for a bundle's method (None: it can)."""
    name, args = config.get("method"), dict(config.get("method_args") or {})
    if name not in BUILTIN:
        return f"method {name!r} is not built in: its per-user state is unknown to the refresh"
    source, corrupt = args.get("source", "oracle" if name == "field" else "lm"), float(args.get("corrupt", 0.0))
    if name != "base" and source not in ("lm", "template"):
        what = "it reads the user's future labels" if source == "oracle" else "it is another user's"
        return f"method {name!r} with source={source}: a new user's knowledge is not defined by its history ({what})"
    if corrupt:
        return f"method {name!r} with corrupt={corrupt:g}: the corruption is drawn over the run's users"
    fields = str(args.get("fields", "item" if name == "kar-item" else "user,item"))
    if name in ("kar", "r4ec") and args.get("standardize") and "user" in fields:
        return f"method {name!r} with standardize=true: the training users' statistics are not in the checkpoint"
    return None


# ---------------------------------------------------------------------------------------------- data
def _label_of(data: Any, n: int) -> Callable[[dict[str, str]], dict[str, str]]:
    """profile -> {grouping: label}: the most common label of the run's users with that profile (the
    groupings are functions of the profile), else the most common label of all the run's users."""
    keys = list(data.user_profile[0]) if n else []
    by_profile: dict[tuple, dict[str, Counter]] = {}
    overall = {g: Counter(labels[:n]).most_common(1)[0][0] for g, labels in data.user_groups.items() if n}
    for u in range(n):
        k = tuple(str(data.user_profile[u].get(f, "unknown")) for f in keys)
        slot = by_profile.setdefault(k, {g: Counter() for g in data.user_groups})
        for g, labels in data.user_groups.items():
            slot[g][labels[u]] += 1

    def label(profile: dict[str, str]) -> dict[str, str]:
        slot = by_profile.get(tuple(profile.get(f, "unknown") for f in keys))
        return {g: slot[g].most_common(1)[0][0] if slot else overall[g] for g in data.user_groups}

    return label


def extend_data(data: Any, bundle: Any, requested: Mapping[str, Mapping[str, Any]]) -> tuple[Any, dict[str, int]]:
    """The run's ``data`` with the ``requested`` users (id -> ``{"profile", "history"}``, history as
    ``[[item id, rating], ...]`` oldest first) set or appended, in the order of ``bundle``'s user ids
    (new ones after them); returns (the extended CTRData, user id -> index). Every bundle user beyond the
    run's must be in ``requested`` (they came from an earlier refresh)."""
    import numpy as np

    from cocorec.data.protocol import CTRData, user_text

    n = data.n_users
    ids = list(bundle.user_ids)
    if ids[:n] != list(data.user_ids):
        raise DataError(f"{bundle.path}: its users are not the run's (the run was re-made since the export?)")
    lost = [u for u in ids[n:] if u not in requested]
    if lost:
        raise DataError(f"{bundle.path / REQUESTED}: no profile and history of user {lost[0]!r} "
                        f"(+{len(lost) - 1} more) added by an earlier refresh")
    ids += [u for u in requested if u not in bundle.user_index]
    index = {u: i for i, u in enumerate(ids)}
    m = len(ids)
    keys = list(data.user_profile[0]) if n else []
    label = _label_of(data, n)
    implicit = bool(getattr(data, "implicit", False))
    max_llm = int(data.config.max_llm_history)
    feats = np.zeros((m, data.user_feats.shape[1]), np.int64)
    feats[:n] = data.user_feats.numpy()
    profiles = list(data.user_profile) + [None] * (m - n)
    texts = list(data.user_text) + [None] * (m - n)
    groups = {g: list(v) + [None] * (m - n) for g, v in data.user_groups.items()}
    hist_items = [data.llm_items[data.llm_offsets[u]:data.llm_offsets[u + 1]] for u in range(n)] + [None] * (m - n)
    hist_ratings = [data.llm_ratings[data.llm_offsets[u]:data.llm_offsets[u + 1]] for u in range(n)] + [None] * (m - n)
    counts = None
    if data.llm_counts is not None:
        counts = [data.llm_counts[data.llm_offsets[u]:data.llm_offsets[u + 1]] for u in range(n)] + [None] * (m - n)
    rated = bool(data.meta.get("has_ratings", True))
    for uid, entry in requested.items():
        u = index[uid]
        given = {str(k): str(v) for k, v in (entry.get("profile") or {}).items()}
        prof = {k: given.get(k, "unknown") for k in keys}
        history = [(str(i), int(r)) for i, r in (entry.get("history") or [])]
        pairs = [(bundle.item_index[i], 5 if implicit else min(5, max(1, r))) for i, r in history
                 if i in bundle.item_index][-max_llm:] if max_llm else []
        profiles[u] = prof
        feats[u] = bundle.user_row(None, history, given)[1].numpy()
        hist_items[u] = np.array([i for i, _ in pairs], np.int64)
        hist_ratings[u] = np.array([r for _, r in pairs], np.int64)
        c = [1.0] * len(pairs) if counts is not None else None   # a request carries no counts: one each
        if counts is not None:
            counts[u] = np.array(c, np.float64)
        texts[u] = user_text(prof, [(data.item_info[i]["title"], r) for i, r in pairs], rated,
                             domain=data.domain, counts=c)
        for g, lab in label(prof).items():
            groups[g][u] = lab
    arrays = dict(data.arrays)
    arrays["user_feats"] = feats
    arrays["llm_offsets"] = np.r_[0, np.cumsum([len(h) for h in hist_items])].astype(np.int64)
    arrays["llm_items"] = np.concatenate(hist_items).astype(np.int64) if m else np.zeros(0, np.int64)
    arrays["llm_ratings"] = np.concatenate(hist_ratings).astype(np.int64) if m else np.zeros(0, np.int64)
    if counts is not None:
        arrays["llm_counts"] = np.concatenate(counts).astype(np.float64)
    meta = {**data.meta, "user_ids": ids, "user_text": texts, "user_profile": profiles, "user_groups": groups}
    return CTRData(data.name, data.spec, data.config, arrays, meta), index


# ---------------------------------------------------------------------------------------------- method
def prepare_users(method: Any, data: Any, users: list[int], n_known: int,
                  log: Callable[[str], None] | None = None) -> None:
    """Give a method built on the extended ``data`` (``load_scorer(run, data=ext)``) what it needs to
    score ``users`` (indices of ``data``) beyond what its build did: KAR / R4ec generate and encode their
    user text (the checkpoint holds the vectors of the run's ``n_known`` users only); ``field`` recomputes
    its vectors; CoCo's build (``prepare``) already covered every user of ``data``."""
    import numpy as np
    import torch

    from cocorec.knowledge.kar import KarMethod, R4ecMethod

    if isinstance(method, KarMethod) and "user" in method.fields:
        # KAR keeps its vectors in the checkpoint (its build computes nothing): the new users' text is
        # generated and encoded as the method's prepare does for the run's users
        store = method.store(log=log)
        src = method.user_source(data)
        if src.source == "template":
            all_texts = src.user_texts()
            vec = store.encode([all_texts[u] for u in users])
        else:
            kind = "r4ec" if isinstance(method, R4ecMethod) else "kar"
            vec = store.user_vectors(src.view(), users, kind, int(method.cfg.get("rounds", 1)))
        old = method.user_vec.detach().cpu()
        uv = torch.zeros(data.n_users, old.shape[1])
        uv[:n_known] = old[:n_known]
        uv[torch.tensor(users)] = torch.from_numpy(np.ascontiguousarray(vec, np.float32))
        method.load_checkpoint_state({"user_vec": uv, "item_vec": method.item_vec.detach().cpu()})
        if log is not None and store.seconds:
            log("LM and encoder: " + ", ".join(f"{k} {v:.1f} s" for k, v in store.seconds.items()))
        store.release()
    elif method.name == "field":
        method.prepare(data)   # the source's vectors of every user, z-scored by the training users (unchanged)


# ---------------------------------------------------------------------------------------------- refresh
@contextlib.contextmanager
def _refresh_lock(bundle: Path) -> Iterator[None]:
    lock = bundle.with_name(bundle.name + ".refresh.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"{bundle}: another knowledge refresh is running ({lock} is locked)") from None
        yield
    finally:
        os.close(fd)


def _requested(bundle: Any) -> dict[str, dict[str, Any]]:
    from cocorec.utils.io import read_json

    p = bundle.path / REQUESTED
    if not p.is_file():
        return {}
    try:
        blob = read_json(p)
    except (ValueError, OSError) as e:
        raise DataError(f"{p}: unreadable ({one_line(e, 200)})") from None
    if not isinstance(blob, dict) or blob.get("bundle_id") != bundle.id:
        raise DataError(f"{p}: of another export than bundle.json")
    return dict(blob["users"])


def refresh_bundle(bundle_dir: str | Path, *, run: str | Path | None = None, queue: str | Path | None = None,
                   data_dir: str | None = None, dataset: str | None = None,
                   log: Callable[[str], None] | None = print, check_users: int = 8,
                   device: str = "cpu") -> dict[str, Any]:
    """Compute the knowledge of the queued users and write the bundle with them (see the module).

    ``device``: where the backbone and a CoCo method's LM run (``auto``: cuda when there is one); KAR
    and R4ec generate on their own ``lm_device`` setting (``auto`` by default).

    Returns ``{"users_new", "users_changed", "bundle_id", "previous", "seconds", "check", "queue_left"}``
    (``users_new == users_changed == 0`` and no new bundle when the queue is empty).
    """
    import torch

    from cocorec.serve.bundle import BundleScorer, user_knowledge_rows
    from cocorec.serve.queue import consume, default_queue_path, snapshot
    from cocorec.serve.scorer import load_scorer, run_data
    from cocorec.train.trainer import load_safetensors
    from cocorec.utils.io import atomic_replace_dir, atomic_write_json, save_safetensors_atomic

    say = log or (lambda _m: None)
    t0 = time.perf_counter()
    bpath = Path(bundle_dir)
    qpath = Path(queue) if queue else default_queue_path(bpath)
    with _refresh_lock(bpath):
        b = BundleScorer(bpath, jit=False)   # read for its tables and ids: nothing is scored here
        entries, offset = snapshot(qpath)
        if not entries:
            say(f"{qpath}: no queued users; the bundle is unchanged")
            return {"users_new": 0, "users_changed": 0, "bundle_id": b.id, "previous": b.id, "queue_left": 0,
                    "seconds": round(time.perf_counter() - t0, 2)}
        why = refresh_support(b.config)
        if why:
            raise DataError(f"{bpath}: cannot compute the knowledge of new users: {why}; they stay on the "
                            f"fallback (zero user knowledge)")
        run_dir = Path(run or b.config.get("run") or "")
        if not (run_dir / "checkpoint" / "config.json").is_file():
            raise DataError(f"{bpath}: the run it was exported from ({run_dir}) has no checkpoint; pass --run DIR")
        requested = _requested(b)
        for uid, e in entries.items():
            requested[uid] = {"profile": dict(e.get("profile") or {}), "history": list(e.get("history") or [])}
        say(f"{len(entries)} queued users ({sum(u not in b.user_index for u in entries)} new); loading {run_dir} ...")
        stages: dict[str, float] = {}
        mark = [time.perf_counter()]

        def stage(name: str) -> None:
            now = time.perf_counter()
            stages[name] = round(now - mark[0], 2)
            mark[0] = now

        data = run_data(run_dir, data_dir=data_dir, dataset=dataset)
        if b.config.get("data_key") and data.key != b.config["data_key"]:
            raise DataError(f"{bpath}: exported from other data than {run_dir}'s (key {b.config['data_key']} != "
                            f"{data.key})")
        ext, index = extend_data(data, b, requested)
        targets = [index[u] for u in entries]
        stage("data")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        # the method built on the extended data (CoCo: prepare)
        scorer = load_scorer(run_dir, data=ext, device=None if device == "cpu" else device)
        stage("method")
        method = scorer.method
        prepare_users(method, ext, targets, data.n_users, say)
        stage("texts")
        keys = [k["key"] for k in b.config["knowledge"]]
        check: dict[str, Any] = {"users": 0, "max_abs_diff": 0.0}
        rows: list[Any] = [None] * len(keys)
        if "user" in keys:
            # the run still gives the bundle's knowledge for its own users (else it was retrained since)
            probe = torch.tensor([u for u in range(data.n_users) if u not in set(targets)][:check_users],
                                 dtype=torch.long)
            got = user_knowledge_rows(method, ext, probe, keys)
            diffs = [float((g - t[probe]).abs().max()) if len(probe) else 0.0
                     for g, (k, t) in zip(got, b.knowledge) if k == "user"]
            scale = max([1.0] + [float(t[probe].abs().max()) for k, t in b.knowledge if k == "user" and len(probe)])
            check = {"users": len(probe), "max_abs_diff": max(diffs)}
            if check["max_abs_diff"] > 1e-3 * scale:
                raise DataError(f"{bpath}: {run_dir} gives other knowledge for the bundle's own users than the "
                                f"bundle ({check['max_abs_diff']:.3g}): re-export it")
            say(f"computing the knowledge of {len(targets)} users ...")
            rows = user_knowledge_rows(method, ext, torch.tensor(targets), keys)
        # the new tables: the bundle's, extended by the new users, the requested users' rows set
        m = ext.n_users
        tables = {k: v.clone() for k, v in load_safetensors(bpath / "tables.safetensors").items()}

        def grow(t: Any) -> Any:
            return torch.cat([t, t.new_zeros((m - len(t), *t.shape[1:]))]) if m > len(t) else t

        for name in ("user_feats", "user_hist_items", "user_hist_ratings"):
            tables[name] = grow(tables[name])
        for uid, u in zip(entries, targets):
            e = requested[uid]
            _, feats, hi, hr = b.user_row(None, [(str(i), int(r)) for i, r in e["history"]], e["profile"])
            tables["user_feats"][u], tables["user_hist_items"][u], tables["user_hist_ratings"][u] = feats, hi, hr
        idx = torch.tensor(targets)
        for j, (key, r) in enumerate(zip(keys, rows)):
            if key == "user":
                t = grow(tables[f"knowledge/{j}"])
                t[idx] = r.to(t.dtype)
                tables[f"knowledge/{j}"] = t.contiguous()
        stage("knowledge")
        new_id = uuid.uuid4().hex
        n_new = sum(u >= len(b.user_ids) for u in targets)
        cfg = dict(b.config)
        cfg.update(id=new_id, n_users=m, refreshed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        cfg["refreshes"] = list(b.config.get("refreshes", [])) + [
            {"at": cfg["refreshed_at"], "users_new": n_new, "users_changed": len(targets) - n_new,
             "check": check, "seconds": round(time.perf_counter() - t0, 2), "previous": b.id}]
        tmp = bpath.with_name(bpath.name + ".tmp-refresh")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            meta = {"bundle_id": new_id}
            save_safetensors_atomic(load_safetensors(bpath / "model.safetensors"), tmp / "model.safetensors", meta)
            save_safetensors_atomic(tables, tmp / "tables.safetensors", meta)
            atomic_write_json(tmp / "ids.json", {"bundle_id": new_id, "users": list(ext.user_ids),
                                                 "items": list(b.item_ids)}, indent=None)
            atomic_write_json(tmp / REQUESTED, {"bundle_id": new_id, "users": requested}, indent=None)
            cfg["bytes"] = {f: (tmp / f).stat().st_size for f in ("bundle.json", "ids.json", "model.safetensors",
                                                                  "tables.safetensors") if (tmp / f).exists()}
            atomic_write_json(tmp / "bundle.json", cfg)
            atomic_replace_dir(tmp, bpath)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        stage("write")
        left = consume(qpath, offset)
    out = {"users_new": n_new, "users_changed": len(targets) - n_new, "bundle_id": new_id, "previous": b.id,
           "check": check, "queue_left": left, "seconds": round(time.perf_counter() - t0, 2), "stages": stages}
    say(f"{bpath}: {n_new} new and {len(targets) - n_new} changed users with their knowledge "
        f"({m} users in all) in {out['seconds']} s ({', '.join(f'{k} {v} s' for k, v in stages.items())}); "
        f"{left} queued meanwhile")
    return out


def _reload(url: str, api_key: str | None) -> dict[str, Any]:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url.rstrip("/") + "/reload", data=b"", method="POST",
                                 headers={"X-API-Key": api_key} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise DataError(f"{url}/reload answered {e.code}: {e.read()[:200].decode(errors='replace')}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"{url}/reload: no answer ({one_line(e, 200)}); the bundle on disk is "
                        f"refreshed, POST /reload when the service is up") from None


# ---------------------------------------------------------------------------------------------- CLI
def add_refresh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="the bundle directory the service serves")
    p.add_argument("--run", default=None, help="the run it was exported from (default: bundle.json's 'run')")
    p.add_argument("--queue", default=None, help="the queue file (default: <bundle>.queue.jsonl, the service's)")
    p.add_argument("--reload", default=None, metavar="URL",
                   help="then POST URL/reload: the running service swaps the new bundle in")
    p.add_argument("--api-key", default=None, help="the service's API key for /reload (default: $COCOREC_API_KEY)")
    p.add_argument("--data-dir", default=None, help="directory holding the run's dataset (default: the run's own)")
    p.add_argument("--dataset", default=None, help="the run's dataset, if it moved")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda: where CoCo's LM runs (KAR/R4ec: their "
                   "lm_device setting)")


def cmd_refresh(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(int(args.threads))
    out = refresh_bundle(args.bundle, run=args.run, queue=args.queue, data_dir=args.data_dir, dataset=args.dataset,
                         device=args.device)
    if args.reload and out["bundle_id"] != out["previous"]:
        r = _reload(args.reload, args.api_key or os.environ.get("COCOREC_API_KEY") or None)
        print(f"{args.reload}: now serving {r.get('bundle_id')} ({r.get('users')} users)")
    return 0


"""KAR and R4ec: LM-generated text knowledge, encoded, cached, fused by a hybrid-expert adaptor.

Pipeline:

1. **Generate** (LM, greedy) per user a *preference reasoning* over the scenario factors and per
   item a *factual description* over the same factors (:mod:`cocorec.knowledge.prompts`).
   ``r4ec`` then runs ``rounds`` reflect-and-refine passes over each user's reasoning.
2. **Encode** with the sentence encoder: the user's generated text together with the history part
   of its prompt; the item text alone.
3. **Fuse**: the vectors are non-trainable buffers (``user_vec [U, D]``, ``item_vec [I, D]``,
   row 0 = padding item); a :class:`~cocorec.knowledge.hea.HybridExpertAdaptor` turns them into
   two 32-d knowledge fields of any backbone. The buffers travel in the checkpoint, so a trained
   model scores without the LM.

Caching (:class:`KnowledgeStore`): generated text lives in a :class:`~cocorec.knowledge.cache.TextCache`
per text kind whose namespace key covers the LM identity (weights + dtype), the template version
and the generation settings (``max_new_tokens``, system message, greedy decoding); an entry's key
is the hash of the exact prompt, so a changed history or dataset never reuses text. Each batch is
flushed as it finishes: a killed run resumes with only the missing prompts. Vectors live in a
:class:`~cocorec.knowledge.cache.VectorCache` keyed by the encoder identity, an entry per hash of
the exact encoder input. Batch sizes are not part of any key (greedy decoding of one prompt does not
depend on its batch beyond float rounding).

Example (tiny random LM + encoder; no files needed):
    >>> import tempfile
    >>> from cocorec.knowledge.lm import tiny_lm
    >>> from cocorec.knowledge.encoder import TextEncoder
    >>> store = KnowledgeStore(tiny_lm(), TextEncoder.tiny(dim=32), max_new_tokens=4, root=tempfile.mkdtemp())
    >>> prompt = "Describe the movie \\"Heat\\"."
    >>> store.generate("item", [prompt])[0] == store.generate("item", [prompt])[0]
    True
    >>> store.stats["item"]
    {'generated': 1, 'cached': 1}
"""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cocorec.knowledge import prompts as P
from cocorec.knowledge.base import KnowledgeMethod, register_method, register_variant
from cocorec.knowledge.hea import HybridExpertAdaptor
from cocorec.knowledge.sources import LEAK, check_source, data_domain, has_ratings, item_noun
from cocorec.utils.io import atomic_write_json, cache_root, key_of
from cocorec.utils.progress import progress_bar

__all__ = ["KarMethod", "KnowledgeStore", "R4ecMethod", "encoder_dim", "item_noun", "make_encoder", "make_lm",
           "system_message", "user_history", "TEXT_KINDS"]

#: Kinds of generated text (each its own cache namespace).
TEXT_KINDS = ("user", "item", "reflect", "refine")
#: Version of the encoder-input layout (:func:`cocorec.knowledge.prompts.user_encoder_text`).
ENCODE_VERSION = "kar-encode-v1"
TINY_ENCODER_DIM = 32


# ------------------------------------------------------------------------------------------ models
def make_lm(name: str = "smollm2", *, device: str = "auto", dtype: str = "auto", max_new_tokens: int = 64,
            batch_size: int = 16) -> Any:
    """The LM ``name`` (``"tiny"``: the random test LM) by :func:`cocorec.knowledge.lm.load_lm`."""
    from cocorec.knowledge.lm import LMConfig, load_lm

    return load_lm(LMConfig(name_or_path=name, device=device, dtype=dtype, max_new_tokens=max_new_tokens,
                            batch_size=batch_size))


def make_encoder(name: str = "minilm", *, device: str = "auto") -> Any:
    """``"minilm"`` (all-MiniLM-L6-v2), ``"tiny"`` (random, 32-d) or a local encoder directory."""
    from cocorec.knowledge.encoder import TextEncoder

    if name == "tiny":
        return TextEncoder.tiny(dim=TINY_ENCODER_DIM)
    return TextEncoder.load(None if name == "minilm" else name, device=device)


def encoder_dim(name: str) -> int:
    """Output width of an encoder, read from its config (the weights are not loaded)."""
    from cocorec.knowledge.encoder import minilm_dir
    from cocorec.knowledge.lm import LMError

    if name == "tiny":
        return TINY_ENCODER_DIM
    d = minilm_dir() if name == "minilm" else Path(name).expanduser()
    cfg = d / "config.json"
    if not cfg.is_file():
        raise LMError(f"{d}: encoder directory has no config.json")
    return int(json.loads(cfg.read_text(encoding="utf-8"))["hidden_size"])


# ------------------------------------------------------------------------------------------ data -> prompts
# Every prompt is worded by the data's domain (noun, factors, profile wording, system message; implicit
# feedback: counts, never ratings). MovieLens' domain words them exactly as before the domain existed.
def user_history(data: Any, user: int) -> list[tuple[str, Any, int]]:
    """``[(title, None, rating)]`` of the user's LM history, oldest first.

    Years are left out of the history (they make the prompt markedly longer); the item prompts
    carry them. On implicit data the rating codes are all 5 and never shown (see :func:`history_counts`).
    """
    return [(data.item_info[i]["title"], None, r) for i, r in data.llm_history(user)]


def history_counts(data: Any, user: int) -> list[float] | None:
    """The counts of the user's LM history (implicit data with a count column), else None."""
    if not getattr(data, "implicit", False):
        return None
    f = getattr(data, "llm_history_counts", None)
    return f(user) if f is not None else None


def system_message(data: Any) -> str:
    """The system message of the data's generations (MovieLens: :data:`cocorec.knowledge.prompts.SYSTEM`)."""
    return P.system_message(data_domain(data))


def user_history_part(data: Any, user: int) -> str:
    return P.user_history_part(data.user_profile[user], user_history(data, user), has_ratings(data), item_noun(data),
                               domain=data_domain(data), counts=history_counts(data, user))


def user_prompt(data: Any, user: int) -> str:
    return P.user_prompt(data.user_profile[user], user_history(data, user), has_ratings(data), item_noun(data),
                         domain=data_domain(data), counts=history_counts(data, user))


def item_prompt(data: Any, item: int) -> str:
    return P.item_prompt(data.item_info[item], item_noun(data), domain=data_domain(data))


def reflect_prompt(data: Any, history_part: str, reasoning: str) -> str:
    return P.reflect_prompt(history_part, reasoning, item_noun(data), domain=data_domain(data))


def refine_prompt(data: Any, history_part: str, reasoning: str, critique: str) -> str:
    return P.refine_prompt(history_part, reasoning, critique, item_noun(data), domain=data_domain(data))


# ------------------------------------------------------------------------------------------ the store
def _parameters(fn: Any) -> set[str]:
    """Keyword names ``fn`` takes by name (an LM stand-in may take fewer than :meth:`LM.generate`)."""
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


class KnowledgeStore:
    """Generated texts and their vectors for one (LM, encoder, settings), on disk and resumable.

    ``lm`` / ``encoder``: a loaded object, or a name (``"smollm2"``, a path or hub id, ``"tiny"``)
    loaded on first use. ``log``: where progress lines go (``None``: silent); ``progress``: a bar with an ETA
    in a terminal, a line every 30 s in a log (``None`` or ``True``; ``False``: none).
    ``stats[kind]`` counts prompts generated now vs found in the cache.
    """

    def __init__(self, lm: Any = "smollm2", encoder: Any = "minilm", *, max_new_tokens: int = 64,
                 batch_size: int | str = 32, item_batch_size: int | str = 64, root: str | Path | None = None,
                 lm_device: str = "auto", lm_dtype: str = "float32", progress: bool | None = False,
                 log: Callable[[str], None] | None = None) -> None:
        self._lm = lm
        self._encoder = encoder
        self.max_new_tokens = int(max_new_tokens)
        # "auto": as many prompts as the free GPU memory holds (LM.resolve_batch_size); 16 on a CPU
        self.batch_size: int | str = batch_size if batch_size == "auto" else int(batch_size)
        self.item_batch_size: int | str = item_batch_size if item_batch_size == "auto" else int(item_batch_size)
        self.root = Path(root) if root is not None else cache_root() / "knowledge"
        self.lm_device, self.lm_dtype = lm_device, lm_dtype
        self.progress = progress   # None: a bar in a terminal, lines in a log (progress_bar)
        self.log = log
        self.stats: dict[str, dict[str, int]] = {}
        self.seconds: dict[str, float] = {}
        self._text_caches: dict[tuple[str, str], Any] = {}
        self._vec_cache: Any = None

    # -- lazily loaded models -----------------------------------------------------------------
    @property
    def lm(self) -> Any:
        if isinstance(self._lm, str):
            self._say(f"loading LM {self._lm} ...")
            self._lm = make_lm(self._lm, device=self.lm_device, dtype=self.lm_dtype,
                               max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        elif callable(self._lm) and not hasattr(self._lm, "generate"):
            self._lm = self._lm()
        return self._lm

    @property
    def encoder(self) -> Any:
        if isinstance(self._encoder, str):
            self._encoder = make_encoder(self._encoder)
        elif callable(self._encoder) and not hasattr(self._encoder, "encode"):
            self._encoder = self._encoder()
        return self._encoder

    def release(self) -> None:
        """Drop the loaded LM and encoder (the caches stay on disk)."""
        self._lm = self._encoder = None  # type: ignore[assignment]

    def _say(self, msg: str) -> None:
        if self.log is not None:
            self.log(msg)

    # -- caches ----------------------------------------------------------------------------------
    def generation_settings(self, system: str | None = None) -> dict[str, Any]:
        """``system``: the data's system message (:func:`system_message`; default MovieLens' ``P.SYSTEM``)."""
        return {"max_new_tokens": self.max_new_tokens, "system": system or P.SYSTEM, "decoding": "greedy"}

    def namespace(self, kind: str, system: str | None = None) -> str:
        """Cache namespace of one text kind: LM identity + template version + generation settings."""
        if kind not in P.TEMPLATE_VERSIONS:
            raise ValueError(f"unknown text kind {kind!r}; one of {sorted(P.TEMPLATE_VERSIONS)}")
        return key_of("text", self.lm.identity, P.TEMPLATE_VERSIONS[kind], self.generation_settings(system))

    def text_cache(self, kind: str, system: str | None = None) -> Any:
        from cocorec.knowledge.cache import TextCache

        slot = (kind, system or P.SYSTEM)
        if slot not in self._text_caches:
            meta = {"lm": self.lm.identity, "template": P.TEMPLATE_VERSIONS[kind], **self.generation_settings(system)}
            self._text_caches[slot] = TextCache(self.root / "text", self.namespace(kind, system), meta=meta)
        return self._text_caches[slot]

    def vector_cache(self) -> Any:
        from cocorec.knowledge.cache import VectorCache

        if self._vec_cache is None:
            ns = key_of("vectors", self.encoder.identity, ENCODE_VERSION)
            self._vec_cache = VectorCache(self.root / "vectors", ns,
                                          meta={"encoder": self.encoder.identity, "layout": ENCODE_VERSION})
        return self._vec_cache

    @staticmethod
    def prompt_key(prompt: str) -> str:
        return key_of(prompt)

    def cached(self, kind: str, prompt: str, system: str | None = None) -> str | None:
        """The cached generation of ``prompt`` (``None`` if not generated yet); never generates."""
        return self.text_cache(kind, system).get(self.prompt_key(prompt))

    def count_cached(self, kind: str, prompts: Iterable[str], system: str | None = None) -> tuple[int, int]:
        """(distinct prompts, how many of them are cached)."""
        keys = {self.prompt_key(p) for p in prompts}
        return len(keys), len(keys) - len(self.text_cache(kind, system).missing(keys))

    # -- generation ------------------------------------------------------------------------------
    def generate(self, kind: str, prompts: Sequence[str], batch_size: int | None = None,
                 system: str | None = None) -> list[str]:
        """Texts for ``prompts`` (input order): cached ones are read, the rest generated batch by batch.

        Each batch is written to the cache as soon as it is done, so an interrupted call loses at
        most one batch. The first batch (the longest prompts) is timed for an estimate of the rest.
        ``system``: the system message (the data's, :func:`system_message`; default MovieLens').
        """
        cache = self.text_cache(kind, system)
        keys = [self.prompt_key(p) for p in prompts]
        by_key = dict(zip(keys, prompts))
        missing = cache.missing(keys)
        st = self.stats.setdefault(kind, {"generated": 0, "cached": 0})
        st["cached"] += len(by_key) - len(missing)
        if missing:
            lm, system = self.lm, system or P.SYSTEM
            # Longest first by token count (the LM's own bucketing, here across the whole call): prompts of
            # one length share a batch, so little padding (measured on ml-100k's user prompts at batch 32:
            # 1.9% of prefill tokens, 5.6% when sorted by characters), and the first timing is an upper bound.
            length = {k: len(by_key[k]) for k in missing}
            if callable(getattr(lm, "prompt_ids", None)):
                ids, _ = lm.prompt_ids([by_key[k] for k in missing], system, self.max_new_tokens)
                length = {k: len(r) for k, r in zip(missing, ids)}
            missing.sort(key=lambda k: -length[k])
            bs = batch_size or (self.item_batch_size if kind == "item" else self.batch_size)
            if bs == "auto" and callable(getattr(lm, "resolve_batch_size", None)):
                bs = lm.resolve_batch_size("auto", length[missing[0]], self.max_new_tokens)
            if bs == "auto":   # an LM without resolve_batch_size (e.g. a stand-in): the CPU default
                from cocorec.knowledge.lm import CPU_AUTO_BATCH

                bs = CPU_AUTO_BATCH
            bs = int(bs)
            n_batches = math.ceil(len(missing) / bs)
            self._say(f"{kind}: generating {len(missing)} of {len(by_key)} texts "
                      f"({len(by_key) - len(missing)} cached) in {n_batches} batches of {bs}")
            # The bar moves per new token (LM.generate's on_progress), so its ETA shows during the first batch.
            per_token = "on_progress" in _parameters(lm.generate)
            t_all = time.perf_counter()
            fmt = "{l_bar}{bar}| {n:.1f}/{total_fmt} [{elapsed}<{remaining}]"  # texts done, fractions within a batch
            with progress_bar(len(missing), f"generate {kind}", "text", enabled=self.progress, bar_format=fmt) as bar:
                for b in range(n_batches):
                    chunk = missing[b * bs:(b + 1) * bs]
                    t0 = time.perf_counter()
                    moved = [0.0]

                    def step(x: float, moved: list[float] = moved) -> None:
                        moved[0] += x
                        bar.update(min(x, bar.total - bar.n))  # float sums may pass the total by 1e-15

                    kw: dict[str, Any] = {"on_progress": step} if per_token else {}
                    outs = lm.generate([by_key[k] for k in chunk], max_new_tokens=self.max_new_tokens,
                                       batch_size=bs, system=system, **kw)
                    cache.put_many(dict(zip(chunk, outs)))  # flushed now: a kill keeps this batch
                    st["generated"] += len(chunk)
                    bar.update(max(0.0, min(len(chunk) - moved[0], bar.total - bar.n)))
                    if b == 0 and n_batches > 1:
                        dt = time.perf_counter() - t0
                        self._say(f"{kind}: first batch took {dt:.1f} s -> estimate <= "
                                  f"{dt * n_batches / 60:.1f} min for {len(missing)} texts "
                                  f"(first batch = longest prompts)")
            took = time.perf_counter() - t_all
            self.seconds[kind] = self.seconds.get(kind, 0.0) + took
            # a log (no terminal, so no bar) otherwise shows only the first batch's estimate
            self._say(f"{kind}: generated {len(missing)} texts in {took:.1f} s ({took / n_batches:.1f} s a batch)")
        return [cache[k] for k in keys]

    # -- knowledge of users and items -----------------------------------------------------------
    def user_reasoning(self, data: Any, users: Sequence[int]) -> list[str]:
        return self.generate("user", [user_prompt(data, u) for u in users], system=system_message(data))

    def item_facts(self, data: Any, items: Sequence[int]) -> list[str]:
        return self.generate("item", [item_prompt(data, i) for i in items], system=system_message(data))

    def r4ec_chain(self, data: Any, users: Sequence[int], rounds: int) -> list[list[dict[str, str]]]:
        """Per user: ``[{"reasoning"}, {"reflection", "refined"} x rounds]`` (round 0 = KAR's reasoning)."""
        hist = [user_history_part(data, u) for u in users]
        system = system_message(data)
        current = self.user_reasoning(data, users)
        chains = [[{"reasoning": c}] for c in current]
        for _ in range(int(rounds)):
            critiques = self.generate("reflect", [reflect_prompt(data, h, c) for h, c in zip(hist, current)],
                                      system=system)
            current = self.generate("refine", [refine_prompt(data, h, c, r)
                                               for h, c, r in zip(hist, current, critiques)], system=system)
            for ch, r, c in zip(chains, critiques, current):
                ch.append({"reflection": r, "refined": c})
        return chains

    def user_texts(self, data: Any, users: Sequence[int], method: str = "kar", rounds: int = 1) -> list[str]:
        """The final generated user text of ``method`` (kar: the reasoning; r4ec: the last refinement)."""
        if method == "r4ec" and rounds > 0:
            return [ch[-1]["refined"] for ch in self.r4ec_chain(data, users, rounds)]
        return self.user_reasoning(data, users)

    def encode(self, texts: Sequence[str], chunk: int = 512) -> np.ndarray:
        """Vectors of ``texts`` (cached per exact text; missing ones encoded and flushed per chunk)."""
        cache = self.vector_cache()
        keys = [key_of(t) for t in texts]
        by_key = dict(zip(keys, texts))
        missing = cache.missing(keys)
        st = self.stats.setdefault("encode", {"generated": 0, "cached": 0})
        st["cached"] += len(by_key) - len(missing)
        if missing:
            self._say(f"encoding {len(missing)} texts with {self.encoder.identity}")
            t0 = time.perf_counter()
            for s in range(0, len(missing), chunk):
                part = missing[s:s + chunk]
                cache.put_matrix(part, self.encoder.encode([by_key[k] for k in part], progress=self.progress))
                st["generated"] += len(part)
            self.seconds["encode"] = self.seconds.get("encode", 0.0) + time.perf_counter() - t0
        return cache.get_matrix(keys)

    def user_vectors(self, data: Any, users: Sequence[int], method: str = "kar", rounds: int = 1) -> np.ndarray:
        texts = self.user_texts(data, users, method, rounds)
        return self.encode([P.user_encoder_text(t, user_history_part(data, u)) for t, u in zip(texts, users)])

    def item_vectors(self, data: Any, items: Sequence[int]) -> np.ndarray:
        return self.encode(self.item_facts(data, items))

    def identities(self, system: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"lm": self.lm.identity, "generation": self.generation_settings(system),
                               "templates": dict(P.TEMPLATE_VERSIONS)}
        if self._encoder is not None:
            out["encoder"] = self.encoder.identity
        return out


# ------------------------------------------------------------------------------------------ methods
@register_method("kar")
class KarMethod(KnowledgeMethod):
    """KAR: user reasoning + item facts from an LM, encoded, fused by a hybrid-expert adaptor.

    Config keys (``--set method.KEY=VALUE``): ``lm`` (``smollm2``, a path or hub id; ``tiny`` for
    tests), ``encoder`` (``minilm``, a path; ``tiny``), ``max_new_tokens`` (part of the text cache
    key), ``batch_size`` / ``item_batch_size`` (generation batches), ``hidden`` (expert MLP),
    ``n_shared`` / ``n_specific`` (experts), ``dropout``, ``standardize`` (z-score the vectors with
    the statistics of the training users and all items; off by default, like KAR: on ml-100k / DIN /
    seed 0 it lowered validation AUC from 0.7831 to 0.7653), ``lm_device`` / ``lm_dtype`` (default
    ``float32``: the texts are generated once and cached under the dtype, and the cached texts stay
    the ones every KAR result so far used; ``auto`` follows the one LM policy,
    :func:`cocorec.knowledge.lm.resolve_dtype`, with a cache of its own), ``fields``
    (``user,item``, the default and KAR's; ``item`` or ``user`` keeps one knowledge field; ``item``
    never generates the user reasoning). The user field is one vector per user: on ml-100k, whose test
    users are unseen in training, zeroing it in trained runs raised test AUC on DeepFM, AutoInt and
    xDeepFM (docs/results/field-ablation.md).

    Example:
        >>> m = KarMethod(lm="tiny", encoder="tiny")
        >>> m.knowledge_dims
        [32, 32]
        >>> KarMethod(lm="tiny", encoder="tiny", fields="item").knowledge_dims
        [32]
    """

    name = "kar"

    def __init__(self, lm: str = "smollm2", encoder: str = "minilm", max_new_tokens: int = 64,
                 batch_size: int = 32, item_batch_size: int = 64, hidden: tuple[int, ...] = (128, 32),
                 n_shared: int = 2, n_specific: int = 2, dropout: float = 0.0, standardize: bool = False,
                 lm_device: str = "auto", lm_dtype: str = "float32", fields: str = "user,item", source: str = "lm",
                 corrupt: float = 0.0, corruption: str = "invert") -> None:
        super().__init__()
        check_source(self.name, source, corrupt, corruption)
        self.source, self.corrupt, self.corruption = source, float(corrupt), corruption
        self.fields = parse_fields(fields)
        self.cfg: dict[str, Any] = dict(lm=lm, encoder=encoder, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                        item_batch_size=item_batch_size, hidden=list(hidden), n_shared=n_shared,
                                        n_specific=n_specific, dropout=dropout, standardize=standardize,
                                        lm_device=lm_device, lm_dtype=lm_dtype, fields=",".join(self.fields),
                                        source=source, corrupt=self.corrupt)
        if corruption != "invert":   # the keys of older runs' texts and caches stay as they were
            self.cfg["corruption"] = corruption
        if source == "oracle":
            self.cfg["leak"] = LEAK
        dim = encoder_dim(encoder)
        self.hea = HybridExpertAdaptor(dim, n_types=len(self.fields), n_shared=n_shared, n_specific=n_specific,
                                       hidden=tuple(hidden), dropout=dropout)
        self.register_buffer("user_vec", torch.zeros(0, dim))
        self.register_buffer("item_vec", torch.zeros(0, dim))
        self.knowledge_dims = self.hea.out_dims
        self.knowledge_names = list(self.fields)
        self._info: dict[str, Any] = {}

    # -- knowledge -----------------------------------------------------------------------------
    def store(self, log: Callable[[str], None] | None = None, progress: bool | None = False) -> KnowledgeStore:
        c = self.cfg
        return KnowledgeStore(c["lm"], c["encoder"], max_new_tokens=c["max_new_tokens"], batch_size=c["batch_size"],
                              item_batch_size=c["item_batch_size"], lm_device=c["lm_device"],
                              lm_dtype=c["lm_dtype"], log=log, progress=progress)

    def _user_vectors(self, store: KnowledgeStore, data: Any, users: Sequence[int]) -> np.ndarray:
        return store.user_vectors(data, users, "kar")

    def _source_user_vectors(self, store: KnowledgeStore, data: Any) -> np.ndarray:
        """Every user's vector under the run's source: the LM's reasoning of the history as the source
        shows it (``lm``, ``shuffled``, corrupted histories), or the source's own text (``template``,
        ``oracle``: no LM pass)."""
        src = self.user_source(data)
        if src.source in ("template", "oracle"):
            return store.encode(src.user_texts())
        return self._user_vectors(store, src.view(), list(range(data.n_users)))

    def prepare(self, data: Any, output_dir: Path | None = None) -> None:
        """Load (or generate) the knowledge of every user and item, encode it, keep the vectors as buffers."""
        t0 = time.perf_counter()
        store = self.store(log=print, progress=None)  # bars with an ETA in a terminal; log lines alone elsewhere
        dim = self.hea.in_dim
        empty = np.zeros((0, dim), np.float32)  # a field not used is never generated
        u = self._source_user_vectors(store, data) if "user" in self.fields else empty
        if "item" in self.fields:
            i = store.item_vectors(data, list(range(1, data.spec.n_items)))
            i = np.concatenate([np.zeros((1, dim), np.float32), i])
        else:
            i = empty
        if self.cfg["standardize"]:
            if len(u):
                u = _standardize(u, np.unique(data.split("train").user))
            if len(i):
                i = _standardize(i, np.arange(1, len(i)), keep_zero_row=True)
        device = next(self.hea.parameters()).device
        self._set_vectors(torch.from_numpy(np.ascontiguousarray(u)).to(device),
                          torch.from_numpy(np.ascontiguousarray(i)).to(device))
        self._info = {**store.identities(system_message(data)), "source": self.user_source(data).label,
                      "texts": store.stats, "seconds": {k: round(v, 1) for k, v in store.seconds.items()},
                      "prepare_seconds": round(time.perf_counter() - t0, 1)}
        store.release()
        if output_dir is not None:
            atomic_write_json(Path(output_dir) / "knowledge.json", self._info)

    def _set_vectors(self, user_vec: torch.Tensor, item_vec: torch.Tensor) -> None:
        self._buffers["user_vec"] = user_vec.float()
        self._buffers["item_vec"] = item_vec.float()

    # -- model -----------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        inputs = []
        for f in self.fields:
            vec = self.user_vec if f == "user" else self.item_vec
            if vec.shape[0] == 0:
                raise RuntimeError(f"{self.name}: no knowledge vectors; call prepare(data) or load a checkpoint first")
            inputs.append(vec[batch[f].to(vec.device)])
        return self.hea(inputs)  # type: ignore[return-value]

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        # The buffers' sizes are known only from the data: take them from the checkpoint.
        if "user_vec" in state and "item_vec" in state:
            device = self.user_vec.device
            self._set_vectors(state["user_vec"].to(device), state["item_vec"].to(device))
        self.load_state_dict(state, strict=False)

    @torch.no_grad()
    def diagnostics(self) -> dict[str, Any]:
        out = dict(self._info)
        vecs = {"user": self.user_vec, "item": self.item_vec[1:]}
        if all(vecs[f].shape[0] for f in self.fields):
            out["mean_gates"] = {}
            for t, f in enumerate(self.fields):  # the gate of field t over every user (item) of that field
                _, g = self.hea([vecs[f]] * len(self.fields), return_gates=True)
                out["mean_gates"][f] = [round(float(x), 4) for x in g[t].mean(0)]
        return out

    def config_dict(self) -> dict[str, Any]:
        return {"method": self.name, **self.cfg, **{k: self._info[k] for k in ("lm", "encoder", "templates")
                                                     if k in self._info}}


@register_method("r4ec")
class R4ecMethod(KarMethod):
    """KAR plus R4ec-style reflect-and-refine of the user reasoning (``rounds`` passes, 1 or 2).

    Each round: a reflector prompt critiques the current reasoning against the user's ratings, an
    actor prompt rewrites it using the critique. The final refinement replaces KAR's reasoning;
    item facts are KAR's.

    Example:
        >>> R4ecMethod(lm="tiny", encoder="tiny", rounds=2).cfg["rounds"]
        2
    """

    name = "r4ec"

    def __init__(self, lm: str = "smollm2", encoder: str = "minilm", max_new_tokens: int = 64,
                 batch_size: int = 32, item_batch_size: int = 64, hidden: tuple[int, ...] = (128, 32),
                 n_shared: int = 2, n_specific: int = 2, dropout: float = 0.0, standardize: bool = False,
                 lm_device: str = "auto", lm_dtype: str = "float32", rounds: int = 1, fields: str = "user,item",
                 source: str = "lm", corrupt: float = 0.0, corruption: str = "invert") -> None:
        super().__init__(lm=lm, encoder=encoder, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         item_batch_size=item_batch_size, hidden=hidden, n_shared=n_shared, n_specific=n_specific,
                         dropout=dropout, standardize=standardize, lm_device=lm_device, lm_dtype=lm_dtype,
                         fields=fields, source=source, corrupt=corrupt, corruption=corruption)
        if rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds}")
        self.cfg["rounds"] = int(rounds)

    def _user_vectors(self, store: KnowledgeStore, data: Any, users: Sequence[int]) -> np.ndarray:
        return store.user_vectors(data, users, "r4ec", self.cfg["rounds"])


KarItem = register_variant(KarMethod, "kar-item", "KAR with the item knowledge field only (``kar`` with "
                           "``fields=item``): no user reasoning is generated or used.", fields="item")


def parse_fields(fields: str | Sequence[str]) -> tuple[str, ...]:
    """``"item"`` / ``"user,item"`` / ``["item", "user"]`` -> the knowledge fields in canonical order.

    Example:
        >>> parse_fields("item, user")
        ('user', 'item')
    """
    names = [f.strip().lower() for f in (fields.split(",") if isinstance(fields, str) else fields) if f.strip()]
    bad = [f for f in names if f not in ("user", "item")]
    if bad or not names:
        raise ValueError(f"fields must name user and/or item, e.g. 'user,item' or 'item' (got {fields!r})")
    return tuple(f for f in ("user", "item") if f in names)


def _standardize(x: np.ndarray, rows: np.ndarray, keep_zero_row: bool = False) -> np.ndarray:
    """z-score every column with the mean/std of ``rows`` (row 0 stays zero when ``keep_zero_row``)."""
    ref = x[rows] if len(rows) else x
    out = (x - ref.mean(0)) / (ref.std(0) + 1e-6)
    if keep_zero_row:
        out[0] = 0.0
    return out.astype(np.float32)

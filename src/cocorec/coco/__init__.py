"""CoCo (DESIGN section 4): VQ-selected soft prompts on an LM, a contradiction judge, LoRA, group guard.

Modules: :mod:`~cocorec.coco.codebook` (VQ codebook), :mod:`~cocorec.coco.kvcache` (per-user
user-text KV cache for the suffix trick), :mod:`~cocorec.coco.readout` (cross-attention read-out),
:mod:`~cocorec.coco.judge` (confidence, contradiction mask, phase scheduler),
:mod:`~cocorec.coco.lora` (adapters), :mod:`~cocorec.coco.method` (the registered methods
``coco``, ``coco-novq``, ``coco-nojudge``, ``static``).
"""

from cocorec.coco.codebook import VQCodebook, VQOutput, perplexity
from cocorec.coco.judge import PhaseScheduler, confidence, contradiction_mask
from cocorec.coco.kvcache import UserTextKVCache, kv_bytes_per_token
from cocorec.coco.readout import CrossAttentionReadout

__all__ = ["CrossAttentionReadout", "PhaseScheduler", "UserTextKVCache", "VQCodebook", "VQOutput", "confidence",
           "contradiction_mask", "kv_bytes_per_token", "perplexity"]

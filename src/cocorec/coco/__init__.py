"""CoCo: VQ-selected soft prompts on an LM, a contradiction judge, LoRA, a group guard.

Each block owns its settings (a dataclass beside it) and :class:`~cocorec.coco.method.CoCoConfig`
wires them: :mod:`~cocorec.coco.codebook` (VQ codebook, ``CodebookConfig``),
:mod:`~cocorec.coco.kvcache` (per-user user-text KV cache for the suffix trick, ``KVConfig``),
:mod:`~cocorec.coco.readout` (cross-attention read-out, ``ReadoutConfig``),
:mod:`~cocorec.coco.judge` (the judge pass, per-user contradiction stats, phase schedule,
``JudgeConfig``), :mod:`~cocorec.coco.lora` (adapters, ``LoRAConfig``), :mod:`~cocorec.coco.guard`
(the group guard, ``GuardConfig``), :mod:`~cocorec.coco.bank` (the per-user bank), and
:mod:`~cocorec.coco.method` (the registered methods ``coco``, ``coco-novq``, ``coco-nojudge``,
``static``, ``coco-oneprompt``).
"""

from cocorec.coco.codebook import CodebookConfig, VQCodebook, VQOutput, perplexity
from cocorec.coco.guard import GroupGuard, GuardConfig
from cocorec.coco.judge import JudgeConfig, PhaseScheduler, confidence, contradiction_mask, judge_batch
from cocorec.coco.kvcache import KVConfig, UserTextKVCache, kv_bytes_per_token
from cocorec.coco.lora import LoRAConfig
from cocorec.coco.readout import CrossAttentionReadout, ReadoutConfig

__all__ = ["CodebookConfig", "CrossAttentionReadout", "GroupGuard", "GuardConfig", "JudgeConfig", "KVConfig",
           "LoRAConfig", "PhaseScheduler", "ReadoutConfig", "UserTextKVCache", "VQCodebook", "VQOutput", "confidence",
           "contradiction_mask", "judge_batch", "kv_bytes_per_token", "perplexity"]

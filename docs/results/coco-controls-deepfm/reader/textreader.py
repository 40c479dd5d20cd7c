"""DeepFM trained end to end with a read-out over SmolLM2's frozen last-layer states of each user's oracle text
(no prompts, codebook or LoRA: CoCo's read-out path alone). Which read-out carries the oracle's genre numbers?

    python textreader.py VARIANT SPLIT SEED OUT_RESULTS      # VARIANT: xattn | slots1 | slots4
"""
import sys
from pathlib import Path
import numpy as np, torch, torch.nn.functional as F
from torch import nn
from cocorec.knowledge.base import KnowledgeMethod, register_method
from cocorec.coco.readout import CrossAttentionReadout
from cocorec import cli

VARIANT = sys.argv[1]
STATES = Path("runs/oracle-states.pt")


def text_states(data):
    if STATES.exists():
        return torch.load(STATES)
    from cocorec.knowledge.lm import LMConfig, load_lm
    from cocorec.knowledge.sources import UserSource
    lm = load_lm(LMConfig(device="cpu", dtype="bfloat16"))
    ids, m = lm.encode_text(UserSource(data, "oracle").user_texts())
    with torch.no_grad():
        h = torch.cat([lm.hidden_states(lm.embed_tokens(ids[i:i + 128]), m[i:i + 128]).to(torch.bfloat16)
                       for i in range(0, len(ids), 128)])
    torch.save({"h": h, "m": m}, STATES)
    return {"h": h, "m": m}


class Slots(nn.Module):
    def __init__(self, d, kw, S=18, dk=32, dv=2, out=32):
        super().__init__()
        self.kw = kw
        self.norm = nn.LayerNorm(d); self.k = nn.Conv1d(d, dk, kw); self.v = nn.Linear(d, dv)
        self.q = nn.Parameter(torch.randn(S, dk) / dk ** 0.5)
        self.mlp = nn.Sequential(nn.Linear(S * dv, 128), nn.GELU(), nn.Linear(128, out))

    def forward(self, h, mask):
        h = self.norm(h)
        kk = self.k(F.pad(h.transpose(1, 2), (self.kw - 1, 0))).transpose(1, 2)
        a = torch.einsum("btk,sk->bst", kk, self.q) / self.q.shape[1] ** 0.5
        a = a.masked_fill(~mask.bool()[:, None, :], float("-inf")).softmax(-1)
        return self.mlp(torch.einsum("bst,btv->bsv", a, self.v(h)).flatten(1))


class XAttn(nn.Module):   # CoCo's read-out, its prompt states replaced by 8 learned query states
    def __init__(self, d, out=32):
        super().__init__()
        self.qs = nn.Parameter(torch.randn(8, d))
        self.r = CrossAttentionReadout(d, out, attn_dim=64, heads=2)

    def forward(self, h, mask):
        return self.r(self.qs.expand(len(h), -1, -1), h, mask)


@register_method("reader")
class Reader(KnowledgeMethod):
    name = "reader"

    def __init__(self, **kw):
        super().__init__()
        self.knowledge_dims, self.knowledge_names = [32], ["user"]
        self.net = XAttn(576) if VARIANT == "xattn" else Slots(576, int(VARIANT[5:]))

    def prepare(self, data, output_dir=None):
        object.__setattr__(self, "_st", text_states(data))

    def forward(self, batch):
        users = batch["user"]
        uniq, inv = torch.unique(users, return_inverse=True)
        k = self.net(self._st["h"][uniq].float(), self._st["m"][uniq])
        return [k[inv]]

    def config_dict(self):
        return {"method": "reader", "variant": VARIANT}


split, seed, res = sys.argv[2], sys.argv[3], sys.argv[4]
sys.exit(cli.main(["train", "--dataset", "ml-100k", "--backbone", "deepfm", "--method", "reader", "--seed", seed,
                   "--output", f"runs/reader/{VARIANT}-p{split}-s{seed}", "--results", res, "--quiet",
                   "--overwrite", "--set", f"protocol.split_seed={split}", "--set", "train.epochs=10",
                   "--set", "train.patience=2", "--set", "train.threads=1"]))

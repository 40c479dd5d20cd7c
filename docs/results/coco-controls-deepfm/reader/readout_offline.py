"""Can a read-out over SmolLM2's last-layer token states of the oracle text recover the genre deviations?
Regress the 19 oracle numbers (z-scored) from frozen token states; held-out users' R2. Variants: the
current pooling (mean over the L query outputs) and concatenation of the L query outputs."""
import sys, numpy as np, torch, torch.nn.functional as F
from torch import nn
from cocorec.data.protocol import ProtocolConfig, prepare
from cocorec.knowledge.sources import UserSource
from cocorec.knowledge.lm import LMConfig, load_lm
from cocorec.coco.readout import CrossAttentionReadout
torch.set_num_threads(2); torch.manual_seed(0)
data = prepare("ml-100k", ProtocolConfig(split_seed=42))
src = UserSource(data, "oracle"); texts = src.user_texts(); full = src.vectors()
train = np.zeros(len(full), bool); train[np.unique(data.split("train").user)] = True
lm = load_lm(LMConfig(device="cpu", dtype="bfloat16"))
ids, m = lm.encode_text(texts)
with torch.no_grad():
    H = torch.cat([lm.hidden_states(lm.embed_tokens(ids[i:i+128]), m[i:i+128]).float() for i in range(0, len(texts), 128)])
y = torch.tensor(full, dtype=torch.float32); mu, sd = y[train].mean(0), y[train].std(0); y = (y - mu) / sd
dev_true = full[:, 1:] - full[:, :1]
tr, te = torch.from_numpy(train), torch.from_numpy(~train)
L = 8

class R(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.pool = pool
        self.qs = nn.Parameter(torch.randn(L, H.shape[-1]))
        self.r = CrossAttentionReadout(H.shape[-1], 32, attn_dim=64, heads=2)
        if pool == "concat":
            self.r.mlp[0] = nn.Linear(64 * L, 128)
        self.head = nn.Linear(32, 19)
    def forward(self, h, mask):
        r = self.r
        hp = r.norm(self.qs.expand(len(h), -1, -1)); ht = r.norm(h)
        ctx = torch.cat([ht, hp], 1); mk = torch.cat([mask.bool(), torch.ones(len(h), L, dtype=torch.bool)], 1)
        q = r.q(hp).view(len(h), L, 2, 32).transpose(1, 2); k = r.k(ctx).view(len(h), -1, 2, 32).transpose(1, 2)
        v = r.v(ctx).view(len(h), -1, 2, 32).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mk[:, None, None, :]).transpose(1, 2).reshape(len(h), L, 64)
        o = o.mean(1) if self.pool == "mean" else o.reshape(len(h), -1)
        return self.head(r.mlp(o))

def r2(p, t): return 1 - ((p - t) ** 2).mean() / t.var()
for pool in sys.argv[1:] or ["mean", "concat"]:
    torch.manual_seed(0); net = R(pool); opt = torch.optim.Adam(net.parameters(), 1e-3)
    for ep in range(600):
        perm = torch.nonzero(tr).squeeze(1)[torch.randperm(int(tr.sum()))]
        for b in perm.split(128):
            loss = F.mse_loss(net(H[b], m[b]), y[b]); opt.zero_grad(); loss.backward(); opt.step()
        if ep % 100 == 99 or ep == 599:
            with torch.no_grad():
                p = (net(H, m) * sd + mu).numpy()
            dv = p[:, 1:] - p[:, :1]
            print(f"{pool} epoch {ep+1}: held-out R2 label {r2(p[~train,0], full[~train,0]):.3f} "
                  f"genres {np.mean([r2(p[~train,j], full[~train,j]) for j in range(1,19)]):.3f} "
                  f"deviations {np.mean([r2(dv[~train,j], dev_true[~train,j]) for j in range(18)]):.3f} (train loss {loss.item():.3f})", flush=True)

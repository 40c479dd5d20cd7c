"""Per-layer linear decodability of the oracle numbers from SmolLM2's states of the oracle user text."""
import sys, time
import numpy as np, torch
from sklearn.linear_model import RidgeCV
from cocorec.data.protocol import ProtocolConfig, prepare
from cocorec.knowledge.sources import UserSource
from cocorec.knowledge.lm import LMConfig, load_lm
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
data = prepare("ml-100k", ProtocolConfig(split_seed=42))
src = UserSource(data, "oracle")
texts, vec = src.user_texts(), src.vectors()
print(texts[0]); print(vec.shape)
lm = load_lm(LMConfig(device="cpu", dtype="bfloat16"))
train = np.zeros(len(vec), dtype=bool); train[np.unique(data.split("train").user)] = True
feats = {}
t0 = time.time()
with torch.no_grad():
    for i in range(0, len(texts), 64):
        ids, m = lm.encode_text(texts[i:i+64])
        out = lm.decoder(inputs_embeds=lm.embed_tokens(ids).to(lm.dtype), attention_mask=m, output_hidden_states=True)
        mf = m.float()[..., None]
        last = m.sum(1) - 1
        for l, h in enumerate(out.hidden_states):
            h = h.float()
            mean = (h * mf).sum(1) / mf.sum(1)
            feats.setdefault(("mean", l), []).append(mean.numpy())
            feats.setdefault(("last", l), []).append(h[torch.arange(len(h)), last].numpy())
print(f"lm pass {time.time()-t0:.0f}s, tokens/text {m.sum(1).float().mean():.0f}")
def score(x, y):
    r = RidgeCV(alphas=np.logspace(-3, 4, 15)).fit(x[train], y[train]); return r.score(x[~train], y[~train])
for kind in ("mean", "last"):
    for l in range(len(out.hidden_states)):
        x = np.concatenate(feats[(kind, l)])
        lr = score(x, vec[:, 0]); gr = np.mean([score(x, vec[:, j]) for j in range(1, vec.shape[1])])
        print(f"{kind} layer {l:2d}: held-out R2 label rate {lr:.3f} genre rates {gr:.3f}", flush=True)

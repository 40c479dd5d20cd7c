"""How well do the LM's states, CoCo's k_u, and the text's numbers carry the genre deviations (genre rate - label rate)?"""
import numpy as np, torch
from safetensors.torch import load_file
from sklearn.linear_model import RidgeCV
from cocorec.data.protocol import ProtocolConfig, prepare
from cocorec.knowledge.sources import UserSource
from cocorec.knowledge.lm import LMConfig, load_lm
torch.set_num_threads(2)
data = prepare("ml-100k", ProtocolConfig(split_seed=42))
src = UserSource(data, "oracle"); texts = src.user_texts(); full = src.vectors(); text = src.vectors("text")
train = np.zeros(len(full), bool); train[np.unique(data.split("train").user)] = True
dev = full[:, 1:] - full[:, :1]
def score(x, y):
    r = RidgeCV(alphas=np.logspace(-3, 4, 15)).fit(x[train], y[train]); return r.score(x[~train], y[~train])
def report(name, x):
    print(f"{name:28s} label {score(x, full[:, 0]):.3f}  genre rates {np.mean([score(x, full[:, j]) for j in range(1, 19)]):.3f}"
          f"  deviations {np.mean([score(x, dev[:, j]) for j in range(18)]):.3f}", flush=True)
report("text numbers (ceiling)", text)
report("coco k_u deepfm 42/0", load_file("/work/notes/bundles/deepfm-coco-42-clean/tables.safetensors")["knowledge/0"].float().numpy())
report("kar deepfm 42 (resumed)", load_file("/work/notes/bundles/deepfm-kar-42/tables.safetensors")["knowledge/0"].float().numpy())
lm = load_lm(LMConfig(device="cpu", dtype="bfloat16"))
feats = {}
with torch.no_grad():
    for i in range(0, len(texts), 64):
        ids, m = lm.encode_text(texts[i:i+64])
        out = lm.decoder(inputs_embeds=lm.embed_tokens(ids).to(lm.dtype), attention_mask=m, output_hidden_states=True)
        mf = m.float()[..., None]
        for l in (4, 10, 15, 20, 25, 30):
            h = out.hidden_states[l].float()
            feats.setdefault(l, []).append(((h * mf).sum(1) / mf.sum(1)).numpy())
for l, f in feats.items():
    report(f"LM layer {l} mean-pool", np.concatenate(f))

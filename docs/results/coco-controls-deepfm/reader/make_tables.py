"""Tables for frozen_field.py from a bundle: k_u as is; its ridge decode (fitted on training users) of the oracle numbers."""
import json, sys
import numpy as np, torch
from safetensors.torch import load_file, save_file
from sklearn.linear_model import RidgeCV
from cocorec.data.protocol import ProtocolConfig, prepare
from cocorec.knowledge.sources import UserSource
b, split, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = json.load(open(f"{b}/bundle.json"))
data = prepare("ml-100k", ProtocolConfig(split_seed=split)); assert data.key == cfg["data_key"]
k = load_file(f"{b}/tables.safetensors")["knowledge/0"].float().numpy()
src = UserSource(data, "oracle"); full = src.vectors(); text = src.vectors("text")
train = np.zeros(len(k), bool); train[np.unique(data.split("train").user)] = True
dec = np.stack([RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(k[train], full[train, j]).predict(k) for j in range(full.shape[1])], 1)
rng = np.random.default_rng(0)
def t(x): return {"user": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))}
save_file(t(k), f"{out}/ku.safetensors"); save_file(t(dec), f"{out}/ku-decoded.safetensors")
save_file(t(text), f"{out}/text.safetensors")
# the text numbers with the label rate blurred to the R2 k_u decodes it with
r2 = 1 - ((dec[~train, 0] - full[~train, 0]) ** 2).mean() / full[~train, 0].var()
noisy = text.copy(); noisy[:, 0] += rng.normal(0, np.sqrt(1 - r2) * full[:, 0].std(), len(k))
save_file(t(noisy), f"{out}/text-blurred.safetensors")
print("held-out R2 of the decoded label rate", r2, "key list", list(load_file(f"{b}/tables.safetensors"))[:5])

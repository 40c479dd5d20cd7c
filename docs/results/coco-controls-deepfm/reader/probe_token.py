"""Is "Drama 69%" bound in SmolLM2's state at the number's tokens? Ridge, held-out users, Drama's rate and deviation."""
import re, numpy as np, torch
from sklearn.linear_model import RidgeCV
from cocorec.data.protocol import ProtocolConfig, prepare
from cocorec.knowledge.sources import UserSource
from cocorec.knowledge.lm import LMConfig, load_lm
torch.set_num_threads(2)
data = prepare("ml-100k", ProtocolConfig(split_seed=42))
src = UserSource(data, "oracle"); texts = src.user_texts(); full = src.vectors()
tags = list(data.meta["tag_vocab"])
train = np.zeros(len(full), bool); train[np.unique(data.split("train").user)] = True
lm = load_lm(LMConfig(device="cpu", dtype="bfloat16"))
tok = lm.tokenizer
ids, m = lm.encode_text(texts)
print("pad side check: first ids", ids[0, :5].tolist(), tok.convert_ids_to_tokens(ids[0, :12].tolist()))
with torch.no_grad():
    out = [lm.decoder(inputs_embeds=lm.embed_tokens(ids[i:i+128]).to(lm.dtype), attention_mask=m[i:i+128], output_hidden_states=True).hidden_states
           for i in range(0, len(texts), 128)]
for g in ("Drama", "Comedy", "Romance", "Thriller"):
    j = tags.index(g)
    users, pos = [], []
    for u, t in enumerate(texts):
        mm = re.search(re.escape(g) + r" (\d+)%", t)
        if not mm: continue
        enc = tok(t, return_offsets_mapping=True, add_special_tokens=False)
        offs = enc["offset_mapping"]
        # the token that ends the number (the last digit), in the encoded sequence (encode_text may add a BOS)
        k = max(i for i, (a, b) in enumerate(offs) if a < mm.end(1))
        lead = len(ids[u]) - int(m[u].sum()) if ids[u, 0] == tok.pad_token_id else 0
        bos = int(m[u].sum()) - len(offs)
        users.append(u); pos.append(k + bos + lead)
    users = np.array(users); tr = train[users]
    rate, dev = full[users, j + 1], full[users, j + 1] - full[users, 0]
    for layer in (4, 15, 30):
        X = np.stack([out[u // 128][layer][u % 128, p].float().numpy() for u, p in zip(users, pos)])
        def sc(y):
            r = RidgeCV(alphas=np.logspace(-2, 5, 15)).fit(X[tr], y[tr]); return r.score(X[~tr], y[~tr])
        print(f"{g:9s} ({len(users)} users) layer {layer:2d}, state at its number: R2 {g} rate {sc(rate):.3f}, deviation {sc(dev):.3f}, label rate {sc(full[users,0]):.3f}", flush=True)

"""Does the judge see the harm better when p0 uses the population's mean knowledge instead of k = 0?

For a finished run with ``corrupt > 0`` (the direct field is the cleanest channel: the bound): every
training user judged once with the trained model, as the final judge pass does, against two references:
p0 = f(x, 0) (what the judge uses; the backbone is trained on it through knowledge dropout) and
p0 = f(x, k_mean), k_mean the mean of the training users' knowledge (each user once). Prints the AUROC of
each per-user score at telling corrupted users from clean ones under both references. (The field's
knowledge is centred over the training users, so for it the two references are the same.)

    python docs/results/coco-controls/judge_mean_p0.py RUN_DIR [RUN_DIR ...]
"""
import json
import sys

import numpy as np
import torch

from cocorec.coco.judge import UserJudgeStats
from cocorec.serve.scorer import load_scorer

torch.set_num_threads(1)
rows = []
for run in sys.argv[1:]:
    sc = load_scorer(run)
    m, data = sc.method, sc.data
    if getattr(m, "guard", None) is not None:
        m.guard.enabled.fill_(True)
    m.user_source(data)   # the source knows which users it corrupted (the `corrupt` grouping)
    s = data.split("train")
    batches = list(data.batches("train", 8192))
    with torch.no_grad():
        fields = [m(b) for b in batches]
        users = torch.cat([b["user"] for b in batches])
        first = np.unique(users.numpy(), return_index=True)[1]   # one sample per training user
        k_mean = [torch.cat([f[i] for f in fields])[first].float().mean(0) for i in range(len(fields[0]))]
        p_plus = np.concatenate([torch.sigmoid(sc.model(b, k).float()).numpy() for b, k in zip(batches, fields)])
        p_zero = np.concatenate([torch.sigmoid(sc.model(b, None).float()).numpy() for b in batches])
        p_mean = np.concatenate([torch.sigmoid(sc.model(b, [km.expand(len(b["user"]), -1) for km in k_mean])
                                               .float()).numpy() for b in batches])
    delta = json.load(open(f"{run}/metrics.json"))["config"]["method_config"].get("delta", 0.02)
    groups = m.user_groups()["corrupt"]
    out = {"run": run.rstrip("/").split("/")[-1]}
    for name, ref in (("k0", p_zero), ("mean", p_mean)):
        summ = UserJudgeStats.from_predictions(data.n_users, s.user, p_plus, ref, s.label, delta).summary(groups)
        out.update({f"{name}:{k.removeprefix('corrupt_user_auroc')}": round(v, 3) for k, v in summ.items()
                    if k.startswith("corrupt_user_auroc")})
    rows.append(out)
    print(json.dumps(out), flush=True)
if len(rows) > 1:
    keys = [k for k in rows[0] if k != "run"]
    print(json.dumps({"mean": {k: round(float(np.mean([r[k] for r in rows])), 3) for k in keys}}))

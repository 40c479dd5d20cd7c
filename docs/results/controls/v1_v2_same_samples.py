"""Are the CTR samples of protocol v1 and v2 byte-identical (only the LM histories differ)? Compares
every array of the processed-data caches of ml-100k (v1 caches left from earlier runs) with v2.

    python docs/results/controls/v1_v2_same_samples.py
"""
import json

import numpy as np

from cocorec.data.protocol import ProtocolConfig, prepare
from cocorec.utils.io import cache_root

root = cache_root() / "processed"
for d in sorted(root.iterdir()):
    meta = json.loads((d / "meta.json").read_text())
    if not d.name.startswith("ml-100k"):
        continue
    new = prepare("ml-100k", ProtocolConfig(**meta["config"]))
    if new.key in d.name:
        continue                                          # this is a v2 cache
    a1 = np.load(d / "arrays.npz", allow_pickle=False)
    a2 = np.load(root / f"ml-100k-{new.key}" / "arrays.npz", allow_pickle=False)
    diff = [k for k in a1.files if a1[k].shape != a2[k].shape or not np.array_equal(a1[k], a2[k])]
    print(f"split {meta['config']['split_seed']}: {d.name} (v1) vs {new.key} (v2): "
          f"{len(a1.files)} arrays, differing: {diff}")

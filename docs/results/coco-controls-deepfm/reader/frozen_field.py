"""DeepFM trained on a frozen per-user table (from a file) as its one knowledge field.

    python frozen_field.py TABLE.safetensors NAME SPLIT SEED OUT_RESULTS
"""
import sys
import numpy as np, torch
from safetensors.torch import load_file
from cocorec.knowledge.base import register_method
from cocorec.knowledge.field import FieldMethod
from cocorec import cli

path = sys.argv[1]
TABLE = load_file(path)["user"].float().numpy()

@register_method("frozen")
class Frozen(FieldMethod):
    name = "frozen"
    def __init__(self, **kw):
        super().__init__(source="oracle")
    def bind(self, spec):
        self.knowledge_dims = [TABLE.shape[1]]
    def prepare(self, data, output_dir=None):
        vec = TABLE
        ref = vec[np.unique(data.split("train").user)]
        vec = (vec - ref.mean(0)) / (ref.std(0) + 1e-6)
        self._buffers["user_vec"] = torch.from_numpy(np.ascontiguousarray(vec, dtype=np.float32))
    def config_dict(self):
        return {"method": "frozen", "table": path}

name, split, seed, res = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
sys.exit(cli.main(["train", "--dataset", "ml-100k", "--backbone", "deepfm", "--method", "frozen", "--seed", seed,
                   "--output", f"runs/frozen/{name}-p{split}-s{seed}", "--results", res, "--quiet", "--overwrite",
                   "--set", f"protocol.split_seed={split}", "--set", "train.epochs=10", "--set", "train.patience=2",
                   "--set", "train.threads=1"]))

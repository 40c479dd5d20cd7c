import sys, numpy as np, torch
from safetensors.torch import load_file, save_file
d = sys.argv[1]
L = lambda n: load_file(f"{d}/{n}.safetensors")["user"].numpy()
text, dec = L("text"), L("ku-decoded")
def s(x, n): save_file({"user": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))}, f"{d}/{n}.safetensors")
a = text.copy(); a[:, 1:] = a[:, :1]; s(a, "text-lr-only")
b = text.copy(); b[:, 1:] = dec[:, 1:]; s(b, "text-lr-ku-genres")
c = text.copy(); c[:, 0] = dec[:, 0]; s(c, "ku-lr-text-genres")
for j in range(1, 19): print(j, round(float(np.corrcoef(text[:, j], dec[:, j])[0, 1]), 3), end="; ")

"""Stand-ins for what two companies and a hospital bring to "New patients" in the README.

The imaging company ships a TorchScript file, the audio company safetensors weights plus the
function that builds its network (``byom_nets:audio_net``, in this folder: the factory's
module must be importable where the owner runs, hence ``PYTHONPATH=examples`` in the README).
Both were trained "elsewhere": plain PyTorch on AV-Digits' quick training split, nothing from
this project. The hospital's new patients are records of the quick test split, in the ``.npz``
form ``submit --inputs`` reads (``ids``: strings, ``x``: one record per id).

Run:  python examples/byom_files.py --out byom      (writes the files listed at the end)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the audio company's byom_nets

import byom_nets

from jacfusion_fed.data import load_builtin

#: The hospital's new patients: local ids (never sent: submit pseudonymizes them) and the row
#: of the quick test split each one's records are taken from.
PATIENTS = {"Jane Doe 1970-01-01": 0, "John Roe 1980-02-02": 1}


def train_elsewhere(net: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> nn.Module:
    """What a company did long before: plain PyTorch, nothing from this project."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
    return net.eval()


def write_files(out: Path, epochs: int = 5) -> dict[str, Path]:
    """The companies' model files, the class counts and one ``.npz`` per patient and
    modality; returns them by name."""
    out.mkdir(parents=True, exist_ok=True)
    train = load_builtin("avdigits", "train", 0, quick=True)
    test = load_builtin("avdigits", "test", 0, quick=True)
    files = {
        "image.pt": out / "image.pt",
        "audio.safetensors": out / "audio.safetensors",
        "counts.json": out / "counts.json",
    }
    image = train_elsewhere(byom_nets.image_net(), train.modalities["image"], train.labels, epochs)
    torch.jit.save(torch.jit.script(image), files["image.pt"])
    audio = train_elsewhere(byom_nets.audio_net(), train.modalities["audio"], train.labels, epochs)
    safetensors.torch.save_file(audio.state_dict(), str(files["audio.safetensors"]))
    files["counts.json"].write_text(json.dumps([int(c) for c in train.class_counts()]))
    for patient, row in PATIENTS.items():
        first = patient.split()[0].lower()
        for modality in ("image", "audio"):
            path = out / f"{first}-{modality}.npz"
            x = test.modalities[modality][row : row + 1]
            np.savez(path, ids=np.array([patient]), x=x)
            files[path.name] = path
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("byom"), help="folder to write")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs per model")
    args = parser.parse_args()
    files = write_files(args.out, args.epochs)
    print("wrote " + ", ".join(str(p) for p in files.values()))


if __name__ == "__main__":
    main()

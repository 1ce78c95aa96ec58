"""Network definitions of the audio company in ``examples/new_patient.py``.

An owner that ships safetensors weights names the function that builds its module
(``--factory byom_nets:audio_net``); the module must be importable wherever the owner serves.
"""

from torch import nn


def audio_net() -> nn.Module:
    """A small spectrogram CNN: (N, 1, 32, 32) log-mel inputs in [0, 1] -> 10 logits."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 64),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(64, 10),
    )


def image_net() -> nn.Module:
    """A small CNN for 8 x 8 digit images in [0, 1] -> 10 logits (named head: ``fc``)."""
    return _ImageNet()


class _ImageNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 64, 64),
            nn.ReLU(),
        )
        self.fc = nn.Linear(64, 10)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.fc(self.body(x))

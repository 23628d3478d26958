"""Exit adapters for tests: identity maps moved by seeded noise, so that they change exits."""
from __future__ import annotations

import torch

from ltt_exit.decode.adapters import ExitAdapters
from ltt_exit.decode.backends import backend_for


def random_adapters(model, kind="affine", scale=0.5, seed=0, layers=None):
    """Adapters of ``kind`` for ``model`` (every layer 1..L-1, or ``layers``): identity plus ``scale`` times
    standard normal noise on every tensor, drawn in order from one generator seeded with ``seed``."""
    backend = backend_for(model)
    adapters = ExitAdapters.identity(kind, num_layers=backend.num_layers, hidden_size=backend.hidden_size,
                                     model_fingerprint="sha256:test", layers=layers)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer_map in adapters.maps.values():
            for tensor in layer_map.parameters():
                tensor.add_(scale * torch.randn(tensor.shape, generator=generator))
    adapters._fingerprint = None
    return adapters

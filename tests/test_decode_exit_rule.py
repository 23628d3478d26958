"""The exit rule lives in one module (``ltt_exit.decode.exit_rule``) and every decoding path uses it.

Each test replaces one function of the rule for the duration of a call and checks that the reference
decoder (``generate``), the sweep's shared-history decode (``generate_grid``) and the fast path (fused and
eager decisions) all change with it — a path that decided exits with its own copy of the rule would keep
its old behaviour and fail here. Controls without the replacement show that the change is visible.
"""
from __future__ import annotations

import pytest
import torch

from ltt_exit.decode import EarlyExitDecoder, FastEarlyExitDecoder, exit_rule
from ltt_exit.decode.tiny_models import tiny_llama, tiny_t5

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 4
BUDGET = 5
SETTINGS = {
    "fused": {"scorer": "softmax-max", "pruning": ("fixed", {"k": 6})},
    "eager": {"scorer": "weighted-contrastive", "pruning": "none"},
}


def _model(family: str) -> torch.nn.Module:
    if family == "t5":
        return tiny_t5(num_layers=LAYERS, num_heads=2, dtype=torch.float64)
    return tiny_llama(num_layers=LAYERS, num_heads=2, num_key_value_heads=1, dtype=torch.float64)


def _runs(family: str, setting: str, settings: dict = SETTINGS) -> dict[str, list[list[int]]]:
    """Exit layers of every generated token (after the prefill token) at λ = 0, by decoding path."""
    model = _model(family)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    reference = EarlyExitDecoder(model, min_exit_layer=1, **settings[setting])
    fast = FastEarlyExitDecoder(model, min_exit_layer=1, **settings[setting])
    assert fast.uses_fused_decision == (setting == "fused")
    skip = 1 if reference.backend.first_token_from_prompt else 0
    common = {"input_ids": prompts, "max_new_tokens": BUDGET, "eos_token_id": []}
    by_path = {
        "generate": reference.generate(threshold=0.0, **common),
        "grid": [candidates[0] for candidates in reference.generate_grid(lambdas=[0.0], **common)[1]],
        "fast": fast.generate(threshold=0.0, **common),
    }
    return {path: [s.exit_layers[skip:] for s in sequences] for path, sequences in by_path.items()}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("family", ["t5", "decoder-only"])
def test_every_path_takes_its_exit_test_from_the_rule(monkeypatch, family, setting):
    # control: at λ = 0 every confidence clears the threshold, so every token leaves at the first layer
    for path, layers in _runs(family, setting).items():
        assert all(layer == 1 for row in layers for layer in row), path

    def never(confidence, thresholds, eligible):
        return torch.zeros_like(eligible)

    monkeypatch.setattr(exit_rule, "exits_at", never)
    for path, layers in _runs(family, setting).items():
        assert all(layer == LAYERS for row in layers for layer in row), path


UNPRUNED = {"fused": {"scorer": "softmax-max"}, "eager": {"scorer": "weighted-contrastive"}}


@pytest.mark.parametrize("setting", list(UNPRUNED))
def test_every_path_takes_the_consulted_layers_from_the_rule(monkeypatch, setting):
    """Consult only layer 3: at λ = 0 every token then leaves there, on every path (no pruning, whose
    vocabulary sets start at the first consulted layer)."""
    monkeypatch.setattr(exit_rule, "is_consulted", lambda layer, min_exit_layer, num_layers: layer == 3)
    for path, layers in _runs("decoder-only", setting, UNPRUNED).items():
        assert all(layer == 3 for row in layers for layer in row), path


@pytest.mark.parametrize("family", ["t5", "decoder-only"])
@pytest.mark.parametrize("pruned", [False, True])
def test_step_heads_many_equals_one_call_per_layer(family, pruned):
    # the JSD amateur search reads every lower layer through StepHeads.many: same logits, same head-row
    # charges and the same memo as one __call__ per layer, whatever is memoised already
    decoder = EarlyExitDecoder(_model(family))
    backend, batch = decoder.backend, 3
    generator = torch.Generator().manual_seed(0)
    hiddens = [torch.randn(batch, backend.hidden_size, generator=generator, dtype=torch.float64)
               for _ in range(LAYERS + 1)]
    ids = torch.randint(0, backend.vocab_size, (batch, 7), generator=generator) if pruned else None
    consulting = torch.tensor([True, False, True])

    def fresh():
        heads = exit_rule.StepHeads(backend, hiddens, torch.zeros(batch, dtype=torch.long))
        heads(1, ids, consulting)       # memoised over the same set
        heads(2, None, consulting)      # a full head: the set's columns are a gather of it
        return heads

    one_by_one, together = fresh(), fresh()
    layers = [0, 1, 2, 3]
    expected = torch.stack([one_by_one(a, ids, consulting) for a in layers])
    got = together.many(layers, ids, consulting)
    # one product for several layers may round differently from one per layer (a GEMM's blocking), never more
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert torch.equal(together.head_rows, one_by_one.head_rows)
    width = expected.shape[-1]
    # layers 0 and 3 were new (charged to the consulting rows); 1 and 2 came from the memo
    assert together.head_rows.tolist() == [width * 2 + width + backend.vocab_size, 0,
                                           width * 2 + width + backend.vocab_size]
    # a second read is a memo hit: no new charge, same values
    before = together.head_rows.clone()
    assert torch.equal(together.many([3, 0], ids, consulting), got[[3, 0]])
    assert torch.equal(together.head_rows, before)

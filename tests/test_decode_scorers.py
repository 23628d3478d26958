"""Confidence scorers on hand-built distributions (expected values derived by hand or with scipy)."""
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon as scipy_js_distance

from ltt_exit.decode import SCORERS, ExitView, resolve_scorer
from ltt_exit.decode.scorers import (
    HiddenCosine,
    JSDContrastive,
    SoftmaxMargin,
    SoftmaxMax,
    WeightedContrastive,
    contrast_distribution,
    jensen_shannon,
)


def view_from_probs(probs, layer=2, amateur_probs=None, hidden=None, hidden_prev=None, dtype=torch.float64):
    """An ExitView whose logits are log(probs); logits_at(a) returns amateur_probs[a] (a dict) as log-probs."""
    logits = torch.log(torch.tensor([probs], dtype=dtype))
    requested = []

    def logits_at(a):
        requested.append(a)
        return torch.log(torch.tensor([amateur_probs[a]], dtype=dtype))

    d = 4
    view = ExitView(
        layer=layer,
        logits=logits,
        hidden=torch.ones(1, d, dtype=dtype) if hidden is None else hidden,
        hidden_prev=torch.ones(1, d, dtype=dtype) if hidden_prev is None else hidden_prev,
        logits_at=logits_at,
    )
    return view, requested


def numpy_contrast(p_expert, p_amateur, alpha):
    """The ACD redistribution written out independently in numpy."""
    p_expert, p_amateur = np.asarray(p_expert, float), np.asarray(p_amateur, float)
    head = p_expert >= alpha * p_expert.max()
    ratio = np.where(head, p_expert / p_amateur, 0.0)
    out = p_expert.copy()
    out[head] = ratio[head] / ratio[head].sum() * p_expert[head].sum()
    return out


def margin(p):
    top = np.sort(np.asarray(p))[::-1]
    return top[0] - top[1]


def test_registry_names():
    assert set(SCORERS) == {"softmax-max", "softmax-margin", "hidden-cosine", "weighted-contrastive", "jsd-contrastive"}
    for name, cls in SCORERS.items():
        assert cls.name == name


def test_softmax_max_and_margin():
    view, _ = view_from_probs([0.5, 0.3, 0.2])
    assert SoftmaxMax().score(view).item() == pytest.approx(0.5, abs=1e-12)
    assert SoftmaxMargin().score(view).item() == pytest.approx(0.2, abs=1e-12)
    # order of the vocabulary does not matter
    view, _ = view_from_probs([0.2, 0.5, 0.3])
    assert SoftmaxMargin().score(view).item() == pytest.approx(0.2, abs=1e-12)


def test_margin_of_single_entry_set_is_one():
    view, _ = view_from_probs([1.0])
    assert SoftmaxMargin().score(view).item() == pytest.approx(1.0)


def test_batched_rows_are_scored_independently():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [0.4, 0.4, 0.2]], dtype=torch.float64))
    view = ExitView(layer=1, logits=logits, hidden=torch.ones(3, 2), hidden_prev=torch.ones(3, 2))
    assert SoftmaxMargin().score(view).tolist() == pytest.approx([0.2, 0.85, 0.0], abs=1e-12)
    assert SoftmaxMax().score(view).tolist() == pytest.approx([0.5, 0.9, 0.4], abs=1e-12)


def test_hidden_cosine():
    h = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    prev = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [4.0, 3.0]], dtype=torch.float64)
    view = ExitView(layer=1, logits=None, hidden=h, hidden_prev=prev)
    # same direction 1; orthogonal 0; opposite -1 clipped to 0; (3,4).(4,3)/25 = 24/25
    assert HiddenCosine().score(view).tolist() == pytest.approx([1.0, 0.0, 0.0, 0.96], abs=1e-12)
    assert HiddenCosine.needs_logits is False


def test_contrast_with_uniform_amateur_is_the_expert_itself():
    p_expert = [0.5, 0.3, 0.15, 0.05]
    uniform = [0.25] * 4
    out = contrast_distribution(
        torch.log(torch.tensor([p_expert], dtype=torch.float64)),
        torch.log(torch.tensor([uniform], dtype=torch.float64)),
        alpha=0.1,
    )
    assert out[0].tolist() == pytest.approx(p_expert, abs=1e-12)
    view, _ = view_from_probs(p_expert, layer=4, amateur_probs={2: uniform})
    assert WeightedContrastive().score(view).item() == pytest.approx(0.2, abs=1e-12)


def test_contrast_with_identical_amateur_flattens_the_head():
    # log p_E - log p_A = 0 on the head set: the head mass is spread evenly, so the margin is 0 there
    p = [0.5, 0.3, 0.2]
    view, _ = view_from_probs(p, layer=2, amateur_probs={1: p})
    assert WeightedContrastive(alpha=0.1).score(view).item() == pytest.approx(0.0, abs=1e-12)
    # alpha = 0.5: head {0.5, 0.3} shares 0.8 -> [0.4, 0.4, 0.2]
    out = contrast_distribution(torch.log(torch.tensor([p])), torch.log(torch.tensor([p])), alpha=0.5)
    assert out[0].tolist() == pytest.approx([0.4, 0.4, 0.2], abs=1e-6)


def test_weighted_contrastive_hand_computed():
    # ratios p_E/p_A = [2, 0.6, 0.8] -> [2, 0.6, 0.8] / 3.4 ; margin (2 - 0.8) / 3.4
    view, _ = view_from_probs([0.5, 0.3, 0.2], layer=2, amateur_probs={1: [0.25, 0.5, 0.25]})
    assert WeightedContrastive().score(view).item() == pytest.approx(1.2 / 3.4, abs=1e-12)
    # alpha excludes the 0.1 token: head ratios [2, 0.5] -> [0.8, 0.2] * 0.9 = [0.72, 0.18]; margin 0.54
    view, _ = view_from_probs([0.6, 0.3, 0.1], layer=2, amateur_probs={1: [0.3, 0.6, 0.1]})
    assert WeightedContrastive(alpha=0.2).score(view).item() == pytest.approx(0.54, abs=1e-12)


@pytest.mark.parametrize("layer, expected_amateur", [(1, 0), (2, 1), (3, 1), (4, 2), (7, 3)])
def test_weighted_contrastive_default_amateur_is_half_the_layer(layer, expected_amateur):
    p = [0.5, 0.3, 0.2]
    view, requested = view_from_probs(p, layer=layer, amateur_probs={expected_amateur: [0.2, 0.3, 0.5]})
    WeightedContrastive().score(view)
    assert requested == [expected_amateur]


def test_weighted_contrastive_fixed_amateur_layer():
    view, requested = view_from_probs([0.5, 0.3, 0.2], layer=5, amateur_probs={0: [0.2, 0.3, 0.5]})
    WeightedContrastive(amateur_layer=0).score(view)
    assert requested == [0]
    with pytest.raises(ValueError, match="below min_exit_layer"):
        WeightedContrastive(amateur_layer=3).validate(num_layers=6, min_exit_layer=3)
    WeightedContrastive(amateur_layer=2).validate(num_layers=6, min_exit_layer=3)


def test_jensen_shannon_matches_scipy():
    rng = np.random.default_rng(0)
    for _ in range(5):
        p, q = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
        q[2] = 0.0
        q /= q.sum()
        expected = scipy_js_distance(p, q) ** 2  # scipy returns the square root, natural log by default
        got = jensen_shannon(torch.tensor(p), torch.tensor(q)).item()
        assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("discount", [False, True])
def test_jsd_contrastive_picks_the_most_divergent_layer(discount):
    p_expert = np.array([0.5, 0.3, 0.2])
    candidates = {
        0: np.array([0.2, 0.3, 0.5]),  # far from the expert, but 3 layers away
        1: np.array([0.49, 0.31, 0.2]),  # almost the expert
        2: np.array([0.25, 0.4, 0.35]),  # moderately far, 1 layer away
    }
    layer = 3
    divergences = {a: scipy_js_distance(p_expert, q) ** 2 / ((layer - a) if discount else 1) for a, q in candidates.items()}
    expected_amateur = max(divergences, key=divergences.get)
    view, requested = view_from_probs(p_expert.tolist(), layer=layer, amateur_probs={a: q.tolist() for a, q in candidates.items()})
    got = JSDContrastive(alpha=0.1, distance_discount=discount).score(view).item()
    assert sorted(requested) == [0, 1, 2]
    assert got == pytest.approx(margin(numpy_contrast(p_expert, candidates[expected_amateur], 0.1)), abs=1e-12)
    # the two settings really choose differently on this example
    assert expected_amateur == (2 if discount else 0)


def test_jsd_restricts_to_the_head_set():
    # alpha = 0.5 keeps only the first two tokens; candidate 0 differs from the expert only off the head
    p_expert = np.array([0.6, 0.35, 0.05])
    candidates = {0: np.array([0.6 * 0.4 / 0.95, 0.35 * 0.4 / 0.95, 0.6]), 1: np.array([0.5, 0.45, 0.05])}
    scorer = JSDContrastive(alpha=0.5, distance_discount=False)
    log_expert = torch.log(torch.tensor(p_expert[None, :]))
    stacked = torch.log(torch.tensor(np.stack([candidates[0], candidates[1]])[:, None, :]))
    # restricted to the head, candidate 0 equals the expert (JSD 0): layer 1 must be chosen
    assert scorer.choose_amateur(log_expert, [stacked], layer=2)[0].tolist() == [1]


@pytest.mark.parametrize("chunk", [1, 2, 4, 6])
@pytest.mark.parametrize("discount", [False, True])
def test_jsd_choice_matches_a_stacked_argmax(discount, chunk):
    # an independent reference: every candidate's divergence stacked, then argmax (first maximum on ties)
    torch.manual_seed(1)
    rows, vocab, layer = 9, 12, 6
    log_expert = torch.log_softmax(torch.randn(rows, vocab, dtype=torch.float64) * 3, dim=-1)
    candidates = [torch.log_softmax(torch.randn(rows, vocab, dtype=torch.float64) * 3, dim=-1) for _ in range(layer)]
    candidates[4] = candidates[1].clone()  # an exact tie without the discount: the lower layer must win
    scorer = JSDContrastive(alpha=0.05, distance_discount=discount)
    p = log_expert.exp()
    head = p >= 0.05 * p.max(dim=-1, keepdim=True).values

    def restricted(q):
        q = torch.where(head, q, torch.zeros_like(q))
        return q / q.sum(dim=-1, keepdim=True)

    divergence = torch.stack([jensen_shannon(restricted(p), restricted(c.exp())) for c in candidates])
    if discount:
        divergence = divergence / torch.tensor([layer - a for a in range(layer)], dtype=torch.float64)[:, None]
    expected = divergence.argmax(dim=0)
    # candidates arrive in chunks of consecutive layers, however they are cut
    chunks = (torch.stack(candidates[start:start + chunk]) for start in range(0, layer, chunk))
    chosen, log_p_chosen = scorer.choose_amateur(log_expert, chunks, layer=layer)
    assert chosen.tolist() == expected.tolist()
    assert torch.equal(log_p_chosen, torch.stack(candidates).gather(0, expected.view(1, -1, 1).expand(1, rows, vocab))[0])
    with pytest.raises(ValueError, match="below layer 0"):
        scorer.choose_amateur(log_expert, [], layer=0)


def test_jsd_keeps_at_most_the_best_candidate_alive():
    # over the full vocabulary ℓ stacked candidates ran out of GPU memory: the scorer must stream them
    import weakref

    torch.manual_seed(2)
    rows, vocab, layer = 4, 50, 8
    logits = torch.randn(rows, vocab) * 4
    yielded = []

    def candidates():
        for _ in range(layer):
            alive = sum(ref() is not None for ref in yielded)
            assert alive <= 2, f"{alive} earlier candidates still alive: the candidates were stacked"
            tensor = torch.log_softmax(torch.randn(1, rows, vocab) * 4, dim=-1)
            yielded.append(weakref.ref(tensor))
            yield tensor

    JSDContrastive().choose_amateur(torch.log_softmax(logits, dim=-1), candidates(), layer=layer)
    assert len(yielded) == layer


def test_scores_are_in_unit_interval_and_keep_the_dtype():
    torch.manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        logits = (torch.randn(5, 40) * 6).to(dtype)
        hidden, prev = torch.randn(5, 8).to(dtype), torch.randn(5, 8).to(dtype)
        amateurs = {a: (torch.randn(5, 40) * 6).to(dtype) for a in range(4)}
        view = ExitView(layer=4, logits=logits, hidden=hidden, hidden_prev=prev, logits_at=lambda a: amateurs[a])
        for name in SCORERS:
            conf = resolve_scorer(name).score(view)
            assert conf.shape == (5,)
            assert conf.dtype == torch.promote_types(dtype, torch.float32)
            assert bool(((conf >= 0) & (conf <= 1)).all()), (name, dtype, conf)


def test_resolve_scorer():
    assert isinstance(resolve_scorer("softmax-margin"), SoftmaxMargin)
    instance = WeightedContrastive(amateur_layer=1)
    assert resolve_scorer(instance) is instance
    made = resolve_scorer(("jsd-contrastive", {"alpha": 0.2, "distance_discount": False}))
    assert made.params() == {"alpha": 0.2, "distance_discount": False, "revision": 2}
    with pytest.raises(ValueError, match="revision 1 is not available"):
        resolve_scorer(("jsd-contrastive", {"revision": 1}))
    with pytest.raises(ValueError, match="unknown scorer 'entropy'"):
        resolve_scorer("entropy")
    with pytest.raises(ValueError, match="bad parameters"):
        resolve_scorer(("softmax-max", {"temperature": 2}))
    with pytest.raises(TypeError):
        resolve_scorer(3)
    with pytest.raises(ValueError, match="alpha"):
        WeightedContrastive(alpha=0.0)
    with pytest.raises(ValueError, match="amateur_layer"):
        WeightedContrastive(amateur_layer=-1)
    assert not math.isnan(WeightedContrastive().alpha)


@pytest.mark.parametrize("chunk_elements", [1, 50, 1 << 24])
def test_jsd_score_is_the_same_however_the_candidates_are_read(monkeypatch, chunk_elements):
    # logits_for (the decoders' batched heads) against logits_at one layer at a time, and chunks of one
    # layer, a few layers or all of them: the same confidences
    from ltt_exit.decode import scorers

    torch.manual_seed(3)
    rows, vocab, layer = 5, 20, 7
    heads = torch.randn(layer + 1, rows, vocab, dtype=torch.float64) * 3
    reads = []

    def logits_for(layers):
        reads.append(list(layers))
        return heads[list(layers)]

    def view(batched):
        return ExitView(layer=layer, logits=heads[layer], hidden=torch.ones(rows, 4, dtype=torch.float64),
                        hidden_prev=torch.ones(rows, 4, dtype=torch.float64),
                        logits_at=lambda a: heads[a], logits_for=logits_for if batched else None)

    scorer = JSDContrastive()
    one_at_a_time = scorer.score(view(False))
    monkeypatch.setattr(scorers, "JSD_CHUNK_ELEMENTS", chunk_elements)
    assert torch.equal(scorer.score(view(True)), one_at_a_time)
    assert [a for chunk in reads for a in chunk] == list(range(layer))  # every lower layer once, in order
    per_chunk = max(1, chunk_elements // (rows * vocab))
    assert max(len(chunk) for chunk in reads) == min(per_chunk, layer)


@pytest.mark.parametrize("spread", [0.05, 1.0, 6.0])  # near-flat experts (a wide head set) to peaked ones
@pytest.mark.parametrize("discount", [False, True])
def test_jsd_score_on_the_head_set_columns_equals_the_score_on_every_column(monkeypatch, spread, discount):
    # the candidates matter only on the expert's head set (restricted and renormalised there; their
    # log-normaliser cancels in the contrast), plus one column for the runner-up off the head set
    from ltt_exit.decode import scorers

    torch.manual_seed(4)
    rows, vocab, layer = 16, 300, 9
    heads = torch.randn(layer + 1, rows, vocab, dtype=torch.float64) * spread
    heads[layer, 0] = 0.0  # a uniform expert: every column is in its head set
    heads[layer, 1, 7] = 40.0  # a one-token head set

    def view(first_row):
        part = heads[:, first_row:]
        return ExitView(layer=layer, logits=part[layer], hidden=torch.ones(rows - first_row, 4, dtype=torch.float64),
                        hidden_prev=torch.ones(rows - first_row, 4, dtype=torch.float64),
                        logits_at=lambda a: part[a], logits_for=lambda layers: part[list(layers)])

    scorer = JSDContrastive(alpha=0.1, distance_discount=discount)
    # the columns: the widest head set of the batch plus one, the expert's most probable first
    log_p = torch.log_softmax(heads[layer][1:], dim=-1)
    columns = scorer._head_columns(log_p)
    p = log_p.exp()
    widest = int((p >= 0.1 * p.max(dim=-1, keepdim=True).values).sum(dim=-1).max())
    if widest + 1 >= vocab:  # near-flat experts: every column is read
        assert columns is None and spread < 1
    else:
        assert columns.shape == (rows - 1, widest + 1)
        assert torch.equal(log_p.gather(-1, columns), torch.sort(log_p, descending=True).values[:, : widest + 1])
        assert spread < 6 or widest < vocab // 10  # peaked experts: a few columns
    assert scorer._head_columns(torch.log_softmax(heads[layer], dim=-1)) is None  # with row 0: every column
    on_head_set = [scorer.score(view(0)), scorer.score(view(1))]
    monkeypatch.setattr(scorers, "JSD_HEAD_SET_COLUMNS", False)
    assert scorer._head_columns(log_p) is None
    everywhere = scorer.score(view(0))
    assert torch.allclose(on_head_set[0], everywhere, rtol=0, atol=1e-12)
    assert torch.allclose(on_head_set[1], everywhere[1:], rtol=0, atol=1e-12)
    assert everywhere[1] == pytest.approx(1.0)  # the one-token head set keeps all the mass


def test_jsd_keeps_a_candidate_whose_head_set_probabilities_underflow_in_float32():
    # the embedding layer's head spans ~240 nats on SmolLM2: in float32 its probabilities on the expert's
    # head set fall below e^-103, and exponentiating before restricting lost it (an all-zero "distribution"
    # with the divergence log(2)/2 instead of its true, small one, beating the real maximum)
    vocab, layer = 16, 3
    expert = torch.zeros(1, vocab, dtype=torch.float64)
    expert[0, 8:12] = 10.0  # head set: tokens 8-11, uniform on it
    candidates = torch.zeros(layer, 1, vocab, dtype=torch.float64)
    candidates[0, 0, :4] = 200.0  # layer 0: its mass off the head set, nearly uniform on it (small JSD)
    candidates[0, 0, 9] = 0.5
    candidates[1, 0, 8] = 3.0  # layer 1: 87 % of its head-set mass on one token (the largest JSD)
    candidates[2, 0, 8:12] = 10.0  # layer 2: the expert itself (JSD 0)
    scorer = JSDContrastive(alpha=0.1, distance_discount=False)
    for dtype in (torch.float64, torch.float32):
        log_p = torch.log_softmax(expert.to(dtype), dim=-1)
        cands = torch.log_softmax(candidates.to(dtype), dim=-1)
        chosen, log_p_chosen = scorer.choose_amateur(log_p, [cands], layer)
        assert chosen.tolist() == [1], dtype  # float32 had taken layer 0 (all-zero: JSD log(2)/2)
        assert torch.equal(log_p_chosen, cands[1])
    assert float(torch.log_softmax(candidates[0].float(), dim=-1)[0, 8:12].exp().max()) == 0.0  # it underflows

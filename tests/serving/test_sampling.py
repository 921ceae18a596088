"""`runner.sample_batch`, the step's vectorized sampler, against `runner.sample`, its one-row reference:
the same distribution per row whatever the other rows ask, greedy rows the argmax, held-back ids never
chosen, and a row's draws a function of its (seed, token index) alone."""

import torch

from fused_train.serving.runner import sample, sample_batch

VOCAB = 12
# (temperature, top_p, top_k): a cut by top_k, one by top_p, both, none.
SETTINGS = [(0.7, 1.0, 5), (1.3, 0.8, 0), (1.0, 0.9, 6), (1.0, 1.0, -1)]
DRAWS = 6000


def _logits():
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(0)) * 1.5


def _batch(logits, settings, seeds, indices, banned=()):
    temperatures, top_ps, top_ks = zip(*settings)
    return sample_batch(logits, list(temperatures), list(top_ps), list(top_ks), seeds, indices, list(banned))


def test_each_row_draws_the_reference_distribution_whatever_shares_its_batch():
    logits = _logits()
    # Every setting in one batch, interleaved, with greedy rows among them: DRAWS rows of each.
    settings = [SETTINGS[i % len(SETTINGS)] for i in range(DRAWS * len(SETTINGS))]
    settings += [(0.0, 1.0, 0)] * 8
    rows = len(settings)
    tokens = _batch(logits.expand(rows, VOCAB), settings, list(range(rows)), [3] * rows)
    assert tokens[-8:] == [int(logits.argmax())] * 8
    generator = torch.Generator().manual_seed(0)
    for index, (temperature, top_p, top_k) in enumerate(SETTINGS):
        got = torch.bincount(torch.tensor(tokens[index:-8:len(SETTINGS)]), minlength=VOCAB)
        expected = torch.bincount(torch.tensor([sample(logits, temperature, top_p, top_k, generator)
                                                for _ in range(DRAWS)]), minlength=VOCAB)  # fmt: skip
        assert got.sum() == expected.sum() == DRAWS
        assert not got[expected == 0].any(), (SETTINGS[index], got, expected)  # nothing outside the cut
        both = (got + expected) > 0
        # Two-sample chi-square over the bins either drew: p < 1e-6 beyond 45 for up to 11 degrees of freedom.
        chi2 = (((got - expected) ** 2)[both] / (got + expected)[both]).sum().item()
        assert chi2 < 45, (SETTINGS[index], chi2, got, expected)


def test_one_request_draws_the_reference_distribution_over_its_tokens():
    logits = _logits()
    tokens = _batch(logits.expand(DRAWS, VOCAB), [SETTINGS[1]] * DRAWS, [12345] * DRAWS, list(range(DRAWS)))
    generator = torch.Generator().manual_seed(1)
    got = torch.bincount(torch.tensor(tokens), minlength=VOCAB)
    expected = torch.bincount(torch.tensor([sample(logits, *SETTINGS[1], generator) for _ in range(DRAWS)]),
                              minlength=VOCAB)  # fmt: skip
    both = (got + expected) > 0
    assert not got[expected == 0].any()
    assert (((got - expected) ** 2)[both] / (got + expected)[both]).sum().item() < 45


def test_a_seeded_row_draws_the_same_tokens_alone_and_in_any_batch():
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(1))
    settings = [SETTINGS[1], (0.0, 1.0, 0), SETTINGS[0], SETTINGS[3], SETTINGS[2], SETTINGS[1]]
    seeds, indices = [7, 8, -1, 2**64 - 1, 2**63, 5], [0, 1, 2, 3, 4, 5]
    batch = _batch(logits, settings, seeds, indices)
    alone = [_batch(logits[row : row + 1], [settings[row]], [seeds[row]], [indices[row]])[0] for row in range(6)]
    order = [5, 3, 1, 4, 0, 2]
    shuffled = _batch(logits[order], [settings[i] for i in order], [seeds[i] for i in order],
                      [indices[i] for i in order])
    assert batch == alone == [shuffled[order.index(row)] for row in range(6)]
    draws = {tuple(_batch(logits[:1].expand(50, VOCAB), [SETTINGS[3]] * 50, [seed] * 50, list(range(50))))
             for seed in (1, 2)}  # fmt: skip
    assert len(draws) == 2  # another seed, other tokens


def test_held_back_ids_are_never_chosen():
    logits = torch.zeros(4, VOCAB)
    logits[:, 3] = 10.0  # every row's most likely token by far
    settings = [(0.0, 1.0, 0), (1.0, 1.0, 0), (0.5, 0.5, 2), (0.0, 1.0, 0)]
    banned = [(0, 3), (1, 3), (2, 3)]
    for index in range(20):
        tokens = _batch(logits, settings, [index] * 4, [index] * 4, banned)
        assert 3 not in tokens[:3] and tokens[3] == 3



def test_counter_uniforms_are_uniform_and_inside_zero_and_one():
    # Below 1 strictly: a 1.0 would give an infinite Gumbel noise, and inf + -inf a NaN that argmax picks.
    from fused_train.serving.runner import counter_uniforms, row_key

    uniforms = counter_uniforms(torch.tensor([row_key(i << 29, i % 3) for i in range(64)]), 4096)
    assert 0 < uniforms.min() and uniforms.max() < 1
    counts = torch.bincount((uniforms * 16).long().flatten(), minlength=16).double()
    expected = uniforms.numel() / 16
    assert ((counts - expected) ** 2 / expected).sum() < 45  # chi-square, 15 degrees of freedom: p < 1e-4
    assert abs(torch.corrcoef(uniforms[:2])[0, 1]) < 0.06  # two rows' noise is not alike

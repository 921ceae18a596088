"""A/B routes and quality drift as pure policy (no torch, no server): route specs parse or are refused
naming what is wrong, a user keeps their arm, many users split as the weights say, and the drift
statistic (two-sample Kolmogorov-Smirnov) is small without a change and large on a synthetic shift."""

import random
from types import SimpleNamespace

import pytest

from fused_train.serving.quality import QualityMonitor, ks_statistic
from fused_train.serving.routing import Route, parse_route, validate_routes


def test_a_route_spec_parses_into_its_arms():
    assert parse_route("exp=a:90,b:10") == Route("exp", (("a", 90), ("b", 10)))
    assert parse_route("exp=org/model:v2:3") == Route("exp", (("org/model:v2", 3),))  # the last ':' splits


@pytest.mark.parametrize("spec, match", [
    ("exp", "NAME=ARM:WEIGHT"), ("=a:1", "NAME=ARM:WEIGHT"), ("exp=", "NAME=ARM:WEIGHT"),
    ("exp=a", "each arm is ARM:WEIGHT"), ("exp=:5", "each arm is ARM:WEIGHT"), ("exp=a:0", "positive integer"),
    ("exp=a:-1", "positive integer"), ("exp=a:1.5", "positive integer"), ("exp=a:²", "positive integer"),
    ("exp=a:1,a:2", "named twice"),
])  # fmt: skip
def test_a_bad_route_spec_is_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_route(spec)


def test_routes_are_checked_against_the_served_models():
    routes = validate_routes(["exp=a:1,tiny:1"], "tiny", ["a", "b"])
    assert routes == {"exp": Route("exp", (("a", 1), ("tiny", 1)))}
    for routes, match in ((["exp=a:1,c:1"], "arm 'c' is neither"), (["a=b:1"], "a served model's"),
                          (["tiny=a:1"], "a served model's"), (["exp=a:1", "exp=b:1"], "given twice"),
                          ([("exp", "a")], "strings or Routes")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            validate_routes(routes, "tiny", ["a", "b"])


def test_a_user_keeps_their_arm_and_many_users_split_by_weight():
    route = parse_route("exp=a:90,b:10")
    users = [f"user-{i}" for i in range(20000)]
    arms = [route.choose(user) for user in users]
    assert arms == [route.choose(user) for user in users]  # sticky
    assert abs(arms.count("b") / len(users) - 0.10) < 0.01  # binomial sd 0.002
    # The bucket is SHA-256's, not Python's salted hash(): the same in every process and release
    # (a change here moves users between arms on upgrade).
    assert [route.choose(f"user-{i}") for i in range(8)] == ["b", "a", "a", "a", "a", "b", "a", "b"]
    # Another route splits the same users independently.
    other = [parse_route("other=a:90,b:10").choose(user) for user in users]
    assert abs(sum(x != y for x, y in zip(arms, other)) / len(users) - 2 * 0.9 * 0.1) < 0.015


def test_moving_weight_moves_only_the_users_between_the_boundaries():
    users = [f"user-{i}" for i in range(5000)]
    before = [parse_route("exp=a:90,b:10").choose(user) for user in users]
    after = [parse_route("exp=a:80,b:20").choose(user) for user in users]
    assert all(b == "b" for a, b in zip(before, after) if a == "b")  # nobody on b goes back to a
    assert abs(after.count("b") / len(users) - 0.20) < 0.02


def test_requests_without_a_user_are_drawn_by_weight():
    route = parse_route("exp=a:1,b:2,c:1")
    rng = random.Random(0)
    arms = [route.choose(None, rng) for _ in range(20000)]
    for arm, share in (("a", 0.25), ("b", 0.5), ("c", 0.25)):
        assert abs(arms.count(arm) / len(arms) - share) < 0.015


def test_ks_statistic_on_known_samples():
    assert ks_statistic([1, 2, 3], [1, 2, 3]) == 0
    assert ks_statistic([1, 2, 3], [4, 5, 6]) == 1
    assert ks_statistic([1, 2, 3, 4], [3, 4, 5, 6]) == 0.5
    assert ks_statistic([0, 0, 1, 1], [0, 1, 1, 1]) == 0.25  # ties count at their value (right-continuous)
    assert ks_statistic([0.5], [0, 1]) == 0.5
    with pytest.raises(ValueError, match="non-empty"):
        ks_statistic([], [1])


def _output(mean_logprob, tokens=8, finish_reason="stop"):
    return SimpleNamespace(finish_reason=finish_reason, token_ids=[0] * tokens, mean_logprob=mean_logprob)


def _drift(reference, current, window=100):
    monitor = QualityMonitor(window)
    for value in [*reference, *current]:
        monitor.observe("a", _output(value))
    return monitor.snapshot()["a"]["drift"]


def test_drift_is_small_without_a_change_and_large_on_a_shift():
    rng = random.Random(0)

    def normal(mean, sd, n=100):
        return [rng.gauss(mean, sd) for _ in range(n)]

    reference = normal(-1.5, 0.3)
    # 1.36 * sqrt(2 / 100) = 0.19: what no change exceeds 5% of the time.
    assert _drift(reference, normal(-1.5, 0.3)) < 0.19
    assert _drift(reference, normal(-2.0, 0.3)) > 0.5  # the adapter got less sure of its own tokens
    # The same mean, another shape: sure on half the prompts, lost on the other half.
    bimodal = normal(-1.0, 0.1, 50) + normal(-2.0, 0.1, 50)
    assert abs(sum(bimodal) / 100 - sum(reference) / 100) < 0.1
    assert _drift(reference, bimodal) > 0.3


def test_the_monitor_keeps_a_frozen_reference_and_a_rolling_window():
    monitor = QualityMonitor(window=4)
    for value in (-1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0):
        monitor.observe("a", _output(value))
    assert monitor.snapshot()["a"]["drift"] is None  # the window after the reference is not full yet
    monitor.observe("a", _output(-3.0, tokens=2, finish_reason="length"))
    monitor.observe("a", _output(None, finish_reason="cancelled"))  # says nothing of quality: not counted
    monitor.observe("a", _output(None, finish_reason="error"))
    monitor.observe("a", _output(None, tokens=0, finish_reason="length"))  # max_tokens 0: scored its prompt only
    signals = monitor.snapshot()["a"]
    assert signals == {"requests": 4, "mean_logprob": -1.5, "output_tokens": 6.5,
                       "finish_reasons": {"stop": 0.75, "length": 0.25}, "drift": 0.25}  # fmt: skip
    for value in (-3.0, -3.0, -3.0):
        monitor.observe("a", _output(value))
    assert monitor.snapshot()["a"]["drift"] == 1.0  # the reference stays the first four
    monitor.reset("a")  # loaded anew: its next requests are the reference
    monitor.observe("a", _output(-3.0))
    assert monitor.snapshot()["a"]["requests"] == 1 and monitor.snapshot()["a"]["drift"] is None
    with pytest.raises(ValueError, match="window"):
        QualityMonitor(window=1)

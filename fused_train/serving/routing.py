"""A/B routes: a model alias whose requests are split between adapters (or the base model) by weight.

    route = parse_route("assistant=support-v1:90,support-v2:10")
    route.choose(user="alice")   # "support-v1" or "support-v2", the same one for "alice" every time

The server (`fused-train serve --route NAME=ARM:WEIGHT,...`, `build_app(routes=...)`) answers a
request for `model: NAME` with one arm, and says which in the response's `model` (as OpenAI answers
an alias with the snapshot that served it). A request with a `user` goes to the arm its user's
bucket falls in: a SHA-256 of the route's name and the user, read as a fraction u in [0, 1) and
placed on the arms' weights laid end to end, so a user keeps their arm across requests, servers and
restarts (Python's `hash()` is salted per process), and moving weight from one arm to the next moves
only the users between the old and new boundary. A request without a `user` draws its arm at random
by weight. No torch here: the policy is tested alone.
"""

import hashlib
import random
from dataclasses import dataclass

__all__ = ["Route", "parse_route", "validate_routes"]


@dataclass(frozen=True)
class Route:
    """`name`, the alias clients ask for, and its `arms`: (model name, positive int weight) pairs."""

    name: str
    arms: tuple[tuple[str, int], ...]

    @property
    def total_weight(self) -> int:
        return sum(weight for _, weight in self.arms)

    def bucket(self, user: str) -> float:
        """`user`'s fraction in [0, 1) for this route: the first 8 bytes of SHA-256(name NUL user)."""
        digest = hashlib.sha256(f"{self.name}\x00{user}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def choose(self, user: str | None = None, rng: random.Random | None = None) -> str:
        """The arm of a request: `user`'s own (sticky), or without one drawn by weight with `rng`."""
        fraction = (rng or random).random() if user is None else self.bucket(user)
        point, upto = fraction * self.total_weight, 0
        for arm, weight in self.arms:
            upto += weight
            if point < upto:
                return arm
        return self.arms[-1][0]  # fraction * total rounded up to total: the last arm's


def parse_route(text: str) -> Route:
    """`NAME=ARM:WEIGHT,ARM:WEIGHT,...` as a Route; ValueError saying what is wrong otherwise."""
    name, sep, spec = text.partition("=") if isinstance(text, str) else ("", "", "")
    if not sep or not name or not spec:
        raise ValueError(f"route must be NAME=ARM:WEIGHT,ARM:WEIGHT,..., got {text!r}")
    arms = []
    for part in spec.split(","):
        arm, sep, weight = part.rpartition(":")
        if not sep or not arm:
            raise ValueError(f"route {name!r}: each arm is ARM:WEIGHT, got {part!r}")
        if not (weight.isascii() and weight.isdigit()) or int(weight) < 1:
            raise ValueError(f"route {name!r}: arm {arm!r} needs a positive integer weight, got {weight!r}")
        arms.append((arm, int(weight)))
    names = [arm for arm, _ in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"route {name!r}: an arm is named twice in {names}")
    return Route(name, tuple(arms))


def validate_routes(routes, model_name: str, adapters) -> dict[str, Route]:
    """`routes` (spec strings or Routes) by name, checked against the served models: each arm is
    the base `model_name` or one of the loaded `adapters`, and no route's name is a model's or
    another route's. ValueError naming the route otherwise."""
    adapters = set(adapters)
    by_name: dict[str, Route] = {}
    for route in routes:
        route = parse_route(route) if isinstance(route, str) else route
        if not isinstance(route, Route):
            raise ValueError(f"routes must hold NAME=ARM:WEIGHT,... strings or Routes, got {route!r}")
        if route.name == model_name or route.name in adapters:
            raise ValueError(f"route {route.name!r}: that name is a served model's already")
        if route.name in by_name:
            raise ValueError(f"route {route.name!r} is given twice")
        for arm, _ in route.arms:
            if arm != model_name and arm not in adapters:
                raise ValueError(f"route {route.name!r}: arm {arm!r} is neither the base model {model_name!r} "
                                 f"nor a loaded adapter ({sorted(adapters)})")  # fmt: skip
        by_name[route.name] = route
    return by_name

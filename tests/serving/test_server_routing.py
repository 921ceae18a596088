"""A/B routes and quality signals through the live server and the `openai` client: a request with a
`user` goes to that user's arm every time, the response's `model` names the arm, /metrics counts
requests per arm, and each model's quality gauges and `fused_train_drift` follow its requests (a
shift from greedy to sampled outputs drives the drift to 1)."""

import asyncio

import pytest

from tests.serving.conftest import SERVER_PACKAGES, assert_error

for package in SERVER_PACKAGES:
    pytest.importorskip(package)

import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from fused_train.serving.routing import parse_route  # noqa: E402
from fused_train.serving.server import build_app  # noqa: E402

ROUTE = "exp=a:3,tiny:1"
WINDOW = 4


@pytest.fixture(scope="module")
def routed_server(tiny_model_dir, tiny_adapters, reference_path):
    from tests.serving.conftest import running

    with running(tiny_model_dir, tiny_adapters, routes=[ROUTE], quality_window=WINDOW) as server:
        yield server


def _samples(server) -> dict:
    """(metric name, labels as sorted tuples) -> value, from /metrics."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def test_a_route_sticks_to_each_users_arm_and_says_which(routed_server):
    route = parse_route(ROUTE)
    users = [f"user-{i}" for i in range(24)]
    expected = [route.choose(user) for user in users]
    assert set(expected) == {"a", "tiny"}  # both arms are exercised

    async def send_all():
        async with routed_server.async_client() as client:
            options = dict(model="exp", max_tokens=2, temperature=0)
            completions = [client.completions.create(prompt="The cat", user=user, **options) for user in users]
            chats = [client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], user=user, **options)
                     for user in users[:6]]  # fmt: skip
            anonymous = [client.completions.create(prompt="The cat", **options) for _ in range(6)]
            return await asyncio.gather(*completions, *chats, *anonymous)

    results = asyncio.run(send_all())
    completions, chats, anonymous = results[:24], results[24:30], results[30:]
    assert [r.model for r in completions] == expected
    assert [r.model for r in chats] == expected[:6]  # the same user, the same arm, on either endpoint
    assert {r.model for r in anonymous} <= {"a", "tiny"}
    # The arm really served it: its greedy text is the arm's own.
    direct = {m: routed_server.client().completions.create(model=m, prompt="The cat", max_tokens=2, temperature=0)
              for m in ("a", "tiny")}  # fmt: skip
    assert all(r.choices[0].text == direct[r.model].choices[0].text for r in completions)

    samples = _samples(routed_server)
    for arm in ("a", "tiny"):
        served = sum(r.model == arm for r in results)
        assert samples["fused_train_route_requests_total", (("arm", arm), ("route", "exp"))] == served
    models = {card.id: card for card in routed_server.client().models.list().data}
    assert models["exp"].route == {"a": 3, "tiny": 1}


def test_quality_gauges_and_drift_follow_a_models_requests(routed_server):
    client = routed_server.client()
    options = dict(model="b", prompt="The cat", max_tokens=8, extra_body={"ignore_eos": True})

    def send(n, **sampling):
        return asyncio.run(_gather(routed_server, n, options, sampling))

    send(WINDOW, temperature=0)
    samples = _samples(routed_server)
    assert samples["fused_train_quality_window_requests", (("adapter", "b"),)] == WINDOW
    assert samples["fused_train_quality_output_tokens", (("adapter", "b"),)] == 8
    assert samples["fused_train_quality_finish_reason_ratio", (("adapter", "b"), ("reason", "length"))] == 1
    assert samples["fused_train_quality_finish_reason_ratio", (("adapter", "b"), ("reason", "stop"))] == 0
    assert ("fused_train_drift", (("adapter", "b"),)) not in samples  # no window after the reference yet
    mean = samples["fused_train_quality_mean_logprob", (("adapter", "b"),)]
    logprobs = client.completions.create(**options, temperature=0, logprobs=0).choices[0].logprobs.token_logprobs
    assert abs(mean - sum(logprobs) / len(logprobs)) < 1e-4  # the same greedy output each time
    # The shift: sampled tokens are less likely under the model than its greedy ones. The window
    # after the reference ends with these (the logprobs request above has left it).
    send(WINDOW, temperature=1.0, seed=5)
    samples = _samples(routed_server)
    assert samples["fused_train_drift", (("adapter", "b"),)] == 1.0
    assert samples["fused_train_quality_mean_logprob", (("adapter", "b"),)] < mean - 0.1


async def _gather(server, n, options, sampling):
    async with server.async_client() as client:
        return await asyncio.gather(*[client.completions.create(**options, **sampling) for _ in range(n)])


def test_routes_are_validated_and_their_arms_kept(routed_server):
    engine = routed_server.engine
    for routes, match in ((["exp=zz:1"], "arm 'zz' is neither"), (["a=b:1"], "a served model's"),
                          ("exp=a:1", "not one string")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            build_app(engine, model_name="tiny", routes=routes)
    with pytest.raises(ValueError, match="quality_window"):
        build_app(engine, model_name="tiny", quality_window=1)
    url = routed_server.url
    response = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "a"}, timeout=30)
    assert_error(response, 400, param="lora_name", match="an arm of the route(s) ['exp']")
    response = httpx.post(f"{url}/v1/load_lora_adapter", timeout=30,
                          json={"lora_name": "exp", "lora_path": routed_server.adapters["c"]})  # fmt: skip
    assert_error(response, 400, param="lora_name", match="exists already")
    assert "a" in engine.adapters()


def test_the_cli_refuses_a_bad_route_before_it_loads_the_model(capsys):
    from fused_train.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--model", "/no/such/model", "--route", "exp=a:0"])
    assert "argument --route: route 'exp': arm 'a' needs a positive integer weight" in capsys.readouterr().err

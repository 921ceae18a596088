"""A bounded soak of the OpenAI-compatible server: every request either finishes with its own
adapter's tokens or ends with a clear error, while clients disconnect, consumers are cancelled and
an adapter is swapped under running requests.

The tiny model (bench/tiny_serving.py) with `--num-adapters` adapters and one more, "swap", whose
weights alternate between two versions: every `--swap-every` seconds it is unloaded and loaded
again from the other directory over HTTP (`/v1/unload_lora_adapter`, `/v1/load_lora_adapter`), so
requests of "swap" run across reloads. For `--duration` seconds `--concurrency` clients send greedy
requests (a prompt from a small set, a model picked at random among the base, the adapters and
"swap"), streamed or not at random; `--disconnect` of them go away after their first chunk (or, not
streamed, after a short read timeout). Beside them, a thread adds requests to the engine directly
and consumes them with `async for ... in handle.stream()` in an event loop that it cancels and
closes after a moment (`asyncio.run(asyncio.wait_for(...))`); those requests run on to their end.

Every request's text is checked against the greedy text of the same prompt computed alone before
the soak, for its model's version: "swap" may be either version that was current during the request,
never a mix. A clear error is an HTTP 404 (`model_not_found`: "swap" between its unload and load)
or 429 in OpenAI's shape; anything else (a 5xx, a broken stream, a wrong text) is a failure. At the
end the engine must be idle with every KV page free, no adapter draining, its loop alive and
`/health` OK. The JSON report (`--out`) holds the counts; the exit status is 0 only when all holds.

    python bench/soak.py --duration 60 --swap-every 10 --out bench/results/soak_cpu.json
"""

import argparse
import asyncio
import collections
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not __package__:  # run as a script: its siblings as `bench.*`, the way tests import them
    sys.path.insert(0, REPO)

from bench.tiny_serving import make_adapters, make_model_dir  # noqa: E402

PROMPTS = ["The cat", "Once upon a time", "def main():", "Numbers: 1, 2,", "A dog ran"]
MODEL_NAME = "tiny"
SWAP = "swap"


def expected_texts(engine, models, swap_dirs, max_tokens) -> dict:
    """(prompt, model or (SWAP, version)) -> the greedy text of the prompt run alone."""
    from fused_train.serving import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ids = [engine.tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    texts = {}
    for model in models:
        adapter = None if model == MODEL_NAME else model
        for prompt, output in zip(PROMPTS, engine.generate(ids, params, adapter)):
            texts[prompt, model] = output.text
    for version, path in enumerate(swap_dirs):
        engine.load_adapter(SWAP, path)
        for prompt, output in zip(PROMPTS, engine.generate(ids, params, SWAP)):
            texts[prompt, (SWAP, version)] = output.text
        engine.unload_adapter(SWAP)
    return texts


class Versions:
    """Which version of "swap" is loaded, and since when: the versions a request may have run with."""

    def __init__(self):
        self.lock = threading.Lock()
        self.current = 0
        self.loads = [(0.0, 0)]  # (time, version)

    def loaded(self, version) -> None:
        with self.lock:
            self.current = version
            self.loads.append((time.monotonic(), version))

    def during(self, start, end) -> set:
        with self.lock:
            before = [version for t, version in self.loads if t <= start][-1:]
            return set(before + [version for t, version in self.loads if start < t <= end])


def check_text(texts, versions, prompt, model, text, start, end) -> bool:
    if model != SWAP:
        return text == texts[prompt, model]
    return any(text == texts[prompt, (SWAP, version)] for version in versions.during(start, end))


async def one_request(http, args, rng, texts, versions, counts, failures, models):
    import httpx

    prompt, model = rng.choice(PROMPTS), rng.choice(models)
    streamed, disconnect = rng.random() < 0.5, rng.random() < args.disconnect
    body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
    kind = ("streamed" if streamed else "plain") + ("_disconnect" if disconnect else "")
    counts["sent"] += 1
    start = time.monotonic()
    try:
        if streamed:
            async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                if response.status_code != 200:
                    return clear_error(json.loads(await response.aread()), response.status_code, counts, failures,
                                       kind, model)  # fmt: skip
                text, finished, error = [], False, None
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"]
                        break
                    text.append(event["choices"][0]["text"])
                    finished = event["choices"][0]["finish_reason"] is not None
                    if disconnect:
                        counts["disconnected"] += 1
                        return  # leaving the block closes the connection: the server cancels it
            if error is not None or not finished:
                return failures.append(dict(kind=kind, model=model, error=error or "the stream ended unfinished"))
            text = "".join(text)
        else:
            timeout = httpx.Timeout(args.request_timeout, read=0.05) if disconnect else None
            try:
                response = await http.post("/v1/completions", json=body,
                                           **({"timeout": timeout} if timeout else {}))  # fmt: skip
            except httpx.ReadTimeout:
                if disconnect:
                    counts["disconnected"] += 1
                    return
                raise
            if response.status_code != 200:
                return clear_error(response.json(), response.status_code, counts, failures, kind, model)
            text = response.json()["choices"][0]["text"]
        if check_text(texts, versions, prompt, model, text, start, time.monotonic()):
            counts["finished_with_own_tokens"] += 1
        else:
            failures.append(dict(kind=kind, model=model, prompt=prompt, error=f"wrong text {text!r}"))
    except Exception as error:  # noqa: BLE001 - every request is accounted for
        failures.append(dict(kind=kind, model=model, error=f"{type(error).__name__}: {error}"))


def clear_error(body, status, counts, failures, kind, model):
    error = body.get("error") if isinstance(body, dict) else None
    if status in (404, 429) and isinstance(error, dict) and error.get("code") in ("model_not_found",
                                                                                 "rate_limit_exceeded"):  # fmt: skip
        counts[f"clear_error_{status}"] += 1
    else:
        failures.append(dict(kind=kind, model=model, status=status, error=body))


async def swapper(http, args, swap_dirs, versions, deadline, counts, failures):
    while time.monotonic() + args.swap_every < deadline:
        await asyncio.sleep(args.swap_every)
        version = 1 - versions.current
        unload = await http.post("/v1/unload_lora_adapter", json={"lora_name": SWAP})
        load = await http.post("/v1/load_lora_adapter", json={"lora_name": SWAP, "lora_path": swap_dirs[version]})
        if unload.status_code != 200 or load.status_code != 200:
            failures.append(dict(kind="swap", error=[unload.text, load.text]))
            return
        versions.loaded(version)
        counts["swaps"] += 1


def cancelled_consumers(engine, args, texts, deadline, counts, failures, models):
    """Requests whose asyncio consumer is cancelled and its loop closed; each must still end right."""
    from fused_train.serving import QueueFull, SamplingParams

    rng = random.Random(args.seed + 1)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    while time.monotonic() < deadline:
        prompt, model = rng.choice(PROMPTS), rng.choice([m for m in models if m != SWAP])
        try:
            handle = engine.add_request(engine.tokenizer(prompt)["input_ids"], params,
                                        None if model == MODEL_NAME else model)  # fmt: skip
        except QueueFull:  # a clear answer too
            counts["consumer_refused_queue_full"] += 1
            continue

        async def consume():
            async for _ in handle.stream():
                pass

        try:
            asyncio.run(asyncio.wait_for(consume(), rng.uniform(0.001, 0.05)))
        except asyncio.TimeoutError:
            counts["consumers_cancelled"] += 1
        output = handle.result(timeout=args.request_timeout)
        if output.finish_reason == "length" and output.text == texts[prompt, model]:
            counts["cancelled_consumer_requests_ended_right"] += 1
        else:
            failures.append(dict(kind="cancelled_consumer", model=model, error=(output.finish_reason, output.error)))


async def soak(url, engine, args, texts, swap_dirs, models):
    import httpx

    counts, failures, versions = collections.Counter(), [], Versions()
    deadline = time.monotonic() + args.duration
    rng = random.Random(args.seed)
    consumers = threading.Thread(target=cancelled_consumers,
                                 args=(engine, args, texts, deadline, counts, failures, models))  # fmt: skip
    consumers.start()
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits) as http:

        async def client():
            while time.monotonic() < deadline:
                await one_request(http, args, rng, texts, versions, counts, failures, models)

        await asyncio.gather(swapper(http, args, swap_dirs, versions, deadline, counts, failures),
                             *(client() for _ in range(args.concurrency)))  # fmt: skip
    await asyncio.to_thread(consumers.join)
    return counts, failures


def wait_idle(engine, timeout=60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = engine.metrics()
        busy = metrics["running"] or metrics["waiting"] or metrics["kv_pages_used"] or metrics["adapters"]["draining"]
        if not busy:
            break
        time.sleep(0.05)
    return engine.metrics()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of sending")
    parser.add_argument("--swap-every", type=float, default=30.0, help="seconds between reloads of the swap adapter")
    parser.add_argument("--concurrency", type=int, default=8, help="HTTP clients sending one request after another")
    parser.add_argument("--disconnect", type=float, default=0.1, help="fraction of requests whose client goes away")
    parser.add_argument("--num-adapters", type=int, default=3, help="adapters besides the swapped one")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--max-waiting", type=int, default=64, help="the engine's queue; beyond: 429")
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results", "local", "soak.json"))
    args = parser.parse_args(argv)
    for name in ("duration", "swap_every", "concurrency", "max_tokens", "request_timeout"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if not 0 <= args.disconnect <= 1:
        parser.error("--disconnect must be in [0, 1]")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from fused_train.serving.loading import open_engine
    from fused_train.serving.server import build_app, start_server

    with tempfile.TemporaryDirectory(prefix="soak_") as folder:
        model_dir = make_model_dir(os.path.join(folder, "model"))
        adapters = make_adapters(model_dir, os.path.join(folder, "adapters"),
                                 {f"a{i}": 4 * (i + 1) for i in range(args.num_adapters)})  # fmt: skip
        swap_dirs = [make_adapters(model_dir, os.path.join(folder, "adapters"), {f"{SWAP}{v}": 8}, seed=200 + v)
                     [f"{SWAP}{v}"] for v in range(2)]  # fmt: skip
        engine = open_engine(model_dir, adapters, kv_dtype="int8", kv_cache_tokens=8192, max_batch_tokens=1024,
                             max_waiting=args.max_waiting)  # fmt: skip
        try:
            models = [MODEL_NAME, *adapters, SWAP]
            texts = expected_texts(engine, models[:-1], swap_dirs, args.max_tokens)
            engine.load_adapter(SWAP, swap_dirs[0])
            app = build_app(engine, model_name=MODEL_NAME, adapter_dirs=[os.path.join(folder, "adapters")],
                            adapter_paths={**adapters, SWAP: swap_dirs[0]})  # fmt: skip
            with start_server(app) as server:
                started = time.monotonic()
                counts, failures = asyncio.run(soak(server.url, engine, args, texts, swap_dirs, models))
                elapsed = time.monotonic() - started
                metrics = wait_idle(engine)
                import httpx

                health = httpx.get(f"{server.url}/health", timeout=30).status_code
                after = httpx.post(f"{server.url}/v1/completions", timeout=60,
                                   json={"model": "a0", "prompt": PROMPTS[0], "max_tokens": args.max_tokens,
                                         "temperature": 0, "ignore_eos": True})  # fmt: skip
                alive = after.status_code == 200 and after.json()["choices"][0]["text"] == texts[PROMPTS[0], "a0"]
        finally:
            engine.shutdown(drain=False)
    accounted = (counts["finished_with_own_tokens"] + counts["disconnected"] + counts["clear_error_404"]
                 + counts["clear_error_429"] + len([f for f in failures if f.get("kind") not in
                                                    ("swap", "cancelled_consumer")]))  # fmt: skip
    checks = dict(
        no_failures=not failures,
        every_request_accounted=accounted == counts["sent"],
        pages_all_free=metrics["kv_pages_used"] == 0,
        nothing_running=metrics["running"] == 0 and metrics["waiting"] == 0,
        no_adapter_draining=metrics["adapters"]["draining"] == {},
        engine_alive=alive,
        health_ok=health == 200,
        swapped=counts["swaps"] >= 1,
    )
    report = dict(
        ok=all(checks.values()),
        checks=checks,
        counts=dict(sorted(counts.items())),
        failures=failures[:50],
        num_failures=len(failures),
        seconds=elapsed,
        requests_per_second=counts["sent"] / elapsed,
        engine=dict(requests_finished=metrics["requests_finished"], requests_cancelled=metrics["requests_cancelled"],
                    requests_failed=metrics["requests_failed"], preemptions=metrics["preemptions"],
                    kv_pages_used=metrics["kv_pages_used"], kv_pages_total=metrics["kv_pages_total"]),  # fmt: skip
        settings=vars(args),
        environment=dict(python=platform.python_version(), platform=platform.platform(), cpus=os.cpu_count()),
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as file:
        json.dump(report, file, indent=1)
    print(json.dumps({key: report[key] for key in ("ok", "checks", "counts", "num_failures", "seconds")}, indent=1))
    print(f"wrote {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Load test for any OpenAI-compatible server: streamed completions at a request rate, latency percentiles.

Requests arrive as a Poisson process (`--burstiness 1`) or, more generally, with gamma-distributed
gaps (shape `--burstiness`, mean 1 / rate: below 1 burstier, above 1 more regular), at one rate or
a sweep of rates (`--rates 1,2,4`), with at most `--max-concurrency` in flight. Prompts are
sentences of the embedded corpus (bench/demo.py's stdlib sentences); each request names one of
`--num-adapters` adapters in its `model` field, picked with Zipf popularity (`--zipf-s`): the
names the server lists at /v1/models, or `--adapter-prefix P` for P0, P1, ...; `--num-adapters 0`
asks the base model. Every rate replays the same requests (prompts, adapters, gaps scaled by the
rate), greedy by default, so servers and rates compare like for like.

What it reports, with vLLM's `vllm bench serve` definitions so that numbers compare:
  TTFT   time to first token: from sending the request to its first streamed chunk with text;
  ITL    inter-token latency: the gaps between a request's successive chunks with text (all
         requests pooled; a server may hold a token back until its text is whole UTF-8);
  TPOT   time per output token after the first: (latency - TTFT) / (output tokens - 1);
  E2EL   end-to-end latency: from sending to the last chunk (the one with the finish reason);
each as mean and p50/p95/p99 over the successful requests; requests/s and output tokens/s over the
run's duration (first send to last end); the error rate (failed / sent: an HTTP error, a broken
stream or a timeout); goodput (requests/s meeting `--slo-ttft-ms` and `--slo-tpot-ms`). Output
tokens are the server's `usage.completion_tokens` (the chunks counted when it sends none). A table,
a JSON with every request's record (the percentiles are computed from them) and a PNG of latency
vs rate; with a sweep, the highest rate whose p99 TTFT is within `--max-p99-ttft-ms` with no errors.

Bounded: `--num-requests` per rate and `--duration` seconds of sending per rate, each request
`--request-timeout`; loopback addresses only (127.0.0.0/8, ::1, localhost).

    python bench/load_test.py --base-url http://127.0.0.1:8000 --rates 1,2,4 --num-adapters 4
    python bench/load_test.py --start ours --num-adapters 32 --rates 1,2,4,8,16   # starts the tiny model's server
    python bench/load_test.py --start naive --num-adapters 32 --rates 1,2,4       # the per-request peft server
"""

import argparse
import asyncio
import contextlib
import ipaddress
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not __package__:  # run as a script: its siblings as `bench.*`, the way tests import them
    sys.path.insert(0, REPO)

from bench.common import BOS_ID, BYTE_OFFSET, load_documents, pyplot  # noqa: E402

PERCENTILES = (50, 95, 99)
METRICS = ("ttft", "tpot", "itl", "e2el")
ADAPTER_RANKS = (8, 16, 32, 64)  # the adapters of --start, in turn
SERVED_MODEL_NAME = "tiny"


def check_loopback(url: str) -> str:
    """`url` without a trailing slash, if its host is a loopback address; else ValueError."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"--base-url must be an http(s) URL with a host, got {url!r}")
    host = parsed.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"--base-url {url!r}: the load test only sends to loopback addresses (127.0.0.0/8, ::1, localhost), "
            f"not {host!r}"
        )
    return url.rstrip("/")


def load_prompts(max_prompt_tokens: int) -> list[str]:
    """The sentences corpus as text, those of at most `max_prompt_tokens` byte tokens."""
    documents, _ = load_documents(max_prompt_tokens, "sentences")
    return [bytes(t - BYTE_OFFSET for t in doc if t != BOS_ID).decode("utf-8") for doc in documents]


def zipf_weights(count: int, s: float) -> np.ndarray:
    """Probabilities of ranks 1..count proportional to 1 / rank**s."""
    weights = 1.0 / np.arange(1, count + 1) ** s
    return weights / weights.sum()


def make_trace(num_requests, models, zipf_s, prompts, burstiness, seed) -> list[dict]:
    """The requests of every rate: prompt, model name (Zipf over `models`) and the gap before it in
    units of the mean gap (gamma with shape `burstiness` and mean 1; scaled by 1 / rate at run time)."""
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(burstiness, 1.0 / burstiness, num_requests)
    gaps[0] = 0.0  # the first request goes at once
    picks = rng.choice(len(models), size=num_requests, p=zipf_weights(len(models), zipf_s))
    prompt_picks = rng.integers(len(prompts), size=num_requests)
    return [dict(index=i, unit_gap=float(gaps[i]), model=models[picks[i]], prompt=prompts[prompt_picks[i]])
            for i in range(num_requests)]  # fmt: skip


def _joined(sentences, rng, length) -> str:
    """Corpus sentences picked by `rng`, joined, cut to `length` characters (bytes: the tiny model's tokens)."""
    text = ""
    while len(text) < length:
        text += sentences[int(rng.integers(len(sentences)))] + " "
    return text[:length]


def apply_workload(trace, workload, sentences, args) -> None:
    """Rewrite the trace's prompts for `workload`: "shared-prefix" puts one of `--system-prompts`
    system prompts (`--system-prompt-tokens` long) before each prompt, a user turn; "long-prompt"
    gives a `--long-prompt-fraction` of the requests a prompt of `--long-prompt-tokens` (each its
    own text); "mixed" leaves the corpus prompts."""
    rng = np.random.default_rng(args.seed + 1)
    if workload == "shared-prefix":
        systems = [_joined(sentences, rng, args.system_prompt_tokens) for _ in range(args.system_prompts)]
        for item in trace:
            item["prompt"] = systems[int(rng.integers(len(systems)))] + "\n" + item["prompt"]
    elif workload == "long-prompt":
        for item in trace:
            if rng.random() < args.long_prompt_fraction:
                item["prompt"] = _joined(sentences, rng, args.long_prompt_tokens)


async def send_request(client, url, body, headers, timeout) -> dict:
    """One streamed completion; its record: times in seconds from sending, `ok` or `error`."""
    record = dict(ok=False, error=None, status=None, ttft=None, itl=[], e2el=None, output_tokens=0, usage_tokens=None)
    try:
        await asyncio.wait_for(_stream(client, url, body, headers, record), timeout)
    except asyncio.TimeoutError:
        record["error"] = f"no complete answer within {timeout} s"
    except Exception as error:  # noqa: BLE001 - a request that fails is counted, never lost
        record["error"] = f"{type(error).__name__}: {error}"
    return record


async def _stream(client, url, body, headers, record) -> None:
    start = time.perf_counter()
    chunks, last, end, done = 0, None, None, False
    async with client.stream("POST", url, json=body, headers=headers) as response:
        record["status"] = response.status_code
        if response.status_code != 200:
            text = (await response.aread()).decode("utf-8", "replace")
            try:
                message = json.loads(text)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = text[:200]
            record["error"] = f"HTTP {response.status_code}: {message}"
            return
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                record["error"] = f"stream error: {chunk['error'].get('message')}"
                return
            now = time.perf_counter()
            choice = (chunk.get("choices") or [{}])[0]
            if choice.get("text") or (choice.get("delta") or {}).get("content"):
                if last is None:
                    record["ttft"] = now - start
                else:
                    record["itl"].append(now - last)
                last = now
                chunks += 1
            if choice:
                end = now  # the chunk with the finish reason may come after the last text
            if chunk.get("usage"):
                record["usage_tokens"] = chunk["usage"].get("completion_tokens")
    if not done:
        record["error"] = "the stream ended without data: [DONE]"
    elif last is None and not record["usage_tokens"]:
        record["error"] = "the stream held no tokens"
    else:
        if last is None:
            # Tokens whose text is empty (special tokens, bytes of no whole character): the client
            # sees its first output with the end of the answer.
            record["ttft"] = end - start
        record["ok"] = True
        record["e2el"] = end - start
        record["output_tokens"] = chunks if record["usage_tokens"] is None else record["usage_tokens"]


async def run_rate(base_url, trace, rate, args, progress=None) -> tuple[list[dict], float]:
    """Sends `trace` at `rate` requests/s (inf: all at once) for at most `args.duration` seconds;
    returns the records of the requests sent and the run's duration (first send to last end)."""
    import httpx

    url = f"{base_url}/v1/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else contextlib.nullcontext()
    records = []

    async def one(item, client):
        body = dict(model=item["model"], prompt=item["prompt"], max_tokens=args.max_tokens,
                    temperature=args.temperature, stream=True, stream_options={"include_usage": True})  # fmt: skip
        async with limit:
            sent = time.perf_counter()
            record = await send_request(client, url, body, headers, args.request_timeout)
        record.update(index=item["index"], model=item["model"], sent=sent - start, end=time.perf_counter() - start)
        records.append(record)
        if progress is not None:
            progress.update()

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=args.request_timeout, limits=limits) as client:
        start = time.perf_counter()
        due, tasks = start, []
        for item in trace:
            if math.isfinite(rate):
                due += item["unit_gap"] / rate
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            if time.perf_counter() - start > args.duration:
                break
            tasks.append(asyncio.create_task(one(item, client)))
        await asyncio.gather(*tasks)
    records.sort(key=lambda r: r["index"])
    for record in records:
        tokens, ttft, e2el = record["output_tokens"], record["ttft"], record["e2el"]
        record["tpot"] = (e2el - ttft) / (tokens - 1) if record["ok"] and tokens > 1 else None
    duration = max((r["end"] for r in records), default=0.0)
    return records, duration


def _stats(values_s) -> dict:
    values = np.asarray(values_s, dtype=float) * 1e3
    if values.size == 0:
        return dict(mean=None, **{f"p{p}": None for p in PERCENTILES})
    return dict(mean=float(values.mean()), **{f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES})


def summarize(records, duration, slo_ttft_ms=None, slo_tpot_ms=None) -> dict:
    """The run's figures, from its per-request records alone (ms for latencies)."""
    ok = [r for r in records if r["ok"]]
    sent, errors = len(records), len(records) - len(ok)
    output_tokens = sum(r["output_tokens"] for r in ok)
    summary = dict(
        sent=sent,
        ok=len(ok),
        errors=errors,
        error_rate=errors / sent if sent else 0.0,
        duration_s=duration,
        requests_per_s=len(ok) / duration if duration else 0.0,
        output_tokens=output_tokens,
        output_tokens_per_s=output_tokens / duration if duration else 0.0,
        ttft_ms=_stats([r["ttft"] for r in ok]),
        tpot_ms=_stats([r["tpot"] for r in ok if r["tpot"] is not None]),
        itl_ms=_stats([gap for r in ok for gap in r["itl"]]),
        e2el_ms=_stats([r["e2el"] for r in ok]),
    )
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        good = [r for r in ok if (slo_ttft_ms is None or r["ttft"] * 1e3 <= slo_ttft_ms)
                and (slo_tpot_ms is None or r["tpot"] is None or r["tpot"] * 1e3 <= slo_tpot_ms)]  # fmt: skip
        summary["good"] = len(good)
        summary["goodput_requests_per_s"] = len(good) / duration if duration else 0.0
    return summary


def sustainable_rate(runs, max_p99_ttft_ms) -> float | None:
    """The highest rate of the sweep with no errors and p99 TTFT within `max_p99_ttft_ms`, all lower
    rates meeting it too (a rate that passes above a failing one is luck, not capacity)."""
    best = None
    for run in sorted(runs, key=lambda r: r["rate"]):
        s = run["summary"]
        if s["errors"] or s["ttft_ms"]["p99"] is None or s["ttft_ms"]["p99"] > max_p99_ttft_ms:
            break
        best = run["rate"]
    return best


def print_table(runs, title) -> None:
    print(f"\n{title}")
    header = (f"{'rate/s':>7} {'sent':>5} {'ok':>5} {'err%':>5} {'req/s':>6} {'out tok/s':>9} "
              f"{'TTFT p50/p95/p99 ms':>22} {'TPOT p50/p95/p99 ms':>21} {'ITL p50/p99 ms':>15} "
              f"{'E2EL p50/p99 ms':>16} {'goodput/s':>9}")  # fmt: skip
    print(header)
    print("-" * len(header))

    def triple(stats, keys):
        return "/".join("-" if stats[k] is None else f"{stats[k]:.0f}" for k in keys)

    for run in runs:
        s = run["summary"]
        goodput = s.get("goodput_requests_per_s")
        print(f"{run['rate']:>7g} {s['sent']:>5} {s['ok']:>5} {100 * s['error_rate']:>5.1f} "
              f"{s['requests_per_s']:>6.2f} "
              f"{s['output_tokens_per_s']:>9.1f} {triple(s['ttft_ms'], ('p50', 'p95', 'p99')):>22} "
              f"{triple(s['tpot_ms'], ('p50', 'p95', 'p99')):>21} {triple(s['itl_ms'], ('p50', 'p99')):>15} "
              f"{triple(s['e2el_ms'], ('p50', 'p99')):>16} "
              f"{'-' if goodput is None else f'{goodput:.2f}':>9}")  # fmt: skip


def plot(runs, path, title) -> None:
    plt = pyplot()

    runs = [run for run in runs if math.isfinite(run["rate"])] or runs
    rates = [run["rate"] if math.isfinite(run["rate"]) else 0 for run in runs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, metric in zip(axes, ("ttft_ms", "tpot_ms", "e2el_ms")):
        for p, style in zip(PERCENTILES, (":", "--", "-")):
            values = [run["summary"][metric][f"p{p}"] for run in runs]
            ax.plot(rates, [np.nan if v is None else v for v in values], style, marker="o", label=f"p{p}")
        ax.set_xlabel("request rate (requests/s)")
        ax.set_ylabel(metric.replace("_ms", " (ms)").upper())
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].axhline(1000, color="gray", linewidth=1)
    ax = axes[2].twinx()
    ax.plot(rates, [100 * run["summary"]["error_rate"] for run in runs], color="tab:red", marker="x", linewidth=1)
    ax.set_ylabel("errors (%)", color="tab:red")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class ServerProcess:
    """A server command in a subprocess of its own (output to `log_path`), ready once GET `health_url`
    answers 200; stopped (SIGTERM, then SIGKILL) by `stop()` or on leaving the `with` block."""

    def __init__(self, command, health_url, log_path, env=None, ready_timeout=180.0):
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                            start_new_session=True)  # fmt: skip
        try:
            self._wait_ready(health_url, ready_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, health_url, timeout):
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(health_url, timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the server did not answer {health_url} within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, chars=3000) -> str:
        with open(self.log_path, "rb") as log:
            return log.read().decode("utf-8", "replace")[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(kind, model_dir, adapters, port, max_loras, engine_args=()) -> list[str]:
    """The command that serves `model_dir` with `adapters` on 127.0.0.1:`port`: our server
    (`fused-train serve`, with `engine_args`) or the naive per-request peft one (bench/naive_engine.py)."""
    if kind == "ours":
        command = [sys.executable, "-m", "fused_train.cli", "serve", "--max-loras", str(max_loras), "--log-level",
                   "warning", *engine_args]  # fmt: skip
    else:
        command = [sys.executable, os.path.join(REPO, "bench", "naive_engine.py"), "serve"]
    command += ["--model", model_dir, "--served-model-name", SERVED_MODEL_NAME, "--host", "127.0.0.1",
                "--port", str(port)]  # fmt: skip
    for name, path in adapters.items():
        command += ["--adapter", f"{name}={path}"]
    return command


def start_tiny_server(kind, num_adapters, folder, max_loras, engine_args=()) -> tuple[ServerProcess, str]:
    """The tiny model (random init) with `num_adapters` random adapters, served by `kind`: the
    server and its URL."""
    from bench.tiny_serving import make_adapters, make_model_dir

    model_dir = make_model_dir(os.path.join(folder, "tiny"))
    ranks = {f"adapter{i}": ADAPTER_RANKS[i % len(ADAPTER_RANKS)] for i in range(num_adapters)}
    adapters = make_adapters(model_dir, os.path.join(folder, "adapters"), ranks)
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}  # a CPU user's path
    command = server_command(kind, model_dir, adapters, port, max(1, min(max_loras, num_adapters)), engine_args)
    url = f"http://127.0.0.1:{port}"
    return ServerProcess(command, f"{url}/health", os.path.join(folder, f"{kind}.log"), env), url


def list_models(base_url, api_key) -> tuple[str, list[str]]:
    """(the base model's name, the adapters' names) as GET /v1/models lists them."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=10)
    response.raise_for_status()
    entries = response.json()["data"]
    bases = [e["id"] for e in entries if not e.get("parent")]
    return (bases[0] if bases else None), [e["id"] for e in entries if e.get("parent")]


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers (or inf), got {text!r}") from None
    if not rates or any(not rate > 0 for rate in rates):
        raise argparse.ArgumentTypeError(f"rates must be > 0, got {text!r}")
    return rates


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--base-url", help="the server (loopback only); default http://127.0.0.1:8000")
    where.add_argument("--start", choices=("ours", "naive"),
                       help="start the tiny model's server with --num-adapters random adapters in a subprocess: "
                            "ours (fused-train serve) or the naive per-request peft server; "
                            "stopped at the end")  # fmt: skip
    parser.add_argument("--model", help="the base model's name (default: the one /v1/models lists)")
    parser.add_argument("--num-adapters", type=int, default=4, help="adapters to spread requests over; 0: the base")
    parser.add_argument("--adapter-prefix", help="adapter names PREFIX0, PREFIX1, ... (default: as the server lists)")
    parser.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent of adapter popularity")
    parser.add_argument("--max-loras", type=int, default=32, help="--start ours: the engine's device slots")
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--request-rate", type=float, default=4.0, help="requests/s (inf: all at once)")
    rate.add_argument("--rates", type=parse_rates, help="a sweep, e.g. 1,2,4,8")
    parser.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1: Poisson)")
    parser.add_argument("--max-concurrency", type=int, help="requests in flight at most (default: no limit)")
    parser.add_argument("--num-requests", type=int, default=64, help="requests per rate at most")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of sending per rate at most")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request at most")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per request at most")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-prompt-tokens", type=int, default=96, help="prompts of at most this many bytes")
    parser.add_argument("--workload", choices=("mixed", "shared-prefix", "long-prompt"), default="mixed",
                        help="corpus prompts; a few system prompts before them; some long prompts among them")
    parser.add_argument("--system-prompts", type=int, default=4, help="shared-prefix: how many system prompts")
    parser.add_argument("--system-prompt-tokens", type=int, default=768, help="shared-prefix: bytes of each")
    parser.add_argument("--long-prompt-tokens", type=int, default=1536, help="long-prompt: bytes of a long prompt")
    parser.add_argument("--long-prompt-fraction", type=float, default=0.1, help="long-prompt: requests with one")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="--start ours: serve with --no-enable-prefix-caching (the side-by-side baseline)")
    parser.add_argument("--server-max-batch-tokens", type=int,
                        help="--start ours: the engine's --max-batch-tokens (longer prompts are chunked)")
    parser.add_argument("--warmup", type=int,
                        help="requests sent one by one first, not measured (default: one per model name)")  # fmt: skip
    parser.add_argument("--slo-ttft-ms", type=float, help="goodput: TTFT at most this")
    parser.add_argument("--slo-tpot-ms", type=float, help="goodput: TPOT at most this")
    parser.add_argument("--max-p99-ttft-ms", type=float, default=1000.0, help="the sustainable rate's p99 TTFT")
    parser.add_argument("--api-key")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="load_test", help="file name of the JSON and PNG (without suffix)")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results", "local"), help="folder for them")
    args = parser.parse_args(argv)
    for name in ("num_requests", "duration", "request_timeout", "max_tokens", "max_prompt_tokens", "burstiness",
                 "system_prompts", "system_prompt_tokens", "long_prompt_tokens"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    for name in ("num_adapters", "warmup"):
        if (getattr(args, name) or 0) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    if not 0 <= args.long_prompt_fraction <= 1:
        parser.error("--long-prompt-fraction must be in [0, 1]")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        parser.error("--max-concurrency must be >= 1")
    args.rates = args.rates or [args.request_rate]
    if not all(r > 0 for r in args.rates):
        parser.error("--request-rate must be > 0")
    if args.start is None:
        try:
            args.base_url = check_loopback(args.base_url or "http://127.0.0.1:8000")
        except ValueError as error:
            parser.error(str(error))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    command = None
    with contextlib.ExitStack() as stack:
        if args.start:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="load_test_"))
            print(f"starting the {args.start} server on the tiny model with {args.num_adapters} adapters ...",
                  flush=True)  # fmt: skip
            engine_args = ["--no-enable-prefix-caching"] if args.no_prefix_caching else []
            if args.server_max_batch_tokens:
                engine_args += ["--max-batch-tokens", str(args.server_max_batch_tokens)]
            server, args.base_url = start_tiny_server(args.start, args.num_adapters, folder, args.max_loras,
                                                      engine_args)  # fmt: skip
            stack.enter_context(server)
            command = [os.path.basename(part) if part == sys.executable else part for part in server.process.args]
        base, listed = list_models(args.base_url, args.api_key)
        base = args.model or base
        if args.adapter_prefix is not None:
            adapters = [f"{args.adapter_prefix}{i}" for i in range(args.num_adapters)]
        elif len(listed) < args.num_adapters:
            raise SystemExit(f"--num-adapters {args.num_adapters}: the server lists only {len(listed)}: {listed}")
        else:
            adapters = listed[: args.num_adapters]
        models = adapters or [base]
        prompts = load_prompts(args.max_prompt_tokens)
        trace = make_trace(args.num_requests, models, args.zipf_s, prompts, args.burstiness, args.seed)
        apply_workload(trace, args.workload, load_prompts(10**6), args)
        # Warm-up, not measured: a first request per model name pays one-time costs (an adapter's first
        # use in peft takes seconds) that a long-running server pays once, not at every rate.
        warmup = len(models) if args.warmup is None else args.warmup
        warm_args = argparse.Namespace(**{**vars(args), "max_tokens": 2, "max_concurrency": None})
        for i in range(warmup):
            item = dict(trace[i % len(trace)], model=models[i % len(models)])
            warm = asyncio.run(run_rate(args.base_url, [item], math.inf, warm_args))[0][0]
            if not warm["ok"]:
                print(f"warm-up request failed: {warm['error']}", file=sys.stderr)
        runs = []
        load_before = os.getloadavg()[0]
        for rate in args.rates:
            with tqdm(total=len(trace), desc=f"rate {rate:g}/s", unit="req", leave=False) as progress:
                records, duration = asyncio.run(run_rate(args.base_url, trace, rate, args, progress))
            summary = summarize(records, duration, args.slo_ttft_ms, args.slo_tpot_ms)
            runs.append(dict(rate=rate, summary=summary, requests=records))
            print(f"rate {rate:g}/s: {summary['ok']}/{summary['sent']} ok, TTFT p99 {summary['ttft_ms']['p99']} ms",
                  flush=True)  # fmt: skip
        load_after = os.getloadavg()[0]

    server_name = args.start or args.base_url
    report = dict(
        server=server_name,
        base_url=args.base_url,
        server_command=command,
        settings={key: value for key, value in vars(args).items() if key not in ("api_key", "out", "label")},
        models=models,
        environment=dict(python=platform.python_version(), platform=platform.platform(), cpus=os.cpu_count(),
                         load_average_1min=dict(before=load_before, after=load_after)),  # fmt: skip
        sustainable_rate=sustainable_rate(runs, args.max_p99_ttft_ms) if len(runs) > 1 else None,
        runs=runs,
    )
    title = (f"{server_name}: {len(models)} model name(s), Zipf s={args.zipf_s}, {args.num_requests} requests/rate, "
             f"max {args.max_tokens} tokens, {args.workload} prompts")  # fmt: skip
    print_table(runs, title)
    if report["sustainable_rate"] is not None or len(runs) > 1:
        print(f"sustainable rate (p99 TTFT <= {args.max_p99_ttft_ms:g} ms, no errors): {report['sustainable_rate']}")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.label)
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    plot(runs, stem + ".png", title)
    print(f"wrote {stem}.json and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

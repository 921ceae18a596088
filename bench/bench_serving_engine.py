"""Serving many adapters: one request trace through our engine and through the ways peft users serve.

The trace: prompts from the embedded corpus (bench/demo.py's stdlib sentences, byte tokens),
output lengths from a long-tailed (log-normal) distribution, Poisson arrivals, and 32 adapters
(ranks 8-64 mixed, all seven projections) picked with Zipf popularity (a few hot, many cold).
Every way gets the same requests and generates exactly each request's output length (greedy,
end of sequence ignored), so tokens/s compare like for like:
- `engine_int8`, `engine_model`: `fused_train.serving.Engine` with int8 / model-dtype KV pages,
  requests added at their arrival times, streamed;
- `peft_naive`: one peft model, per request in arrival order `set_adapter` (or the base with
  adapters disabled) then `generate`;
- `peft_static`: peft's mixed batch (`adapter_names=`), `generate` over static batches of
  `--static-batch` requests taken in arrival order (left-padded, each batch starting when its last
  request has arrived and the previous batch is done).
transformers' own continuous batching (`generate_batch`) serves one model without adapters, so it
cannot run this trace: `--generate-batch` compares it with the engine on the base model instead.

Reports output tokens/s (all output tokens over the time from the first arrival to the last
token), TTFT and TPOT (TPOT = (latency - TTFT) / (output tokens - 1), vLLM's definition) at
p50/p95/p99, the KV cache's bytes per token (the engine's pool; peft's DynamicCache in the model
dtype) and peak memory; JSON and PNG under bench/results/.

    python bench/bench_serving_engine.py            # CPU: the demo's tiny Llama; GPU: a 1B-shaped Llama
    python bench/bench_serving_engine.py --quick    # fewer requests
    python bench/bench_serving_engine.py --model 8b --adapters 8 --requests 32 --ways engine_int8,peft_naive
                                                    # the GPU check: an 8B-shaped random Llama
    python bench/bench_serving_engine.py --batch1   # batch 1 on the base model: the engine vs HF generate
    python bench/bench_serving_engine.py --generate-batch   # the base model: the engine vs HF generate_batch

`--workload shared-prefix`: a few system prompts (`--systems`, `--system-tokens` each, a tenant's
adapter each) x many user turns (corpus sentences), Poisson arrivals; the int8 engine with and
without its prefix cache, side by side in one run, TTFT p50 with over without, into
serving_shared_prefix_<device>.json. `--workload long-prompt`: `--decoders` requests decode while
one `--long-prompt-tokens` prompt arrives; the decodes' inter-token times (a step's time) before and
while it prefills, chunked (`--max-batch-tokens`, default 256) against in one step (a budget that
holds the whole prompt), into serving_long_prompt_<device>.json.

`--batch1` times one request at a time, no adapter, greedy and sampled (temperature 0.8, top_p 0.9,
top_k 50), `--batch1-tokens` output tokens each: the engine (model-dtype and int8 pages) against
the base model's own `generate`; time per output token = (last token - first token) / (tokens - 1),
the median of `--batch1-repeats` runs after one warm-up, the ways taking turns, and the median of
each engine run's ratio to the HF run of its turn; the same for the CPU time per output token of
the thread that runs the model (`_cpu` rows: robust to other processes' load), into
serving_batch1_<device>.json (with the load average before and after) and a PNG. On a
CPU, `--threads 1` compares like for like: the engine's loop runs in a thread of its own, where
torch's OpenMP regions over 2 threads cost about 3x what they cost in the main thread (HF
`generate` itself: 1.6 ms per token in the main thread, 5 ms in another, 1.6 there with 1 thread).

`--generate-batch` runs 64 prompts (16-63 random tokens) x 64 output tokens, greedy, all at once on
the base model: output tokens/s of the engine (int8 and model-dtype pages) and of transformers'
`generate_batch`, the best of 3 runs each after a warm-up, into serving_generate_batch_<device>.json.
"""

import argparse
import copy
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
import torch
import transformers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not __package__:  # run as a script: its siblings as `bench.*`, the way tests import them
    sys.path.insert(0, REPO)

from bench.common import MODEL, load_documents, pyplot  # noqa: E402
from fused_train.serving import Engine, SamplingParams  # noqa: E402

RESULTS = os.path.join(REPO, "bench", "results")
ADAPTERS, RANKS = 32, (8, 16, 32, 64)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPU_MODEL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096)  # fmt: skip
# Llama-3-8B's shapes, random weights: what the engine's step costs at a real model's size.
MODEL_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192)  # fmt: skip
# --model: the default is "tiny" on CPU, "1b" on a GPU.
MODELS = {"tiny": MODEL, "1b": GPU_MODEL, "8b": MODEL_8B}
WAYS = ("engine_int8", "engine_model", "peft_naive", "peft_static")


def make_trace(requests, rate, seed, max_prompt, mean_output, max_output, vocab_size, adapters=ADAPTERS):
    """[(arrival s, prompt ids, output tokens, adapter name or None)], in arrival order, over
    `adapters` adapters named adapter0..."""
    rng = np.random.default_rng(seed)
    documents, _ = load_documents(max_prompt, "sentences")
    arrivals = np.cumsum(rng.exponential(1.0 / rate, requests)) - 0  # Poisson process
    arrivals -= arrivals[0]
    outputs = np.clip(rng.lognormal(np.log(mean_output), 0.8, requests).round(), 2, max_output).astype(int)
    zipf = 1.0 / np.arange(1, adapters + 1)
    picks = rng.choice(adapters + 1, size=requests, p=np.append(zipf, zipf[0]) / (zipf.sum() + zipf[0]))
    trace = []
    for i in range(requests):
        prompt = [t % vocab_size for t in documents[int(rng.integers(len(documents)))]]
        adapter = None if picks[i] == adapters else f"adapter{picks[i]}"  # the base is as popular as the top adapter
        trace.append((float(arrivals[i]), prompt, int(outputs[i]), adapter))
    return trace


def make_adapters(base, folder, adapters=ADAPTERS):
    """`adapters` random peft adapters on disk, written as peft saves them (adapter_config.json and
    adapter_model.safetensors), without a copy of the model per adapter."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(100)
    linears = [(name, module) for name, module in base.named_modules()
               if name.rsplit(".", 1)[-1] in TARGETS and isinstance(module, torch.nn.Linear)]  # fmt: skip
    paths = {}
    for i in range(adapters):
        rank = RANKS[i % len(RANKS)]
        path = paths[f"adapter{i}"] = os.path.join(folder, f"adapter{i}")
        LoraConfig(r=rank, lora_alpha=16, target_modules=TARGETS).save_pretrained(path)
        tensors = {}
        for name, module in linears:
            lora_a = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
            lora_b = torch.randn(module.out_features, rank, generator=generator) * 0.02
            tensors[f"base_model.model.{name}.lora_A.weight"] = lora_a.to(base.dtype)
            tensors[f"base_model.model.{name}.lora_B.weight"] = lora_b.to(base.dtype)
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    return paths


class _Times:
    """Wall time of each token a request receives (first, last, count)."""

    def __init__(self):
        self.first = self.last = None
        self.count = 0

    def token(self, now):
        self.first = self.first if self.first is not None else now
        self.last = now
        self.count += 1


def make_shared_prefix_trace(requests, rate, seed, systems, system_tokens, outputs, vocab_size):
    """The trace of `make_trace`, every prompt one of `systems` system prompts of `system_tokens`
    tokens (the tenant's, with its adapter) followed by a user turn (a corpus sentence)."""
    rng = np.random.default_rng(seed)
    documents, _ = load_documents(64, "sentences")
    tenants = []
    for k in range(systems):
        system = []
        while len(system) < system_tokens:
            system += documents[int(rng.integers(len(documents)))]
        tenants.append(([t % vocab_size for t in system[:system_tokens]], f"adapter{k}"))
    arrivals = np.cumsum(rng.exponential(1.0 / rate, requests))
    arrivals -= arrivals[0]
    trace = []
    for i in range(requests):
        system, adapter = tenants[int(rng.integers(systems))]
        user = [t % vocab_size for t in documents[int(rng.integers(len(documents)))]]
        trace.append((float(arrivals[i]), system + user, outputs, adapter))
    return trace


def run_engine(base, paths, trace, kv_dtype, device, **options):
    options = dict(kv_cache_tokens=65536 if device == "cuda" else 16384, max_batch_tokens=4096, **options)
    engine = Engine(copy.deepcopy(base), adapters=paths, kv_dtype=kv_dtype, max_loras=len(paths), **options)
    times = [_Times() for _ in trace]
    start = time.perf_counter()
    threads = []
    for i, (arrival, prompt, outputs, adapter) in enumerate(trace):
        time.sleep(max(0.0, start + arrival - time.perf_counter()))
        handle = engine.add_request(prompt, SamplingParams(max_tokens=outputs, temperature=0, ignore_eos=True), adapter)

        def consume(handle=handle, record=times[i]):
            for _ in handle:
                record.token(time.perf_counter())

        threads.append(threading.Thread(target=consume))
        threads[-1].start()
    for thread in threads:
        thread.join()
    metrics = engine.metrics()
    engine.shutdown()
    return start, times, dict(kv_bytes_per_token=metrics["kv_bytes_per_token"], preemptions=metrics["preemptions"],
                              steps=metrics["steps"], adapter_loads=metrics["adapters"]["loads"],
                              prefix_cache_queries=metrics["prefix_cache_queries"],
                              prefix_cache_hits=metrics["prefix_cache_hits"])  # fmt: skip


def run_long_prompt(base, device, max_batch_tokens, prompt_tokens, decoders, decode_tokens=48, warm_tokens=16):
    """`decoders` requests decode; once each has `warm_tokens` tokens, one `prompt_tokens` prompt
    arrives. The decodes' inter-token times (ms) before it and from its arrival to its first token,
    and its TTFT (ms)."""
    engine = Engine(copy.deepcopy(base), kv_dtype="int8", kv_cache_tokens=prompt_tokens + decoders * 128,
                    max_batch_tokens=max_batch_tokens, enable_prefix_caching=False)  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    vocab = base.config.vocab_size
    params = SamplingParams(max_tokens=decode_tokens, temperature=0, ignore_eos=True)
    stamps = [[] for _ in range(decoders)]
    prompts = [torch.randint(3, vocab, (32,), generator=generator).tolist() for _ in range(decoders)]
    warm = threading.Barrier(decoders + 1)

    def decode(record, prompt):
        handle = engine.add_request(prompt, params)
        for count, _ in enumerate(handle, 1):
            record.append(time.perf_counter())
            if count == warm_tokens:
                warm.wait()

    try:
        threads = [threading.Thread(target=decode, args=pair) for pair in zip(stamps, prompts)]
        for thread in threads:
            thread.start()
        warm.wait()
        prompt = torch.randint(3, vocab, (prompt_tokens,), generator=generator).tolist()
        arrival = time.perf_counter()
        output = engine.generate([prompt], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))[0]
        first_token = arrival + output.time_to_first_token
        for thread in threads:
            thread.join()
    finally:
        engine.shutdown()
    before, during = [], []
    for record in stamps:
        for previous, now in zip(record, record[1:]):
            if now <= arrival:
                before.append(now - previous)
            elif previous < first_token:
                during.append(now - previous)
    if not during:
        raise AssertionError("no decode step ran while the long prompt prefilled: raise --decoders' tokens")
    return dict(max_batch_tokens=max_batch_tokens, long_prompt_ttft_ms=output.time_to_first_token * 1e3,
                itl_before_ms_p50=float(np.median(before)) * 1e3, itl_during_ms_p50=float(np.median(during)) * 1e3,
                itl_during_ms_max=float(np.max(during)) * 1e3)  # fmt: skip


class _Streamer(transformers.generation.streamers.BaseStreamer):
    """Records each generation step's time for the batch's rows (the first `put` is the prompt)."""

    def __init__(self, records, lengths):
        self.records, self.lengths, self.prompt_seen = records, lengths, False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        now = time.perf_counter()
        for record, length in zip(self.records, self.lengths):
            if record.count < length:
                record.token(now)

    def end(self):
        pass


def _peft_model(base, paths):
    from peft import PeftModel

    names = list(paths)
    model = PeftModel.from_pretrained(copy.deepcopy(base), paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(paths[name], adapter_name=name)
    return model.eval()


def run_peft_naive(base, paths, trace, device):
    model = _peft_model(base, paths)
    times = [_Times() for _ in trace]
    start = time.perf_counter()
    for i, (arrival, prompt, outputs, adapter) in enumerate(trace):
        time.sleep(max(0.0, start + arrival - time.perf_counter()))
        ids = torch.tensor([prompt], device=device)
        kwargs = dict(max_new_tokens=outputs, min_new_tokens=outputs, do_sample=False, pad_token_id=0,
                      streamer=_Streamer([times[i]], [outputs]))  # fmt: skip
        with torch.no_grad():
            if adapter is None:
                with model.disable_adapter():
                    model.generate(input_ids=ids, **kwargs)
            else:
                model.set_adapter(adapter)
                model.generate(input_ids=ids, **kwargs)
    return start, times, dict(kv_bytes_per_token=_dynamic_cache_bytes_per_token(base))


def run_peft_static(base, paths, trace, batch_size, device):
    model = _peft_model(base, paths)
    times = [_Times() for _ in trace]
    start = time.perf_counter()
    for first in range(0, len(trace), batch_size):
        batch = trace[first:first + batch_size]
        time.sleep(max(0.0, start + batch[-1][0] - time.perf_counter()))
        width = max(len(prompt) for _, prompt, _, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for _, p, _, _ in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for _, p, _, _ in batch], device=device)
        lengths = [outputs for _, _, outputs, _ in batch]
        names = [adapter or "__base__" for _, _, _, adapter in batch]
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=max(lengths),
                           min_new_tokens=max(lengths), do_sample=False, pad_token_id=0,
                           streamer=_Streamer(times[first:first + batch_size], lengths))  # fmt: skip
    return start, times, dict(kv_bytes_per_token=_dynamic_cache_bytes_per_token(base))


def _dynamic_cache_bytes_per_token(base):
    config = base.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * base.dtype.itemsize


def summarize(start, times, trace, extra):
    arrivals = [start + arrival for arrival, _, _, _ in trace]
    ttft = np.array([t.first - a for t, a in zip(times, arrivals)]) * 1e3
    tpot = np.array([(t.last - t.first) / (t.count - 1) for t in times if t.count > 1]) * 1e3
    tokens = sum(t.count for t in times)
    expected = sum(outputs for _, _, outputs, _ in trace)
    if tokens != expected:
        raise AssertionError(f"{tokens} output tokens received, {expected} asked for")
    makespan = max(t.last for t in times) - start
    row = dict(output_tokens=tokens, seconds=makespan, output_tokens_per_s=tokens / makespan, **extra)
    for name, values in (("ttft_ms", ttft), ("tpot_ms", tpot)):
        for p in (50, 95, 99):
            row[f"{name}_p{p}"] = float(np.percentile(values, p))
    return row


SAMPLED = dict(temperature=0.8, top_p=0.9, top_k=50)


def run_batch1(base, device, tokens, repeats, prompt_len=32):
    """Time per output token (ms) at batch 1 on the base model: HF generate and the engine, one run of
    each in turn per repeat (a load that drifts over the minutes hits every way alike); the medians,
    and each engine's median over the repeats of its ratio to the HF run beside it. Also the CPU
    time per output token (`_cpu` rows, prefill included) of the thread that runs the model (the
    caller's for HF, the engine's loop thread), which a machine loaded by others inflates far less."""
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, base.config.vocab_size, (prompt_len,), generator=generator).tolist()
    ids = torch.tensor([prompt], device=device)
    rows = {}
    for mode, sampling in (("greedy", {}), ("sampled", SAMPLED)):

        def hf(sampling=sampling):
            times = _Times()
            cpu = time.thread_time()
            with torch.no_grad():
                base.generate(input_ids=ids, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0,
                              do_sample=bool(sampling), **sampling, streamer=_Streamer([times], [tokens]))  # fmt: skip
            return (times.last - times.first) / (times.count - 1), (time.thread_time() - cpu) / tokens

        def engine_run(engine):
            clock = time.pthread_getcpuclockid(engine._thread.ident)  # the loop thread's CPU clock
            cpu = time.clock_gettime(clock)
            output = engine.generate([prompt], params)[0]
            return output.time_per_output_token, (time.clock_gettime(clock) - cpu) / len(output.token_ids)

        params = SamplingParams(max_tokens=tokens, ignore_eos=True, **(sampling or dict(temperature=0)))
        engines = {}
        try:
            for kv_dtype in ("model", "int8"):
                engines[kv_dtype] = Engine(copy.deepcopy(base), kv_dtype=kv_dtype, kv_cache_tokens=4096,
                                           max_batch_tokens=1024)  # fmt: skip
            ways = {"hf_generate": hf} | {f"engine_{kv_dtype}": lambda engine=engine: engine_run(engine)
                                          for kv_dtype, engine in engines.items()}  # fmt: skip
            for run in ways.values():
                run()  # warm-up
            times = {way: [] for way in ways}
            for _ in range(repeats):
                for way, run in ways.items():
                    times[way].append(run())
        finally:
            for engine in engines.values():
                engine.shutdown()
        for suffix, column in (("", 0), ("_cpu", 1)):
            values = {way: np.array([row[column] for row in runs]) for way, runs in times.items()}
            for way, value in values.items():
                rows[f"{way}_{mode}{suffix}"] = float(np.median(value)) * 1e3
            for kv_dtype in engines:
                ratios = values[f"engine_{kv_dtype}"] / values["hf_generate"]
                rows[f"engine_{kv_dtype}_{mode}{suffix}_over_hf"] = float(np.median(ratios))
    return rows


def run_generate_batch(base, repeats=3, prompts=64, tokens=64):
    """Output tokens/s on the base model, every prompt at once: the engine and HF `generate_batch`."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 64, (prompts,), generator=generator).tolist()
    prompts = [torch.randint(3, base.config.vocab_size, (n,), generator=generator).tolist() for n in lengths]

    def best(run):
        run(prompts[:4], 8)  # warm-up
        rates = []
        for _ in range(repeats):
            started = time.perf_counter()
            rates.append(run(prompts, tokens) / (time.perf_counter() - started))
        return max(rates)

    rows = {}
    for kv_dtype in ("int8", "model"):
        engine = Engine(copy.deepcopy(base), kv_dtype=kv_dtype, kv_cache_tokens=16384, max_batch_tokens=4096)
        try:
            rows[f"engine_{kv_dtype}"] = best(lambda batch, n: sum(len(o.token_ids) for o in engine.generate(
                batch, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))))  # fmt: skip
        finally:
            engine.shutdown()
    hf = copy.deepcopy(base)

    def generate_batch(batch, n):
        config = transformers.GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                               eos_token_id=None)  # fmt: skip
        return sum(len(o.generated_tokens) for o in hf.generate_batch(batch, config).values())

    rows["hf_generate_batch"] = best(generate_batch)
    for kv_dtype in ("int8", "model"):
        rows[f"engine_{kv_dtype}_over_generate_batch"] = rows[f"engine_{kv_dtype}"] / rows["hf_generate_batch"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (the GPU check)")
    parser.add_argument("--requests", type=int, help="requests in the trace (CPU 64, GPU 256; --quick: 24 / 96)")
    parser.add_argument("--rate", type=float, help="mean arrivals per second (CPU 16, GPU 64)")
    parser.add_argument("--model", choices=list(MODELS), help="random Llama of these shapes (CPU: tiny, GPU: 1b)")
    parser.add_argument("--adapters", type=int, default=ADAPTERS, help=f"adapters in the trace (default {ADAPTERS})")
    parser.add_argument("--static-batch", type=int, default=8, help="peft_static's batch size")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated subset of {','.join(WAYS)}")
    parser.add_argument("--out", default=RESULTS, help="folder for the JSON and PNG")
    parser.add_argument("--batch1", action="store_true", help="batch 1 on the base model vs HF generate instead")
    parser.add_argument("--batch1-tokens", type=int, default=64, help="--batch1: output tokens per request")
    parser.add_argument("--batch1-repeats", type=int, default=5, help="--batch1: timed runs per way (the median)")
    parser.add_argument("--generate-batch", action="store_true", help="the base model vs HF generate_batch instead")
    parser.add_argument("--threads", type=int, help="torch's intra-op threads (torch.set_num_threads)")
    parser.add_argument("--workload", choices=("trace", "shared-prefix", "long-prompt"), default="trace",
                        help="the 32-adapter trace over the ways; a few system prompts x many user turns, with and "
                             "without the prefix cache; decodes while a long prompt arrives, chunked or not")
    parser.add_argument("--systems", type=int, default=4, help="shared-prefix: system prompts (one adapter each)")
    parser.add_argument("--system-tokens", type=int, help="shared-prefix: tokens per system prompt (CPU 512, GPU 2048)")
    parser.add_argument("--long-prompt-tokens", type=int, help="long-prompt: its tokens (CPU 1536, GPU 4000)")
    parser.add_argument("--decoders", type=int, default=8, help="long-prompt: requests decoding meanwhile")
    parser.add_argument("--max-batch-tokens", type=int, default=256, help="long-prompt: the chunked run's budget")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    requests = args.requests or ((96 if gpu else 24) if args.quick else (256 if gpu else 64))
    rate = args.rate or (64.0 if gpu else 16.0)
    model = args.model or ("1b" if gpu else "tiny")
    config = transformers.LlamaConfig(**MODELS[model], attn_implementation="sdpa")
    config.use_cache = True
    torch.manual_seed(0)
    dtype = torch.bfloat16 if gpu else torch.float32
    # Built on the device in its dtype: an 8B model in float32 on the host takes minutes and 32 GB.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            base = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    if args.batch1 or args.generate_batch:
        os.makedirs(args.out, exist_ok=True)
        report = dict(device=torch.cuda.get_device_name() if gpu else "cpu", torch=torch.__version__,
                      transformers=transformers.__version__, threads=torch.get_num_threads(),
                      model=config.to_diff_dict())  # fmt: skip
        if args.batch1:
            load_before = os.getloadavg()
            rows = run_batch1(base, device, args.batch1_tokens, args.batch1_repeats)
            path = os.path.join(args.out, f"serving_batch1_{device}.json")
            report |= dict(tokens=args.batch1_tokens, repeats=args.batch1_repeats, sampled=SAMPLED, tpot_ms=rows,
                           load_average_before=load_before, load_average_after=os.getloadavg())  # fmt: skip
        else:
            rows = run_generate_batch(base)
            path = os.path.join(args.out, f"serving_generate_batch_{device}.json")
            report |= dict(prompts=64, output_tokens=64, repeats=3, output_tokens_per_s=rows)
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=str)
        if args.batch1:
            groups = {way: {f"{mode}{suffix.replace('_cpu', ' CPU')}": rows[f"{way}_{mode}{suffix}"]
                            for suffix in ("", "_cpu") for mode in ("greedy", "sampled")}
                      for way in ("hf_generate", "engine_model", "engine_int8")}  # fmt: skip
            _bars(groups, path.replace(".json", ".png"), f"batch 1, ms per output token ({report['device']}, "
                  f"{report['threads']} thread(s)): wall clock, and CPU time of the model's thread")
        for name, value in rows.items():
            unit = "x" if "_over_" in name else " ms" if args.batch1 else " tokens/s"
            print(f"{name:>34} {value:10.3f}{unit}")
        print(f"wrote {path}")
        return
    if args.workload != "trace":
        os.makedirs(args.out, exist_ok=True)
        report = dict(device=torch.cuda.get_device_name() if gpu else "cpu", torch=torch.__version__,
                      threads=torch.get_num_threads(), model=config.to_diff_dict())  # fmt: skip
        load_before = os.getloadavg()[0]
        if args.workload == "shared-prefix":
            report.update(_shared_prefix(base, device, requests, rate, args))
            bars = {way: {f"TTFT p{p}": row[f"ttft_ms_p{p}"] for p in (50, 95, 99)}
                    for way, row in report["ways"].items()}  # fmt: skip
        else:
            report.update(_long_prompt(base, device, args))
            bars = {way: {"decode step before": r["itl_before_ms_p50"], "while prefilling p50": r["itl_during_ms_p50"],
                          "while prefilling max": r["itl_during_ms_max"]} for way, r in report["runs"].items()}
        report["load_average_1min"] = dict(before=load_before, after=os.getloadavg()[0])
        stem = os.path.join(args.out, f"serving_{args.workload.replace('-', '_')}_{device}")
        with open(stem + ".json", "w") as f:
            json.dump(report, f, indent=1, default=str)
        _bars(bars, stem + ".png", f"{args.workload}, {report['device']} (ms, lower is better)")
        print(f"wrote {stem}.json and {stem}.png")
        return
    trace = make_trace(requests, rate, 0, 64, 24 if gpu else 12, 128 if gpu else 48, config.vocab_size, args.adapters)
    rows = {}
    process = psutil.Process()
    with tempfile.TemporaryDirectory() as folder:
        paths = make_adapters(base, folder, args.adapters)
        for way in args.ways.split(","):
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            if way.startswith("engine"):
                result = run_engine(base, paths, trace, "int8" if way == "engine_int8" else "model", device)
            elif way == "peft_naive":
                result = run_peft_naive(base, paths, trace, device)
            elif way == "peft_static":
                result = run_peft_static(base, paths, trace, args.static_batch, device)
            else:
                raise SystemExit(f"unknown way {way!r}; choose from {WAYS}")
            rows[way] = summarize(*result[:2], trace, result[2])
            peak_bytes = torch.cuda.max_memory_allocated() if gpu else process.memory_info().rss
            rows[way]["peak_memory_mb"] = peak_bytes / 2**20
            print(f"{way}: {rows[way]['output_tokens_per_s']:.1f} output tokens/s", flush=True)
    for way, row in rows.items():
        for baseline in ("peft_naive", "peft_static"):
            if baseline in rows:
                row[f"speedup_over_{baseline}"] = row["output_tokens_per_s"] / rows[baseline]["output_tokens_per_s"]
    os.makedirs(args.out, exist_ok=True)
    named = f"_{model}" if args.model else ""
    stem = os.path.join(args.out, f"serving_engine_{device}{named}{'_quick' if args.quick else ''}")
    report = dict(device=torch.cuda.get_device_name() if gpu else "cpu", torch=torch.__version__,
                  threads=torch.get_num_threads(), model=config.to_diff_dict(), requests=requests, rate=rate,
                  adapters=args.adapters, static_batch=args.static_batch, ways=rows)  # fmt: skip
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1, default=str)
    _chart(rows, stem + ".png", report["device"])
    print(f"{'way':>13} {'tok/s':>8} {'x naive':>8} {'x static':>8} {'TTFT p50/p95/p99 ms':>24} "
          f"{'TPOT p50/p95/p99 ms':>22} {'KV B/token':>10}")
    for way, r in rows.items():
        print(f"{way:>13} {r['output_tokens_per_s']:>8.1f} {r.get('speedup_over_peft_naive', float('nan')):>8.2f} "
              f"{r.get('speedup_over_peft_static', float('nan')):>8.2f} "
              f"{r['ttft_ms_p50']:>8.0f}/{r['ttft_ms_p95']:.0f}/{r['ttft_ms_p99']:.0f} "
              f"{r['tpot_ms_p50']:>8.1f}/{r['tpot_ms_p95']:.1f}/{r['tpot_ms_p99']:.1f} "
              f"{r['kv_bytes_per_token']:>10.0f}")
    print(f"wrote {stem}.json and {stem}.png")


def _shared_prefix(base, device, requests, rate, args):
    """The shared-prefix trace through the int8 engine with and without its prefix cache."""
    system_tokens = args.system_tokens or (2048 if device == "cuda" else 512)
    trace = make_shared_prefix_trace(requests, rate, 0, args.systems, system_tokens, 8, base.config.vocab_size)
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        paths = make_adapters(base, folder)
        for way, caching in (("prefix_cache", True), ("no_prefix_cache", False)):
            result = run_engine(base, paths, trace, "int8", device, enable_prefix_caching=caching)
            rows[way] = summarize(*result[:2], trace, result[2])
    ratio = rows["prefix_cache"]["ttft_ms_p50"] / rows["no_prefix_cache"]["ttft_ms_p50"]
    print(f"{'way':>16} {'tok/s':>8} {'TTFT p50/p95/p99 ms':>24} {'hits/queries':>14}")
    for way, r in rows.items():
        print(f"{way:>16} {r['output_tokens_per_s']:>8.1f} {r['ttft_ms_p50']:>8.0f}/{r['ttft_ms_p95']:.0f}/"
              f"{r['ttft_ms_p99']:.0f} {r['prefix_cache_hits']:>7}/{r['prefix_cache_queries']}")
    print(f"TTFT p50 with the prefix cache / without: {ratio:.2f}x")
    return dict(workload="shared-prefix", requests=requests, rate=rate, systems=args.systems,
                system_tokens=system_tokens, ways=rows, ttft_p50_cache_over_no_cache=ratio)  # fmt: skip


def _long_prompt(base, device, args):
    """Decode step times while a long prompt arrives: chunked under `--max-batch-tokens` and in one step."""
    prompt_tokens = args.long_prompt_tokens or (4000 if device == "cuda" else 1536)
    runs = {}
    for way, budget in (("chunked", args.max_batch_tokens), ("one_step", prompt_tokens + args.decoders)):
        run_long_prompt(base, device, budget, min(prompt_tokens, 256), args.decoders)  # warm-up
        runs[way] = run_long_prompt(base, device, budget, prompt_tokens, args.decoders)
    print(f"{'way':>9} {'budget':>7} {'ITL before p50':>15} {'while prefilling p50/max':>25} {'long TTFT':>10} (ms)")
    for way, r in runs.items():
        print(f"{way:>9} {r['max_batch_tokens']:>7} {r['itl_before_ms_p50']:>15.1f} "
              f"{r['itl_during_ms_p50']:>12.1f}/{r['itl_during_ms_max']:<12.1f} {r['long_prompt_ttft_ms']:>10.0f}")
    ratio = runs["chunked"]["itl_during_ms_max"] / runs["one_step"]["itl_during_ms_max"]
    print(f"longest decode step while the prompt prefills, chunked / one step: {ratio:.2f}x")
    return dict(workload="long-prompt", long_prompt_tokens=prompt_tokens, decoders=args.decoders, runs=runs,
                itl_during_max_chunked_over_one_step=ratio)


def _bars(groups, path, title):
    """One group of bars per way: {way: {label: ms}}."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = list(next(iter(groups.values())))
    width = 0.8 / len(labels)
    for offset, label in enumerate(labels):
        ax.bar(np.arange(len(groups)) + (offset - (len(labels) - 1) / 2) * width,
               [values[label] for values in groups.values()], width, label=label)  # fmt: skip
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _chart(rows, path, device_name):
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    names = list(rows)
    axes[0].bar(names, [rows[n]["output_tokens_per_s"] for n in names])
    axes[0].set_title("output tokens/s (higher is better)", fontsize=8)
    for ax, metric in zip(axes[1:], ("ttft_ms", "tpot_ms")):
        for offset, p in enumerate((50, 95, 99)):
            ax.bar(np.arange(len(names)) + (offset - 1) * 0.27, [rows[n][f"{metric}_p{p}"] for n in names], 0.27,
                   label=f"p{p}")  # fmt: skip
        ax.set_xticks(range(len(names)), names)
        ax.set_yscale("log")
        ax.set_title(f"{metric} (lower is better)", fontsize=8)
        ax.legend(fontsize=6)
    for ax in axes:
        ax.tick_params(labelsize=6)
    fig.suptitle(f"32 adapters, one trace, {device_name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

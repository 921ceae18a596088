"""The `fused-train` command.

    fused-train serve --model DIR --adapter support=adapters/support --adapter-dir adapters --port 8000

    fused-train eval --model DIR --adapter support=adapters/support --data eval.jsonl --kv-dtype int8 \
        --quantize-base 8 --fail-if-worse 3

`serve` starts the OpenAI-compatible server (`fused_train.serving.server`) over an `Engine` on the
Hugging Face model directory `--model`, with the peft adapters of `--adapter NAME=PATH` loaded at
start; `--adapter-dir DIR` (repeatable) lets clients load more from under DIR at run time; `--route
NAME=ARM:WEIGHT,...` (repeatable) serves model NAME by its arms (adapters or the base model) split
by weight, sticky by the request's `user` (`fused_train.serving.routing`).
`eval` measures the base model and each adapter on a JSONL file, under each variant asked for, and
prints the table (`fused_train.evaluation` has the metrics, the variants and the gate).
Also runnable as `python -m fused_train.cli serve ...`.
"""

import argparse
import os
import sys

from fused_train.serving.loading import DTYPES, open_engine
from fused_train.serving.routing import parse_route


def _adapter_spec(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter takes NAME=PATH, got {text!r}")
    return name, path


def _route_spec(text: str):
    try:
        return parse_route(text)
    except ValueError as error:  # said before the model loads
        raise argparse.ArgumentTypeError(str(error)) from error


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fused-train", description="fused_train command line")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="an OpenAI-compatible server of a model and its LoRA adapters")
    serve.add_argument("--model", required=True, help="Hugging Face model directory (model + tokenizer)")
    serve.add_argument("--adapter", action="append", type=_adapter_spec, default=[], metavar="NAME=PATH",
                       help="a peft adapter (safetensors) loaded at start, as model NAME; repeatable")  # fmt: skip
    serve.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                       help="/v1/load_lora_adapter may load from under DIR; repeatable (none: off)")  # fmt: skip
    serve.add_argument("--route", action="append", type=_route_spec, default=[], metavar="NAME=ARM:WEIGHT,...",
                       help="model NAME served by these arms (adapters or the base model) split by weight, "
                            "sticky by the request's user; e.g. assistant=v1:90,v2:10; repeatable")  # fmt: skip
    serve.add_argument("--quality-window", type=int, default=100,
                       help="requests per model in /metrics' quality signals and drift windows")  # fmt: skip
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0: a free port (the URL is printed)")
    serve.add_argument("--served-model-name", help="the base model's `model` name (default: the directory's name)")
    serve.add_argument("--api-key", default=os.environ.get("FUSED_TRAIN_API_KEY"),
                       help="require Authorization: Bearer KEY on /v1 (default: $FUSED_TRAIN_API_KEY)")  # fmt: skip
    serve.add_argument("--max-loras", type=int, default=8, help="adapters on the device at once (one step's most)")
    serve.add_argument("--device", help="where the model runs (default: cuda when there is a GPU, else cpu)")
    serve.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on CUDA, float32 on the CPU")
    serve.add_argument("--kv-dtype", choices=["int8", "model"], default="int8")
    serve.add_argument("--kv-cache-tokens", type=int, help="tokens the paged KV cache holds (default 65536)")
    serve.add_argument("--max-batch-tokens", type=int, default=4096,
                       help="tokens one step runs; longer prompts are prefilled in chunks")  # fmt: skip
    serve.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                       help="compute every prompt in full, not reusing the cached pages of a shared prefix")
    serve.add_argument("--max-waiting", type=int, default=1024, help="queued requests at most; beyond: 429")
    serve.add_argument("--max-model-len", type=int,
                       help="prompt + max_tokens at most (default and most: the model's max_position_embeddings)")
    serve.add_argument("--max-body-bytes", type=int, default=8 * 2**20, help="request bodies at most; beyond: 413")
    serve.add_argument("--drain-timeout", type=float, default=30, help="seconds running requests get at shutdown")
    serve.add_argument("--log-level", default="info")

    eval_parser = commands.add_parser(
        "eval", help="quality of a model and its LoRA adapters, per variant, and a quality gate",
        description="Perplexity on references, exact match, ROUGE-L and choice accuracy of the base model and "
                    "each adapter, through the engine (all of a variant's requests in one batched run). Variant "
                    "'full' (the model's dtype, KV cache included) always runs; --kv-dtype and --quantize-base add "
                    "one variant each. Every row shows its relative change against its reference row: a variant's "
                    "row against the same model's 'full' row; in 'full', an adapter's row against the base "
                    "model's.",
    )  # fmt: skip
    eval_parser.add_argument("--model", required=True, help="Hugging Face model directory (model + tokenizer)")
    eval_parser.add_argument("--adapter", action="append", type=_adapter_spec, default=[], metavar="NAME=PATH",
                             help="a peft adapter (safetensors) evaluated as row NAME; repeatable")  # fmt: skip
    eval_parser.add_argument("--data", required=True, metavar="FILE.jsonl",
                             help='one example per line: {"prompt", "reference"} and/or '
                                  '{"prompt", "choices", "answer"} (answer: index of the right choice)')  # fmt: skip
    eval_parser.add_argument("--kv-dtype", choices=["int8"], action="append", default=[],
                             help="add the variant kv_int8: int8 KV cache pages (variant 'full' has the model's dtype)")
    eval_parser.add_argument("--quantize-base", type=int, choices=[8, 4], action="append", default=[],
                             help="add the variant base_int8 or base_int4: the decoder's linear layers stored int8 or "
                                  "int4 (lm_head and embeddings float); repeatable")  # fmt: skip
    eval_parser.add_argument("--fail-if-worse", type=float, metavar="PCT",
                             help="exit with status 1 when a row is worse than its reference row (see above) by more "
                                  "than PCT percent, relative, on any metric (perplexity: higher is worse; the "
                                  "others: lower), or a value is not finite")  # fmt: skip
    eval_parser.add_argument("--max-tokens", type=int,
                             help="tokens each generation runs at most (default: as many as its reference has)")
    eval_parser.add_argument("--out", default="eval_results", help="folder for eval.json and eval.png")
    eval_parser.add_argument("--device", help="where the model runs (default: cuda when there is a GPU, else cpu)")
    eval_parser.add_argument("--dtype", choices=DTYPES, default="auto",
                             help="auto: bfloat16 on CUDA, float32 on the CPU")  # fmt: skip
    return parser


def serve(args) -> None:
    """Serve until SIGINT or SIGTERM; then new requests get 503 while the running ones finish."""
    import signal
    import threading

    from fused_train.serving.server import build_app, start_server

    names = [name for name, _ in args.adapter]
    if len(set(names)) != len(names):
        raise SystemExit(f"fused-train serve: --adapter names must differ, got {names}")
    adapters = dict(args.adapter)
    model_name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    engine = open_engine(args.model, adapters, device=args.device, dtype=args.dtype, max_loras=args.max_loras,
                         kv_dtype=args.kv_dtype, kv_cache_tokens=args.kv_cache_tokens,
                         max_batch_tokens=args.max_batch_tokens, max_waiting=args.max_waiting,
                         max_model_len=args.max_model_len,
                         enable_prefix_caching=args.enable_prefix_caching)  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        app = build_app(engine, model_name=model_name, adapter_dirs=args.adapter_dir, api_key=args.api_key,
                        adapter_paths=adapters, max_body_bytes=args.max_body_bytes, routes=args.route,
                        quality_window=args.quality_window)  # fmt: skip
        server = start_server(app, args.host, args.port, log_level=args.log_level)
    except BaseException:
        engine.shutdown(drain=False)
        raise
    routes = f" and routes {[route.name for route in args.route]}" if args.route else ""
    print(f"fused-train: serving {model_name!r} with adapters {names}{routes} at {server.url}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
        try:
            engine.shutdown(drain=True, timeout=args.drain_timeout)
        except TimeoutError:
            print(f"fused-train: requests still running after {args.drain_timeout} s are cut", flush=True)
    finally:
        server.stop()


def evaluate(args) -> int:
    """Print the table, write eval.json and eval.png; 1 when --fail-if-worse fails a row, else 0."""
    import json

    from fused_train import evaluation

    names = [name for name, _ in args.adapter]
    if len(set(names)) != len(names):
        raise ValueError(f"--adapter names must differ, got {names}")
    if args.fail_if_worse is not None and not args.fail_if_worse >= 0:
        raise ValueError(f"--fail-if-worse must be a percentage >= 0, got {args.fail_if_worse}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    examples = evaluation.load_examples(args.data)
    variants = [evaluation.REFERENCE_VARIANT, *dict.fromkeys(
        ["kv_int8"] * bool(args.kv_dtype) + [f"base_int{bits}" for bits in args.quantize_base])]  # fmt: skip
    adapters = dict(args.adapter)
    results = evaluation.evaluate(args.model, adapters, examples, variants, max_tokens=args.max_tokens,
                                  device=args.device, dtype=args.dtype)  # fmt: skip
    print(evaluation.format_table(results))
    failures = [] if args.fail_if_worse is None else evaluation.gate(results, args.fail_if_worse)
    report = dict(model=args.model, adapters=adapters, data=dict(path=args.data, examples=len(examples)),
                  variants={v: evaluation.VARIANTS[v] for v in variants}, results=results,
                  comparisons=evaluation.comparisons(results),
                  gate=dict(fail_if_worse_percent=args.fail_if_worse, failures=failures))  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    json_path, png_path = os.path.join(args.out, "eval.json"), os.path.join(args.out, "eval.png")
    with open(json_path, "w") as file:
        json.dump(report, file, indent=1)
    evaluation.plot(results, png_path)
    print(f"wrote {json_path} and {png_path}")
    for failure in failures:
        print(f"fused-train eval: FAIL {failure}", file=sys.stderr)
    if args.fail_if_worse is not None and not failures:
        print(f"fused-train eval: every row within {args.fail_if_worse:g}% of its reference")
    return 1 if failures else 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            serve(args)
            return 0
        return evaluate(args)
    except (ValueError, ImportError) as error:  # a bad model, adapter, option or file; a missing extra
        raise SystemExit(f"fused-train {args.command}: {error}") from error


if __name__ == "__main__":
    sys.exit(main())

"""The `fused-train` command.

    fused-train serve --model DIR --adapter support=adapters/support --adapter-dir adapters --port 8000

`serve` starts the OpenAI-compatible server (`fused_train.serving.server`) over an `Engine` on the
Hugging Face model directory `--model`, with the peft adapters of `--adapter NAME=PATH` loaded at
start; `--adapter-dir DIR` (repeatable) lets clients load more from under DIR at run time; `--route
NAME=ARM:WEIGHT,...` (repeatable) serves model NAME by its arms (adapters or the base model) split
by weight, sticky by the request's `user` (`fused_train.serving.routing`).
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


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            serve(args)
    except ValueError as error:  # a bad model, adapter or option: said without a traceback
        raise SystemExit(f"fused-train {args.command}: {error}") from error


if __name__ == "__main__":
    sys.exit(main())

"""The `fused-train` command.

    fused-train serve --model DIR --adapter support=adapters/support --adapter-dir adapters --port 8000

`serve` starts the OpenAI-compatible server (`fused_train.serving.server`) over an `Engine` on the
Hugging Face model directory `--model`, with the peft adapters of `--adapter NAME=PATH` loaded at
start; `--adapter-dir DIR` (repeatable) lets clients load more from under DIR at run time.
Also runnable as `python -m fused_train.cli serve ...`.
"""

import argparse
import os
import sys


def open_engine(model_path, adapters=None, **engine_options):
    """An `Engine` over the model and tokenizer in the Hugging Face directory `model_path`, with
    `adapters` (name -> peft adapter directory) loaded; `engine_options` go to `Engine`."""
    import transformers

    from fused_train.serving import Engine

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path)
    return Engine(model, tokenizer, adapters=dict(adapters or {}), **engine_options)

"""Packed training: the packing planner (packing), collation into packed rows (collator),
token-balanced batches per rank (batch_sampler), the trainer and its telemetry callback (trainer,
callbacks, telemetry) and the exact token count across processes (token_count). The public names
are re-exported by `fused_train`; `trainer` and `callbacks` import transformers.Trainer, so
`fused_train` loads them on first use.
"""

"""`AdapterPool`: peft LoRA adapters served to a plain transformers model, many adapters in one batch.

Tiers. `load(name, path)` reads and validates a peft adapter directory into host memory, the CPU
tier (at most `max_cpu_loras` adapters; the least recently used is dropped first, stays
registered, and is read from its directory again when next needed). A batch's adapters are copied
into device slots (at most `max_loras`; the least recently used unpinned one is evicted first) by
`slots_for` or `pin`. Every linear layer that some loaded adapter targets holds the stacked slots
`lora_a [max_loras, max_rank, in]`, `lora_b [max_loras, out, max_rank]`, `ranks` and `scalings`;
a slot whose adapter does not target that layer has rank 0 there.

Forward. `token_slots = pool.slots_for(names, num_tokens)` gives one slot per token of the
flattened batch (`-1` for the base model); a forward run under `with pool.activate(token_slots):`
computes every targeted layer with `fused_train.multi_lora_linear`, one call per layer whatever
the number of adapters. Layers that no adapter of the batch targets, and every layer outside the
context, run their own forward: the model is the plain base. The layers are attached by an
instance-level `forward` (nothing is added to parameters, buffers or `state_dict`); `close()`
removes them.

Leases, the rule that lets loads run while a batch runs: a slot is leased while a tensor that
`slots_for` returned and that names it is alive, and while an `activate` context naming it runs.
A leased slot is never evicted or overwritten, so a batch reads the adapters its `slots_for`
gave it, whatever other threads load, pin or evict meanwhile. `unload` of a leased adapter
unregisters it at once; its slot keeps its weights until the leases end. When a batch needs a
slot and every slot is pinned or leased, `slots_for`/`pin` raise `NoFreeSlot` and change nothing.
On CUDA slots are filled on a side stream, so the copies overlap the running step; a batch waits
(on the device) for its slots' copies, and a copy into a slot waits for the last batch that read it.
All bookkeeping holds one lock; a file read that `slots_for` needs (a CPU-tier miss) holds it too.

Versions, the rule that lets a request outlive an unload or a reload: each `load` registers a new
`AdapterVersion` of its name. `acquire(name)` gives the current version and holds it until
`release`; `slots_for` takes versions as well as names, so a request that acquired at its start
reads the same weights at every step. `unload(name)` unregisters the name at once (a new
`acquire` or `slots_for(name)` raises `UnknownAdapter`), but a held version stays, draining, until
its last holder releases it; a `load` under the same name meanwhile is another version. A CPU-tier
miss re-reads the adapter's files only if they are as they were at `load`, never other weights.

Files. An adapter directory is read and validated whole by `adapter_files.read_adapter` (safetensors
only, never unpickled; module names, shapes, ranks up to `max_rank`, finite float values) before it
is registered: a failed `load` raises `ValueError` saying what is wrong and leaves the pool as it was.
"""

import contextlib
import contextvars
import itertools
import os
import threading
import time
import weakref
from collections import Counter, OrderedDict
from typing import NamedTuple

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTunerLayer

from fused_train.kernels.lora_ref import MAX_RANK
from fused_train.hf.peft_lora import BASE_ADAPTER
from fused_train.ops.checks import check_int, describe
from fused_train.ops.multi_lora import SlotPlan, multi_lora_linear, plan_slots
from fused_train.serving.adapter_files import CONFIG_FILE, WEIGHTS_FILE  # noqa: F401 (importable here before)
from fused_train.serving.adapter_files import HostAdapter, file_stamps, read_adapter

_POOL_ATTRIBUTE = "_fused_train_adapter_pool"


class NoFreeSlot(RuntimeError):
    """A batch needs a device slot for an adapter, and every slot is pinned or leased."""


class UnknownAdapter(ValueError):
    """No adapter of that name is loaded (never was, or was unloaded)."""


class AdapterVersion(NamedTuple):
    """One `load` of an adapter: its `name` and the pool's load counter (see "Versions")."""

    name: str
    number: int


class _Batch(NamedTuple):
    token_slots: torch.Tensor
    slots: frozenset[int]
    plan: SlotPlan  # the tokens grouped by slot, once for every layer of the forward


class _LayerSlots:
    """The device slots of one linear layer, and the forward that reads them."""

    def __init__(self, layer: nn.Linear, batch: contextvars.ContextVar, num_slots: int, max_rank: int):
        weight = layer.weight
        self.layer = layer
        self.batch = batch
        # Never inference tensors (a first fill may run under inference mode): the op's reference
        # path caches a padded copy of the stacks by their version counters, which those lack.
        # A base that `fused_train.quantize_base` stored int8 or int4: its adapters stay float32 (the op's
        # other allowed dtype), whatever the activations' dtype.
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        with torch.inference_mode(False):
            device = weight.device
            self.lora_a = torch.zeros(num_slots, max_rank, layer.in_features, dtype=dtype, device=device)
            self.lora_b = torch.zeros(num_slots, layer.out_features, max_rank, dtype=dtype, device=device)
            self.ranks = torch.zeros(num_slots, dtype=torch.int32, device=device)
            self.scalings = torch.zeros(num_slots, dtype=torch.float32, device=device)
        # Slots with rank > 0 here; replaced, never mutated, so a running forward reads a consistent set.
        self.targeted = frozenset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.batch.get()
        if batch is None or batch.slots.isdisjoint(self.targeted):
            return type(self.layer).forward(self.layer, x)
        layer = self.layer
        # The pool checked the slots once per batch; the op need not read them back per layer.
        return multi_lora_linear(
            x, layer.weight, self.lora_a, self.lora_b, batch.token_slots, self.scalings, self.ranks, bias=layer.bias,
            weight_scale=getattr(layer, "weight_scale", None), weight_offset=getattr(layer, "weight_offset", None),
            check_values=False, slot_plan=batch.plan,
        )  # fmt: skip


class AdapterPool:
    """peft LoRA adapters for `model` (a plain transformers model): `max_loras` device slots, a CPU
    tier of `max_cpu_loras` adapters, ranks up to `max_rank`. See the module docstring."""

    def __init__(self, model: nn.Module, *, max_loras: int, max_cpu_loras: int, max_rank: int):
        check_int(max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_rank=max_rank)
        if max_rank > MAX_RANK:
            raise ValueError(f"max_rank must be at most {MAX_RANK} (multi_lora_linear's largest rank), got {max_rank}")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if any(isinstance(module, BaseTunerLayer) for module in model.modules()):
            raise ValueError("model is a peft model; AdapterPool serves adapters on the plain base model")
        if getattr(model, _POOL_ATTRIBUTE, None) is not None:
            raise ValueError("model already has an AdapterPool; close() it first")
        parameter = next(model.parameters(), None)
        if parameter is None:
            raise ValueError("model has no parameters")
        self.max_loras, self.max_cpu_loras, self.max_rank = max_loras, max_cpu_loras, max_rank
        self._model = model
        self._modules = dict(model.named_modules())
        self._device = parameter.device
        self._lock = threading.RLock()
        self._batch = contextvars.ContextVar("adapter_pool_batch", default=None)
        self._current: dict[str, AdapterVersion] = {}  # registered names, in load order
        self._files: dict[AdapterVersion, tuple[str, tuple]] = {}  # every live version: its path and files
        self._holds: Counter[AdapterVersion] = Counter()
        self._versions = itertools.count()
        self._host: OrderedDict[AdapterVersion, HostAdapter] = OrderedDict()  # CPU tier, least recently used first
        self._resident: OrderedDict[AdapterVersion, int] = OrderedDict()  # -> slot, least recently used first
        self._owner: list[AdapterVersion | None] = [None] * max_loras
        self._pinned: set[AdapterVersion] = set()
        self._leases: Counter[int] = Counter()
        self._handed_out: dict[int, frozenset[int]] = {}  # id(token_slots) -> its slots, while it lives
        self._layers: dict[str, _LayerSlots] = {}
        self._counts = Counter(hits=0, loads=0, evictions=0, disk_reads=0, cpu_evictions=0)
        self._load_ms = 0.0
        on_cuda = self._device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self._device) if on_cuda else None
        self._ready: list[torch.cuda.Event | None] = [None] * max_loras  # a slot's last copy
        self._last_read: list[torch.cuda.Event | None] = [None] * max_loras  # the last batch that read a slot
        setattr(model, _POOL_ATTRIBUTE, self)

    # Registration.

    def load(self, name: str, path: str | os.PathLike) -> None:
        """Register the peft adapter in directory `path` as `name`, validated, into the CPU tier.

        It takes a device slot when a batch first needs it (`slots_for`) or when pinned."""
        if not isinstance(name, str) or not name or name == BASE_ADAPTER:
            raise ValueError(f"name must be a non-empty str other than {BASE_ADAPTER!r}, got {name!r}")
        path = os.fspath(path)
        with self._lock:
            self._check_new(name)
        adapter = self._read(path)  # outside the lock: other threads keep scheduling batches meanwhile
        with self._lock:
            self._check_new(name)
            self._counts["disk_reads"] += 1
            version = self._current[name] = AdapterVersion(name, next(self._versions))
            self._files[version] = (path, adapter.files)
            self._keep_on_host(version, adapter)

    def unload(self, name: str) -> None:
        """Forget `name` (pinned or not). Batches already holding its slot keep it until their leases
        end; requests holding its version (`acquire`) keep it until they `release` it."""
        with self._lock:
            version = self._version(name)
            del self._current[name]
            self._pinned.discard(version)
            if not self._holds[version]:
                self._drop(version)

    def acquire(self, name: str) -> AdapterVersion:
        """The current version of `name`, held (kept, even through `unload`) until `release`."""
        with self._lock:
            version = self._version(name)
            self._holds[version] += 1
            return version

    def release(self, version: AdapterVersion) -> None:
        with self._lock:
            self._holds[version] -= 1
            if self._holds[version] <= 0:
                del self._holds[version]
                if self._current.get(version.name) != version:  # unloaded meanwhile: it has drained
                    self._drop(version)

    def pin(self, name: str) -> None:
        """Give `name` a device slot now and never evict it until `unpin`. Raises `NoFreeSlot` when
        every slot is pinned or leased."""
        with self._lock:
            version = self._version(name)
            self._make_resident([version])
            self._pinned.add(version)

    def unpin(self, name: str) -> None:
        with self._lock:
            self._pinned.discard(self._version(name))

    def names(self) -> list[str]:
        """The registered adapters, in load order."""
        with self._lock:
            return list(self._current)

    def stats(self) -> dict:
        """Counts since construction: `hits` (a batch's adapter already in a slot), `loads` (slots
        filled), `evictions` (of device slots), `disk_reads` (files read, by `load` and by CPU-tier
        misses), `cpu_evictions`; `load_ms`, host milliseconds spent filling slots (file re-reads
        included; on CUDA the copies themselves run on a side stream); and the current tiers:
        `resident` and `host` (least recently used first), `pinned`, `leased_slots`, and `draining`:
        name -> holders of an unloaded (or reloaded) version that is still held."""
        with self._lock:
            draining = Counter()
            for version, count in self._holds.items():
                if self._current.get(version.name) != version:
                    draining[version.name] += count
            return {
                **self._counts,
                "load_ms": self._load_ms,
                "resident": [version.name for version in self._resident],
                "host": [version.name for version in self._host],
                "pinned": sorted(version.name for version in self._pinned),
                "leased_slots": sorted(slot for slot, count in self._leases.items() if count),
                "draining": dict(draining),
            }

    # Batches.

    def slots_for(self, names, num_tokens=None) -> torch.Tensor:
        """int32 slots on the model's device for a batch: one per entry of `names` (an adapter name, an
        `AdapterVersion`, or None / "__base__" for the base model), or, with `num_tokens` (one count per entry), each
        entry's slot repeated that many times: per-token slots for a flat batch of requests, or
        `num_tokens=[seq_len] * batch` for a padded `[batch, seq_len]` one.

        Missing adapters are copied into slots, evicting the least recently used unpinned, unleased
        ones; the returned tensor leases its slots while it lives (see the module docstring)."""
        names = list(names)
        for entry in names:
            if entry is not None and not isinstance(entry, (str, AdapterVersion)):
                raise ValueError(f"names must hold adapter names (str), AdapterVersions or None, got {entry!r}")
        if num_tokens is not None:
            num_tokens = list(num_tokens)
            if len(num_tokens) != len(names) or any(
                not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in num_tokens
            ):
                raise ValueError(f"num_tokens must hold one int >= 0 per name ({len(names)}), got {num_tokens!r}")
        wanted = list(dict.fromkeys(entry for entry in names if entry not in (None, BASE_ADAPTER)))
        if len(wanted) > self.max_loras:
            raise ValueError(f"names holds {len(wanted)} distinct adapters, more than max_loras={self.max_loras}")
        with self._lock:
            version_of = {entry: self._live(entry) for entry in wanted}
            self._make_resident(list(dict.fromkeys(version_of.values())))
            slot_of = {entry: self._resident[version] for entry, version in version_of.items()}
            row_slots = torch.tensor([slot_of.get(entry, -1) for entry in names], dtype=torch.int32)
            if num_tokens is not None:
                row_slots = row_slots.repeat_interleave(torch.tensor(num_tokens, dtype=torch.int64))
            token_slots = row_slots.to(self._device)
            slots = frozenset(slot_of.values())
            self._lease(slots)
            self._handed_out[id(token_slots)] = slots
            weakref.finalize(token_slots, self._end_lease, id(token_slots), slots).atexit = False
        return token_slots

    @contextlib.contextmanager
    def activate(self, token_slots: torch.Tensor):
        """Within the context, forwards of the model apply each token's adapter: `token_slots` int32
        `[tokens]` on the model's device, one per token of the flattened batch (`input_ids.numel()`
        order), as `slots_for` gives. A tensor built elsewhere is checked against the slots' owners
        (one device sync). The op is forward-only: run the model under `torch.inference_mode()` or
        `torch.no_grad()`."""
        if not isinstance(token_slots, torch.Tensor) or token_slots.dtype != torch.int32 or token_slots.dim() != 1:
            raise ValueError(f"token_slots must be a 1-D int32 tensor, got {describe(token_slots)}")
        if token_slots.device != self._device:
            raise ValueError(f"token_slots is on {token_slots.device}, the model on {self._device}")
        with self._lock:
            slots = self._handed_out.get(id(token_slots))
            if slots is None:
                slots = self._slots_named_by(token_slots)
            self._lease(slots)
            ready = [self._ready[slot] for slot in slots if self._ready[slot] is not None]
        if ready:
            stream = torch.cuda.current_stream(self._device)
            for event in ready:
                stream.wait_event(event)
        reset = self._batch.set(_Batch(token_slots, slots, plan_slots(token_slots, self.max_loras)))
        try:
            yield
        finally:
            self._batch.reset(reset)
            with self._lock:
                if self._copy_stream is not None:
                    read = torch.cuda.Event()
                    read.record(torch.cuda.current_stream(self._device))
                    for slot in slots:
                        self._last_read[slot] = read
                self._end_lease(None, slots)

    def close(self) -> None:
        """Give every attached layer its own forward back and drop the slots: the model is the plain
        base again, and another pool may be made on it."""
        with self._lock:
            if self._copy_stream is not None:
                torch.cuda.synchronize(self._device)  # the slots' memory is freed below
            for name in self._layers:
                del self._modules[name].forward
            self._layers.clear()
            self._current.clear()
            self._files.clear()
            self._holds.clear()
            self._host.clear()
            self._resident.clear()
            self._pinned.clear()
            self._owner = [None] * self.max_loras
            if getattr(self._model, _POOL_ATTRIBUTE, None) is self:
                delattr(self._model, _POOL_ATTRIBUTE)

    # Internals; the lock is held.

    def _check_new(self, name: str) -> None:
        if name in self._current:
            path = self._files[self._current[name]][0]
            raise ValueError(f"adapter {name!r} is already loaded (from {path!r}); unload it first")

    def _version(self, name) -> AdapterVersion:
        if name not in self._current:
            raise UnknownAdapter(f"unknown adapter {name!r}; loaded: {', '.join(self._current) or 'none'}")
        return self._current[name]

    def _live(self, entry) -> AdapterVersion:
        """A name's current version, or a version still registered or held."""
        if not isinstance(entry, AdapterVersion):
            return self._version(entry)
        if entry not in self._files:
            raise UnknownAdapter(f"adapter {entry.name!r} (version {entry.number}) was unloaded and is not held")
        return entry

    def _drop(self, version: AdapterVersion) -> None:
        del self._files[version]
        self._host.pop(version, None)
        slot = self._resident.pop(version, None)
        if slot is not None:
            self._owner[slot] = None

    def _make_resident(self, wanted: list[AdapterVersion]) -> None:
        missing = [name for name in wanted if name not in self._resident]
        keep = set(wanted)
        free = [slot for slot, owner in enumerate(self._owner) if owner is None and not self._leases[slot]]
        evictable = [
            name
            for name, slot in self._resident.items()
            if name not in self._pinned and name not in keep and not self._leases[slot]
        ]
        if len(missing) > len(free) + len(evictable):
            leased = sum(1 for count in self._leases.values() if count)
            raise NoFreeSlot(
                f"{len(missing)} adapter(s) need a device slot and {len(free) + len(evictable)} can be had: of "
                f"{self.max_loras} slots, {len(self._pinned)} hold pinned adapters and {leased} are leased by batches"
            )
        start = time.perf_counter()
        adapters = [self._host_copy(name) for name in missing]  # may raise ValueError: no slot changed yet
        for name, adapter in zip(missing, adapters):
            if free:
                slot = free.pop(0)
            else:
                slot = self._resident.pop(evictable.pop(0))
                self._counts["evictions"] += 1
            self._fill(slot, name, adapter)
        self._counts["hits"] += len(wanted) - len(missing)
        self._counts["loads"] += len(missing)
        for name in wanted:
            self._resident.move_to_end(name)
        if missing:
            self._load_ms += (time.perf_counter() - start) * 1e3

    def _host_copy(self, version: AdapterVersion) -> HostAdapter:
        adapter = self._host.get(version)
        if adapter is None:
            path, files = self._files[version]
            if file_stamps(path) != files:
                raise ValueError(
                    f"the files of adapter {version.name!r} in {path!r} changed since it was loaded: they would "
                    "give other weights; unload it and load it again"
                )
            adapter = self._read(path)
            self._counts["disk_reads"] += 1
            self._keep_on_host(version, adapter)
        self._host.move_to_end(version)
        return adapter

    def _keep_on_host(self, version: AdapterVersion, adapter: HostAdapter) -> None:
        self._host[version] = adapter
        while len(self._host) > self.max_cpu_loras:
            self._host.popitem(last=False)
            self._counts["cpu_evictions"] += 1

    def _fill(self, slot: int, version: AdapterVersion, adapter: HostAdapter) -> None:
        with self._copying_into(slot):
            for module_name in adapter.modules:
                if module_name not in self._layers:
                    layer = self._modules[module_name]
                    self._layers[module_name] = slots = _LayerSlots(layer, self._batch, self.max_loras, self.max_rank)
                    layer.forward = slots.forward
            for module_name, layer in self._layers.items():
                lora_a, lora_b, scaling = adapter.modules.get(module_name, (None, None, 0.0))
                rank = 0 if lora_a is None else lora_a.shape[0]
                if lora_a is not None:
                    layer.lora_a[slot, :rank].copy_(lora_a, non_blocking=True)
                    layer.lora_b[slot, :, :rank].copy_(lora_b, non_blocking=True)
                # The op asks for zero padding (it reads only `rank` rows, but a slot then holds exactly its adapter).
                layer.lora_a[slot, rank:].zero_()
                layer.lora_b[slot, :, rank:].zero_()
                layer.ranks[slot].fill_(rank)
                layer.scalings[slot].fill_(scaling)
                layer.targeted = layer.targeted | {slot} if rank else layer.targeted - {slot}
        self._owner[slot] = version
        self._resident[version] = slot

    @contextlib.contextmanager
    def _copying_into(self, slot: int):
        if self._copy_stream is None:
            yield
            return
        with torch.cuda.stream(self._copy_stream):
            if self._last_read[slot] is not None:
                self._copy_stream.wait_event(self._last_read[slot])
            yield
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
            self._ready[slot] = ready

    def _slots_named_by(self, token_slots: torch.Tensor) -> frozenset[int]:
        slots = frozenset(token_slots.unique().tolist()) - {-1}
        for slot in sorted(slots):
            if not 0 <= slot < self.max_loras:
                raise ValueError(f"token_slots holds slot {slot}, outside -1..{self.max_loras - 1}")
            if self._owner[slot] is None:
                raise ValueError(f"token_slots names slot {slot}, which holds no adapter")
        return slots

    def _lease(self, slots: frozenset[int]) -> None:
        self._leases.update(slots)

    def _end_lease(self, tensor_id: int | None, slots: frozenset[int]) -> None:
        with self._lock:
            if tensor_id is not None:
                del self._handed_out[tensor_id]
            self._leases.subtract(slots)

    # Reading an adapter's files (no pool state is touched).

    def _read(self, path: str) -> HostAdapter:
        adapter = read_adapter(path, self._modules, max_rank=self.max_rank, attached=self._layers)
        if self._device.type != "cuda":
            return adapter
        # Pinned, so a slot's copy from the CPU tier runs asynchronously on the copy stream.
        pinned = {name: (a.pin_memory(), b.pin_memory(), scaling) for name, (a, b, scaling) in adapter.modules.items()}
        return adapter._replace(modules=pinned)

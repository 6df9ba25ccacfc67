"""TextCache: compute what depends on the text alone once per pipeline call (lossless).

The prompt embeddings a pipeline passes stay the same tensor over all its denoising steps, yet a
DiT runs its text projection (PixArt's caption projection, Wan's text embedder) and every
cross-attention block projects the text into keys and values again at each step. TextCache hooks
those modules (the adapter names them: ``Adapter.text_modules``) and, within one pipeline call,
returns the output computed for the same input tensor before. Outputs are bit-identical to the
unaccelerated model: the same module on the same data.

"The same input" is judged without reading the data: same storage, offset, shape, strides, dtype
and version counter (an in-place change bumps the version). The cache holds the input tensor,
so its memory cannot be reused by another tensor while an entry exists. Tensors made under
``torch.inference_mode`` have no version counter: for them the entry keeps a copy and the data
are compared (a device sync). With gradients enabled nothing is cached (each step needs its own
graph). Entries live for one pipeline call and at most ``max_entries`` per module (CFG halves and
batch slices are separate entries; the oldest goes first).

What it saves is set by the text length against the visual tokens: 4-41% of the bundled 32-pixel
models' FLOPs, 0.05-0.4% at real sizes (SD1.5 512 px, PixArt 1024 px, Wan 81 frames:
eval/results/text_cache.md), where the entries would still cost memory (Wan2.1-14B in bf16:
~0.8 GB for both CFG halves). ``min_text_ratio`` caches only in calls whose text is long against
the visual tokens (a rule on the call's shapes; outputs are the same either way). Where the text
changes inside the model every step (joint attention in Flux / SD3 / HunyuanVideo blocks) only
the entry projection can be cached. Under torch.compile, modules inside a compiled graph are left
to it (the lookup would split the graph); those outside (e.g. the text projection when only the
blocks are compiled) are still reused.

Example::

    pipe = diffaccel.accelerate(pipe, methods=["text_cache", "step_cache"])
    print(diffaccel.stats(pipe)["methods"]["text_cache"])   # reused / computed module calls
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from diffaccel import compat
from diffaccel.methods.base import Installed, Method, register
from diffaccel.validate import at_least, boolean, positive_int


@register
@dataclass(frozen=True)
class TextCache(Method):
    """Lossless reuse of text projections and cross-attention keys / values within a call.

    Attributes:
        max_entries: most inputs remembered per module in one call (CFG halves, batch slices).
        min_text_ratio: cache only in denoiser calls with at least this many text tokens per
            visual token (0: always). The presets use 0.125: the text keys / values are then a few
            percent of a step or more.
        required: False installs nothing, instead of refusing, on a denoiser without such modules
            (the presets use it; a class-conditional DiT has no text).
    """

    name: ClassVar[str] = "text_cache"
    requires: ClassVar = None

    max_entries: int = 4
    min_text_ratio: float = 0.0
    required: bool = True

    def validate(self) -> None:
        positive_int(self.max_entries, "TextCache(max_entries=...)", "4 holds both CFG halves and their slices.")
        at_least(self.min_text_ratio, "TextCache(min_text_ratio=...)", 0.0, "0 caches in every call.")
        boolean(self.required, "TextCache(required=...)")

    def apply(self, session) -> Installed:
        self.validate()
        paths = session.adapter.text_modules()
        if not paths and self.required:
            raise ValueError(
                f"TextCache found nothing to cache in {type(session.adapter.denoiser).__name__}: it has no "
                "text-only projection or cross-attention (its text, if any, changes inside every block). "
                "Leave text_cache out for this pipeline.")
        return TextCacheInstalled(self, session, paths)


def _tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _others(value: Any):
    """The call's arguments with every tensor blanked: what else must be equal for a reuse."""
    if isinstance(value, torch.Tensor):
        return None
    if isinstance(value, (tuple, list)):
        return tuple(_others(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _others(v)) for k, v in value.items())
    return value


def _fingerprint(t: torch.Tensor):
    """What makes two tensors hold the same data without reading it (None: it must be read)."""
    if t.is_inference():
        return None
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device, t._version)


def _tree_clone(value: Any):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_tree_clone(v) for v in value)
    return value


class _Entry:
    """One remembered call of a module: its inputs (kept alive, or copied) and its output."""

    def __init__(self, inputs: list[torch.Tensor], output, others=None):
        self.others = others
        self.keys = [_fingerprint(t) for t in inputs]
        # Holding the inputs keeps their storage from being reused for another tensor; inference
        # tensors have no version counter, so a copy is what they are compared with.
        self.inputs = [t if k is not None else t.clone() for t, k in zip(inputs, self.keys)]
        self.output = output
        self.output_keys = [_fingerprint(t) for t in _tensors(output)]

    def result(self):
        """The remembered output; None where the model changed it in place since (the entry is
        then stale). Inference tensors cannot tell, so their callers get a copy."""
        outputs = list(_tensors(self.output))
        if any(k is not None and _fingerprint(t) != k for t, k in zip(outputs, self.output_keys)):
            return None
        if any(k is None for k in self.output_keys):
            return _tree_clone(self.output)
        return self.output

    def matches(self, inputs: list[torch.Tensor], others=None) -> bool:
        if len(inputs) != len(self.inputs) or not _same(others, self.others):
            return False
        for t, kept, key in zip(inputs, self.inputs, self.keys):
            if key is not None:
                if _fingerprint(t) != key:
                    return False
            elif (t.shape != kept.shape or t.dtype != kept.dtype or t.device != kept.device
                  or not torch.equal(t, kept)):
                return False
        return True


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an argument that cannot be compared is never "the same"
        return False


class _Hook:
    """The hook of one module. Inside a compiled graph (the whole denoiser compiled) it leaves the
    module to the graph: a lookup there would split the graph around every hooked module."""

    def __init__(self, installed: "TextCacheInstalled", path: str):
        self.installed, self.path = installed, path

    def __call__(self, original, *args, **kwargs):
        if torch.compiler.is_compiling():
            return original(*args, **kwargs)
        return self.installed._lookup(self.path, original, *args, **kwargs)


class TextCacheInstalled(Installed):
    """Per module, the entries of the running call. Which modules are hooked is settled at each
    denoiser call: none where the call fails ``min_text_ratio``, and none inside a block compiled
    with ``compile_repeated_blocks`` (a module hook there makes torch.compile specialise the block's
    graph per block: a recompile each, eager beyond its limit; inside the graph the projection
    runs anyway)."""

    def __init__(self, config: TextCache, session, paths: list[str]):
        super().__init__(config, session)
        self.paths = list(paths)
        self.blocks = session.adapter.blocks()
        self.reset_cache()
        self.hooked: tuple[str, ...] = ()
        self._unhook: list = []
        handle = session.adapter.denoiser.register_forward_pre_hook(self._on_denoiser_call)
        self.on_remove(handle.remove)
        self.on_remove(self._remove_hooks)

    def reset_cache(self) -> None:
        self.entries: dict[str, list[_Entry]] = {}

    @torch.compiler.disable
    def _on_denoiser_call(self, module, args) -> None:
        ctx = self.session.ctx
        if not ctx.active:
            return
        wanted = self._wanted(ctx.grid)
        if wanted == self.hooked:
            return
        self._remove_hooks()
        denoiser = self.session.adapter.denoiser
        for path in wanted:
            self._unhook.append(compat.hook_forward(denoiser.get_submodule(path), _Hook(self, path), "diffaccel_text_cache"))
        self.hooked = wanted
        compat.invalidate_hook_caches(denoiser)

    def _wanted(self, grid) -> tuple[str, ...]:
        if not self._pays(grid):
            return ()
        # nn.Module.compile() (what compile_repeated_blocks calls) leaves the compiled call here; a torch
        # without the attribute only costs the recompiles, never a wrong output.
        compiled = [name + "." for name, block in self.blocks if getattr(block, "_compiled_call_impl", None) is not None]
        return tuple(p for p in self.paths if not p.startswith(tuple(compiled)))

    def _remove_hooks(self) -> None:
        while self._unhook:
            self._unhook.pop()()
        self.hooked = ()
        compat.invalidate_hook_caches(self.session.adapter.denoiser)

    @torch.compiler.disable
    def _lookup(self, path, original, *args, **kwargs):
        ctx = self.session.ctx
        if not ctx.active or torch.is_grad_enabled():
            return original(*args, **kwargs)
        inputs, others = list(_tensors((args, kwargs))), _others((args, kwargs))
        entries = self.entries.setdefault(path, [])
        for entry in entries:
            if entry.matches(inputs, others):
                out = entry.result()
                if out is None:
                    entries.remove(entry)
                    break
                self.count("reused")
                rows = inputs[0].shape[0] if inputs[0].dim() else 0
                if ctx.batch_size and rows:
                    self.count_skipped(path, min(rows / ctx.batch_size, 1.0))
                return out
        out = original(*args, **kwargs)
        self.count("computed")
        if inputs:
            entries.append(_Entry(inputs, out, others))
            if len(entries) > self.call_config().max_entries:
                entries.pop(0)
            if any(k is None for k in entries[-1].output_keys):
                return _tree_clone(out)
        return out

    def _pays(self, grid) -> bool:
        ratio = self.call_config().min_text_ratio
        if ratio <= 0:
            return True
        return grid is not None and grid.num_visual > 0 and grid.text_tokens >= ratio * grid.num_visual

    def stats(self) -> dict:
        return {**self.counters, "modules": len(self.paths), "hooked": len(self.hooked)}

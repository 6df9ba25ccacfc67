"""Keep a video denoiser's tokens in tile order for a whole call (sliding-tile attention's
permute-once path).

Per layer, sliding-tile attention reorders q, k, v into tiles and its output back, which costs
as much as the kernel itself on a GPU. Instead the visual tokens are put into tile order once,
where the adapter says the token sequence begins (:meth:`Adapter.token_sequence`), together with
every per-token position table (rotary embeddings, per-token timesteps), and restored once before
the output projection. In between, token-wise layers and dense attention are unchanged by the
order, and the sliding-tile hooks run the tile-ordered kernel without any reorder. The result
equals the unpermuted model up to float rounding (attention sums keys in another order).

Torch forward hooks (not diffusers' HookRegistry) are used on purpose: a forward pre-hook runs
before any replaced ``forward``, so caching hooks on the same block see the reordered tokens.
"""

from __future__ import annotations

import functools
import inspect

import torch

from diffaccel.kernels.tile_order import tile_order, tile_order_inverse
from diffaccel.methods.attention_intercept import step_fraction

# Methods that read the token grid in row-major order inside the denoiser (they cannot share a
# call with reordered tokens).
ROW_MAJOR_METHODS = ("mediator", "tome")


class TileOrder:
    """Installs the reorder hooks for one sliding-tile handle; ``active`` is the running call's
    (grid, tile) while its tokens are in tile order, else None."""

    def __init__(self, installed):
        self.installed = installed
        session = installed.session
        self.sequence = session.adapter.token_sequence()  # raises with the reason where unsupported
        self.active: tuple | None = None
        self._call: tuple | None = None  # (grid, tile) decided at the denoiser call, applied at ``enter``
        denoiser = session.adapter.denoiser
        self._check_no_row_major_methods()
        self._hook(denoiser.register_forward_pre_hook(self._on_call, with_kwargs=True))
        path, where = self.sequence.enter
        module = denoiser.get_submodule(path)
        if where == "output":
            self._hook(module.register_forward_hook(self._on_enter_output))
        elif where == "input":
            self._hook(module.register_forward_pre_hook(self._on_enter_input, with_kwargs=True))
        else:
            raise ValueError(f"TokenSequence.enter must name 'output' or 'input', got {where!r}")
        for path, dim in self.sequence.tables:
            self._hook(denoiser.get_submodule(path).register_forward_hook(
                lambda module, args, out, dim=dim, path=path: self._on_table(out, dim, path)))
        self._hook(denoiser.get_submodule(self.sequence.exit).register_forward_pre_hook(self._on_exit,
                                                                                         with_kwargs=True))

    def _hook(self, handle) -> None:
        self.installed.on_remove(handle.remove)

    def _check_no_row_major_methods(self) -> None:
        others = [h.config.name for h in self.installed.session.installed if h.config.name in ROW_MAJOR_METHODS]
        if others:
            raise ValueError(f"SlidingTileAttention(permute_once=True) reorders the tokens inside the denoiser, which "
                             f"{others} reads in row-major order; use permute_once=False with them")

    # ---- per call -------------------------------------------------------------------------------
    def _on_call(self, module, args, kwargs):
        self.active = self._call = None
        ctx = self.installed.session.ctx
        config = self.installed.config
        grid = ctx.grid
        if not ctx.active or grid is None:
            return None
        self._check_no_row_major_methods()  # a method applied after this one
        where = step_fraction(ctx)
        if where is None or where < config.full_attention_fraction or grid.num_visual < config.min_tokens:
            return None  # dense phase: no layer runs sparse, so nothing gains from the order
        size = (grid.frames, grid.height, grid.width)
        tile = tuple(min(t, s) for t, s in zip(self.installed.tile, size))
        if _is_identity(size, tile):
            return None  # e.g. one tile, or tiles of whole frames: row-major already is tile order
        self._call = (size, tile)
        if not self.sequence.call_tables:
            return None
        kwargs = dict(kwargs)
        names = list(_forward_names(module))
        args = list(args)
        for name, dim in self.sequence.call_tables:
            if name in kwargs:
                kwargs[name] = self._permute_table(kwargs[name], dim, name)
            elif name in names and names.index(name) < len(args):
                args[names.index(name)] = self._permute_table(args[names.index(name)], dim, name)
        return tuple(args), kwargs

    def _on_enter_output(self, module, args, out):
        if self._call is None:
            return None
        self.active = self._call
        return self._permute_last(out, 1, tile_order)

    def _on_enter_input(self, module, args, kwargs):
        if self._call is None:
            return None
        self.active = self._call
        if args:
            return (self._permute_last(args[0], 1, tile_order), *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=self._permute_last(kwargs["hidden_states"], 1, tile_order))

    def _on_exit(self, module, args, kwargs):
        if self.active is None:
            return None
        x = self._permute_last(args[0], 1, tile_order_inverse)
        self.active = self._call = None
        return (x, *args[1:]), kwargs

    def _on_table(self, out, dim, path):
        if self._call is None:
            return None
        return self._permute_table(out, dim, path)

    # ---- reordering -----------------------------------------------------------------------------
    def _permute_last(self, x: torch.Tensor, dim: int, which) -> torch.Tensor:
        """Reorder the last T*H*W entries of ``x`` along ``dim`` (text may precede them)."""
        size, tile = self._call
        n = size[0] * size[1] * size[2]
        index = which(size, tile, x.device)
        if x.shape[dim] == n:
            return x.index_select(dim, index)
        head = x.narrow(dim, 0, x.shape[dim] - n)
        return torch.cat([head, x.narrow(dim, x.shape[dim] - n, n).index_select(dim, index)], dim=dim)

    def _permute_table(self, value, dim: int, name: str):
        if value is None:
            return None
        if isinstance(value, (tuple, list)):
            return type(value)(self._permute_table(v, dim, name) for v in value)
        if not isinstance(value, torch.Tensor) or value.dim() <= dim:
            return value  # a per-call or per-sample value (e.g. a timestep per batch row)
        size, tile = self._call
        n = size[0] * size[1] * size[2]
        if value.shape[dim] != n:
            raise ValueError(f"{name}: expected {n} entries (one per visual token) along dim {dim}, got shape "
                             f"{tuple(value.shape)}; the adapter's TokenSequence does not match this model")
        return value.index_select(dim, tile_order(size, tile, value.device))


@functools.lru_cache(maxsize=64)
def _is_identity(size: tuple, tile: tuple) -> bool:
    order = tile_order(size, tile)
    return bool(torch.equal(order, torch.arange(order.numel())))


def _forward_names(module) -> list[str]:
    return [p for p in inspect.signature(type(module).forward).parameters if p != "self"]

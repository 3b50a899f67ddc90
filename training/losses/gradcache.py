"""GradCache: a contrastive loss over a batch larger than memory allows, encoded in mini-batches."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

EncodeFn = Callable[..., Tensor]


@dataclass(frozen=True)
class MiniBatches:
    """Inputs already split into mini-batches: ``encode_fn(chunk)`` is called on each chunk as is."""

    chunks: Sequence[Any]


class GradCache:
    def __init__(
        self,
        encode_fn: EncodeFn | Sequence[EncodeFn],
        loss_fn: Callable[..., Tensor],
        mini_batch: int | Sequence[int],
        *,
        preserve_rng_state: bool = True,
        rng_devices: Sequence[int | torch.device] | None = None,
        scaler: Any | None = None,
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        """
        Gradient caching: computes the loss and the parameter gradients of a contrastive batch of any
        size with the memory of one mini-batch, and gives the same gradients as the full batch.

        A contrastive loss couples every example of the batch (each query is scored against every
        candidate), so the batch cannot simply be split into accumulation steps. GradCache splits
        the backward pass at the representations instead:

        1. encode every input group (queries, positives, negatives...) mini-batch by mini-batch
           under ``torch.no_grad()``: only the (N, d) representations are kept;
        2. turn them into leaf tensors that require grad, compute the full-batch loss on them and
           backward: this gives d loss / d representation (and the grads of any loss parameters);
        3. re-encode each mini-batch WITH grad and backward it with the cached representation
           gradient (``torch.autograd.backward(reps, grad_tensors=cached)``), accumulating the
           parameter gradients. Only one mini-batch's graph is alive at a time.

        Randomness (dropout) would make the re-encoding of step 3 differ from step 1; the RNG state
        in force before each mini-batch's first encoding is saved (CPU and CUDA) and restored for
        its re-encoding, inside ``torch.random.fork_rng`` so the global RNG ends the step where a
        single pass would have left it.

        The cost is one extra forward pass. Parameter gradients are accumulated into ``.grad`` like
        ``loss.backward()`` does: zero them before, step the optimizer after. For multi-GPU data
        parallelism the loss_fn is where representations would be all-gathered; pass
        ``no_sync=ddp_model.no_sync`` so gradients are all-reduced once, on the last mini-batch.

        Args:
            encode_fn: one encoder used for every input group, or one per group (e.g. a query
                encoder and a candidate encoder). Called as ``encode_fn(chunk)`` and must return a
                (n, ...) tensor, one row per input of the chunk; for an int or ``range`` input it is
                called as ``encode_fn(start, stop)``.
            loss_fn: called as ``loss_fn(*reps, **loss_kwargs)`` on the full-batch representations of
                the groups, in the order given; returns a scalar, e.g.
                :class:`training.losses.InfoNCELoss` (its ``forward`` is
                ``compute_loss_from_embeddings``).
            mini_batch: inputs encoded at a time (for all groups, or one per group).
            preserve_rng_state: save and restore the RNG state per mini-batch so that the
                re-encoding sees the same dropout masks. Turn off only for deterministic encoders.
            rng_devices: the CUDA devices whose RNG state to save; default: the devices of the
                chunk's tensors plus the current device when CUDA is initialised.
            scaler: a ``torch.amp.GradScaler``: the loss is scaled before the backward of step 2,
                so the cached and the parameter gradients come out scaled (then ``scaler.step``).
            no_sync: a context-manager factory (``DistributedDataParallel.no_sync``) entered for
                every mini-batch backward but the last one.

        References:
            - Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup (GradCache):
              https://arxiv.org/abs/2101.06983
            - Magic-MM-Embedding (contrastive stages 2 and 3): https://arxiv.org/abs/2602.05275

        Inputs:
            Each input group is one of:

            - a tensor (N, ...): split along dim 0;
            - a dict / tuple of tensors (or of lists, or of values shared by all rows such as
              None, numbers and strings): each tensor / list split along dim 0, so
              ``encode_fn({"input_ids": ..., "attention_mask": ...})`` gets sliced dicts;
            - a list (e.g. texts or image paths): sliced as a sequence of N items;
            - :class:`MiniBatches` ``(chunks)``: already split; ``mini_batch`` is ignored for it;
            - an int N or ``range(N)``: ``encode_fn(start, stop)`` encodes inputs [start, stop).

        Example:
            ::

                import torch
                from assay.training.losses import GradCache, InfoNCELoss

                torch.manual_seed(0)
                encoder = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Dropout(0.1),
                                              torch.nn.Linear(32, 8))
                queries, positives = torch.randn(32, 16), torch.randn(32, 16)
                gc = GradCache(encoder, InfoNCELoss(temperature=0.05), mini_batch=4)
                loss = gc(queries, positives)  # grads are now in encoder's .grad, as for batch 32
        """
        self.encode_fns = list(encode_fn) if isinstance(encode_fn, Sequence) else [encode_fn]
        if not self.encode_fns or not all(callable(f) for f in self.encode_fns):
            raise TypeError("encode_fn must be a callable or a sequence of callables")
        self.loss_fn = loss_fn
        self.mini_batches = list(mini_batch) if isinstance(mini_batch, Sequence) else [mini_batch]
        if any(int(m) < 1 for m in self.mini_batches):
            raise ValueError(f"mini_batch must be >= 1, got {mini_batch}")
        self.preserve_rng_state = preserve_rng_state
        self.rng_devices = None if rng_devices is None else [_device_index(d) for d in rng_devices]
        self.scaler = scaler
        self.no_sync = no_sync

    def __call__(self, *inputs: Any, **loss_kwargs: Any) -> Tensor:
        """One GradCache step over the input groups; returns the (detached) full-batch loss."""
        return self.step(*inputs, **loss_kwargs)

    def step(self, *inputs: Any, **loss_kwargs: Any) -> Tensor:
        """One GradCache step over the input groups; returns the (detached) full-batch loss."""
        if not inputs:
            raise ValueError("no inputs")
        fns = self._per_group(self.encode_fns, len(inputs), "encode_fn")
        sizes = self._per_group(self.mini_batches, len(inputs), "mini_batch")
        groups = [_Group(fn, _split(x, int(m))) for fn, x, m in zip(fns, inputs, sizes, strict=True)]

        # (a) Representations without graph, remembering each mini-batch's RNG state.
        for group in groups:
            for chunk in group.chunks:
                if self.preserve_rng_state:
                    chunk.rng = _RngState.capture(self._devices_for(chunk.args))
                with torch.no_grad():
                    chunk.reps = _check_reps(chunk.call(group.fn), chunk.size)

        # (b) Full-batch loss on leaf representations -> d loss / d reps.
        leaves = [torch.cat([c.reps for c in g.chunks]).detach().requires_grad_() for g in groups]
        loss = self.loss_fn(*leaves, **loss_kwargs)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        for group, leaf in zip(groups, leaves, strict=True):
            grads = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad
            for chunk, grad in zip(group.chunks, grads.split([c.size for c in group.chunks]), strict=True):
                chunk.grad, chunk.reps = grad, None

        # (c) Re-encode each mini-batch with graph; backward with the cached gradient.
        order = [(g, c) for g in groups for c in g.chunks]
        for i, (group, chunk) in enumerate(order):
            sync = self.no_sync if self.no_sync is not None and i < len(order) - 1 else contextlib.nullcontext
            with sync(), _restored(chunk.rng):
                reps = _check_reps(chunk.call(group.fn), chunk.size)
                if reps.requires_grad:
                    torch.autograd.backward(reps, grad_tensors=chunk.grad.to(reps.dtype))
            chunk.grad = chunk.rng = None
        return loss.detach()

    @staticmethod
    def _per_group(values: list, n: int, name: str) -> list:
        if len(values) == 1:
            return values * n
        if len(values) != n:
            raise ValueError(f"{len(values)} {name}s for {n} input groups")
        return values

    def _devices_for(self, args: tuple) -> list[int]:
        if self.rng_devices is not None:
            return self.rng_devices
        devices = {t.device.index or 0 for t in _tensors(args) if t.device.type == "cuda"}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            devices.add(torch.cuda.current_device())
        return sorted(devices)


def gradcache_step(
    encode_query: EncodeFn,
    encode_candidate: EncodeFn,
    queries: Any,
    candidates: Any,
    loss_fn: Callable[..., Tensor],
    mini_batch: int,
    *,
    negatives: Any | None = None,
    loss_kwargs: Mapping[str, Any] | None = None,
    preserve_rng_state: bool = True,
) -> Tensor:
    """
    One GradCache step for queries and candidates: ``loss_fn(q_reps, cand_reps[, neg_reps])``.

    Args:
        encode_query: encodes a mini-batch of queries (see :class:`GradCache` for input forms).
        encode_candidate: encodes a mini-batch of positives (and of negatives).
        queries: the B queries.
        candidates: the B positive candidates, aligned with the queries.
        loss_fn: e.g. :class:`training.losses.InfoNCELoss`.
        mini_batch: inputs encoded at a time.
        negatives: optional hard negatives, B*k in query order, encoded with ``encode_candidate``
            and passed to the loss as a third (B*k, d) argument.
        loss_kwargs: keyword arguments of the loss (``neg_mask``, ``pos_doc_ids``...).
        preserve_rng_state: see :class:`GradCache`.

    Returns:
        The full-batch loss (detached); the parameter gradients are accumulated in ``.grad``.

    Example:
        ::

            import torch
            from assay.training.losses import InfoNCELoss, gradcache_step

            q_enc, c_enc = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)
            loss = gradcache_step(q_enc, c_enc, torch.randn(32, 16), torch.randn(32, 16),
                                  InfoNCELoss(), mini_batch=4,
                                  negatives=torch.randn(64, 16))  # 2 negatives per query
    """
    inputs = [queries, candidates] + ([] if negatives is None else [negatives])
    fns = [encode_query, encode_candidate] + ([] if negatives is None else [encode_candidate])
    gc = GradCache(fns, loss_fn, mini_batch, preserve_rng_state=preserve_rng_state)
    return gc(*inputs, **dict(loss_kwargs or {}))


# --- internals ---------------------------------------------------------------------------------


class _Chunk:
    __slots__ = ("args", "size", "rng", "reps", "grad")

    def __init__(self, args: tuple, size: int) -> None:
        self.args, self.size = args, size
        self.rng: _RngState | None = None
        self.reps: Tensor | None = None
        self.grad: Tensor | None = None

    def call(self, fn: EncodeFn) -> Tensor:
        return fn(*self.args)


@dataclass
class _Group:
    fn: EncodeFn
    chunks: list[_Chunk]


@dataclass
class _RngState:
    cpu: Tensor
    devices: list[int]
    cuda: list[Tensor]

    @classmethod
    def capture(cls, devices: list[int]) -> _RngState:
        cuda = [torch.cuda.get_rng_state(d) for d in devices]
        return cls(torch.get_rng_state(), devices, cuda)


@contextlib.contextmanager
def _restored(state: _RngState | None) -> Iterator[None]:
    """Run with the saved RNG state; the global RNG is put back as it was afterwards."""
    if state is None:
        yield
        return
    with torch.random.fork_rng(devices=state.devices, enabled=True):
        torch.set_rng_state(state.cpu)
        for d, s in zip(state.devices, state.cuda, strict=True):
            torch.cuda.set_rng_state(s, d)
        yield


def _split(x: Any, size: int) -> list[_Chunk]:
    if isinstance(x, MiniBatches):
        return [_Chunk((c,), _rows(c)) for c in x.chunks]
    if isinstance(x, int | range) and not isinstance(x, bool):
        r = range(x) if isinstance(x, int) else x
        if r.step != 1:
            raise ValueError("range inputs must have step 1")
        return [
            _Chunk((s, min(s + size, r.stop)), min(s + size, r.stop) - s)
            for s in range(r.start, r.stop, size)
        ]
    n = _rows(x)
    return [_Chunk((_slice(x, s, min(s + size, n)),), min(s + size, n) - s) for s in range(0, n, size)]


def _is_array(x: Any) -> bool:
    """A tensor or array-like with at least one dimension (0-d ones are shared by every row)."""
    shape = getattr(x, "shape", None)
    return shape is not None and len(shape) > 0 and hasattr(x, "__getitem__")


def _slice(x: Any, start: int, stop: int) -> Any:
    if _is_array(x):
        return x[start:stop]
    if isinstance(x, Mapping):
        out = {k: _slice(v, start, stop) for k, v in x.items()}
        return out if type(x) is dict else type(x)(out)
    if isinstance(x, tuple):
        items = [_slice(v, start, stop) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
    if isinstance(x, list):
        return x[start:stop]
    return x  # shared by every row (None, numbers, strings, flags, 0-d tensors)


def _rows(x: Any) -> int:
    """The number of inputs in x: the common leading size of its tensors / lists."""
    sizes = set(_leading_sizes(x))
    if len(sizes) != 1:
        raise ValueError(f"cannot tell the batch size of the input: leading sizes {sorted(sizes) or 'none'}")
    return sizes.pop()


def _leading_sizes(x: Any) -> Iterator[int]:
    if _is_array(x):
        yield int(x.shape[0])
    elif isinstance(x, Mapping):
        for v in x.values():
            yield from _leading_sizes(v)
    elif isinstance(x, tuple):
        for v in x:
            yield from _leading_sizes(v)
    elif isinstance(x, list):
        yield len(x)


def _tensors(x: Any) -> Iterator[Tensor]:
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, Mapping):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, tuple | list):
        for v in x:
            yield from _tensors(v)


def _check_reps(reps: Any, size: int) -> Tensor:
    if not isinstance(reps, Tensor):
        raise TypeError(f"encode_fn must return a tensor, got {type(reps).__name__}")
    if reps.dim() == 0 or reps.shape[0] != size:
        raise ValueError(f"encode_fn returned {tuple(reps.shape)} for a mini-batch of {size} inputs")
    return reps


def _device_index(d: int | torch.device) -> int:
    if isinstance(d, int):
        return d
    d = torch.device(d)
    return d.index or 0

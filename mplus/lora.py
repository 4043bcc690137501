"""Unmerged LoRA with two adapters and O(1) switching (SPEC.md §2.1; fixes P13).

The official model wraps q/k/v/gate/up/down with PEFT LoRA layers holding two adapters, ``default`` (update) and
``decoder_adapter`` (generation), and switches by walking every module on every forward. Here each
:class:`LoRALinear` reads the active adapter from one shared :class:`AdapterState`, so switching is one assignment
(a thread-local one: threads never see each other's switches). Parameter names follow PEFT's
(``base_layer.weight``, ``lora_A.<adapter>.weight``, ``lora_B.<adapter>.weight``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

ENCODER, DECODER = "default", "decoder_adapter"  # the official adapter names: update (inject), generation


class AdapterState:
    """The adapter every :class:`LoRALinear` of a model applies (``None``: base weights only), per thread.

    The choice is thread-local: ``use()`` in one thread (an ``inject`` switching to the update adapter) never changes
    what a forward running in another thread applies. A new thread starts with ``default``."""

    def __init__(self, active: str | None = None) -> None:
        self.default = active
        self._local = threading.local()

    @property
    def active(self) -> str | None:
        return getattr(self._local, "active", self.default)

    @active.setter
    def active(self, adapter: str | None) -> None:
        self._local.active = adapter

    @contextlib.contextmanager
    def use(self, adapter: str | None) -> Iterator[None]:
        previous, self.active = self.active, adapter
        try:
            yield
        finally:
            self.active = previous

    def __getstate__(self) -> dict:  # copy.deepcopy / pickle: the default travels, per-thread choices do not
        return {"default": self.default}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["default"])


class LoRALinear(nn.Module):
    """``y = base(x) + (alpha / r) · B_a(A_a(dropout(x)))`` for the active adapter ``a``; ``dropout`` (PEFT's
    ``lora_dropout``) applies in training mode only (``module.train()``; models are built in eval mode) and only where
    gradients are recorded (what is computed under ``no_grad``, e.g. the memory a training step commits, is exact)."""

    def __init__(
        self,
        base: nn.Linear,
        adapters: Sequence[str],
        r: int,
        alpha: float,
        state: AdapterState,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRALinear: dropout={dropout!r} must be in [0, 1)")
        self.dropout = dropout
        self.base_layer = base
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.ModuleDict({a: nn.Linear(base.in_features, r, bias=False, **kw) for a in adapters})
        self.lora_B = nn.ModuleDict({a: nn.Linear(r, base.out_features, bias=False, **kw) for a in adapters})
        self.scaling = alpha / r
        self._state = state

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        adapter = self._state.active
        if adapter is None:
            return y
        lora_a = self.lora_A[adapter]
        if self.dropout and self.training and torch.is_grad_enabled():
            x = nn.functional.dropout(x, self.dropout)
        return y + self.lora_B[adapter](lora_a(x.to(lora_a.weight.dtype))).to(y.dtype) * self.scaling

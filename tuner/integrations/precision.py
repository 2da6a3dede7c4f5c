"""Change a torch model's numeric precision at run time: ``fp32``, ``bf16``, ``fp16``, ``int8``.

- fp32 / bf16 / fp16: ``model.to(dtype)`` (in place).
- int8 on CPU: ``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear`` (weights int8, activations
  quantized per batch); returns a new module.
- int8 on CUDA: only with bitsandbytes (``Linear8bitLt``); otherwise refused with the reason.

:class:`PrecisionManager` keeps a full-precision reference so it can step back up (fp16 -> bf16 or int8 ->
fp32 would otherwise lose what the step down threw away), measures bytes before/after, and can run a
quality guard: next-token KL divergence and top-1 agreement against the fp32 reference on canary inputs.
"""

from __future__ import annotations

import copy
import importlib.util
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import IO, Any

import torch
from torch import nn

from tuner.integrations.cleanup import rss_bytes
from tuner.records import BITS, PRECISIONS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(RuntimeError):
    """The requested precision cannot be applied here; ``str(exc)`` is the reason."""


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def current_precision(model: nn.Module) -> str:
    """What the model runs in now (int8 if any layer is dynamically quantized or 8-bit)."""
    for m in model.modules():
        if ".quantized" in type(m).__module__ or type(m).__name__ == "Linear8bitLt":
            return "int8"
    for p in model.parameters():
        if p.is_floating_point():
            for k, dt in DTYPES.items():
                if p.dtype == dt:
                    return k
    return "fp32"


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(o) for o in obj)
    return 0


def model_bytes(model: nn.Module) -> int:
    """Bytes of the weights as stored: parameters, buffers and packed quantized weights (tied weights once)."""
    seen: set[int] = set()
    total = 0
    for v in (*model.state_dict(keep_vars=True).values(), *model.buffers()):  # buffers: non-persistent too
        if id(v) not in seen:
            seen.add(id(v))
            total += _tensor_bytes(v)
    return total


def _quantize_cpu(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch >= 2.10 marks the eager quantization API as deprecated
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)


def _quantize_cuda(model: nn.Module) -> nn.Module:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise PrecisionError("int8 on CUDA needs bitsandbytes, which is not installed (pip install bitsandbytes)")
    import bitsandbytes as bnb  # type: ignore[import-not-found]

    device = _device(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                q = bnb.nn.Linear8bitLt(
                    child.in_features, child.out_features, bias=child.bias is not None, has_fp16_weights=False
                )
                q.weight = bnb.nn.Int8Params(child.weight.data.to("cpu", torch.float16), requires_grad=False)
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.to("cpu", torch.float16), requires_grad=False)
                setattr(parent, name, q.to(device))  # moving Int8Params to CUDA quantizes them
    return model


def apply_precision(model: nn.Module, precision: str) -> nn.Module:
    """Convert ``model`` (expected in full precision for int8) and return the module to use from now on."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    device = _device(model)
    if precision in DTYPES:
        if current_precision(model) == "int8":
            raise PrecisionError("cannot convert an int8 model in place: use PrecisionManager to step back up")
        return model.to(DTYPES[precision])
    if device.type == "cpu":
        if current_precision(model) != "fp32":
            model = model.to(torch.float32)
        engines = torch.backends.quantized.supported_engines
        if not any(e in engines for e in ("x86", "fbgemm", "qnnpack", "onednn")):
            raise PrecisionError(f"this torch build has no quantized CPU engine (supported: {engines})")
        return _quantize_cpu(model)
    if device.type == "cuda":
        return _quantize_cuda(model)
    raise PrecisionError(f"int8 is not supported on {device.type} devices here (only CPU, or CUDA with bitsandbytes)")


class PrecisionManager:
    """Owns the model's precision; ``set(p)`` returns a dict of what was measured.

    ``reference``: where the full-precision weights are kept while the model runs lower: ``"disk"`` (a
    private temporary file, so stepping down actually frees memory; default) or ``"memory"``.
    ``canary``: ``fn(model) -> logits`` over fixed inputs (last-position next-token logits, shape (N, V));
    when given, every change reports ``kl`` (mean KL(reference || new), nats) and ``top1`` agreement, and a
    change over ``max_kl`` / under ``min_top1`` is rolled back and refused.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        reference: str = "disk",
        canary: Callable[[nn.Module], torch.Tensor] | None = None,
        max_kl: float | None = None,
        min_top1: float | None = None,
    ) -> None:
        if reference not in ("disk", "memory"):
            raise ValueError("reference must be 'disk' or 'memory'")
        self.model = model
        self.precision = current_precision(model)
        if self.precision == "int8":
            raise PrecisionError("PrecisionManager needs the model in floating point to start with")
        self.reference = reference
        self.canary = canary
        self.max_kl = max_kl
        self.min_top1 = min_top1
        self._ref_state: dict[str, torch.Tensor] | None = None
        self._ref_file: IO[bytes] | None = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._skeleton: nn.Module | None = None
        self._tied: list[list[str]] = []
        self._ref_logits: torch.Tensor | None = None
        self.listeners: list[Callable[[nn.Module, str], None]] = []
        """Called with (new_model, precision) after every successful change (e.g. to swap the model)."""
        self._capture()

    # -- reference -----------------------------------------------------------------------------------
    def _capture(self) -> None:
        model = self.model
        state = {k: v.detach().to(torch.float32).clone() for k, v in model.state_dict().items()}
        self._buffers = {k: b.detach().to(torch.float32) if b.is_floating_point() else b.detach()
                         for k, b in model.named_buffers()}
        groups: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        self._tied = [names for names in groups.values() if len(names) > 1]  # e.g. tied embedding / lm_head
        memo: dict[int, Any] = {}
        for p in model.parameters():
            memo[id(p)] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
        for b in model.buffers():
            memo[id(b)] = b.detach().to("meta")
        self._skeleton = copy.deepcopy(model, memo)  # same modules, no storage
        if self.canary is not None:
            with torch.inference_mode():
                self._ref_logits = self.canary(model).float()
        if self.reference == "memory":
            self._ref_state = state
        else:
            # an unlinked temporary file: nothing is left behind even if the process is killed
            f = tempfile.TemporaryFile(prefix="tuner-precision-")  # noqa: SIM115 - lives as long as the manager
            torch.save(state, f)
            f.flush()
            self._ref_file = f
            del state

    def _full_precision(self) -> nn.Module:
        """A fresh fp32 copy of the reference on the model's device."""
        assert self._skeleton is not None
        device = _device(self.model)
        if self._ref_state is not None:
            state = {k: v.clone() for k, v in self._ref_state.items()}
        else:
            assert self._ref_file is not None
            self._ref_file.seek(0)
            state = torch.load(self._ref_file, map_location="cpu", weights_only=True)
        model = copy.deepcopy(self._skeleton)
        model.load_state_dict(state, assign=True)
        for names in self._tied:  # assign=True gave each name its own tensor: share them again
            first = model.get_parameter(names[0])
            for name in names[1:]:
                mod_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(mod_name) if mod_name else model, attr, first)
        for name, buf in self._buffers.items():
            mod_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(mod_name) if mod_name else model
            if owner._buffers.get(attr) is not None and owner._buffers[attr].device.type == "meta":  # type: ignore[union-attr]
                owner._buffers[attr] = buf.clone()
        model.eval()
        return model.to(device)

    # -- quality guard -------------------------------------------------------------------------------
    def quality(self, model: nn.Module) -> dict[str, float]:
        if self.canary is None or self._ref_logits is None:
            return {}
        with torch.inference_mode():
            new = self.canary(model).float()
        ref_logp = self._ref_logits.log_softmax(-1)
        new_logp = new.log_softmax(-1)
        kl = (ref_logp.exp() * (ref_logp - new_logp)).sum(-1).mean().item()
        top1 = (ref_logp.argmax(-1) == new_logp.argmax(-1)).float().mean().item()
        return {"kl": kl, "top1": top1}

    # -- changes -------------------------------------------------------------------------------------
    def set(self, precision: str) -> dict[str, Any]:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
        previous = self.precision
        bytes_before = model_bytes(self.model)
        rss_before = rss_bytes()
        t = time.monotonic()
        result: dict[str, Any] = {"precision": precision, "previous": previous, "bits": BITS[precision]}
        if precision == previous:
            result.update(changed=False, param_bytes_before=bytes_before, param_bytes_after=bytes_before)
            return result
        old = self.model
        if previous == "fp32" and precision in DTYPES:
            new = apply_precision(old, precision)  # in place: no second copy
        elif previous == "fp32":  # int8: quantize_dynamic in place on the fp32 model
            new = apply_precision(old, precision)
        else:
            base = self._full_precision()
            new = base if precision == "fp32" else apply_precision(base, precision)
        quality = self.quality(new)
        result.update(quality)
        over = (self.max_kl is not None and quality.get("kl", 0.0) > self.max_kl) or (
            self.min_top1 is not None and quality.get("top1", 1.0) < self.min_top1
        )
        if over:
            self.model = new
            self.precision = precision
            self._restore(previous)
            raise PrecisionError(
                f"{precision} refused by the quality guard: KL {quality['kl']:.4f} (max {self.max_kl}), "
                f"top-1 {quality['top1']:.3f} (min {self.min_top1}); kept {previous}"
            )
        self.model = new
        self.precision = precision
        del old
        # the old weights' memory goes back to the C heap, not to the system: without gc + malloc_trim an
        # int8 step on the demo *raised* RSS by 12 MB (measured: 254 -> 266 MB, 251 after the trim)
        from tuner.integrations.cleanup import run_cleanup

        run_cleanup(["gc", "malloc_trim"], [])
        result.update(
            changed=True,
            seconds=time.monotonic() - t,
            param_bytes_before=bytes_before,
            param_bytes_after=model_bytes(new),
            rss_before_bytes=rss_before,
            rss_after_bytes=rss_bytes(),
        )
        for fn in self.listeners:
            fn(new, precision)
        return result

    def _restore(self, precision: str) -> None:
        base = self._full_precision()
        self.model = base if precision == "fp32" else apply_precision(base, precision)
        self.precision = precision
        for fn in self.listeners:
            fn(self.model, precision)

    def close(self) -> None:
        f, self._ref_file = getattr(self, "_ref_file", None), None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass

    def __del__(self) -> None:
        self.close()

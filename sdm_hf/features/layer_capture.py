"""Running a model body only up to the hidden-state layer that is pooled.

transformers 5 records ``hidden_states`` with hooks on one module class; when a body's
``layers`` stack is exactly those modules, ``hidden_states[L]`` is ``layers[L-1]``'s output and
the forward can stop there (a forward hook raises once it has the output).
"""

from __future__ import annotations

import inspect

import torch

__all__ = ["explicit_inputs", "early_stop_layers", "selects_hidden_states", "stop_after"]


class _StopForward(Exception):
    """Raised by a forward hook once the requested layer's output is captured (ends the forward early)."""


def explicit_inputs(module) -> set[str]:
    """Names ``module.forward`` declares explicitly (not through ``**kwargs``)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return set()
    return {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _recorded_layer_class(body):
    """``(cls, output index)`` of the modules whose outputs transformers records as ``hidden_states``
    (``body._can_record_outputs["hidden_states"]``), or None when the spec is not a plain class."""
    specs = getattr(body, "_can_record_outputs", None)
    if not isinstance(specs, dict):
        return None
    spec = specs.get("hidden_states")
    if isinstance(spec, type):
        return spec, 0
    target = getattr(spec, "target_class", None)
    if (
        isinstance(target, type)
        and getattr(spec, "layer_name", None) is None
        and getattr(spec, "class_name", None) is None
        and getattr(spec, "capture_initial_hidden_state", True)
        and getattr(spec, "num_hidden_layers_key", "num_hidden_layers") == "num_hidden_layers"
    ):
        return target, int(getattr(spec, "index", 0))
    return None


def early_stop_layers(body, n_layers: int | None):
    """``(layers, output_index)`` when ``hidden_states[L]`` (0 <= L < n) is exactly ``layers[L-1]``'s output
    (``layers[0]``'s input for L = 0): the body's ``layers`` are exactly its ``n_layers`` recorded modules.
    Else None."""
    if n_layers is None:
        return None
    recorded = _recorded_layer_class(body)
    layers = getattr(body, "layers", None)
    if recorded is None or not isinstance(layers, torch.nn.ModuleList) or len(layers) != n_layers:
        return None
    cls, index = recorded
    if not all(isinstance(m, cls) for m in layers):
        return None
    if sum(isinstance(m, cls) for m in body.modules()) != n_layers:
        return None
    return layers, index


def selects_hidden_states(body) -> bool:
    """Whether ``output_hidden_states=[i]`` keeps only entry ``i`` (the others None), saving memory."""
    specs = getattr(body, "_can_record_outputs", None)
    if not isinstance(specs, dict) or "hidden_states" not in specs:
        return False
    try:
        from transformers.utils.output_capturing import selected_hidden_states  # noqa: F401
    except ImportError:  # pragma: no cover - older transformers: keep them all
        return False
    return True


def stop_after(layers, layer: int, index: int, run):
    """Run ``run()`` until ``hidden_states[layer]`` is produced; return it ``(B, T, H)``.

    Raises:
        RuntimeError: the hooked layer never ran.
    """
    captured = {}
    if layer == 0:

        def hook(module, args, kwargs):
            captured["h"] = args[0] if args else kwargs.get("hidden_states")
            raise _StopForward

        handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    else:

        def hook(module, args, output):
            captured["h"] = output[index] if isinstance(output, (tuple, list)) else output
            raise _StopForward

        handle = layers[layer - 1].register_forward_hook(hook)
    try:
        run()
    except _StopForward:
        pass
    finally:
        handle.remove()
    if captured.get("h") is None:
        raise RuntimeError(f"decoder layer {layer} did not run; pass a model whose body runs its `layers` in order")
    return captured["h"]

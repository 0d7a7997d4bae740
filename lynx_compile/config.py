"""``LynxConfig``: the validated, frozen, hashable form of ``torch.compile(..., options=...)``."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

from .kernels.contract import PATTERN_NAMES, parse_pattern
from .layer_filter import LayerFilter

PATTERNS = (*PATTERN_NAMES, "dense")
OP_KINDS = ("linear", "matmul")
KERNELS = ("auto", "reference", "triton", "cusparselt", "fused")
INNER_COMPILERS = ("inductor", "eager")
# How the policy decides that a GEMM the options allow is rewritten (see README, "Kernel selection").
SELECTIONS = ("auto", "measured", "cost_model", "always")
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DUMP_DIR_ENV = "LYNX_DUMP_DIR"

# On an H100, 2:4 GEMMs with fewer than ~512 tokens show no gain over dense (RT-Lynx, arXiv 2605.26632).
DEFAULT_MIN_TOKENS = 512


def choices_text(values) -> str:
    return ", ".join(repr(v) for v in values)


def build_options(cls, options: Mapping[str, Any], normalise):
    """``cls(**options)`` after rejecting unknown keys and normalising each value (shared by every
    options dataclass, so every one answers bad input the same way)."""
    valid_keys = option_names(cls)
    unknown = sorted(set(options) - set(valid_keys))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r}; valid options: {choices_text(valid_keys)}")
    return cls(**{key: normalise(key, value) for key, value in options.items()})


def option_names(cls) -> list[str]:
    """The fields of an options dataclass that users set (not the internal ones, such as ``given``)."""
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def as_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"option {key!r} must be True or False, got {value!r}")
    return value


def as_regex_tuple(key: str, value: Any) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise ValueError(f"option {key!r} must be a regex string or a list of them, got {value!r}")
    for pattern in items:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"option {key!r}: invalid regex {pattern!r}: {e}") from None
    return tuple(items)


@dataclass(frozen=True)
class LynxConfig:
    """Every option of the ``rtlynx`` backend, with its default. See README.md, "Options"."""

    pattern: str = "2:4"
    norm_comp: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    op_kinds: tuple[str, ...] = OP_KINDS
    min_tokens: int | str = DEFAULT_MIN_TOKENS
    device_profile: str | None = None
    kernel: str = "auto"
    selection: str = "auto"
    selection_margin: float = 0.05
    timing_budget_ms: float = 100.0
    triton_op: bool = True
    inner: str = "inductor"
    mode: str | None = None
    inductor_config: tuple[tuple[str, Any], ...] = ()
    dump_dir: str | None = None
    plan: str | None = None
    strict: bool = False
    # Which options the user set, so that a calibration plan's own settings fill only the others.
    given: frozenset[str] = dataclasses.field(default=frozenset(), repr=False, metadata={"internal": True})

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) of the sparsity pattern, or None for ``"dense"``."""
        return None if self.pattern == "dense" else parse_pattern(self.pattern)

    @property
    def layer_filter(self) -> LayerFilter:
        return LayerFilter(self.include, self.exclude)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | "LynxConfig" | None = None) -> "LynxConfig":
        """Validate user options; unknown keys and bad values raise ``ValueError`` with the choices."""
        if isinstance(options, LynxConfig):
            return options
        options = dict(options or {})
        if "dump_dir" not in options and os.environ.get(DUMP_DIR_ENV):
            options["dump_dir"] = os.environ[DUMP_DIR_ENV]
        config = build_options(cls, options, _normalise)
        return dataclasses.replace(config, given=frozenset(options))

    def summary(self) -> dict[str, Any]:
        """The options as plain JSON-able values (for reports)."""
        out = {name: getattr(self, name) for name in option_names(type(self))}
        out["inductor_config"] = dict(self.inductor_config)
        return out


def one_of(key: str, value: Any, choices) -> Any:
    if value not in choices:
        raise ValueError(f"option {key!r} has invalid value {value!r}; valid choices: {choices_text(choices)}")
    return value


def _normalise(key: str, value: Any) -> Any:
    if key == "pattern":
        return one_of(key, value, PATTERNS)
    if key == "kernel":
        return one_of(key, value, KERNELS)
    if key == "inner":
        return one_of(key, value, INNER_COMPILERS)
    if key == "selection":
        return one_of(key, value, SELECTIONS)
    if key in ("selection_margin", "timing_budget_ms"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                or (key == "timing_budget_ms" and value == 0):
            least = "> 0" if key == "timing_budget_ms" else ">= 0"
            raise ValueError(f"option {key!r} must be a finite number {least}, got {value!r}")
        return float(value)
    if key == "mode":
        return one_of(key, value, MODES)
    if key in ("norm_comp", "strict", "triton_op"):
        return as_bool(key, value)
    if key in ("include", "exclude"):
        return as_regex_tuple(key, value)
    if key == "op_kinds":
        kinds = (value,) if isinstance(value, str) else tuple(value)
        if not kinds:
            raise ValueError(f"option 'op_kinds' must name at least one of {choices_text(OP_KINDS)}")
        for kind in kinds:
            one_of(key, kind, OP_KINDS)
        return tuple(k for k in OP_KINDS if k in kinds)
    if key == "min_tokens":
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"option 'min_tokens' must be an integer >= 0 or 'auto', got {value!r}")
        return value
    if key == "device_profile":
        from .cost_model import PROFILES

        return value if value is None else one_of(key, value, tuple(PROFILES))
    if key == "dump_dir":
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"option 'dump_dir' must be a path or None, got {value!r}")
        return None if value is None else os.fspath(value)
    if key == "plan":
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"option 'plan' must be the path of a saved calibration plan (Plan.save), got {value!r}")
        return None if value is None else os.fspath(value)
    if key == "inductor_config":
        if not isinstance(value, Mapping):
            raise ValueError(f"option 'inductor_config' must be a dict of Inductor config keys, got {value!r}")
        from torch._inductor import config as inductor_config

        known = getattr(inductor_config, "_config", None)
        for name in value:
            if known is not None and name not in known:
                raise ValueError(f"option 'inductor_config': {name!r} is not a torch._inductor.config key")
        return tuple(sorted(value.items()))
    raise AssertionError(key)

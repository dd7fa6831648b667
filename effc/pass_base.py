"""The pass contract (modelled on onnx_ir.passes and MLIR, see DESIGN.md section 3).

A pass has a stable kebab-case ``name``, a typed ``Options`` dataclass, the IR ``kinds`` it
accepts, and ``run(model, ctx) -> PassResult``. ``requires`` / ``ensures`` run around it.
Passes register themselves with ``effc.registry.register``; ``effc list-passes`` reads the
same table.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from effc.errors import PassOptionError, UnsupportedError, did_you_mean
from effc.pipeline_text import Spec, print_value


@dataclass
class PassResult:
    model: Any
    modified: bool
    stats: dict = field(default_factory=dict)


@dataclass
class NoOptions:
    pass


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(print_value(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        tp, str(tp)
    )


def _coerce(value, tp, where: str):
    """Check ``value`` against annotation ``tp``; return it converted (int -> float)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
    elif origin is list:
        if isinstance(value, list):
            (inner,) = typing.get_args(tp)
            return [_coerce(v, inner, where) for v in value]
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise PassOptionError(f"{where} expects {_type_name(tp)}, got {print_value(value)}")


class Pass:
    """Base class of every pass. Subclasses set ``name``, ``Options``, ``kinds`` and ``run``."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    kinds: ClassVar[tuple[str, ...]] = ("fx", "onnx")
    lossy: ClassVar[bool] = False
    # only moves data (layout chains): the verifier then wants bit-identical outputs
    bitwise: ClassVar[bool] = False
    # distills from the model as it was before the pipeline's structural passes (cure): they
    # then keep a frozen copy (``PassContext.keep_teacher``)
    wants_teacher: ClassVar[bool] = False
    doc: ClassVar[str] = ""

    def __init__(self, **options):
        hints = typing.get_type_hints(self.Options)
        fields = {f.name for f in dataclasses.fields(self.Options)}
        for key, value in options.items():
            if key not in fields:
                known = ", ".join(sorted(fields)) or "none"
                raise PassOptionError(
                    f"pass '{self.name}': unknown option '{key}'{did_you_mean(key, fields)}; "
                    f"its options: {known}"
                )
            options[key] = _coerce(value, hints[key], f"pass '{self.name}': option '{key}'")
        self.given = dict(options)
        self.options = self.Options(**options)
        self.validate()

    def validate(self) -> None:
        """Check option values beyond their types; raise PassOptionError."""

    def spec(self) -> Spec:
        return Spec(self.name, dict(self.given))

    def needs_calibration(self) -> bool:
        """Whether this pass, with its options, reads calibration inputs (checked before a
        pipeline starts, so a missing --calib fails at once, not after minutes of work)."""
        return False

    def requires(self, model, ctx) -> None:
        """Raise an EffcError when ``model`` is not fit for this pass."""

    def ensures(self, model, ctx) -> None:
        """Raise an EffcError when the pass broke an invariant it promises."""

    def run(self, model, ctx) -> PassResult:
        raise NotImplementedError

    def check_kind(self, model) -> None:
        """Raise UnsupportedError when the pass cannot work on this IR kind."""
        if model.kind not in self.kinds:
            need = " or ".join(k.upper() for k in self.kinds)
            raise UnsupportedError(
                f"pass '{self.name}' works on {need} models, and this model is "
                f"{model.kind.upper()}"
                + ("; training needs a torch model, not ONNX" if self.kinds == ("fx",) else "")
            )

    def __call__(self, model, ctx) -> PassResult:
        self.check_kind(model)
        self.requires(model, ctx)

        result = self.run(model, ctx)
        self.ensures(result.model, ctx)
        return result

    @classmethod
    def describe(cls) -> dict:
        hints = typing.get_type_hints(cls.Options)
        return {
            "name": cls.name,
            "kinds": list(cls.kinds),
            "lossy": cls.lossy,
            "doc": (cls.doc or (cls.__doc__ or "").strip().splitlines()[0]).strip(),
            "options": [
                {
                    "name": f.name,
                    "type": _type_name(hints[f.name]),
                    "default": f.default
                    if f.default is not dataclasses.MISSING
                    else f.default_factory(),
                }
                for f in dataclasses.fields(cls.Options)
            ],
        }

"""The ``actcompile`` command: plan any importable model from the shell, or run the demo.

::

    actcompile plan torchvision.models:resnet50 --input 32x3x224x224 --budget 0.25
    actcompile plan mypackage.models:make_lm --input 2x128 --int-input 50257 --budget 1GB --json plan.json
    actcompile plan torchvision.models:resnet18 --input 8x3x64x64 --budget 0.25 --compile --plot plan.png
    actcompile demo --budget 0.25 --epochs 3

``plan`` builds ``MODEL`` (``package.module:factory``, called with the ``--arg key=value``
keyword arguments; it must return an ``nn.Module``), makes random inputs of each ``--input``
shape (``--dtype``; integer tokens below ``VOCAB`` with ``--int-input VOCAB``), plans it at
``--budget`` and prints the plan table and the bytes the heap really keeps after one training
forward, against the budget. With ``--compile`` the plan is made by the Inductor back end
(``torch.compile(model, backend=actcompile.backend(...))``) during one training step instead.
A model spec, shape, budget or codec that is wrong is one line on stderr and exit code 2.

>>> parse_shape("32x3x224x224")
(32, 3, 224, 224)
>>> main(["plan", "no_such_module:make", "--input", "2x3", "--budget", "0.5"])  # doctest: +SKIP
actcompile: error: cannot import module 'no_such_module' (from MODEL 'no_such_module:make') ...
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import sys
from pathlib import Path


class UsageError(Exception):
    """What the user gave the command is wrong; the message says what and what is accepted."""


def parse_shape(text: str) -> tuple[int, ...]:
    """``"32x3x224x224"`` → ``(32, 3, 224, 224)``; every dim a positive integer."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--input {text!r} is not a shape: give positive integers joined by 'x', like 32x3x224x224")
    return shape


def parse_budget_text(text: str):
    """A fraction (``0.25``), a byte count (``1000000``) or a size (``2GB``), checked by :func:`parse_budget`."""
    from actcompile.config import parse_budget

    budget: object = text
    for kind in (int, float):
        try:
            budget = kind(text)
            break
        except ValueError:
            pass
    try:
        parse_budget(budget)
    except ValueError as err:
        raise UsageError(f"--budget: {err}") from None
    return budget


def load_model(spec: str, arguments: list[str]):
    """Import ``package.module:factory`` and call it with ``key=value`` arguments (Python literals)."""
    import torch

    if os.getcwd() not in sys.path and "" not in sys.path:   # a module next to the user, as with python -m
        sys.path.insert(0, os.getcwd())
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise UsageError(f"MODEL {spec!r}: give it as package.module:factory, like torchvision.models:resnet18")
    kwargs = {}
    for item in arguments:
        key, equals, value = item.partition("=")
        if not equals or not key.isidentifier():
            raise UsageError(f"--arg {item!r}: give key=value, like num_classes=10")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value   # a bare word is a string
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UsageError(f"cannot import module {module_name!r} (from MODEL {spec!r}): {err}") from None
    factory = module
    for name in attribute.split("."):
        if not hasattr(factory, name):
            raise UsageError(f"module {module_name!r} has no {attribute!r} (from MODEL {spec!r})")
        factory = getattr(factory, name)
    if not callable(factory):
        raise UsageError(f"MODEL {spec!r} is a {type(factory).__name__}, not something to call")
    try:
        model = factory(**kwargs)
    except Exception as err:   # the user's factory: say which call failed and why, without a traceback
        first = str(err).splitlines()[0] if str(err) else ""
        raise UsageError(f"{spec}({', '.join(arguments)}) raised {type(err).__name__}: {first}") from None
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{spec}() returned a {type(model).__name__}; actcompile plans an nn.Module")
    return model


def make_inputs(shapes: list[tuple[int, ...]], dtype_name: str, vocab: int | None):
    import torch

    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UsageError(f"--dtype {dtype_name!r}: give a floating dtype such as float32, bfloat16, float16")
    generator = torch.Generator().manual_seed(0)
    if vocab is not None:
        if vocab <= 0:
            raise UsageError(f"--int-input {vocab}: the vocabulary size must be positive")
        return tuple(torch.randint(0, vocab, shape, generator=generator) for shape in shapes)
    return tuple(torch.randn(shape, generator=generator, dtype=dtype) for shape in shapes)


def _plan_eager(model, inputs, budget, codecs, json_path, plot_path):
    from actcompile import actcompile
    from actcompile.measure import heap_measurable, kept_by_forward
    from actcompile.plan import format_bytes

    compiled = actcompile(model, budget=budget, example_inputs=inputs, codecs=codecs, progress=True)
    plan = compiled.plan
    print(plan)
    if json_path:
        with open(json_path, "w") as f:
            f.write(plan.to_json())
    if plot_path:
        plan.plot(plot_path)
    if heap_measurable():
        kept_by_forward(compiled, inputs)   # a first compressed forward compiles the codec kernels
        kept = kept_by_forward(compiled, inputs)
        print(f"measured: the heap keeps {format_bytes(kept)} ({kept} B) after one training forward (outputs "
              f"included); budget {format_bytes(plan.budget_bytes)} ({plan.budget_bytes} B), uncompressed "
              f"{format_bytes(plan.baseline_bytes)}")
    return plan


def _plan_compiled(model, inputs, budget, codecs, json_path, plot_path):
    import torch

    import actcompile
    from actcompile.measure import forward_backward

    from actcompile.measure import heap_measurable, kept_by_forward
    from actcompile.plan import format_bytes

    be = actcompile.backend(budget=budget, codecs=codecs)
    compiled = torch.compile(model, backend=be)
    forward_backward(compiled, inputs)   # compiles and plans every graph of a training step
    for i, (plan, memory_budget) in enumerate(zip(be.plans, be.memory_budgets)):
        # a plan's baseline is what its partition saves: lower where Inductor recomputes more
        partition = "" if memory_budget >= 1.0 else f" (Inductor's partition at activation_memory_budget {memory_budget})"
        print(f"graph {i}{partition}:\n{plan}")
    if heap_measurable():
        kept = kept_by_forward(compiled, inputs)
        budget_bytes = sum(p.budget_bytes for p in be.plans)
        print(f"measured: the heap keeps {format_bytes(kept)} ({kept} B) after one training forward (outputs "
              f"included: the compiled back end's plans do not count outputs yet); the plans' budgets add up to "
              f"{format_bytes(budget_bytes)} ({budget_bytes} B)")
    if json_path:
        with open(json_path, "w") as f:
            json.dump([json.loads(p.to_json()) for p in be.plans], f)
    if plot_path:   # one picture per compiled graph: plan.png, plan-1.png, ...
        path = Path(plot_path)
        for i, plan in enumerate(be.plans):
            plan.plot(path if i == 0 else path.with_name(f"{path.stem}-{i}{path.suffix}"))
    return be.plans


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="actcompile", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("plan", help="plan a model at a budget; print the plan and the measured bytes")
    plan.add_argument("model", metavar="MODEL", help="package.module:factory, e.g. torchvision.models:resnet18")
    plan.add_argument("--input", action="append", required=True, metavar="SHAPE",
                      help="an input's shape, e.g. 32x3x224x224 (repeat for several positional inputs)")
    plan.add_argument("--budget", required=True,
                      help="a fraction of the baseline (0.25, 1.0), a size (2GB, 512MiB) or an integer of bytes")
    plan.add_argument("--codecs", help="codec names joined by commas (int8,mask), all, or quantizers "
                      "(the quantizers and mask alone: the fastest planning; default: every codec but none and random)")
    plan.add_argument("--dtype", default="float32", help="dtype of random float inputs (default float32)")
    plan.add_argument("--int-input", type=int, metavar="VOCAB", help="inputs are token ids below VOCAB")
    plan.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                      help="keyword argument for the factory (a Python literal), e.g. num_classes=10")
    plan.add_argument("--json", metavar="PATH", help="write the plan as JSON")
    plan.add_argument("--plot", metavar="PATH", help="draw the plan (.png, .svg, .pdf; needs matplotlib)")
    plan.add_argument("--compile", action="store_true", help="plan with the Inductor back end (torch.compile)")
    commands.add_parser("demo", help="README's main job: fine-tune on bundled digits with and without actcompile "
                        "(its options: actcompile demo --help)", add_help=False)
    return parser


def main(argv=None) -> int:
    """Run the command; ``argv`` defaults to ``sys.argv[1:]``. Returns the exit code."""
    command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:   # the demo parses its own options
        from actcompile.demo import main as demo

        return demo(argv[1:])
    ns = _parser().parse_args(argv)
    if command_line and "MALLOC_ARENA_MAX" not in os.environ and os.name == "posix":
        os.environ["MALLOC_ARENA_MAX"] = "1"   # glibc's heap counters see one arena only (actcompile/measure.py)
        os.execv(sys.executable, [sys.executable, "-m", "actcompile.cli", *argv])
    from actcompile.errors import ActCompileError

    try:
        shapes = [parse_shape(s) for s in ns.input]
        budget = parse_budget_text(ns.budget)
        inputs = make_inputs(shapes, ns.dtype, ns.int_input)
        model = load_model(ns.model, ns.arg).train()
        named_sets = ("all", "quantizers")
        codecs = None if ns.codecs is None else ns.codecs if ns.codecs in named_sets else [c for c in ns.codecs.split(",") if c]
        if codecs is not None and codecs not in named_sets:
            from actcompile.codecs import available_codecs

            unknown = [c for c in codecs if c not in available_codecs()]
            if unknown:
                raise UsageError(f"--codecs: unknown {unknown}; available: {', '.join(available_codecs())}, "
                                 "or all, or quantizers")
        for option, path in (("--json", ns.json), ("--plot", ns.plot)):   # fail before planning, not after
            if path and not Path(path).resolve().parent.is_dir():
                raise UsageError(f"{option} {path!r}: no such directory {str(Path(path).resolve().parent)!r}")
        if ns.plot:   # checked before the planning it would come after
            try:
                from matplotlib.backends.backend_agg import FigureCanvasAgg
                from matplotlib.figure import Figure
            except ImportError:
                raise UsageError("--plot needs matplotlib: pip install 'actcompile[plot]'") from None
            formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
            if Path(ns.plot).suffix.lstrip(".").lower() not in formats:
                raise UsageError(f"--plot {ns.plot!r}: end it with one of {', '.join('.' + f for f in sorted(formats))}")
        (_plan_compiled if ns.compile else _plan_eager)(model, inputs, budget, codecs, ns.json, ns.plot)
    except (UsageError, ActCompileError, OSError) as err:   # OSError: a --json/--plot path not writable
        if sys.stderr.isatty():   # a progress line may be open on the terminal: start clean
            sys.stderr.write("\r\x1b[2K")
        print(f"actcompile: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

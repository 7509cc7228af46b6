"""actcompile: compress the activations autograd saves, where a graph pass says it pays, under a byte budget.

>>> from actcompile import actcompile, explain, Plan
"""

from actcompile.api import ActCompiledModule, actcompile, explain
from actcompile.codecs import available_codecs, get_codec, register_codec
from actcompile.compile_backend import backend
from actcompile.config import CompileConfig, parse_budget
from actcompile.errors import (ActCompileError, BudgetError, CodecError, GradientErrorWarning, InputMismatchError,
                               PlanDriftWarning, TraceError)
from actcompile.passes.capture import Inputs
from actcompile.plan import ModelPlan, Plan

__all__ = [
    "actcompile", "explain", "backend", "Plan", "ModelPlan", "ActCompiledModule", "Inputs", "CompileConfig", "parse_budget",
    "available_codecs", "get_codec", "register_codec",
    "ActCompileError", "BudgetError", "CodecError", "InputMismatchError", "TraceError", "PlanDriftWarning",
    "GradientErrorWarning",
]

"""Exceptions raised by actcompile.

Every error a user can cause derives from :class:`ActCompileError`, so
``except ActCompileError`` catches all of them; each also derives from the
builtin that describes its kind (``ValueError`` for bad arguments), so code
written against plain Python exceptions keeps working.

>>> from actcompile.errors import BudgetError
>>> issubclass(BudgetError, ValueError)
True
"""


class ActCompileError(Exception):
    """Base class of every actcompile error."""


class TraceError(ActCompileError, RuntimeError):
    """Dynamo could not capture the model as graphs (or the model cannot be planned as captured)."""


class BudgetError(ActCompileError, ValueError):
    """No plan meets the memory budget; the message names the smallest achievable bytes."""

    def __init__(self, message: str, *, smallest_bytes: int | None = None):
        super().__init__(message)
        self.smallest_bytes = smallest_bytes


class CodecError(ActCompileError, ValueError):
    """A codec was asked for something it cannot do (unknown name, bad option, bad input)."""


class InputMismatchError(ActCompileError, TypeError):
    """The example inputs do not match the model's forward signature."""


class PlanDriftWarning(UserWarning):
    """What a plan assumed about the saved tensors no longer holds (a value range, a byte count):
    the tensor is kept exactly, but the plan's bytes are no longer what the heap holds."""


class GradientErrorWarning(UserWarning):
    """A plan's measured effect on the parameter gradient is large (relative error above
    ``actcompile.api.GRADIENT_ERROR_WARNING``, one training step on the example inputs): only
    codecs this lossy fit the budget, or the time weight prefers them."""

r"""The MLP specification shared by the theory and the empirical module (docs/theory.md, "The network").

    z^(1)_{i;a}   = b^(1)_i   + sum_j W^(1)_{ij} x_{j;a}
    z^(l+1)_{i;a} = b^(l+1)_i + sum_j W^(l+1)_{ij} sigma(z^(l)_{j;a})
    b^(l) ~ N(0, C_b^(l)),  W^(l)_{ij} ~ N(0, C_W^(l) / n_{l-1})

Gradient descent moves biases with lambda_b^(l) and weights with lambda_W^(l) / n_{l-1}; by
default lambda = C, under which the NTK equals neural-tangents' "ntk" parameterization.

Layer l = 1..L is stored at index l-1 of every per-layer tuple.  ``width`` gives the hidden widths
n_1..n_{L-1}; the output width n_L is ``output_width`` (1 by default).  The input width n_0 is a
property of the data, not of the network.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Callable, Sequence

import numpy as np

from . import _validate
from .activations import Activation, get_activation

__all__ = ["MLP"]


@dataclasses.dataclass(frozen=True, init=False)
class MLP:
    """A deep MLP in the PDLT parameterization.

    Args:
      depth: number of layers L (preactivations z^(1)..z^(L)), >= 1.
      width: hidden width n (int) for every hidden layer, or a sequence of L-1 hidden widths.
      activation: a registry name (see :func:`efftheory.activations.registered`), an
        :class:`~efftheory.activations.Activation`, or any JAX-traceable callable.
      C_W, C_b: weight and bias variances, scalars or sequences of L per-layer values.
        C_W > 0, C_b >= 0.  Under ``jax.jit``, ``jax.vmap`` or ``jax.grad`` they (and lambda_W,
        lambda_b) may be traced scalars or traced arrays of shape (L,): the MLP then holds the tracers,
        only their shapes are checked, and :func:`efftheory.infinite_width`,
        :func:`efftheory.finite_width` (one input) differentiate and batch through them.  Such an MLP
        is neither hashable nor comparable; results computed from it carry a copy of it with NaN in
        place of the traced values (no tracer outlives its trace).
      lambda_W, lambda_b: learning-rate tensor; default to C_W and C_b.
      output_width: n_L, 1 by default.

    Attributes (normalised): ``hidden_widths`` (L-1 ints), ``C_Ws``, ``C_bs``, ``lambda_Ws``,
    ``lambda_bs`` (L floats each), ``sigma`` (the resolved Activation).

    Two MLPs are equal when their widths and hyperparameters are and their activations are the same
    registry activation (``leaky_relu(a)``: the same slope a) or the same Activation object.
    ``to_dict``/``from_dict`` convert to and from a JSON-ready dict, and an MLP pickles with its
    activation stored by registry name; a user activation pickles by reference when its function is
    importable by name (a module-level ``def``) and raises :class:`pickle.PicklingError` otherwise
    (a lambda, a local function).
    """

    depth: int
    hidden_widths: tuple[int, ...]
    sigma: Activation
    C_Ws: tuple[float, ...]
    C_bs: tuple[float, ...]
    lambda_Ws: tuple[float, ...]
    lambda_bs: tuple[float, ...]
    output_width: int

    def __init__(
        self,
        depth: int,
        width: int | Sequence[int] = 1,
        activation: str | Activation | Callable = "relu",
        C_W: float | Sequence[float] = 1.0,
        C_b: float | Sequence[float] = 0.0,
        lambda_W: float | Sequence[float] | None = None,
        lambda_b: float | Sequence[float] | None = None,
        output_width: int = 1,
    ):
        L = _validate.positive_int("depth", depth, maximum=_validate.MAX_DEPTH)
        if isinstance(width, np.ndarray) and width.ndim == 0:
            width = width.item()
        if isinstance(width, (Sequence, np.ndarray)) and not isinstance(width, (str, bytes)):
            ws = list(width)
            if len(ws) != L - 1:
                raise ValueError(
                    f"width: expected an int or a sequence of depth-1 = {L - 1} hidden widths, got {len(ws)}"
                )
            widths = tuple(_validate.positive_int(f"width[{i}]", w, maximum=_validate.MAX_WIDTH)
                           for i, w in enumerate(ws))
        else:
            widths = (_validate.positive_int("width", width, maximum=_validate.MAX_WIDTH),) * (L - 1)
        C_Ws = _validate.per_layer("C_W", C_W, L, positive=True)
        C_bs = _validate.per_layer("C_b", C_b, L, nonnegative=True)
        lW = C_Ws if lambda_W is None else _validate.per_layer("lambda_W", lambda_W, L, nonnegative=True)
        lb = C_bs if lambda_b is None else _validate.per_layer("lambda_b", lambda_b, L, nonnegative=True)
        set_ = object.__setattr__
        set_(self, "depth", L)
        set_(self, "hidden_widths", widths)
        import jax

        with jax.ensure_compile_time_eval():  # a callable is probed on numbers, also when built inside a trace
            sigma = get_activation(activation, "activation")
        set_(self, "sigma", sigma)
        set_(self, "C_Ws", C_Ws)
        set_(self, "C_bs", C_bs)
        set_(self, "lambda_Ws", lW)
        set_(self, "lambda_bs", lb)
        set_(self, "output_width", _validate.positive_int("output_width", output_width, maximum=_validate.MAX_WIDTH))

    # ------------------------------------------------------------------ derived views
    @property
    def widths(self) -> tuple[int, ...]:
        """(n_1, ..., n_L): hidden widths followed by the output width."""
        return self.hidden_widths + (self.output_width,)

    @property
    def activation(self) -> Activation:
        return self.sigma

    def layer_widths(self, input_dim: int) -> tuple[int, ...]:
        """(n_0, n_1, ..., n_L) for inputs of dimension ``input_dim``."""
        return (_validate.positive_int("input_dim", input_dim, maximum=_validate.MAX_WIDTH),) + self.widths

    def width_ratios(self) -> tuple[float, ...]:
        """r_l = n_l / n_{l-1} for l = 1..L-1 (index 0 is r_1 = n_1/n_1 = 1 by convention, unused).

        Entry l-1 multiplies the recursion step from layer l to l+1 (docs/theory.md: r_l = n_l/n_{l-1});
        for l = 1 the ratio involves n_0 and never enters because V^(1) = G1^(1) = 0.
        """
        ws = self.hidden_widths
        return (1.0,) + tuple(ws[i] / ws[i - 1] for i in range(1, len(ws)))

    def with_width(self, width: int | Sequence[int]) -> "MLP":
        """The same network at another hidden width."""
        return MLP(self.depth, width, self.sigma, self.C_Ws, self.C_bs, self.lambda_Ws, self.lambda_bs,
                   self.output_width)

    def replace(self, **changes) -> "MLP":
        """A copy with constructor arguments changed (depth, width, activation, C_W, ...)."""
        args = dict(depth=self.depth, width=self.hidden_widths if self.depth > 1 else 1,
                    activation=self.sigma, C_W=self.C_Ws, C_b=self.C_bs, lambda_W=self.lambda_Ws,
                    lambda_b=self.lambda_bs, output_width=self.output_width)
        if "depth" in changes and "width" not in changes:
            args["width"] = self.hidden_widths[0] if self.hidden_widths else 1
        for k in ("C_W", "C_b", "lambda_W", "lambda_b"):
            if "depth" in changes and k not in changes:
                vals = args[k]
                try:
                    uniform = len(set(vals)) == 1
                except TypeError:  # traced values (jax.jit/vmap/grad) are not hashable
                    uniform = False
                if uniform:
                    args[k] = vals[0]
        args.update(changes)
        return MLP(**args)

    # ------------------------------------------------------------------ identity, dict and pickle
    def _key(self) -> tuple:
        key = self.__dict__.get("_cached_key")
        if key is None:  # hashed on every jit dispatch that carries this MLP as static metadata
            act = activation_name(self.sigma)
            key = (self.depth, self.hidden_widths, self.sigma if act is None else act, self.C_Ws, self.C_bs,
                   self.lambda_Ws, self.lambda_bs, self.output_width)
            object.__setattr__(self, "_cached_key", key)
        return key

    def __eq__(self, other) -> bool:
        if not isinstance(other, MLP):
            return NotImplemented
        return self is other or self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def to_dict(self, *, named_only: bool = True) -> dict:
        """The constructor arguments as a JSON-ready dict (floats exact through ``json``), e.g.

            {"depth": 3, "width": 64, "activation": "relu", "C_W": 2.0, "C_b": 0.0,
             "lambda_W": 2.0, "lambda_b": 0.0, "output_width": 1}

        Per-layer values are one number when uniform, else a list of L; ``width`` is one int when
        every hidden layer has it, else the list of L-1 hidden widths.  Raises ValueError for an
        activation that is not in the registry (a user callable has no name to write down), unless
        ``named_only=False``: then its display name stands there (a record, not for :meth:`from_dict`).
        """
        act = activation_name(self.sigma)
        if act is None and not named_only:
            act = self.sigma.name
        if act is None:
            raise ValueError(f"activation: {self.sigma.name!r} is a user callable, not a registry activation "
                             "(efftheory.activations.registered()); it cannot be written by name")

        def short(t, cast):
            return cast(t[0]) if len(set(t)) == 1 else [cast(v) for v in t]

        ws = self.hidden_widths
        return {"depth": self.depth, "width": short(ws, int) if ws else 1, "activation": act,
                "C_W": short(self.C_Ws, float), "C_b": short(self.C_bs, float),
                "lambda_W": short(self.lambda_Ws, float), "lambda_b": short(self.lambda_bs, float),
                "output_width": self.output_width}

    @classmethod
    def from_dict(cls, d: dict) -> "MLP":
        """The MLP of a :meth:`to_dict` dict (missing keys take the constructor's defaults)."""
        if not isinstance(d, dict):
            raise ValueError(f"d: expected a dict of MLP arguments, got {type(d).__name__}")
        known = ("depth", "width", "activation", "C_W", "C_b", "lambda_W", "lambda_b", "output_width")
        extra = sorted(set(d) - set(known))
        if extra:
            raise ValueError(f"d: unknown MLP arguments {extra}; expected some of {list(known)}")
        return cls(**d)

    def __reduce__(self):
        if activation_name(self.sigma) is not None:
            return (MLP.from_dict, (self.to_dict(),))
        try:
            pickle.dumps(self.sigma.fn)
        except Exception as e:  # noqa: BLE001 - lambdas, local functions, closures over unpicklable state
            raise pickle.PicklingError(
                f"MLP: cannot pickle the activation {self.sigma.name!r}: it is neither a registry activation "
                f"(efftheory.activations.registered()) nor a function importable by name ({e}); use a "
                "registry name, or define sigma with a module-level def") from None
        args = dict(depth=self.depth, width=list(self.hidden_widths) if self.hidden_widths else 1,
                    activation=self.sigma, C_W=self.C_Ws, C_b=self.C_bs, lambda_W=self.lambda_Ws,
                    lambda_b=self.lambda_bs, output_width=self.output_width)
        return (_build, (args,))

    def __copy__(self) -> "MLP":
        return self  # immutable

    def __deepcopy__(self, memo) -> "MLP":
        return self

    def __repr__(self) -> str:
        def short(t):
            try:
                return t[0] if len(set(t)) == 1 else t
            except TypeError:  # traced hyperparameters (jax.jit/vmap/grad) are not hashable
                return t
        w = short(self.hidden_widths) if self.hidden_widths else "-"
        return (f"MLP(depth={self.depth}, width={w}, activation={self.sigma.name!r}, "
                f"C_W={short(self.C_Ws)}, C_b={short(self.C_bs)}, lambda_W={short(self.lambda_Ws)}, "
                f"lambda_b={short(self.lambda_bs)}, output_width={self.output_width})")


def _build(args: dict) -> MLP:
    return MLP(**args)


def activation_name(sigma: Activation) -> str | None:
    """The registry name that resolves to exactly ``sigma`` (``"leaky_relu(a)"`` with the slope written
    exactly), or None for a user activation."""
    from . import activations

    if activations.REGISTRY.get(sigma.name) is sigma:
        return sigma.name
    fn = sigma.fn
    if (getattr(fn, "__module__", None) == activations.__name__
            and getattr(fn, "__qualname__", "") == "leaky_relu.<locals>.<lambda>"
            and fn.__code__.co_freevars == ("a",)):
        a = fn.__closure__[0].cell_contents
        name = f"leaky_relu({float(a)!r})"
        if sigma.name == f"leaky_relu({a:g})":
            return name
    return None

r"""The MLP specification shared by the theory and the empirical module (docs/theory.md, "The network").

    z^(1)_{i;a}   = b^(1)_i   + sum_j W^(1)_{ij} x_{j;a}
    z^(l+1)_{i;a} = b^(l+1)_i + sum_j W^(l+1)_{ij} sigma(z^(l)_{j;a})
    b^(l) ~ N(0, C_b^(l)),  W^(l)_{ij} ~ N(0, C_W^(l) / n_{l-1})

Gradient descent moves biases with lambda_b^(l) and weights with lambda_W^(l) / n_{l-1}; by
default lambda = C, under which the NTK equals neural-tangents' "ntk" parameterization.

Layer l = 1..L is stored at index l-1 of every per-layer tuple.  ``width`` gives the hidden widths
n_1..n_{L-1}; the output width n_L is ``output_width`` (1 by default).  The input width n_0 is a
property of the data, not of the network.

Residual MLPs (docs/theory.md, "Residual MLPs"): with ``skip`` = xi and ``branch`` = gamma, a hidden
layer l = 2..L-1 whose input and output widths are equal (n_{l-1} = n_l) computes

    z^(l)_{i;a} = xi^(l) z^(l-1)_{i;a} + gamma^(l) [ b^(l)_i + sum_j W^(l)_{ij} sigma(z^(l-1)_{j;a}) ];

the first layer, the output layer and any change of width are plain (xi = 0, gamma = 1), and xi = 0,
gamma = 1 everywhere is the plain MLP above.  :meth:`MLP.layers` describes each layer with one
:class:`Layer` record, which the theory and the empirical code iterate over.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import _validate
from .activations import Activation, get_activation

__all__ = ["MLP", "Layer"]


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer l of an :class:`MLP`: z^(l) = skip z^(l-1) + branch [b^(l) + W^(l) sigma(z^(l-1))]
    (layer 1 reads the inputs x instead of sigma(z^(0)) and has skip = 0).

    Attributes:
      index: l, 1..L.
      n_in, n_out: n_{l-1} and n_l.
      C_W, C_b: the initialization variances, W_ij ~ N(0, C_W / n_in), b ~ N(0, C_b).
      lambda_W, lambda_b: the learning-rate tensor (weights move with lambda_W / n_in).
      skip, branch: xi^(l) and gamma^(l) (0 and 1 for a plain layer).
    Under a JAX transformation the hyperparameters may be tracers (see :class:`MLP`).
    """

    index: int
    n_in: int
    n_out: int
    C_W: float
    C_b: float
    lambda_W: float
    lambda_b: float
    skip: float = 0.0
    branch: float = 1.0

    @property
    def residual(self) -> bool:
        """True unless the layer is plain (skip = 0 and branch = 1 as numbers; traced values count as residual)."""
        return _is_residual(self.skip, self.branch)


def _is_traced(v) -> bool:
    return _validate._tracer(v)


def _is_residual(skip, branch) -> bool:
    if _is_traced(skip) or _is_traced(branch):
        return True
    return skip != 0.0 or branch != 1.0


def _residual_eligible(widths: tuple[int, ...], L: int) -> tuple[bool, ...]:
    """Per layer l = 1..L: True when l is a hidden layer 2..L-1 with n_{l-1} = n_l (widths: hidden n_1..n_{L-1})."""
    return tuple(2 <= l <= L - 1 and widths[l - 2] == widths[l - 1] for l in range(1, L + 1))


def _why_plain(l: int, L: int, widths: tuple[int, ...]) -> str:
    if l == 1:
        return "the first layer reads the inputs"
    if l == L:
        return "the output layer is plain"
    return f"its widths differ (n_{l - 1} = {widths[l - 2]}, n_{l} = {widths[l - 1]})"


def _residual_per_layer(name: str, value, L: int, widths: tuple[int, ...], plain: float, **kw) -> tuple:
    """skip or branch as L per-layer values: a scalar applies to the hidden layers 2..L-1 (which must then
    all keep their width), a sequence gives every layer (``plain`` on layers that cannot be residual)."""
    eligible = _residual_eligible(widths, L)
    if _is_traced(value) and getattr(value, "ndim", 0) == 0:
        v = _validate.real(name, value, **kw)
        return tuple(v if e else plain for e in eligible)
    if isinstance(value, (list, tuple)):
        scalar = False
    elif isinstance(value, (str, bytes)) or value is None:
        scalar = True  # refused by the check below, naming the argument
    else:
        try:
            scalar = np.ndim(value) == 0
        except Exception:  # noqa: BLE001 - not array-like: refused by the check below
            scalar = True
    vals = _validate.per_layer(name, value, L, **kw)
    if scalar:
        v = vals[0]
        if v == plain:
            return (plain,) * L
        if L < 3:
            raise ValueError(f"{name}: a depth-{L} MLP has no hidden-to-hidden layer (layers 2..L-1) for a skip "
                             f"connection; got {name}={v!r} (use the default {plain!r})")
        bad = [l for l in range(2, L) if not eligible[l - 1]]
        if bad:
            l = bad[0]
            raise ValueError(f"{name}: a scalar {name} applies to every hidden layer 2..{L - 1}, but layer {l} cannot be "
                             f"residual: {_why_plain(l, L, widths)}; give {name} per layer "
                             f"({plain!r} on layers whose widths differ) or use equal hidden widths")
        return tuple(v if e else plain for e in eligible)
    out = []
    for l, (v, e) in enumerate(zip(vals, eligible), start=1):
        if not e and not _is_traced(v) and v != plain:
            raise ValueError(f"{name}[{l - 1}]: layer {l} is plain ({_why_plain(l, L, widths)}), so its {name} must be "
                             f"{plain!r}; got {v!r}")
        out.append(v if e else plain)
    return tuple(out)


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
      skip, branch: the residual hyperparameters xi (any finite real) and gamma (> 0) (docs/theory.md,
        "Residual MLPs"): a hidden layer l = 2..L-1 whose input and output widths are equal computes
        z^(l) = xi^(l) z^(l-1) + gamma^(l) [b^(l) + W^(l) sigma(z^(l-1))].  A scalar applies to every
        hidden layer 2..L-1 (refused when one of them changes width, or when depth < 3 has none); a
        sequence gives L per-layer values, and a plain layer (the first, the output layer, a change of
        width) given skip != 0 or branch != 1 is refused.  Defaults 0 and 1: the plain MLP, bit for
        bit.  Traced like C_W: a traced scalar applies to layers 2..L-1; in a traced (L,) array the
        entries of plain layers cannot be checked and are replaced by 0 and 1.

    Attributes (normalised): ``hidden_widths`` (L-1 ints), ``C_Ws``, ``C_bs``, ``lambda_Ws``,
    ``lambda_bs``, ``skips``, ``branches`` (L floats each), ``sigma`` (the resolved Activation).
    :meth:`layers` gives the same per layer as :class:`Layer` records.

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
    skips: tuple[float, ...]
    branches: tuple[float, ...]

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
        skip: float | Sequence[float] = 0.0,
        branch: float | Sequence[float] = 1.0,
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
        set_(self, "skips", _residual_per_layer("skip", skip, L, widths, 0.0))
        set_(self, "branches", _residual_per_layer("branch", branch, L, widths, 1.0, positive=True))

    # ------------------------------------------------------------------ derived views
    @property
    def widths(self) -> tuple[int, ...]:
        """(n_1, ..., n_L): hidden widths followed by the output width."""
        return self.hidden_widths + (self.output_width,)

    @property
    def activation(self) -> Activation:
        return self.sigma

    @property
    def residual(self) -> bool:
        """True when some layer has skip != 0 or branch != 1 (or a traced skip or branch)."""
        return any(_is_residual(x, g) for x, g in zip(self.skips, self.branches))

    def require_plain(self, what: str) -> "MLP":
        """``self`` if it is a plain MLP, else ValueError: ``what`` (finite_width_diagonal and dntk_statistics,
        whose residual recursions do not exist yet) does not support skip connections yet."""
        if not self.residual:
            return self
        bad = next(la for la in self.layers(1) if la.residual)
        shown = "traced" if _is_traced(bad.skip) or _is_traced(bad.branch) else f"skip={bad.skip!r}, branch={bad.branch!r}"
        raise ValueError(
            f"net: {what} does not support residual MLPs yet (skip/branch: layer {bad.index} has {shown}): its "
            "recursions for residual layers do not exist.  infinite_width, finite_width (first order in 1/n), the "
            "criticality functions, compare, sampling, the exact NTK and training support them.  (skip = 0 with "
            "branch != 1 is the plain MLP with C_W, C_b, lambda_W, lambda_b multiplied by branch^2 in those layers.)")

    def layers(self, input_dim: int) -> tuple[Layer, ...]:
        """One :class:`Layer` record per layer l = 1..L for inputs of dimension ``input_dim`` (n_0)."""
        ns = self.layer_widths(input_dim)
        return tuple(Layer(l + 1, ns[l], ns[l + 1], self.C_Ws[l], self.C_bs[l], self.lambda_Ws[l], self.lambda_bs[l],
                           self.skips[l], self.branches[l]) for l in range(self.depth))

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
                   self.output_width, self.skips, self.branches)

    def replace(self, **changes: Any) -> "MLP":
        """A copy with constructor arguments changed (depth, width, activation, C_W, ...)."""
        args = dict(depth=self.depth, width=self.hidden_widths if self.depth > 1 else 1,
                    activation=self.sigma, C_W=self.C_Ws, C_b=self.C_bs, lambda_W=self.lambda_Ws,
                    lambda_b=self.lambda_bs, output_width=self.output_width, skip=self.skips,
                    branch=self.branches)
        if "depth" in changes and "width" not in changes:
            args["width"] = self.hidden_widths[0] if self.hidden_widths else 1
        for k, plain in (("skip", 0.0), ("branch", 1.0)):
            if ("depth" in changes or "width" in changes) and k not in changes:
                args[k] = _residual_short(args[k], plain)
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
            if self.residual:  # a plain MLP keeps the key it had before residual MLPs existed
                key = key + (self.skips, self.branches)
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
        every hidden layer has it, else the list of L-1 hidden widths.  ``skip`` and ``branch`` are
        written only for a residual MLP (a plain MLP's dict is the one it had before they existed): one
        number when every hidden layer 2..L-1 has it, else the list of L.  Raises ValueError for an
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
        out = {"depth": self.depth, "width": short(ws, int) if ws else 1, "activation": act,
               "C_W": short(self.C_Ws, float), "C_b": short(self.C_bs, float),
               "lambda_W": short(self.lambda_Ws, float), "lambda_b": short(self.lambda_bs, float),
               "output_width": self.output_width}
        if self.residual:
            for k, vals, plain in (("skip", self.skips, 0.0), ("branch", self.branches, 1.0)):
                v = _residual_short(vals, plain)
                out[k] = float(v) if not isinstance(v, tuple) else [float(e) for e in v]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "MLP":
        """The MLP of a :meth:`to_dict` dict (missing keys take the constructor's defaults)."""
        if not isinstance(d, dict):
            raise ValueError(f"d: expected a dict of MLP arguments, got {type(d).__name__}")
        known = ("depth", "width", "activation", "C_W", "C_b", "lambda_W", "lambda_b", "output_width", "skip",
                 "branch")
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
                    lambda_b=self.lambda_bs, output_width=self.output_width, skip=self.skips,
                    branch=self.branches)
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
        res = ""
        if self.residual:  # a plain MLP's repr is the one it had before residual MLPs (cache fingerprints)
            res = (f", skip={_residual_short(self.skips, 0.0)}, "
                   f"branch={_residual_short(self.branches, 1.0)}")
        return (f"MLP(depth={self.depth}, width={w}, activation={self.sigma.name!r}, "
                f"C_W={short(self.C_Ws)}, C_b={short(self.C_bs)}, lambda_W={short(self.lambda_Ws)}, "
                f"lambda_b={short(self.lambda_bs)}, output_width={self.output_width}{res})")


def _residual_short(vals: tuple, plain: float):
    """skip or branch as the MLP argument that rebuilds it: one number when every hidden layer 2..L-1 has
    the same value (the plain layers have ``plain``), else the tuple of L."""
    L = len(vals)
    if any(_is_traced(v) for v in vals):
        return tuple(vals)
    hidden = vals[1:L - 1]
    if all(v == plain for v in vals):
        return plain
    if L >= 3 and len(set(hidden)) == 1 and vals[0] == plain and vals[-1] == plain:
        return hidden[0]
    return tuple(vals)


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

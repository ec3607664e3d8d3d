"""Why a verdict is what it is, as data, and the one table that turns it into a sentence.

A reason used to be a sentence built by an if-chain next to the verdict, which let the two drift
apart.  Here a verdict carries a `Why` (a kind from `SENTENCES`, the axis, side and the numbers it
quotes) and the sentence is rendered from the table; the table also says which verdicts each kind
may explain, so a reason can be tested as data and can never contradict its verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional, Sequence

__all__ = ["Outcome", "Why", "SENTENCES", "sentence"]


class Outcome(str, Enum):
    """The verdicts (a str, so it compares and serialises as the word itself)."""

    MERGEABLE = "mergeable"
    SIZE_DEPENDENT = "size-dependent"
    UNMERGEABLE = "unmergeable"
    UNDECIDED = "undecided"

    def __str__(self) -> str:
        return self.value


EXACT = frozenset({Outcome.MERGEABLE})
INEXACT = frozenset({Outcome.SIZE_DEPENDENT, Outcome.UNMERGEABLE})
NOTE = frozenset(Outcome)  # remarks that may follow any verdict


@dataclass(frozen=True)
class Why:
    """One reason: its kind (a key of SENTENCES) and the values its sentence quotes."""

    kind: str
    values: tuple[tuple[str, Any], ...] = field(default=())

    @classmethod
    def of(cls, kind: str, **values: Any) -> "Why":
        if kind not in SENTENCES:
            raise KeyError(f"unknown reason kind {kind!r}")
        return cls(kind, tuple(sorted(values.items())))

    def __getitem__(self, key: str) -> Any:
        return dict(self.values)[key]

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dict(self.values)}

    def text(self) -> str:
        return SENTENCES[self.kind][1].format(**dict(self.values))


SENTENCES: dict[str, tuple[frozenset[Outcome], str]] = {
    # Pairs that merge at every size.
    "no-padding-read": (EXACT, "conv2 reads no padding, so the convolved kernels are exact at every size"),
    "linear-product": (EXACT, "linear layers have no spatial axes (no border), so the product of their weights is "
                              "exact for every input"),
    "pointwise-commutes": (EXACT, "conv1 is pointwise, so it commutes with conv2's {mode} padding"),
    "padding-covers": (EXACT, "conv1's padding covers every border cell conv2 pads, so the merge is exact at every size"),
    "zero-kernel": (EXACT, "{which} is all zeros, so the pair is a constant map that one conv's bias reproduces"),
    # Pairs that do not (at some or all sizes).
    "padding-too-short": (INEXACT, "conv1 pads {pad1} on the {side} of {axis} but needs >= {need} for every size, "
                                   "because conv2 pads {pad2} there"),
    "padding-hides": (INEXACT, "conv2's zero padding on the {side} of {axis} hides input cells that a merged conv "
                               "would read"),
    "bias-meets-padding": (INEXACT, "conv2's zero padding on the {side} of {axis} cuts off conv1's bias (or the batch "
                                    "norm's shift), so the pair's bias varies near the border and no conv's bias can "
                                    "match it"),
    "modes-differ": (INEXACT, "conv2's {mode2} padding on the {side} of {axis} repeats conv1's border outputs, which a "
                              "single {modem}-padded conv over conv1's {mode1} padding cannot reproduce"),
    "corners": (INEXACT, "the single conv differs from the pair where the borders of different axes meet"),
    "undecided": (frozenset({Outcome.UNDECIDED}), "undecided: strides, padding and dilation this large would need "
                                                  "{sizes} input sizes enumerated per axis (the limit is {limit}); "
                                                  "not merged"),
    # Regions: parallel branches, pooling, pad, and chains inside them.
    "region-exact": (EXACT, "every branch reduces to one conv on a shared output grid, so the region is one conv"),
    "chain-exact": (EXACT, "each step of the chain is exact at every size, so the chain is one conv"),
    "step": (INEXACT, "{first} -> {second}: {detail}"),
    "grid-differs": (INEXACT, "branches {a} and {b} have strides {sa} and {sb} on {axis}, so their outputs lie on "
                              "different grids"),
    "branch-modes-differ": (INEXACT, "branches {a} ({ma} padding) and {b} ({mb} padding) read the border in different "
                                     "modes, which no single conv reproduces"),
    "lengths-differ": (INEXACT, "the branches' outputs have equal lengths on {axis} only at some sizes (their padding "
                                "minus extent differs by {spread} at stride {stride})"),
    "pool-excludes-padding": (INEXACT, "average pooling {layer} leaves its padding out of the mean "
                                       "(count_include_pad=False), so its divisor changes at the border and it is no "
                                       "convolution there"),
    "pool-ceil-mode": (INEXACT, "average pooling {layer} in ceil mode adds a partial window (with a smaller "
                                "divisor) on {axis} at some sizes"),
    "pad-value": (INEXACT, "pad {layer} fills its border with {value}, not with what the layers before it give a "
                           "zero input, so the border differs from any conv's"),
    # Pairs skipped before any rule is applied (graph.Pair.blocked): the verdict is 'skipped'.
    "graph-output": (NOTE, "{layer} is a graph output"),
    "other-consumers": (NOTE, "{layer} has {count} consumers"),
    "non-float-statistics": (NOTE, "{layer} has non-float statistics"),
    "non-float-weights": (NOTE, "{layer} has non-float weights"),
    "axes-differ": (NOTE, "{second} has {axes2} spatial axes, {first} {axes1}"),
    "channels-differ": (NOTE, "{second} takes {takes} channels, {first} gives {gives}"),
    # A merge that is exact but refused for its storage dtype (plan.Unit.refused).
    "storage-rounding": (NOTE, "merge refused: stored as {dtype} the merged weights {off}, more than {ulps} ulps; the "
                               "layers stay unmerged"),
    # Remarks after a verdict.
    "pytorch-pad-limit": (NOTE, "PyTorch runs the merged conv's {mode} padding of {pad} only on inputs with "
                                "{axis} >= {least} ({rule}), while the layers also run at {axis} = {smallest}"),
    "no-counterexample": (NOTE, "yet these particular weights showed no difference on the inputs tried (they may "
                                "cancel), and convmerge merges only what it can prove"),
    "search-bounded": (NOTE, "yet none found within the bound of the search (a few seconds of random, all-ones "
                             "and border-first impulse inputs), and convmerge merges only what it can prove"),
    "nothing-tried": (NOTE, "no counterexample could be computed: PyTorch refuses the candidate's padding at every "
                            "size tried"),
    "weights-decide": (NOTE, "this holds only because of these weights ({detail}); other values of the same "
                             "layers would give {generic}"),
}


def sentence(outcome: Outcome, why: Why, sizes: Optional[str] = None, notes: Sequence[Why] = ()) -> str:
    """The reason people read: '[exact only when SIZES: ]WHY[; NOTE]...'.

    Raises ValueError when the kind cannot explain this verdict (a mergeable verdict with a failure).
    """
    allowed, _ = SENTENCES[why.kind]
    if outcome not in allowed:
        raise ValueError(f"reason kind {why.kind!r} cannot explain a {outcome.value} verdict")
    text = why.text()
    if outcome is Outcome.SIZE_DEPENDENT and sizes:
        text = f"exact only when {sizes}: {text}"
    for note in notes:
        text += "; " + note.text()
    return text

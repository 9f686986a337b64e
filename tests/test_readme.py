"""Every ```python block of README.md runs, so that the README cannot rot.

Blocks run in order, each in a fresh namespace, in this process.  A block that is slow at the size the
README shows is shrunk by the text substitutions in SHRINK below, kept here next to the test rather
than in the README: each entry names a substring that identifies the block and the (old, new)
replacements applied to it.  Every ``old`` must occur in its block -- a README edit that moves one
fails here instead of silently running at full size -- and every entry must match a block.
"""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"

# block identifier -> replacements.  The trained-mean / Bayesian-posterior block takes ~20-60 s at
# depth 3 on 2 cores (the dNTK/ddNTK integrals); depth 2 exercises the same calls in about half that.
SHRINK = {
    "trained_mean_first_order(net, x_train": [("MLP(depth=3, width=64", "MLP(depth=2, width=64")],
}


def _blocks():
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


def _shrunk(block: str) -> str:
    for key, subs in SHRINK.items():
        if key in block:
            for old, new in subs:
                assert old in block, f"README block with {key!r} no longer contains {old!r}: update SHRINK"
                block = block.replace(old, new)
    return block


def test_readme_has_python_blocks_and_every_shrink_entry_matches_one():
    blocks = _blocks()
    assert blocks, "README.md has no ```python blocks"
    for key in SHRINK:
        assert sum(key in b for b in blocks) == 1, f"SHRINK key {key!r} matches no README block (or several)"


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_python_block_runs(index):
    code = _shrunk(_blocks()[index])
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})

"""JAX's persistent compilation cache for efftheory's kernels, opt-in (efftheory._compile_cache): off
unless asked for, the directory EFFTHEORY_COMPILE_CACHE names (or ``on``: the default one) or
efftheory.enable_compile_cache(path) gives, one subdirectory per instruction set, a second process
loading what the first compiled, and a cache the user gave JAX left alone.

The processes that import efftheory are children: the environment is read once, at import."""

import json
import os
import subprocess
import sys
from pathlib import Path

from efftheory import _compile_cache

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json
import jax, jax.numpy as jnp, jax.monitoring as mon
hits = []
mon.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
import os, efftheory
if os.environ.get("CALL_ENABLE"):
    efftheory.enable_compile_cache(os.environ["CALL_ENABLE"] if os.environ["CALL_ENABLE"] != "default" else None)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # cache even this small program
y = jax.jit(lambda x: jnp.sin(x) * 3.0 + jnp.cumsum(x))(jnp.arange(7.0))
print(json.dumps({"dir": jax.config.jax_compilation_cache_dir, "hits": len(hits), "y": float(y.sum())}))
"""


def _child(**env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("EFFTHEORY_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env_extra)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cache_dir_from_the_environment(tmp_path, monkeypatch):
    tag = _compile_cache._isa_tag()
    assert len(tag) == 12 and int(tag, 16) >= 0
    assert _compile_cache._isa_tag() == tag  # stable
    for off in ("", "off", "OFF", " 0 ", "false", "no", "none"):
        assert _compile_cache.cache_dir(off) is None
    assert _compile_cache.cache_dir(str(tmp_path)) == str(tmp_path / tag)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for on in ("on", "ON", "1", "true", "yes"):
        assert _compile_cache.cache_dir(on) == str(tmp_path / "xdg" / "efftheory" / "xla" / tag)


def test_off_by_default(tmp_path):
    got = _child(XDG_CACHE_HOME=str(tmp_path / "xdg"))
    assert got["dir"] is None
    assert not (tmp_path / "xdg").exists()


def test_opt_in_by_call_and_by_on(tmp_path):
    tag = _compile_cache._isa_tag()
    assert _child(CALL_ENABLE=str(tmp_path / "mine"))["dir"] == str(tmp_path / "mine" / tag)
    assert _child(CALL_ENABLE="default", XDG_CACHE_HOME=str(tmp_path / "xdg"))["dir"] == str(
        tmp_path / "xdg" / "efftheory" / "xla" / tag)
    assert _child(EFFTHEORY_COMPILE_CACHE="on", XDG_CACHE_HOME=str(tmp_path / "x2"))["dir"] == str(
        tmp_path / "x2" / "efftheory" / "xla" / tag)


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    first = _child(EFFTHEORY_COMPILE_CACHE=str(tmp_path))
    path = tmp_path / _compile_cache._isa_tag()
    assert first["dir"] == str(path)
    assert first["hits"] == 0
    assert any(path.iterdir()), "nothing was written to the cache"
    second = _child(EFFTHEORY_COMPILE_CACHE=str(tmp_path))
    assert second["hits"] >= 1
    assert second["y"] == first["y"]


def test_off_and_the_users_own_cache_are_respected(tmp_path):
    assert _child(EFFTHEORY_COMPILE_CACHE="off")["dir"] is None
    own = tmp_path / "mine"
    got = _child(EFFTHEORY_COMPILE_CACHE=str(tmp_path / "ours"), JAX_COMPILATION_CACHE_DIR=str(own))
    assert got["dir"] == str(own)
    assert not (tmp_path / "ours").exists()


def test_a_directory_that_cannot_be_made_turns_the_cache_off(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert _child(EFFTHEORY_COMPILE_CACHE=str(blocker / "sub"))["dir"] is None

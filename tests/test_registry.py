"""The algorithm registry: names, duplicates, unknown names, hyperparameter errors, entry-point plugins."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from harness.algorithms import available, create, get_algorithm, register
from harness.algorithms.base import EditAlgorithm, make_hparams
from harness.algorithms.direct import DirectHparams


def test_builtins_registered():
    names = available()
    assert {"none", "direct"} <= set(names)
    for name in names:
        assert get_algorithm(name).name == name


def test_unknown_name_lists_registered():
    with pytest.raises(KeyError, match=r"unknown algorithm 'rome2'.*direct.*none"):
        get_algorithm("rome2")


@pytest.mark.parametrize("bad", ["Rome", "my-algo", "", "1abc", "a b"])
def test_bad_names_rejected(bad):
    with pytest.raises(ValueError, match="lowercase"):
        register(bad)


def test_duplicate_name_rejected():
    with pytest.raises(ValueError, match="already registered"):
        @register("direct")
        class Other(EditAlgorithm):
            pass


def test_same_qualname_from_another_module_is_refused():
    """Two different classes that share a qualname (``Direct``) in different modules are not the same class."""
    impostor = type("Direct", (EditAlgorithm,), {"__module__": "someone_elses.plugin"})
    assert impostor.__qualname__ == get_algorithm("direct").__qualname__
    with pytest.raises(ValueError, match=r"'direct' is already registered to harness\.algorithms\.direct\.Direct; "
                                         r"cannot register someone_elses\.plugin\.Direct"):
        register("direct")(impostor)
    assert get_algorithm("direct").__module__ == "harness.algorithms.direct"


def test_same_class_re_registered_after_a_reload_is_allowed():
    """A module reload re-creates its classes: same module and qualname, a new object."""
    from harness.algorithms import base

    old = get_algorithm("none")
    again = type(old.__name__, (EditAlgorithm,), {"__module__": old.__module__, "__qualname__": old.__qualname__})
    try:
        assert register("none")(again) is again and get_algorithm("none") is again
    finally:
        base.ALGORITHMS.classes["none"] = old


def test_unknown_hparam_named():
    with pytest.raises(TypeError, match=r"unknown hyperparameter\(s\) \['opps'\]"):
        create("direct", {"opps": []})
    with pytest.raises(ValueError, match="kind='set_rows'"):
        make_hparams(DirectHparams, {"ops": [{"kind": "set_rows", "param": "x"}]})


def test_entry_point_plugin_registers_without_editing_harness(tmp_path):
    """A third-party package registers through the 'harness.algorithms' entry-point group."""
    (tmp_path / "my_plugin.py").write_text(textwrap.dedent("""
        from harness.algorithms.base import EditAlgorithm
        from harness.types import EditReport

        class Shout(EditAlgorithm):
            def targets(self, model, requests):
                return set()

            def apply(self, model, tok, requests):
                return EditReport(info={"shout": True})
    """))
    dist = tmp_path / "my_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[harness.algorithms]\nshout = my_plugin:Shout\n")
    code = ("import harness; a = harness.create_algorithm('shout'); "
            "print(a.name, 'shout' in harness.available(), a.apply(None, None, []).info['shout'])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["shout", "True", "True"]

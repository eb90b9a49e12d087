"""Third-party methods: by entry point (``raybench.methods`` group) or named as ``package.module:attribute``.

Nothing is pip-installed: a distribution is a module plus a ``*.dist-info`` folder on a temporary ``sys.path``
entry, which ``importlib.metadata`` discovers like an installed one.
"""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

from raybench.cli import main
from raybench.methods import Method, available_methods, expand_grid, get_method, resolve_methods
from raybench.methods.base import UnlearnData
from raybench.models import build_stack
from raybench.training import default_recipe

PLUGIN_SOURCE = '''
"""A tiny third-party method package."""

from raybench.methods import Method


def shrink(stack, data, params, epochs, seed):
    """Multiply every weight by ``factor`` once per epoch.

    A toy method: enough to see that raybench calls it with its parameters.
    """
    for epoch in range(1, max(epochs) + 1):
        for p in stack.parameters():
            p.data.mul_(params["factor"])
        if epoch in epochs:
            yield epoch, stack


shrink.defaults = {"factor": 0.5}


def bare(stack, data, params, epochs, seed):
    yield from ((e, stack) for e in epochs)


METHOD = Method("NAME", shrink, "shrink the weights (plugin)", defaults={"factor": 0.9}, default_epochs=(2,))


def make_method():
    return Method("NAME_factory", shrink, "made by a factory", defaults={"factor": 0.8})


NOT_A_METHOD = 42
'''


def _write_module(root, module: str, method_name: str) -> None:
    (root / f"{module}.py").write_text(PLUGIN_SOURCE.replace("NAME", method_name))


@pytest.fixture
def plugin_dist(tmp_path, monkeypatch):
    """A distribution 'rb-demo-plugin' whose entry points register a Method object and a factory."""
    module = "rb_demo_plugin_ep"
    _write_module(tmp_path, module, "demo_plugin")
    info = tmp_path / "rb_demo_plugin-0.1.dist-info"
    info.mkdir()
    info.joinpath("METADATA").write_text("Metadata-Version: 2.1\nName: rb-demo-plugin\nVersion: 0.1\n")
    info.joinpath("entry_points.txt").write_text(textwrap.dedent(f"""\
        [raybench.methods]
        demo_plugin = {module}:METHOD
        demo_factory = {module}:make_method
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    yield tmp_path
    sys.modules.pop(module, None)


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """A plain module (no distribution) importable as ``rb_demo_plugin_mod``."""
    module = "rb_demo_plugin_mod"
    _write_module(tmp_path, module, "named_inside")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    yield module
    sys.modules.pop(module, None)


def _tiny_world():
    stack = build_stack("mlp", [1, 2], (4,), 3)
    x, y = torch.randn(10, 4, generator=torch.Generator().manual_seed(0)), torch.arange(10) % 3
    data = UnlearnData(x, y, torch.tensor([0, 1]), torch.arange(2, 10), 3, default_recipe("digits", "mlp"))
    return stack, data


# -- entry points ---------------------------------------------------------------------------------------------

def test_entry_point_methods_are_registered_after_the_builtins(plugin_dist):
    methods = available_methods()
    names = list(methods)
    assert names.index("demo_plugin") > names.index("oracle_matching")
    assert methods["demo_plugin"].defaults == {"factor": 0.9} and methods["demo_plugin"].default_epochs == (2,)
    assert methods["demo_plugin_factory"].description == "made by a factory"
    assert get_method("demo_plugin") is not None
    assert [m.name for m in resolve_methods("demo_plugin,finetune")] == ["demo_plugin", "finetune"]


def test_entry_point_methods_show_in_the_cli(plugin_dist):
    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.strip().splitlines()}
    assert "shrink the weights (plugin)" in lines["demo_plugin"]


def test_entry_point_method_runs(plugin_dist):
    stack, data = _tiny_world()
    method = get_method("demo_plugin")
    before = [p.detach().clone() for p in stack.parameters()]
    out = list(method.fn(stack, data, expand_grid(method, {})[0], method.default_epochs, 0))
    assert [e for e, _ in out] == [2]
    for p, b in zip(stack.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), b * 0.81)


def test_an_entry_point_that_is_not_a_method_is_an_error(tmp_path, monkeypatch, plugin_dist):
    info = tmp_path / "rb_bad_plugin-0.1.dist-info"
    info.mkdir()
    info.joinpath("METADATA").write_text("Metadata-Version: 2.1\nName: rb-bad-plugin\nVersion: 0.1\n")
    info.joinpath("entry_points.txt").write_text("[raybench.methods]\nbad = rb_demo_plugin_ep:NOT_A_METHOD\n")
    with pytest.raises(ValueError, match="does not give a raybench Method"):
        available_methods()


# -- package.module:attribute ---------------------------------------------------------------------------------

def test_module_function_is_wrapped(plugin_module):
    spec = f"{plugin_module}:shrink"
    method = get_method(spec)
    assert method.name == spec  # the spec names it, so a worker can import it again from the name alone
    assert method.description == "Multiply every weight by ``factor`` once per epoch."
    assert method.defaults == {"factor": 0.5} and method.default_epochs == (1,) and not method.needs_oracles
    stack, data = _tiny_world()
    before = [p.detach().clone() for p in stack.parameters()]
    out = list(method.fn(stack, data, expand_grid(method, {"factor": 0.25})[0], (1,), 0))
    assert [e for e, _ in out] == [1]
    torch.testing.assert_close(next(stack.parameters()).detach(), before[0] * 0.25)
    with pytest.raises(ValueError, match="has no parameter"):
        expand_grid(method, {"nosuch": 1})


def test_module_function_without_docstring_or_defaults(plugin_module):
    method = get_method(f"{plugin_module}:bare")
    assert method.defaults == {} and method.description and "\n" not in method.description


def test_module_method_object_is_renamed_to_its_spec(plugin_module):
    spec = f"{plugin_module}:METHOD"
    method = get_method(spec)
    assert isinstance(method, Method) and method.name == spec
    assert method.defaults == {"factor": 0.9} and method.default_epochs == (2,)
    assert [m.name for m in resolve_methods([spec, "finetune"])] == [spec, "finetune"]


@pytest.mark.parametrize("spec,message", [
    ("rb_no_such_module_xyz:fn", "cannot import module 'rb_no_such_module_xyz'"),
    ("{module}:no_such_attribute", "has no attribute 'no_such_attribute'"),
    ("{module}:NOT_A_METHOD", "neither a raybench Method nor a function"),
    ("{module}:", "must look like package.module:attribute"),
    (":shrink", "must look like package.module:attribute"),
])
def test_bad_module_specs_are_clear_errors(plugin_module, spec, message):
    with pytest.raises(ValueError, match=message):
        get_method(spec.format(module=plugin_module))


def test_cli_run_rejects_a_bad_module_spec(tmp_path):
    result = CliRunner().invoke(main, ["run", "--out", str(tmp_path / "out"), "--methods", "rb_no_such_mod:fn"])
    assert result.exit_code == 2, result.output
    assert "cannot import module" in result.output

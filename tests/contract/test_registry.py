"""The plugin registry: entry-point discovery, validation, broken plugins, allow/block lists, CLI listing."""

from __future__ import annotations

import json
import textwrap
import warnings
from importlib.metadata import EntryPoint

import pytest

from strataprune.cli import main
from strataprune.contract.errors import UnknownPluginError
from strataprune.contract.registry import BUILTIN_MODULES, GROUP, PluginLoadWarning, Registry, get_registry

BUILTINS = [EntryPoint(name, module, GROUP) for name, module in BUILTIN_MODULES.items()]

GOOD = """
from dataclasses import dataclass
from strataprune import Allocator, Allocation, hookimpl

@dataclass
class Cfg:
    level: float = 0.0

class Flat(Allocator):
    name = "{name}"
    Config = Cfg
    def allocate(self, ctx):
        return Allocation.uniform(ctx.layout, ctx.target.ratio, allocator=self.name)

@hookimpl
def register_allocators(register):
    register(Flat)
"""

BROKEN = {
    "import_error": "import not_a_module_anywhere\n",
    "hook_raises": "from strataprune import hookimpl\n@hookimpl\ndef register_pruners(register):\n    raise "
    "RuntimeError('boom')\n",
    "bad_hook_name": "from strataprune import hookimpl\n@hookimpl\ndef register_alocators(register):\n    pass\n",
    "not_a_subclass": "from strataprune import hookimpl\n@hookimpl\ndef register_allocators(register):\n    register(object)\n",
    "bad_name": GOOD.replace('"{name}"', '"Bad Name"'),
    "duplicate": GOOD.replace("{name}", "uniform"),
    "no_allocate": "from strataprune import Allocator, hookimpl\nclass A(Allocator):\n    name = 'no_allocate'\n"
    "@hookimpl\ndef register_allocators(register):\n    register(A)\n",
}


@pytest.fixture()
def plugin_dir(tmp_path, monkeypatch):
    """Write plugin modules into a folder on sys.path; returns a function making their entry points."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(module: str, source: str) -> EntryPoint:
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        return EntryPoint(module, module, GROUP)

    return make


def test_builtins_are_discovered_through_our_own_entry_points():
    from importlib.metadata import entry_points

    ours = {ep.name: ep.value for ep in entry_points(group=GROUP) if ep.value.startswith("strataprune.")}
    assert ours == BUILTIN_MODULES, "pyproject must list every built-in module in [project.entry-points.strataprune]"
    registry = get_registry()
    assert {"uniform"} <= set(registry.names("allocator"))
    assert {"magnitude", "wanda"} <= set(registry.names("pruner"))
    assert "decoder_llm" in registry.names("adapter")
    assert "bbc" in registry.names("dataset")
    assert registry.info("pruner", "wanda").provided_by == "strataprune"


def test_a_good_third_party_plugin_registers(plugin_dir):
    registry = Registry(BUILTINS + [plugin_dir("good_plugin", GOOD.replace("{name}", "flat"))])
    info = registry.info("allocator", "flat")
    assert info.provided_by == "good_plugin" and info.kind == "allocator"
    allocator = registry.create("allocator", "flat", {"level": 1})
    assert allocator.config.level == 1.0


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_a_broken_plugin_is_skipped_with_one_warning(plugin_dir, broken):
    eps = BUILTINS + [plugin_dir(f"p_{broken}", BROKEN[broken]), plugin_dir("good_plugin", GOOD.replace("{name}", "flat"))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = Registry(eps)
    ours = [w for w in caught if issubclass(w.category, PluginLoadWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert f"p_{broken}" in str(ours[0].message)
    assert [label for label, _ in registry.skipped] == [f"p_{broken}:p_{broken}"]
    # everything else still works, the built-in 'uniform' was not replaced by the duplicate
    assert "flat" in registry.names("allocator") and "wanda" in registry.names("pruner")
    assert registry.info("allocator", "uniform").provided_by == "strataprune"


def test_allow_and_block_lists(plugin_dir, monkeypatch):
    eps = BUILTINS + [
        plugin_dir("plug_a", GOOD.replace("{name}", "alpha_a")),
        plugin_dir("plug_b", GOOD.replace("{name}", "beta_b")),
    ]
    monkeypatch.setenv("STRATAPRUNE_LOAD_PLUGINS", "plug_a")
    names = Registry(eps).names("allocator")
    assert "alpha_a" in names and "beta_b" not in names and "uniform" in names  # built-ins always load
    monkeypatch.setenv("STRATAPRUNE_LOAD_PLUGINS", "")
    names = Registry(eps).names("allocator")
    assert "alpha_a" not in names and "beta_b" not in names and "uniform" in names
    monkeypatch.delenv("STRATAPRUNE_LOAD_PLUGINS")
    monkeypatch.setenv("STRATAPRUNE_BLOCK_PLUGINS", "plug_b")
    names = Registry(eps).names("allocator")
    assert "alpha_a" in names and "beta_b" not in names


def test_unknown_names_list_what_exists_with_did_you_mean():
    registry = get_registry()
    with pytest.raises(UnknownPluginError) as err:
        registry.create("pruner", "wnada")
    message = str(err.value)
    assert "did you mean 'wanda'" in message and "magnitude" in message


def test_unknown_parameter_and_wrong_type_are_config_errors():
    registry = get_registry()
    with pytest.raises(Exception, match="unknown parameter 'grup'.*did you mean 'group'"):
        registry.create("pruner", "magnitude", {"grup": "row"})
    with pytest.raises(Exception, match="group='col' must be one of 'matrix', 'row'"):
        registry.create("pruner", "magnitude", {"group": "col"})


def test_plugins_command_table_and_json(capsys):
    assert main(["plugins"]) == 0
    table = capsys.readouterr().out
    header = table.splitlines()[0]
    assert all(word in header for word in ("name", "kind", "provided by", "version"))
    assert "wanda" in table and "decoder_llm" in table
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {(p["kind"], p["name"]): p for p in data["plugins"]}
    assert rows[("pruner", "wanda")]["provided_by"] == "strataprune"
    assert {"name", "kind", "provided_by", "version"} <= set(rows[("allocator", "uniform")])
    assert data["skipped"] == []


def test_import_strataprune_stays_lean():
    import subprocess
    import sys

    heavy = "('torch', 'transformers', 'onnxruntime', 'deepsparse')"
    code = f"import sys, strataprune; print(sorted(m for m in {heavy} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr

"""The plugin host: discovery, allow-list, plugin files, clear errors, hook docs."""

import inspect
import json
import sys
import textwrap
from pathlib import Path

import pytest

from bench import Method, factorize, hookimpl
from bench.api import hookspecs
from bench.cli import main
from bench.engine.plugins import load_registry
from bench.errors import UsageError

EXAMPLES = Path(__file__).parent.parent / "examples" / "plugins"


class EchoMethod(Method):
    name = "echo"

    def decompose(self, target, weight, context, config):
        return factorize(weight)


class FixturePlugin:
    __version__ = "9.9"

    @hookimpl
    def register_methods(self, register):
        register(EchoMethod())


@pytest.fixture
def fixture_registry():
    return load_registry(extra=[("fixture-plugin", FixturePlugin())])


def test_plugin_registered_in_a_fixture(fixture_registry):
    assert fixture_registry.get("method", "echo").name == "echo"
    info = {i["name"]: i for i in fixture_registry.describe()}["fixture-plugin"]
    assert info["version"] == "9.9" and info["hooks"] == ["register_methods"]
    assert info["provides"] == {"methods": ["echo"]}


def test_builtins_register_through_entry_points(registry):
    sources = {i["name"]: i["source"] for i in registry.describe()}
    assert sources["svd"] == "builtin" and sources["perplexity"] == "builtin" and sources["reports"] == "builtin"
    assert {"svd"} <= set(registry.methods) and {"wikitext2", "c4"} <= set(registry.tasks)
    assert {"gram", "abs_mean", "fisher", "grad_norm"} <= set(registry.statistics)
    assert {"compare", "check", "baseline"} <= set(registry.commands)


@pytest.fixture
def installed_distribution(tmp_path, monkeypatch):
    """A third-party distribution with svdbench entry-point metadata on sys.path."""
    (tmp_path / "thirdparty_method.py").write_text(textwrap.dedent("""
        from bench import Method, factorize, hookimpl

        class ThirdParty(Method):
            name = "thirdparty"
            def decompose(self, target, weight, context, config):
                return factorize(weight)

        @hookimpl
        def register_methods(register):
            register(ThirdParty())
    """))
    dist = tmp_path / "svdbench_thirdparty-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: svdbench-thirdparty\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text("[svdbench]\nthirdparty = thirdparty_method\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("thirdparty_method", None)


def test_entry_point_plugin_is_discovered_when_allowed(installed_distribution, monkeypatch):
    monkeypatch.setenv("SVDBENCH_PLUGINS", "thirdparty")
    registry = load_registry()
    assert "thirdparty" in registry.methods
    info = {i["name"]: i for i in registry.describe()}["thirdparty"]
    assert info["version"] == "1.2.3" and "svdbench-thirdparty" in info["source"]


def test_allow_list_keeps_third_party_plugins_out(installed_distribution, monkeypatch):
    monkeypatch.setenv("SVDBENCH_PLUGINS", "")
    registry = load_registry()
    assert "thirdparty" not in registry.methods and "svd" in registry.methods


def test_plugin_file_loaded_from_plugins_dir():
    registry = load_registry(plugins_dirs=[EXAMPLES])
    assert registry.get("method", "colnorm_svd").name == "colnorm_svd"


def test_duplicate_method_name_is_a_clear_error(tmp_path):
    (tmp_path / "dupe.py").write_text(textwrap.dedent("""
        from bench import hookimpl
        from methods.svd import VanillaSVD

        @hookimpl
        def register_methods(register):
            register(VanillaSVD())
    """))
    with pytest.raises(UsageError, match="method 'svd' is registered twice: by plugin 'svd' and by plugin 'dupe'"):
        load_registry(plugins_dirs=[tmp_path])


def test_unknown_method_suggests_the_closest(registry):
    with pytest.raises(UsageError, match=r"unknown method 'sv'; did you mean 'svd'\?"):
        registry.get("method", "sv")


def test_unreadable_plugin_file_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "broken.py").write_text("this is not python(\n")
    with pytest.raises(UsageError, match="cannot load plugin file .*broken.py"):
        load_registry(plugins_dirs=[tmp_path])
    assert main(["--plugins-dir", str(tmp_path), "plugins"]) == 2
    assert "cannot load plugin file" in capsys.readouterr().err


def test_plugins_command_prints_json(capsys):
    assert main(["--plugins-dir", str(EXAMPLES), "plugins"]) == 0
    plugins = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert plugins["colnorm_svd"]["hooks"] == ["register_methods"]
    assert plugins["colnorm_svd"]["version"] == "0.1"


# Meta-tests keep the plugin API honest (after datasette): every hook is
# documented with its parameters, and every hook has a test named after it.
HOOKS = [name for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "svdbench_spec")]


def test_hooks_exist():
    assert set(HOOKS) == {"register_methods", "register_tasks", "register_statistics", "register_commands",
                          "register_layouts", "write_report"}


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_and_typed(hook):
    function = getattr(hookspecs, hook)
    doc = inspect.getdoc(function)
    for parameter in inspect.signature(function).parameters:
        assert f":param {parameter}:" in doc
        assert inspect.signature(function).parameters[parameter].annotation is not inspect.Parameter.empty
    assert ":returns:" in doc


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    assert f"test_hook_{hook}" in globals()


def test_hook_register_methods(fixture_registry):
    assert "echo" in fixture_registry.methods


def test_hook_register_tasks(registry):
    [(name, metric)] = registry.get("task", "wikitext2").metrics.items()
    assert name == "perplexity" and metric.kind == "perplexity" and metric.higher_is_better is False


def test_hook_register_layouts(registry):
    """The built-in quantizers' layouts are there; a plugin's is tested end to end in test_plugin_quantizer.py."""
    from bench.model.layouts import QUANTIZED_LAYOUTS

    assert {"hqq", "gptq"} <= set(QUANTIZED_LAYOUTS) and registry.items["layout"] == {}


def test_hook_register_statistics(registry):
    assert registry.get("statistic", "gram").needs_backward is False
    assert registry.get("statistic", "fisher").needs_backward is True


def test_hook_register_commands(registry, tmp_path, capsys):
    assert {"compare", "check", "baseline"} <= set(registry.commands)
    (tmp_path / "hello.py").write_text(textwrap.dedent("""
        from bench import Command, hookimpl

        class Hello(Command):
            name = "hello"
            help = "say hello"

            def configure(self, parser):
                parser.add_argument("--who", default="world")

            def run(self, args, invoke):
                print(f"hello {args.who}")
                return invoke(["plugins"])  # another command line, with the same --plugins-dir

        @hookimpl
        def register_commands(register):
            register(Hello())
    """))
    assert main(["--plugins-dir", str(tmp_path), "hello", "--who", "tests"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("hello tests\n") and '"name": "hello"' in out


def test_a_command_may_not_take_a_host_command_name(tmp_path, capsys):
    (tmp_path / "clash.py").write_text(textwrap.dedent("""
        from bench import Command, hookimpl

        class Run(Command):
            name = "run"

        @hookimpl
        def register_commands(register):
            register(Run())
    """))
    assert main(["--plugins-dir", str(tmp_path), "plugins"]) == 2
    assert "plugin command 'run' clashes with svdbench's own" in capsys.readouterr().err


def test_hook_write_report(tmp_path):
    from synthetic_results import synthetic_results

    written = []

    class ExtraReport:
        @hookimpl
        def write_report(self, results, out_dir, with_published):
            path = out_dir / "extra.txt"
            path.write_text(f"{len(results['records'])} records")
            written.append(path)
            return [path]

    registry = load_registry(extra=[("extra-report", ExtraReport())])
    data = synthetic_results(zero_shot=False, budgets=False, quantized=False, throughput=False)
    paths = [p for paths in registry.hook.write_report(results=data, out_dir=tmp_path, with_published=False)
             for p in paths]
    assert written and written[0] in paths  # every implementation runs: the built-in report and this one
    assert (tmp_path / "report.md") in paths and (tmp_path / "extra.txt").read_text() == f"{len(data['records'])} records"


def test_method_instances_are_per_run_copies(registry):
    """``method_factory`` configures a copy; the registered prototype keeps its defaults."""
    prototype = registry.get("method", "asvd")
    create = registry.method_factory({"asvd": {"alpha": "0.25", "allocation": "uniform"}})
    method = create("asvd")
    assert method is not prototype and method.config.alpha == 0.25 and method.config.allocation == "uniform"
    assert prototype.config.alpha == 0.5 and create("asvd") is not method
    assert registry.method_factory({"asvd": {"alpha": 0.75}})("asvd").config.alpha == 0.75  # typed values too
    with pytest.raises(UsageError, match="asvd has no setting 'foo'; its settings are: alpha, eps"):
        create_bad = registry.method_factory({"asvd": {"foo": "1"}})
        create_bad("asvd")
    with pytest.raises(UsageError, match="asvd.alpha='x' is not a float"):
        registry.method_factory({"asvd": {"alpha": "x"}})("asvd")
    quant = registry.method_factory({"svdllm_quant": {"base": "svdllm"}, "svdllm": {"update_steps": "3"}})("svdllm_quant")
    assert quant.base.name == "svdllm" and quant.base.config.update_steps == 3  # parts configured for the same run
    assert quant.settings()["base_config"]["update_steps"] == 3

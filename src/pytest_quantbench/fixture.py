"""The ``quantbench`` fixture: the run's cached baseline and one-item measurements inside any
pytest test.

A test asks for ``quantbench`` and gets a session-scoped :class:`Quantbench` built on the same
:class:`~pytest_quantbench.session.QuantbenchSession` as the generated items (model, corpus,
n_ctx, chunks, engine from the CLI / ini / YAML):

* ``quantbench.baseline``: the baseline logits file (computed once across xdist workers and runs);
* ``quantbench.measure(tensors=..., qtype=...)``: one item's worth, through the session's
  type plan, engine choice, measurement and results store (so it equals the generated item of
  the same tensors and qtype, and a rerun reuses it);
* ``quantbench.measure_file(path)``: a whole quantized GGUF against the baseline;
* ``quantbench.check(stats, max_kld=..., ...)``: the thresholds file's limits and messages.

Each measurement becomes a row of the result tables under the test's node id: it is recorded
in the test's ``user_properties`` (and so in its JUnit properties) with the same keys as an
item's row; the n-th measurement of a test (n ≥ 2) has its keys suffixed ``#n``. The plugin
registers this module (:func:`register`); importing it costs nothing but pytest.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest

_SESSION_GETTER = pytest.StashKey[Callable[[], Any]]()
_TO_BUILTIN = pytest.StashKey[Callable[[Any], Any]]()
_CURRENT_ITEM = pytest.StashKey[Any]()

#: The fixture's error when no quantbench setting is given anywhere.
MISSING_SETTINGS = (
    "the quantbench fixture needs a model and a corpus, and no quantbench setting is given: "
    "pass --quantbench-model PATH and --quantbench-corpus PATH, or set quantbench_model and "
    "quantbench_corpus in the ini file, or model and corpus in quantbench.yaml (any one "
    "quantbench setting, e.g. quantbench_chunks = 2, uses the default SmolLM2-135M-Instruct "
    "model and corpus)"
)

#: Characters the suite's unquoted CSV cannot hold in a column name (report.py's rule).
_CSV_UNSAFE = str.maketrans({",": ";", '"': "'", "\n": " ", "\r": " "})


def register(
    config: pytest.Config, get_session: Callable[[], Any], to_builtin: Callable[[Any], Any]
) -> None:
    """Make the ``quantbench`` fixture available in ``config``'s run.

    get_session: returns the process's QuantbenchSession, or None when quantbench is not
    configured (the fixture then raises :data:`MISSING_SETTINGS` as a ``pytest.UsageError``);
    to_builtin: turns a row value into the builtin type reports carry (the plugin's, as for
    items' rows).
    """
    config.stash[_SESSION_GETTER] = get_session
    config.stash[_TO_BUILTIN] = to_builtin
    module = sys.modules[__name__]
    if not config.pluginmanager.is_registered(module):
        config.pluginmanager.register(module, "quantbench-fixture")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Remember the running test: its measurements go into its ``user_properties``."""
    item.config.stash[_CURRENT_ITEM] = item


@pytest.fixture(scope="session")
def quantbench(request: pytest.FixtureRequest) -> Quantbench:
    """The run's baseline and measurements for a test's own assertions (:class:`Quantbench`).

    Raises pytest.UsageError naming the settings when quantbench is not configured.
    """
    config = request.config
    session = config.stash.get(_SESSION_GETTER, lambda: None)()
    if session is None:
        raise pytest.UsageError(MISSING_SETTINGS)
    return Quantbench(
        session, lambda: config.stash.get(_CURRENT_ITEM, None), config.stash[_TO_BUILTIN]
    )


class Baseline:
    """The run's baseline logits, as cached for the items (llama-perplexity's
    ``--kl-divergence-base`` format, docs/llama-perplexity.md#base-file).

    Attributes: ``path`` (the file), ``n_ctx`` (C, tokens per chunk), ``n_vocab`` (V),
    ``n_chunk``, ``first`` (C // 2, the first scored position), ``n_scored``
    (S = C − 1 − C // 2, scored positions per chunk), ``tokens`` (int32 (n_chunk, C), read-only,
    the corpus tokens of every chunk).

    The file keeps log-probabilities, not raw logits: each scored row is stored as
    log-softmax of the logits, clamped at max − 24 nats and quantized to 16 bits (the format's
    precision). Log-probs equal the logits minus the row's log-sum-exp, so every softmax-based
    quantity (probabilities, entropy, top token, KLD) is the logits'.
    """

    def __init__(self, file) -> None:
        self.file = file
        self.path: Path = file.path
        self.n_ctx: int = file.n_ctx
        self.n_vocab: int = file.n_vocab
        self.n_chunk: int = file.n_chunk
        self.first: int = file.first
        self.n_scored: int = file.n_scored
        self.tokens = file.tokens

    def __repr__(self) -> str:
        return (
            f"Baseline({self.path.name}, n_ctx={self.n_ctx}, n_chunk={self.n_chunk}, "
            f"n_vocab={self.n_vocab})"
        )

    def logprobs(self, chunk: int):
        """Base log-probabilities (nats) of chunk ``chunk``'s scored positions: a new float32
        array (S, V); row j is the distribution after token ``first + j``. Raises IndexError for
        a chunk out of range."""
        return self.file.chunk_logprobs(chunk)

    def probs(self, chunk: int):
        """Base probabilities of chunk ``chunk``'s scored positions: float32 (S, V), rows sum to
        1 up to the format's clamping and rounding."""
        import numpy as np

        return np.exp(self.logprobs(chunk))

    def targets(self, chunk: int):
        """The token each scored position predicts: int32 (S,), ``tokens[chunk, first+1:]``."""
        return self.file.targets(chunk)

    def chunks(self) -> Iterator[tuple[int, Any, Any]]:
        """``(chunk index, logprobs (S, V) float32, targets (S,) int32)`` for every chunk."""
        for i in range(self.n_chunk):
            yield i, self.logprobs(i), self.targets(i)


class Measurement:
    """The statistics of one measurement, as an item's.

    Attributes: every field of :class:`~pytest_quantbench.metrics.KLDStats` (``mean_kld``,
    ``mean_kld_err``, ``ppl_ratio``, ``ppl_ratio_err``, ``same_top_p`` (percent), ``rms_dp``, …;
    KLD in nats, Δp and same-top-p in percent, ``*_err`` the ± of the field) and the row's facts
    (``tensor``: the table label, ``qtype``, ``members``, ``requested_type``,
    ``written_type``, ``engine_mode``, ``reused``). ``stats`` and ``row`` are the dicts.
    """

    def __init__(self, stats: dict[str, Any], row: dict[str, Any]) -> None:
        self.stats = dict(stats)
        self.row = dict(row)

    def __getattr__(self, name: str) -> Any:
        for part in ("stats", "row"):
            values = self.__dict__.get(part, {})
            if name in values:
                return values[name]
        raise AttributeError(
            f"Measurement has no {name!r}; statistics: {', '.join(self.__dict__.get('stats', {}))}"
        )

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"Measurement({self.row.get('members')} as {self.row.get('qtype')}: mean_kld "
            f"{s['mean_kld']:.6f} ± {s['mean_kld_err']:.6f}, ppl_ratio {s['ppl_ratio']:.4f} "
            f"± {s['ppl_ratio_err']:.4f}, same_top_p {s['same_top_p']:.3f} ± "
            f"{s['same_top_p_err']:.3f}%)"
        )


class Quantbench:
    """What the ``quantbench`` fixture gives a test.

    Args:
        session: the process's :class:`~pytest_quantbench.session.QuantbenchSession`.
        current_item: returns the running test item (its ``user_properties`` get the rows).
        to_builtin: a row value as a builtin type (reports travel through execnet).
    """

    def __init__(
        self,
        session,
        current_item: Callable[[], Any],
        to_builtin: Callable[[Any], Any] = lambda value: value,
    ) -> None:
        self.session = session
        self._current_item = current_item
        self._to_builtin = to_builtin
        self._counts: dict[str, int] = {}

    @cached_property
    def baseline(self) -> Baseline:
        """The run's cached baseline (:class:`Baseline`), computed once across xdist workers
        and runs. Raises KLDBaseFormatError / ValueError (a user base file that does not fit),
        EngineError."""
        return Baseline(self.session.baseline)

    def tensors(self, tensors: str | Sequence[str]) -> tuple[str, ...]:
        """The quantizable tensors of the model that ``tensors`` names, in natural order.

        tensors: a regex (searched in each name, as the selection rules do,
        docs/suite-formats.md#selection) or a list of exact names.
        Raises ValueError naming what matched nothing.
        """
        from .selection import compile_regex, is_quantizable_tensor, natural_key

        header = self.session.model_header
        eligible = [t.name for t in header.tensors if is_quantizable_tensor(t.name, t.n_dims)]
        if isinstance(tensors, str):
            pattern = compile_regex(tensors)
            names = [n for n in eligible if pattern.search(n)]
            if not names:
                raise ValueError(
                    f"quantbench.measure: tensors={tensors!r} matches no "
                    f"quantizable tensor of {self.session.model_path.name} "
                    f"(e.g. {', '.join(eligible[:3])})"
                )
        else:
            names = list(dict.fromkeys(tensors))
            unknown = [n for n in names if n not in eligible]
            if unknown or not names:
                raise ValueError(
                    f"quantbench.measure: {unknown or 'no tensor'} is not a "
                    f"quantizable tensor of {self.session.model_path.name} "
                    f"(e.g. {', '.join(eligible[:3])})"
                )
        return tuple(sorted(names, key=natural_key))

    def measure(self, tensors: str | Sequence[str], qtype: str) -> Measurement:
        """Quantize ``tensors`` to ``qtype`` together (one item's worth) and measure them against
        the baseline.

        tensors: see :meth:`tensors`; qtype: a ggml type or llama-quantize preset name
        (``q4_0``, ``Q4_K_M``). Goes through the items' path: written types and fallbacks,
        imatrix needs, in-process swap or llama-quantize file, results store (stored statistics
        of the same tensors, qtype and settings are reused unless ``--quantbench-rerun``).
        Returns the :class:`Measurement`; records its row on the running test.
        Raises pytest's skip for a fallback type or a missing imatrix (as items skip),
        UnknownQTypeError / ValueError for bad arguments, EngineError.
        """
        from .measure import ItemSkip, WorkUnit
        from .qtypes import qtype_label, resolve_qtype

        names = self.tensors(tensors)
        unit = WorkUnit(name=self._label(), tensors=names, qtype=qtype_label(resolve_qtype(qtype)))
        row = self.session.identity_row(unit)
        try:
            stats = self.session.measure(unit, row)
        except ItemSkip as exc:
            row["reason"] = str(exc)
            self._record(row)
            pytest.skip(str(exc))
        return self._finish(stats, row)

    def measure_file(self, path: str | Path) -> Measurement:
        """Measure a whole quantized GGUF of the baseline model against the baseline.

        path: the GGUF (the first shard of a split model), relative to the working directory.
        The file must have the baseline's architecture, vocabulary, tensor names and shapes
        (:func:`~pytest_quantbench.filecheck.file_problems`). Its row's ``qtype`` is the file
        name, ``members`` the path, ``written_type`` its tensor types. Stored by the file's
        sha256, so a rerun reuses it. Returns the :class:`Measurement`.
        Raises FileNotFoundError, GGUFError, ValueError (not the baseline's model), EngineError.
        """
        from .filecheck import file_problems
        from .gguf import read_model_header
        from .inputs import sha256_file
        from .measure import WorkUnit

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"quantbench.measure_file: {path} does not exist")
        header = read_model_header(path)
        problems = file_problems(self.session.model_header, header)
        if problems:
            raise ValueError(
                f"quantbench.measure_file: {path} is not a quantization of "
                f"{self.session.model_path.name}: " + "; ".join(problems)
            )
        digest = sha256_file(path, self.session.cache_dir)
        unit = WorkUnit(
            name=self._label(), tensors=(f"file:{digest}",), qtype=path.name.translate(_CSV_UNSAFE)
        )
        row = {
            **self.session.identity_row(unit),
            "members": str(path),
            "requested_type": "file",
            "written_type": " ".join(sorted({t.type_name for t in header.tensors})),
        }

        def evaluate_file(unit, row):
            from .engine.llama import LlamaModel
            from .measure import evaluate
            from .metrics import KLDAccumulator

            acc = KLDAccumulator()
            base = self.session.baseline
            row["engine_mode"] = "file"
            with LlamaModel(path, self.session.inputs.eval_settings) as model:
                evaluate(model, base, acc, self.session.chunk_buffers)
            return acc.stats()

        stats = self.session.results.reuse_or_measure(unit, row, evaluate_file)
        return self._finish(stats, row)

    def check(self, stats: Measurement, **limits: float) -> Measurement:
        """Fail the test when ``stats`` breaks a limit, with the thresholds file's semantics and
        message (value ± uncertainty, the limit; README.md, "Thresholds").

        limits: thresholds-file keys (``max_kld``, ``max_ppl_ratio``, ``max_ppl_increase_pct``,
        ``max_rms_dp``, ``min_same_top_p`` (percent), ``max_kld_p99``, …) → limit.
        Returns ``stats`` when every limit holds. Raises TypeError for an unknown key,
        ThresholdsError for a bad limit, pytest's failure for a broken limit.
        """
        from .thresholds import LIMIT_SPECS, ThresholdRule, Thresholds, _parse_limit

        unknown = sorted(set(limits) - set(LIMIT_SPECS))
        if unknown:
            raise TypeError(
                f"quantbench.check: unknown limit(s) {', '.join(unknown)}; "
                f"use {', '.join(LIMIT_SPECS)}"
            )
        parsed = {k: _parse_limit(k, v, "quantbench.check") for k, v in limits.items()}
        rule = ThresholdRule(
            index=None, tensor=None, pattern=None, limits=parsed, describe="quantbench.check"
        )
        violations = Thresholds([rule]).check(stats.tensor, stats.qtype, stats.stats)
        if violations:
            pytest.fail("\n".join(v.message for v in violations), pytrace=False)
        return stats

    # ---- rows --------------------------------------------------------------------------------
    def _nodeid(self) -> str:
        item = self._current_item()
        return item.nodeid if item is not None else "quantbench-fixture"

    def _label(self) -> str:
        """The table label of the next measurement of the running test: its node id, ``#n``
        added for the n-th (n ≥ 2); characters the CSV cannot hold replaced."""
        nodeid = self._nodeid()
        n = self._counts.get(nodeid, 0) + 1
        return (nodeid if n == 1 else f"{nodeid}#{n}").translate(_CSV_UNSAFE)

    def _finish(self, stats: dict[str, Any], row: dict[str, Any]) -> Measurement:
        row.update(stats)
        self._record(row)
        return Measurement(stats, row)

    def _record(self, row: dict[str, Any]) -> None:
        """Add ``row`` to the running test's ``user_properties`` (keys suffixed ``#n`` for its
        n-th measurement, n ≥ 2), where the controller's collector and JUnit XML read it."""
        nodeid = self._nodeid()
        n = self._counts[nodeid] = self._counts.get(nodeid, 0) + 1
        item = self._current_item()
        if item is None:
            return
        suffix = "" if n == 1 else f"#{n}"
        item.user_properties.extend((f"{k}{suffix}", self._to_builtin(v)) for k, v in row.items())
        # the measured row leaves this process on the test's call report; the controller stores
        # it (pytest_quantbench.storewriter: one writer per store)
        from .storewriter import FIXTURE_PAYLOADS, handoff

        payload = handoff(self.session, row.get("tensor"), row.get("qtype"))
        if payload is not None:
            payloads = getattr(item, FIXTURE_PAYLOADS, None) or {}
            payloads[suffix] = payload
            setattr(item, FIXTURE_PAYLOADS, payloads)


def measurement_rows(props: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Split a test's ``user_properties`` into its measurements' rows.

    props: property name → value. Returns ``(suffix, row)`` per measurement, in order: ``("",
    row)`` from the plain keys (the first measurement, or an item's row), ``("#n", row)`` from
    the keys ending in ``#n``. Rows without ``qtype`` and ``model_sha256`` are left out.
    """
    rows: dict[str, dict[str, Any]] = {}
    for key, value in props.items():
        name, sep, n = key.rpartition("#")
        if sep and n.isdigit():
            rows.setdefault(f"#{n}", {})[name] = value
        else:
            rows.setdefault("", {})[key] = value
    return [
        (suffix, row) for suffix, row in rows.items() if "qtype" in row and "model_sha256" in row
    ]

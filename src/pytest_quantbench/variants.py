"""Whole quantized models as items: existing GGUF files (``variant[<stem>]``) and recipes
(``recipe[<stem>]``), measured whole against the baseline.

* :func:`whole_units` plans the work units (column ``variant`` / ``recipe``, one row per file
  stem) and checks, before any evaluation, that each file fits the baseline
  (:func:`check_compatible`: architecture, vocabulary size and tokens, tensor names and shapes);
* :func:`file_facts` gives a row's file size, bits per weight and per-class type summary
  (:func:`recipe_facts`: the same from a recipe's plan, without the file);
* :func:`recipe_changes` / :func:`write_recipe_model` turn a recipe into the llama-quantize
  variant it describes; :func:`evaluate_gguf` evaluates any GGUF with the session's chunk loop.

:func:`measure_whole` measures these units (the session dispatches them to it): a variant file
as it is, a recipe in process (the tensors it changes swapped into the loaded baseline) or, where
the in-process engine cannot, written with llama-quantize.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .selection import natural_key, tensor_kind

__all__ = [
    "RECIPE",
    "VARIANT",
    "VariantError",
    "check_compatible",
    "evaluate_gguf",
    "file_facts",
    "measure_whole",
    "recipe_changes",
    "recipe_facts",
    "recipe_fallbacks",
    "type_summary",
    "whole_units",
    "write_recipe_model",
]

#: Column (work-unit name) of whole-file items and of recipe items in the wide tables.
VARIANT = "variant"
RECIPE = "recipe"


class VariantError(ValueError):
    """A variant file or recipe that does not fit the baseline (a usage error: exit 4)."""


def _stem(path: Path) -> str:
    """``Model-Q4_K_M.gguf`` → ``Model-Q4_K_M``; a split model's first shard
    ``M-00001-of-00003.gguf`` → ``M``; ``x.recipe`` / ``x.recipe.txt`` → ``x``."""
    from .gguf import _SPLIT_RE

    m = _SPLIT_RE.match(path.name)
    if m:
        return m.group("prefix")
    name = path.name
    for suffix in (".recipe.txt", ".recipe", ".gguf"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def check_compatible(base, other, what: str) -> None:
    """Raise VariantError naming the first difference between two GGUF headers.

    Checked in order: ``general.architecture``; vocabulary size; the vocabulary's tokens (first
    differing index); tensor names (first missing, first extra); tensor shapes (first differing
    tensor). Types and data may differ: that is what a variant is.
    Args: base: the baseline's GGUFHeader; other: the variant's; what: how messages name it.
    """
    if base.architecture != other.architecture:
        raise VariantError(
            f"{what}: architecture {other.architecture!r} differs from the "
            f"baseline's {base.architecture!r}"
        )
    if base.n_vocab != other.n_vocab:
        raise VariantError(
            f"{what}: vocabulary of {other.n_vocab} tokens, the baseline has {base.n_vocab}"
        )
    a = base.metadata.get("tokenizer.ggml.tokens")
    b = other.metadata.get("tokenizer.ggml.tokens")
    if a is not None and b is not None and tuple(a) != tuple(b):
        i = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
        raise VariantError(
            f"{what}: token {i} is {b[i]!r}, the baseline's is {a[i]!r} (another tokenizer)"
        )
    mine = {t.name: t for t in base.tensors}
    theirs = {t.name: t for t in other.tensors}
    missing = sorted(set(mine) - set(theirs), key=natural_key)
    if missing:
        raise VariantError(
            f"{what}: has no tensor {missing[0]!r} (and {len(missing) - 1} more "
            "missing) that the baseline has"
        )
    extra = sorted(set(theirs) - set(mine), key=natural_key)
    if extra:
        raise VariantError(f"{what}: has tensor {extra[0]!r} that the baseline lacks")
    for name in sorted(mine, key=natural_key):
        if mine[name].shape != theirs[name].shape:
            raise VariantError(
                f"{what}: tensor {name} has shape {list(theirs[name].shape)}, "
                f"the baseline's is {list(mine[name].shape)}"
            )


def type_summary(types: Mapping[str, str]) -> str:
    """Per tensor class (kind) the ggml types it has, most frequent first:
    ``attn_q=iq4_ks,attn_v=q4_K/q6_K,…`` (classes in natural order).

    Args: types: tensor name → ggml type name (1-D tensors are best left out by the caller).
    """
    by_kind: dict[str, Counter] = {}
    for name, t in types.items():
        by_kind.setdefault(tensor_kind(name), Counter())[t] += 1
    return ",".join(
        f"{kind}={'/'.join(t for t, _ in by_kind[kind].most_common())}"
        for kind in sorted(by_kind, key=natural_key)
    )


def file_facts(header) -> dict[str, Any]:
    """Row fields of a whole GGUF: ``file_size`` (bytes of all shards), ``bpw`` (8 × tensor-data
    bytes / weights, all tensors), ``types`` (:func:`type_summary` of the ≥2-D tensors) and
    ``written_type`` (the distinct types, sorted)."""
    shards = header.shards or (header.path,)
    n_elements = sum(t.n_elements for t in header.tensors)
    matrices = {t.name: t.type_name for t in header.tensors if t.n_dims >= 2}
    return {
        "file_size": sum(os.path.getsize(p) for p in shards),
        "bpw": round(8.0 * header.n_bytes / n_elements, 6) if n_elements else None,
        "types": type_summary(matrices),
        "written_type": ",".join(sorted(set(matrices.values()))),
    }


def whole_units(
    variants: Iterable[Path],
    recipes: Iterable[Path],
    base_header,
    digest: Callable[[Path], str],
    warn: Callable[[str], None],
):
    """Work units of ``--quantbench-variant`` files and ``--quantbench-recipe`` files.

    Each unit is ``WorkUnit(name="variant"|"recipe", tensors=("sha256:<file digest>",),
    qtype=<file stem>)``, so its id is ``variant[<stem>]`` and its results-store key changes
    with the file's content.
    Args: base_header: the baseline's GGUFHeader; digest: sha256 of a file (hex; the session's
        cached one); warn: called for recipe lines that match no tensor.
    Raises: VariantError (a file missing, of another model, two files with one stem),
        RecipeError (a bad recipe line), GGUFError (not a GGUF): usage errors.
    """
    from .gguf import read_model_header
    from .measure import WorkUnit
    from .recipes import apply_recipe, read_recipe, written_types

    units: list[WorkUnit] = []
    seen: dict[tuple[str, str], Path] = {}
    for kind, paths in ((VARIANT, variants), (RECIPE, recipes)):
        for path in paths:
            path = Path(path)
            if not path.is_file():
                raise VariantError(f"--quantbench-{kind} {path} does not exist")
            stem = _stem(path)
            if (kind, stem) in seen:
                raise VariantError(
                    f"--quantbench-{kind}: {path} and {seen[(kind, stem)]} have "
                    f"the same name {stem!r}; rename one"
                )
            seen[(kind, stem)] = path
            key = digest(path)
            if kind == VARIANT:
                header = read_model_header(path)
                check_compatible(base_header, header, f"variant {path.name}")
                if len(header.shards) > 1:  # every shard's content is part of the key
                    key = hashlib.sha256(
                        "".join(digest(Path(s)) for s in header.shards).encode()
                    ).hexdigest()
            else:
                recipe = read_recipe(path)
                written_types(
                    apply_recipe(recipe, [t.name for t in base_header.tensors], warn=warn),
                    base_header,
                )
            units.append(WorkUnit(name=kind, tensors=(f"sha256:{key}",), qtype=stem))
    return units


def recipe_changes(recipe_path: Path, base_header) -> dict[str, str]:
    """Tensor → ggml type name llama-quantize writes for the recipe, for every tensor whose type
    changes from the baseline (row-length fallbacks applied: recipes.written_types)."""
    from .recipes import apply_recipe, read_recipe, written_types

    planned = written_types(
        apply_recipe(read_recipe(recipe_path), [t.name for t in base_header.tensors]), base_header
    )
    return {n: t.name for n, t in planned.items() if t.name != base_header.tensor(n).type_name}


def recipe_fallbacks(recipe_path: Path, base_header) -> list[str]:
    """One sentence per quantizable tensor for which llama-quantize writes another type than the
    recipe asks (row-length / row-count fallbacks, qtypes.predict_written_type), in natural
    order; empty when the recipe is written as asked."""
    from .recipes import apply_recipe, read_recipe, written_types
    from .selection import is_quantizable_tensor

    requested = apply_recipe(read_recipe(recipe_path), [t.name for t in base_header.tensors])
    planned = written_types(requested, base_header)
    out = []
    for name in sorted(requested, key=natural_key):
        info = base_header.tensor(name)
        if is_quantizable_tensor(name, info.n_dims) and planned[name].name != requested[name].name:
            out.append(
                f"llama-quantize writes {planned[name].name} instead of "
                f"{requested[name].name} for {name}"
            )
    return out


def write_recipe_model(
    model: Path,
    recipe_path: Path,
    base_header,
    dest: Path,
    *,
    baseline_type: str,
    threads: int,
    imatrix: Path | None,
) -> dict[str, str]:
    """Write the recipe's model with llama-quantize (engine/quantize.run_llama_quantize) and
    check the written types against the plan.

    Returns: the changed tensors' types. Raises: EngineError when llama-quantize fails or writes
        other types than planned (naming the first tensors).
    """
    from .engine.llama import EngineError
    from .engine.quantize import run_llama_quantize
    from .gguf import read_model_header

    changes = recipe_changes(recipe_path, base_header)
    run_llama_quantize(
        model, dest, changes, baseline_type=baseline_type, threads=threads, imatrix=imatrix
    )
    written = {t.name: t.type_name for t in read_model_header(dest).tensors}
    expected = {t.name: changes.get(t.name, t.type_name) for t in base_header.tensors}
    wrong = sorted((n for n in expected if written.get(n) != expected[n]), key=natural_key)
    if wrong:
        raise EngineError(
            f"llama-quantize wrote {[written.get(n) for n in wrong[:5]]} for "
            f"{wrong[:5]} where the recipe plans {[expected[n] for n in wrong[:5]]}"
        )
    return changes


def evaluate_gguf(path: Path, settings, base, evaluate: Callable[..., None], buffers=None):
    """Evaluate every chunk of the baseline ``base`` with the model in ``path``.

    Args: settings: the session's eval settings (engine.llama.EvalSettings); base: the loaded
        baseline logits (kldbase.KLDBaseFile); evaluate: the session's chunk loop
        ``evaluate(model, base, acc, buffers)``.
    Returns: metrics.KLDStats.
    """
    from .engine.llama import LlamaModel
    from .metrics import KLDAccumulator

    acc = KLDAccumulator()
    with LlamaModel(Path(path), settings) as model:
        evaluate(model, base, acc, buffers)
    return acc.stats()


def recipe_facts(base_header, changes: Mapping[str, str]) -> dict[str, Any]:
    """:func:`file_facts` of the file llama-quantize would write for a recipe, from the plan
    alone (the in-process engine writes no file): ``bpw`` from each written type's real
    ``ggml_nbytes`` (:func:`gguf.tensor_nbytes`, as a header's ``n_bytes``), ``types`` and
    ``written_type``; no ``file_size`` (the metadata llama-quantize adds is not known).

    Args: base_header: the baseline's GGUFHeader; changes: tensor → ggml type name written where
        it differs from the baseline (:func:`recipe_changes`).
    """
    from .gguf import tensor_nbytes
    from .qtypes import TYPES_BY_NAME

    n_bytes = sum(
        tensor_nbytes(TYPES_BY_NAME[changes[t.name]], t.shape) if t.name in changes else t.n_bytes
        for t in base_header.tensors
    )
    n_elements = sum(t.n_elements for t in base_header.tensors)
    matrices = {
        t.name: changes.get(t.name, t.type_name) for t in base_header.tensors if t.n_dims >= 2
    }
    return {
        "bpw": round(8.0 * n_bytes / n_elements, 6) if n_elements else None,
        "types": type_summary(matrices),
        "written_type": ",".join(sorted(set(matrices.values()))),
    }


def measure_whole(
    unit, path: Path, row: dict[str, Any], *, inputs, planner, engines, baseline, buffers=None
):
    """Measure a ``variant`` or ``recipe`` unit against the baseline logits.

    A variant file is evaluated as it is (engine ``file``). A recipe is measured like an item
    whose members are the tensors it changes: in process (every changed tensor quantized in
    memory and swapped in at once, :func:`measure.measure_inplace`) where
    ``engines.choose_engine`` allows it, else written with llama-quantize in the work dir (the
    run's importance matrix and baseline type), evaluated and removed; the kernel probe runs
    once per written type as for single items. ``row`` gets ``requested_type``,
    ``engine_mode`` (and ``engine_note``), ``bpw``, ``types``, ``written_type``, ``seconds``,
    ``file_size`` (variant files and recipes written to a file) and ``kernel_probe_kld``.

    Args: unit: the :class:`~measure.WorkUnit` (:func:`whole_units`); path: the file given on
        the command line; inputs: the run's RunInputs; planner: its TypePlanner (imatrix
        checks); engines: its EngineChoice; baseline: its RunBaseline (``.file`` is computed on
        first use, after the skips); buffers: the session's ChunkBuffers.
    Returns: metrics.KLDStats. Raises: ItemSkip (a fallback without --quantbench-allow-fallback,
        a type without importance-matrix data, a broken kernel), EngineError, OSError.
    """
    import time

    from .gguf import read_model_header
    from .measure import ItemSkip, WorkUnit, evaluate, measure_inplace
    from .metrics import KLDAccumulator
    from .qtypes import TYPES_BY_NAME, GGMLType

    started = time.perf_counter()
    if unit.name == VARIANT:
        row.update(requested_type=f"file {path.name}", engine_mode="file")
        row.update(file_facts(read_model_header(path)))
        stats = evaluate_gguf(path, inputs.eval_settings, baseline.file, evaluate, buffers)
        row["seconds"] = round(time.perf_counter() - started, 3)
        return stats
    header = inputs.model_header
    row["requested_type"] = f"recipe {path.name}"
    fallbacks = recipe_fallbacks(path, header)
    if fallbacks:  # as for single items: skipped unless --quantbench-allow-fallback
        more = f" (and {len(fallbacks) - 1} more)" if len(fallbacks) > 1 else ""
        row.update(fallback=True, reason=f"recipe {path.name}: {fallbacks[0]}{more}")
        if not inputs.config.allow_fallback:
            raise ItemSkip(row["reason"])
    changes = recipe_changes(path, header)
    written = {name: TYPES_BY_NAME[tname] for name, tname in changes.items()}
    for name, wtype in written.items():
        problem = planner._imatrix_problem(name, wtype)
        if problem:
            raise ItemSkip(f"recipe {path.name}: {problem}")
    row.update(recipe_facts(header, changes))
    engine, note = engines.choose_engine(WorkUnit(unit.name, tuple(written), unit.qtype))
    row["engine_mode"] = engine
    if note:
        row["engine_note"] = note
    base = baseline.file
    first_of_type: dict[str, tuple[str, GGMLType]] = {}
    for name, wtype in written.items():
        first_of_type.setdefault(wtype.name, (name, wtype))
    probes = [engines.check_kernel(name, wtype, base) for name, wtype in first_of_type.values()]
    probes = [k for k in probes if k is not None]
    if probes:
        row["kernel_probe_kld"] = max(probes)
    if engine == "inplace":
        acc = KLDAccumulator()
        measure_inplace(engines.swap_model, header, inputs.imatrix, written, base, acc, buffers)
        stats = acc.stats()
    else:
        dest = inputs.work_dir / f"recipe-{unit.qtype}.gguf"
        try:
            write_recipe_model(
                inputs.model_path,
                path,
                header,
                dest,
                baseline_type=inputs.config.baseline_qtype,
                threads=inputs.threads,
                imatrix=inputs.imatrix_path,
            )
            row.update(file_facts(read_model_header(dest)))
            stats = evaluate_gguf(dest, inputs.eval_settings, base, evaluate, buffers)
        finally:
            dest.unlink(missing_ok=True)
    row["seconds"] = round(time.perf_counter() - started, 3)
    return stats

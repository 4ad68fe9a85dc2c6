"""Whether a whole quantized GGUF can be measured against the baseline: same architecture, same
vocabulary, same tensors with the same shapes (only the types may differ).

Used by the ``quantbench`` fixture's ``measure_file``; the variant items of the recipes branch
make the same checks (to be unified there). Reads GGUF headers only.
"""

from __future__ import annotations

#: How many differing tensors a message names before it counts the rest.
SHOWN = 5


def file_problems(baseline_header, header) -> list[str]:
    """Why ``header``'s model cannot be compared with the baseline, or [] when it can.

    baseline_header / header: :class:`~pytest_quantbench.gguf.GGUFHeader` of the baseline and of
    the quantized file. Checks ``general.architecture``, the vocabulary size
    (:attr:`GGUFHeader.n_vocab`), the tensor names and each tensor's shape (ne0, ne1, …). A
    quantized file of the same model differs in tensor types only. Raises nothing.
    """
    problems = []
    if header.architecture != baseline_header.architecture:
        problems.append(
            f"architecture {header.architecture!r}, the baseline's is "
            f"{baseline_header.architecture!r}"
        )
    if header.n_vocab != baseline_header.n_vocab:
        problems.append(
            f"vocabulary of {header.n_vocab} tokens, the baseline's has {baseline_header.n_vocab}"
        )
    base = {t.name: tuple(t.shape) for t in baseline_header.tensors}
    mine = {t.name: tuple(t.shape) for t in header.tensors}
    for what, names in (
        ("missing", sorted(set(base) - set(mine))),
        ("not in the baseline", sorted(set(mine) - set(base))),
    ):
        if names:
            problems.append(f"{len(names)} tensor(s) {what}: {_some(names)}")
    reshaped = sorted(n for n in set(base) & set(mine) if base[n] != mine[n])
    if reshaped:
        problems.append(
            f"{len(reshaped)} tensor(s) of another shape: "
            + _some([f"{n} {list(mine[n])} (baseline {list(base[n])})" for n in reshaped])
        )
    return problems


def _some(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")

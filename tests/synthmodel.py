"""Build a tiny synthetic llama GGUF that the wheel's ik_llama.cpp engine loads.

Used by the tests instead of downloaded weights (a clone has no weights to download).  The
model is random but well formed: an SPM ("llama") vocabulary with byte
tokens, untied ``output.weight``, widths that are multiples of 256 so every
256-block ik type can be written without fallback, and rows of the 2-D
weights stored as bf16 (raw uint16, numpy has no bf16) or f32.

Needs gguf-py (``pip install gguf``) for writing only; the plugin reads
headers with :mod:`pytest_quantbench.gguf`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["build_synthetic_model", "synthetic_vocab", "f32_to_bf16_bits"]

# Common short SPM pieces ("▁" = U+2581 marks a leading space).
_WORDS = (
    "the a of and to in is it that for on was with as he be at by this had not are but "
    "from or have an they which one you were her all she there would their we him been "
    "has when who will more no if out so said what up its about into than them can only "
    "other new some could time these two may then do first any my now such like our over "
    "man me even most made after also did many before must through back years where much "
    "your way well down should because each just those people how too little state good "
    "very make world still own see men work long get here between both life being under"
).split()


def synthetic_vocab(n_vocab: int = 384) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) of an SPM vocab of exactly ``n_vocab`` entries.

    ids 0, 1, 2 = ``<unk>``, ``<s>``, ``</s>``; then the 256 byte tokens
    ``<0x00>``..``<0xFF>`` (type BYTE = 6); then "▁", single letters,
    "▁" + letters, "▁" + common words (with their prefixes, so SPM merges can
    build them) and letter pairs, scored in that order.
    """
    if n_vocab < 3 + 256 + 1:
        raise ValueError(f"n_vocab must be >= 260 (specials + 256 byte tokens), got {n_vocab}")
    tokens = ["<unk>", "<s>", "</s>"]
    types = [2, 3, 3]  # UNKNOWN, CONTROL, CONTROL
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    pieces: list[str] = ["\u2581"]
    pieces += list(letters)
    pieces += ["\u2581" + c for c in letters]
    # whole words with every prefix, so SPM's pairwise merges can reach them
    for word in _WORDS:
        w = "\u2581" + word
        pieces += [w[:k] for k in range(3, len(w) + 1)]
    pieces += [a + b for a in letters for b in letters]
    seen: set[str] = set(tokens)
    normal: list[str] = []
    for p in pieces:
        if p not in seen:
            seen.add(p)
            normal.append(p)
        if len(tokens) + len(normal) == n_vocab:
            break
    if len(tokens) + len(normal) < n_vocab:
        raise ValueError(f"n_vocab {n_vocab} is larger than this synthetic vocab can fill")
    scores = [0.0] * len(tokens) + [-float(i) for i in range(len(normal))]
    tokens += normal
    types += [1] * len(normal)
    return tokens, scores, types


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even f32 → bf16, returned as the raw uint16 bit patterns."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def _llama_writer(
    path: Path,
    *,
    name: str,
    n_layer: int,
    n_ctx_train: int,
    n_embd: int,
    n_ff: int,
    n_head: int,
    n_head_kv: int,
    n_vocab: int,
    file_type: int,
    split_max_tensors: int = 0,
):
    """A gguf-py writer holding the llama hyperparameters and the synthetic vocabulary."""
    import gguf

    w = gguf.GGUFWriter(path, "llama", split_max_tensors=split_max_tensors)
    w.add_name(name)
    w.add_block_count(n_layer)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(file_type)
    tokens, scores, types = synthetic_vocab(n_vocab)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    return w


def build_synthetic_model(
    path: str | os.PathLike[str],
    *,
    n_layer: int = 2,
    n_embd: int = 256,
    n_ff: int = 512,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_vocab: int = 384,
    n_ctx_train: int = 512,
    seed: int = 0,
    dtype: str = "bf16",
    std: float = 0.02,
    split_max_tensors: int = 0,
    tied: bool = False,
) -> Path:
    """Write a random llama-architecture GGUF to ``path`` and return its path.

    ``tied``: no ``output.weight`` (the engine then computes the output from token_embd, as for
    SmolLM2).

    2-D weights (``token_embd``, ``output``, ``attn_q/k/v/output``,
    ``ffn_gate/up/down``) are N(0, std²) stored as ``dtype`` ("bf16" or
    "f32"); norm weights are ones (f32).  With ``split_max_tensors > 0`` the
    model is written as ``<stem>-0000K-of-0000N.gguf`` shards and the first
    shard's path is returned.
    """
    import gguf  # gguf-py: test-only dependency, for writing

    if dtype not in ("bf16", "f32"):
        raise ValueError(f"dtype must be 'bf16' or 'f32', got {dtype!r}")
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head and n_head by n_head_kv")
    head_dim = n_embd // n_head
    path = Path(path)
    rng = np.random.default_rng(seed)

    w = _llama_writer(
        path,
        name="quantbench-synthetic",
        n_layer=n_layer,
        n_ctx_train=n_ctx_train,
        n_embd=n_embd,
        n_ff=n_ff,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_vocab=n_vocab,
        file_type=32 if dtype == "bf16" else 0,
        split_max_tensors=split_max_tensors,
    )  # MOSTLY_BF16 / ALL_F32

    def mat(name: str, ne0: int, ne1: int) -> None:
        a = rng.standard_normal((ne1, ne0), dtype=np.float32) * np.float32(std)
        if dtype == "bf16":
            w.add_tensor(name, f32_to_bf16_bits(a), raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor(name, a)

    def norm(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    n_embd_kv = head_dim * n_head_kv
    mat("token_embd.weight", n_embd, n_vocab)
    for i in range(n_layer):
        b = f"blk.{i}."
        norm(b + "attn_norm.weight", n_embd)
        mat(b + "attn_q.weight", n_embd, n_embd)
        mat(b + "attn_k.weight", n_embd, n_embd_kv)
        mat(b + "attn_v.weight", n_embd, n_embd_kv)
        mat(b + "attn_output.weight", n_embd, n_embd)
        norm(b + "ffn_norm.weight", n_embd)
        mat(b + "ffn_gate.weight", n_embd, n_ff)
        mat(b + "ffn_up.weight", n_embd, n_ff)
        mat(b + "ffn_down.weight", n_ff, n_embd)
    norm("output_norm.weight", n_embd)
    if not tied:
        mat("output.weight", n_embd, n_vocab)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    shards = w.format_shard_names(path)
    return Path(shards[0])


def build_moe_model(
    path: Path, *, n_embd=256, n_ff=256, n_expert=4, n_used=2, n_vocab=384, seed=1, n_layer=1
) -> Path:
    """An ``n_layer``-layer llama MoE (ffn_{gate,up,down}_exps, bf16) that the engine loads."""
    import gguf

    rng = np.random.default_rng(seed)
    n_head, n_head_kv = 4, 2
    w = _llama_writer(
        path,
        name="quantbench-synthetic-moe",
        n_layer=n_layer,
        n_ctx_train=512,
        n_embd=n_embd,
        n_ff=n_ff,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_vocab=n_vocab,
        file_type=32,
    )
    w.add_expert_count(n_expert)
    w.add_expert_used_count(n_used)

    def mat(name: str, *shape: int) -> None:  # numpy shape = reversed ggml shape
        a = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        w.add_tensor(name, f32_to_bf16_bits(a), raw_dtype=gguf.GGMLQuantizationType.BF16)

    n_kv = n_embd // n_head * n_head_kv
    mat("token_embd.weight", n_vocab, n_embd)
    for i in range(n_layer):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", np.ones(n_embd, np.float32))
        mat(b + "attn_q.weight", n_embd, n_embd)
        mat(b + "attn_k.weight", n_kv, n_embd)
        mat(b + "attn_v.weight", n_kv, n_embd)
        mat(b + "attn_output.weight", n_embd, n_embd)
        w.add_tensor(b + "ffn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(
            b + "ffn_gate_inp.weight", rng.standard_normal((n_expert, n_embd), dtype=np.float32)
        )
        mat(b + "ffn_gate_exps.weight", n_expert, n_ff, n_embd)
        mat(b + "ffn_up_exps.weight", n_expert, n_ff, n_embd)
        mat(b + "ffn_down_exps.weight", n_expert, n_embd, n_ff)
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    mat("output.weight", n_vocab, n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

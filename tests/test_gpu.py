"""GPU builds, tested as far as a CPU allows: the private-buffer swap forced on host buffers, the
CUDA padding size, one GPU per xdist worker, the environment set before the engine loads, and
benchmarks/gpu_check.sh's dry run."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pytest_quantbench.engine import devices
from pytest_quantbench.engine.llama import EngineError, EvalSettings
from pytest_quantbench.engine.swap import PRIVATE_BUFFERS_ENV, SwapModel
from pytest_quantbench.qtypes import resolve_qtype

REPO = Path(__file__).resolve().parents[1]
TENSOR = "blk.0.attn_v.weight"


@pytest.fixture(scope="module")
def swaps(synth_model):
    """The synthetic model loaded twice: pointer swap and forced private-buffer swap."""
    settings = EvalSettings(n_ctx=64, threads=2)
    pointer = SwapModel(synth_model, settings)
    private = SwapModel(synth_model, settings, private_buffers=True)
    yield pointer, private
    pointer.close()
    private.close()


def _replacement(swap: SwapModel, name: str, qtype: str):
    t = resolve_qtype(qtype).ggml_type
    ne0 = int(swap.tensor(name).ne[0])
    data = swap.quantize(swap.baseline_f32(name, "bf16"), t.type_id, t.row_size(ne0), t.interleave)
    return {name: (t.type_id, t.type_size, t.row_size(ne0), data)}


def _fields(t) -> tuple:
    return t.type, tuple(t.nb), t.data, t.buffer


TOKENS = (np.arange(64, dtype=np.int32) * 7) % 300


def test_private_buffer_swap_reads_baseline_through_the_backend(swaps):
    pointer, private = swaps
    for name in (TENSOR, "blk.1.ffn_down.weight", "output.weight"):
        assert np.array_equal(
            pointer.baseline_f32(name, "bf16"), private.baseline_f32(name, "bf16")
        )


@pytest.mark.parametrize(
    "qtype", ["q4_0", "q8_0", "q6_K", "iq4_ks", "iq4_k_r4", "q4_0_r8", "iq2_k"]
)
def test_private_buffer_logits_equal_pointer_swap_with_padding_zeroed(swaps, qtype):
    """The same quantized bytes give bit-identical logits through both paths; the private
    buffer is CUDA's size (data + row_size(T, 512 − ne0 % 512)) with a zero tail."""
    pointer, private = swaps
    repl = _replacement(pointer, TENSOR, qtype)
    data = repl[TENSOR][3]
    with pointer.swapped(repl):
        expected = pointer.model.eval_chunk(TOKENS)
    with private.swapped(repl):
        t = private.tensor(TENSOR)
        assert t.buffer and t.data != data.ctypes.data  # its own buffer, not the array
        got = private.model.eval_chunk(TOKENS)
        pad = resolve_qtype(qtype).ggml_type.row_size(512 - 256)
        assert private.allocations == [len(data) + pad]
        tail = private.ggml.host_array(t.data + len(data), pad)
        assert not tail.any()
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("outcome", ["pass", "fail", "skip", "error"])
def test_private_buffer_swap_restores_bit_for_bit(swaps, outcome):
    """After a passing, failing (AssertionError), skipped (pytest.skip) and erroring
    (EngineError) item body, the tensor's type/strides/data/buffer and the logits are the
    baseline's again."""
    _, private = swaps
    before = _fields(private.tensor(TENSOR))
    baseline = private.model.eval_chunk(TOKENS)
    repl = _replacement(private, TENSOR, "iq4_ks")
    raised = {
        "pass": None,
        "fail": AssertionError,
        "skip": pytest.skip.Exception,
        "error": EngineError,
    }[outcome]
    try:
        with private.swapped(repl):
            assert _fields(private.tensor(TENSOR)) != before
            if raised is pytest.skip.Exception:
                pytest.skip("item skipped")
            elif raised is not None:
                raise raised("item body")
    except BaseException as exc:  # noqa: BLE001 - the outcome under test
        assert raised is not None and isinstance(exc, raised)
    assert _fields(private.tensor(TENSOR)) == before
    assert np.array_equal(private.model.eval_chunk(TOKENS), baseline)


def test_a_failed_private_allocation_restores_the_tensor(swaps, monkeypatch):
    _, private = swaps
    before = _fields(private.tensor(TENSOR))
    repl = _replacement(private, TENSOR, "q4_0")
    lib = private.ggml.lib
    monkeypatch.setattr(
        private.ggml,
        "lib",
        type(
            "NoAlloc",
            (),
            {
                "__getattr__": lambda self, n: getattr(lib, n),
                "ggml_backend_buft_alloc_buffer": staticmethod(lambda buft, size: None),
            },
        )(),
    )
    with pytest.raises(EngineError, match="cannot allocate"), private.swapped(repl):
        pass
    assert _fields(private.tensor(TENSOR)) == before


@pytest.mark.parametrize("ne0", [576, 512, 2560, 7168])
@pytest.mark.parametrize(
    "qtype", ["q4_0", "q8_0", "iq4_nl", "q5_1", "q4_K", "iq4_ks", "q6_K", "f16", "bf16"]
)
def test_cuda_padding_is_one_row_of_the_missing_columns(swaps, ne0, qtype):
    t = resolve_qtype(qtype).ggml_type
    if (512 - ne0 % 512) % t.block_size and ne0 % 512:
        pytest.skip(f"{qtype} cannot hold rows of {ne0} (llama-quantize falls back)")
    quantized = qtype not in ("f16", "bf16")
    got = devices.cuda_padding(swaps[0].ggml.lib.ggml_row_size, t.type_id, ne0, quantized)
    expected = t.row_size(512 - ne0 % 512) if quantized and ne0 % 512 else 0
    assert got == expected
    assert (got > 0) == (quantized and ne0 == 576)


def test_swap_problem_names_views_split_and_transformed_tensors(swaps):
    pointer, _ = swaps
    info_shape = tuple(int(pointer.tensor(TENSOR).ne[i]) for i in range(2))
    assert pointer.swap_problem(TENSOR, "bf16", info_shape) is None
    assert "transformed at load" in pointer.swap_problem(TENSOR, "q8_0", info_shape)
    t = pointer.tensor(TENSOR)
    other = pointer.tensor("blk.0.attn_k.weight")
    t.view_src = ctypes.addressof(other)
    try:
        assert "view into a merged tensor" in pointer.swap_problem(TENSOR, "bf16", info_shape)
    finally:
        t.view_src = None
    t.extra = 1
    try:
        assert "split over several devices" in pointer.swap_problem(TENSOR, "bf16", info_shape)
    finally:
        t.extra = None


QTYPES = "q4_0,q8_0,q6_K,iq4_ks,iq4_nl,iq4_k_r4,q4_0_r8,iq2_kt,Q4_K_M"


def test_forced_private_buffers_give_identical_statistics_through_the_plugin(
    pytester, qb_args, monkeypatch
):
    """Nine items (incl. an _rN type, a kt type with the auto imatrix, a preset) measured with
    the pointer swap and again with the private-buffer path: identical statistics."""
    args = [
        *qb_args,
        f"--quantbench-qtypes={QTYPES}",
        "--quantbench-imatrix=auto",
        "--quantbench-tensors",
        r"blk\.0\.attn_v",
    ]
    monkeypatch.delenv(PRIVATE_BUFFERS_ENV, raising=False)
    pytester.makeconftest("""
        from pytest_quantbench.engine.swap import SwapModel

        _private = SwapModel._swap_private

        def counted(self, t, data, quantized):
            with open("private-swaps.txt", "a") as fh:
                fh.write(t.name.decode() + "\\n")
            return _private(self, t, data, quantized)

        SwapModel._swap_private = counted
    """)
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=9)
    assert not (pytester.path / "private-swaps.txt").exists()
    reference = pd.read_csv(pytester.path / "quantbench-results" / "results.csv")
    monkeypatch.setenv(PRIVATE_BUFFERS_ENV, "1")
    pytester.runpytest_subprocess(*args, "--quantbench-rerun").assert_outcomes(passed=9)
    rows = pd.read_csv(pytester.path / "quantbench-results" / "results.csv")
    assert (rows["engine_mode"] == "inplace").all() and (rows["device"] == "cpu").all()
    assert set(rows["qtype"].str.lower()) == set(QTYPES.lower().split(","))
    metrics = [
        c
        for c in reference.columns
        if c.startswith(("ppl", "kld", "mean_", "median_", "max_", "dp_", "rms", "same"))
    ]
    assert len(metrics) > 30
    assert rows["mean_kld"].gt(0).all()
    assert len((pytester.path / "private-swaps.txt").read_text().split()) >= 9
    pd.testing.assert_frame_equal(
        rows.sort_values("qtype")[metrics].reset_index(drop=True),
        reference.sort_values("qtype")[metrics].reset_index(drop=True),
    )


# ---- one GPU per worker ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "gpus, expected",
    [
        (("0", "1"), ["0", "1", "0", "1"]),
        (("0", "1", "2", "3"), ["0", "1", "2", "3"]),
        (("3", "5"), ["3", "5", "3", "5"]),
    ],
)
def test_worker_gets_gpu_n_modulo_list_length_under_n_4(gpus, expected):
    assert [devices.worker_gpu(f"gw{n}", gpus) for n in range(4)] == expected
    assert devices.worker_gpu(None, gpus) == gpus[0]  # no xdist: the first one
    assert devices.worker_gpu("gw2", ()) is None  # auto on a CPU build: no GPU


@pytest.mark.parametrize(
    "value, expected",
    [
        ("auto", "auto"),
        ("AUTO", "auto"),
        (None, None),
        ("0,1", ("0", "1")),
        ("2 3", ("2", "3")),
        (str([0, 1]), ("0", "1")),
    ],
)
def test_gpu_list_parsing(value, expected):
    assert devices.parse_gpus(value) == expected


@pytest.mark.parametrize("where", ["yaml", "ini"])
def test_gpus_from_yaml_and_ini(tmp_path, where):
    from pytest_quantbench.config import build_config

    yaml_file = tmp_path / "quantbench.yaml"
    yaml_file.write_text("qtypes: q4_0\ngpus: [0, 1]\n" if where == "yaml" else "qtypes: q4_0\n")
    ini = {"quantbench_gpus": "auto"} if where == "ini" else {}
    config = build_config(
        lambda _: None,
        ini.get,
        invocation_dir=tmp_path,
        ini_dir=tmp_path,
        config_file=yaml_file,
        default_config_file=None,
    )
    assert devices.parse_gpus(config.gpus) == (("0", "1") if where == "yaml" else "auto")


def test_the_engine_id_carries_the_gpu_model_and_leaves_cpu_ids_unchanged():
    from dataclasses import replace

    from pytest_quantbench.engine.identity import engine_identity

    cpu = engine_identity()
    assert cpu.device == "cpu" and "device" not in cpu.describe()
    h100 = replace(cpu, device="cuda:0 NVIDIA H100", device_key="cuda:NVIDIA H100")
    h200 = replace(cpu, device="cuda:1 NVIDIA H200", device_key="cuda:NVIDIA H200")
    assert len({cpu.key, h100.key, h200.key}) == 3
    assert replace(h100, device="cuda:3 NVIDIA H100").key == h100.key  # the index is no identity
    assert "device cuda:1 NVIDIA H200" in h200.describe()
    import hashlib

    old = hashlib.sha256(f"{cpu.files_sha256}|{cpu.cpu_features}".encode()).hexdigest()[:12]
    assert cpu.key == old  # CPU runs keep their baselines and stored results


def test_the_run_header_names_the_gpu_and_says_graphs_are_off(tmp_path, monkeypatch):
    from dataclasses import replace

    from pytest_quantbench.config import build_config
    from pytest_quantbench.engine.identity import engine_identity
    from pytest_quantbench.runinputs import RunInputs

    cli = {"quantbench_qtypes": "q4_0", "quantbench_gpus": "0,1", "quantbench_n_gpu_layers": 999}
    config = build_config(
        cli.get,
        lambda _: None,
        invocation_dir=tmp_path,
        ini_dir=tmp_path,
        config_file=None,
        default_config_file=None,
    )
    monkeypatch.setattr(devices, "apply_process_env", lambda spec, worker: "0")  # this process
    inputs = RunInputs(config, tmp_path)
    assert inputs.gpu == "0"
    assert inputs._device_header() == []  # the CPU wheel
    inputs.__dict__["identity_engine"] = replace(
        engine_identity(), device="cuda:0 NVIDIA H200", device_key="cuda:NVIDIA H200"
    )
    (line,) = inputs._device_header()
    assert line.startswith(
        "quantbench device: cuda:0 NVIDIA H200 (one per worker from --quantbench-gpus 0,1"
    )
    assert "n_gpu_layers=999" in line and "CUDA graphs off" in line


@pytest.mark.parametrize("value", ["zero", "0,-1", "0;1"])
def test_a_bad_gpu_list_is_a_usage_error(pytester, qb_args, value):
    from runhelpers import usage_error

    result = pytester.runpytest_subprocess(
        *qb_args, "--quantbench-qtypes=q4_0", f"--quantbench-gpus={value}"
    )
    message = usage_error(result)
    assert "--quantbench-gpus" in message and "not a device id" in message


def test_auto_is_every_gpu_the_build_sees_and_none_on_a_cpu_build(monkeypatch):
    monkeypatch.delenv("QUANTBENCH_GPUS_SEEN", raising=False)
    assert devices.resolve_gpus("auto", probe=lambda lib: ("0", "1", "2")) == ("0", "1", "2")
    assert os.environ["QUANTBENCH_GPUS_SEEN"] == "0,1,2"  # inherited by the workers
    monkeypatch.delenv("QUANTBENCH_GPUS_SEEN")
    assert devices.resolve_gpus("auto") == ()  # the CPU wheel, probed in a child process


def test_the_environment_is_set_before_the_engine_loads_and_refused_after(tmp_path):
    """In a fresh process: apply_process_env sets CUDA_VISIBLE_DEVICES (gw3 of 0,1 → 1) and
    GGML_CUDA_DISABLE_GRAPHS before the library is mapped; once the library is loaded, a
    different device is refused instead of silently ignored."""
    code = (
        "import os\n"
        "from pytest_quantbench.engine import bindings, devices\n"
        "assert not bindings.mapped_library(r'^libllama')\n"
        "print(devices.apply_process_env(('0', '1'), 'gw3'))\n"
        "print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['GGML_CUDA_DISABLE_GRAPHS'])\n"
        "bindings.load_library()\n"
        "try:\n"
        "    devices.apply_process_env(('0', '1'), 'gw2')\n"
        "except devices.EngineAlreadyLoaded as exc:\n"
        "    print('refused:', exc)\n"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CUDA_VISIBLE_DEVICES", "GGML_CUDA_DISABLE_GRAPHS")
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    ).stdout.splitlines()
    assert out[0] == "1" and out[1] == "1 1"
    assert out[2].startswith("refused:") and "CUDA_VISIBLE_DEVICES=0" in out[2]


def test_each_worker_gets_its_gpu_before_the_engine_loads(pytester, qb_args):
    """-n 2 --quantbench-gpus 5,7: each worker records, when the engine library is first
    loaded, the CUDA_VISIBLE_DEVICES it sees."""
    pytest.importorskip("xdist")
    pytester.makeconftest("""
        import json, os
        from pytest_quantbench.engine import bindings

        _load = bindings.load_library

        def load_library(path=None):
            if not bindings._loaded:
                worker = os.environ.get("PYTEST_XDIST_WORKER", "controller")
                with open(f"load-{worker}.json", "w") as fh:
                    json.dump({k: os.environ.get(k) for k in
                               ("CUDA_VISIBLE_DEVICES", "GGML_CUDA_DISABLE_GRAPHS")}, fh)
            return _load(path)

        bindings.load_library = load_library
    """)
    result = pytester.runpytest_subprocess(
        *qb_args,
        "-n",
        "2",
        "--quantbench-gpus=5,7",
        "--quantbench-qtypes=q4_0,q8_0",
        "--quantbench-tensors",
        r"blk\.0\.attn_[qk]",
    )
    result.assert_outcomes(passed=4)
    import json

    seen = {p.stem[5:]: json.loads(p.read_text()) for p in pytester.path.glob("load-*.json")}
    assert seen["gw0"] == {"CUDA_VISIBLE_DEVICES": "5", "GGML_CUDA_DISABLE_GRAPHS": "1"}
    assert seen["gw1"] == {"CUDA_VISIBLE_DEVICES": "7", "GGML_CUDA_DISABLE_GRAPHS": "1"}


# ---- types without a CUDA matmul ---------------------------------------------------------------
@pytest.mark.parametrize(
    "name, device",
    [
        ("q4_0", True),
        ("iq2_kt", True),
        ("q8_kv", False),
        ("q4_0_r8", False),
        ("q8_k_r8", False),
        ("bf16_r16", False),
        ("iq4_k_r4", True),
        ("iq4_ks_r4", True),
        ("iq1_s_r4", True),
        ("q4_k_r4", False),
    ],
)
def test_types_without_a_cuda_matmul(name, device):
    assert devices.has_cuda_matmul(name) is device


def test_device_note_only_for_offloaded_types_without_a_kernel():
    q = {n: resolve_qtype(n).ggml_type for n in ("q4_0_r8", "q4_0")}
    base = {"a": "bf16", "b": "bf16"}
    note = devices.device_note({"a": q["q4_0_r8"], "b": q["q4_0"]}, base, offloaded=True)
    assert note.startswith("q4_0_r8 has no CUDA matmul") and "q4_0," not in note
    assert devices.device_note({"a": q["q4_0_r8"]}, base, offloaded=False) is None
    assert devices.device_note({"b": q["q4_0"]}, base, offloaded=True) is None


# ---- benchmarks/gpu_check.sh ---------------------------------------------------------------------
def test_gpu_check_dry_run_lists_every_step(tmp_path):
    script = REPO / "benchmarks" / "gpu_check.sh"
    lib = tmp_path / "libllama.so"
    lib.write_bytes(b"")
    out = subprocess.run(
        ["bash", str(script), "--dry-run", "--engine-lib", str(lib)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for step in ("(a)", "(b)", "(c)", "(d)"):
        assert step in text
    for qtype in ("q4_0", "q8_0", "iq4_ks", "q6_K", "iq2_kt", "q4_0_r8"):
        assert qtype in text
    assert "--quantbench-n-gpu-layers=999" in text and "--quantbench-engine=file" in text
    assert "nvidia-smi" not in text or "would" in text


def test_gpu_check_refuses_without_an_engine(tmp_path):
    script = REPO / "benchmarks" / "gpu_check.sh"
    env = {k: v for k, v in os.environ.items() if k != "PATH"} | {"PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        ["bash", str(script), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
        check=False,
    )
    assert out.returncode == 2
    assert "--engine-lib" in out.stderr and "--sdist" in out.stderr

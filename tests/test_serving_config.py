"""serving/config.py: Triton's `initialize` arguments -> the engine's settings, checked without Triton,
without a GPU and without building an engine (issue #18's CPU side: one instance per GPU, each on its own)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import types
from pathlib import Path

import pytest

from backend.params import EngineConfig
from serving.config import model_settings, shared_engine_name

ROOT = Path(__file__).resolve().parents[1]


def triton_args(kind: str, device_id: int) -> dict[str, str]:
    """What Triton passes `initialize` for an instance of model_repository/gemma (its parameters as
    config.pbtxt has them; Triton's model_config JSON holds them the same way)."""
    text = (ROOT / "model_repository/gemma/config.pbtxt").read_text()
    parameters = {key: {"string_value": value} for key, value in
                  re.findall(r'key:\s*"(\w+)",\s*value:\s*\{\s*string_value:\s*"([^"]*)"', text)}
    return {"model_config": json.dumps({"name": "gemma", "backend": "python", "parameters": parameters}),
            "model_instance_kind": kind, "model_instance_device_id": str(device_id),
            "model_instance_name": f"gemma_0_{device_id}", "model_name": "gemma", "model_version": "1",
            "model_repository": str(ROOT / "model_repository/gemma")}


@pytest.fixture
def clean_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("GEMMA_")]:
        monkeypatch.delenv(key)
    for key in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):  # initialize sets them: restored after
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    return monkeypatch


def test_a_gpu_instance_runs_its_engine_on_its_own_gpu(clean_env):
    clean_env.setenv("GEMMA_DEVICE", "cpu")  # a GPU instance ignores it
    clean_env.setenv("GEMMA_MAX_NUM_SEQS", "64")
    settings = model_settings(triton_args("GPU", 1))
    assert settings.engine == EngineConfig(device="cuda:1", max_num_seqs=64)
    assert settings.max_prompt_bytes == 262144 and settings.engine_process


def test_instances_share_an_engine_on_one_device_of_one_server_only(clean_env):
    def name(kind, device_id, instance=0, version="1"):
        args = triton_args(kind, device_id) | {"model_instance_name": f"gemma_0_{instance}", "model_version": version}
        return shared_engine_name(args, model_settings(args).engine)
    assert name("GPU", 0, instance=0) == name("GPU", 0, instance=1)  # count: 2 on one GPU
    assert len({name("GPU", 0), name("GPU", 1), name("GPU", 0, version="2"), name("CPU", 0)}) == 4
    assert f"/{os.getppid()}/" in name("GPU", 0)  # the server: the stubs' parent


def test_a_cpu_instance_takes_the_device_parameter(clean_env):
    assert model_settings(triton_args("CPU", 0)).engine.device == "auto"
    clean_env.setenv("GEMMA_DEVICE", "cpu")
    assert model_settings(triton_args("CPU", 0)).engine.device == "cpu"


def test_gpu_memory_utilization_is_read_as_a_fraction_and_unset_keeps_kv_cache_bytes(clean_env):
    assert model_settings(triton_args("CPU", 0)).engine.gpu_memory_utilization is None
    clean_env.setenv("GEMMA_GPU_MEMORY_UTILIZATION", "0.9")
    assert model_settings(triton_args("GPU", 0)).engine == EngineConfig(device="cuda:0", gpu_memory_utilization=0.9)
    clean_env.setenv("GEMMA_GPU_MEMORY_UTILIZATION", "90")
    with pytest.raises(ValueError, match=r"gpu_memory_utilization must be in \(0, 1\]"):
        model_settings(triton_args("GPU", 0))


def test_an_unknown_parameter_is_refused(clean_env):
    args = triton_args("CPU", 0)
    config = json.loads(args["model_config"])
    config["parameters"]["max_num_seq"] = {"string_value": "8"}
    with pytest.raises(ValueError, match="max_num_seq"):
        model_settings({**args, "model_config": json.dumps(config)})


def test_engine_restart_delays_default_to_five_doubling_waits_and_take_a_list(clean_env):
    assert model_settings(triton_args("CPU", 0)).engine_restart_delays_s == (1.0, 2.0, 4.0, 8.0, 16.0)
    clean_env.setenv("GEMMA_ENGINE_RESTART_DELAYS_S", "0.5, 0,3")
    assert model_settings(triton_args("CPU", 0)).engine_restart_delays_s == (0.5, 0.0, 3.0)


@pytest.mark.parametrize("text", ["1,,2", "fast", "1,-1", "nan", "inf", ","])
def test_bad_engine_restart_delays_are_refused_naming_the_setting(clean_env, text):
    clean_env.setenv("GEMMA_ENGINE_RESTART_DELAYS_S", text)
    with pytest.raises(ValueError, match=rf"engine_restart_delays_s must be seconds >= 0 separated by commas, "
                                         rf".*got {re.escape(repr(text))}"):
        model_settings(triton_args("CPU", 0))


def test_responder_threads_default_to_one_and_take_a_count(clean_env):
    assert model_settings(triton_args("CPU", 0)).responder_threads == 1
    clean_env.setenv("GEMMA_RESPONDER_THREADS", "4")
    assert model_settings(triton_args("CPU", 0)).responder_threads == 4


@pytest.mark.parametrize("text", ["0", "-1", "two", "1.5", "65"])
def test_bad_responder_threads_are_refused_naming_the_setting(clean_env, text):
    clean_env.setenv("GEMMA_RESPONDER_THREADS", text)
    with pytest.raises(ValueError, match=rf"responder_threads must be a whole number from 1 to 64, got "
                                         rf"{re.escape(repr(text))}"):
        model_settings(triton_args("CPU", 0))


def test_the_models_initialize_asks_for_cuda_1_on_gpu_instance_1(clean_env):
    """model.py's own initialize, with the arguments Triton passes instance 1 of a KIND_GPU group,
    up to the point where it builds the engine (stopped there: no GPU here)."""
    pb_utils = types.ModuleType("triton_python_backend_utils")  # what Triton's stub provides
    pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    pb_utils.Logger = types.SimpleNamespace(log_verbose=print, log_info=print, log_error=print)
    clean_env.setitem(sys.modules, "triton_python_backend_utils", pb_utils)
    clean_env.delitem(sys.modules, "serving.metrics", raising=False)  # it imports pb_utils too
    spec = importlib.util.spec_from_file_location("gemma_model_py", ROOT / "model_repository/gemma/1/model.py")
    model_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_py)

    asked: list[tuple] = []  # (device, engine_process, shared_as) of each engine start

    class Stop(Exception):
        pass

    def start_engine(config, engine_process, shared_as):
        asked.append((config.device, engine_process, shared_as))
        raise Stop

    clean_env.setattr(model_py, "start_engine", start_engine)
    # A failed start is re-raised as EngineStartError (its message, no traceback for Triton to print).
    with pytest.raises(model_py.EngineStartError):
        model_py.TritonPythonModel().initialize(triton_args("GPU", 1))
    # The engine in a process of its own by default, shared by the server's instances on cuda:1.
    assert asked == [("cuda:1", True, f"gemma-triton/{os.getppid()}/gemma/1/cuda:1")]
    clean_env.setenv("GEMMA_ENGINE_PROCESS", "0")  # the engine on a thread of the stub instead
    with pytest.raises(model_py.EngineStartError):
        model_py.TritonPythonModel().initialize(triton_args("GPU", 1))
    assert asked[1:] == [("cuda:1", False, None)]
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == os.environ["LRU_CACHE_CAPACITY"] == "128"


def test_histograms_default_to_counters_and_take_native(clean_env):
    assert model_settings(triton_args("CPU", 0)).histograms == "counters"
    clean_env.setenv("GEMMA_HISTOGRAMS", "Native")
    assert model_settings(triton_args("CPU", 0)).histograms == "native"


def test_an_unknown_histograms_setting_is_refused_naming_the_choices(clean_env):
    clean_env.setenv("GEMMA_HISTOGRAMS", "prometheus")
    with pytest.raises(ValueError, match=r"histograms must be one of counters, native, got 'prometheus'"):
        model_settings(triton_args("CPU", 0))

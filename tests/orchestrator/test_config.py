"""PipelineModuleConfig: the printed form, naming, any DAG, per-module settings, and every
refused mistake (raised by the line that makes it, naming module and port, config unchanged)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from modules import (
    OLD_TVM_TEST_TEXT,
    RFC_EXAMPLE_TEXT,
    binary_module,
    multi_output_module,
    old_tvm_test_modules,
    postprocess,
    rfc_example_modules,
    takes_varargs,
    unary_module,
    weighted_module,
    wire_old_tvm_test,
    wire_rfc_example,
)

from tvmpipe.orchestrator import ConfigError, PipelineModuleConfig, build_pipeline


def snapshot(cfg: PipelineModuleConfig) -> tuple:
    """What a refused mistake must leave as it was."""
    return (
        str(cfg),
        list(cfg.connections),
        dict(cfg.inputs),
        list(cfg.outputs),
        {id(m): dict(cfg[m].params) for m in cfg.modules if cfg[m].params},
    )


def rfc_config() -> tuple[PipelineModuleConfig, tuple]:
    mods = rfc_example_modules()
    cfg = PipelineModuleConfig()
    wire_rfc_example(cfg, *mods)
    return cfg, mods


# ----- printing and naming


def test_str_is_design_example_to_the_character(capsys: pytest.CaptureFixture[str]) -> None:
    cfg, (mod1, _, _) = rfc_config()
    cfg[mod1].target = "llvm"
    cfg[mod1].device = "cpu"
    cfg[mod1].rpc_key = "rk3399"
    cfg[mod1].cpu_affinity = "0"
    assert str(cfg) == RFC_EXAMPLE_TEXT
    print(cfg)
    assert capsys.readouterr().out == RFC_EXAMPLE_TEXT + "\n"


def test_empty_config_prints_the_three_headings() -> None:
    assert str(PipelineModuleConfig()) == "Inputs:\nOutputs:\nConnections:"


def test_names_follow_topological_order_when_registered_in_reverse() -> None:
    mod1, mod2, mod3 = rfc_example_modules()
    cfg = PipelineModuleConfig()
    cfg[mod3].target = "llvm"  # first appearance: mod3, then mod2, then mod1
    cfg.outputs.append((mod3, 0))
    cfg.connect(mod2, 0, mod3, "data_1")
    cfg.connect(mod1, 0, mod2, "data_0")
    cfg.inputs["data_2"] = (mod3, "data_0")
    cfg.inputs["data_1"] = (mod1, "data_1")
    cfg.inputs["data_0"] = (mod1, "data_0")
    assert [cfg[m].name for m in (mod1, mod2, mod3)] == ["mod1", "mod2", "mod3"]
    assert [cfg[m].name for m in cfg.topological_order()] == ["mod1", "mod2", "mod3"]
    assert "  |- mod1.output(0) -> mod2.data_0" in str(cfg).splitlines()


def test_ties_are_broken_by_first_appearance() -> None:
    left, right, join = unary_module(), unary_module(), binary_module()
    cfg = PipelineModuleConfig()
    cfg.inputs["b"] = (right, "data_0")  # right appears first
    cfg.inputs["a"] = (left, "data_0")
    cfg.connect(left, 0, join, "data_0")
    cfg.connect(right, 0, join, "data_1")
    cfg.outputs.append((join, 0))
    assert (cfg[right].name, cfg[left].name, cfg[join].name) == ("mod1", "mod2", "mod3")


def test_names_are_renumbered_when_a_connection_changes_the_order() -> None:
    first, second = unary_module(), unary_module()
    cfg = PipelineModuleConfig()
    cfg.outputs.append((second, 0))
    cfg.inputs["x"] = (first, "data_0")
    assert (cfg[second].name, cfg[first].name) == ("mod1", "mod2")
    cfg.connect(first, 0, second, "data_0")
    assert (cfg[first].name, cfg[second].name) == ("mod1", "mod2")


def test_rename_one_module() -> None:
    cfg, (mod1, mod2, mod3) = rfc_config()
    cfg[mod2].name = "square"
    assert cfg[mod2].name == "square"
    assert str(cfg) == RFC_EXAMPLE_TEXT.replace("mod2", "square")
    assert (cfg[mod1].name, cfg[mod3].name) == ("mod1", "mod3")


@pytest.mark.parametrize("bad", ["mod1", "", "1st", "has space", "a/b", 7])
def test_rename_refuses_a_taken_or_malformed_name(bad: object) -> None:
    cfg, (_, mod2, _) = rfc_config()
    before = snapshot(cfg)
    with pytest.raises(ConfigError, match="mod2") as err:
        cfg[mod2].name = bad  # type: ignore[assignment]
    assert repr(bad) in str(err.value)
    assert cfg[mod2].name == "mod2"
    assert snapshot(cfg) == before


def test_custom_name_cannot_take_a_default_name() -> None:
    first, second = unary_module("negative"), unary_module("exp")
    cfg = PipelineModuleConfig()
    with pytest.raises(ConfigError, match="kept for default names"):
        cfg[first].name = "mod2"
    cfg[first].name = "pre"
    cfg.inputs["x"] = (first, "data_0")
    cfg.connect(first, 0, second, "data_0")
    cfg.outputs.append((second, 0))
    assert [cfg[m].name for m in cfg.modules] == ["pre", "mod2"]


# ----- any DAG


def test_old_tvm_network_skip_edge_and_fan_out() -> None:
    mod1, mod2, mod3 = old_tvm_test_modules()
    cfg = PipelineModuleConfig()
    wire_old_tvm_test(cfg, mod1, mod2, mod3)
    assert str(cfg) == OLD_TVM_TEST_TEXT
    cfg.validate()
    assert len(cfg.connections) == 3
    assert [(c.src_index, c.dst_param) for c in cfg.connections if c.src is mod1] == [
        (0, "data_0"),
        (0, "data_1"),
    ]


def test_diamond_fan_in_and_several_inputs_and_outputs() -> None:
    source = multi_output_module(2)
    left, right = unary_module("negative"), unary_module("exp")
    join = binary_module("add")
    extra = binary_module("multiply")
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (source, "data_0")
    cfg.inputs["y"] = (extra, "data_1")
    cfg.connect(source, 0, left, "data_0")
    cfg.connect(source, 1, right, "data_0")
    cfg.connect(left, 0, join, "data_0")  # fan-in: join is fed by two producers
    cfg.connect(right, 0, join, "data_1")
    cfg.connect(join, 0, extra, "data_0")  # extra: a producer and a pipeline input
    cfg.outputs.append((extra, 0))
    cfg.outputs.append((source, 1))  # source.output(1) feeds right and a pipeline output
    cfg.outputs.append((join, 0))
    cfg.validate()
    assert [cfg[m].name for m in (source, left, right, join, extra)] == [
        "mod1",
        "mod2",
        "mod3",
        "mod4",
        "mod5",
    ]
    assert str(cfg) == (
        "Inputs:\n"
        "  |- x: mod1.data_0\n"
        "  |- y: mod5.data_1\n"
        "Outputs:\n"
        "  |- mod5.output(0)\n"
        "  |- mod1.output(1)\n"
        "  |- mod4.output(0)\n"
        "Connections:\n"
        "  |- mod1.output(0) -> mod2.data_0\n"
        "  |- mod1.output(1) -> mod3.data_0\n"
        "  |- mod2.output(0) -> mod4.data_0\n"
        "  |- mod3.output(0) -> mod4.data_1\n"
        "  |- mod4.output(0) -> mod5.data_0"
    )


def test_one_output_feeds_both_inputs_of_one_module() -> None:
    source, square = unary_module(), binary_module("multiply")
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (source, "data_0")
    cfg.connect(source, 0, square, "data_0")
    cfg.connect(source, 0, square, "data_1")
    cfg.outputs.append((square, 0))
    cfg.validate()
    assert [m is square for m in cfg.topological_order()] == [False, True]


def test_two_equal_modules_are_two_stages() -> None:
    first, second = unary_module(), unary_module()
    assert first.script() == second.script()
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (first, "data_0")
    cfg.connect(first, 0, second, "data_0")
    cfg.outputs.append((second, 0))
    assert len(cfg.modules) == 2
    assert (cfg[first].name, cfg[second].name) == ("mod1", "mod2")


def test_a_pipeline_input_can_be_rebound_to_another_port() -> None:
    cfg, (_, _, mod3) = rfc_config()
    del cfg.inputs["data_2"]
    cfg.inputs["data_2"] = (mod3, "data_0")
    assert cfg.inputs["data_2"] == (mod3, "data_0")
    assert str(cfg) == RFC_EXAMPLE_TEXT


def test_python_stage_after_a_relax_module() -> None:
    mod = unary_module()
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (mod, "data_0")
    cfg.connect(mod, 0, postprocess, "logits")
    cfg.outputs.append((postprocess, 0))
    cfg.validate()
    assert cfg.signature(postprocess).input_names == ["logits"]
    assert str(cfg).endswith("  |- mod1.output(0) -> mod2.logits")


# ----- per-module settings


def test_default_settings() -> None:
    cfg, (mod1, _, _) = rfc_config()
    settings = cfg[mod1]
    assert (settings.target, settings.device, settings.rpc_key) == ("llvm", "cpu", "")
    assert (settings.cpu_affinity, settings.num_threads, settings.params) == (None, None, {})


@pytest.mark.parametrize(
    "target",
    [
        "llvm",
        {"kind": "llvm", "mtriple": "aarch64-linux-gnu"},
        tvm.target.Target("llvm"),
        {"kind": "cuda"},
    ],
    ids=["str", "dict", "Target", "cuda-dict"],
)
def test_target_accepts_str_dict_and_target(target: object) -> None:
    cfg, (mod1, _, _) = rfc_config()
    cfg[mod1].target = target
    assert cfg[mod1].target is target


@pytest.mark.parametrize("device", ["cpu", "cuda", "opencl", "vulkan", "metal", "rocm"])
def test_device_accepts_known_kinds(device: str) -> None:
    cfg, (_, mod2, _) = rfc_config()
    cfg[mod2].device = device
    assert cfg[mod2].device == device


def test_rpc_key_affinity_and_threads_are_stored() -> None:
    cfg, (mod1, mod2, mod3) = rfc_config()
    cfg[mod1].rpc_key = "rk3399"
    cfg[mod1].cpu_affinity = "0"
    cfg[mod2].cpu_affinity = "0-3"
    cfg[mod3].cpu_affinity = "0,2,4-5"
    cfg[mod3].num_threads = 2
    assert cfg[mod1].rpc_key == "rk3399"
    assert [cfg[m].cpu_affinity for m in (mod1, mod2, mod3)] == ["0", "0-3", "0,2,4-5"]
    assert (cfg[mod1].num_threads, cfg[mod3].num_threads) == (None, 2)
    cfg[mod3].cpu_affinity = None
    cfg[mod3].num_threads = None
    assert (cfg[mod3].cpu_affinity, cfg[mod3].num_threads) == (None, None)
    assert str(cfg) == RFC_EXAMPLE_TEXT  # settings do not change the graph


@pytest.mark.parametrize(
    "target", ["notatarget", "llvm -mcpu=skylake", {"kind": "nope"}, 42], ids=str
)
def test_invalid_target_is_refused(target: object) -> None:
    cfg, (mod1, _, _) = rfc_config()
    with pytest.raises(ConfigError, match=r"mod1: invalid target") as err:
        cfg[mod1].target = target
    assert repr(target) in str(err.value)
    assert cfg[mod1].target == "llvm"


@pytest.mark.parametrize("device", ["gpu", "CPU", "", "tpu"])
def test_unknown_device_is_refused(device: str) -> None:
    cfg, (_, mod2, _) = rfc_config()
    with pytest.raises(ConfigError, match="mod2: unknown device") as err:
        cfg[mod2].device = device
    message = str(err.value)
    assert repr(device) in message
    assert all(kind in message for kind in ("cpu", "cuda", "opencl"))  # what would be valid
    assert cfg[mod2].device == "cpu"


@pytest.mark.parametrize(
    "affinity",
    [
        "a",
        "0,",
        "-1",
        "1-",
        "0 1",
        "",
        3,
        pytest.param("3-0"),
    ],
    ids=repr,
)
def test_bad_cpu_affinity_is_refused(affinity: object) -> None:
    cfg, (mod1, _, _) = rfc_config()
    cfg[mod1].cpu_affinity = "1"
    with pytest.raises(ConfigError, match="mod1: cpu_affinity") as err:
        cfg[mod1].cpu_affinity = affinity  # type: ignore[assignment]
    assert "'0-3'" in str(err.value)  # shows what a valid one looks like
    assert cfg[mod1].cpu_affinity == "1"


@pytest.mark.parametrize("threads", [0, -1, "2", 2.5, True], ids=repr)
def test_bad_num_threads_is_refused(threads: object) -> None:
    cfg, (_, _, mod3) = rfc_config()
    with pytest.raises(ConfigError, match="mod3: num_threads must be a positive int") as err:
        cfg[mod3].num_threads = threads  # type: ignore[assignment]
    assert repr(threads) in str(err.value)
    assert cfg[mod3].num_threads is None


# ----- refused mistakes, with what the message must say


def test_unknown_parameter_name_lists_valid_ones() -> None:
    cfg, (mod1, mod2, mod3) = rfc_config()
    before = snapshot(cfg)
    with pytest.raises(ConfigError) as err:
        cfg.connect(mod2, 0, mod3, "data_9")
    assert str(err.value) == "mod3 has no input 'data_9'; valid inputs: data_0, data_1"
    with pytest.raises(ConfigError, match=r"mod1 has no input 'x'; valid inputs: data_0, data_1"):
        cfg.inputs["x"] = (mod1, "x")
    assert snapshot(cfg) == before


def test_output_index_out_of_range_says_how_many() -> None:
    mod1, mod2, _ = old_tvm_test_modules()
    cfg = PipelineModuleConfig()
    cfg.inputs["data_0"] = (mod1, "data_0")
    cfg[mod2].target = "llvm"
    before = snapshot(cfg)
    with pytest.raises(ConfigError) as err:
        cfg.connect(mod1, 3, mod2, "data_0")
    assert "mod1 has no output(3)" in str(err.value)
    assert "it has 3 outputs (indices 0..2)" in str(err.value)
    with pytest.raises(
        ConfigError, match=r"has no output\(1\): it has 1 output \(indices 0\.\.0\)"
    ):
        cfg.outputs.append((mod2, 1))
    with pytest.raises(ConfigError, match=r"mod1: an output index must be a non-negative int"):
        cfg.outputs.append((mod1, -1))
    assert snapshot(cfg) == before


def test_connection_to_itself_is_refused() -> None:
    mod = unary_module()
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (mod, "data_0")
    before = snapshot(cfg)
    with pytest.raises(ConfigError) as err:
        cfg.connect(mod, 0, mod, "data_0")
    assert "mod1.output(0) -> mod1.data_0" in str(err.value)
    assert "cannot feed itself" in str(err.value)
    assert snapshot(cfg) == before


def test_two_cycle_is_refused_and_named() -> None:
    first, second = unary_module(), unary_module()
    cfg = PipelineModuleConfig()
    cfg.connect(first, 0, second, "data_0")
    before = snapshot(cfg)
    with pytest.raises(ConfigError) as err:
        cfg.connect(second, 0, first, "data_0")
    assert "mod2.output(0) -> mod1.data_0 closes a cycle: mod1 -> mod2 -> mod1" in str(err.value)
    assert snapshot(cfg) == before


def test_three_cycle_is_refused_and_named() -> None:
    mods = [unary_module(), unary_module(), unary_module()]
    cfg = PipelineModuleConfig()
    cfg.connect(mods[0], 0, mods[1], "data_0")
    cfg.connect(mods[1], 0, mods[2], "data_0")
    before = snapshot(cfg)
    with pytest.raises(ConfigError) as err:
        cfg.connect(mods[2], 0, mods[0], "data_0")
    assert "closes a cycle: mod1 -> mod2 -> mod3 -> mod1" in str(err.value)
    assert snapshot(cfg) == before


def test_cycle_through_a_second_input_is_refused() -> None:
    mod1, mod2, mod3 = rfc_example_modules()
    cfg = PipelineModuleConfig()
    cfg.connect(mod1, 0, mod2, "data_0")
    cfg.connect(mod2, 0, mod3, "data_1")
    with pytest.raises(ConfigError, match="closes a cycle: mod1 -> mod2 -> mod3 -> mod1"):
        cfg.connect(mod3, 0, mod1, "data_1")
    assert len(cfg.connections) == 2


def _feed_by_producer(cfg, mods):  # type: ignore[no-untyped-def]
    cfg.connect(mods[0], 0, mods[2], "data_0")


def _feed_by_other_producer(cfg, mods):  # type: ignore[no-untyped-def]
    cfg.connect(mods[1], 0, mods[2], "data_0")


def _feed_by_input(cfg, mods):  # type: ignore[no-untyped-def]
    cfg.inputs["a"] = (mods[2], "data_0")


def _feed_by_other_input(cfg, mods):  # type: ignore[no-untyped-def]
    cfg.inputs["b"] = (mods[2], "data_0")


def _feed_by_param(cfg, mods):  # type: ignore[no-untyped-def]
    cfg[mods[2]].params = {"data_0": np.zeros((1, 4), "float32")}


@pytest.mark.parametrize(
    ("first", "second", "first_text", "second_text"),
    [
        (_feed_by_producer, _feed_by_other_producer, "mod1.output(0)", "mod2.output(0)"),
        (_feed_by_producer, _feed_by_input, "mod1.output(0)", "pipeline input 'a'"),
        (_feed_by_input, _feed_by_producer, "pipeline input 'a'", "mod1.output(0)"),
        (_feed_by_input, _feed_by_other_input, "pipeline input 'a'", "pipeline input 'b'"),
        (_feed_by_param, _feed_by_producer, "a bound param", "mod1.output(0)"),
        (_feed_by_producer, _feed_by_param, "mod1.output(0)", "a bound param"),
        (_feed_by_param, _feed_by_input, "a bound param", "pipeline input 'a'"),
        (_feed_by_input, _feed_by_param, "pipeline input 'a'", "a bound param"),
    ],
    ids=[
        "two-producers",
        "producer-then-input",
        "input-then-producer",
        "two-pipeline-inputs",
        "param-then-producer",
        "producer-then-param",
        "param-then-input",
        "input-then-param",
    ],
)
def test_module_input_fed_twice_is_refused(first, second, first_text, second_text) -> None:  # type: ignore[no-untyped-def]
    mods = [unary_module(), unary_module(), binary_module()]
    cfg = PipelineModuleConfig()
    for mod in mods:
        cfg[mod].target = "llvm"  # register all three, in this order
    first(cfg, mods)
    before = snapshot(cfg)
    with pytest.raises(ConfigError) as err:
        second(cfg, mods)
    assert str(err.value) == (
        f"mod3.data_0 is already fed by {first_text}; it cannot also be fed by {second_text}"
    )
    assert snapshot(cfg) == before


@pytest.mark.parametrize(
    ("producer", "consumer", "produced", "expected"),
    [
        (
            unary_module(dtype="float32"),
            unary_module(dtype="int32"),
            "float32[1, 4]",
            "int32[1, 4]",
        ),
        (unary_module(shape=(1, 4)), unary_module(shape=(2, 4)), "float32[1, 4]", "float32[2, 4]"),
        (
            unary_module(shape=(1, 4)),
            unary_module(shape=(1, 4, 1)),
            "float32[1, 4]",
            "float32[1, 4, 1]",
        ),
    ],
    ids=["dtype", "shape", "rank"],
)
def test_dtype_or_shape_mismatch_shows_both_sides(producer, consumer, produced, expected) -> None:  # type: ignore[no-untyped-def]
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (producer, "data_0")
    cfg.outputs.append((consumer, 0))
    before = snapshot(cfg)
    with pytest.raises(ConfigError) as err:
        cfg.connect(producer, 0, consumer, "data_0")
    assert str(err.value) == (
        f"mod1.output(0) -> mod2.data_0: the producer gives {produced} but the consumer "
        f"expects {expected}"
    )
    assert snapshot(cfg) == before


def test_symbolic_dimensions_match_any_size() -> None:
    dynamic, fixed, wider = (
        unary_module(shape=("n", 4)),
        unary_module(shape=(2, 4)),
        unary_module(shape=("m", 5)),
    )
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (dynamic, "data_0")
    cfg.connect(dynamic, 0, fixed, "data_0")  # n against 2: accepted
    assert cfg.signature(dynamic).inputs[0].shape == (None, 4)
    with pytest.raises(ConfigError) as err:
        cfg.connect(fixed, 0, wider, "data_0")  # 4 against 5: refused
    assert "the producer gives float32[2, 4] but the consumer expects float32[?, 5]" in str(
        err.value
    )


def test_mismatch_is_read_from_the_right_output_of_a_tuple() -> None:
    source = multi_output_module(2)
    consumer = unary_module(dtype="float16")
    cfg = PipelineModuleConfig()
    with pytest.raises(ConfigError, match=r"mod1\.output\(1\) -> mod2\.data_0: the producer gives"):
        cfg.connect(source, 1, consumer, "data_0")


class _NotAModule:
    pass


@pytest.mark.parametrize(
    "thing",
    ["mod1", 42, np.zeros((1, 4)), None, _NotAModule()],
    ids=["str", "int", "ndarray", "None", "instance"],
)
def test_non_module_objects_are_refused(thing: object) -> None:
    cfg, (mod1, _, _) = rfc_config()
    before = snapshot(cfg)
    with pytest.raises(ConfigError, match=r"must be a tvm\.IRModule") as err:
        cfg.connect(mod1, 0, thing, "data_0")
    assert type(thing).__name__ in str(err.value)
    with pytest.raises(ConfigError, match=r"must be a tvm\.IRModule"):
        cfg.inputs["z"] = (thing, "data_0")
    assert snapshot(cfg) == before
    assert thing not in cfg


def test_module_without_relax_main_is_refused() -> None:
    cfg = PipelineModuleConfig()
    with pytest.raises(ConfigError, match="no Relax function 'main'"):
        cfg.inputs["x"] = (tvm.IRModule(), "data_0")
    assert len(cfg.inputs) == 0


def test_a_class_is_refused_as_python_stage() -> None:
    cfg, (_, _, mod3) = rfc_config()
    with pytest.raises(ConfigError, match="must be a plain function defined at module level"):
        cfg.connect(mod3, 0, _NotAModule, "x")


def test_lambda_stage_is_refused() -> None:
    cfg, (_, _, mod3) = rfc_config()
    before = snapshot(cfg)
    with pytest.raises(ConfigError) as err:
        cfg.connect(mod3, 0, lambda logits: logits, "logits")
    assert "a lambda cannot be a pipeline stage" in str(err.value)
    assert "define it with 'def' at module level" in str(err.value)
    assert snapshot(cfg) == before


def test_closure_stage_is_refused() -> None:
    scale = 2.0

    def scaled(logits):  # type: ignore[no-untyped-def]
        return logits * scale

    cfg, (_, _, mod3) = rfc_config()
    before = snapshot(cfg)
    with pytest.raises(ConfigError) as err:
        cfg.connect(mod3, 0, scaled, "logits")
    assert "'test_closure_stage_is_refused.<locals>.scaled' is a closure" in str(err.value)
    assert "define it at module level" in str(err.value)
    assert snapshot(cfg) == before


def test_nested_function_without_free_variables_is_refused() -> None:
    def nested(logits):  # type: ignore[no-untyped-def]
        return logits

    cfg, (_, _, mod3) = rfc_config()
    with pytest.raises(ConfigError, match="closure or a nested function"):
        cfg.outputs.append((nested, 0))
    assert list(cfg.outputs) == [(mod3, 0)]


def test_python_stage_with_varargs_is_refused() -> None:
    cfg, (_, _, mod3) = rfc_config()
    with pytest.raises(ConfigError, match=r"'takes_varargs' takes \*args/\*\*kwargs"):
        cfg.connect(mod3, 0, takes_varargs, "tensors")


def test_python_stage_unknown_input_lists_its_parameters() -> None:
    cfg, (_, _, mod3) = rfc_config()
    with pytest.raises(ConfigError, match="has no input 'logit'; valid inputs: logits"):
        cfg.connect(mod3, 0, postprocess, "logit")


def test_param_group_refuses_a_python_stage_and_a_second_group() -> None:
    mod = weighted_module()
    cfg = PipelineModuleConfig()
    cfg.param_groups["g"] = mod
    with pytest.raises(ConfigError, match="only a Relax module can hold parameters"):
        cfg.param_groups["h"] = postprocess
    with pytest.raises(ConfigError, match="already belongs to a group"):
        cfg.param_groups["h"] = mod
    assert dict(cfg.param_groups) == {"g": mod}


def test_build_refuses_an_unfed_module_input() -> None:
    mod1, mod2, mod3 = rfc_example_modules()
    cfg = PipelineModuleConfig()
    cfg.inputs["data_0"] = (mod1, "data_0")
    cfg.inputs["data_1"] = (mod1, "data_1")
    cfg.inputs["data_2"] = (mod3, "data_0")
    cfg.connect(mod1, 0, mod2, "data_0")
    cfg.outputs.append((mod3, 0))
    with pytest.raises(ConfigError) as err:
        build_pipeline(cfg)
    # mod3 is not downstream of mod2 yet, so it comes second in topological order
    assert cfg[mod3].name == "mod2"
    assert str(err.value).startswith("mod2.data_1 is not fed: connect a producer")


def test_build_refuses_a_pipeline_without_outputs() -> None:
    mod = unary_module()
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (mod, "data_0")
    with pytest.raises(ConfigError, match="the pipeline has no output"):
        build_pipeline(cfg)


def test_build_refuses_a_module_whose_outputs_go_nowhere() -> None:
    cfg, _ = rfc_config()
    dangling = unary_module()
    cfg.inputs["extra"] = (dangling, "data_0")
    with pytest.raises(ConfigError, match="mod4's outputs go nowhere"):
        build_pipeline(cfg)


def test_build_refuses_a_param_group_without_initial_params() -> None:
    mod = weighted_module()
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (mod, "data_0")
    cfg.inputs["w"] = (mod, "w")
    cfg.outputs.append((mod, 0))
    cfg.param_groups["g"] = mod
    with pytest.raises(ConfigError, match="param group 'g': mod1 has no initial params"):
        build_pipeline(cfg)


# ----- TVM's old test_pipe_config_check, mistake by mistake


def _nothing(cfg, mods) -> None:  # type: ignore[no-untyped-def]
    pass


def _connect_1_to_2(cfg, mods) -> None:  # type: ignore[no-untyped-def]
    cfg.connect(mods[0], 0, mods[1], "data_0")


def _wire_all_but_outputs(cfg, mods) -> None:  # type: ignore[no-untyped-def]
    cfg.inputs["data_0"] = (mods[0], "data_0")
    cfg.inputs["data_1"] = (mods[1], "data_1")
    cfg.connect(mods[0], 0, mods[1], "data_0")
    cfg.connect(mods[0], 0, mods[2], "data_1")
    cfg.connect(mods[1], 0, mods[2], "data_0")


def _wire_all_but_one_input(cfg, mods) -> None:  # type: ignore[no-untyped-def]
    cfg.inputs["data_0"] = (mods[0], "data_0")
    cfg.connect(mods[0], 0, mods[1], "data_0")
    cfg.connect(mods[0], 0, mods[2], "data_1")
    cfg.connect(mods[1], 0, mods[2], "data_0")
    cfg.outputs.append((mods[2], 0))


OLD_TVM_MISTAKES = [
    pytest.param(
        _nothing,
        lambda cfg, mods: cfg.connect(mods[0], 9, mods[1], "data_0"),
        ["mod1 has no output(9)", "3 outputs"],
        id="1-output-index-out-of-range",
    ),
    pytest.param(
        _nothing,
        lambda cfg, mods: cfg.connect(mods[0], 0, mods[1], "data_9"),
        ["mod2 has no input 'data_9'", "valid inputs: data_0, data_1"],
        id="2-input-name-unknown",
    ),
    pytest.param(
        _nothing,
        lambda cfg, mods: cfg.connect(mods[0], 0, mods[0], "data_0"),
        ["mod1.output(0) -> mod1.data_0", "cannot feed itself"],
        id="3-connect-module-to-itself",
    ),
    pytest.param(
        _connect_1_to_2,
        lambda cfg, mods: cfg.connect(mods[1], 0, mods[0], "data_0"),
        ["closes a cycle", "mod1 -> mod2 -> mod1"],
        id="4-cycle",
    ),
    pytest.param(
        _nothing,
        lambda cfg, mods: cfg.inputs.__setitem__("data_0", (mods[0], "data_9")),
        ["mod1 has no input 'data_9'", "valid inputs: data_0"],
        id="5-pipeline-input-to-missing-module-input",
    ),
    pytest.param(
        _nothing,
        lambda cfg, mods: cfg.outputs.append((mods[0], 9)),
        ["mod1 has no output(9)", "3 outputs"],
        id="6-pipeline-output-index-out-of-range",
    ),
    pytest.param(
        _nothing,
        lambda cfg, mods: cfg.inputs.__setitem__("data_0", (mods[0], 0)),
        ["mod1 has no input 0", "valid inputs: data_0"],
        id="7-pipeline-input-bound-to-a-module-output",
    ),
    pytest.param(
        _nothing,
        lambda cfg, mods: cfg.outputs.append((mods[0], "data_0")),
        ["mod1: an output index must be a non-negative int", "'data_0'"],
        id="7b-pipeline-output-bound-to-a-module-input",
    ),
    pytest.param(
        _nothing,
        lambda cfg, mods: cfg.connect(mods[0], "data_0", mods[1], 0),
        ["an output index must be a non-negative int", "'data_0'"],
        id="7c-connect-input-to-output",
    ),
    pytest.param(
        _connect_1_to_2,
        lambda cfg, mods: cfg.connect(mods[0], 1, mods[1], "data_0"),
        ["mod2.data_0 is already fed by mod1.output(0)", "mod1.output(1)"],
        id="8-module-input-fed-twice",
    ),
    pytest.param(
        _wire_all_but_outputs,
        lambda cfg, mods: build_pipeline(cfg),
        ["the pipeline has no output"],
        id="9-no-outputs-at-build",
    ),
    pytest.param(
        _wire_all_but_one_input,
        lambda cfg, mods: build_pipeline(cfg),
        ["mod2.data_1 is not fed"],
        id="9b-unfed-input-at-build",
    ),
]


@pytest.mark.parametrize(("setup", "mistake", "fragments"), OLD_TVM_MISTAKES)
def test_old_tvm_config_check(setup, mistake, fragments) -> None:  # type: ignore[no-untyped-def]
    mods = old_tvm_test_modules()
    cfg = PipelineModuleConfig()
    for mod in mods:
        cfg[mod].target = "llvm"  # registered in order: mod1, mod2, mod3
    setup(cfg, mods)
    before = snapshot(cfg)
    with pytest.raises(ConfigError) as err:
        mistake(cfg, mods)
    assert isinstance(err.value, ValueError)
    for fragment in fragments:
        assert fragment in str(err.value)
    assert snapshot(cfg) == before


# ----- a refused mistake leaves no trace


def _refuse_dtype_into_new(cfg, mods, new) -> None:  # type: ignore[no-untyped-def]
    cfg.connect(mods[2], 0, new, "data_0")


def _refuse_unknown_param_of_new(cfg, mods, new) -> None:  # type: ignore[no-untyped-def]
    cfg.inputs["extra"] = (new, "nope")


def _refuse_output_index_of_new(cfg, mods, new) -> None:  # type: ignore[no-untyped-def]
    cfg.outputs.append((new, 5))


@pytest.mark.parametrize(
    "mistake",
    [_refuse_dtype_into_new, _refuse_unknown_param_of_new, _refuse_output_index_of_new],
    ids=["connect-dtype-mismatch", "input-unknown-param", "output-index"],
)
def test_refused_mistake_with_a_new_module_leaves_no_trace(mistake) -> None:  # type: ignore[no-untyped-def]
    cfg, mods = rfc_config()
    new = unary_module(dtype="int32")
    with pytest.raises(ConfigError):
        mistake(cfg, mods, new)
    cfg.validate()  # the pipeline is still complete: build_pipeline would accept it
    assert new not in cfg
    assert len(cfg.modules) == 3

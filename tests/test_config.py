import pytest

from actcompile import CompileConfig, actcompile, get_codec, parse_budget
from actcompile.config import Budget


@pytest.mark.parametrize("text, expected", [
    ("2GB", 2 * 10**9), ("2 GB", 2 * 10**9), ("2gb", 2 * 10**9), ("2GiB", 2 * 2**30),
    ("1.5 MiB", int(1.5 * 2**20)), ("512kb", 512_000), ("100B", 100), (" 3 tb ", 3 * 10**12),
])
def test_size_strings_parse_to_bytes(text, expected):
    assert parse_budget(text).resolve(baseline_bytes=1) == expected


def test_int_is_bytes_and_float_is_fraction_of_baseline():
    assert parse_budget(12345).resolve(baseline_bytes=10**9) == 12345
    assert parse_budget(0.25).resolve(baseline_bytes=1000) == 250
    assert parse_budget(1.0).resolve(baseline_bytes=1000) == 1000


@pytest.mark.parametrize("bad, fragment", [
    ("-1GB", "must be positive"), ("0GB", "must be positive"), (0, "must be positive"), (-5, "must be positive"), (1.5, "in (0, 1]"),
    (0.0, "in (0, 1]"), (float("nan"), "in (0, 1]"), ("lots", "not a size"), (None, "not a budget"),
    (True, "not a budget"), ("2 GBs", "not a size"), ([1], "not a budget"), ("0.1B", "at least one byte"),
])
def test_bad_budgets_name_the_value_and_what_is_accepted(bad, fragment):
    with pytest.raises(ValueError) as info:
        parse_budget(bad)
    message = str(info.value)
    assert fragment in message, message
    assert repr(bad) in message or type(bad).__name__ in message, message
    assert "accepted" in message, message


def test_budget_record_validates_its_fields():
    with pytest.raises(ValueError, match="exactly one"):
        Budget()
    with pytest.raises(ValueError, match="fraction"):
        Budget(fraction=2.0)


@pytest.mark.parametrize("eps", [0.0, 1.0, -0.1, 1.5])
def test_epsilon_outside_open_unit_interval_is_rejected(eps):
    with pytest.raises(ValueError, match=r"epsilon must be in \(0, 1\)"):
        CompileConfig(budget=parse_budget("1GB"), epsilons=(0.1, eps))


def test_unknown_option_lists_accepted_ones():
    import torch  # noqa: F811

    with pytest.raises(TypeError, match="accepted"):
        actcompile(torch.nn.Linear(2, 2), budget="1GB", epsilon_ladder=(0.1,))


def test_default_codecs_come_from_registry():
    from actcompile.codecs import available_codecs

    config = CompileConfig(budget=parse_budget("1GB"))
    # the integer codecs come with narrow_integers, offload with the offload option on an accelerator
    every = set(available_codecs()) - {"none", "random", "bits", "pool_offsets", "narrow", "offload"}
    assert {c.name for c in config.codecs} == every
    assert get_codec("int8") in config.codecs
    linear = __import__("torch").nn.Linear(2, 2)
    assert {c.name for c in actcompile(linear, budget="1GB", codecs="all").compile_config.codecs} == every
    quantizers = actcompile(linear, budget="1GB", codecs="quantizers").compile_config.codecs
    assert {c.name for c in quantizers} == {"fp8", "int2", "int4", "int8", "mask"}
